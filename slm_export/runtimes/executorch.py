"""ExecuTorch runner: the .pte through the ExecuTorch runtime's Python bindings.

The KV cache is inside the program (mutable buffers, sized for max_context at export), so `reset`
only moves the position back to 0: attention reads the cache up to the current position, and
whatever a previous conversation left beyond it is overwritten before it is read.
A prompt longer than the method's chunk limit is fed in chunks, as an app would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import RUNTIMES
from .base import Runner


@RUNTIMES.register("executorch")
class ExecuTorchRunner(Runner):
    packages = ("executorch", "torch")
    imports_torch = True

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        self.import_sdk()
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        self._torch = torch
        portable_lib._unsafe_reset_threadpool(self.threads)
        program = Runtime.get().load_program(self.folder / manifest["model_file"])
        self._method = program.load_method("forward")
        self.chunk = int(manifest["io"]["prefill_chunk"])
        self.capacity = self.max_context  # fixed at export
        self._pos = torch.zeros(1, dtype=torch.long)
        self._one = torch.zeros(1, 1, dtype=torch.long)
        self._row0 = torch.zeros(1, dtype=torch.long)

    @staticmethod
    def import_sdk() -> None:
        from ..errors import SlmExportError
        from ..quiet import quiet_third_party

        quiet_third_party()

        try:
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  llama:: kernels
            import executorch.kernels.quantized  # noqa: F401  quantized embedding kernels
            import executorch.runtime  # noqa: F401
        except ImportError as e:
            raise SlmExportError(
                f"running a .pte needs the executorch package ({e.name} is missing): "
                "pip install executorch==1.5.1 (with torch==2.13.0 installed first)") from None

    def reset(self, capacity: int) -> None:
        self.position = 0

    def _run(self, tokens, rows):
        self._pos[0] = self.position
        return self._method.execute([tokens, self._pos, rows])[0]

    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        torch = self._torch
        self.check_room(len(token_ids))
        if len(token_ids) == 1:
            self._one[0, 0] = token_ids[0]
            logits = self._run(self._one, self._row0).numpy().copy()
            self.position += 1
            return logits
        pieces = []
        for i in range(0, len(token_ids), self.chunk):
            part = token_ids[i:i + self.chunk]
            last = i + self.chunk >= len(token_ids)
            if all_logits or last:
                rows = torch.arange(len(part)) if all_logits else torch.tensor([len(part) - 1])
                pieces.append(self._run(torch.tensor([part], dtype=torch.long), rows).numpy().copy())
            else:  # a middle chunk only fills the cache: one row of logits is the cheapest to ask for
                self._run(torch.tensor([part], dtype=torch.long), self._row0)
            self.position += len(part)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
