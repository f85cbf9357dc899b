"""Streaming reader of Hugging Face safetensors checkpoints: one tensor at a time, never the whole model.

`open_checkpoint(folder)` reads only the headers (a single `model.safetensors`, or the shards named by
`model.safetensors.index.json`) and checks them: every shard present, every indexed tensor in its shard,
every tensor's bytes inside its file and of the size its shape and dtype need. `read(name)` then reads
exactly that tensor's bytes (no mmap of the file) and returns a fresh float32 array, converting BF16 and
F16 exactly. `check_shapes` compares the checkpoint with the shapes its config implies
(`expected_shapes`), so a checkpoint that contradicts its config.json is refused before anything is
written. Every refusal is one `SlmExportError` line naming the file and the tensor.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from slm_export.errors import SlmExportError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# dtypes read() converts to float32, and the little-endian numpy dtype of their stored bytes
SUPPORTED = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
# bytes per element of every safetensors dtype, to check sizes of tensors we may never read
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
            "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
            "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
CHUNK_BYTES = 16 * 1024 * 1024  # BF16/F16 are read and converted this many stored bytes at a time

REDOWNLOAD = "download the checkpoint again"


class NotSafetensors(SlmExportError):
    """The folder holds no safetensors weights (e.g. only pytorch_model.bin): load it another way."""


class _Entry:
    __slots__ = ("file", "dtype", "shape", "start", "length")

    def __init__(self, file: Path, dtype: str, shape: tuple[int, ...], start: int, length: int):
        self.file, self.dtype, self.shape, self.start, self.length = file, dtype, shape, start, length


class TensorTable:
    """What every checkpoint reader answers from its table (`_entries`: name -> entry with a `shape`)
    before reading anything; `_entry(name)` says which names it lacks."""

    _entries: dict

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name) -> tuple[int, ...]:
        return self._entry(name).shape


class Checkpoint(TensorTable):
    """The tensors of a safetensors checkpoint, by name; headers only until `read`."""

    def __init__(self, folder: Path, files: list[Path], entries: dict[str, _Entry]):
        self.folder = folder
        self.files = files
        self._entries = entries

    def dtype(self, name) -> str:
        return self._entry(name).dtype

    def file_of(self, name) -> Path:
        return self._entry(name).file

    @property
    def nbytes(self) -> int:
        return sum(e.length for e in self._entries.values())

    def read(self, name, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or its rows [start, stop) along the first axis) as a fresh C-contiguous float32
        array, read from its file alone."""
        e = self._entry(name)
        _check_supported(name, e)
        start, stop = rows if rows is not None else (0, e.shape[0] if e.shape else 1)
        if e.shape and not 0 <= start <= stop <= e.shape[0]:
            raise ValueError(f"rows {start}:{stop} of {name!r} with shape {e.shape}")
        shape = (stop - start, *e.shape[1:]) if e.shape else ()
        row = int(np.prod(e.shape[1:], dtype=np.int64)) if e.shape else 1
        out = np.empty(shape, dtype=np.float32)
        flat = out.reshape(-1)
        stored = SUPPORTED[e.dtype]
        base = e.start + start * row * stored.itemsize
        with open(e.file, "rb", buffering=0) as f:
            if e.dtype == "F32":
                _read_into(f, e, base, memoryview(flat.view(np.uint8)), name)
                if sys.byteorder == "big":
                    flat.byteswap(inplace=True)
                return out
            per_chunk = max(1, CHUNK_BYTES // stored.itemsize)
            chunk = np.empty(min(per_chunk, flat.size), dtype=stored)
            for first in range(0, flat.size, per_chunk):
                n = min(per_chunk, flat.size - first)
                part = chunk[:n]
                _read_into(f, e, base + first * stored.itemsize, memoryview(part.view(np.uint8)), name)
                if e.dtype == "BF16":  # bf16 is the top half of a float32: shift it there, exactly
                    np.left_shift(part, 16, out=flat[first:first + n].view(np.uint32), dtype=np.uint32)
                else:
                    flat[first:first + n] = part
        return out

    def _entry(self, name) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the checkpoint") from None


def open_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in `folder`, its headers read and checked. NotSafetensors if it holds none."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    single = folder / SINGLE_NAME
    if single.is_file():
        return _single(folder, single)
    if index.is_file():
        return _sharded(folder, index)
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return _single(folder, found[0])
    if found:
        raise SlmExportError(f"{folder}: {len(found)} .safetensors files but no {INDEX_NAME} naming which "
                             f"tensor is in which; add the index from the model's repository")
    raise NotSafetensors(f"{folder}: no .safetensors weights in this folder")


def check_shapes(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]],
                 optional: set[str] = frozenset()) -> None:
    """Refuse a checkpoint whose tensors contradict `expected` (from its config.json): a shape that
    differs, a tensor missing (unless `optional`), a dtype `read` cannot convert. Others are ignored."""
    missing = []
    for name, shape in expected.items():
        if name not in ckpt:
            if name not in optional:
                missing.append(name)
            continue
        e = ckpt._entry(name)
        if e.shape != tuple(shape):
            raise SlmExportError(f"{e.file}: tensor {name!r} has shape {list(e.shape)} but config.json "
                                 f"implies {list(shape)}; the checkpoint does not match its config.json")
        _check_supported(name, e)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SlmExportError(f"{ckpt.folder}: tensor {missing[0]!r}{more} is missing from the checkpoint "
                             f"({', '.join(p.name for p in ckpt.files)}); the checkpoint does not match its "
                             f"config.json or is incomplete: {REDOWNLOAD}")


def expected_shapes(config, trust_remote_code: bool = False) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The parameter shapes a causal LM built from `config` (a transformers config or a config.json
    dict) has, built on the meta device (no memory), and the names a checkpoint may leave out (tied)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        values = dict(config)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    shapes, optional, seen = {}, set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(p.shape)
        if id(p) in seen:  # the same parameter under a second name: saved once
            optional.add(name)
        seen.add(id(p))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "tie_word_embeddings", False) and "lm_head.weight" in shapes:
        optional.add("lm_head.weight")
    return shapes, optional


def _single(folder: Path, file: Path) -> Checkpoint:
    return Checkpoint(folder, [file], _read_header(file))


def _sharded(folder: Path, index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise SlmExportError(f"{index}: not a safetensors index ({_one_line(e)}); {REDOWNLOAD}") from None
    shards: dict[str, dict[str, _Entry]] = {}
    for shard in dict.fromkeys(weight_map.values()):
        path = folder / shard
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise SlmExportError(f"{index}: names shard {shard!r}, not a file name in {folder}; {REDOWNLOAD}")
        if not path.is_file():
            raise SlmExportError(f"{path}: missing, though {index.name} names it as a shard; {REDOWNLOAD}")
        shards[shard] = _read_header(path)
    entries = {}
    for name, shard in weight_map.items():
        held = shards[shard]
        if name not in held:
            raise SlmExportError(f"{folder / shard}: does not hold tensor {name!r}, though {index.name} says "
                                 f"it does; the index and the shards disagree: {REDOWNLOAD}")
        entries[name] = held[name]
    return Checkpoint(folder, [folder / s for s in shards], entries)


def _read_header(file: Path) -> dict[str, _Entry]:
    """The tensors of one .safetensors file, every one checked to lie inside it with the right size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SlmExportError(f"{file}: truncated ({size} bytes, shorter than a safetensors header); "
                                 f"{REDOWNLOAD}")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise SlmExportError(f"{file}: truncated (its header says {n} bytes but the file has {size}); "
                                 f"{REDOWNLOAD}")
        if n > MAX_HEADER:
            raise SlmExportError(f"{file}: not a safetensors file (header of {n} bytes); {REDOWNLOAD}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise SlmExportError(f"{file}: not a safetensors file (bad header: {_one_line(e)}); {REDOWNLOAD}") from None
    data_start = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not (isinstance(dtype, str) and all(type(d) is int and d >= 0 for d in shape)
                    and type(begin) is int and type(end) is int and 0 <= begin <= end):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise SlmExportError(f"{file}: tensor {name!r} has a malformed header entry; {REDOWNLOAD}") from None
        if data_start + end > size:
            raise SlmExportError(f"{file}: truncated (tensor {name!r} ends at byte {data_start + end} but the "
                                 f"file has {size}); {REDOWNLOAD}")
        if dtype in ITEMSIZE and end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise SlmExportError(f"{file}: tensor {name!r} holds {end - begin} bytes but shape {list(shape)} "
                                 f"in {dtype} needs {math.prod(shape) * ITEMSIZE[dtype]}; the file is corrupt: "
                                 f"{REDOWNLOAD}")
        entries[name] = _Entry(file, dtype, shape, data_start + begin, end - begin)
    return entries


def _check_supported(name: str, e: _Entry) -> None:
    if e.dtype not in SUPPORTED:
        raise SlmExportError(f"{e.file}: tensor {name!r} is {e.dtype}; supported: {', '.join(SUPPORTED)} "
                             f"(convert the checkpoint, e.g. save_pretrained after loading it with "
                             f"torch_dtype=torch.bfloat16)")


def _read_into(f, e: _Entry, offset: int, buf: memoryview, name: str) -> None:
    """Fill `buf` from `offset` of the open file (raw reads may return less than asked)."""
    f.seek(offset)
    done = 0
    while done < len(buf):
        got = f.readinto(buf[done:])
        if not got:
            raise SlmExportError(f"{e.file}: truncated while reading tensor {name!r} (the file shrank since "
                                 f"it was opened); {REDOWNLOAD}")
        done += got


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
