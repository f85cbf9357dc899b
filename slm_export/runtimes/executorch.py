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

FORWARD, LOGITS = "forward", "logits"  # exporters/executorch/contract.py


class _PteRunner(Runner):
    """Chunked prefill and one-token decode over the program's two methods: forward(tokens [1, n],
    position) -> the last token's logits, and logits(rows) -> rows of that call's tokens."""

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        self.chunk = int(manifest["io"]["prefill_chunk"])
        self.capacity = self.max_context  # fixed at export
        # Made before the logits method (slm-export's issue #31): forward(tokens, input_pos, logit_rows)
        self._rows_input = "logit_rows" in manifest["io"]["methods"][FORWARD]["inputs"]

    def _call(self, method: str, tokens: np.ndarray | None, rows: np.ndarray | None) -> np.ndarray:
        """`method` with inputs (tokens, self.position) if tokens is given, then rows if given."""
        raise NotImplementedError

    def _step(self, tokens: np.ndarray, all_rows: bool) -> np.ndarray:
        """Append `tokens` [1, n] at self.position: every row's logits, or the last one's."""
        n = tokens.shape[1]
        if self._rows_input:
            return self._call(FORWARD, tokens, np.arange(n) if all_rows else np.array([n - 1]))
        last = self._call(FORWARD, tokens, None)
        return self._call(LOGITS, None, np.arange(n)) if all_rows else last

    def reset(self, capacity: int) -> None:
        self.position = 0

    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.check_room(len(token_ids))
        pieces = []
        for i in range(0, len(token_ids), self.chunk):
            part = np.asarray(token_ids[i:i + self.chunk], dtype=np.int64).reshape(1, -1)
            logits = self._step(part, all_logits)
            if all_logits or i + self.chunk >= len(token_ids):  # a middle chunk only fills the cache
                pieces.append(logits)
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

        self._program = NativeProgram(self.folder / manifest["model_file"], self.threads,
                                      int(manifest["model"]["vocab_size"]), FORWARD)

    @staticmethod
    def import_sdk() -> None:
        from .native import library_path

        library_path()  # built (once) and found before the baseline reading, not timed as load

    def _call(self, method, tokens, rows):
        return self._program.call(method, tokens, self.position, rows, None if rows is not None else 1)


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
        # The bindings give every method of a program one set of planned buffers: the methods share
        # the KV cache, as the program was exported for.
        self._program = Runtime.get().load_program(self.folder / manifest["model_file"])
        self._program.load_method(FORWARD)
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

    def _call(self, method, tokens, rows):
        torch = self._torch
        inputs = []
        if tokens is not None:
            self._pos[0] = self.position
            inputs += [torch.from_numpy(tokens), self._pos]
        if rows is not None:
            inputs.append(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)))
        out = self._program.load_method(method).execute(inputs)[0]
        return out.numpy().copy()
