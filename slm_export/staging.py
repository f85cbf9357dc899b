"""Write a folder (or a file) atomically: build it in a temporary sibling, rename it into place at the end.

An interrupted or failed write leaves nothing that looks complete; with `force`, the old folder is
moved aside before the rename, so a crash keeps one of the two. A process killed outright (SIGKILL,
a power cut) cannot clean up: its sibling, `.NAME.partial-PID-XXXXXXXX`, is swept by the next write
into the same parent folder. While a sibling is being written its writer holds a lock on it, so a
live writer's folder is never taken for a dead one's. A writer may leave a note in its sibling
(`RUN_NOTE`: what it was doing and how much memory it was expected to need), so the run that sweeps
it can say why it was likely killed.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import SlmExportError
from .units import gb_text

try:
    import fcntl
except ImportError:  # Windows: no flock; a partial's writer is then known by its pid alone
    fcntl = None

# `.NAME.partial-PID-XXXXXXXX` (folders and zips; before pids, `.NAME.partial-XXXXXXXX`), the
# `.NAME.zip.partial` that `bundle --zip` used to leave, and check_writable's probe.
_PROBE = ".slm-export-probe-"
_PARTIAL = re.compile(r"^\..+\.partial-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}$|^\..+\.zip\.partial$"
                      rf"|^{re.escape(_PROBE)}[a-z0-9_]{{8}}$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
RUN_NOTE = ".slm-export-run.json"  # in a partial folder: {"what", "peak_bytes", "available"} of its writer


def user_cache_dir() -> Path:
    """Where slm-export keeps what it builds or downloads once ($SLM_EXPORT_CACHE, else ~/.cache/slm-export)."""
    if os.environ.get("SLM_EXPORT_CACHE"):
        return Path(os.environ["SLM_EXPORT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "slm-export"


def check_destination(out: Path, force: bool) -> None:
    """Refuse, before anything loads, an --out that cannot be written (one line naming the path)."""
    if out.exists() and not force:
        raise SlmExportError(f"output folder {out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise SlmExportError(f"output path {out} exists and is not a folder")
    if not out.parent.exists():
        raise SlmExportError(f"the parent folder of --out ({out.parent}) does not exist")
    check_writable(out.parent, "--out")


def check_free_space(out: Path, need: int, what: str) -> None:
    """Refuse, before anything loads, an --out whose file system has less free space than `need`
    bytes (at least what the artifact will take: a refusal is never wrong)."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        return  # the write itself will say what is wrong
    if need > free:
        raise SlmExportError(f"{what} writes at least {need / 1e6:.1f} MB into {out.parent} and its disk has "
                             f"{free / 1e6:.1f} MB free; free some space there or choose another --out")


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse, before the work, a report file (--json, --junit-xml) that could not be written at the end."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise SlmExportError(f"{flag} {path} is a folder; pass a file path")
    if not path.parent.is_dir():
        raise SlmExportError(f"the folder of {flag} ({path.parent}) does not exist")
    check_writable(path.parent, flag)


def check_writable(folder: Path, flag: str) -> None:
    """Create and remove a folder in `folder`: the truth about permissions, read-only mounts and root."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_PROBE, dir=folder))
    except OSError as e:
        raise SlmExportError(f"cannot write in {folder} ({e.strerror or e}); choose another {flag} "
                             "or make that folder writable") from None


def share_modes(folder: Path) -> None:
    """Make everything in `folder` readable by all (an artifact, shared like any build output)."""
    folder.chmod(0o755)  # mkdtemp makes a 0700 folder
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


@contextmanager
def staged_folder(out: Path, share: bool = True, log=None, note: dict | None = None):
    """Yield a temporary folder beside `out`; on success it becomes `out`.

    share: make everything readable by all (an artifact, shared like any build output). Off for
    trees whose own modes matter (the emulated ARM userland: executables, links into itself).
    log: where to say which stale partial folders of killed runs were swept (None: silently).
    note: written as RUN_NOTE into the folder until it is complete (`drop_note` removes it earlier,
    before the folder's files are listed), for the sweeper of a killed run to read."""
    sweep_stale(out.parent, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    lock = _hold(tmp)
    try:
        write_note(tmp, note)
        yield tmp
        drop_note(tmp)
        if share:
            share_modes(tmp)
        else:
            tmp.chmod(0o755)  # mkdtemp makes a 0700 folder
        replace_folder(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, out)
        raise
    finally:
        _release(lock)


def replace_folder(tmp: Path, out: Path, old_name: str | None = None) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first (`old_name`, default
    `.NAME.old-PID`) and removed after, so a crash in between keeps one of the two."""
    if out.exists():
        old = out.with_name(old_name or f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_note(folder: Path, note: dict | None) -> None:
    """Say in a staged folder what it is being written for (RUN_NOTE), for the sweeper of a killed run."""
    if note:
        (Path(folder) / RUN_NOTE).write_text(json.dumps(note))


def drop_note(folder: Path) -> None:
    """Remove a staged folder's RUN_NOTE (before a manifest lists the folder's files)."""
    (Path(folder) / RUN_NOTE).unlink(missing_ok=True)


@contextmanager
def staged_file(path: Path):
    """Yield a binary file open for writing beside `path`; on success it becomes `path` (mode 0644)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    tmp = Path(name)
    f = os.fdopen(fd, "w+b")
    try:
        _lock(f.fileno())
        yield f
        f.close()
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException as e:
        f.close()
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise


def _raise_if_disk_full(e: BaseException, path: Path) -> None:
    """A full disk (or quota) while writing `path`: bad input naming the path, not an internal error."""
    seen = e
    while seen is not None and not isinstance(seen, SlmExportError):
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            raise SlmExportError(f"no space left on the device while writing {path} (nothing was kept); "
                                 "free some space there or write somewhere else") from None
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)


# ---------------------------------------------------------------- partials of killed runs

def sweep_stale(parent: Path, log=None) -> list[Path]:
    """Remove the partial folders and files in `parent` that runs killed before their cleanup left:
    older than this process, and held by no live writer. Returns what was removed."""
    started = _process_started()
    removed = []
    try:
        candidates = [p for p in Path(parent).iterdir() if _PARTIAL.match(p.name)]
    except OSError:
        return removed
    for p in sorted(candidates):
        note = _read_note(p)
        if _remove_if_stale(p, started):
            removed.append(p)
            if log:
                log(f"removed {p}: left by an earlier run that was killed before it could clean up{_why(note)}")
    return removed


def _read_note(p: Path) -> dict | None:
    try:
        if p.is_symlink() or not p.is_dir():
            return None
        note = json.loads((p / RUN_NOTE).read_text())
        return note if isinstance(note, dict) else None
    except (OSError, ValueError):
        return None


def _why(note: dict | None) -> str:
    """What a killed run's note says about its likely cause: memory, for an export."""
    try:
        what, peak, have = str(note["what"]), float(note["peak_bytes"]), str(note["available"])
    except (TypeError, KeyError, ValueError):
        return ""
    return (f" ({what}, possibly killed for lack of memory: it was estimated to need about {gb_text(peak)} "
            f"at its peak, and {have} when it started)")


def _remove_if_stale(p: Path, started: float) -> bool:
    try:
        if p.is_symlink() or p.lstat().st_mtime >= started:
            return False  # a link is not ours; a newer one may be a live writer's (not yet locked)
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return False
    try:
        if not _try_lock(fd, p):
            return False  # a live writer holds it
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return not p.exists()
    finally:
        os.close(fd)


@functools.cache
def _process_started() -> float:
    """When this process started, to the clock tick (psutil's boot time is whole seconds: up to 1 s early)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # no /proc (macOS)
        import psutil

        return psutil.Process().create_time()


def _hold(folder: Path) -> int | None:
    """Lock `folder` for as long as this process writes it (released by the kernel if it is killed)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    _lock(fd)
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _try_lock(fd: int, p: Path) -> bool:
    """Whether no live process writes `p` (the lock is free; without flock, its pid is gone)."""
    if fcntl is None:
        import psutil

        m = _PARTIAL.match(p.name)
        return not (m and m.group("pid") and psutil.pid_exists(int(m.group("pid"))))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
