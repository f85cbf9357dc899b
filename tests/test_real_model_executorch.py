"""The real SmolLM2-135M-Instruct through the executorch target: export (minutes on 2 cores), answer, parity."""
import json

import pytest

from conftest import assert_runner_tokens, require_extra, run_cli, run_cpp_example, text_llm_runner

pytestmark = pytest.mark.slow
require_extra("executorch", "executorch")


@pytest.fixture(scope="module")
def pte_dir(tmp_path_factory):
    # The command users type: int4 linears and (this target's default at --bits 4) int4 embedding rows
    out = tmp_path_factory.mktemp("real") / "smol-pte-int4"
    code, stdout, err = run_cli("--target", "executorch", "--bits", "4", "--out", out)
    assert code == 0, err
    return out


def test_pte_size_and_report(pte_dir):
    manifest = json.loads((pte_dir / "manifest.json").read_text())
    # The int4 default spends size on fidelity (int8 lm_head, mixed precision 0.25: 133.8 MB, against the plain
    # int4's 94.9 MB; docs/quantization.md "Defaults"): issue #3's 100 MB bound holds for
    # --lm-head-bits 4 --mixed-precision 0, not for the default since issue #30.
    assert manifest["files"]["model.pte"]["bytes"] <= 140e6
    assert manifest["quant"]["spec"]["embedding_bits"] == 4
    summary = manifest["quant"]["summary"]
    # embedding + lm_head + 30 layers x 7 linears (q, k, v, o, gate, up, down), none left float
    assert summary["kept_float"] == [] and summary["weights"] == 2 + 30 * 7


def test_pte_answers_paris(pte_dir):
    code, stdout, err = run_cli("generate", pte_dir, "--prompt", "What is the capital of France?",
                                "--max-new-tokens", "24")
    assert code == 0, err
    assert "Paris" in stdout


def test_executorch_llm_runner_answers_paris_with_generates_tokens(pte_dir, tmp_path):
    # Issue #31: ExecuTorch's own LLM runner (TextLLMRunner, the C++ behind Android's LlmModule and the iOS
    # runner), given only the .pte and tokenizer.json, answers greedily with exactly `slm-export generate`'s tokens.
    import re
    import subprocess
    import sys

    import slm_export
    from slm_export.runtimes.base import generate
    from slm_export.text import format_chat

    question = "What is the capital of France?"
    code, stdout, err = run_cli("generate", pte_dir, "--prompt", question, "--max-new-tokens", "24")
    assert code == 0, err
    art = slm_export.open_artifact(pte_dir)
    codec = art.codec()
    ours = generate(art.runner(), codec.encode_chat(question), 24, eos_ids=codec.eos_ids)  # what `generate` runs
    assert stdout.strip() == codec.decode(ours).strip() and "Paris" in stdout
    prompt = format_chat(codec.chat_template, question, codec.bos_token, codec.eos_token)  # encode_chat's text
    got = text_llm_runner(pte_dir, tmp_path / "only", prompt, 24)
    assert "Paris" in "".join(got["pieces"]), got["pieces"]
    assert_runner_tokens(got, pte_dir / "tokenizer.json", ours, codec.eos_ids, 24)
    # the bundle README's Python program (ExecuTorch's TextLLMRunner), as written
    code, _, err = run_cli("bundle", pte_dir, "--out", tmp_path / "b")
    assert code == 0, err
    program = re.search(r"## Python[^\n]*\n\n```python\n(.*?)```", (tmp_path / "b" / "README.md").read_text(), re.S).group(1)
    assert "TextLLMRunner(" in program
    p = subprocess.run([sys.executable, "-c", program], cwd=tmp_path / "b", capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "answer: " + codec.decode(ours).strip() in p.stdout, p.stdout


def test_bundled_cpp_example_answers_paris(pte_dir, tmp_path):
    # The app developer's C++ (ExecuTorch's Module API with our kernels), built and run as its README says.
    code, _, err = run_cli("bundle", pte_dir, "--out", tmp_path / "b")
    assert code == 0, err
    assert "Paris" in run_cpp_example(tmp_path / "b")


def test_pte_parity_within_tolerance(pte_dir, tmp_path):
    code, stdout, err = run_cli("verify", pte_dir, "--json", tmp_path / "v.json")
    report = json.loads((tmp_path / "v.json").read_text())
    assert code == 0, stdout + err
    assert report["passed"]
    ppl = report["perplexity"]
    assert ppl["tokens"] == 2048 and ppl["pytorch_fp32"] < ppl["artifact"] < 1.5 * ppl["pytorch_fp32"]


def test_fp16_pte_answers_paris_and_keeps_fp32_quality(tmp_path):
    # SmolLM2-135M's residual stream reaches 2.4e4 from layer 12 on: squared, that overflows fp16,
    # so this fails without the rescaled norm (tiny random models never get there).
    out = tmp_path / "smol-pte-fp16"
    code, _, err = run_cli("--target", "executorch", "--bits", "16", "--compute-precision", "float16", "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_extra"]["compute_precision"] == "float16"
    assert manifest["files"]["model.pte"]["bytes"] < 0.55 * 4 * manifest["model"]["parameters"]  # fp16, not fp32
    code, answer, err = run_cli("generate", out, "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert code == 0, answer + err
    code, stdout, err = run_cli("verify", out, "--json", tmp_path / "v.json")
    report = json.loads((tmp_path / "v.json").read_text())
    if ("Paris" not in answer or not report["passed"]) and _cpu_computes_fp16():
        # XNNPACK runs fp16 natively on AVX512-FP16 CPUs: on the Xeon VM of 2026-12-05 the greedy answer
        # drifted ("L'Etoile, la Marseillaise, ...") and verify's fp32 KL was 0.00275 against its 0.001
        # bound (AVX2 + F16C CPUs pass both). An open problem, in docs/limits.md.
        pytest.xfail(f"fp16 .pte on an AVX512-FP16 CPU: answered {answer.strip()[:60]!r}, verify passed={report['passed']}")
    assert code == 0 and report["passed"], stdout + err
    ppl = report["perplexity"]
    assert abs(ppl["artifact"] - ppl["pytorch_fp32"]) < 0.01 * ppl["pytorch_fp32"]
    assert "Paris" in answer, answer


def _cpu_computes_fp16() -> bool:
    from slm_export.devices.probe import describe
    return "avx512_fp16" in describe().get("simd", [])


def test_int8_weight_only_pte_answers_paris_and_computes_its_pytorch_program(tmp_path):
    # fp32 activations x int8 per-channel weights inside XNNPACK (exporters/executorch/weight_only.py)
    out = tmp_path / "smol-pte-int8-wo"
    code, _, err = run_cli("--target", "executorch", "--bits", "8", "--weight-only", "--out", out)
    assert code == 0, err
    code, answer, err = run_cli("generate", out, "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert code == 0, answer + err
    code, stdout, err = run_cli("verify", out, "--json", tmp_path / "v.json")
    report = json.loads((tmp_path / "v.json").read_text())
    if ("Paris" not in answer or not report["passed"]) and _cpu_computes_fp16():
        # XNNPACK runs fp16 natively on AVX512-FP16 CPUs: on the Xeon VM of 2026-12-05 the greedy answer
        # drifted ("L'Etoile, la Marseillaise, ...") and verify's fp32 KL was 0.00275 against its 0.001
        # bound (AVX2 + F16C CPUs pass both). An open problem, in docs/limits.md.
        pytest.xfail(f"fp16 .pte on an AVX512-FP16 CPU: answered {answer.strip()[:60]!r}, verify passed={report['passed']}")
    assert code == 0 and report["passed"], stdout + err
    ppl = report["perplexity"]
    assert abs(ppl["artifact"] - ppl["pytorch_fp32"]) < 0.01 * ppl["pytorch_fp32"]
    assert "Paris" in answer, answer


def _cpu_computes_fp16() -> bool:
    from slm_export.devices.probe import describe
    return "avx512_fp16" in describe().get("simd", [])
    same_quant = next(c for c in report["comparisons"] if c["reference"] == "same-quant")
    assert same_quant["max_abs_logit_diff"] < 0.01 and same_quant["greedy_match_tokens"] == same_quant["decode_steps"]
    ppl = report["perplexity"]
    assert ppl["pytorch_fp32"] < ppl["artifact"] < 1.02 * ppl["pytorch_fp32"]  # 28.35 against 28.09 here
