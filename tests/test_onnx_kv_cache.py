"""ONNX `--kv-bits 8`: GroupQueryAttention's int8 KV cache with calibrated per-channel scales."""
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

import slm_export
from slm_export import SlmExportError
from slm_export.exporters.onnx.kv_cache import MARGIN

from conftest import ARCHS, run_cli, tiny_model, tiny_tokenizer


def _export(model, out, bits=4, **kw):
    return slm_export.export(model, target="onnx", bits=bits, out=out, max_context=128, log=lambda *a: None, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [16, 4])
def test_int8_cache_matches_pytorch_within_its_allowance(arch, bits, tmp_path):
    model = tiny_model(arch)
    art = _export(model, tmp_path / "kv8", bits, kv_bits=8)
    m = art.manifest
    assert m["target_extra"]["kv_bits"] == 8 and m["io"]["kv_layout"]["dtype"] == "int8"
    assert m["io"]["inputs"]["past_key_values.{i}.key|value"]["dtype"] == "int8"
    graph = onnx.load(str(art.path / "model.onnx"), load_external_data=False).graph
    kv_types = {v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)
                if v.name.startswith(("past_key_values.", "present."))}
    assert kv_types == {onnx.TensorProto.INT8}
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    for i, node in enumerate(attention):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
        assert list(node.input[12:14]) == [f"layers.{i}.attn.k_scale", f"layers.{i}.attn.v_scale"]
    # 40 prompt tokens + 24 steps: past phi3/gemma2's 24-token sliding windows, where the cache wraps
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=24, perplexity=False)
    assert report.passed, report.format()
    fp32 = next(c for c in report.comparisons if c.reference == "fp32")
    if bits == 16:  # only the cache is rounded: close to fp32, not exact
        # (greedy runs may part where a random model's top two logits nearly tie)
        assert 0 < fp32.max_abs_logit_diff and fp32.mean_kl < 1e-3 and fp32.top1_agreement >= 0.9, report.format()


def test_scales_are_the_calibration_texts_range_per_channel(tmp_path):
    """Each scale is max |cached value| * MARGIN / 127 over the calibration prefill, per (kv head, channel)."""
    from slm_export.exporters import ExportOptions

    model = tiny_model("qwen2")
    fp32 = _export(model, tmp_path / "fp32")
    kv8 = _export(model, tmp_path / "kv8", kv_bits=8)
    assert "random token ids" in kv8.manifest["target_extra"]["kv_cache"]["calibration"]  # no tokenizer here
    ids, _ = ExportOptions(max_context=128).calibration(128, model.config.vocab_size)
    runner = fp32.runner(in_process=True)
    runner.reset(len(ids))
    runner.forward(ids)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(kv8.path / "model.onnx")).graph.initializer}
    for i in range(model.config.num_hidden_layers):
        for j, kind in enumerate(("k", "v")):
            cached = runner.cache[2 * i + j][:, :, :len(ids)]
            want = np.abs(cached).max(axis=2, keepdims=True) * MARGIN / 127
            np.testing.assert_allclose(inits[f"layers.{i}.attn.{kind}_scale"], want, rtol=1e-5)


def test_runner_holds_int8_buffers_a_quarter_of_fp32(tmp_path):
    model = tiny_model("llama")
    fp32, kv8 = _export(model, tmp_path / "fp32"), _export(model, tmp_path / "kv8", kv_bits=8)
    sizes = []
    for art in (fp32, kv8):
        runner = art.runner(in_process=True)
        runner.reset(100)
        runner.forward(list(range(3, 40)))
        runner.forward([5])
        sizes.append(sum(c.nbytes for c in runner.cache))
        assert runner.cache[0].dtype == (np.int8 if art is kv8 else np.float32)
    assert sizes[1] * 4 == sizes[0]
    assert kv8.bench(prompt_tokens=(16,), decode_tokens=4, warmup=1, repeats=1)[0].decode_tok_s > 0


def test_cli_kv8_calibrates_on_the_passage_and_its_bundle_snippet_runs(tmp_path, tiny_dir):
    out = tmp_path / "kv8"
    code, _, err = run_cli("--model", tiny_dir, "--bits", "4", "--kv-bits", "8", "--max-context", "96", "--out", out)
    assert code == 0, err
    art = slm_export.open_artifact(out)
    extra = art.manifest["target_extra"]
    assert extra["kv_cache"]["calibration"].startswith("96 tokens of the shipped calibration passage")
    code, _, err = run_cli("bundle", out)
    assert code == 0, err
    readme = (tmp_path / "kv8-bundle" / "README.md").read_text()
    assert "OnnxJavaType.INT8" in readme and "k_scale" in readme
    snippet = re.search(r"## Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "np.int8" in snippet
    p = subprocess.run([sys.executable, "-c", snippet.replace("<your prompt, formatted with the chat template>", "w1 w2")],
                       cwd=tmp_path / "kv8-bundle", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr


def test_a_runtime_without_the_int8_cache_is_one_clear_sentence(tmp_path, monkeypatch):
    import onnxruntime

    art = _export(tiny_model("llama"), tmp_path / "kv8", kv_bits=8)

    def old_runtime(*a, **k):
        raise onnxruntime.capi.onnxruntime_pybind11_state.Fail("Unrecognized attribute: k_quant_type for operator GroupQueryAttention")

    monkeypatch.setattr(onnxruntime, "InferenceSession", old_runtime)
    with pytest.raises(SlmExportError, match=r"cannot load .*int8 KV cache.*upgrade onnxruntime, or re-export with --kv-bits 32"):
        art.runner(in_process=True)


def test_kv_bits_16_is_refused_on_onnx_before_loading(tmp_path):
    with pytest.raises(SlmExportError, match="--kv-bits 16 is not available for the onnx target; use 32 or 8"):
        slm_export.export("not/loaded", target="onnx", kv_bits=16, out=tmp_path / "o", log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_calibration_on_your_own_text(tmp_path, tiny_dir):
    text = tmp_path / "domain.txt"
    text.write_text(" ".join(f"w{i % 40 + 3}" for i in range(300)))
    out = tmp_path / "kv8"
    code, _, err = run_cli("--model", tiny_dir, "--kv-bits", "8", "--max-context", "96", "--calibration-text", text,
                           "--out", out)
    assert code == 0, err
    manifest = slm_export.open_artifact(out).manifest
    assert manifest["target_extra"]["kv_cache"]["calibration"] == "96 tokens of domain.txt (--calibration-text)"


@pytest.mark.parametrize("args,message", [
    (["--kv-bits", "32", "--quant-method", "mse", "--mixed-precision", "0"],
     "--calibration-text is for exports that calibrate: --quant-method awq or gptq"),
    (["--kv-bits", "8", "--target", "executorch", "--quant-method", "rtn", "--mixed-precision", "0"],
     "this executorch export (rtn, --kv-bits 8) calibrates nothing"),
    (["--kv-bits", "8", "--calibration-text-missing"], "is not a file; pass a UTF-8 text file"),
    (["--kv-bits", "8", "--calibration-text-short"], "is 3 tokens; calibration needs at least 32"),
    (["--kv-bits", "8", "--calibration-text-empty"], "is empty; pass at least 32 tokens"),
    (["--kv-bits", "8", "--calibration-text-latin1"], "could not be read as UTF-8 text"),
])
def test_calibration_text_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path, tiny_dir):
    text = tmp_path / "t.txt"
    if "--calibration-text-short" in args:
        text.write_text("w3 w4 w5")
    elif "--calibration-text-empty" in args:
        text.write_text(" \n")
    elif "--calibration-text-latin1" in args:
        text.write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    elif "--calibration-text-missing" not in args:
        text.write_text("w3 " * 100)
    args = [a for a in args if not a.startswith("--calibration-text-")]
    out = tmp_path / "out"
    code, _, err = run_cli("--model", tiny_dir, *args, "--calibration-text", text, "--out", out)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "tiny-llama"] == (["t.txt"] if text.exists() else [])


def test_file_level_refusals_come_before_the_model_loads(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("")
    with pytest.raises(SlmExportError, match="is empty"):
        slm_export.export("not/loaded", kv_bits=8, calibration_text=text, out=tmp_path / "o", log=lambda *a: None)


def test_exports_that_calibrate_nothing_do_not_tokenize_text(tmp_path, tiny_dir, monkeypatch):
    from slm_export import pipeline

    def refuse(*a, **k):
        raise AssertionError("tokenized calibration text for an export that calibrates nothing")
    monkeypatch.setattr(pipeline, "_calibration_ids", refuse)
    data_free = dict(quant_method="mse", mixed_precision=0)  # the default (GPTQ, mixed precision) calibrates
    art = slm_export.export(tiny_dir, target="onnx", kv_bits=32, max_context=64, out=tmp_path / "kv32",
                            log=lambda *a: None, **data_free)
    assert "kv_cache" not in art.manifest["target_extra"] and art.manifest["quant"]["calibration"] is None
    for kw in (dict(kv_bits=8, **data_free), dict(kv_bits=32)):
        with pytest.raises(AssertionError, match="tokenized calibration text"):
            slm_export.export(tiny_dir, target="onnx", max_context=64, out=tmp_path / "kv8", log=lambda *a: None, **kw)
