"""Hand-off: bundle, inspect, the pytest helper and JUnit XML (hostile bundles: test_hostile_bundles.py)."""
import json
from xml.etree import ElementTree as ET

import pytest

import slm_export
from slm_export.testing import assert_parity

from conftest import run_cli, tiny_model, tiny_tokenizer


@pytest.fixture
def tiny_bundle(tmp_path):
    model = tiny_model("llama")
    art = slm_export.export(model, tokenizer=tiny_tokenizer(), bits=4, out=tmp_path / "art", max_context=96,
                            log=lambda *a: None)
    art.verify(reference=model, prompt_tokens=24, decode_steps=4, perplexity=False)
    art.bench(prompt_tokens=(8,), decode_tokens=4, warmup=1, repeats=1)
    code, out, err = run_cli("bundle", art.path, "--zip")
    assert code == 0, err
    return tmp_path / "art-bundle", model


def test_bundle_is_self_describing(tiny_bundle):
    folder, _ = tiny_bundle
    m = json.loads((folder / "manifest.json").read_text())
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "generation_config.json", "quant_report.json",
                 "README.md", "reports/parity.json", "reports/bench.json"):
        assert name in m["files"], name
    assert m["bundle"]["parity"]["passed"] is True and m["bundle"]["bench"]["results"][0]["decode_tok_s"] > 0
    assert m["bundle"]["bench"]["machine"]["cores"]
    readme = (folder / "README.md").read_text()
    for needle in ("past_key_values.{i}.key", "logits_to_keep", "OrtEnvironment", "InferenceSession", "max context | 96"):
        assert needle in readme, needle
    assert (folder.parent / "art-bundle.zip").is_file()


def test_inspect_folder_and_zip(tiny_bundle):
    folder, _ = tiny_bundle
    for target in (folder, folder.parent / "art-bundle.zip"):
        code, out, err = run_cli("inspect", target)
        assert code == 0, err
        assert "checksums     ok" in out and "last parity   PASS" in out and "decode" in out
    code, out, _ = run_cli("inspect", folder, "--format", "json")
    assert json.loads(out)["quant"] == "int4-g32-sym-a8-head8"


def test_python_snippet_in_readme_runs(tiny_bundle, tmp_path):
    """The app developer's Python snippet, as written in the bundle README, runs."""
    import re
    import subprocess
    import sys

    folder, _ = tiny_bundle
    code = re.search(r"## Python\n\n```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    code = code.replace("<your prompt, formatted with the chat template>", "w1 w2 w3")
    p = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


def test_tampered_and_missing_files_are_refused(tiny_bundle):
    folder, _ = tiny_bundle
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")
    code, out, err = run_cli("inspect", folder)
    assert code == 2 and not out and "tokenizer.json" in err and "truncated or changed" in err
    code, _, err = run_cli("verify", folder)
    assert code == 2 and "tokenizer.json" in err and "Traceback" not in err
    (folder / "model.onnx.data").unlink()
    code, _, err = run_cli("bench", folder)
    assert code == 2 and "is missing" in err


def test_assert_parity_passes_and_fails_when_it_should(tiny_bundle):
    folder, model = tiny_bundle
    report = assert_parity(folder.parent / "art", model, prompt_tokens=24, decode_steps=4)
    assert report.passed
    with pytest.raises(AssertionError, match="parity over tolerance"):
        assert_parity(folder.parent / "art", tiny_model("llama", seed=1), prompt_tokens=24, decode_steps=4)


def test_junit_xml_and_exit_codes(tmp_path, tiny_dir):
    out = tmp_path / "a"
    assert run_cli("--bits", "8", "--model", tiny_dir, "--out", out, "--max-context", "64")[0] == 0
    code, _, err = run_cli("verify", out, "--prompt-tokens", "24", "--decode-steps", "4", "--no-perplexity",
                           "--junit-xml", tmp_path / "ok.xml")
    assert code == 0, err
    suite = ET.parse(tmp_path / "ok.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "0"  # two references and the weight check
    tiny_model("llama", seed=3).save_pretrained(tiny_dir, safe_serialization=True)  # the source drifted
    code, _, _ = run_cli("verify", out, "--prompt-tokens", "24", "--decode-steps", "4", "--no-perplexity",
                         "--junit-xml", tmp_path / "bad.xml")
    assert code == 1
    suite = ET.parse(tmp_path / "bad.xml").getroot()
    assert int(suite.get("failures")) >= 1 and suite.find("testcase/failure") is not None
