"""What machine is this? Run here for `local`, and on the far side for SSH devices:

    python -m slm_export.devices.probe      # prints one JSON object

Only the standard library, so it runs on a bare Raspberry Pi OS Python before anything is installed.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys

RUNTIME_PACKAGES = ("onnxruntime", "executorch", "numpy")
# The instruction-set extensions that int4/int8 kernels dispatch on (onnxruntime's MLAS, XNNPACK, ggml):
# two CPUs with the same model name (a VM says "Intel Xeon Processor") can differ here, and so do the
# figures. x86 names are /proc/cpuinfo's "flags", ARM's its "Features" (asimddp = dot product).
SIMD_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                 "amx_int8", "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Model", "Hardware"):  # x86 / Raspberry Pi / older ARM kernels
        for line in text.splitlines():
            if line.startswith(key) and ":" in line:
                return line.split(":", 1)[1].strip()
    # ARM kernels often give only "CPU part": name the cores from it (0xd0b = Cortex-A76).
    parts = {"0xd03": "Cortex-A53", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd41": "Cortex-A78",
             "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd4d": "Cortex-A715"}
    for line in text.splitlines():
        if line.startswith("CPU part"):
            return parts.get(line.split(":", 1)[1].strip(), line.split(":", 1)[1].strip())
    return platform.machine()


def simd_features(cpuinfo: str) -> list[str]:
    """The SIMD_FEATURES the first CPU in a /proc/cpuinfo text reports, in SIMD_FEATURES' order."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return [f for f in SIMD_FEATURES if f in present]
    return []


def _simd() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return simd_features(f.read())
    except OSError:  # not Linux: the field is left out rather than guessed
        return []


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def _temperature_c() -> float | None:
    try:
        with open("/sys/class/thermal/thermal_zone0/temp") as f:
            return int(f.read().strip()) / 1000
    except (OSError, ValueError):
        return None


def _throttled() -> str | None:
    """`vcgencmd get_throttled` on a Raspberry Pi (0x0 = never throttled or under-volted since boot)."""
    if not shutil.which("vcgencmd"):
        return None
    try:
        out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().removeprefix("throttled=") or None


def _free_disk_mb(path: str) -> float | None:
    try:
        return round(shutil.disk_usage(path).free / 10**6, 1)  # MB, as slm_export.units (stdlib only here)
    except OSError:
        return None


def describe(cache_dir: str | None = None) -> dict:
    versions = {}
    for pkg in RUNTIME_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    info = {"cpu": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
            "memory_gb": _memory_gb(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "hostname": platform.node(), "runtimes": versions}
    for key, value in (("simd", _simd() or None), ("temperature_c", _temperature_c()), ("throttled", _throttled()),
                       ("free_disk_mb", _free_disk_mb(cache_dir) if cache_dir else None)):
        if value is not None:
            info[key] = value
    return info


if __name__ == "__main__":
    print(json.dumps(describe(sys.argv[1] if len(sys.argv) > 1 else None)))
