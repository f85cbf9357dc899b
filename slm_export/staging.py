"""Write a folder atomically: build it in a temporary sibling, rename it into place at the end.

An interrupted or failed write leaves nothing that looks complete; with `force`, the old folder is
moved aside before the rename, so a crash keeps one of the two.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import SlmExportError


def user_cache_dir() -> Path:
    """Where slm-export keeps what it builds or downloads once ($SLM_EXPORT_CACHE, else ~/.cache/slm-export)."""
    if os.environ.get("SLM_EXPORT_CACHE"):
        return Path(os.environ["SLM_EXPORT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "slm-export"


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise SlmExportError(f"output folder {out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise SlmExportError(f"output path {out} exists and is not a folder")
    if not out.parent.exists():
        raise SlmExportError(f"the parent folder of --out ({out.parent}) does not exist")


@contextmanager
def staged_folder(out: Path, share: bool = True):
    """Yield a temporary folder beside `out`; on success it becomes `out`.

    share: make everything readable by all (an artifact, shared like any build output). Off for
    trees whose own modes matter (the emulated ARM userland: executables, links into itself)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes a 0700 folder
        for p in tmp.rglob("*") if share else ():
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
