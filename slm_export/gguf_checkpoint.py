"""Streaming reader of a GGUF file: one tensor (or a few of its rows) dequantized at a time, never the
whole model in float32.

`open_gguf(path)` parses the file with the `gguf` package's memory-mapped `GGUFReader` (metadata and
tensor table only) and checks every tensor lies inside the file in a type `gguf.quants.dequantize`
reads. `bind(model)` then names its tensors as the model's PyTorch parameters, with transformers' own
GGUF name map and tensor processor (`transformers.modeling_gguf_pytorch_utils`: what
`from_pretrained(gguf_file=...)` applies), and checks their shapes against the model built from the
file's metadata. `read(name, rows)` reads exactly those rows' blocks from the file (plain reads, not the
map: mapped pages would stay in the process's resident memory) and dequantizes them;
a tensor the processor transforms as a whole (llama's q/k rows, permuted back from llama.cpp's rotary
layout) is dequantized whole and then sliced. The same interface as `checkpoint.Checkpoint`, so the
rest of the export does not know which file it reads. Every refusal is one `SlmExportError` line
naming the file and the tensor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import TensorTable
from .errors import SlmExportError

REDOWNLOAD = "download or convert it again"

# Rows are dequantized this many float32 bytes at a time (gguf's dequantize holds several temporaries
# of the size it is given).
DEQUANTIZE_BYTES = 8 * 1024 * 1024

# The GGUF architectures read tensor by tensor, and for each the tensors (by a part of their GGUF name)
# that transformers' tensor processor for it transforms as a whole (LlamaTensorProcessor: attn_q and
# attn_k rows un-permuted per head); every other tensor's processing is per element (or none), so it
# runs on the rows read (tests/test_gguf_streaming.py holds every family to transformers' own load).
# Another architecture loads whole.
STREAMED = {"llama": (".attn_q.", ".attn_k."), "qwen2": (), "phi3": (), "gemma2": ()}


class NotStreamable(SlmExportError):
    """A GGUF this reader does not stream (another architecture, a big-endian file): load it whole."""


class _Entry:
    """One tensor: its GGML type, its shape in PyTorch order, where its data starts, and its stored rows
    (the first axis of a matrix; a vector is one row) with the bytes of each."""
    __slots__ = ("gguf_name", "qtype", "shape", "start", "rows", "row_bytes")

    def __init__(self, gguf_name: str, qtype, shape: tuple[int, ...], start: int, nbytes: int):
        self.gguf_name, self.qtype, self.shape, self.start = gguf_name, qtype, shape, start
        self.rows = shape[0] if len(shape) > 1 else 1
        self.row_bytes = nbytes // self.rows


class GgufCheckpoint(TensorTable):
    """The tensors of a GGUF file by PyTorch parameter name (after `bind`); nothing read until `read`."""

    def __init__(self, file: Path, architecture: str, tensors: dict[str, _Entry]):
        self.file = file
        self.folder = file  # what a message about the whole checkpoint names (as Checkpoint.folder)
        self.files = [file]
        self.architecture = architecture
        self._tensors = tensors  # by GGUF name
        self._entries: dict[str, _Entry] = {}  # by PyTorch name, once bound
        self._processor = None

    def bind(self, model) -> None:
        """Name the tensors as `model`'s parameters (a skeleton built from this file's config) the way
        transformers' GGUF loader does, and refuse a tensor whose shape contradicts the model's."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        from .checkpoint import expected_shapes
        from .loading import gguf_parsed_once

        self._processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=model.config.to_dict())
        with gguf_parsed_once():  # its name map built once, not once per submodule
            to_hf = get_gguf_hf_weights_map(model, self._processor)
        self._entries = {to_hf[g]: e for g, e in self._tensors.items() if g in to_hf}
        expected, optional = expected_shapes(model.config)
        for name, shape in expected.items():
            e = self._entries.get(name)
            if e is None and name not in optional:
                gguf_name = next((g for g, h in to_hf.items() if h == name), "?")
                raise SlmExportError(f"{self.file}: tensor {gguf_name!r} ({name}) is missing, though the file's "
                                     f"metadata describes a model that has it; the GGUF file is incomplete: {REDOWNLOAD}")
            if e is not None and e.shape != tuple(shape):
                raise SlmExportError(f"{self.file}: tensor {e.gguf_name!r} ({name}) has shape {list(e.shape)} but the "
                                     f"file's metadata implies {list(shape)}; the GGUF file contradicts itself: "
                                     f"{REDOWNLOAD}")

    def dtype(self, name) -> str:
        """Its GGML type as the file stores it (Q4_1, Q8_0, F32, ...)."""
        return self._entry(name).qtype.name

    def file_of(self, name) -> Path:
        self._entry(name)
        return self.file

    @property
    def nbytes(self) -> int:
        return sum(e.row_bytes * e.rows for e in self._entries.values())

    def read(self, name, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or its rows [start, stop) along the first axis) as a fresh C-contiguous float32
        array, as transformers' GGUF loader makes it: dequantized, then processed."""
        e = self._entry(name)
        n = e.shape[0]
        start, stop = rows if rows is not None else (0, n)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows {start}:{stop} of {name!r} with shape {e.shape}")
        if (start, stop) != (0, n) and (e.rows == 1 or any(p in e.gguf_name for p in STREAMED[self.architecture])):
            return self.read(name)[start:stop].copy()  # a vector, or a tensor processed as a whole
        weights = self._dequantized(e, start, stop) if e.rows > 1 else self._dequantized(e, 0, 1)
        out = self._processor.process(weights=weights, name=e.gguf_name).weights
        return np.require(out, dtype=np.float32, requirements=["C", "W"])

    def _dequantized(self, e: _Entry, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of `e` (its stored rows: the whole of a vector is its one row), dequantized."""
        from gguf.quants import dequantize

        raw = np.empty((stop - start) * e.row_bytes, dtype=np.uint8)
        with open(self.file, "rb", buffering=0) as f:
            f.seek(e.start + start * e.row_bytes)
            done, view = 0, memoryview(raw)
            while done < len(raw):
                got = f.readinto(view[done:])
                if not got:
                    raise SlmExportError(f"{self.file}: truncated while reading tensor {e.gguf_name!r} (the file "
                                         f"shrank since it was opened); {REDOWNLOAD}")
                done += got
        shape = (stop - start, *e.shape[1:]) if e.rows > 1 else e.shape
        if e.rows == 1:
            return dequantize(raw.reshape(_byte_shape(shape, e.qtype)), e.qtype).reshape(shape)
        # gguf's dequantize makes several temporaries of its input's size: a few rows at a time
        out = np.empty(shape, dtype=np.float32)
        step = max(1, DEQUANTIZE_BYTES // max(1, 4 * int(np.prod(shape[1:]))))
        for a in range(0, len(out), step):
            b = min(a + step, len(out))
            part = raw[a * e.row_bytes:b * e.row_bytes].reshape(_byte_shape((b - a, *shape[1:]), e.qtype))
            out[a:b] = dequantize(part, e.qtype).reshape((b - a, *shape[1:]))
        return out

    def _entry(self, name) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.file}: no tensor for {name!r} in the GGUF file") from None


def architecture_of(path: Path) -> str | None:
    """The file's `general.architecture` from its metadata alone (milliseconds), or None if unreadable."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata

        return read_gguf_metadata(str(path))[0]["general.architecture"]
    except Exception:  # noqa: BLE001 - an unreadable file is for loading to report
        return None


def streams(path: Path) -> bool:
    """Whether `open_gguf` reads this GGUF file tensor by tensor (else it loads whole)."""
    return architecture_of(path) in STREAMED


def open_gguf(path: Path) -> GgufCheckpoint:
    """The GGUF file's tensor table, read and checked (nothing dequantized). NotStreamable for a file
    whose architecture this reader does not stream; a truncated or corrupt file is refused."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)  # within loading.gguf_parsed_once, the parse transformers then reuses
    except Exception as e:  # noqa: BLE001 - a file gguf cannot parse
        from .memory import is_out_of_memory

        if is_out_of_memory(e):  # not a bad file: the export's (or the CLI's) memory message says it
            raise
        raise SlmExportError(_unreadable(path, e)) from None
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture not in STREAMED or reader.byte_order != "I":
        raise NotStreamable(f"{path}: GGUF architecture {architecture!r} is loaded whole")
    tensors = {t.name: _Entry(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                              int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    _check_types(path, tensors)
    return GgufCheckpoint(path, architecture, tensors)


def _byte_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    from gguf.quants import quant_shape_to_byte_shape

    return quant_shape_to_byte_shape(shape, qtype)


def _check_types(path: Path, tensors: dict[str, _Entry]) -> None:
    """Refuse a tensor type `gguf.quants.dequantize` cannot read (tried on one zero row of it)."""
    from gguf.quants import dequantize

    tried = set()
    for e in tensors.values():
        if e.qtype in tried:
            continue
        tried.add(e.qtype)
        try:
            dequantize(np.zeros((1, *_byte_shape(e.shape[-1:], e.qtype)), dtype=np.uint8), e.qtype)
        except (NotImplementedError, ValueError) as err:
            raise SlmExportError(f"{path}: tensor {e.gguf_name!r} is {e.qtype.name}, which the gguf package cannot "
                                 f"dequantize ({_one_line(err)}); convert the model to another GGUF type "
                                 f"(e.g. Q8_0 or Q4_K_M)") from None


def _unreadable(path: Path, error: Exception) -> str:
    """The line for a file GGUFReader refused: the tensor whose data the file cuts short, when it is that."""
    cut = _truncated_tensor(path)
    if cut is not None:
        name, end, size = cut
        return (f"could not load GGUF file {path}: truncated (tensor {name!r} ends at byte {end} but the file has "
                f"{size}); {REDOWNLOAD}")
    return f"could not load GGUF file {path}: truncated or corrupt ({_one_line(error)}); {REDOWNLOAD}"


def _truncated_tensor(path: Path) -> tuple[str, int, int] | None:
    """(name, end byte, file size) of the first tensor whose data lies past the end of the file, found
    by parsing the tensor table as GGUFReader does but stopping at the bounds; None if it is not that."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.gguf_reader import GGUFReader

    class Cut(Exception):
        pass

    class Bounds(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_dtype[0])]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * size // block
                if end > len(self.data):
                    raise Cut(str(bytes(name), encoding="utf-8"), end, len(self.data))

    try:
        Bounds(path)
    except Cut as cut:
        return cut.args
    except Exception:  # noqa: BLE001 - broken before its tensor data: the caller's generic line
        return None
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
