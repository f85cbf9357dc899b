"""The one quantizer: methods, the plan against each target's limits, calibration, and packing."""
import numpy as np
import pytest

from slm_export import QuantSpec, SlmExportError
from slm_export.quantize.codes import round_scales
from slm_export.quantize.methods import METHODS
from slm_export.quantize.plan import WeightPlan

from conftest import ARCHS, tiny_model


def _ort_quantize(w, bits, block, symmetric):
    """onnxruntime's own MatMulNBits quantizer: (stored codes [n, k], scales, zero points [n, blocks])."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    kb = -(-k // block)
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros(n * ((kb + 1) // 2) if bits == 4 else n * kb, np.uint8)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, np.ascontiguousarray(w.T), scales, zp,
                                                                   block, n, k, symmetric)
    return packed, scales, zp


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [256, 200])  # 200: a zero-padded last block
def test_rtn_is_onnxruntimes_quantizer_bit_for_bit(bits, symmetric, k):
    """rtn's codes, packed for MatMulNBits, are byte for byte what onnxruntime's quantizer writes
    (in a zero-padded last block onnxruntime leaves the padding unwritten; we write the zero code)."""
    from slm_export.exporters.onnx.quant import pack_matmul_nbits

    rng = np.random.default_rng(bits + k)
    w = (rng.standard_normal((300, k)) * 0.05).astype(np.float32)
    w[::7, 3] *= 12
    packed, scales, zp = _ort_quantize(w, bits, 32, symmetric)
    pw = pack_matmul_nbits(METHODS.get("rtn")(w, WeightPlan.of(w.shape, bits, 32, symmetric)))
    assert pw.packed.shape == packed.shape and np.array_equal(pw.scales, scales)

    def unpack(a, n_values):  # bytes -> one value per element, the padding cut off
        a = a.reshape(300, -1)
        return (np.stack([a & 15, a >> 4], -1).reshape(300, -1) if bits == 4 else a)[:, :n_values]

    assert np.array_equal(unpack(pw.packed, k), unpack(packed, k))
    if symmetric:
        assert pw.zero_points is None
    else:
        assert np.array_equal(unpack(pw.zero_points, -(-k // 32)), unpack(zp, -(-k // 32)))


@pytest.mark.parametrize("k, block, signed", [(256, 32, True), (192, 64, True), (200, 32, True), (256, 32, False)])
def test_mse_search_is_never_worse_than_round_to_nearest(k, block, signed):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, k)).astype(np.float32)
    w[::7, 3] *= 12  # outliers: where round-to-nearest wastes the most of its grid
    plan = WeightPlan.of(w.shape, 4, block, signed_scales=signed)
    rtn, mse = METHODS.get("rtn")(w, plan), METHODS.get("mse")(w, plan)
    kb = -(-k // block)

    def block_error(qw):
        e = np.zeros((w.shape[0], kb * block), np.float32)
        e[:, :k] = (qw.dequantize() - w) ** 2
        return e.reshape(w.shape[0], kb, block).sum(-1)

    assert (block_error(mse) <= block_error(rtn) * (1 + 1e-5) + 1e-9).all()  # no block worse
    assert block_error(mse).sum() < 0.95 * block_error(rtn).sum()  # and less error overall
    assert mse.codes.min() >= -8 and mse.codes.max() <= 7 and mse.scales.shape == (300, kb)
    if not signed:
        assert (mse.scales > 0).all() and (rtn.scales > 0).all()


def test_scales_are_chosen_in_the_precision_the_target_keeps():
    """bfloat16 scales (XNNPACK's int4 groups): the codes are rounded against the stored scale."""
    assert round_scales(np.array([1.0 + 2 ** -9], np.float32), "bfloat16")[0] == 1.0  # ties to even
    assert round_scales(np.array([1.0 + 3 * 2 ** -9], np.float32), "bfloat16")[0] == 1.0 + 2 ** -7
    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    for name in ("rtn", "mse", "hqq"):
        qw = METHODS.get(name)(w, WeightPlan.of(w.shape, 4, 32, scale_dtype="bfloat16", signed_scales=False))
        assert np.array_equal(qw.scales, round_scales(qw.scales, "bfloat16")), name
        # each code is the nearest grid point for its (stored) scale
        s = qw.scales[:, np.arange(128) // 32]
        assert (np.abs(qw.codes - w / s) <= 0.5 + 1e-4).all() | (np.abs(qw.codes) >= 7).any(), name


def test_hqq_reproduces_torchaos_scale_only_solver():
    import torch
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    w = np.random.default_rng(2).standard_normal((96, 256)).astype(np.float32)
    q, s = _choose_qparams_and_quantize_scale_only_hqq(torch.from_numpy(w), [1, 32], -8, 7)
    qw = METHODS.get("hqq")(w, WeightPlan.of(w.shape, 4, 32, signed_scales=False))
    assert np.array_equal(qw.codes, q.to(torch.int8).numpy()) and np.array_equal(qw.scales, s.float().numpy())


def test_gptq_lowers_the_output_error_it_is_calibrated_for():
    """On inputs with a few loud channels (as in real LMs), GPTQ's codes give a smaller error of
    x @ W^T than the best per-block scales alone, and it is deterministic."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((128, 256)) * 0.05).astype(np.float32)
    x = rng.standard_normal((2048, 256)).astype(np.float32)
    x[:, :8] *= 20
    h = x.T @ x / len(x)
    plan = WeightPlan.of(w.shape, 4, 32, method="gptq")

    def out_err(qw):
        return float(np.square(x @ (qw.dequantize() - w).T).mean())

    g1, g2 = METHODS.get("gptq")(w, plan, h), METHODS.get("gptq")(w, plan, h)
    assert np.array_equal(g1.codes, g2.codes) and np.array_equal(g1.scales, g2.scales)
    assert out_err(g1) < 0.7 * out_err(METHODS.get("mse")(w, plan))
    assert g1.codes.min() >= -8 and g1.codes.max() <= 7


@pytest.mark.parametrize("arch", ARCHS)
def test_the_calibration_forward_is_the_model(arch):
    """quantize/calibration.py's plain-PyTorch Decoder forward gives transformers' logits."""
    import torch

    from slm_export.architectures import to_decoder
    from slm_export.quantize.calibration import DecoderForward

    model = tiny_model(arch)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))  # > the 24-token windows
    with torch.no_grad():
        ref = model(ids).logits
    got = DecoderForward(to_decoder(model, 64))(ids)
    assert (ref - got).abs().max().item() < 1e-4


def test_unknown_method_and_useless_combinations_are_refused():
    with pytest.raises(SlmExportError, match="--quant-method awq is not known; use one of: .*gptq"):
        QuantSpec(method="awq")
    with pytest.raises(SlmExportError, match="--bits 16 quantizes nothing"):
        QuantSpec(bits=16, method="gptq")
    assert QuantSpec(method="gptq").label() == "int4-g32-sym-a8-gptq"
