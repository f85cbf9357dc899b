"""Hostile bundles: paths out of the folder (in the zip or in its manifest), unlisted entries, zip bombs.

Each hostile input must exit 2 with one line naming it, write nothing outside the output folder and
leave nothing in the cache. The zips are built here, small: a synthetic manifest that `inspect` and
`bundle` accept as is, then one hostile change.
"""
import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest

from slm_export import archive
from slm_export.bundle import open_path

from conftest import run_cli

FILES = {"model.onnx": b"graph" * 40, "model.onnx.data": bytes(range(256)) * 4, "tokenizer.json": b"{}",
         "quant_report.json": b'{"weights": []}', "README.md": b"# tiny\n"}
ZEROS = 50 << 20  # a zip-bomb entry: 50 MB of zeros, about 50 KB deflated


def _table(files: dict) -> dict:
    return {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}


def _manifest(files: dict, **changes) -> dict:
    """A manifest as an ONNX export writes it, enough for `inspect` and `bundle` to accept."""
    m = {"target": "onnx", "runtime": "onnxruntime", "architecture": "llama", "source": {"name": "tiny"},
         "model_file": "model.onnx", "target_extra": {"data_file": "model.onnx.data"},
         "quant": {"label": "int4-g32", "report": "quant_report.json",
                   "summary": {"stored_mb": 0.01, "weights": 1, "kept_float": []}},
         "tokenizer": {"present": True, "file": "tokenizer.json", "eos_token_ids": [2]},
         "model": {"vocab_size": 8}, "versions": {}, "max_context": 64, "files": _table(files),
         "io": {"inputs": ["input_ids"], "outputs": ["logits"],
                "kv_layout": {"layers": 1, "kv_heads": 1, "head_dim": 4, "dtype": "float32"}}}
    m.update(changes)
    return m


def _zip(path: Path, files: dict = FILES, manifest: dict | None = None, top: str = "bundle", extra=()) -> Path:
    """A bundle zip like `bundle --zip` writes (one top folder, manifest.json), plus `extra` (name, bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{top}/manifest.json", json.dumps(manifest or _manifest(files)))
        for name, data in [*((f"{top}/{n}", d) for n, d in files.items()), *extra]:
            z.writestr(name, data)
    return path


def _zip_with_zeros(path: Path, entry: str, manifest: dict) -> Path:
    """A bundle zip whose `entry` holds ZEROS bytes of zeros, streamed (never 50 MB in memory)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bundle/manifest.json", json.dumps(manifest))
        for n, d in FILES.items():
            z.writestr(f"bundle/{n}", d)
        with z.open(entry, "w") as f:
            for _ in range(ZEROS >> 20):
                f.write(bytes(1 << 20))
    return path


def _forge_size(path: Path, entry: str, size: int) -> None:
    """Make the zip's headers claim `entry` unpacks to `size` bytes (its data unchanged)."""
    data = bytearray(path.read_bytes())
    name = entry.encode()
    for sig, name_at, size_at in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):  # local, central header
        pos = data.index(sig)
        while data[pos + name_at:pos + name_at + len(name)] != name:
            pos = data.index(sig, pos + 4)
        data[pos + size_at:pos + size_at + 4] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _files_under(root: Path) -> set:
    return {p for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """This test's own slm-export cache (SLM_EXPORT_CACHE), for the CLI and in-process calls."""
    c = tmp_path / "cache"
    monkeypatch.setenv("SLM_EXPORT_CACHE", str(c))
    return c


def _refused(args, tmp_path, cache, *needles, before=None):
    """Run the CLI; it must exit 2 with one line holding every needle, writing nothing anywhere."""
    before = _files_under(tmp_path) if before is None else before
    t = time.perf_counter()
    code, out, err = run_cli(*args, env={"SLM_EXPORT_CACHE": str(cache)})
    assert time.perf_counter() - t < 10
    assert code == 2, (out, err)
    assert err.startswith("slm-export: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    assert _files_under(tmp_path) == before, _files_under(tmp_path) - before
    assert not list(cache.glob("unzipped/.*")), "partial extraction left behind"
    return err


def test_a_good_zip_opens_in_the_configured_cache_with_only_its_listed_files(tmp_path, cache):
    z = _zip(tmp_path / "good.zip")
    code, out, err = run_cli("inspect", z, env={"SLM_EXPORT_CACHE": str(cache)})
    assert code == 0 and "checksums     ok" in out, err
    (extraction,) = (cache / "unzipped").iterdir()
    assert {p.relative_to(extraction / "bundle").as_posix() for p in _files_under(extraction)} == {*FILES, "manifest.json"}
    victim = tmp_path / "victim"
    victim.mkdir()
    code, out, err = run_cli("bundle", z, "--out", victim / "handoff", env={"SLM_EXPORT_CACHE": str(cache)})
    assert code == 0, err
    assert (victim / "handoff" / "model.onnx").read_bytes() == FILES["model.onnx"]


@pytest.mark.parametrize("top", ["bundle", ".config"])
@pytest.mark.parametrize("listed", ["../{top}/NAME.txt", "../../NAME.txt", "/tmp/NAME.txt", "C:NAME.txt",
                                    "..\\NAME.txt", "sub/./NAME.txt"])
def test_manifest_naming_a_file_outside_the_bundle_is_refused(tmp_path, cache, top, listed):
    """Issue #34.1: the zip's entries are plain, but its manifest lists a path out of the folder."""
    listed = listed.format(top=top)
    files = dict(FILES, **{listed: b"gotcha"})
    z = _zip(tmp_path / "evil.zip", FILES, _manifest(files), top=top, extra=[(f"{top}/NAME.txt", b"gotcha")])
    victim = tmp_path / "victim"
    victim.mkdir()
    _refused(["bundle", z, "--out", victim / "handoff"], tmp_path, cache, z, repr(listed), "outside its folder")
    _refused(["inspect", z], tmp_path, cache, z, repr(listed))
    assert not list(Path("/tmp").glob("NAME.txt"))


@pytest.mark.parametrize("key", ["model_file", "tokenizer", "target_extra"])
def test_manifest_pointing_the_model_or_tokenizer_outside_is_refused(tmp_path, cache, key):
    value = {"model_file": "../model.onnx", "tokenizer": {"present": True, "file": "/etc/passwd"},
             "target_extra": {"data_file": "../../secret.data"}}[key]
    z = _zip(tmp_path / "evil.zip", FILES, _manifest(FILES, **{key: value}))
    _refused(["inspect", z], tmp_path, cache, z, "outside its folder")


def test_hostile_folder_manifest_and_links_out_are_refused(tmp_path, cache):
    folder = tmp_path / "art"
    folder.mkdir()
    for n, d in FILES.items():
        (folder / n).write_bytes(d)
    (tmp_path / "secret.txt").write_bytes(b"gotcha")
    (folder / "manifest.json").write_text(json.dumps(_manifest(dict(FILES, **{"../secret.txt": b"gotcha"}))))
    _refused(["inspect", folder], tmp_path, cache, folder, "'../secret.txt'")
    # a listed file that is a link out of the folder
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    (folder / "manifest.json").write_text(json.dumps(_manifest(dict(FILES, **{"link.txt": b"gotcha"}))))
    (tmp_path / "victim").mkdir()
    _refused(["bundle", folder, "--out", tmp_path / "victim" / "handoff"], tmp_path, cache, folder, "'link.txt'",
             "symbolic link")


@pytest.mark.parametrize("entry", ["bundle/../../evil.txt", "/tmp/evil-abs.txt", "bundle/..\\evil.txt",
                                   "C:/evil.txt", "bundle/sub//evil.txt"])
def test_zip_entry_escaping_its_folder_is_refused(tmp_path, cache, entry):
    z = _zip(tmp_path / "bad.zip", extra=[(entry, b"gotcha")])
    _refused(["inspect", z], tmp_path, cache, z, repr(entry), "outside its folder")
    assert not Path("/tmp/evil-abs.txt").exists()


def test_zip_with_a_symbolic_link_is_refused(tmp_path, cache):
    z = _zip(tmp_path / "link.zip")
    with zipfile.ZipFile(z, "a") as f:
        info = zipfile.ZipInfo("bundle/model.onnx.link")
        info.external_attr = 0o120777 << 16
        f.writestr(info, "/etc/passwd")
    _refused(["inspect", z], tmp_path, cache, z, "symbolic link 'bundle/model.onnx.link'")


@pytest.mark.parametrize("extra", [("bundle/run.sh", b"#!/bin/sh\nrm -rf ~\n"), ("README.txt", b"hi")])
def test_unlisted_entry_is_refused(tmp_path, cache, extra):
    """Issue #34.2: an entry the manifest does not list (a script; a file beside the bundle folder)."""
    z = _zip(tmp_path / "extra.zip", extra=[extra])
    needle = "does not list" if extra[0].startswith("bundle/") else "one bundle folder"
    _refused(["inspect", z], tmp_path, cache, z, needle)


def test_unlisted_zip_bomb_is_refused_without_unpacking(tmp_path, cache):
    """Issue #34.2: 50 MB of zeros the manifest does not list: refused, nothing unpacked."""
    z = _zip_with_zeros(tmp_path / "bomb.zip", "bundle/zeros.bin", _manifest(FILES))
    assert z.stat().st_size < 1 << 20
    _refused(["inspect", z], tmp_path, cache, z, "'bundle/zeros.bin'", "does not list")


def test_listed_zip_bomb_is_refused(tmp_path, cache):
    """50 MB of zeros listed with its true size and sha256: over RATIO times the zip, refused before unpacking."""
    zeros = {"bytes": ZEROS, "sha256": hashlib.sha256(bytes(ZEROS)).hexdigest()}
    m = _manifest(FILES)
    m["files"]["zeros.bin"] = zeros
    z = _zip_with_zeros(tmp_path / "bomb.zip", "bundle/zeros.bin", m)
    _refused(["inspect", z], tmp_path, cache, z, "zip bomb")


def test_entry_larger_than_listed_is_refused(tmp_path, cache):
    """50 MB of zeros listed as 100 bytes: refused from the zip's header, or (header forged) after 100 bytes."""
    small = bytes(100)
    m = _manifest(FILES)
    m["files"]["zeros.bin"] = _table({"zeros.bin": small})["zeros.bin"]
    z = _zip_with_zeros(tmp_path / "bomb.zip", "bundle/zeros.bin", m)
    before = _files_under(tmp_path)
    _refused(["inspect", z], tmp_path, cache, z, "'bundle/zeros.bin' of 52428800 bytes", before=before)
    _forge_size(z, "bundle/zeros.bin", len(small))
    with zipfile.ZipFile(z) as f:
        assert f.getinfo("bundle/zeros.bin").file_size == len(small)
    _refused(["inspect", z], tmp_path, cache, z, "'bundle/zeros.bin'", before=_files_under(tmp_path))


def test_copy_stops_reading_past_the_listed_size():
    """The cap holds against an endless stream: reading stops at limit + 1 bytes."""
    class Endless(io.RawIOBase):
        def __init__(self):
            self.served = 0

        def read(self, n=-1):
            self.served += n
            return bytes(n)

    src, out = Endless(), io.BytesIO()
    with pytest.raises(archive.TooLarge):
        archive.copy_capped(src, out, 5 << 20)
    assert src.served <= (5 << 20) + archive.CHUNK and out.tell() <= 5 << 20


@pytest.mark.parametrize("change", ["tampered", "missing"])
def test_changed_or_missing_file_in_zip_is_refused(tmp_path, cache, change):
    files = dict(FILES)
    if change == "tampered":
        files["tokenizer.json"] = b"[]"  # same size, other bytes
    else:
        del files["tokenizer.json"]
    z = _zip(tmp_path / "changed.zip", files, _manifest(FILES))
    _refused(["inspect", z], tmp_path, cache, z, "tokenizer.json")


def _sums(manifest: dict) -> bytes:
    """The SHA256SUMS `bundle` writes beside `manifest` (as _zip serializes it)."""
    from slm_export.manifest import sums_text

    return sums_text(manifest, hashlib.sha256(json.dumps(manifest).encode()).hexdigest()).encode()


def test_zip_with_its_sha256sums_opens_with_it(tmp_path, cache):
    m = _manifest(FILES)
    folder = open_path(_zip(tmp_path / "good.zip", FILES, m, extra=[("bundle/SHA256SUMS", _sums(m))]))
    assert (folder / "SHA256SUMS").read_bytes() == _sums(m)
    assert run_cli("inspect", folder)[1].count("matches manifest.json and SHA256SUMS") == 1


@pytest.mark.parametrize("edit", ["other sha256", "unlisted file", "file left out", "manifest changed", "not sums"])
def test_zip_whose_sha256sums_disagrees_with_its_manifest_is_refused(tmp_path, cache, edit):
    m = _manifest(FILES)
    lines = _sums(m).decode().splitlines()
    if edit == "other sha256":
        lines = ["0" * 64 + line[64:] if line.endswith("  model.onnx") else line for line in lines]
    elif edit == "unlisted file":
        lines.append("0" * 64 + "  run.sh")
    elif edit == "file left out":
        lines = [line for line in lines if not line.endswith("  tokenizer.json")]
    elif edit == "manifest changed":  # SHA256SUMS of the manifest as bundled, then the manifest edited
        m = _manifest(FILES, max_context=32)
    else:
        lines = ["this is not a checksum"]
    sums = "".join(f"{line}\n" for line in lines).encode()
    z = _zip(tmp_path / "sums.zip", FILES, m, extra=[("bundle/SHA256SUMS", sums)])
    _refused(["inspect", z], tmp_path, cache, z, "SHA256SUMS")


def test_cache_keeps_the_last_extractions(tmp_path, cache):
    folders = []
    for i in range(archive.KEEP + 2):
        files = dict(FILES, **{"README.md": f"# bundle {i}\n".encode()})
        folders.append(open_path(_zip(tmp_path / f"b{i}.zip", files)))
        assert folders[-1].is_relative_to(cache / "unzipped") and (folders[-1] / "model.onnx").is_file()
        os.utime(folders[-1].parent, ns=(i * 10**9, i * 10**9))  # opened in this order, a second apart
    kept = sorted((cache / "unzipped").iterdir())
    assert len(kept) == archive.KEEP and not [p for p in kept if p.name.startswith(".")]
    assert {f.parent for f in folders[-archive.KEEP:]} == set(kept)
    again = open_path(tmp_path / "b0.zip")  # the oldest, opened again: extracted anew, kept as the newest
    assert again.is_dir() and again.parent in set((cache / "unzipped").iterdir())
    assert len(list((cache / "unzipped").iterdir())) == archive.KEEP
