"""The torch-free ExecuTorch runner (runtimes/native): our C++ kernels for llama::update_cache and
llama::custom_sdpa on the wheel's runtime, checked against PyTorch and against ExecuTorch's own
kernels in its Python bindings; where it runs (a child process) and what it refuses."""
import json

import numpy as np
import pytest

import slm_export
from slm_export import SlmExportError

from conftest import require_extra, tiny_model

require_extra("executorch", "executorch")


def _export(model, path, **kw):
    kw.setdefault("max_context", 256)
    return slm_export.export(model, target="executorch", bits=16, out=path, log=lambda *a: None, **kw)


@pytest.mark.parametrize("head_dim", [16, 64])  # 16: the generic loops; 64: the unrolled ones (SmolLM2's size)
def test_attention_matches_pytorch_across_key_chunks_and_row_blocks(head_dim, tmp_path):
    model = tiny_model("llama", head_dim=head_dim)
    art = _export(model, tmp_path / "pte")
    assert art.manifest["runtime"] == "executorch"
    # 203 prompt tokens: prefill chunks of 128 + 75 (75 = 18 blocks of 4 query rows + 3); the last
    # rows see 243 keys, two chunks of 128 merged; then one-token steps through the same merge.
    report = art.verify(reference=model, prompt_tokens=203, decode_steps=40, perplexity=False)
    fp32 = report.comparisons[0]
    assert report.executed_by == "executorch"
    assert fp32.max_abs_logit_diff < 1e-3 and fp32.greedy_match_tokens == 40, report.format()


def test_native_and_python_bindings_give_the_same_logits(tmp_path):
    from slm_export.runtimes.executorch import PybindExecuTorchRunner

    model = tiny_model("qwen2")
    art = _export(model, tmp_path / "pte")
    ids = np.random.default_rng(1).integers(0, 512, 150).tolist()
    native = art.runner()  # a child process: this one has ExecuTorch's Python packages loaded
    assert type(native).__name__ == "ChildRunner"
    ours = [native.forward(ids, all_logits=True)] + [native.forward([t]) for t in (3, 7, 11)]
    theirs_runner = PybindExecuTorchRunner(art.path, art.manifest)
    theirs = [theirs_runner.forward(ids, all_logits=True)] + [theirs_runner.forward([t]) for t in (3, 7, 11)]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_bench_process_holds_no_torch(tmp_path):
    art = _export(tiny_model("llama"), tmp_path / "pte", max_context=128)
    (row,) = art.bench(prompt_tokens=(16,), decode_tokens=8, warmup=2, repeats=1)
    assert row.error is None, row.error  # the measuring process fails if torch was imported
    assert row.runtime == "executorch" and row.decode_tok_s > 0 and "torch" not in row.versions
    # Python, numpy and the runtime's libraries; libtorch alone is ~220 MB
    assert row.baseline_rss_mb < 100, row.baseline_rss_mb


def test_in_process_load_beside_executorch_packages_is_refused_not_aborted(tmp_path):
    art = _export(tiny_model("llama"), tmp_path / "pte", max_context=128)  # exporting loads ExecuTorch's kernels
    with pytest.raises(SlmExportError, match="cannot load into a process that has loaded lib.*child process"):
        art.runner(in_process=True)


def test_missing_compiler_is_one_clear_sentence(monkeypatch, tmp_path):
    from slm_export.runtimes import native

    native.library_path.cache_clear()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("SLM_EXPORT_CACHE", str(tmp_path / "cache"))
    try:
        with pytest.raises(SlmExportError, match=r"needs a C\+\+ compiler: install one \(Debian/Ubuntu: apt install g\+\+\)"):
            native.library_path()
    finally:
        native.library_path.cache_clear()
    assert not (tmp_path / "cache").exists()


def test_int8_kv_cache_is_a_quarter_and_runs_in_the_python_bindings(tmp_path):
    model = tiny_model("llama")
    art = _export(model, tmp_path / "kv8", max_context=128, kv_bits=8)
    m = art.manifest
    assert m["runtime"] == "executorch-pybind" and m["target_extra"]["kv_bits"] == 8
    assert "llama::custom_quantized_sdpa" in m["target_extra"]["custom_ops"]
    # 2 (k, v) x 2 layers x 128 positions x 2 kv heads x (16 int8 + fp32 scale + int8 zero point)
    assert m["io"]["kv_layout"]["bytes"] == 2 * 2 * 128 * 2 * (16 + 5)
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=24, perplexity=False)
    fp32 = report.comparisons[0]
    assert report.executed_by == "executorch-pybind"
    assert fp32.mean_kl < 1e-3 and fp32.greedy_match_tokens >= 20, report.format()


def test_kv_bits_8_is_refused_where_the_target_has_no_int8_cache(tmp_path):
    with pytest.raises(SlmExportError, match="--kv-bits 8 is not available for the onnx target; use 32"):
        slm_export.export("not/loaded", target="onnx", kv_bits=8, out=tmp_path / "o", log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_kv_bits_reaches_the_manifest(tmp_path, tiny_dir):
    import subprocess
    import sys

    out = tmp_path / "kv8"
    r = subprocess.run([sys.executable, "-m", "slm_export.cli", "--model", str(tiny_dir), "--target", "executorch",
                        "--bits", "16", "--kv-bits", "8", "--max-context", "64", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["target_extra"]["kv_bits"] == 8
