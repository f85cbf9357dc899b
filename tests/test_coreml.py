"""The coreml target on Linux: tiny models of every architecture converted at fp16 / int8 / int4,
with everything that can be checked without executing Core ML (which needs macOS): the package's
spec against the manifest, its weights read back and compared with an independent quantization,
and the converted PyTorch program against the original model."""
import json
import platform
import subprocess
import sys

import numpy as np
import torch
import pytest

import slm_export
from slm_export import SlmExportError
from slm_export.errors import RuntimeUnavailable

from conftest import ARCHS, require_extra, run_cli, tiny_model, tiny_tokenizer

require_extra("coremltools", "coreml")
pytestmark = pytest.mark.skipif(
    platform.system() == "Darwin",
    reason="on macOS Core ML executes, so the 'needs macOS' messages and Linux stand-ins these tests assert do not "
           "apply; the macOS runner has no tests yet (no Mac here)")


def _export(model, tmp_path, bits, name=None, **kw):
    kw.setdefault("max_context", 128)
    return slm_export.export(model, target="coreml", bits=bits, out=tmp_path / (name or f"b{bits}"),
                             log=lambda *a: None, **kw)


def _checks(report) -> dict:
    return {c["name"]: c for c in report.checks}


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory):
    model = tiny_model("llama")
    return model, _export(model, tmp_path_factory.mktemp("coreml"), 4, tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_package_checks_and_program_parity(arch, bits, tmp_path):
    model = tiny_model(arch)
    art = _export(model, tmp_path, bits)
    # 40 prompt + 24 decode steps: past the 24-token sliding windows of phi3 / gemma2
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=24, perplexity=False)
    assert "needs macOS" in report.not_executed
    assert report.executed_by.startswith("PyTorch, running the converted program")
    checks = _checks(report)
    assert [c["passed"] for c in checks.values()] == [True, True], report.format()
    by_ref = {c.reference: c for c in report.comparisons}
    if bits == 16:  # float16 compute and cache against the fp32 model
        assert by_ref["fp32"].mean_kl < 1e-3 and by_ref["fp32"].max_abs_logit_diff < 0.05, report.format()
    else:
        assert by_ref["same-quant"].mean_kl < 1e-3, report.format()
        assert by_ref["same-quant"].max_abs_logit_diff < 0.1, report.format()
    assert report.passed, report.format()


def test_package_layout_spec_and_report(llama_int4):
    _, art = llama_int4
    m = art.manifest
    assert (art.path / "model.mlpackage" / "Manifest.json").is_file()
    assert m["runtime"] == "coreml" and m["target_extra"]["compute_precision"] == "float16"
    assert m["quant"]["label"] == "int4-g32-sym-wo"  # Core ML quantizes weights only: the label says so
    f = m["io"]["functions"]["main"]
    assert list(f["inputs"]) == ["inputIds", "causalMask"] and list(f["outputs"]) == ["logits"]
    assert f["states"]["keyCache"] == {"dtype": "float16", "shape": [2, 2, 128, 16]}
    assert m["io"]["prefill_chunk"] == 127  # a whole prompt in one call
    # the tied embedding and lm_head are one table, at the finer of the two rules (embedding int8)
    report = json.loads((art.path / "quant_report.json").read_text())["weights"]
    emb = next(e for e in report if e["name"] == "embed_tokens")
    assert emb["sources"] == ["model.embed_tokens.weight", "lm_head.weight"] and emb["bits"] == 8
    assert not any(e["name"] == "lm_head" for e in report)
    assert {e["bits"] for e in report if e["name"] != "embed_tokens"} == {4}
    assert art.size_mb * 1e6 == sum(v["bytes"] for k, v in m["files"].items() if k.startswith("model.mlpackage/"))


def test_untied_lm_head_is_its_own_table(tmp_path):
    model = tiny_model("tinyllama")
    art = _export(model, tmp_path, 4)
    report = {e["name"]: e for e in json.loads((art.path / "quant_report.json").read_text())["weights"]}
    assert report["lm_head"]["bits"] == 4 and report["embed_tokens"]["bits"] == 8
    # --lm-head-bits 8: the output layer alone int8 per channel, checked in the package like every weight
    head8 = _export(model, tmp_path, 4, name="h8", lm_head_bits=8)
    report = {e["name"]: e for e in json.loads((head8.path / "quant_report.json").read_text())["weights"]}
    assert report["lm_head"]["bits"] == 8 and report["lm_head"]["scheme"].startswith("int8 per-channel")
    assert {e["bits"] for n, e in report.items() if n.startswith("layers")} == {4}
    parity = head8.verify(reference=model, prompt_tokens=16, decode_steps=8, perplexity=False)
    assert all(c["passed"] for c in _checks(parity).values()) and parity.passed, parity.format()


def test_checks_fail_on_a_wrong_reference_or_manifest(llama_int4, tmp_path):
    """The package checks can fail: other weights, or a manifest that does not describe the package."""
    from slm_export.exporters.coreml.checks import check_spec, check_weights

    _, art = llama_int4
    other = tiny_model("llama", seed=1)
    result = check_weights(art.path, art.manifest, other)
    assert not result["passed"] and "codes differ from the quantizer's" in result["detail"]
    # the weight-exact gate: one weight tensor of the reference changed by 1% is named
    nudged = tiny_model("llama")
    with torch.no_grad():
        nudged.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    result = check_weights(art.path, art.manifest, nudged)
    assert not result["passed"] and result["detail"].startswith("layers.1.down:"), result["detail"]
    wrong = json.loads(json.dumps(art.manifest))
    wrong["io"]["functions"]["main"]["states"]["keyCache"]["shape"][2] = 256
    wrong["io"]["functions"]["main"]["inputs"]["inputIds"]["shape"] = [1, "1..32"]
    result = check_spec(art.path, wrong)
    assert not result["passed"]
    assert "state keyCache" in result["detail"] and "input inputIds size ranges" in result["detail"]


@pytest.mark.parametrize("inter, bits, group, reason", [
    (48, 4, 16, "fell back to group 16"),  # blocks of 32 do not divide 48: 16 does
    (40, 8, None, "int8 per-channel instead"),  # no power-of-two block >= 16 divides 40
])
def test_group_fallback_is_reported_never_float(inter, bits, group, reason, tmp_path):
    model = tiny_model("llama", intermediate_size=inter)  # down_proj has `inter` in-features
    art = _export(model, tmp_path, 4)
    report = {e["name"]: e for e in json.loads((art.path / "quant_report.json").read_text())["weights"]}
    down = report["layers.0.down"]
    assert (down["bits"], down["group_size"]) == (bits, group) and reason in down["reason"]
    verdict = art.verify(reference=model, prompt_tokens=16, decode_steps=8, perplexity=False)
    assert all(c["passed"] for c in verdict.checks), verdict.format()


def test_palettized_asymmetric_and_fp32_compute(tmp_path):
    from slm_export.exporters.coreml.quant import load_program

    model = tiny_model("qwen2")
    pal = _export(model, tmp_path, 4, name="pal", palettize=True)
    assert pal.manifest["quant"]["label"] == "palette4-wo"
    _, prog = load_program(pal.path / "model.mlpackage")
    ops = [op.op_type for op in prog.functions["main"].operations]
    assert ops.count("constexpr_lut_to_dense") == 15
    report = pal.verify(reference=model, prompt_tokens=16, decode_steps=8, perplexity=False)
    assert report.passed, report.format()
    from slm_export.exporters.coreml.checks import check_weights

    wrong = check_weights(pal.path, pal.manifest, tiny_model("qwen2", seed=1))
    assert not wrong["passed"] and "not on their table's nearest entry" in wrong["detail"]

    asym = _export(model, tmp_path, 4, name="asym", symmetric=False)
    report = asym.verify(reference=model, prompt_tokens=16, decode_steps=8, perplexity=False)
    assert report.passed, report.format()

    fp32 = _export(model, tmp_path, 16, name="fp32", compute_precision="float32")
    assert fp32.manifest["io"]["functions"]["main"]["outputs"]["logits"]["dtype"] == "float32"
    report = fp32.verify(reference=model, prompt_tokens=16, decode_steps=8, perplexity=False)
    assert report.comparisons[0].max_abs_logit_diff < 0.02, report.format()  # only the float16 cache rounds
    assert report.passed, report.format()


def test_fp16_norm_does_not_overflow():
    """Hidden states in the thousands: a plain float16 RMSNorm overflows (x*x > 65504), ours does not."""
    import torch

    from slm_export.exporters.coreml.module import RMSNorm

    x = torch.randn(1, 3, 64) * 20
    x[..., 5] = 3000.0
    w = np.random.default_rng(0).normal(1, 0.1, 64).astype(np.float32)
    norm = RMSNorm(w, 1e-5)
    want = norm(x)
    got = norm.half()(x.half()).float()
    naive = (x.half() * torch.rsqrt((x.half() * x.half()).mean(-1, keepdim=True) + 1e-5)).float()
    assert not torch.isfinite(naive).all() or (naive - want / torch.from_numpy(w)).abs().max() > 0.1
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.02 * want.abs().max()


def test_linux_says_core_ml_needs_macos(llama_int4):
    _, art = llama_int4
    for args in (["bench", str(art.path), "--prompt-tokens", "16", "--decode-tokens", "8"], ["generate", str(art.path), "--prompt", "hi"]):
        p = subprocess.run([sys.executable, "-m", "slm_export.cli", *args], capture_output=True, text=True)
        assert p.returncode == 4, p.stderr
        assert "executing Core ML needs macOS 15 or later" in p.stderr and "verify" in p.stderr
        assert "Traceback" not in p.stderr
    with pytest.raises(RuntimeUnavailable, match="needs macOS"):
        art.runner()


def test_cli_export_and_verify_from_a_local_folder(tiny_dir, tmp_path):
    out = tmp_path / "cm"
    code, stdout, stderr = run_cli("--target", "coreml", "--bits", "4", "--model", str(tiny_dir), "--out", str(out),
                                   "--max-context", "128", "--activations", "int8")
    assert code == 0, stderr
    # int8 activations were asked for and Core ML cannot: said, and the label says weight-only
    assert "quantizes weights only; activations stay float16" in stdout + stderr
    assert json.loads((out / "manifest.json").read_text())["quant"]["label"].endswith("-wo")
    code, stdout, stderr = run_cli("verify", str(out), "--prompt-tokens", "24", "--decode-steps", "8")
    assert code == 0, stdout + stderr
    assert "not executed: executing Core ML needs macOS 15 or later" in stdout
    assert "check: package spec matches the manifest: PASS" in stdout
    assert "check: package weights are the quantizer's: PASS" in stdout
    assert "perplexity on" in stdout and "Running MIL" not in stderr  # no coremltools progress bars


def test_swift_program_and_bundle_readme_use_swift_transformers(llama_int4, tmp_path):
    from slm_export.exporters.coreml.handoff import SWIFT_TRANSFORMERS

    _, art = llama_int4
    swift = (art.path / "SlmExportExample.swift").read_text()
    for call in ("LanguageModel.loadCompiled(url: compiledModel", "AutoTokenizer.from(modelFolder: tokenizerFolder)",
                 "await model.resetState()", "model.generate(config: config, tokens: promptTokens)",
                 "config.doSample = false", "MLModel.compileModel(at:", "import Models", "@main"):
        assert call in swift, call
    assert f'swift-transformers", exact: "{SWIFT_TRANSFORMERS}")' in swift
    assert "`inputIds` (int32, 1...127 tokens)" in swift and "states `keyCache` and `valueCache`" in swift
    assert swift.count("{") == swift.count("}") and swift.count("(") == swift.count(")")
    out = art.bundle(out=tmp_path / "bundle")
    readme = (out / "README.md").read_text()
    assert "iOS 18 / macOS 15" in readme and "`inputIds` int32" in readme and "SlmExportExample.swift" in readme
    assert f"swift-transformers {SWIFT_TRANSFORMERS}" in readme and "LanguageModelWithStatefulKVCache" in readme
    assert "model.mlmodelc" in readme and "did not compile or run it" in readme
    assert "`tokenizer.json`, `tokenizer_config.json`" in readme
    assert (out / "SlmExportExample.swift").is_file()


def test_package_is_what_swift_transformers_loads(llama_int4):
    """The spec has what swift-transformers 1.3.3 (tag commit 2fa33e1f, Sources/Models/LanguageModel.swift)
    needs to run it as `LanguageModelWithStatefulKVCache`, read with coremltools as an app would see it:
    - states named `keyCache` and `valueCache` (Keys, lines 137-149; kvCacheAvailability, 269-277);
    - `inputIds` int32 whose last axis is a range with upper - lower > 1 (contextRange, 95-123; the
      stateful init, 499-503): the whole prompt goes in one call, then one token;
    - `causalMask` float16 accepting [1, 1, 1, tokens + 1] (predictNextTokenScores, 543-551), and no other
      input (a prediction gets only these two);
    - output `logits` of rank 3 (lines 554-558);
    - user-defined metadata `co.huggingface.exporters.name` (modelName, 227-238)."""
    import coremltools as ct

    from slm_export.exporters.coreml.quant import load_program

    _, art = llama_int4
    max_context = art.manifest["max_context"]
    spec = ct.models.MLModel(str(art.path / "model.mlpackage"), skip_model_load=True).get_spec()
    desc = spec.description
    arrays = ct.proto.FeatureTypes_pb2.ArrayFeatureType
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: states
    assert {s.name: s.type.stateType.arrayType.dataType for s in desc.state} == {
        "keyCache": arrays.FLOAT16, "valueCache": arrays.FLOAT16}
    inputs = {i.name: i.type.multiArrayType for i in desc.input}
    assert list(inputs) == ["inputIds", "causalMask"]
    ids, mask = inputs["inputIds"], inputs["causalMask"]
    assert ids.dataType == arrays.INT32 and mask.dataType == arrays.FLOAT16
    ids_ranges = [(r.lowerBound, r.upperBound) for r in ids.shapeRange.sizeRanges]
    assert ids_ranges == [(1, 1), (1, max_context - 1)]
    assert ids_ranges[-1][1] - ids_ranges[-1][0] > 1
    mask_ranges = [(r.lowerBound, r.upperBound) for r in mask.shapeRange.sizeRanges]
    # swift-transformers' mask [1, 1, 1, tokens + 1] fits for every prompt the query range takes
    assert mask_ranges[:3] == [(1, 1), (1, 1), (1, max_context - 1)] and mask_ranges[3] == (1, max_context)
    assert [o.name for o in desc.output] == ["logits"]
    _, prog = load_program(art.path / "model.mlpackage")
    logits = prog.functions["main"].outputs[0]
    assert logits.rank == 3 and logits.shape[-1] == art.manifest["model"]["vocab_size"]
    assert desc.metadata.userDefined["co.huggingface.exporters.name"] == "LlamaForCausalLM"


def test_swift_transformers_calls_generate_what_our_runner_does(llama_int4):
    """The calls swift-transformers makes (a zero mask one wider than the tokens so far, the whole prompt
    in one call, then the last token alone) give the same greedy tokens and logits as our runner, on the
    converted program with the package's weights (Core ML itself cannot run here). Its mask leaves
    cache slot 0 empty: without the model masking that slot the logits move by ~0.1 (measured)."""
    import torch

    from slm_export.exporters import TARGETS

    model, art = llama_int4
    runner = TARGETS.get("coreml")().stand_in_runner(model, art.path, art.manifest)
    prompt = list(np.random.default_rng(0).integers(3, 90, 20))
    runner.reset(runner.max_context)
    ours, tokens = [runner.forward(prompt)[-1]], list(prompt)
    for _ in range(24):
        tokens.append(int(ours[-1].argmax()))
        ours.append(runner.forward(tokens[-1:])[-1])

    runner.reset(runner.max_context)
    module, theirs, seq = runner.module, [], list(prompt)
    with torch.no_grad():
        for step in range(25):
            new = seq if step == 0 else seq[-1:]  # prefilling, then extending
            mask = torch.zeros(1, 1, 1, len(seq) + 1, dtype=torch.float16)  # LanguageModel.swift line 546
            theirs.append(module(torch.tensor([new], dtype=torch.int32), mask)[0, -1].float().numpy())
            seq.append(int(theirs[-1].argmax()))
    assert seq[:-1] == tokens
    assert np.abs(np.stack(ours) - np.stack(theirs)).max() < 0.01


def test_cli_inspect_shows_function_and_state(llama_int4):
    _, art = llama_int4
    p = subprocess.run([sys.executable, "-m", "slm_export.cli", "inspect", str(art.path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "function      main(inputIds, causalMask) -> logits; state keyCache, valueCache" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--target", "onnx", "--compute-precision", "float16"], "--compute-precision float16 is not available for the onnx target"),
    (["--target", "onnx", "--palettize"], "--palettize is a Core ML option"),
    (["--target", "executorch", "--palettize"], "--palettize is a Core ML option"),
    (["--target", "coreml", "--palettize", "--bits", "16"], "--palettize needs --bits 4 or 8"),
    (["--target", "coreml", "--compute-precision", "float64"], "invalid choice: 'float64'"),
])
def test_bad_options_are_one_sentence(args, message, tmp_path):
    p = subprocess.run([sys.executable, "-m", "slm_export.cli", *args, "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("missing", ["coremltools", "torchao"])
def test_missing_coremltools_is_one_sentence_before_loading(monkeypatch, tmp_path, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import it -> ImportError
    with pytest.raises(SlmExportError, match=rf"the coreml target needs coremltools and torchao \({missing} is missing\): "
                                             r"pip install coremltools==9.0 torchao==0.18.0"):
        slm_export.export(tiny_model("llama"), target="coreml", bits=4, out=tmp_path / "x", log=lambda *a: None)
    assert not (tmp_path / "x").exists()


def test_kmeans_1d_beats_a_uniform_grid_and_maps_to_nearest():
    from slm_export.exporters.coreml.quant import kmeans_1d

    w = np.random.default_rng(0).standard_normal((16, 576)).astype(np.float16)
    table, idx = kmeans_1d(w, 4)
    assert table.shape == (16,) and idx.shape == (w.size,) and idx.max() < 16
    deq = table[idx].astype(np.float32).reshape(w.shape)
    x = w.astype(np.float32)
    nearest = np.abs(x[..., None] - table.astype(np.float32)).min(-1)
    assert np.allclose(np.abs(x - deq), nearest, atol=1e-3)
    grid = np.linspace(x.min(), x.max(), 16)
    uniform = np.abs(x[..., None] - grid).min(-1)
    assert np.abs(x - deq).mean() < 0.8 * uniform.mean()


def test_kmeans_1d_keeps_a_groups_outlier_weights():
    # Small LMs carry a few large weights (outlier input channels) that a palette must keep: a table
    # started from quantiles alone lost them, and SmolLM2-135M's 4-bit palettes then scored perplexity
    # 456,851 instead of ~64 (fp32: 34). Here one input column of a 16-row group is 15 to 25 sigma.
    from slm_export.exporters.coreml.quant import kmeans_1d

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 576)).astype(np.float32)
    w[:, 7] = rng.uniform(15, 25, 16) * rng.choice([-1, 1], 16)
    w = w.astype(np.float16)
    table, idx = kmeans_1d(w, 4)
    deq = table[idx].astype(np.float32).reshape(w.shape)
    x = w.astype(np.float32)
    # measured: quantile start 3.4 (the 16 outliers share one entry per sign), this start 1.0
    outlier_err = np.abs(x[:, 7] - deq[:, 7])
    assert outlier_err.mean() < 0.1 * np.abs(x[:, 7]).mean(), outlier_err
    # the bulk pays a little for it (0.09 -> 0.12 sigma)
    bulk = np.delete(x, 7, axis=1)
    assert np.abs(bulk - np.delete(deq, 7, axis=1)).mean() < 0.15 * bulk.std()
