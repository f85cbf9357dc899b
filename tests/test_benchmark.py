"""The benchmark harness (benchmarks/run.py) end to end on a tiny model, and its measuring protocol.

The peers' own venvs (llama.cpp, onnxruntime-genai, optimum) take many minutes to build, so they are
exercised by the benchmark run itself; here the harness runs slm-export's ONNX target and PyTorch
eager, the reference every system's quality is scored against.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks" / "peers")]

import common  # noqa: E402
import protocol  # noqa: E402


class CountingSession(protocol.Session):
    """Greedy next token = last token + 1; logits record how many tokens the cache holds."""

    def __init__(self, vocab: int = 50):
        self.vocab, self.cache = vocab, []

    def reset(self):
        self.cache = []

    def feed(self, ids):
        self.cache += list(ids)
        out = np.zeros(self.vocab, dtype=np.float32)
        out[(self.cache[-1] + 1) % self.vocab] = 1.0
        return out


def test_protocol_times_every_step_after_warmup_and_resets_between_prompts():
    s = CountingSession()
    rows = protocol.measure(s, [[1, 2, 3], list(range(10))], decode_tokens=5, warmup=2, repeats=3)
    assert [r["prompt_tokens"] for r in rows] == [3, 10]
    for r in rows:
        assert len(r["samples"]["decode_step_ms"]) == 5 and len(r["samples"]["ttft_ms"]) == 3
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
    # after the last prompt: reset, the 10 prompt ids, then 2 + 5 greedy steps (9 -> 10 -> ... -> 16)
    assert s.cache == list(range(10)) + list(range(10, 17))


def test_teacher_forced_logits_are_one_row_per_position(tmp_path):
    s = CountingSession()
    s.feed([7])  # a stale cache must be emptied first
    protocol.teacher_forced(s, [4, 9, 2], str(tmp_path / "l.npy"))
    got = np.load(tmp_path / "l.npy")
    assert got.shape == (3, 50) and got.argmax(-1).tolist() == [5, 10, 3] and s.cache == [4, 9, 2]


def test_run_measured_reports_the_commands_own_peak_and_its_error_line():
    got = common.run_measured([sys.executable, "-c", "x = bytearray(150 * 2**20); x[::4096] = b'1' * len(x[::4096])"])
    assert 150 < got["peak_rss_mb"] < 400 and got["wall_s"] > 0
    small = common.run_measured([sys.executable, "-c", "pass"])
    assert small["peak_rss_mb"] < 100  # a fresh wrapper each time: the earlier 150 MB does not carry over
    with pytest.raises(common.PeerError, match="ValueError: no such variant"):
        common.run_measured([sys.executable, "-c", "raise ValueError('no such variant')"])


def test_harness_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--models", str(tiny_dir), "--targets", "onnx",
           "--bits", "16,4", "--peers", "pytorch", "--rounds", "2", "--decode-tokens", "4", "--prompt-tokens", "8,16",
           "--quality-tokens", "16", "--out", str(out), "--work", str(work), "--no-plots"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    rows = {(r["system"], r["prompt_tokens"]): r for r in data["results"]}
    assert {s for s, _ in rows} == {"slm-export onnx float", "slm-export onnx int4-g32-sym-a8-head8", "PyTorch eager fp32",
                                    "slm-export onnx int4-g32-sym-a8-head8 kv8"}  # --onnx-kv8 4 by default
    for (system, prompt), r in rows.items():
        assert r["error"] is None and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0 and r["model"] == "tiny-llama"
        assert len(r["samples"]["rounds_decode_tok_s"]) == 2  # both rounds kept beside the median
        if system.startswith("slm-export"):
            assert r["export_s"] > 0 and r["export_peak_rss_mb"] > 100  # the export command loads torch
    # quality against PyTorch fp32: float ONNX is the same function, int4 is measurably not
    fp32 = rows[("slm-export onnx float", 8)]
    int4 = rows[("slm-export onnx int4-g32-sym-a8-head8", 8)]
    assert fp32["mean_kl"] < 1e-6 and fp32["top1_agreement"] == 1.0
    assert int4["mean_kl"] > fp32["mean_kl"] and int4["mean_kl"] < 0.5
    assert rows[("slm-export onnx int4-g32-sym-a8-head8 kv8", 8)]["mean_kl"] > fp32["mean_kl"]
    assert rows[("PyTorch eager fp32", 8)]["mean_kl"] is None  # the reference is not scored against itself
    md = (out / "RESULTS.md").read_text()
    assert "| tiny-llama | slm-export onnx int4-g32-sym-a8-head8 |" in md and "## Against the goals" in md
    assert "onnx vs onnxruntime-genai (-): not measured" in md  # a peer that was not run is said, not hidden


def test_a_peer_that_cannot_export_is_a_row_with_its_reason(tiny_dir, tmp_path):
    # ExecuTorch refuses --group-size < 32 ... here: a target that does not exist must not stop the sitting
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--models", str(tiny_dir), "--targets", "nosuch",
           "--bits", "4", "--peers", "", "--rounds", "1", "--decode-tokens", "2", "--prompt-tokens", "4",
           "--out", str(out), "--work", str(tmp_path / "work"), "--no-plots"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads((out / "results.json").read_text())["results"]
    assert row["system"] == "slm-export nosuch 4-bit" and "nosuch" in row["error"]
    assert "FAILED" in (out / "RESULTS.md").read_text()


def test_app_memory_builds_the_exports_cpp_example_and_measures_it(tmp_path):
    import slm_export
    from conftest import require_extra, tiny_model, tiny_tokenizer

    require_extra("executorch", "executorch")  # fails instead under SLM_EXPORT_REQUIRE_SDKS=1 (CI)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import app_memory

    src, folder = tmp_path / "tiny", tmp_path / "pte"
    tiny_model("llama", max_position_embeddings=1024).save_pretrained(src)  # room for 512 + 128 tokens
    tiny_tokenizer().save_pretrained(src)
    slm_export.export(src, target="executorch", max_context=1024, out=folder, log=lambda *a: None)
    # a passage of 512 tokens exists in the tiny word-level vocabulary only as <unk>s: fine for memory
    result = app_memory.main([str(folder), "--runs", "1", "--out", str(tmp_path / "out")])
    rows = result["rows"]
    assert [(r["program"].split()[0], r["prompt_tokens"], r["new_tokens"]) for r in rows] == [
        (p, n, k) for p in ("cpp/generate.cpp", "Module") for n, k in app_memory.CASES]
    assert all(r["error"] is None and r["peak_rss_mb"] > 5 for r in rows), rows  # the runtime's libraries alone
    assert all(r["ratio_to_pte"] == round(r["samples_peak_rss_bytes"][0] / r["pte_bytes"], 3) for r in rows)
    assert json.loads((tmp_path / "out" / "app_memory.json").read_text())["rows"] == rows
    assert "| 512 + 128 |" in (tmp_path / "out" / "APP_MEMORY.md").read_text()
    with pytest.raises(RuntimeError, match="update module_defaults"):
        app_memory.module_defaults("int main() {}")


def test_goal_ratios_also_show_each_rounds_paired_ratio():
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
    import report
    from slm_export.results import BenchResult

    def row(system, runtime, rounds):
        r = BenchResult(system=system, model="m", runtime=runtime, prompt_tokens=32, decode_tok_s=sorted(rounds)[len(rounds) // 2])
        r.samples["rounds_decode_tok_s"] = rounds
        return r
    ours = row("slm-export onnx int4-g32-sym-a8", "onnxruntime", [130.0, 150.0, 120.0])
    llama = row("llama.cpp Q4_0", "llama.cpp", [100.0, 100.0, 120.0])
    text = "\n".join(report.goals([ours, llama], [32]))
    # the median ratio decides (130 / 100); each round's ratio is the same pair measured minutes apart
    assert "130.0 / 100.0 = **1.30x** (met, goal >= 1.3x); per round 1.30, 1.50, 1.00" in text
    assert report.per_round(row("a", "x", [1.0]), row("b", "y", [1.0])) == ""  # one round: no spread to show
