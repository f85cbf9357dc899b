"""The onnxruntime runner, generation, bench results, and the CLI's happy paths on a tiny model."""
import json

import numpy as np
import pytest

import slm_export
from slm_export.results import SCHEMA_VERSION, BenchResult, format_json, format_markdown, format_table
from slm_export.runtimes.base import generate, pick_token

from conftest import run_cli, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-int4"
    return slm_export.export(tiny_model("llama"), tokenizer=tiny_tokenizer(), bits=4, out=out, max_context=96,
                             log=lambda *a: None)


def test_kv_cache_growth_and_chunking_match_one_shot(tmp_path):
    # fp32, so any difference would be the cache's fault (int8 activations round differently per shape)
    art = slm_export.export(tiny_model("llama"), bits=16, out=tmp_path / "f", max_context=96, log=lambda *a: None)
    ids = list(range(5, 45))
    r = art.runner()
    r.reset(64)
    one_shot = r.forward(ids, all_logits=True)
    r.reset(3)  # too small on purpose: the runner grows the cache and keeps what it holds
    stepped = np.concatenate([r.forward(ids[:7], all_logits=True)] + [r.forward([t]) for t in ids[7:]])
    assert r.capacity >= len(ids)
    np.testing.assert_allclose(stepped, one_shot, atol=1e-4)


def test_context_overflow_is_a_clear_error(tiny_art):
    r = tiny_art.runner()
    r.reset(8)
    with pytest.raises(slm_export.SlmExportError, match="exceed the artifact's max context of 96"):
        r.forward(list(range(97)))


def test_greedy_and_seeded_sampling(tiny_art):
    r = tiny_art.runner()
    a = generate(r, [1, 5, 9], 12)
    assert a == generate(r, [1, 5, 9], 12) and len(a) == 12
    s1 = generate(r, [1, 5, 9], 12, temperature=1.5, top_k=50, top_p=0.9, seed=7)
    assert s1 == generate(r, [1, 5, 9], 12, temperature=1.5, top_k=50, top_p=0.9, seed=7)
    assert generate(r, [1, 5, 9], 12, eos_ids={a[0]}) == []  # stops at EOS before emitting it


def test_streamed_text_adds_up_to_the_reply(tiny_art):
    pieces = []
    text = tiny_art.generate("w1 w2 w3", max_new_tokens=10, on_text=pieces.append)
    assert text and "".join(pieces) == text and len(pieces) > 1


def test_pick_token_filters():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    assert pick_token(logits, 0, 0, 1.0, rng) == 1
    assert {pick_token(logits, 1.0, 2, 1.0, rng) for _ in range(50)} <= {1, 2}
    assert {pick_token(logits, 1.0, 0, 0.3, rng) for _ in range(50)} == {1}


def test_bench_results_schema(tiny_art):
    rows = tiny_art.bench(prompt_tokens=(8, 24), decode_tokens=6, warmup=2, repeats=2)
    assert [r.prompt_tokens for r in rows] == [8, 24]
    for r in rows:
        assert r.error is None
        assert r.decode_tok_s > 0 and r.decode_tok_s_min <= r.decode_tok_s <= r.decode_tok_s_max
        assert r.ttft_ms > 0 and r.load_s > 0 and r.peak_rss_mb > r.baseline_rss_mb > 0
        assert len(r.samples["decode_step_ms"]) == 6 and len(r.samples["ttft_ms"]) == 2
        assert r.machine["cores"] and r.schema_version == SCHEMA_VERSION
    data = json.loads(format_json(rows))
    assert data["schema_version"] == SCHEMA_VERSION and len(data["results"]) == 2
    assert "decode tok/s" in format_table(rows) and format_markdown(rows).count("\n") == 3


def test_failed_run_is_a_row_with_its_error():
    row = BenchResult(system="x", model="m", error="runner exited with code 137: Killed")
    assert "FAILED: runner exited with code 137" in format_table([row])


def test_cli_export_generate_bench_verify(tmp_path, tiny_dir):
    out = tmp_path / "cli-int8"
    code, stdout, err = run_cli("--target", "onnx", "--bits", "8", "--group-size", "32", "--model", tiny_dir,
                                "--out", out, "--max-context", "128")
    assert code == 0, err
    assert "quantization:" in stdout and "next: slm-export verify" in stdout
    code, stdout, err = run_cli("generate", out, "--prompt", "w1 w2 w3", "--max-new-tokens", "5")
    assert code == 0, err and stdout.strip()
    code, stdout, err = run_cli("bench", out, "--prompt-tokens", "8", "--decode-tokens", "4", "--repeats", "1",
                                "--format", "markdown", "--json", tmp_path / "b.json")
    assert code == 0, err
    assert stdout.startswith("| system |")
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["decode_tok_s"] > 0
    code, stdout, err = run_cli("verify", out, "--prompt-tokens", "32", "--decode-steps", "8", "--no-perplexity",
                                "--json", tmp_path / "v.json")
    assert code == 0, stdout + err
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and {c["reference"] for c in report["comparisons"]} == {"same-quant", "fp32"}


def test_cli_verify_exits_1_when_the_reference_drifted(tmp_path, tiny_dir):
    out = tmp_path / "art"
    assert run_cli("--bits", "16", "--model", tiny_dir, "--out", out, "--max-context", "64")[0] == 0
    # the recorded source folder now holds a different model: parity must fail, exit 1
    tiny_model("llama", seed=1).save_pretrained(tiny_dir, safe_serialization=True)
    code, stdout, err = run_cli("verify", out, "--prompt-tokens", "24", "--decode-steps", "4", "--no-perplexity")
    assert code == 1, stdout + err
    assert "FAIL" in stdout and "failed: parity against fp32" in err


def test_python_api_object_with_tokenizer(tmp_path):
    art = slm_export.export(tiny_model("qwen2"), tokenizer=tiny_tokenizer(), bits=16, out=tmp_path / "q",
                            log=lambda *a: None)
    assert isinstance(art.generate("w1 w2", max_new_tokens=4), str)
    with pytest.raises(slm_export.SlmExportError, match="verify it from Python"):
        art.verify()
    assert slm_export.targets() == ["coreml", "executorch", "onnx"]
