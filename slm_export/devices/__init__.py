"""Devices a benchmark runs on, registered by name. Starts with `local` (this machine).

A device runs `slm_export.runtimes.measure` where the model will live and returns its rows;
remote (SSH) and simulated devices plug in here as one module each.
"""
from __future__ import annotations

from ..registry import Registry

DEVICES: Registry = Registry("device")


def _register_builtin_devices() -> None:
    from . import local  # noqa: F401


_register_builtin_devices()
