"""verify's weight-exact check of an ONNX file: every stored weight is the quantizer's, exactly.

The recorded plan is quantized again from the PyTorch reference by the one quantizer (quantize/replay.py;
deterministic for a given calibration text), and the file is read back with the onnx package:

- each MatMulNBits node: its B unpacked (two codes a byte, low nibble first; the padding of a last
  partial block must hold the zero code), its float32 scales and its zero points must equal the
  re-quantized codes, scales and zero points, and its bits / block_size / K / N attributes theirs;
- every other initializer (int8 embedding rows and their scales, the copy of the lm_head's scales a
  shared table gathers with, float weights, norms, biases, rotary tables) must equal, byte for byte,
  the one the exporter's graph builder (graph.py) makes from those codes and the reference's weights.

So a 1% change of any one weight tensor of the reference fails the check at every bit width, and the
report names the tensor. Problems are listed in forward order: with a calibrated method (GPTQ) a
changed weight moves the codes of everything after it, and the first one listed is the one that changed.
Left out: the int8 KV cache's static scales (`--kv-bits 8`), which are measured by running the exported
graph in onnxruntime, not computed from weights.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

LAST = 1 << 30  # rank of what the forward order reaches last (the lm_head; GPTQ quantizes it after every layer)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise equality of the stored bits (so -0.0 != 0.0 and a NaN equals the same NaN)."""
    if a.dtype.kind in "fc":
        return a.view(f"u{a.dtype.itemsize}") == b.view(f"u{b.dtype.itemsize}")
    return a == b


def _diff(got: np.ndarray, want: np.ndarray, what: str, whose: str = "the quantizer's") -> str | None:
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"stored {got.dtype}{list(got.shape)}, {whose} is {want.dtype}{list(want.shape)}"
    bad = int((~_bits_equal(np.ascontiguousarray(got), np.ascontiguousarray(want))).sum())
    return f"{bad} of {want.size} {what} differ from {whose}" if bad else None


def check_matmul_nbits(node, qw, arr) -> str | None:
    """None when MatMulNBits `node` stores exactly the codes, scales and zero points of `qw`."""
    import onnx

    from .quant import unpack_codes, unpack_zero_points

    if node is None or node.op_type != "MatMulNBits":
        return f"stored as {node.op_type if node is not None else 'nothing'}, not as the quantizer's MatMulNBits codes"
    n, k = qw.shape
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    want = {"bits": qw.bits, "block_size": qw.group, "K": k, "N": n}
    got = {key: attrs.get(key) for key in want}
    if got != want:
        return f"attributes {got} != the quantizer's {want}"
    inputs = [f"{node.name}.qweight", f"{node.name}.scales"] + ([] if qw.symmetric else [f"{node.name}.zero_points"])
    if list(node.input[1:]) != inputs:
        return f"reads {list(node.input[1:])}, expected {inputs}"
    k_blocks = -(-k // qw.group)
    stored = unpack_codes(arr(inputs[0]), qw.bits, qw.group, k, n)
    zp = unpack_zero_points(arr(inputs[2]) if len(inputs) > 2 else None, qw.bits, k_blocks, n)
    mid = 1 << (qw.bits - 1)
    want_codes = (qw.codes.astype(np.int16) + mid) if qw.symmetric else qw.codes.astype(np.int16)
    problem = _diff(stored[:, :k].astype(np.int16), want_codes, "codes")
    if problem:
        return problem
    if stored.shape[1] > k and not np.array_equal(stored[:, k:], np.repeat(zp[:, -1:], stored.shape[1] - k, axis=1)):
        return "the padding of the last block is not the zero code"
    problem = _diff(arr(inputs[1]).reshape(n, k_blocks), qw.scales.astype(np.float32), "scales")
    if problem:
        return problem
    if not qw.symmetric:
        return _diff(zp.astype(np.int16), qw.zero_points.astype(np.int16), "zero points")
    return None


def check_weights(folder: Path, manifest: dict, model) -> dict:
    """{name, passed, detail}: the file's weights against the re-quantized reference (module docstring)."""
    import onnx
    from onnx import numpy_helper

    from ...errors import SlmExportError
    from ...quantize import QuantSpec
    from ...quantize.plan import EMBEDDING
    from ...quantize.quantizer import linear_codes, linear_plan
    from ...quantize.replay import requantize
    from . import OnnxExporter
    from .graph import build_decoder_graph, named_linears

    folder = Path(folder)
    name = f"{manifest['model_file']} weights are the quantizer's"
    try:
        plan, codes, dec = requantize(OnnxExporter(), model, folder, manifest)
    except SlmExportError as e:  # e.g. the calibration text the export named is gone: nothing to compare with
        return {"name": name, "passed": False, "detail": f"cannot quantize the reference again: {e}"}
    expected, _ = build_decoder_graph(dec, QuantSpec.from_dict(manifest["quant"]["spec"]), plan, codes)
    stored = onnx.load(str(folder / manifest["model_file"]))  # with its external data
    have = {t.name: t for t in stored.graph.initializer}
    want = {t.name: t for t in expected.graph.initializer}
    nodes = {n.name: n for n in stored.graph.node}
    shared = bool(plan.get(EMBEDDING) and plan[EMBEDDING].shares)
    cache = {}

    def arr(tensor_name: str) -> np.ndarray:
        if tensor_name not in cache:
            cache[tensor_name] = numpy_helper.to_array(have[tensor_name])
        return cache[tensor_name]

    # Forward order: where the exporter's graph first reads a tensor; the lm_head (and the shared table's
    # copy of its scales) last, whatever reads it first.
    first_use: dict[str, int] = {}
    for i, node in enumerate(expected.graph.node):
        for tensor in node.input:
            first_use.setdefault(tensor, i)

    def rank(tensor: str) -> int:
        if tensor.startswith("lm_head") or (shared and tensor == "embed_tokens.scales"):
            return LAST + first_use.get(tensor, 0)
        return first_use.get(tensor, 0)

    problems: list[tuple[int, str]] = []
    done: set[str] = set()
    n_quant = n_other = 0
    for node_name, lin in named_linears(dec):
        p = linear_plan(plan, lin)
        if p.bits is None:
            continue  # a float MatMul: its weight is compared with every other tensor below
        n_quant += 1
        done |= {f"{node_name}.{part}" for part in ("qweight", "scales", "zero_points")}
        try:
            problem = check_matmul_nbits(nodes.get(node_name), linear_codes(codes, lin), arr)
        except KeyError as e:
            problem = f"tensor {e} is missing from the file"
        if problem:
            problems.append((rank(f"{node_name}.qweight"), f"{node_name}: {problem}"))
    # KV-cache scales are calibrated by running the export (kv_cache.py), not made from the weights
    calibrated = {t for t in have if re.fullmatch(r"layers\.\d+\.attn\.[kv]_scale", t)} \
        if manifest.get("target_extra", {}).get("kv_bits") == 8 else set()
    # an input's default (logits_to_keep) is not a weight; files made before it had one still pass
    defaults = {i.name for i in expected.graph.input} | {i.name for i in stored.graph.input}
    for tensor, proto in want.items():
        if tensor in done or tensor in defaults:
            continue
        if tensor not in have:
            problems.append((rank(tensor), f"{tensor}: missing from the file"))
            continue
        n_other += 1
        what, whose = ("codes", "the quantizer's") if tensor.endswith(".qweight") else \
            ("scales", "the quantizer's") if tensor.endswith(".scales") else ("values", "the reference's")
        problem = _diff(arr(tensor), numpy_helper.to_array(proto), what, whose)
        if problem:
            problems.append((rank(tensor), f"{tensor}: {problem}"))
    # the embedding's gather reads its table as the exporter's graph does (GatherBlockQuantized's bits and block)
    emb_want = next((n for n in expected.graph.node if n.name == "embed_tokens"), None)
    emb_have = nodes.get("embed_tokens")
    if emb_want is not None and (emb_have is None or emb_have.op_type != emb_want.op_type or
                                 list(emb_have.input[:1]) != list(emb_want.input[:1]) or
                                 sorted(map(str, emb_have.attribute)) != sorted(map(str, emb_want.attribute))):
        problems.append((0, f"embed_tokens: the gather is not the exporter's {emb_want.op_type} of {emb_want.input[0]}"))
    extra = sorted(set(have) - set(want) - calibrated - done - defaults)
    problems += [(LAST * 2, f"{t}: not in the exporter's graph") for t in extra]
    problems.sort(key=lambda r: r[0])
    detail = "; ".join(m for _, m in problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    if not problems:
        zps = " and zero points" if any(t.endswith(".zero_points") for t in have) else ""
        detail = (f"{n_quant} quantized weights exactly the quantizer's codes and scales{zps}; " if n_quant
                  else "nothing quantized; ") + (f"{n_other} other tensors (float weights, norms, biases, rotary "
                                                 "tables) equal the exporter's from the reference")
        if calibrated:
            detail += f"; the KV cache's {len(calibrated)} calibrated scales are not compared"
    return {"name": name, "passed": not problems, "detail": detail}
