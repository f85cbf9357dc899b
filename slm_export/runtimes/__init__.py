"""Runtimes, registered by name: each executes one target's files behind the `Runner` interface.

This package must never import torch itself: benchmarks measure the runner's memory in a process
that holds only the runtime, as an app would. (ExecuTorch's Python bindings link libtorch, so the
processes of the runtimes that use them, executorch-pybind and ExecuTorch's LLM runner, hold torch;
their results keep the baseline RSS beside the peak.)
"""
from __future__ import annotations

from ..registry import Registry

RUNTIMES: Registry = Registry("runtime")  # the manifest's `runtime`: slm-export's runner for the target
# An app's own runtime that opens an export as it is (`bench --runtime stock`): runtimes/base.StockRunner.
STOCK_RUNTIMES: Registry = Registry("stock runtime")


def _register_builtin_runtimes() -> None:
    from . import coreml, executorch, onnx  # noqa: F401  (register "coreml", "executorch", "onnxruntime"; SDKs load lazily)
    from . import et_llm, genai  # noqa: F401  (register "executorch-llm-runner", "onnxruntime-genai")


_register_builtin_runtimes()


def open_folder_runner(folder, threads: int | None = None):
    """The runner of an artifact folder whose files the caller has checked, in this process (which
    must be one made to hold the runtime alone: measure, replay, child)."""
    from pathlib import Path

    from ..manifest import read

    return open_runner(Path(folder), read(Path(folder)), threads, in_process=True)


def open_runner(folder, manifest: dict, threads: int | None = None, in_process: bool = False):
    """The runner for `manifest`'s runtime; in a child process if the runtime needs its own
    (`in_process=True` only from a process made to hold the runtime alone: measure, replay, child)."""
    runtime = RUNTIMES.get(manifest["runtime"])
    if runtime.needs_own_process and not in_process:
        from .child import ChildRunner

        return ChildRunner(folder, manifest, threads, runtime)
    return runtime(folder, manifest, threads)
