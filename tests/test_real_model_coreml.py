"""The real SmolLM2-135M-Instruct through the coreml target, as users type it: `--target coreml --bits 4`.
Linux cannot execute Core ML, so: package size, the Linux checks in `verify`, and the converted
program (the package's weights, float16) answering the reference question."""
import json

import pytest

from conftest import require_extra, run_cli

pytestmark = pytest.mark.slow
require_extra("coremltools", "coreml")


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "smol-coreml-int4"
    code, stdout, err = run_cli("--target", "coreml", "--bits", "4", "--out", out)
    assert code == 0, err
    return out


def test_int4_package_size_and_report(package_dir):
    manifest = json.loads((package_dir / "manifest.json").read_text())
    size = sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith("model.mlpackage/"))
    assert size <= 100e6, f"{size / 1e6:.1f} MB"
    summary = manifest["quant"]["summary"]
    # one tied embedding/lm_head table + 30 layers x 7 linears, none left float
    assert summary["kept_float"] == [] and summary["weights"] == 1 + 30 * 7
    assert manifest["io"]["functions"]["main"]["states"]["keyCache"]["shape"] == [30, 3, 2048, 64]


def test_verify_checks_the_package_on_linux(package_dir, tmp_path):
    code, stdout, err = run_cli("verify", package_dir, "--no-perplexity", "--json", tmp_path / "v.json")
    report = json.loads((tmp_path / "v.json").read_text())
    assert code == 0, stdout + err
    assert report["passed"] and [c["passed"] for c in report["checks"]] == [True, True]
    assert "needs macOS" in report["not_executed"]
    same = next(c for c in report["comparisons"] if c["reference"] == "same-quant")
    assert same["mean_kl"] < 0.001  # only float16 compute differs from the same weights in fp32


def test_converted_program_answers_paris(package_dir):
    from slm_export.artifact import Artifact
    from slm_export.exporters import TARGETS
    from slm_export.loading import load
    from slm_export.runtimes.base import generate

    art = Artifact.open(package_dir)
    runner = TARGETS.get("coreml")().stand_in_runner(load(None).model, art.path, art.manifest)
    codec = art.codec()
    out = generate(runner, codec.encode_chat("What is the capital of France?"), 24, codec.eos_ids)
    assert "Paris" in codec.decode(out)
