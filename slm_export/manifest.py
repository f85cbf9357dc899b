"""manifest.json: what an artifact folder holds and how it was made, with a sha256 per file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import SlmExportError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def write(folder: Path, manifest: dict) -> None:
    manifest = dict(manifest, schema_version=SCHEMA_VERSION, files=file_table(folder))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SlmExportError(f"artifact folder {folder} does not exist; export one first with `slm-export --target onnx`")
    if not path.is_file():
        raise SlmExportError(f"{folder} has no {MANIFEST}; it is not an slm-export artifact (or the export did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlmExportError(f"{path} is not valid JSON ({e.msg}); re-export the artifact") from None
    for key in ("target", "files", "model_file"):
        if key not in manifest:
            raise SlmExportError(f"{path} lacks '{key}'; re-export the artifact")
    return manifest


def check_files(folder: Path, manifest: dict) -> None:
    """Refuse a folder whose files are missing, truncated or changed since export."""
    for name, meta in manifest["files"].items():
        p = Path(folder) / name
        if not p.is_file():
            raise SlmExportError(f"{p} listed in the manifest is missing; re-export or re-copy the artifact")
        if p.stat().st_size != meta["bytes"]:
            raise SlmExportError(f"{p} is {p.stat().st_size} bytes, the manifest says {meta['bytes']}: truncated or changed")
        if sha256(p) != meta["sha256"]:
            raise SlmExportError(f"{p} does not match its sha256 in the manifest: the file was changed after export")


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
