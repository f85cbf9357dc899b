"""The machine slm-export runs on: measures in a fresh child process without torch."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

from ..errors import SlmExportError
from . import DEVICES


def describe() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"name": "local", "cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(),
            "memory_gb": mem_gb, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


@DEVICES.register("local")
class LocalDevice:
    name = "local"

    def describe(self) -> dict:
        return describe()

    def measure(self, folder, *, prompts: list[list[int]], decode_tokens: int, warmup: int, repeats: int,
                threads: int | None, timeout_s: float = 1800) -> list[dict]:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(prompts, f)
        cmd = [sys.executable, "-m", "slm_export.runtimes.measure", str(folder), "--prompt-ids", f.name,
               "--decode-tokens", str(decode_tokens), "--warmup", str(warmup), "--repeats", str(repeats)]
        if threads:
            cmd += ["--threads", str(threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the runner did not finish within {timeout_s:.0f}s") from None
        finally:
            os.unlink(f.name)
        if proc.returncode == 2:
            raise SlmExportError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise RuntimeError(f"runner exited with code {proc.returncode}: {tail}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
