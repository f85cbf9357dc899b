"""Memory before and during an export: what it needs at its peak, what this machine has, and running
out of it said in one line, never as a bad input file, an internal error or a silent kill.

The estimate is arithmetic on declared facts, not on target names: every exporter declares its peak
resident memory per fp32 weight byte at each --bits (`export_peak` in slm_export/exporters) and the
memory of the interpreter and libraries an export loads (`export_base_mb`); calibrated quantization
(GPTQ, mixed precision, static KV-cache scales) declares its own (`CALIBRATION_PEAK` in
quantize/calibration.py). The peak is the larger of the two phases:

    peak ~ export_base_mb + fp32 weight bytes x max(export_peak[bits], CALIBRATION_PEAK if calibrated)

(`Exporter.peak_per_fp32_byte(spec)` gives the first: `export_peak[bits]`, or what a target declares for
a spec that takes another path, e.g. Core ML's palettes.) A checkpoint the export streams is estimated
from its shapes instead (`streamed_peak_bytes`, below).

The model's fp32 weight bytes come from its config (config.json or the GGUF header, through the
shapes `slm-export fit` uses), before any weight loads.

What the machine has is the least of: free memory (MemAvailable), the room under every cgroup
memory limit above this process (v2 memory.max, v1 memory.limit_in_bytes, less the usage that is not
reclaimable page cache), and the room under an address-space limit (ulimit -v); each counts this
process's own resident memory as usable, since the export grows from it.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import OutOfMemory, SlmExportError
from .units import MB, gb_text

# For tests and for users who know better than the probes below: the memory an export may use, in
# bytes or with a K/M/G suffix (powers of 1024), in place of what the machine reports.
AVAILABLE_ENV = "SLM_EXPORT_AVAILABLE_MEMORY"
SKIP_HINT = "--skip-memory-check"
_UNLIMITED = 2**60  # cgroup v1 says "no limit" as 2^63 rounded down to a page


def gb(n: float) -> str:
    return gb_text(n)


# ---------------------------------------------------------------- what the machine has

@dataclass
class Available:
    bytes: int  # what an export started now may use at its peak (this process's own resident memory included)
    bound: str  # what sets it: "free memory", "cgroup limit 2.1 GB", "address-space limit ...", or AVAILABLE_ENV

    def describe(self) -> str:
        return f"{gb(self.bytes)} available ({self.bound})"


def available_memory() -> Available:
    """The memory an export started in this process could use at its peak (the least of every bound)."""
    override = os.environ.get(AVAILABLE_ENV)
    if override:
        return Available(_parse_size(override), AVAILABLE_ENV)
    import psutil

    me = psutil.Process().memory_info()
    rooms = [(psutil.virtual_memory().available + me.rss, "free memory")]
    for limit, room in _cgroup_rooms():  # shared pages charged elsewhere are in rss, not in the usage: cap at the limit
        rooms.append((min(limit, room + me.rss), f"cgroup limit {gb(limit)}"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            rooms.append((max(0, soft - me.vms) + me.rss, f"address-space limit (ulimit -v) {gb(soft)}"))
    except (ImportError, ValueError, OSError):  # Windows
        pass
    room, bound = min(rooms, key=lambda r: r[0])
    return Available(int(room), bound)


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text, re.IGNORECASE)
    if not m:
        raise SlmExportError(f"{AVAILABLE_ENV}={text!r} is not a size; use bytes or a K/M/G suffix, e.g. 2G")
    number, unit = float(m.group(1)), m.group(2).upper()
    return int(number * 1024 ** ("KMGT".index(unit) + 1)) if unit else int(number)


def _cgroup_rooms(proc: Path = Path("/proc/self")) -> list[tuple[int, int]]:
    """(limit, room under it) for every memory limit on this process's cgroup and its ancestors."""
    try:
        lines = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:  # no /proc (macOS)
        return []
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2
            files = ("memory.max", "memory.current", "inactive_file")
            mount = _mount_of(mounts, lambda fstype, opts: fstype == "cgroup2")
        elif "memory" in controllers.split(","):  # cgroup v1
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            mount = _mount_of(mounts, lambda fstype, opts: fstype == "cgroup" and "memory" in opts.split(","))
        else:
            continue
        if mount is None:
            continue
        point, root = mount
        rel = path[len(root):] if root != "/" and path.startswith(root) else path
        folder = Path(point + rel.rstrip("/"))
        if not folder.is_dir():
            folder = Path(point)  # a namespace whose paths we cannot map: the mount's own cgroup
        while True:
            room = _room(folder, *files)
            if room:
                rooms.append(room)
            if folder == Path(point) or folder.parent == folder:
                break
            folder = folder.parent
    return rooms


def _mount_of(mountinfo: list[str], match) -> tuple[str, str] | None:
    """(mount point, root within the hierarchy) of the first mount `match(fstype, super options)` accepts."""
    for line in mountinfo:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) > sep + 3 and match(fields[sep + 1], fields[sep + 3]):
            return fields[4].replace("\\040", " "), fields[3]
    return None


def _room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> tuple[int, int] | None:
    try:
        text = (folder / limit_file).read_text().strip()
        if text == "max" or int(text) >= _UNLIMITED:
            return None
        limit = int(text)
        usage = int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    inactive = 0  # page cache the kernel reclaims before it kills anything
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return limit, max(0, limit - max(0, usage - inactive))


# ---------------------------------------------------------------- what an export needs

@dataclass
class ExportEstimate:
    what: str  # "exporting smollm2-135m-instruct to executorch int4"
    target: str
    peak_bytes: int
    fp32_bytes: int

    def line(self) -> str:
        return f"{self.what} needs about {gb(self.peak_bytes)} of memory at its peak"


def estimate_export(exporter, spec, kv_bits: int, fp32_bytes: int, what: str, shape=None,
                    from_checkpoint: bool = False) -> ExportEstimate:
    """The estimate of exporting a model of `fp32_bytes` with `exporter` under the resolved `spec`.

    from_checkpoint: the model is a safetensors checkpoint the export can stream (loading.streamable);
    with its `shape` (fit.Shape), an exporter that streams weights is estimated as it streams."""
    from .pipeline import calibrates, streams

    calibrated = calibrates(exporter, spec, kv_bits)
    if from_checkpoint and shape is not None and streams(exporter, spec):
        peak = streamed_peak_bytes(exporter, shape, spec.bits, calibrated)
    else:
        peak = export_peak_bytes(exporter, fp32_bytes, spec, calibrated)
    return ExportEstimate(what, exporter.name, peak, int(fp32_bytes))


def estimate_for_target(name: str, asked, fp32_bytes: int, shape=None, from_checkpoint: bool = False) -> int | None:
    """Peak bytes of exporting the same model to target `name` under the spec the user asked for (with
    that target's own defaults; streamed if that target would stream it); None when it refuses the spec."""
    from .exporters import TARGETS
    from .quantize.spec import resolve_spec

    try:
        exporter = TARGETS.get(name)()
        spec = resolve_spec(exporter, asked)
        precision, kv_bits = exporter.resolve_precision(None, None)
        exporter.check(spec, precision)
        return estimate_export(exporter, spec, kv_bits, fp32_bytes, name, shape, from_checkpoint).peak_bytes
    except Exception:  # noqa: BLE001 - a suggestion never stands in the way of the refusal it is part of
        return None


def export_peak_bytes(exporter, fp32_bytes: float, spec, calibrated: bool) -> int:
    """Peak resident memory of an export of a model of `fp32_bytes` float32 weight bytes (model load
    included) by `exporter` under the resolved `spec`: its declared facts, see the module docstring."""
    from .quantize.calibration import CALIBRATION_PEAK

    per_byte = exporter.peak_per_fp32_byte(spec)
    if calibrated:
        per_byte = max(per_byte, CALIBRATION_PEAK)
    return int(exporter.export_base_mb * MB + per_byte * fp32_bytes)


# A streamed export (slm_export/stored.py) holds: the interpreter and libraries (`export_base_mb`); the
# quantizer's codes of every weight until the writer packs them (codes.HELD_PER_FP32_BYTE), and the
# largest weight packed beside them (a byte per weight at most: int8); what the
# writer itself holds per fp32 weight byte (`stream_write` of the exporter, at each --bits); and a working
# set, the larger of: the weight or row block being quantized (quantizer.ROW_BLOCK_BYTES at most; a float
# export's largest weight) times STREAM_BLOCK_COPIES (its float32 read, the method's temporaries, its
# codes); and, calibrating, the layer being calibrated times STREAM_LAYER_COPIES (its weights as read,
# quantized and put back, GPTQ's Hessians) plus the activations of the calibration tokens through one
# layer times STREAM_ACTIVATION_COPIES. Before quantizing, mixed precision's sensitivity pass holds one
# layer's working copies and the hidden states of every unit it probes. Fitted to the peaks of
# benchmarks/streaming_export.py (benchmarks/STREAMING_EXPORT.md); the calibrating terms to two exports
# only: the SmolLM2-360M shape and the bundled SmolLM2-135M with the default flags (ONNX int4, 1.11 GB).
STREAM_BLOCK_COPIES = 3.5
STREAM_LAYER_COPIES = 4.0
STREAM_ACTIVATION_COPIES = 8.5


def streamed_peak_bytes(exporter, shape, bits: int, calibrated: bool) -> int:
    """Peak resident memory of an export that streams its checkpoint, from the model's shapes."""
    from .quantize.codes import HELD_PER_FP32_BYTE
    from .quantize.quantizer import ROW_BLOCK_BYTES

    quantized = bits < 16
    fp32 = fp32_weight_bytes(shape)
    matrices = [4 * rows * cols for name, (rows, cols) in shape.weights]
    held = (HELD_PER_FP32_BYTE * fp32 + max(matrices) / 4 if quantized else 0) + exporter.stream_write[bits] * fp32
    work = STREAM_BLOCK_COPIES * (min(max(matrices), ROW_BLOCK_BYTES) if quantized else max(matrices))
    before = 0  # what the sensitivity pass holds, before any codes exist
    if calibrated:
        from .quantize.calibration import MAX_TOKENS
        from .quantize.mixed import SENSITIVITY_TOKENS

        layer = 4 * sum(rows * cols for name, (rows, cols) in shape.weights if ".layers.0." in f".{name}")
        activations = 4 * MAX_TOKENS * (4 * shape.hidden + 3 * shape.intermediate)
        work = max(work, STREAM_LAYER_COPIES * layer + STREAM_ACTIVATION_COPIES * activations)
        states = 4 * shape.layers * 4 * SENSITIVITY_TOKENS * shape.hidden  # a [tokens, hidden] state per unit
        before = STREAM_LAYER_COPIES * layer + states
    return int(exporter.export_base_mb * MB + max(held + work, before))


def fp32_weight_bytes(shape) -> int:
    """Float32 bytes of a model's matrices (fit's Shape): a tied embedding and lm_head count once."""
    return 4 * sum(rows * cols for name, (rows, cols) in shape.weights if not (shape.tied and name == "lm_head.weight"))


def check_memory(estimate: ExportEstimate, need_of) -> Available:
    """Refuse (exit 2, one line) an export this machine cannot hold at its peak, naming the targets
    whose export of the same model would fit: `need_of(target name)` is that export's estimate in
    bytes (None: that target refuses the spec)."""
    from .exporters import TARGETS

    have = available_memory()
    if estimate.peak_bytes > have.bytes:
        others = sorted((need, name) for name in TARGETS.names() if name != estimate.target
                        for need in [need_of(name)] if need is not None and need <= have.bytes)
        cheaper = "".join(f", or use --target {name} (about {gb(need)})" for need, name in others[:1])
        raise SlmExportError(f"{estimate.line()} and this machine has {have.describe()}; free memory, raise the "
                             f"limit{cheaper}, or pass {SKIP_HINT} to try anyway")
    return have


# ---------------------------------------------------------------- running out anyway

# What a failed allocation or mapping says when it is not a MemoryError: torch's CPU allocator, the
# dynamic loader under an address-space limit, and errno 12 (ENOMEM) in any wrapper's text.
_OOM_TEXT = re.compile(r"can't allocate memory|cannot allocate memory|failed to map segment|out of memory|"
                       r"std::bad_alloc|\[Errno 12\]", re.IGNORECASE)


def is_out_of_memory(e: BaseException | None) -> bool:
    """Whether `e`, or anything it was raised from, is the process running out of memory."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError):
            return True
        if isinstance(e, OSError) and e.errno == errno.ENOMEM:
            return True
        if isinstance(e, (OSError, ImportError, RuntimeError)) and _OOM_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def out_of_memory(estimate: ExportEstimate | None, have: Available | None) -> OutOfMemory:
    """The one line for an export that ran out of memory mid-way (nothing half-written is kept)."""
    what = estimate.what if estimate else "the export"
    need = f" (estimated to need about {gb(estimate.peak_bytes)} at its peak" if estimate else ""
    avail = (f"; {have.describe()} when it started)" if have else ")") if estimate else ""
    return OutOfMemory(f"{what} ran out of memory{need}{avail}; nothing was kept. Free memory, raise the "
                       "limit, or export on a machine with more")
