"""ONNX exports open in onnxruntime-genai as they are: genai_config.json, the same greedy tokens as our
runner, the bundle README's program, and refusals when genai's files are missing or changed. Tiny models
(about 30 s); the real SmolLM2-135M check is in test_real_model.py."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import slm_export
from slm_export.runtimes.base import generate

from conftest import ARCHS, require_extra, run_cli, tiny_bpe_tokenizer, tiny_model

require_extra("onnxruntime_genai", "test")
import onnxruntime_genai as og  # noqa: E402

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tiny_genai(tmp_path_factory):
    """A tiny Llama exported to ONNX int4 with a byte-level BPE tokenizer genai can read, and its source."""
    model = tiny_model("llama")
    out = tmp_path_factory.mktemp("genai") / "art"
    slm_export.export(model, tokenizer=tiny_bpe_tokenizer(), bits=4, out=out, max_context=96, log=lambda *a: None)
    return out, model


def og_greedy(folder, ids: list[int], max_new: int) -> tuple[list[int], np.ndarray]:
    """(the tokens onnxruntime-genai generates greedily from `ids`, the logits it read for the first one)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new)  # greedy: the folder's default
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    first = np.array(gen.get_logits(), np.float32).reshape(-1)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out, first


def test_genai_config_describes_the_export(tiny_genai):
    folder, _ = tiny_genai
    manifest = json.loads((folder / "manifest.json").read_text())
    cfg = json.loads((folder / "genai_config.json").read_text())
    m, dec = cfg["model"], cfg["model"]["decoder"]
    assert m["type"] == "decoder" and m["context_length"] == 96 and m["vocab_size"] == manifest["model"]["vocab_size"]
    assert m["eos_token_id"] == manifest["tokenizer"]["eos_token_ids"] and m["bos_token_id"] == manifest["tokenizer"]["bos_token_id"]
    assert dec["filename"] == "model.onnx" and dec["num_hidden_layers"] == 2 and dec["num_key_value_heads"] == 2
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key" and dec["outputs"]["logits"] == "logits"
    assert cfg["search"]["do_sample"] is False and cfg["search"]["max_length"] == 96
    assert cfg["search"]["past_present_share_buffer"] is True
    app = manifest["app_runtimes"]["onnxruntime-genai"]
    assert app["config"] == "genai_config.json" and app["tested_with"] == f"onnxruntime-genai {og.__version__}"
    for name in app["files"]:  # everything genai reads has a checksum
        assert name in manifest["files"], name
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(app["files"])
    # genai's tokenizer reads the folder's and applies the chat template as our codec does
    codec = slm_export.open_artifact(folder).codec()
    tok = og.Tokenizer(og.Model(str(folder)))
    prompt = tok.apply_chat_template(json.dumps([{"role": "user", "content": QUESTION}]), add_generation_prompt=True)
    assert list(tok.encode(prompt)) == codec.encode_chat(QUESTION)
    code, out, err = run_cli("inspect", folder)
    assert code == 0 and "also runs in  onnxruntime-genai" in out, err


def test_genai_generates_our_runners_greedy_tokens(tiny_genai):
    folder, _ = tiny_genai
    art = slm_export.open_artifact(folder)
    codec = art.codec()
    prompts = [codec.encode_chat(QUESTION), np.random.default_rng(1).integers(3, 512, 40).tolist()]
    for ids in prompts:
        got, first = og_greedy(folder, ids, 24)
        runner = art.runner(in_process=True)
        runner.reset(len(ids) + 24)
        ours_first = runner.forward(ids)[-1]
        np.testing.assert_allclose(first, ours_first, atol=1e-4, rtol=1e-4)  # the same graph, the same kernels
        ours = generate(art.runner(), ids, 24, eos_ids=codec.eos_ids)
        assert got[:len(ours)] == ours and len(set(ours)) > 1, (got, ours)
        if len(ours) < 24:  # our runner stopped at an end token; genai stops there too
            assert got[len(ours)] in codec.eos_ids


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])  # llama: the test above
def test_every_architecture_runs_in_genai(arch, tmp_path):
    """The generic "decoder" type: biases, fused Phi-3 weights, Gemma-2's soft-caps and sliding windows are all in
    the graph; genai gives our runner's greedy tokens past the window (24) too."""
    out = tmp_path / arch
    slm_export.export(tiny_model(arch), tokenizer=tiny_bpe_tokenizer(), bits=4, out=out, max_context=96,
                      log=lambda *a: None)
    art = slm_export.open_artifact(out)
    ids = np.random.default_rng(2).integers(3, 512, 40).tolist()
    got, _ = og_greedy(out, ids, 24)
    ours = generate(art.runner(), ids, 24, eos_ids=art.codec().eos_ids)
    assert got[:len(ours)] == ours and ours, (got, ours)


def test_readme_genai_program_runs_as_written(tiny_genai, tmp_path):
    """The bundle README's onnxruntime-genai Python program, as written, prints what `slm-export generate` does."""
    folder, _ = tiny_genai
    bundle = tmp_path / "b"
    code, _, err = run_cli("bundle", folder, "--out", bundle)
    assert code == 0, err
    readme = (bundle / "README.md").read_text()
    assert "| onnxruntime-genai | `genai_config.json`" in readme
    program = re.search(r"### Python \(tested\)\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "import onnxruntime_genai as og" in program and f"onnxruntime-genai=={og.__version__}" in program
    p = subprocess.run([sys.executable, "-c", program], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    code, ours, err = run_cli("generate", bundle, "--prompt", QUESTION)
    assert code == 0, err
    # the random model also emits byte tokens that are no UTF-8: our decoder prints U+FFFD for them, genai's
    # stream decoder nothing (the token-for-token check is test_genai_generates_our_runners_greedy_tokens)
    assert p.stdout.strip() == ours.replace("\ufffd", "").strip() and p.stdout.strip()
    section = readme[readme.index("## onnxruntime-genai"):]
    for lang, package in (("kotlin", "import ai.onnxruntime.genai."), ("csharp", "using Microsoft.ML.OnnxRuntimeGenAI;")):
        block = re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)  # whole programs, not compiled here
        assert package in block and ("fun main(" in block or "Console.WriteLine" in block)
    assert section.count("0.16.0-dev") >= 2  # the API version they were written against


def test_int8_kv_cache_runs_in_genai(tmp_path):
    """--kv-bits 8: genai takes the int8 dtype from the graph; same greedy tokens as our runner."""
    out = tmp_path / "kv8"
    slm_export.export(tiny_model("llama"), tokenizer=tiny_bpe_tokenizer(), bits=4, kv_bits=8, out=out,
                      max_context=96, log=lambda *a: None)
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    art = slm_export.open_artifact(out)
    ids = art.codec().encode_chat(QUESTION)
    got, _ = og_greedy(out, ids, 16)
    ours = generate(art.runner(), ids, 16, eos_ids=art.codec().eos_ids)
    assert got[:len(ours)] == ours and ours


def test_missing_or_changed_genai_config_is_refused(tiny_genai, tmp_path):
    folder, _ = tiny_genai
    code, _, err = run_cli("bundle", folder, "--out", tmp_path / "b")
    assert code == 0, err
    bundle = tmp_path / "b"
    config = bundle / "genai_config.json"
    original = config.read_text()
    config.write_text(original.replace('"max_length": 96', '"max_length": 95'))  # same size
    code, out, err = run_cli("inspect", bundle)
    assert code == 2 and "genai_config.json does not match its sha256" in err, out + err
    code, _, err = run_cli("verify", bundle, "--no-perplexity")
    assert code == 2 and "genai_config.json" in err and "Traceback" not in err
    config.unlink()
    code, out, err = run_cli("inspect", bundle)
    assert code == 2 and "genai_config.json listed in the manifest is missing" in err, out + err
    code, _, err = run_cli("verify", bundle, "--no-perplexity")
    assert code == 2 and "genai_config.json" in err and "Traceback" not in err
    # a manifest that still says genai reads it but no longer lists it (edited by hand) is refused too
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["genai_config.json"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    for command in ("inspect", "verify"):
        code, _, err = run_cli(command, bundle)
        assert code == 2 and "onnxruntime-genai reads genai_config.json" in err and "Traceback" not in err, err


def test_generation_config_carries_sampling_defaults(tmp_path):
    """generation_config.json states every sampling setting: the model's own where it suggests them, else greedy
    defaults; genai's search stays greedy (what generate and verify run), and the manifest records both."""
    model = tiny_model("llama")
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.8)
    out = tmp_path / "s"
    slm_export.export(model, tokenizer=tiny_bpe_tokenizer(), bits=8, out=out, max_context=64, log=lambda *a: None)
    saved = json.loads((out / "generation_config.json").read_text())
    assert {k: saved[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")} == \
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.0}
    assert saved["eos_token_id"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["from_model"] == ["do_sample", "temperature", "top_p"]
    search = json.loads((out / "genai_config.json").read_text())["search"]
    assert search["do_sample"] is False and search["repetition_penalty"] == 1.0
    plain = tmp_path / "p"  # a model that suggests nothing: greedy, stated
    slm_export.export(tiny_model("llama"), tokenizer=tiny_bpe_tokenizer(), bits=8, out=plain, max_context=64,
                      log=lambda *a: None)
    assert json.loads((plain / "generation_config.json").read_text())["do_sample"] is False
