"""Device profiles: one TOML file per device (fields in profiles/README.md).

Built-in profiles live beside this module; users add or override one by dropping NAME.toml in
~/.config/slm-export/devices/ (or $SLM_EXPORT_CONFIG/devices/). `detect = true` (`local`, this machine)
fills the hardware fields from this machine, with memory bandwidth measured once and cached.
"""
from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import SlmExportError
from ..staging import user_cache_dir as cache_dir
from ..units import MB, RAM_GB

BUILTIN_DIR = Path(__file__).parent / "profiles"
HARDWARE = ("big_cores", "big_core_ghz", "fp32_flops_per_cycle", "int8_ops_per_cycle", "memory_gb",
            "peak_bandwidth_gb_s", "sustained_bandwidth_gb_s")


def user_dir() -> Path:
    base = os.environ.get("SLM_EXPORT_CONFIG") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "slm-export")
    return Path(base) / "devices"


@dataclass
class Profile:
    name: str
    path: Path
    description: str = ""
    cpu: str = ""
    big_cores: int = 0
    big_core_ghz: float = 0.0
    fp32_flops_per_cycle: int = 0
    int8_ops_per_cycle: int = 0
    memory_gb: float = 0.0
    app_memory_gb: float | None = None
    app_memory_fraction: float | None = None
    peak_bandwidth_gb_s: float = 0.0
    sustained_bandwidth_gb_s: float = 0.0
    formats: list[str] = field(default_factory=list)
    qemu_cpu: str | None = None
    detect: bool = False
    extends: str | None = None
    address: str | None = None
    identity: str | None = None
    known_hosts: str | None = None
    remote_python: str | None = None
    remote_dir: str | None = None
    notes: dict = field(default_factory=dict)  # how detected figures were obtained

    @property
    def app_budget_mb(self) -> float:
        gb = self.app_memory_gb if self.app_memory_gb is not None else self.memory_gb * (self.app_memory_fraction or 1.0)
        return gb * RAM_GB / MB

    def compute_gops(self, int8: bool) -> float:
        """Peak arithmetic rate of the big cores, in billions of ops per second."""
        per_cycle = self.int8_ops_per_cycle if int8 and self.int8_ops_per_cycle else self.fp32_flops_per_cycle
        return self.big_cores * self.big_core_ghz * per_cycle

    def connect_options(self) -> dict:
        pairs = (("identity", self.identity), ("known_hosts", self.known_hosts),
                 ("remote_python", self.remote_python), ("remote_dir", self.remote_dir))
        return {k: v for k, v in pairs if v}

    def summary(self) -> dict:
        return {"profile": self.name, "cpu": self.cpu, "big_cores": self.big_cores,
                "memory_gb": self.memory_gb, "app_budget_mb": round(self.app_budget_mb),
                "peak_bandwidth_gb_s": self.peak_bandwidth_gb_s,
                "sustained_bandwidth_gb_s": self.sustained_bandwidth_gb_s, **self.notes}


def _files() -> dict[str, Path]:
    found = {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}
    if user_dir().is_dir():
        found.update({p.stem: p for p in sorted(user_dir().glob("*.toml"))})  # a user file overrides a built-in one
    return found


def profile_names() -> list[str]:
    return sorted(_files())


def _read(path: Path) -> dict:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SlmExportError(f"device profile {path} cannot be read: {e}; fix the file or remove it") from None
    known = {f.name for f in fields(Profile)} - {"name", "path", "notes"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SlmExportError(f"device profile {path} has unknown field(s) {', '.join(unknown)}; "
                             f"the fields are: {', '.join(sorted(known))}")
    return data


def load_profile(name: str, _seen: tuple = ()) -> Profile:
    files = _files()
    if name not in files:
        raise SlmExportError(f"unknown device profile '{name}'; choose one of: {', '.join(sorted(files))} "
                             f"(or add {user_dir()}/{name}.toml)")
    if name in _seen:
        raise SlmExportError(f"device profile '{name}' extends itself ({' -> '.join(_seen + (name,))})")
    data = _read(files[name])
    base = {}
    if data.get("extends"):
        parent = load_profile(data["extends"], _seen + (name,))
        base = {f.name: getattr(parent, f.name) for f in fields(Profile) if f.name not in ("name", "path", "extends")}
    profile = Profile(name=name, path=files[name], **{**base, **data})
    if profile.detect:
        detect_this_machine(profile)
    missing = [f for f in HARDWARE if not getattr(profile, f)]
    if missing:
        raise SlmExportError(f"device profile {profile.path} is missing {', '.join(missing)}; see "
                             f"{BUILTIN_DIR / 'README.md'} for the fields")
    return profile


def _cpuinfo() -> tuple[dict, set]:
    first, flags = {}, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags":
                flags = set(value.split())
            first.setdefault(key, value.strip())
    except OSError:
        pass
    return first, flags


def measure_bandwidth_gb_s(size_mb: int = 512, rounds: int = 5) -> float:
    """Read bandwidth: every core sums its share of a buffer larger than any cache, best of `rounds`.

    Reads, like a decode step reading weights, from all cores at once (numpy's sum releases the GIL):
    a single-threaded copy measured ~20% less here and float32 decoding then beat its own roofline.
    """
    import threading

    import numpy as np

    buffer = np.ones(size_mb * MB // 8)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parts = np.array_split(buffer, cores)
    best = float("inf")
    for _ in range(rounds):
        threads = [threading.Thread(target=part.sum) for part in parts]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        best = min(best, time.perf_counter() - t)
    return buffer.nbytes / best / 1e9


def detect_this_machine(profile: Profile) -> None:
    from .probe import describe

    info, (cpuinfo, flags) = describe(), _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # SIMD per core: AVX-512 = 16 fp32 lanes x 2 FMA pipes x 2; AVX2+FMA = 8 x 2 x 2; VNNI does 4 int8 MACs per lane.
    fp32 = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    int8 = 256 if "avx512_vnni" in flags else 128 if "avx_vnni" in flags else 64 if "avx2" in flags else 0
    # the SIMD widths in the key too: a VM's CPU name can be as bare as "AMD EPYC" on different hosts
    key = f"{info['cpu']}|{cores}|{fp32}|{int8}|read"
    cache = cache_dir() / "bandwidth.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = round(measure_bandwidth_gb_s(), 2)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    bandwidth = known[key]
    for name, value in (("cpu", f"{cores}x {info['cpu']}"), ("big_cores", cores),
                        ("big_core_ghz", round(float(cpuinfo.get("cpu MHz") or 2000) / 1000, 2)),
                        ("fp32_flops_per_cycle", fp32), ("int8_ops_per_cycle", int8),
                        ("memory_gb", info["memory_gb"] or 0), ("peak_bandwidth_gb_s", bandwidth),
                        ("sustained_bandwidth_gb_s", bandwidth)):
        if not getattr(profile, name):  # a user file may pin any of them
            setattr(profile, name, value)
    profile.notes["bandwidth_source"] = f"measured: {cores} threads reading 512 MB, best of 5, cached in {cache}"
