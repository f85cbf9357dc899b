"""The one quantizer: methods, the plan against each target's limits, calibration, and packing."""
import numpy as np
import pytest

from slm_export import QuantSpec, SlmExportError
from slm_export.quantize.codes import round_scales
from slm_export.quantize.methods import METHODS
from slm_export.quantize.plan import WeightPlan

from conftest import ARCHS, require_extra, tiny_bpe_tokenizer, tiny_model


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


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_search_is_the_same_in_chunks_of_any_size(symmetric, monkeypatch):
    """The search goes over a weight in cache-sized chunks of rows; each row's scales are its own."""
    from slm_export.quantize import methods

    rng = np.random.default_rng(1)
    w = rng.standard_normal((517, 256)).astype(np.float32)
    w[::5, 7] *= 9
    importance = rng.uniform(0.1, 3, (8, 32)).astype(np.float32)
    plan = WeightPlan.of(w.shape, 4, 32, symmetric)
    found = []
    for chunk_bytes in (4 * 256, 4 * 256 * 37, 2**30):  # a row, 37 rows (the last chunk shorter), all of it
        monkeypatch.setattr(methods, "_SEARCH_CHUNK_BYTES", chunk_bytes)
        found.append(methods.search_scales(methods._groups(w, 32), plan, importance))
    for scales, zero in found[1:]:
        assert np.array_equal(scales, found[0][0])
        assert (zero is None) == symmetric and (zero is None or np.array_equal(zero, found[0][1]))


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


def _loud_inputs(seed: int, shape: tuple[int, int], tokens: int, loud: int):
    """(weight, inputs, Hessian): inputs with a few loud channels, as real LMs have."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
    x[:, :loud] *= 20
    return w, x, x.T @ x / len(x)


def test_gptq_lowers_the_output_error_it_is_calibrated_for():
    """On inputs with a few loud channels (as in real LMs), GPTQ's codes give a smaller error of
    x @ W^T than the best per-block scales alone, and it is deterministic."""
    w, x, h = _loud_inputs(3, (128, 256), 2048, 8)
    plan = WeightPlan.of(w.shape, 4, 32, method="gptq")

    def out_err(qw):
        return float(np.square(x @ (qw.dequantize() - w).T).mean())

    g1, g2 = METHODS.get("gptq")(w, plan, h), METHODS.get("gptq")(w, plan, h)
    assert np.array_equal(g1.codes, g2.codes) and np.array_equal(g1.scales, g2.scales)
    assert out_err(g1) < 0.7 * out_err(METHODS.get("mse")(w, plan))
    assert g1.codes.min() >= -8 and g1.codes.max() <= 7


def test_gptq_factors_a_weights_hessian_once_for_all_its_row_blocks(monkeypatch):
    """A weight larger than ROW_BLOCK_BYTES is quantized in blocks of rows; its Hessian is factored once
    (O(in^3): most of a large layer's time) and every block gets exactly the codes it would get alone."""
    from slm_export.quantize import methods, quantizer

    w, _, h = _loud_inputs(4, (300, 64), 512, 4)
    plan = WeightPlan.of(w.shape, 4, 32, method="gptq")
    monkeypatch.setattr(quantizer, "ROW_BLOCK_BYTES", 100 * 64 * 4)  # blocks of 100 rows
    made = []
    monkeypatch.setattr(methods.Factored, "__init__", lambda self, *a, _init=methods.Factored.__init__, **k:
                        (made.append(1), _init(self, *a, **k))[1])
    got = quantizer._quantize_one(plan, w, h)
    assert len(made) == 1
    alone = [METHODS.get("gptq")(w[r:r + 100], plan, h) for r in range(0, 300, 100)]
    assert np.array_equal(got.codes, np.concatenate([q.codes for q in alone]))
    assert np.array_equal(got.scales, np.concatenate([q.scales for q in alone]))


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
    with pytest.raises(SlmExportError, match="--quant-method nf4 is not known; use one of: awq, gptq"):
        QuantSpec(method="nf4")
    with pytest.raises(SlmExportError, match="--bits 16 quantizes nothing"):
        QuantSpec(bits=16, method="gptq")
    assert QuantSpec(method="gptq").label() == "int4-g32-sym-a8-gptq"


def _onnx(model, tmp_path, name, **kw):
    import slm_export

    return slm_export.export(model, target="onnx", out=tmp_path / name, max_context=128, log=lambda *a: None, **kw)


def test_mixed_precision_moves_the_most_sensitive_weights_to_int8_within_its_budget(tmp_path):
    """Sensitivity is measured per unit on the calibration text (random ids here: no tokenizer), the
    units that cost the most KL per extra byte go int8 until the budget is spent, the report says why,
    and verify's same-quant reference rebuilds the same plan from the manifest."""
    import json

    model = tiny_model("llama")
    plain = _onnx(model, tmp_path, "plain", quant_method="mse", mixed_precision=0)
    mixed = _onnx(model, tmp_path, "mixed", quant_method="mse", mixed_precision=0.2)
    mp = mixed.manifest["quant"]["calibration"]["mixed_precision"]
    assert mp["budget"] == 0.2 and mp["int8_units"]
    base = plain.manifest["quant"]["summary"]["stored_mb"]
    assert 0 < mp["extra_bytes"] <= 0.2 * base * 1e6 + 1
    report = {e["name"]: e for e in json.loads((mixed.path / "quant_report.json").read_text())["weights"]}
    unit = mp["int8_units"][0]  # e.g. layers.1.qkv -> ONNX node layers.1.qkv_proj
    node = {"qkv": "qkv_proj", "o": "o_proj", "down": "down_proj"}.get(unit.split(".")[-1], "gate_proj")
    entry = report["lm_head" if unit == "lm_head" else f"{'.'.join(unit.split('.')[:2])}.{node}"]
    assert entry["bits"] == 8 and "sensitivity" in entry["reason"] and "mixed precision" in entry["reason"]
    assert {e["bits"] for e in report.values()} == {4, 8}
    parity = mixed.verify(reference=model, prompt_tokens=32, decode_steps=8, perplexity=False)
    # (not .passed: top-1 agreement on this random model's near-ties is noise; the KL is what tells)
    assert next(c for c in parity.comparisons if c.reference == "same-quant").mean_kl < 1e-3, parity.format()


def test_sensitivity_sweep_is_one_full_forward_per_unit():
    """The sensitivity pass reads each layer once and carries every unit's hidden states through the layers
    after it; each unit's KL is exactly that of a whole forward with only that unit rounded to int4."""
    import dataclasses

    import torch

    from slm_export.architectures import to_decoder
    from slm_export.exporters import TARGETS
    from slm_export.quantize.calibration import DecoderForward
    from slm_export.quantize.mixed import PROBE_METHOD, SENSITIVITY_TOKENS, TOP_TOKENS, _kl, _units, unit_sensitivity
    from slm_export.quantize.plan import decoder_weights
    from slm_export.quantize.spec import resolve_spec

    dec = to_decoder(tiny_model("qwen2"), 128)
    onnx = TARGETS.get("onnx")()
    plan = onnx.plan(dec, resolve_spec(onnx, QuantSpec(bits=4, lm_head_bits=4, mixed_precision=0.0)))
    ids = np.random.default_rng(0).integers(3, dec.vocab_size, 100).tolist()
    got = unit_sensitivity(dec, plan, ids)
    units = _units(plan)
    assert list(got) == list(units) and len(units) == 4 * dec.num_layers + 1 and all(v > 0 for v in got.values())

    arrays = {name: arr for name, _, arr, _ in decoder_weights(dec)}
    seq = torch.tensor([ids[:SENSITIVITY_TOKENS]])

    def logits(weights=None):
        fwd = DecoderForward(dec, weights)
        with torch.no_grad():
            x = fwd.embed(seq)
            for layer in dec.layers:
                x = fwd.layer(layer, x)
            return x, fwd

    x, fwd = logits()
    full = fwd.logits(x)
    keep = torch.unique(full.topk(TOP_TOKENS, -1).indices)
    ref = torch.log_softmax(full[..., keep].double(), -1)
    for unit in ["layers.0.qkv", "layers.0.down", f"layers.{dec.num_layers - 1}.gate_up", "lm_head"]:
        probe = {w.name: METHODS.get(PROBE_METHOD)(np.asarray(arrays[w.name], np.float32),
                                                   dataclasses.replace(w, method=PROBE_METHOD)).dequantize()
                 for w in units[unit]}
        x, fwd = logits(probe)
        assert _kl(ref, fwd.logits(x, rows=keep)) == got[unit], unit


def test_calibrated_exports_are_deterministic(tmp_path):
    """GPTQ on the same calibration text gives the same bytes (what verify's re-quantization relies on)."""
    model = tiny_model("qwen2")
    a = _onnx(model, tmp_path, "a", quant_method="gptq")
    b = _onnx(model, tmp_path, "b", quant_method="gptq")
    assert (a.path / "model.onnx.data").read_bytes() == (b.path / "model.onnx.data").read_bytes()
    assert a.manifest["quant"]["methods"] == ["gptq"]  # the tied embedding reads the int8 lm_head's codes
    assert a.manifest["quant"]["calibration"]["random_ids"] > 0  # no tokenizer: said in the manifest


def test_executorch_packs_the_codes_torchao_would_have_made():
    """Packing hqq's codes gives the very tensor torchao's quantize_ makes (so the .pte is the same)."""
    require_extra("executorch", "executorch")
    import torch
    from torchao.quantization import FqnToConfig, Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from slm_export.exporters.executorch.quant import pack_weight

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(128, 48, bias=False))
    ours = torch.nn.Sequential(torch.nn.Linear(128, 48, bias=False))
    ours.load_state_dict(ref.state_dict())
    cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32),
                                                intx_choose_qparams_algorithm="hqq_scale_only")
    quantize_(ref, FqnToConfig(fqn_to_config={"0": cfg}), filter_fn=None)
    w = ours[0].weight.detach().numpy()
    pack_weight(ours[0], METHODS.get("hqq")(w, WeightPlan.of(w.shape, 4, 32, signed_scales=False)), "int8")
    a, b = ref[0].weight, ours[0].weight
    for field in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.block_size, a.target_dtype, a.activation_quantization) == \
        (b.block_size, b.target_dtype, b.activation_quantization)
    x = torch.randn(3, 128)
    assert torch.equal(ref(x), ours(x))


def test_coreml_weight_op_holds_the_given_codes():
    """A quantized weight enters the Core ML program as its codes: one constexpr op holding exactly the
    given int4 codes (including -8, which coremltools' own symmetric mode never uses) and fp16 scales,
    named after the weight's const; a table two modules read (a tied lm_head) is one op; no float copy."""
    require_extra("coremltools", "coreml")
    import coremltools as ct
    import torch
    from torch import nn

    from slm_export.exporters.coreml.quant import const_name, name_weight_ops, stored_name, weight_owners
    from slm_export.exporters.torch_parts import torchao_weight
    from slm_export.quantize.codes import QuantizedWeight

    w = np.random.default_rng(4).standard_normal((16, 64)).astype(np.float32)
    codes = np.clip(np.round(w / 0.1), -8, 7).astype(np.int8)
    codes[0, 0] = -8
    qw = QuantizedWeight(codes, np.full((16, 2), 0.1, np.float32), None, 4, 32)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.again = nn.Linear(64, 16, bias=False), nn.Linear(64, 16, bias=False)
            self.proj.weight = self.again.weight = nn.Parameter(torchao_weight(qw, "float"), requires_grad=False)
            self.sources = {"proj": None, "again": None}  # the report's order, as CoreMLDecoder.sources

        def forward(self, x):
            return self.proj(x) + self.again(x)

    module = Two().eval()
    owners = weight_owners(module)
    assert owners == {"proj": "proj", "again": "proj"}
    with torch.no_grad():  # torch.export names the shared weight after the last module holding it ("again")
        program = torch.export.export(module, (torch.zeros(1, 64),), strict=False).run_decompositions({})
    name_weight_ops(program, owners)
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    ops = list(model._mil_program.functions["main"].operations)
    weight_ops = [op for op in ops if op.op_type.startswith("constexpr_")]
    assert len(weight_ops) == 1, [op.name for op in weight_ops]
    op = weight_ops[0]
    assert op.op_type == "constexpr_blockwise_shift_scale" and stored_name(op.name) == const_name("proj", True)
    assert np.array_equal(op.data.val.astype(np.int8), codes) and op.offset is None
    assert op.scale.val.dtype == np.float16 and np.array_equal(op.scale.val, np.full((16, 2), 0.1, np.float16))
    assert not [o.name for o in ops if o.op_type == "const" and getattr(o.outputs[0].val, "ndim", 0) == 2
                and not all(c.op_type.startswith("constexpr_") for c in o.outputs[0].child_ops)]


def test_asymmetric_onnx_export_stays_close_to_fp32(tmp_path):
    """--asymmetric: linears carry zero points; the embedding table, which ONNX stores symmetric, must
    not take asymmetric codes (it once did, and the benchmark's GPTQ asym row had perplexity 10,707)."""
    model = tiny_model("llama")
    kl = {}
    for sym in (True, False):
        art = _onnx(model, tmp_path, f"s{sym}", symmetric=sym, lm_head_bits=4, mixed_precision=0)
        report = art.verify(reference=model, prompt_tokens=32, decode_steps=8, perplexity=False)
        kl[sym] = next(c for c in report.comparisons if c.reference == "fp32").mean_kl
    assert kl[False] < 3 * kl[True] + 1e-3, kl


# --- AWQ: scales folded into the norms and rows before the weights they feed ------------------------

def _awq_decoder(arch: str, target: str, outliers: bool = False, **spec_kw):
    """(decoder, exporter, resolved spec, calibration ids) of a tiny model; `outliers`: a few loud input
    channels before every weight group, as real LMs have."""
    from slm_export.architectures import to_decoder
    from slm_export.exporters import TARGETS
    from slm_export.quantize.spec import resolve_spec

    dec = to_decoder(tiny_model(arch), 64)
    if outliers:
        for layer in dec.layers:
            for attr in ("attn_norm", "ffn_norm"):
                v = getattr(layer, attr).copy()
                v[:3] *= 25
                setattr(layer, attr, v)
    exporter = TARGETS.get(target)()
    ids = np.random.default_rng(0).integers(0, dec.vocab_size, 512).tolist()
    return dec, exporter, resolve_spec(exporter, QuantSpec(**spec_kw)), ids


@pytest.mark.parametrize("arch, target", [("llama", "executorch"), ("phi3", "onnx"), ("qwen2", "executorch")])
def test_awq_rescaling_leaves_the_float_model_unchanged(arch, target):
    """The rescaled decoder (norms / s, weights * s, v and up rows / s) computes what the original does."""
    import torch

    from slm_export.quantize.awq import activation_rounding, equalize
    from slm_export.quantize.calibration import DecoderForward

    dec, exporter, spec, ids = _awq_decoder(arch, target, method="awq")
    probe = torch.randint(0, dec.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    before, norm0 = DecoderForward(dec)(probe), dec.layers[0].attn_norm.copy()
    plan = exporter.plan(dec, spec)
    alphas = equalize(dec, plan, ids, activation_rounding(plan.limits, spec))
    assert any(a is not None for a in alphas.values())  # something was rescaled
    assert not np.array_equal(norm0, dec.layers[0].attn_norm) or alphas["layers.0.qkv"] is None
    after = DecoderForward(dec)(probe)
    assert (before - after).abs().max().item() < 1e-4 * before.abs().max().item()


def _output_kl(dec, exporter, spec, ids, probe):
    """Mean KL(float || quantized) of the next-token distributions on `probe`, `dec` exported under `spec`
    and run as the target runs it (its int8 activations rounded per token before every linear)."""
    import copy

    import torch

    from slm_export.quantize.awq import activation_rounding, round_activations
    from slm_export.quantize.calibration import DecoderForward

    class Rounded(DecoderForward):
        def linear(self, x, lin):
            flat = round_activations(x.reshape(-1, x.shape[-1]), rounding)
            return super().linear(flat.reshape(x.shape), lin)

    ref = torch.log_softmax(DecoderForward(dec)(probe).double(), -1)
    work = copy.deepcopy(dec)
    plan, codes = exporter.quantize(work, spec, None, ids)
    rounding = activation_rounding(plan.limits, spec)
    got = torch.log_softmax(Rounded(work, {name: qw.dequantize() for name, qw in codes.items()})(probe).double(), -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def test_awq_lowers_the_output_error_of_gptq_where_inputs_have_outlier_channels():
    """On a model with a few loud input channels, AWQ's scales then GPTQ's rounding stay closer to the
    float model than GPTQ alone, at the same size (ExecuTorch's plan: int4 groups, bfloat16 scales)."""
    import torch

    dec, exporter, gptq_spec, ids = _awq_decoder("llama", "executorch", outliers=True, method="gptq",
                                                mixed_precision=0)
    awq_spec = gptq_spec.__class__(**{**gptq_spec.to_dict(), "method": "awq"})
    probe = torch.tensor([np.random.default_rng(5).integers(0, dec.vocab_size, 64).tolist()])
    kl_gptq = _output_kl(dec, exporter, gptq_spec, ids, probe)
    kl_awq = _output_kl(dec, exporter, awq_spec, ids, probe)
    assert kl_awq < 0.9 * kl_gptq, (kl_awq, kl_gptq)


def test_awq_refuses_what_it_cannot_rescale_or_store(tmp_path):
    import slm_export

    with pytest.raises(SlmExportError, match="--quant-method awq rescales the RMSNorm weights, and gemma2 stores"):
        slm_export.export(tiny_model("gemma2"), tokenizer=tiny_bpe_tokenizer(), target="onnx", quant_method="awq",
                          out=tmp_path / "g", max_context=64, log=lambda *a: None)
    with pytest.raises(SlmExportError, match="awq chooses its scales on calibration text, which needs the model's "
                                             "tokenizer"):
        slm_export.export(tiny_model("llama"), target="onnx", quant_method="awq", out=tmp_path / "n",
                          max_context=64, log=lambda *a: None)  # a model object without a tokenizer
    assert not list(tmp_path.iterdir())


def test_a_targets_default_method_follows_the_exports_bits_not_each_weights():
    """ONNX's default is awq at --bits 8 and gptq at --bits 4, where the int8 lm_head and the int8 units of
    mixed precision are rounded as the rest (gptq): awq there would rescale the whole int4 model."""
    for bits, method in ((4, "gptq"), (8, "awq")):
        dec, exporter, spec, _ = _awq_decoder("llama", "onnx", bits=bits)
        plan = exporter.plan(dec, spec)
        methods = {w.method for w in plan.weights if w.quantized and w.kind == "linear"}
        assert methods == {method}, (bits, methods)
        assert plan.equalizes == (method == "awq")
        if bits == 4:
            assert {w.bits for w in plan.weights if w.quantized} == {4, 8}  # the int8 lm_head is there


def test_onnx_int8_default_is_awq_where_the_model_can_take_it(tmp_path):
    """ONNX's int8 default rescales with awq (its error is the int8 activations); a model awq cannot run on
    (no tokenizer to read calibration text with, or Gemma's norms) gets gptq, says so, and records it."""
    import slm_export

    said = []
    a = slm_export.export(tiny_model("llama"), tokenizer=tiny_bpe_tokenizer(), target="onnx", bits=8,
                          out=tmp_path / "awq", max_context=64, log=said.append)
    assert a.manifest["quant"]["methods"] == ["awq"] and a.manifest["quant"]["spec"]["method"] is None
    assert a.manifest["quant"]["calibration"]["awq"]["alphas"]
    assert not any("instead of awq" in str(s) for s in said)
    for name, model, tok, why in (("no-tok", tiny_model("llama"), None, "the model has no tokenizer"),
                                  ("gemma", tiny_model("gemma2"), tiny_bpe_tokenizer(), "gemma2 stores its RMSNorm")):
        said.clear()
        b = slm_export.export(model, tokenizer=tok, target="onnx", bits=8, out=tmp_path / name, max_context=64,
                              log=said.append)
        assert b.manifest["quant"]["methods"] == ["gptq"] and b.manifest["quant"]["spec"]["method"] == "gptq"
        assert any(why in str(s) and "gptq instead of awq" in str(s) for s in said), said
        assert b.verify(reference=model, prompt_tokens=24, decode_steps=8, perplexity=False).passed
