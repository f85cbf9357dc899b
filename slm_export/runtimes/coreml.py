"""Core ML runner: the .mlpackage through coremltools' `MLModel` with its state (macOS 15+ only).

The KV cache is the model's state: `reset` makes a fresh one with `make_state()`, and each call
appends 1..prefill_chunk tokens; the mask input's last dimension says how many tokens the cache holds
after the call (the feature names are the manifest's). Off macOS, Core ML cannot execute at all: the
runner says so in one sentence (RuntimeUnavailable, exit code 4), and `verify` checks the package
and the converted PyTorch program instead.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import RuntimeUnavailable, SlmExportError
from . import RUNTIMES
from .base import Runner

NEEDS_MACOS = ("executing Core ML needs macOS 15 or later (this machine runs {system}): run bench and generate "
               "on a Mac; here `slm-export verify` checks the package's spec, its weights read back, and the "
               "converted PyTorch program instead")


@RUNTIMES.register("coreml")
class CoreMLRunner(Runner):
    packages = ("coremltools",)
    imports_torch = True  # coremltools imports torch whenever it is installed

    @classmethod
    def check_available(cls) -> None:
        if platform.system() != "Darwin":
            raise RuntimeUnavailable(NEEDS_MACOS.format(system=platform.system() or "an unknown OS"))
        major = int((platform.mac_ver()[0] or "0").split(".")[0])
        if major < 15:
            raise RuntimeUnavailable(f"this package needs macOS 15 or later for Core ML state; this Mac runs "
                                     f"{platform.mac_ver()[0]}")

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        self.check_available()
        import coremltools as ct

        units = manifest.get("compute_units", "CPU_AND_GPU")
        try:
            self.model = ct.models.MLModel(str(self.folder / manifest["model_file"]),
                                           compute_units=getattr(ct.ComputeUnit, units))
        except Exception as e:  # Core ML's own message (unsupported OS, corrupt package) names the cause
            raise SlmExportError(f"Core ML could not load {self.folder / manifest['model_file']}: {e}") from None
        self.chunk = int(manifest["io"]["prefill_chunk"])
        main = manifest["io"]["functions"]["main"]
        (self.ids_name, self.mask_name), (self.out_name,) = list(main["inputs"]), list(main["outputs"])
        self.capacity = self.max_context  # the state is sized at export
        self.state = None

    @staticmethod
    def import_sdk() -> None:
        import coremltools  # noqa: F401

    def reset(self, capacity: int) -> None:
        self.state = self.model.make_state()
        self.position = 0

    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.check_room(len(token_ids))
        if self.state is None:
            self.reset(self.max_context)
        rows = []
        for i in range(0, len(token_ids), self.chunk):
            part = np.asarray(token_ids[i:i + self.chunk], dtype=np.int32)[None, :]
            mask = np.zeros((1, 1, 1, self.position + part.shape[1]), dtype=np.float16)  # only its shape is read
            out = self.model.predict({self.ids_name: part, self.mask_name: mask}, state=self.state)[self.out_name][0]
            self.position += part.shape[1]
            rows.append(out if all_logits else out[-1:])
        return np.concatenate(rows).astype(np.float32) if all_logits else rows[-1].astype(np.float32)
