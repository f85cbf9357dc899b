"""What a manifest records of the model and the calibration text an export read, and finding them again.

The manifest names them and gives their sha256, never where they were: a folder or bundle is shared,
and the exporting machine's paths (its user names, its caches) stay behind. Where this machine read
them is remembered in the slm-export cache (`<cache>/sources/<sha256>`, one path per file), so
`verify` on the machine that exported finds them again; elsewhere `verify --model` and
`--calibration-text` point at them.

A model's sha256 is that of its .gguf file, or for a folder that of the `sha256sum` listing of its
config.json and weight files. A calibration text's is that of its text (UTF-8).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import SlmExportError
from .manifest import sha256
from .staging import user_cache_dir

MODEL_FILES = ("config.json", "*.safetensors", "*.bin")  # what decides a model folder's weights
_seen: dict[str, str] = {}  # sha256 -> path, for this process (the cache may be read-only)


def model_record(source: dict) -> dict:
    """The manifest's record of a loaded model's `source` (loading.LoadedModel.source): its kind, its
    name (the bundled model's, a hub id, or the file or folder's name), a hub snapshot's revision and
    the sha256, without its path (remembered on this machine)."""
    if not source.get("path"):
        return dict(source)  # a model object: nothing was read from disk
    path = Path(source["path"])
    record = {k: v for k, v in source.items() if k != "path"}
    if record.get("kind") == "hub":
        record["revision"] = path.name  # the hub cache keeps each snapshot under its commit
    elif "name" not in record:
        record["name"] = path.name
    record["sha256"] = model_sha256(path)
    remember(record["sha256"], path)
    return record


def model_sha256(path: Path) -> str:
    if path.is_file():
        return sha256(path)
    files = sorted({p for pattern in MODEL_FILES for p in path.glob(pattern) if p.is_file()})
    return hashlib.sha256("".join(f"{sha256(p)}  {p.name}\n" for p in files).encode()).hexdigest()


def text_record(path: str | Path, text: str) -> dict:
    """The manifest's record of a user's calibration text: its file's name and the sha256 of the text."""
    digest = text_sha256(text)
    remember(digest, Path(path).expanduser().resolve())
    return {"file": Path(path).name, "sha256": digest}


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def remember(digest: str, path: Path) -> None:
    """Note where this machine read the file or folder of sha256 `digest` (best effort on disk)."""
    _seen[digest] = str(path)
    try:
        (user_cache_dir() / "sources").mkdir(parents=True, exist_ok=True)
        (user_cache_dir() / "sources" / digest).write_text(str(path))
    except OSError:
        pass


def remembered(digest: str | None) -> str | None:
    """Where this machine read `digest`, if it did (the path may have gone or changed since)."""
    if not digest:
        return None
    try:
        return _seen.get(digest) or (user_cache_dir() / "sources" / digest).read_text()
    except OSError:
        return None


def find_model(record: dict, given: str | None = None) -> str:
    """What `loading.load` is given to load the model `record` names again: `given` (verify --model), the
    bundled model, where this machine read it, a hub id (its cached snapshot, else downloaded)."""
    from .loading import DEFAULT_MODEL

    if given:
        return given
    if record.get("name") == DEFAULT_MODEL:
        return DEFAULT_MODEL
    here = remembered(record.get("sha256")) or record.get("path")  # "path": manifests written before sources.py
    if here and Path(here).exists():
        return here
    if record.get("kind") == "hub" and record.get("id"):
        return record["id"]
    raise SlmExportError(f"verify needs the model this artifact was exported from, {record.get('name', 'unknown')} "
                         f"(sha256 {str(record.get('sha256'))[:12]}...), which this machine did not read; "
                         "pass its folder or .gguf file with --model PATH")


def find_text(record: dict, given: str | Path | None = None) -> str:
    """The user's calibration text `record` names (its `file` and `sha256`): from `given` (verify
    --calibration-text, then remembered) or from where this machine read it; refused when missing or changed."""
    name, digest = record.get("file"), record.get("sha256")
    ask = f"pass the file it was exported with: --calibration-text {name}"
    path = Path(given).expanduser() if given else None
    if path is None:
        here = remembered(digest) or (name if Path(str(name)).is_absolute() else None)  # absolute: older manifests
        path = Path(here) if here else None
    if path is None or not path.is_file():
        where = f"--calibration-text {path} does not exist" if given else "this machine did not read it"
        raise SlmExportError(f"this artifact was calibrated on {name} (sha256 {str(digest)[:12]}...), which verify "
                             f"quantizes again; {where}: {ask}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlmExportError(f"calibration text {path} could not be read as UTF-8 ({e}); {ask}") from None
    if text_sha256(text) != digest:
        raise SlmExportError(f"calibration text {path} has sha256 {text_sha256(text)[:12]}..., not the "
                             f"{str(digest)[:12]}... of the {name} this artifact was calibrated on; {ask}")
    if given:
        remember(digest, path.resolve())
    return text
