"""Devices a benchmark runs on. A device spec names one:

    local                         this machine (default)
    ssh://user@host[:port]        a board over SSH (Raspberry Pi 5 ...): upload, run the same runner, JSON back
    sim:PROFILE                   the device simulated here: for ARM profiles its real aarch64 runtime under QEMU
                                  (emulation.py; no timings), within the profile's threads and app memory
    limits:PROFILE                this machine's runtime under the profile's threads and app memory (its timings)
    adb[:SERIAL], simctl[:UDID]   an Android phone over adb, an iOS simulator over xcrun simctl
    NAME                          a profile file with an `address` (e.g. ~/.config/slm-export/devices/mypi.toml)

Each kind is one module registered here by its scheme. Every device has `name`, `profile` (a
`Profile` or None), `simulated`, `describe() -> dict` and `measure(folder, prompts=..., ...) -> rows`,
where rows are the dicts `slm_export.runtimes.measure` prints; local, limits and sim devices also have
`replay(folder, steps) -> arrays` (verify's calls, see runtimes/replay.py). `measure` raises RuntimeError for a
failed run (bench keeps it as a row with its error) and SlmExportError for bad input.
"""
from __future__ import annotations

from ..errors import SlmExportError
from ..registry import Registry

DEVICES: Registry = Registry("device kind")


def open_device(spec: str, **options):
    """The device a spec names; options (identity, accept_new_host_key, provision, ...) go to its kind."""
    from .profiles import load_profile, profile_names

    spec = (spec or "local").strip()
    if spec == "local":
        return DEVICES.get("local")(**options)
    if "://" in spec:
        scheme = spec.split("://", 1)[0]
        return DEVICES.get(scheme)(spec, **options)
    if ":" in spec or spec in ("adb", "simctl"):
        scheme, _, rest = spec.partition(":")
        return DEVICES.get(scheme)(rest, **options)
    if spec not in profile_names():
        raise SlmExportError(
            f"unknown device '{spec}'; use local, ssh://user@host[:port], sim:PROFILE, limits:PROFILE, adb[:SERIAL], simctl[:UDID] "
            f"or a profile with an address (profiles: {', '.join(profile_names())})")
    profile = load_profile(spec)
    if not profile.address:
        raise SlmExportError(
            f"profile '{spec}' describes a device but has no `address` to reach it; simulate it here with "
            f"--device sim:{spec}, or add address = \"ssh://user@host\" to {profile.path}")
    merged = {**profile.connect_options(), **{k: v for k, v in options.items() if v is not None}}
    return open_device(profile.address, profile=profile, **merged)


def _register_builtin_devices() -> None:
    from . import local, mobile, sim, ssh  # noqa: F401  (each imports its SDK/tool lazily)


_register_builtin_devices()
