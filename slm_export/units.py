"""One unit for sizes and memory, everywhere: MB = 10^6 bytes, GB = 10^9 bytes (README, Units).

Files, weights, KV caches, peak RSS, app budgets and export estimates all print in these, so a
memory figure divides by a file size without conversion. Two inputs come in other units: the kernel
reports memory in KiB (/proc, ru_maxrss, df -k), and a device's RAM is sold in binary gigabytes
("8 GB" of RAM holds 8 GiB), which is how a profile's `memory_gb` and `app_memory_gb` are read.
"""
from __future__ import annotations

MB = 10**6
GB = 10**9
KIB = 1024  # what /proc/*/status, ru_maxrss and `df -k` count in
RAM_GB = 2**30  # bytes in one "GB" of a device's RAM as sold


def mb(n_bytes: float) -> float:
    return n_bytes / MB


def kib_to_mb(kib: float) -> float:
    return kib * KIB / MB


def gb_text(n_bytes: float) -> str:
    return f"{n_bytes / GB:.1f} GB"
