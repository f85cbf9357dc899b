"""ExecuTorch runners for .pte files: the torch-free C++ runtime (default) and the Python bindings.

`executorch` runs the program through slm-export's small C++ runner (runtimes/native) on the
wheel's own libexecutorch, XNNPACK delegate and kernels: no libtorch in the process, the .pte
mmapped, the KV cache paged in as it fills. That is what an app pays, so it is what `bench` and
`verify` measure. `executorch-pybind` runs it through ExecuTorch's Python bindings, which load
libtorch (356 MB before any model here); it executes what the C++ runner does not implement
(an int8 KV cache: ExecuTorch's custom_quantized_sdpa kernel ships only linked to libtorch).

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

METHOD = "forward"


class _PteRunner(Runner):
    """Chunked prefill and one-token decode over `_run(tokens [1, n], position, rows [k]) -> [k, vocab]`."""

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        self.chunk = int(manifest["io"]["prefill_chunk"])
        self.capacity = self.max_context  # fixed at export
        self._row0 = np.zeros(1, dtype=np.int64)

    def _run(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def reset(self, capacity: int) -> None:
        self.position = 0

    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.check_room(len(token_ids))
        pieces = []
        for i in range(0, len(token_ids), self.chunk):
            part = np.asarray(token_ids[i:i + self.chunk], dtype=np.int64).reshape(1, -1)
            last = i + self.chunk >= len(token_ids)
            if all_logits:
                pieces.append(self._run(part, np.arange(part.shape[1], dtype=np.int64)))
            elif last:
                pieces.append(self._run(part, np.array([part.shape[1] - 1], dtype=np.int64)))
            else:  # a middle chunk only fills the cache: one row of logits is the cheapest to ask for
                self._run(part, self._row0)
            self.position += part.shape[1]
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


@RUNTIMES.register("executorch")
class ExecuTorchRunner(_PteRunner):
    packages = ("executorch",)
    # Its llama:: kernels and ExecuTorch's own (loaded by exporting, or by the Python bindings)
    # share one operator registry, which aborts the process on a duplicate name.
    needs_own_process = True
    pip_no_deps = True  # the wheel's C++ runtime is all it needs; executorch declares torch (gigabytes on ARM)

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        from .native import NativeProgram

        self._program = NativeProgram(self.folder / manifest["model_file"], METHOD, self.threads,
                                      int(manifest["model"]["vocab_size"]))

    @staticmethod
    def import_sdk() -> None:
        from .native import library_path

        library_path()  # built (once) and found before the baseline reading, not timed as load

    def _run(self, tokens, rows):
        return self._program.forward(tokens, self.position, rows)


@RUNTIMES.register("executorch-pybind")
class PybindExecuTorchRunner(_PteRunner):
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
        self._method = program.load_method(METHOD)
        self._pos = torch.zeros(1, dtype=torch.long)

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

    def _run(self, tokens, rows):
        torch = self._torch
        self._pos[0] = self.position
        out = self._method.execute([torch.from_numpy(tokens), self._pos, torch.from_numpy(rows)])[0]
        return out.numpy().copy()
