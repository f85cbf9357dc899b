"""A bundle an app developer can trust: SHA256SUMS checks with `sha256sum -c`, a missing or changed file is refused
by inspect and verify (one line naming it, exit 2, nothing written), and nothing in it names the build machine
(its paths, host name, home folder). Hostile zips: test_hostile_bundles.py."""
import json
import os
import platform
import shutil
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest

import slm_export
from slm_export import manifest as mf
from slm_export.sources import text_sha256

from conftest import require_extra, run_cli, tiny_model, tiny_tokenizer

FAKE_HOST = "build-host-7f3a9c"  # the host name every in-process machine description reads here
CALIBRATION = " ".join(f"w{i % 500}" for i in range(300))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama folder and calibration file under a tmp folder, exported to ONNX (GPTQ, calibrated on that
    file), verified, benched and bundled (folder and zip) in this process, under FAKE_HOST."""
    root = tmp_path_factory.mktemp("build")
    src = root / "models" / "tiny-llama"
    tiny_model("llama").save_pretrained(src, safe_serialization=True)
    tiny_tokenizer().save_pretrained(src)
    (root / "mycal.txt").write_text(CALIBRATION)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(platform, "node", lambda: FAKE_HOST)
        mp.setattr(socket, "gethostname", lambda: FAKE_HOST)
        art = slm_export.export(str(src), bits=4, out=root / "art", max_context=64,
                                calibration_text=root / "mycal.txt", log=lambda *a: None)
        art.verify(prompt_tokens=16, decode_steps=2, perplexity=False)
        art.bench(prompt_tokens=(8,), decode_tokens=2, warmup=0, repeats=1)
        art.bundle(out=root / "art-bundle", make_zip=True)
    return root


def _sums(folder: Path) -> dict:
    lines = (folder / mf.SUMS).read_text().splitlines()
    return {line[66:]: line[:64] for line in lines}


def _all_files(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("which", ["art", "art-bundle"])
def test_sha256sums_covers_every_file_and_sha256sum_accepts_it(exported, which):
    folder = exported / which
    sums = _sums(folder)
    later = {"reports/parity.json", "reports/bench.json"} if which == "art" else set()  # verify and bench, after export
    assert set(sums) == _all_files(folder) - {mf.SUMS} - later and later <= _all_files(folder)
    assert sums == {n: mf.sha256(folder / n) for n in sums}
    m = json.loads((folder / mf.MANIFEST).read_text())
    assert {n: meta["sha256"] for n, meta in m["files"].items()} == {n: h for n, h in sums.items() if n != mf.MANIFEST}
    if shutil.which("sha256sum"):
        p = subprocess.run(["sha256sum", "-c", "--strict", mf.SUMS], cwd=folder, capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.count(": OK") == len(sums), p.stdout + p.stderr


def test_bundle_readme_says_how_to_check_it(exported):
    readme = (exported / "art-bundle" / "README.md").read_text()
    assert "sha256sum -c SHA256SUMS" in readme and "shasum -a 256 -c SHA256SUMS" in readme


def test_nothing_in_the_bundle_names_the_build_machine(exported):
    """No file of the bundle (or of the zip) holds the build folder's path, the host name or the home folder."""
    bundle = exported / "art-bundle"
    with zipfile.ZipFile(exported / "art-bundle.zip") as z:
        zipped = {name: z.read(name) for name in z.namelist()}
    assert len(zipped) == len(_all_files(bundle))
    needles = [str(exported), str(exported.resolve()), FAKE_HOST, os.path.expanduser("~")]
    for name, data in [*((n, (bundle / n).read_bytes()) for n in _all_files(bundle)), *zipped.items()]:
        for needle in needles:
            assert needle.encode() not in data, (name, needle)
        if not name.endswith((".data", ".onnx", ".pte")):  # the real host name may be a few letters: text only
            assert f'"{socket.gethostname()}"'.encode() not in data, name
    m = json.loads((bundle / mf.MANIFEST).read_text())
    assert m["source"]["name"] == "tiny-llama" and len(m["source"]["sha256"]) == 64 and "path" not in m["source"]
    assert m["quant"]["calibration"]["file"] == "mycal.txt"
    assert m["quant"]["calibration"]["sha256"] == text_sha256(CALIBRATION)
    assert m["versions"]["torch"] and m["versions"]["onnxruntime"]


def test_bundling_a_folder_exported_with_paths_leaves_them_out(exported, tmp_path):
    """A folder exported (and verified) before slm-export left paths and host names out is bundled without them."""
    old = tmp_path / "old"
    shutil.copytree(exported / "art", old)
    m = json.loads((old / mf.MANIFEST).read_text())
    m["source"] = {"kind": "dir", "path": str(exported / "models" / "tiny-llama")}
    m["quant"]["calibration"]["file"] = str(exported / "mycal.txt")
    parity = json.loads((old / "reports" / "parity.json").read_text())
    (old / "reports" / "parity.json").write_text(json.dumps(dict(parity, artifact=str(old), machine={
        **parity["machine"], "hostname": FAKE_HOST})))
    mf.write(old, {k: v for k, v in m.items() if k != "files"})
    slm_export.open_artifact(old).bundle(out=tmp_path / "b")
    for name in _all_files(tmp_path / "b"):
        data = (tmp_path / "b" / name).read_bytes()
        assert str(exported).encode() not in data and str(tmp_path).encode() not in data, name
        assert FAKE_HOST.encode() not in data, name
    m = json.loads((tmp_path / "b" / mf.MANIFEST).read_text())
    assert m["source"]["name"] == "tiny-llama" and m["quant"]["calibration"]["file"] == "mycal.txt"


def test_kept_reports_leave_out_host_names_and_ssh_addresses(tmp_path):
    from slm_export.bundle import BENCH_FILE, PARITY_FILE, save_report

    ssh = {"name": "ssh://pi@board.lan:2222", "address": "pi@board.lan:2222", "hostname": "board", "cpu": "Cortex-A76"}
    save_report(tmp_path, BENCH_FILE, {"results": [{"device": ssh["name"], "machine": ssh, "decode_tok_s": 9.0}]})
    save_report(tmp_path, PARITY_FILE, {"artifact": str(tmp_path / "art"), "machine": {"hostname": FAKE_HOST, "cores": 2}})
    bench, parity = (json.loads((tmp_path / n).read_text()) for n in (BENCH_FILE, PARITY_FILE))
    assert bench["results"] == [{"device": "ssh", "machine": {"name": "ssh", "cpu": "Cortex-A76"}, "decode_tok_s": 9.0}]
    assert parity["artifact"] == "art" and parity["machine"] == {"cores": 2}


def test_verify_elsewhere_needs_the_model_and_calibration_file_named_by_flag(exported, tmp_path):
    """On a machine that did not export it (a fresh cache), verify asks for the source and calibration text by
    name, exit 2 before loading anything; given them (checked by sha256), it runs."""
    bundle, env = exported / "art-bundle", {"SLM_EXPORT_CACHE": str(tmp_path / "elsewhere")}
    short = ["--prompt-tokens", "16", "--decode-steps", "2", "--no-perplexity"]
    code, _, err = run_cli("verify", bundle, *short, env=env)
    assert code == 2 and err.count("\n") == 1 and "tiny-llama" in err and "--model PATH" in err, err
    model = ["--model", exported / "models" / "tiny-llama"]
    code, _, err = run_cli("verify", bundle, *short, *model, env=env)
    assert code == 2 and err.count("\n") == 1 and "mycal.txt" in err and "--calibration-text" in err, err
    (tmp_path / "mycal.txt").write_text(CALIBRATION + " w1")
    code, _, err = run_cli("verify", bundle, *short, *model, "--calibration-text", tmp_path / "mycal.txt", env=env)
    assert code == 2 and err.count("\n") == 1 and "sha256" in err and "mycal.txt" in err, err
    before = mf.sha256(bundle / "reports" / "parity.json")
    code, out, err = run_cli("verify", bundle, *short, *model, "--calibration-text", exported / "mycal.txt", env=env)
    assert code == 0, out + err
    assert mf.sha256(bundle / "reports" / "parity.json") == before  # a bundle keeps the results it was made with


@pytest.fixture
def bundle_copy(exported, tmp_path):
    shutil.copytree(exported / "art-bundle", tmp_path / "b")
    return tmp_path / "b"


def _refused(folder: Path, tmp_path: Path, *needles):
    """inspect (asked to write --json) and verify refuse `folder`: exit 2, one line holding every needle, nothing written."""
    before = _all_files(tmp_path)
    for args in (["inspect", folder, "--json", tmp_path / "i.json"], ["verify", folder, "--no-perplexity"]):
        code, out, err = run_cli(*args)
        assert code == 2 and err.startswith("slm-export: error: ") and err.count("\n") == 1, (args, out, err)
        for needle in needles:
            assert needle in err, (args, needle, err)
    assert _all_files(tmp_path) == before


def test_changed_file_is_refused(bundle_copy, tmp_path):
    data = bytearray((bundle_copy / "model.onnx.data").read_bytes())
    data[10] ^= 1  # same size: only its sha256 tells
    (bundle_copy / "model.onnx.data").write_bytes(bytes(data))
    _refused(bundle_copy, tmp_path, "model.onnx.data", "does not match its sha256", "download it again")


def test_missing_file_is_refused(bundle_copy, tmp_path):
    (bundle_copy / "tokenizer.json").unlink()
    _refused(bundle_copy, tmp_path, "tokenizer.json", "is missing", "download it again")


def test_changed_manifest_is_refused(bundle_copy, tmp_path):
    m = json.loads((bundle_copy / mf.MANIFEST).read_text())
    m["max_context"] = 32  # still a valid manifest: only SHA256SUMS tells
    (bundle_copy / mf.MANIFEST).write_text(json.dumps(m, indent=1))
    _refused(bundle_copy, tmp_path, "manifest.json does not match its sha256 in", "SHA256SUMS")


@pytest.mark.parametrize("edit", ["other sha256", "dropped line", "extra line", "not a sum"])
def test_sha256sums_that_disagrees_with_the_manifest_is_refused(bundle_copy, tmp_path, edit):
    sums = bundle_copy / mf.SUMS
    lines = sums.read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if line.endswith("  tokenizer.json"))
    if edit == "other sha256":
        lines[i] = "0" * 64 + "  tokenizer.json"
    elif edit == "dropped line":
        del lines[i]
    elif edit == "extra line":
        lines.append("0" * 64 + "  run.sh")
    else:
        lines[i] = "tokenizer.json"
    sums.write_text("".join(f"{line}\n" for line in lines))
    _refused(bundle_copy, tmp_path, "SHA256SUMS", "download it again")


def test_zip_with_a_changed_file_is_refused_and_leaves_nothing(exported, tmp_path):
    cache = tmp_path / "cache"
    bad = tmp_path / "art-bundle.zip"
    with zipfile.ZipFile(exported / "art-bundle.zip") as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data.replace(b"w1", b"w9", 1) if info.filename.endswith("/tokenizer.json") else data)
    for args in (["inspect", bad], ["verify", bad, "--no-perplexity"]):
        code, out, err = run_cli(*args, env={"SLM_EXPORT_CACHE": str(cache)})
        assert code == 2 and err.count("\n") == 1 and "tokenizer.json" in err and "sha256" in err, (args, err)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_executorch_bundle_checks_with_sha256sum_and_a_changed_program_is_refused(tmp_path):
    """The same for a .pte bundle (with its cpp/ example folder)."""
    require_extra("executorch", "executorch")  # fails instead under CI's SLM_EXPORT_REQUIRE_SDKS
    art = slm_export.export(tiny_model("llama"), target="executorch", tokenizer=tiny_tokenizer(), bits=8,
                            quant_method="rtn", out=tmp_path / "pte", max_context=64, log=lambda *a: None)
    bundle = art.bundle(out=tmp_path / "pte-bundle")
    sums = _sums(bundle)
    assert set(sums) == _all_files(bundle) - {mf.SUMS} and any(n.startswith("cpp/") for n in sums)
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "--quiet", mf.SUMS], cwd=bundle).returncode == 0
    data = bytearray((bundle / "model.pte").read_bytes())
    data[-1] ^= 1
    (bundle / "model.pte").write_bytes(bytes(data))
    code, out, err = run_cli("inspect", bundle, "--json", tmp_path / "i.json")
    assert code == 2 and not out and err.count("\n") == 1 and "model.pte" in err and "sha256" in err, err
    assert not (tmp_path / "i.json").exists()
