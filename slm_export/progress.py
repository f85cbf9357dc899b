"""Progress on stderr while long work runs: stages with their time, counted steps with an ETA.

    with progress.stage("lowering to XNNPACK"):      # "lowering to XNNPACK ... 41.2s"
        ...
    for layer in progress.steps(layers, "calibrating layers"):   # "calibrating layers 12/30, 21s, about 32s left"
        ...

A stage says nothing until it has run for SHOW_AFTER_S on a terminal (PLAIN_EVERY_S elsewhere), so quick
work (and a bad input refused at once, whose one-line error must stand alone) prints no progress at all.
On a terminal a stage or a count keeps to one line, rewritten in place; elsewhere (CI logs, pipes) it
prints plain lines, a count at most one every PLAIN_EVERY_S seconds. Results go to stdout; this only ever writes to stderr. `set_quiet(True)`
(the CLI's --quiet) silences it; so does SLM_EXPORT_QUIET=1.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

SHOW_AFTER_S = 2.0
PLAIN_EVERY_S = 10.0
_state = {"quiet": os.environ.get("SLM_EXPORT_QUIET", "") not in ("", "0")}
_lock = threading.Lock()


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = bool(quiet) or os.environ.get("SLM_EXPORT_QUIET", "") not in ("", "0")


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _write(text: str, rewrite: bool = False) -> None:
    with _lock:
        if rewrite:
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _secs(s: float) -> str:
    return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"


@contextmanager
def stage(what: str):
    """Say `what` is running once it has run SHOW_AFTER_S, and how long it took when it ends (not on failure)."""
    if _state["quiet"]:
        yield
        return
    t0 = time.perf_counter()
    shown = threading.Event()
    tty = _tty()

    def show():
        shown.set()
        _write(f"{what} ...", rewrite=tty) if tty else _write(f"{what} ...")

    timer = threading.Timer(SHOW_AFTER_S if tty else PLAIN_EVERY_S, show)
    timer.daemon = True
    timer.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        timer.cancel()
        if shown.is_set():
            if ok:
                _write(f"{what}: {_secs(time.perf_counter() - t0)}", rewrite=tty)
                if tty:
                    _write("")
            elif tty:
                _write("")  # leave the line for the error that follows


class Count:
    """Steps of known number: `step()` after each; prints the count, the time so far and an ETA.

    `work`: a size per step, where steps differ (mixed precision's later layers carry more states); the
    ETA then fits time = fixed + per-unit x size to the steps done so far (least squares, neither part
    negative) and sums it over the steps left. By default every step costs the same."""

    def __init__(self, what: str, total: int, work: list[float] | None = None):
        self.what, self.total, self.done = what, max(int(total), 0), 0
        if work is not None and len(work) != self.total:
            raise ValueError(f"{len(work)} step costs for {self.total} steps")
        self.work = work
        self.t0 = self.last = self.prev = time.perf_counter()
        self.times: list[float] = []  # each step's seconds (steps counted one at a time)
        self.tty = _tty()
        self.shown = False

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        self.times += [(now - self.prev) / n] * n
        self.prev = now
        if _state["quiet"]:
            return
        elapsed = now - self.t0
        final = self.done >= self.total
        if elapsed < SHOW_AFTER_S and not (final and self.shown):
            return
        if not self.tty and not final and now - self.last < PLAIN_EVERY_S and self.shown:
            return
        self.last, self.shown = now, True
        left = self.left(elapsed) if self.done and not final else 0.0
        text = f"{self.what} {self.done}/{self.total}, {_secs(elapsed)}" + (f", about {_secs(left)} left" if left else "")
        _write(text, rewrite=self.tty)
        if self.tty and final:
            _write("")

    def left(self, elapsed: float) -> float:
        """Seconds still to go, at the pace of the steps done so far."""
        size, took = self.work[:self.done] if self.work else [], self.times[:self.done]
        if not self.work or len(set(size)) < 2:
            return elapsed / self.done * (self.total - self.done)
        mean_size, mean_took = sum(size) / len(size), sum(took) / len(took)
        per_unit = max(sum((s - mean_size) * (t - mean_took) for s, t in zip(size, took))
                       / sum((s - mean_size) ** 2 for s in size), 0.0)
        fixed = max(mean_took - per_unit * mean_size, 0.0)
        return sum(fixed + per_unit * s for s in self.work[self.done:])


def steps(items, what: str, total: int | None = None, work: list[float] | None = None):
    """Yield from `items`, counting each one done (see Count)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    count = Count(what, len(items) if total is None else total, work)
    for item in items:
        yield item
        count.step()
