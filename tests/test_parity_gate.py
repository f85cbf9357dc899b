"""verify's parity gate (issue #34, item 3): weights exact, KL that sees 1% at fp32, top-1 only where it means something.

- ONNX and ExecuTorch: the file's weights, read back, are exactly the re-quantized reference's codes and
  scales (and float weights equal); a 1% change of one weight tensor of the reference fails the check at
  every bit width, naming that tensor.
- top-1 agreement is judged only at positions where the reference's own top-1 leads its runner-up by more
  than the bounds let an artifact undo, so a faithful export of a near-flat model does not fail on near-ties.
"""
import numpy as np
import pytest
import torch

import slm_export
from slm_export.verify import TOLERANCES, ParityReport, Tolerance, compare

from conftest import require_extra, tiny_model


def _quiet_export(model, tmp_path, target, bits, name="a", **kw):
    kw.setdefault("max_context", 64)
    return slm_export.export(model, target=target, bits=bits, out=tmp_path / name, log=lambda *a: None, **kw)


def _scaled(model, param: str, factor: float = 1.01):
    """`model` with one weight tensor multiplied by `factor` (a copy: the fixture model stays as exported)."""
    import copy

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        dict(nudged.named_parameters())[param].mul_(factor)
    return nudged


DOWN_1 = "model.layers.1.mlp.down_proj.weight"


# --- ONNX -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, bits, kw", [
    ("llama", 16, {}),
    ("llama", 8, {}),
    ("llama", 4, {}),  # GPTQ, int8 lm_head the tied embedding gathers from, mixed precision
    ("tinyllama", 4, {"symmetric": False, "quant_method": "rtn"}),  # untied, zero points
    ("phi3", 4, {"quant_method": "mse"}),  # fused qkv / gate_up parameters
])
def test_onnx_weights_are_the_quantizers_and_a_1pct_change_is_named(arch, bits, kw, tmp_path):
    from slm_export.exporters.onnx.checks import check_weights

    model = tiny_model(arch)
    art = _quiet_export(model, tmp_path, "onnx", bits, **kw)
    ok = check_weights(art.path, art.manifest, model)
    assert ok["passed"], ok["detail"]
    assert ("quantized weights exactly the quantizer's" in ok["detail"]) == (bits != 16), ok["detail"]
    bad = check_weights(art.path, art.manifest, _scaled(model, DOWN_1))
    assert not bad["passed"] and bad["detail"].startswith("layers.1.down_proj"), bad["detail"]
    if bits == 16:
        assert bad["detail"].startswith("layers.1.down_proj.weight: 8192 of 8192 values differ"), bad["detail"]
    # any weight tensor, not only the linears: a norm (with GPTQ the layer's linears after it move too,
    # and the norm, first in forward order, is named first)
    norm = _scaled(model, "model.layers.0.post_attention_layernorm.weight")
    bad = check_weights(art.path, art.manifest, norm)
    assert not bad["passed"] and bad["detail"].startswith("layers.0.ffn_norm:"), bad["detail"]


def test_onnx_verify_reports_the_weight_check(tmp_path):
    """verify asks the target for its checks: the report shows the weight check, and it joins the verdict."""
    model = tiny_model("llama")
    art = _quiet_export(model, tmp_path, "onnx", 8)
    report = art.verify(reference=model, prompt_tokens=24, decode_steps=4, perplexity=False)
    assert "check: model.onnx weights are the quantizer's: PASS" in report.format() and report.passed, report.format()
    nudged = _scaled(model, DOWN_1)
    report = art.verify(reference=nudged, prompt_tokens=24, decode_steps=4, perplexity=False)
    assert "check: model.onnx weights are the quantizer's: FAIL (layers.1.down_proj: " in report.format(), report.format()
    assert not report.passed
    # the logits alone would not have seen it: every comparison still passes
    assert all(c.passed for c in report.comparisons), report.format()


def test_onnx_weight_check_sees_a_changed_file(tmp_path):
    """The check reads the file: one changed scale in it is named (the reference unchanged)."""
    import onnx
    from onnx import numpy_helper

    from slm_export.exporters.onnx.checks import check_weights

    model = tiny_model("llama")
    art = _quiet_export(model, tmp_path, "onnx", 4, quant_method="rtn", mixed_precision=0.0)
    path = art.path / "model.onnx"
    m = onnx.load(str(path))
    t = next(t for t in m.graph.initializer if t.name == "layers.0.o_proj.scales")
    a = numpy_helper.to_array(t).copy()
    a[3, 0] *= 1.01
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    bad = check_weights(art.path, art.manifest, model)
    assert not bad["passed"] and bad["detail"] == "layers.0.o_proj: 1 of 128 scales differ from the quantizer's", bad["detail"]


# --- ExecuTorch -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, bits, kw", [
    ("llama", 16, {}),
    ("llama", 8, {}),  # int8 weight-only (qc8w), int8 embedding rows
    ("llama", 4, {}),  # 8da4w groups with bfloat16 scales, int4 embedding rows
    ("qwen2", 4, {"activations": "int8", "lm_head_bits": 8}),  # biases, an int8 8da8w lm_head
])
def test_pte_weights_are_the_quantizers_and_a_1pct_change_is_named(arch, bits, kw, tmp_path):
    require_extra("executorch", "executorch")
    from slm_export.exporters.executorch.checks import check_weights

    model = tiny_model(arch)
    with torch.no_grad():  # transformers initialises biases at 0, which 1% of leaves unchanged
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    art = _quiet_export(model, tmp_path, "executorch", bits, **kw)
    ok = check_weights(art.path, art.manifest, model)
    assert ok["passed"], ok["detail"]
    bad = check_weights(art.path, art.manifest, _scaled(model, DOWN_1))
    assert not bad["passed"] and bad["detail"].startswith("layers.1.down:"), bad["detail"]
    bad = check_weights(art.path, art.manifest, _scaled(model, "model.embed_tokens.weight"))
    assert not bad["passed"] and bad["detail"].startswith("embed_tokens:"), bad["detail"]
    bad = check_weights(art.path, art.manifest, _scaled(model, "model.layers.0.input_layernorm.weight"))
    assert not bad["passed"] and "layers.0.attn_norm: its values are not among the program's constants" in bad["detail"], \
        bad["detail"]
    if bits == 4 and arch == "llama":  # verify asks the target for the check and shows it
        report = art.verify(reference=model, prompt_tokens=16, decode_steps=4, perplexity=False)
        assert "check: model.pte weights are the quantizer's: PASS" in report.format(), report.format()
    if arch == "qwen2":
        bad = check_weights(art.path, art.manifest, _scaled(model, "model.layers.1.self_attn.k_proj.bias"))
        assert not bad["passed"] and bad["detail"].startswith("layers.1.attn.k.bias:"), bad["detail"]


# --- AWQ: rescaled norms, reproduced from the recorded alphas ----------------------------------------

@pytest.mark.parametrize("target", ["onnx", "executorch"])
def test_awq_export_passes_the_weight_check_and_same_quant_parity(target, tmp_path):
    """An awq export's rescaled norms and weights are rebuilt exactly from its recorded alphas (the weight
    check passes; a 1% change of a norm fails it), and the same-quant reference carries the rescaled
    norms (its KL against the artifact stays at the runtime's own error)."""
    if target == "executorch":
        require_extra("executorch", "executorch")
    from conftest import tiny_bpe_tokenizer

    from slm_export.exporters import TARGETS

    check_weights = __import__(f"slm_export.exporters.{target}.checks", fromlist=["check_weights"]).check_weights
    model = tiny_model("llama")
    art = _quiet_export(model, tmp_path, target, 4, quant_method="awq", tokenizer=tiny_bpe_tokenizer())
    alphas = art.manifest["quant"]["calibration"]["awq"]["alphas"]
    assert any(a is not None for a in alphas.values()), alphas
    ok = check_weights(art.path, art.manifest, model)
    assert ok["passed"], ok["detail"]
    bad = check_weights(art.path, art.manifest, _scaled(model, "model.layers.0.input_layernorm.weight"))
    assert not bad["passed"] and "layers.0" in bad["detail"].split(":")[0], bad["detail"]
    norms = TARGETS.get(target)().same_quant_weights(model, art.path, art.manifest)
    stored = norms["model.layers.0.input_layernorm.weight"]
    assert not np.array_equal(stored, model.model.layers[0].input_layernorm.weight.detach().numpy())
    report = art.verify(reference=model, prompt_tokens=16, decode_steps=4, perplexity=False)
    same = next(c for c in report.comparisons if c.reference == "same-quant")
    assert same.mean_kl < 0.01, report.format()


# --- float bounds and top-1 -------------------------------------------------------------------------

def test_margin_follows_the_bounds():
    assert Tolerance(mean_kl=0.03, top1=0.88).margin == pytest.approx(2 * np.sqrt(0.06))
    assert Tolerance(mean_kl=1e-6, top1=0.99, max_abs=1e-2).margin == pytest.approx(0.02)  # the max bound's floor
    assert Tolerance(mean_kl=0.03, top1=0.88, top1_margin=1.5).margin == 1.5


def test_top1_is_judged_only_where_the_reference_leads():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 0.01, (200, 64))  # near-flat: most leads are ~0.01
    ref[:50, 0] += 5.0  # 50 positions where the reference is sure
    faithful = ref + rng.normal(0, 0.01, ref.shape)  # an error far inside the bounds
    tol = Tolerance(mean_kl=0.03, top1=0.88)
    c = compare(ref, faithful, 0, "fp32", tol)
    assert c.top1_all < 0.88  # over all positions the near-ties flip: the former gate failed it
    assert c.passed and c.top1_judged == 50 and c.top1_agreement == 1.0, c
    broken = faithful.copy()
    broken[:10, 1] += 6.0  # wrong at 10 of the 50 positions where the reference is sure
    c = compare(ref, broken, 0, "fp32", Tolerance(mean_kl=1.0, top1=0.88))
    assert not c.passed and c.top1_judged == 50 and c.top1_agreement == pytest.approx(0.8), c
    report = ParityReport("x", "onnx", "int8", 200, 0, comparisons=[c])
    assert "fp32: top-1 0.800 over 50 of 200 positions (margin > 2.83" in report.format(), report.format()
    # nothing to judge: top-1 cannot fail, the report says so
    c = compare(ref[50:], faithful[50:], 0, "fp32", tol)
    assert c.passed and c.top1_judged == 0 and c.top1_agreement is None
    assert "top-1 n/a over 0 of 150 positions" in ParityReport("x", "onnx", "int8", 150, 0, comparisons=[c]).format()


def test_near_flat_model_faithful_int4_export_passes(tmp_path):
    """A random 12-layer, 128-wide model with an 8192-token vocabulary has near-flat logits: its faithful int4
    export (KL far inside the bound) agrees on top-1 at under 40% of positions, which failed the former gate
    (top-1 over all positions >= 0.40). Judged only where the reference leads, it passes, and says how many."""
    model = tiny_model("llama", vocab_size=8192, num_hidden_layers=12, hidden_size=128, head_dim=32,
                       intermediate_size=512, initializer_range=0.04)
    art = _quiet_export(model, tmp_path, "onnx", 4, max_context=192, lm_head_bits=4, mixed_precision=0.0,
                        quant_method="rtn")
    report = art.verify(reference=model, prompt_tokens=128, decode_steps=32, perplexity=False)
    fp32 = next(c for c in report.comparisons if c.reference == "fp32")
    bound = TOLERANCES[4]["fp32"]
    assert fp32.mean_kl < bound.mean_kl / 10, report.format()  # faithful: far inside the KL bound
    assert fp32.top1_all < bound.top1, report.format()  # the former gate: FAIL on near-ties
    assert report.passed, report.format()
    assert fp32.top1_judged < fp32.positions == 159
    assert f"fp32: top-1 {'n/a' if fp32.top1_agreement is None else f'{fp32.top1_agreement:.3f}'} over " \
           f"{fp32.top1_judged} of 159 positions (margin > 2.45" in report.format(), report.format()


def test_fp32_kl_alone_sees_a_1pct_change_of_one_layer(tmp_path):
    """At bits 16 the KL bound is tight enough that a 1% change of one layer's down_proj fails it on its own."""
    model = tiny_model("llama")
    art = _quiet_export(model, tmp_path, "onnx", 16)
    same = art.verify(reference=model, prompt_tokens=48, decode_steps=16, perplexity=False).comparisons[0]
    nudged = art.verify(reference=_scaled(model, DOWN_1), prompt_tokens=48, decode_steps=16, perplexity=False)
    moved = nudged.comparisons[0]
    bound = TOLERANCES[16]["fp32"].mean_kl
    assert same.mean_kl < bound / 100 and same.passed
    assert moved.mean_kl > bound and not moved.passed, nudged.format()
