"""`sim:PROFILE`: the real runtime, here, under a device profile's limits. Labelled simulated.

- threads: capped at the profile's big cores (and at this machine's cores);
- memory: capped at the profile's app budget with a memory cgroup when this process may create one
  (root, or a delegated cgroup v2 subtree), so an over-budget model is killed the way the phone's OS
  would kill the app; otherwise a watchdog kills the runner when its RSS passes the budget. The
  mechanism used is recorded in every result;
- the result also carries the roofline prediction for the real device (`predicted_decode_tok_s`):
  the measured speed is this machine's, never the phone's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path

from ..errors import SlmExportError
from . import DEVICES
from .local import LocalDevice, RunnerKilled

# (hierarchy, a file only a real memory hierarchy has, the limit file of a child group)
CGROUP_ROOTS = (("/sys/fs/cgroup", "cgroup.controllers", "memory.max"),  # cgroup v2
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.limit_in_bytes"))  # v1


class MemoryCap:
    """A memory limit for one child process: a fresh cgroup if we may make one, else an RSS watchdog."""

    def __init__(self, budget_mb: float):
        self.budget_bytes = int(budget_mb * 2**20)
        self.group = self.limit_file = None
        for root, marker, limit_file in CGROUP_ROOTS:
            if os.path.exists(os.path.join(root, marker)):
                try:
                    group = Path(root) / f"slm-export-sim-{uuid.uuid4().hex[:8]}"
                    group.mkdir()
                except OSError:
                    continue
                try:
                    (group / limit_file).write_text(str(self.budget_bytes))
                    swap = group / ("memory.swap.max" if limit_file == "memory.max" else "memory.memsw.limit_in_bytes")
                    if swap.exists():  # no swapping past the budget: phones kill instead
                        swap.write_text("0" if limit_file == "memory.max" else str(self.budget_bytes))
                except OSError:
                    group.rmdir()
                    continue
                self.group, self.limit_file = group, limit_file
                break
        self.mechanism = (f"cgroup {'v2' if self.limit_file == 'memory.max' else 'v1'} {self.limit_file}="
                          f"{self.budget_bytes}" if self.group else
                          f"RSS watchdog (no writable memory cgroup here): SIGKILL above {self.budget_bytes} bytes")

    def preexec(self):
        if self.group:
            procs = self.group / "cgroup.procs"
            return lambda: procs.write_text(str(os.getpid()))
        return None

    def watch(self, proc: subprocess.Popen) -> None:
        if self.group:
            return
        import psutil

        def poll():
            try:
                p = psutil.Process(proc.pid)
                while proc.poll() is None:
                    if p.memory_info().rss > self.budget_bytes:
                        proc.send_signal(signal.SIGKILL)
                        return
                    threading.Event().wait(0.01)
            except psutil.NoSuchProcess:
                pass

        threading.Thread(target=poll, daemon=True).start()

    def close(self) -> None:
        if self.group:
            try:
                self.group.rmdir()
            except OSError:
                pass


@DEVICES.register("sim")
class SimulatedDevice(LocalDevice):
    simulated = True

    def __init__(self, profile_name: str = "", profile=None, **_options):
        from .profiles import load_profile

        if not profile_name and profile is None:
            raise SlmExportError("sim: needs a profile name, e.g. --device sim:raspberry-pi-5-8gb "
                                 "(see `slm-export devices`)")
        self.profile = profile or load_profile(profile_name)
        self.name = f"sim:{self.profile.name}"
        self.last_memory_limit = ""

    def describe(self) -> dict:
        from .local import describe

        return {**describe(), "name": self.name, "simulated": True, "simulates": self.profile.summary(),
                "memory_limit": self.last_memory_limit}

    def measure(self, folder, *, prompts, decode_tokens, warmup, repeats, threads, timeout_s: float = 1800):
        from .. import manifest as mf

        target = mf.read(folder)["target"]
        if target not in self.profile.formats:
            raise SlmExportError(f"an {target} artifact does not run on {self.profile.name} (it runs "
                                 f"{', '.join(self.profile.formats)}); export for one of those targets")
        cap_threads = min(self.profile.big_cores, len(os.sched_getaffinity(0)))
        cap = MemoryCap(self.profile.app_budget_mb)
        self.last_memory_limit = cap.mechanism
        try:
            return super().measure(folder, prompts=prompts, decode_tokens=decode_tokens, warmup=warmup,
                                   repeats=repeats, threads=min(threads or cap_threads, cap_threads),
                                   timeout_s=timeout_s, cap=cap)
        except RunnerKilled as e:
            raise RunnerKilled(
                f"killed at the {self.profile.name} app memory budget of {self.profile.app_budget_mb:.0f} MB "
                f"({cap.mechanism}), as the device's OS would kill the app: use fewer bits, a smaller "
                "--max-context or a device with more memory") from e
        finally:
            cap.close()
