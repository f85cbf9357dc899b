"""What can be checked about a Core ML package without executing it (that needs macOS).

1. The package loads (coremltools reads its spec and its MIL program) and its spec has the inputs,
   outputs and states the manifest records, with the state writes in the program.
2. Its weights, read back out of the MIL program, are exactly the quantizer's: the recorded plan is
   quantized again from the PyTorch model and every stored code, scale and zero point must equal it
   (palettes: every weight on its table's entry nearest to the original).
3. `ProgramRunner`: the very PyTorch program that was converted, carrying the package's weights
   and run at the package's compute precision, stands in for Core ML in `verify`'s parity metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...runtimes.base import Runner
from .quant import const_name, load_program, read_weights


def _fp16(manifest: dict) -> bool:
    return manifest["target_extra"]["compute_precision"] == "float16"


def _report(folder: Path, manifest: dict) -> list[dict]:
    return json.loads((folder / manifest["quant"]["report"]).read_text())["weights"]


def weights_by_fqn(folder: Path, manifest: dict) -> dict[str, np.ndarray]:
    """CoreMLDecoder module name -> the float weight the package computes with."""
    stored = read_weights(folder / manifest["model_file"])
    out = {}
    for e in _report(folder, manifest):
        name = const_name(e["name"], _fp16(manifest))
        if name not in stored:
            raise RuntimeError(f"weight {name} is missing from the package")
        out[e["name"]] = stored[name][1]
        if "lm_head.weight" in e["sources"] and e["name"] == "embed_tokens":
            out["lm_head"] = stored[name][1]  # tied: one table serves both
    return out


def package_weights_by_source(folder: Path, manifest: dict) -> dict[str, np.ndarray]:
    """PyTorch parameter name -> the package's weight (parts of a fused parameter joined in order)."""
    by_fqn = weights_by_fqn(folder, manifest)
    parts: dict[str, list] = {}
    for e in _report(folder, manifest):
        for source in e["sources"]:
            parts.setdefault(source, []).append(by_fqn[e["name"]])
    return {name: np.concatenate(ws) if len(ws) > 1 else ws[0] for name, ws in parts.items()}


class ProgramRunner(Runner):
    """The converted PyTorch program with the package's weights: Core ML's stand-in on Linux."""

    def __init__(self, model, folder: Path, manifest: dict, threads=None):
        import torch

        from ...architectures import to_decoder
        from . import build_module

        super().__init__(folder, manifest, threads)
        torch.set_num_threads(self.threads)
        self.module = build_module(to_decoder(model, self.max_context), self.max_context)
        with torch.no_grad():
            for fqn, w in weights_by_fqn(Path(folder), manifest).items():
                self.module.get_submodule(fqn).weight.copy_(torch.from_numpy(w))
        if _fp16(manifest):
            self.module.half()
        self.chunk = int(manifest["io"]["prefill_chunk"])
        self.capacity = self.max_context
        precision = manifest["target_extra"]["compute_precision"]
        self.description = (f"PyTorch, running the converted program with the package's weights in {precision} "
                            "(Core ML's stand-in: the same graph and weights, not Core ML's kernels)")

    def reset(self, capacity: int) -> None:
        for cache in self.module.caches():
            cache.zero_()
        self.position = 0

    def forward(self, token_ids, all_logits: bool = False) -> np.ndarray:
        import torch

        self.check_room(len(token_ids))
        rows = []
        with torch.no_grad():
            for i in range(0, len(token_ids), self.chunk):
                part = list(token_ids[i:i + self.chunk])
                end = self.position + len(part)  # the mask's shape carries the position (module.py)
                logits = self.module(torch.tensor([part], dtype=torch.int32),
                                     torch.zeros(1, 1, 1, end, dtype=torch.float16))[0]
                self.position += len(part)
                rows.append(logits if all_logits else logits[-1:])
        return torch.cat(rows).float().numpy() if all_logits else rows[-1].float().numpy()


# --- package checks -------------------------------------------------------------------------------

_DTYPES = {65552: "float16", 65568: "float32", 65600: "float64", 131104: "int32"}  # ArrayFeatureType.ArrayDataType


def _array_desc(feature) -> dict:
    a = feature.type.multiArrayType
    shape = list(a.shape)
    ranges = [[r.lowerBound, r.upperBound] for r in a.shapeRange.sizeRanges]
    return {"dtype": _DTYPES.get(a.dataType, str(a.dataType)), "shape": shape, "ranges": ranges}


def _ranges(shape: list) -> list[list[int]]:
    """The manifest's shape ([1, "1..127"]) as the spec's size ranges ([[1, 1], [1, 127]])."""
    return [[int(d), int(d)] if isinstance(d, int) else [int(x) for x in d.split("..")] for d in shape]


def check_spec(folder: Path, manifest: dict) -> dict:
    from . import MODEL_NAME_KEY

    spec, prog = load_program(folder / manifest["model_file"])
    want = manifest["io"]["functions"]["main"]
    problems = []
    desc = spec.description
    got_in = {f.name: _array_desc(f) for f in desc.input}
    got_out = {f.name: _array_desc(f) for f in desc.output}
    got_states = {f.name: (list(f.type.stateType.arrayType.shape), _DTYPES.get(f.type.stateType.arrayType.dataType))
                  for f in desc.state}
    if list(got_in) != list(want["inputs"]):
        problems.append(f"inputs {list(got_in)} != manifest {list(want['inputs'])}")
    for name, w in want["inputs"].items():
        g = got_in.get(name)
        if g and g["dtype"] != w["dtype"]:
            problems.append(f"input {name} is {g['dtype']}, manifest says {w['dtype']}")
        if g and g["ranges"] != _ranges(w["shape"]):
            problems.append(f"input {name} size ranges {g['ranges']} != manifest {_ranges(w['shape'])}")
    if not spec.description.metadata.userDefined.get(MODEL_NAME_KEY):
        problems.append(f"no {MODEL_NAME_KEY} in the metadata")
    if list(got_out) != list(want["outputs"]):
        problems.append(f"outputs {list(got_out)} != manifest {list(want['outputs'])}")
    for name, w in want["outputs"].items():
        if name in got_out and got_out[name]["dtype"] != w["dtype"]:
            problems.append(f"output {name} is {got_out[name]['dtype']}, manifest says {w['dtype']}")
    for name, w in want["states"].items():
        if got_states.get(name) != (w["shape"], w["dtype"]):
            problems.append(f"state {name} is {got_states.get(name)}, manifest says {(w['shape'], w['dtype'])}")
    if set(got_states) != set(want["states"]):
        problems.append(f"states {sorted(got_states)} != manifest {sorted(want['states'])}")
    ops = prog.functions["main"].operations
    written = {op.inputs["state"].name for op in ops if op.op_type == "coreml_update_state"}
    if written != set(want["states"]):
        problems.append(f"the program writes states {sorted(written)}, expected {sorted(want['states'])}")
    if spec.specificationVersion < 9:
        problems.append(f"specification version {spec.specificationVersion} < 9 (iOS 18)")
    return {"name": "package spec matches the manifest", "passed": not problems,
            "detail": "; ".join(problems) or (f"inputs {list(got_in)}, outputs {list(got_out)}, states "
                                               f"{sorted(got_states)} written in place, spec version {spec.specificationVersion}")}


def _check_palette(w: np.ndarray, deq: np.ndarray, lut: np.ndarray) -> str | None:
    """Every weight must sit on the entry of its own table nearest to the original value, i.e.
    inside that entry's interval between the midpoints to its neighbours in the sorted table."""
    tables = np.sort(lut.reshape(-1, lut.shape[-1]).astype(np.float64), axis=1)  # [n tables, entries]
    span = 4 * float(np.abs(tables).max()) + 1
    keys = (tables + span * np.arange(len(tables))[:, None]).ravel()  # one sorted line, table after table
    r = np.arange(w.shape[0]) // (w.shape[0] // lut.shape[0])
    c = np.arange(w.shape[1]) // (w.shape[1] // lut.shape[1])
    table_id = (r[:, None] * lut.shape[1] + c[None, :]).astype(np.float64)
    key = deq.astype(np.float64) + span * table_id
    lo, hi = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")  # the assigned entry (ties)
    entries = tables.shape[1]
    first, last = (lo % entries) == 0, (hi % entries) == 0  # no neighbour below / above in this table
    below, above = keys[np.maximum(lo - 1, 0)], keys[np.minimum(hi, len(keys) - 1)]
    lower = np.where(first, -np.inf, (key + below) / 2 - span * table_id)
    upper = np.where(last, np.inf, (key + above) / 2 - span * table_id)
    tol = 1e-3 * max(float(np.abs(w).max()), 1e-6)
    outside = (w < lower - tol) | (w > upper + tol)
    if outside.any():
        return f"{int(outside.sum())} weights are not on their table's nearest entry"
    return None


def _exact(qw, op, fp16: bool) -> str | None:
    """None when the constexpr op holds exactly the codes, scales and zero points of `qw` (asymmetric
    codes as they are, uint4/uint8, or shifted into the signed range with their offsets: module_weights)."""
    data = np.asarray(op.data.val)
    shift = (1 << (qw.bits - 1)) if not qw.symmetric and np.issubdtype(data.dtype, np.signedinteger) else 0
    codes = data.astype(np.int32) + shift
    if codes.shape != qw.shape or not np.array_equal(codes, qw.codes.astype(np.int32)):
        bad = int((codes != qw.codes.astype(np.int32)).sum()) if codes.shape == qw.shape else codes.size
        return f"{bad} of {qw.codes.size} codes differ from the quantizer's"
    scale = np.asarray(op.scale.val)
    want = qw.scales.reshape(scale.shape).astype(np.float16 if fp16 else np.float32)
    if scale.dtype != want.dtype or not np.array_equal(scale, want):
        return f"{int((scale != want).sum())} of {scale.size} scales ({scale.dtype}) differ from the quantizer's"
    offset = None if op.offset is None else np.asarray(op.offset.val).astype(np.int32) + shift
    if (offset is None) != qw.symmetric or (offset is not None and not np.array_equal(
            offset, qw.zero_points.reshape(offset.shape).astype(np.int32))):
        return "zero points differ from the quantizer's"
    return None


def check_weights(folder: Path, manifest: dict, model) -> dict:
    import torch

    from ...architectures import to_decoder
    from ...quantize.replay import requantize
    from . import CoreMLExporter, build_module

    module = build_module(to_decoder(model, 16), 16)
    fp16 = _fp16(manifest)
    stored = read_weights(folder / manifest["model_file"])
    palettized = manifest["quant"]["spec"].get("palettize")
    plan, codes, _ = (None, None, None) if palettized else requantize(CoreMLExporter(), model, folder, manifest)
    problems, n_quant, n_float = [], 0, 0
    # in forward order, the lm_head (a tied table with it) last: with a calibrated method a changed weight
    # moves the codes downstream of it too, and the first difference names the weight that changed
    entries = sorted(_report(folder, manifest), key=lambda e: "lm_head.weight" in e["sources"])
    for e in entries:
        w = module.get_submodule(e["name"]).weight.detach().to(torch.float16 if fp16 else torch.float32).float().numpy()
        kind, deq, ops = stored[const_name(e["name"], fp16)]
        if deq.shape != w.shape:
            problems.append(f"{e['name']}: package shape {deq.shape} != {w.shape}")
            continue
        if e["bits"] is None:
            n_float += 1
            if kind != "const" or not np.array_equal(deq, w):
                problems.append(f"{e['name']}: should be stored float, found {kind}")
            continue
        n_quant += 1
        if kind == "palette" and palettized:
            problem = _check_palette(w, deq, ops["tables"])
        elif kind == "linear" and not palettized:
            source, rows = module.sources[e["name"]]
            p = plan[source]
            qw = codes[p.shares or source]
            problem = _exact(qw if rows is None else qw.rows(*rows), ops["constexpr_blockwise_shift_scale"], fp16)
        else:
            problem = f"quantized in the report but stored as {kind}"
        if problem:
            problems.append(f"{e['name']}: {problem}")
    what = "on their tables' nearest entries" if palettized else "exactly the quantizer's codes and scales"
    return {"name": "package weights are the quantizer's", "passed": not problems,
            "detail": "; ".join(problems[:5]) or f"{n_quant} quantized weights {what}, {n_float} float weights equal"}


def run_package_checks(folder: Path, manifest: dict, model) -> list[dict]:
    return [check_spec(folder, manifest), check_weights(folder, manifest, model)]
