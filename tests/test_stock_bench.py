"""`slm-export bench --runtime`: the stock app runtimes (onnxruntime-genai for ONNX, ExecuTorch's TextLLMRunner
for a .pte) measured beside slm-export's runner, a row each; what they cannot run is refused in one line.
Tiny models, a few decode steps (the real SmolLM2 comparison is benchmarks/stock_runtimes.py)."""
import json
from types import SimpleNamespace

import pytest

import slm_export
from slm_export import SlmExportError
from slm_export.bench import OURS, _on_device, runtime_plan

from conftest import require_extra, run_cli, tiny_bpe_tokenizer, tiny_model

SHORT = dict(prompt_tokens=(8, 40), decode_tokens=6, warmup=2, repeats=2)


def _export(tmp_path_factory, target, **kw):
    out = tmp_path_factory.mktemp(target) / "art"
    # ASCII tokens: ExecuTorch's Python runner raises on a piece that is not whole UTF-8
    return slm_export.export(tiny_model("llama"), tokenizer=tiny_bpe_tokenizer(ascii_only=True), target=target,
                             out=out, max_context=96, log=lambda *a: None, **kw)


def _check_rows(rows, runtimes):
    """A row per prompt length and runtime, in that order, each with positive figures and its runtime named."""
    assert [(r.prompt_tokens, r.runtime) for r in rows] == [(p, rt) for p in SHORT["prompt_tokens"] for rt in runtimes]
    for r in rows:
        assert r.error is None, r.error
        assert r.ttft_ms > 0 and r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.peak_rss_mb > 0 and r.load_s >= 0
        assert r.decode_tokens == SHORT["decode_tokens"] and len(r.samples["decode_step_ms"]) == SHORT["decode_tokens"]
        assert len(r.samples["ttft_ms"]) == SHORT["repeats"]
        assert r.peak_rss_mb >= r.baseline_rss_mb
        assert all(v for k, v in r.versions.items() if k in ("onnxruntime", "onnxruntime-genai", "executorch"))


def test_onnx_rows_for_our_runner_and_onnxruntime_genai(tmp_path_factory):
    require_extra("onnxruntime_genai", "genai")
    art = _export(tmp_path_factory, "onnx", bits=4)
    _check_rows(art.bench(runtime="all", **SHORT), ["onnxruntime", "onnxruntime-genai"])
    _check_rows(art.bench(runtime="onnxruntime-genai", **SHORT), ["onnxruntime-genai"])
    # the table names the runtime of each row
    code, out, err = run_cli("bench", art.path, "--runtime", "stock", "--prompt-tokens", "8", "--decode-tokens", "3",
                             "--repeats", "1", "--warmup", "0")
    assert code == 0 and "runtime" in out.splitlines()[0] and "onnxruntime-genai" in out.splitlines()[1], err
    with pytest.raises(SlmExportError, match="executorch-llm-runner is not applicable to this export: it runs executorch"):
        runtime_plan(art.manifest, "executorch-llm-runner")


def test_pte_rows_for_our_runner_and_executorch_llm_runner(tmp_path_factory):
    require_extra("executorch", "executorch")
    art = _export(tmp_path_factory, "executorch", bits=4)
    assert art.manifest["target_extra"]["own_kernels"] == []
    rows = art.bench(runtime="all", **SHORT)
    _check_rows(rows, ["executorch", "executorch-llm-runner"])
    assert all(r.versions["torch"] for r in rows if r.runtime == "executorch-llm-runner")  # its binding links libtorch


def test_executorch_llm_runner_times_a_run_whose_pieces_are_not_whole_utf8(tmp_path_factory):
    """The runner's Python binding raises on a piece that is part of a UTF-8 character (a byte token, which a
    random-weight model emits): the run is timed from the runner's own Stats instead, each step the mean."""
    require_extra("executorch", "executorch")
    from slm_export.runtimes.et_llm import TextLLMRunnerStock
    from slm_export.text import passage_text

    out = tmp_path_factory.mktemp("bytes") / "art"
    art = slm_export.export(tiny_model("llama"), tokenizer=tiny_bpe_tokenizer(), target="executorch", bits=4, out=out,
                            max_context=96, log=lambda *a: None)
    runner = TextLLMRunnerStock(art.path, art.manifest, threads=1)
    real, calls = runner._generate, []

    def as_the_binding_does(prompt_text, config, per_token):
        calls.append(per_token)
        times, stats, t0 = real(prompt_text, config, per_token)
        if per_token:  # what the binding raises on a byte token, after a real per-token run
            raise UnicodeDecodeError("utf-8", b"\xae", 0, 1, "invalid start byte")
        return times, stats, t0

    runner._generate = as_the_binding_does
    text = passage_text()[:60]
    ids = art.codec().encode(text)
    run = runner.timed_generate(ids, 60, prompt_text=text)  # enough steps for the runner's millisecond clock
    assert calls == [True, False]
    assert run.ttft_ms >= 0 and len(run.step_ms) == 59 and len(set(run.step_ms)) == 1 and run.step_ms[0] > 0


def test_own_kernel_pte_is_refused_by_the_stock_runner_in_one_line(tmp_path_factory):
    require_extra("executorch", "executorch")
    art = _export(tmp_path_factory, "executorch", bits=16, kv_bits=16)
    assert art.manifest["target_extra"]["own_kernels"]  # the fp16 KV cache's slm:: ops
    short = ("--prompt-tokens", "8", "--decode-tokens", "3", "--repeats", "1", "--warmup", "0")
    code, out, err = run_cli("bench", art.path, "--runtime", "stock", *short)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert "executorch-llm-runner is not applicable" in err and "slm::sdpa" in err and "--kv-bits 32" in err
    # under `all`: our runner's rows, and that one line (no empty row for the stock runner)
    code, out, err = run_cli("bench", art.path, "--runtime", "all", *short, "--format", "json", "-q")
    assert code == 0, err
    assert [r["runtime"] for r in json.loads(out)["results"]] == ["executorch"]
    assert [line for line in err.splitlines() if "executorch-llm-runner" in line] == [
        next(line for line in err.splitlines() if line.startswith("bench: not measured: executorch-llm-runner is not applicable"))]


def test_runtime_choices_and_refusals():
    onnx = {"target": "onnx", "runtime": "onnxruntime", "app_runtimes": {"onnxruntime-genai": {"config": "genai_config.json"}}}
    assert runtime_plan(onnx, "ours") == [OURS]
    assert runtime_plan(onnx, "all") == runtime_plan(onnx, "ours,stock") == [OURS, "onnxruntime-genai"]
    code, out, err = run_cli("bench", "x", "--runtime", "fastest")
    assert code == 2 and "unknown runtime 'fastest'; choose one of: all, executorch-llm-runner, onnxruntime-genai, ours, stock" in err
    # an export made before genai_config.json: its reason, in one line
    old = {**onnx, "app_runtimes": {}}
    with pytest.raises(SlmExportError, match="onnxruntime-genai is not applicable to this export: the export has no"):
        runtime_plan(old, "stock")
    notes = []
    assert runtime_plan(old, "all", notes.append) == [OURS] and len(notes) == 1
    # no stock runtime for Core ML
    with pytest.raises(SlmExportError, match="no stock runtime opens coreml exports"):
        runtime_plan({"target": "coreml", "runtime": "coreml"}, "stock")
    # a device that runs slm-export's runtimes only (a board over SSH, an emulated ARM CPU)
    board = SimpleNamespace(name="ssh://pi@board")
    with pytest.raises(SlmExportError, match="measured on this machine only"):
        _on_device([OURS, "onnxruntime-genai"], "stock", board)
    assert _on_device([OURS, "onnxruntime-genai"], "all", board, notes.append) == [OURS]


def test_a_missing_stock_runtime_names_its_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))
    onnx = {"target": "onnx", "runtime": "onnxruntime", "app_runtimes": {"onnxruntime-genai": {"config": "genai_config.json"}}}
    with pytest.raises(SlmExportError, match=r"not installed: pip install \"slm-export\[genai\]\""):
        runtime_plan(onnx, "stock")
