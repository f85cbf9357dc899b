"""Devices simulated here under a device profile. Labelled simulated; the profile's real device
carries the roofline prediction (`predicted_decode_tok_s`).

`limits:PROFILE`  this machine's own runtime under the profile's limits:
  - threads: capped at the profile's big cores (and at this machine's cores);
  - memory: capped at the profile's app budget with a memory cgroup when this process may create one
    (root, or a delegated cgroup v2 subtree), so an over-budget model is killed the way the phone's OS
    would kill the app; otherwise a watchdog kills the runner when its RSS passes the budget. The
    mechanism used is recorded in every result. The timings are this machine's, never the device's.
`sim:PROFILE`     for a profile with ARM cores (`qemu_cpu`) on a machine that is not ARM: the same
  limits, with the real aarch64 runtime run under QEMU with the profile's CPU model (see
  emulation.py). It shows that the artifact loads and runs there, its memory and its outputs (verify
  compares them with PyTorch and with this machine's run). Emulated timings say nothing about the
  device, so rows carry none (the raw emulated samples stay in `samples`, prefixed `emulated_`).
  For other profiles, or on an ARM machine, it is `limits:`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path

from ..errors import SlmExportError
from ..units import MB
from . import DEVICES
from .local import LocalDevice, RunnerKilled

# (hierarchy, a file only a real memory hierarchy has, the limit file of a child group)
CGROUP_ROOTS = (("/sys/fs/cgroup", "cgroup.controllers", "memory.max"),  # cgroup v2
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.limit_in_bytes"))  # v1


class MemoryCap:
    """A memory limit for one child process: a fresh cgroup if we may make one, else an RSS watchdog."""

    def __init__(self, budget_mb: float):
        self.budget_bytes = int(budget_mb * MB)
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


@DEVICES.register("limits")
class LimitedDevice(LocalDevice):
    simulated = True
    scheme = "limits"

    def __init__(self, profile_name: str = "", profile=None, **_options):
        from .profiles import load_profile

        if not profile_name and profile is None:
            raise SlmExportError(f"{self.scheme}: needs a profile name, e.g. --device {self.scheme}:raspberry-pi-5-8gb "
                                 "(see `slm-export devices`)")
        self.profile = profile or load_profile(profile_name)
        self.name = f"{self.scheme}:{self.profile.name}"
        self.last_memory_limit = ""

    def describe(self) -> dict:
        from .local import describe

        return {**describe(), "name": self.name, "simulated": True, "simulates": self.profile.summary(),
                "memory_limit": self.last_memory_limit, **({"emulated": self.emulated} if self.emulated else {})}

    def check_format(self, folder) -> dict:
        from .. import manifest as mf

        manifest = mf.read(folder)
        if manifest["target"] not in self.profile.formats:
            raise SlmExportError(f"an {manifest['target']} artifact does not run on {self.profile.name} (it runs "
                                 f"{', '.join(self.profile.formats)}); export for one of those targets")
        return manifest

    def capped_threads(self, threads: int | None) -> int:
        """Threads within the profile's big cores and this machine's cores."""
        cap = min(self.profile.big_cores, len(os.sched_getaffinity(0)))
        return min(threads or cap, cap)

    def measure(self, folder, *, prompts, decode_tokens, warmup, repeats, threads, timeout_s: float = 1800,
                runtime: str | None = None):
        self.check_format(folder)
        cap = MemoryCap(self.profile.app_budget_mb)
        self.last_memory_limit = cap.mechanism
        try:
            return super().measure(folder, prompts=prompts, decode_tokens=decode_tokens, warmup=warmup,
                                   repeats=repeats, threads=self.capped_threads(threads),
                                   timeout_s=timeout_s, cap=cap, runtime=runtime)
        except RunnerKilled as e:
            raise RunnerKilled(
                f"killed at the {self.profile.name} app memory budget of {self.profile.app_budget_mb:.0f} MB "
                f"({cap.mechanism}), as the device's OS would kill the app: use fewer bits, a smaller "
                "--max-context or a device with more memory") from e
        finally:
            cap.close()

    def replay(self, folder, steps, *, threads, timeout_s: float = 3600):
        self.check_format(folder)
        return super().replay(folder, steps, threads=self.capped_threads(threads), timeout_s=timeout_s)


# Timing fields an emulated run produces but must not report as the device's (kept as raw samples).
EMULATED_TIMINGS = ("load_s", "ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max")


@DEVICES.register("sim")
class SimulatedDevice(LimitedDevice):
    scheme = "sim"

    def __init__(self, profile_name: str = "", profile=None, **options):
        from .emulation import host_is_arm

        super().__init__(profile_name, profile, **options)
        self.emulates = bool(self.profile.qemu_cpu) and not host_is_arm()
        self.stock_runtimes = not self.emulates  # the emulated device has slm-export's runtimes' ARM builds only
        self._arm: dict = {}  # runtime -> its prepared environment

    def arm(self, runtime: str):
        """The emulated aarch64 environment for `runtime` (prepared on first use)."""
        from .emulation import prepare

        if runtime not in self._arm:
            self._arm[runtime] = prepare(self.profile, runtime)
            self.emulated = self._arm[runtime].describe()
        return self._arm[runtime]

    def python(self, runtime: str):
        if not self.emulates:
            return super().python(runtime)
        arm = self.arm(runtime)
        return arm.command(), arm.env()

    def measure(self, folder, **kwargs):
        rows = super().measure(folder, **kwargs)
        if self.emulates:
            for r in rows:
                samples = {f"emulated_{key}": v for key, v in r.get("samples", {}).items()}  # the raw lists
                samples["emulated_load_s"] = r.get("load_s")
                for key in EMULATED_TIMINGS:
                    r.pop(key, None)
                r.update(samples=samples, emulated=self.emulated)
        return rows
