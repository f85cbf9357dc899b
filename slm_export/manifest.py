"""manifest.json: what an artifact folder holds and how it was made, with a sha256 per file.

Beside it, SHA256SUMS gives the same sha256s (and manifest.json's own) in the format of `sha256sum`,
so an app developer checks a folder with `sha256sum -c SHA256SUMS` (`shasum -a 256 -c` on macOS)
without slm-export. It is derived from the manifest's file table when the manifest is written, never
computed apart, and `check_files` refuses a folder where the two disagree.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import SlmExportError

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
SCHEMA_VERSION = 1
SUMS_MAX = 16 << 20  # a SHA256SUMS larger than this is not one slm-export wrote
REDO = "re-export the artifact, or re-create the bundle (`slm-export bundle`) or download it again"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: Path) -> dict:
    """{relative name: bytes and sha256} of every file under `folder` but manifest.json and SHA256SUMS."""
    table = {}
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if p.is_file() and name not in (MANIFEST, SUMS):
            table[name] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    return table


def write(folder: Path, manifest: dict) -> None:
    """Write manifest.json (with the file table of `folder`) and SHA256SUMS derived from it."""
    manifest = dict(manifest, schema_version=SCHEMA_VERSION, files=file_table(folder))
    raw = json.dumps(manifest, indent=1).encode()
    (folder / MANIFEST).write_bytes(raw)
    (folder / SUMS).write_text(sums_text(manifest, hashlib.sha256(raw).hexdigest()), encoding="utf-8")


def expected_sums(manifest: dict, manifest_sha256: str) -> dict:
    """{name: sha256} that SHA256SUMS gives: the manifest's file table and manifest.json itself."""
    return {**{name: meta["sha256"] for name, meta in manifest["files"].items()}, MANIFEST: manifest_sha256}


def sums_text(manifest: dict, manifest_sha256: str) -> str:
    """SHA256SUMS: `<sha256>  <name>` per line, sorted by name (what `sha256sum` writes and `-c` reads)."""
    return "".join(f"{h}  {n}\n" for n, h in sorted(expected_sums(manifest, manifest_sha256).items()))


def check_sums(text: str, manifest: dict, manifest_sha256: str, where: str) -> None:
    """Refuse a SHA256SUMS (`where` names it) that is not exactly what the manifest gives."""
    want = expected_sums(manifest, manifest_sha256)
    got = {}
    for i, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or name in got:
            raise SlmExportError(f"{where} line {i} is not `<sha256>  <file>` (or repeats a file); {REDO}")
        got[name] = digest
    for name in sorted(set(want) | set(got)):
        if name == MANIFEST and got.get(name) not in (None, want[name]):
            raise SlmExportError(f"{MANIFEST} does not match its sha256 in {where}: it was changed after export; {REDO}")
        if name not in got:
            raise SlmExportError(f"{where} lacks {name}, which {MANIFEST} lists; {REDO}")
        if name not in want:
            raise SlmExportError(f"{where} lists {name}, which {MANIFEST} does not; {REDO}")
        if got[name] != want[name]:
            raise SlmExportError(f"{where} and {MANIFEST} give {name} different sha256s; {REDO}")


def read(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise SlmExportError(f"{folder} is a file, not an artifact folder; pass the folder an export wrote "
                             "(`slm-export inspect` also takes a bundle .zip)")
    if not folder.is_dir():
        raise SlmExportError(f"artifact folder {folder} does not exist; export one first with `slm-export export --target onnx`")
    if not path.is_file():
        raise SlmExportError(f"{folder} has no {MANIFEST}; it is not an slm-export artifact (or the export did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlmExportError(f"{path} is not valid JSON ({e.msg}); re-export the artifact") from None
    validate(manifest, str(path))
    return manifest


def validate(manifest, where: str) -> None:
    """Refuse a manifest that lacks a required key, or names a file outside its folder (`where` names it)."""
    if not isinstance(manifest, dict):
        raise SlmExportError(f"{where} is not a JSON object; re-export the artifact")
    for key in ("target", "files", "model_file"):
        if key not in manifest:
            raise SlmExportError(f"{where} lacks '{key}'; re-export the artifact")
    _check_table(manifest["files"], where)
    for name in named_paths(manifest):
        reason = unsafe_reason(name)
        if reason:
            raise SlmExportError(f"{where} lists {name!r}, a path outside its folder ({reason}); refusing it: "
                                 "re-export the artifact, or ask its sender for a bundle made by `slm-export bundle`")
    for runtime, name in runtime_files(manifest):
        if name not in manifest["files"]:
            raise SlmExportError(f"{where} says {runtime} reads {name}, but its file table has no {name} "
                                 "(no size, no sha256): re-export the artifact, or bundle it again with `slm-export bundle`")


def _check_table(files, where: str) -> None:
    if not isinstance(files, dict):
        raise SlmExportError(f"{where}: 'files' is not a table of file names; re-export the artifact")
    for name, meta in files.items():
        if not (isinstance(meta, dict) and type(meta.get("bytes")) is int and meta["bytes"] >= 0
                and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64
                and all(c in "0123456789abcdef" for c in meta["sha256"])):
            raise SlmExportError(f"{where} lists {name!r} without a byte count and sha256; re-export the artifact")


def named_paths(manifest: dict) -> list:
    """Every file or folder name the manifest gives: the file table, the model, its data, tokenizer, report."""
    def part(key):
        value = manifest.get(key)
        return value if isinstance(value, dict) else {}

    extra = part("target_extra")
    data_files = extra.get("data_files") or []
    names = [*manifest["files"], manifest["model_file"], extra.get("data_file"), part("tokenizer").get("file"),
             part("quant").get("report"), *(data_files if isinstance(data_files, list) else [data_files]),
             *(name for _, name in runtime_files(manifest))]
    return [n for n in names if n is not None]


def runtime_files(manifest: dict) -> list[tuple[str, object]]:
    """(runtime, file name) for every file another runtime reads from the folder (manifest `app_runtimes`:
    onnxruntime-genai's genai_config.json and what it names), its config first."""
    apps = manifest.get("app_runtimes")
    if not isinstance(apps, dict):
        return []
    out = []
    for runtime, entry in apps.items():
        if not isinstance(entry, dict):
            continue
        files = entry.get("files") if isinstance(entry.get("files"), list) else []
        names = [entry.get("config"), *files] if entry.get("config") is not None else files
        for n in names:
            if n is not None and (runtime, n) not in out:  # a name that is not a string is refused by validate
                out.append((runtime, n))
    return out


def unsafe_reason(name) -> str | None:
    """Why `name` is not a plain relative path that stays inside its folder on every OS (None: it is)."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if name.startswith("/"):
        return "an absolute path"
    if "\\" in name:
        return "a backslash"
    if ":" in name:
        return "a drive letter or stream name"
    if "\0" in name:
        return "a NUL character"
    parts = name.split("/")
    if ".." in parts:
        return "'..'"
    if "" in parts or "." in parts:
        return "an empty or '.' part"
    return None


def inside(folder: Path, name: str) -> Path:
    """folder/name, refused when it resolves outside folder (a symbolic link out of it)."""
    p = Path(folder) / name
    if not p.resolve().is_relative_to(Path(folder).resolve()):
        raise SlmExportError(f"{folder}: {name!r} is a symbolic link out of the folder; refusing to follow it: "
                             "copy the artifact again without links")
    return p


def check_files(folder: Path, manifest: dict) -> None:
    """Refuse a folder whose files are missing, truncated or changed since export, or link out of it, or
    whose SHA256SUMS (where there is one: folders exported before it have none) disagrees with the manifest."""
    folder = Path(folder)
    sums = inside(folder, SUMS)
    if sums.is_file():
        if sums.stat().st_size > SUMS_MAX:
            raise SlmExportError(f"{sums} is {sums.stat().st_size} bytes, not a SHA256SUMS slm-export wrote; {REDO}")
        try:
            text = sums.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SlmExportError(f"{sums} is not UTF-8 text; {REDO}") from None
        check_sums(text, manifest, sha256(folder / MANIFEST), str(sums))
    for name, meta in manifest["files"].items():
        p = inside(folder, name)
        if not p.is_file():
            raise SlmExportError(f"{p} listed in the manifest is missing; {REDO}")
        if p.stat().st_size != meta["bytes"]:
            raise SlmExportError(f"{p} is {p.stat().st_size} bytes, the manifest says {meta['bytes']}: "
                                 f"truncated or changed; {REDO}")
        if sha256(p) != meta["sha256"]:
            raise SlmExportError(f"{p} does not match its sha256 in the manifest and {SUMS}: "
                                 f"the file was changed after export; {REDO}")


def source_label(source: dict) -> str:
    """How to name the model an artifact came from: its short name, path or hub id."""
    return source.get("name") or source.get("path") or source.get("id") or "unknown"


def model_size_bytes(manifest: dict) -> int:
    """Bytes of the model files proper (weights and graph), without tokenizer or reports."""
    model_files = {manifest["model_file"], *manifest.get("target_extra", {}).get("data_files", [])}
    data = manifest.get("target_extra", {}).get("data_file")
    if data:
        model_files.add(data)
    # a model file may be a folder (a Core ML .mlpackage): count everything under it
    return sum(m["bytes"] for n, m in manifest["files"].items()
               if n in model_files or n.startswith(manifest["model_file"] + "/"))


def library_versions(*names: str) -> dict:
    """Versions of Python, slm-export and `names` (None for a package that is not installed)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for n in ("slm-export", *names):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out
