"""A weight still in its checkpoint: read as float32 each time it is used, never kept.

A `Decoder` built from a safetensors checkpoint (slm_export/checkpoint.py) holds `Stored` weights
instead of arrays, so an export holds float32 copies only of what it works on at that moment (a
weight being quantized, a layer being calibrated): never the whole model. Code that needs the numbers
calls `np.asarray(w)` (or `materialize`); `.shape`, `.dtype`, `.nbytes` cost nothing. Exporters that
read weights only through `np.asarray` and hold no float copy of them say so (`Exporter.streams(spec)`);
for the others the pipeline materializes the decoder once (the memory of an eager load).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class Stored:
    """A float32 matrix read on demand (`read()` returns a fresh array each time; `read_rows(a, b)`
    only rows a..b of it, when the source can, e.g. a checkpoint's tensor)."""

    def __init__(self, read: Callable[[], np.ndarray], shape: tuple[int, ...], what: str,
                 read_rows: Callable[[int, int], np.ndarray] | None = None):
        self._read, self.shape, self.what = read, tuple(int(n) for n in shape), what
        self._read_rows = read_rows

    dtype = np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    def __len__(self) -> int:
        return self.shape[0]

    def read(self) -> np.ndarray:
        a = self._read()
        if a.shape != self.shape:  # a checkpoint that changed under us, or a reader bug: never a silent reshape
            raise ValueError(f"{self.what}: read {a.shape}, expected {self.shape}")
        return a

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self._read_rows(start, stop) if self._read_rows else self.read()[start:stop]

    def take(self, index) -> np.ndarray:
        """Rows `index` (ints, any order or repeats) without reading the others, where the source can."""
        idx = np.asarray(index, dtype=np.int64)
        if self._read_rows is None:
            return self.read()[idx]
        wanted = np.unique(idx)
        found = {int(i): self._read_rows(int(i), int(i) + 1)[0] for i in wanted}
        return np.stack([found[int(i)] for i in idx.reshape(-1)]).reshape(*idx.shape, *self.shape[1:])

    def __array__(self, dtype=None, copy=None):
        a = self.read()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, index):
        return self.read()[index]

    @property
    def T(self) -> np.ndarray:  # noqa: N802 - numpy's name
        return self.read().T

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return self.read().astype(dtype, copy=False)

    def copy(self) -> np.ndarray:
        return self.read()

    def __repr__(self) -> str:
        return f"Stored({self.what}, shape={self.shape})"


def stacked(parts: list) -> Stored:
    """Several weights stacked along their rows (q|k|v), each read when the stack is."""
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    stack = Stored(lambda: np.concatenate([np.asarray(p) for p in parts]), shape, "+".join(getattr(p, "what", "?") for p in parts))
    stack.parts = list(parts)
    return stack


def rows(weight: Stored, start: int, stop: int) -> Stored:
    """Rows [start, stop) of a stored weight (a part of Phi-3's fused qkv_proj)."""
    return Stored(lambda: np.ascontiguousarray(weight.read()[start:stop]), (stop - start, *weight.shape[1:]),
                  f"{weight.what}[{start}:{stop}]")


def mapped(weight, fn: Callable[[np.ndarray, int], np.ndarray], what: str):
    """`weight` changed by `fn(rows, start)` (rows start.. of it, as float32; returns the changed rows,
    leaving its argument as it was). An in-memory array is changed now; a `Stored` one when it is read, rows and
    stacked parts alike (so a rescaled checkpoint weight streams as the original did)."""
    if not is_stored(weight):
        return fn(np.asarray(weight), 0)
    if hasattr(weight, "parts"):
        starts = np.cumsum([0] + [p.shape[0] for p in weight.parts]).tolist()
        return stacked([mapped(p, lambda a, r, s0=s0: fn(a, r + s0), what) for p, s0 in zip(weight.parts, starts)])
    return Stored(lambda: fn(weight.read(), 0), weight.shape, f"{weight.what} {what}",
                  read_rows=lambda a, b: fn(weight.read_rows(a, b), a))


def materialize(a):
    """An in-memory array for `a` (a `Stored` weight read once; anything else as it is)."""
    return a.read() if isinstance(a, Stored) else a


def is_stored(a) -> bool:
    return isinstance(a, Stored)
