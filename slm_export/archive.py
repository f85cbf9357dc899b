"""Open a bundle zip: check it against its own manifest, extract only what that lists, into the cache.

A zip is untrusted input. Before anything is written: every entry is a plain relative path (no
absolute path, drive letter, backslash, '..' or link) under one top folder; that folder's
manifest.json names only such paths; its SHA256SUMS, if any, is exactly what that manifest gives
(manifest.py); every other entry is a file the manifest lists, with the size it lists (an unlisted
entry is refused); the listed total is at most RATIO times the zip (or FLOOR) and fits on the cache's disk. Each file is then streamed out, stopped past its listed size, and its
sha256 checked as it is written. A refusal leaves nothing behind. Extractions live in
<cache>/unzipped/<zip's sha256>/; the KEEP most recently opened are kept, older ones removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

from . import manifest as mf
from .errors import SlmExportError
from .staging import replace_folder, user_cache_dir

KEEP = 3  # extractions kept in the cache, most recently opened first
RATIO = 20  # a bundle unpacks to at most this many times its zip's size...
FLOOR = 16 << 20  # ...or this many bytes, whichever is larger
MANIFEST_MAX = 16 << 20
CHUNK = 1 << 20
STALE_S = 3600  # partial folders older than this were left by a killed process
ASK = "do not use it; ask its sender for a bundle made by `slm-export bundle DIR --zip`"


def open_zip(zip_path: str | Path) -> Path:
    """Extract a bundle zip into the cache (see the module doc); returns the bundle folder."""
    zip_path = Path(os.path.abspath(Path(zip_path).expanduser()))
    if not zip_path.is_file():
        raise SlmExportError(f"bundle zip {zip_path} does not exist")
    root = user_cache_dir() / "unzipped"
    with _open(zip_path) as z:
        top = _top_folder(z, zip_path)
        raw, manifest = _read_manifest(z, zip_path, top)
        sums = _read_sums(z, zip_path, top, manifest, raw)
        entries = _listed_entries(z, zip_path, top, manifest["files"])
        _check_total(zip_path, root, manifest["files"])
        final = _extract(z, zip_path, top, {mf.MANIFEST: raw, mf.SUMS: sums}, manifest["files"], entries,
                         root / mf.sha256(zip_path)[:16])
    _prune(root, keep=final.parent)
    return final


def _open(zip_path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise SlmExportError(f"{zip_path} is not a readable zip file ({e}); download or copy it again") from None


def _top_folder(z: zipfile.ZipFile, zip_path: Path) -> str:
    """The one folder every entry is under, after refusing unsafe names, links and duplicates."""
    seen = set()
    for info in z.infolist():
        name = info.filename[:-1] if info.is_dir() else info.filename
        reason = mf.unsafe_reason(name)
        if reason:
            raise SlmExportError(f"{zip_path} holds {info.filename!r}, a path outside its folder ({reason}); "
                                 f"refusing to unzip it: {ASK}")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise SlmExportError(f"{zip_path} holds a symbolic link {info.filename!r}; refusing to unzip it: {ASK}")
        if name in seen:
            raise SlmExportError(f"{zip_path} holds {info.filename!r} twice; refusing to unzip it: {ASK}")
        seen.add(name)
    tops = sorted({name.split("/")[0] for name in seen})
    if len(tops) != 1:
        raise SlmExportError(f"{zip_path} should hold one bundle folder, found {len(tops)} top-level entries "
                             f"({', '.join(tops[:3])}); zip the bundle folder itself (`slm-export bundle DIR --zip`)")
    return tops[0]


def _read_manifest(z: zipfile.ZipFile, zip_path: Path, top: str) -> tuple[bytes, dict]:
    """The manifest's bytes and its checked contents (at most MANIFEST_MAX bytes are read)."""
    name = f"{top}/{mf.MANIFEST}"
    try:
        info = z.getinfo(name)
    except KeyError:
        raise SlmExportError(f"{zip_path} has no {name}; it is not an slm-export bundle "
                             "(make one with `slm-export bundle DIR --zip`)") from None
    raw = _read_capped(z, info, zip_path, MANIFEST_MAX)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlmExportError(f"{zip_path}: {name} is not valid JSON ({e}); {ASK}") from None
    mf.validate(manifest, f"{zip_path} ({name})")
    return raw, manifest


def _read_sums(z: zipfile.ZipFile, zip_path: Path, top: str, manifest: dict, raw: bytes) -> bytes | None:
    """The zip's SHA256SUMS (None: a bundle made before it had none), refused unless it is what the manifest gives."""
    name = f"{top}/{mf.SUMS}"
    try:
        info = z.getinfo(name)
    except KeyError:
        return None
    data = _read_capped(z, info, zip_path, mf.SUMS_MAX)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SlmExportError(f"{zip_path}: {name} is not UTF-8 text; {ASK}") from None
    mf.check_sums(text, manifest, hashlib.sha256(raw).hexdigest(), f"{zip_path} ({name})")
    return data


def _read_capped(z: zipfile.ZipFile, info: zipfile.ZipInfo, zip_path: Path, limit: int) -> bytes:
    if info.file_size > limit:
        raise SlmExportError(f"{zip_path}: {info.filename} is {info.file_size} bytes, more than the "
                             f"{limit} slm-export reads of it; {ASK}")
    with _reading(zip_path, info.filename):
        with z.open(info) as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise SlmExportError(f"{zip_path}: {info.filename} unpacks to more than {limit} bytes; {ASK}")
    return data


def _listed_entries(z: zipfile.ZipFile, zip_path: Path, top: str, files: dict) -> dict:
    """{listed name: its zip entry}; refuses an unlisted entry, a missing one, or one of another size."""
    entries = {}
    for info in z.infolist():
        name = info.filename[len(top) + 1:]
        if info.is_dir() or name in (mf.MANIFEST, mf.SUMS):
            continue
        if name not in files:
            raise SlmExportError(f"{zip_path} holds {info.filename!r}, which its manifest.json does not list; "
                                 f"refusing to unzip it (a bundle zip holds only listed files): {ASK}")
        if info.file_size != files[name]["bytes"]:
            raise SlmExportError(f"{zip_path} holds {info.filename!r} of {info.file_size} bytes, its manifest.json "
                                 f"says {files[name]['bytes']}; refusing to unzip it: {ASK}")
        entries[name] = info
    missing = sorted(set(files) - set(entries))
    if missing:
        raise SlmExportError(f"{zip_path} lacks {top}/{missing[0]}, which its manifest.json lists "
                             f"({len(missing)} missing); the zip is incomplete: ask its sender for the whole bundle")
    return entries


def _check_total(zip_path: Path, root: Path, files: dict) -> None:
    """The listed total: at most RATIO times the zip (a zip bomb otherwise) and what the cache's disk holds."""
    total, size = sum(m["bytes"] for m in files.values()), zip_path.stat().st_size
    if total > max(FLOOR, RATIO * size):
        raise SlmExportError(f"{zip_path} would unpack to {total / 1e6:.1f} MB, more than {RATIO} times its own "
                             f"{size / 1e6:.1f} MB (a zip bomb?); refusing to unzip it: {ASK}")
    base = root
    while not base.exists():
        base = base.parent
    free = shutil.disk_usage(base).free
    if total > free:
        raise SlmExportError(f"{zip_path} unpacks to {total / 1e6:.1f} MB but {base} has {free / 1e6:.1f} MB free; "
                             "free some space or point SLM_EXPORT_CACHE at a larger disk")


def _extract(z, zip_path: Path, top: str, checked: dict, files: dict, entries: dict, final: Path) -> Path:
    """Write the files read and checked already (`checked`: {name: bytes or None}: the manifest and its
    SHA256SUMS) and every listed file into a temporary folder, then move it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unzip-", dir=final.parent))
    try:
        folder = tmp / top
        folder.mkdir()
        for name, data in checked.items():
            if data is not None:
                (folder / name).write_bytes(data)
        for name, info in entries.items():
            _copy_checked(z, info, folder / name, files[name], zip_path)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(final.parent)
        raise
    return final / top


def _copy_checked(z, info: zipfile.ZipInfo, dest: Path, meta: dict, zip_path: Path) -> None:
    with _reading(zip_path, info.filename):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src, open(dest, "xb") as out:
            digest = copy_capped(src, out, meta["bytes"])
    if digest != meta["sha256"]:
        raise SlmExportError(f"{zip_path}: {info.filename!r} does not match its sha256 in manifest.json "
                             f"(changed after bundling); {ASK}")


class TooLarge(Exception):
    pass


def copy_capped(src, out, limit: int) -> str:
    """Copy src to out, raising TooLarge as soon as more than `limit` bytes arrive; returns the sha256."""
    h, n = hashlib.sha256(), 0
    while chunk := src.read(min(CHUNK, limit - n + 1)):
        n += len(chunk)
        if n > limit:
            raise TooLarge(limit)
        h.update(chunk)
        out.write(chunk)
    return h.hexdigest()


class _reading:
    """Turn what reading a zip entry can raise into one line naming the zip and the entry."""

    def __init__(self, zip_path: Path, name: str):
        self.zip_path, self.name = zip_path, name

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, TooLarge):
            raise SlmExportError(f"{self.zip_path}: {self.name!r} unpacks to more than the {e.args[0]} bytes its "
                                 f"manifest.json lists; {ASK}") from None
        if isinstance(e, (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)):
            raise SlmExportError(f"{self.zip_path}: {self.name!r} cannot be read ({e}); the zip is damaged or "
                                 "encrypted: download or copy it again") from None
        if isinstance(e, OSError):
            raise SlmExportError(f"could not unzip {self.zip_path} into {user_cache_dir()} ({e}); free some space "
                                 "or point SLM_EXPORT_CACHE at another folder") from None
        return False


def _install(tmp: Path, final: Path) -> None:
    """Move the finished extraction to `final` (replacing an older one), marked as just used."""
    replace_folder(tmp, final, f".old-{final.name}-{os.getpid()}")  # a dot name: _prune skips it
    os.utime(final)


def _prune(root: Path, keep: Path) -> None:
    """Keep `keep` and the KEEP - 1 other most recently opened extractions; remove older and stale ones."""
    done = sorted((p for p in root.iterdir() if not p.name.startswith(".") and p != keep), key=_mtime, reverse=True)
    stale = [p for p in root.iterdir() if p.name.startswith(".") and time.time() - _mtime(p) / 1e9 > STALE_S]
    for p in done[KEEP - 1:] + stale:
        shutil.rmtree(p, ignore_errors=True)


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:  # removed meanwhile by another process
        return 0


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
