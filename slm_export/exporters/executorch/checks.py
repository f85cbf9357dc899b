"""verify's weight-exact check of a .pte: the weights the program computes with are the quantizer's.

Where executorch 1.5.1 keeps them, and how they are read back here (its own deserializer for the
program, the XNNPACK schema and the `flatc` it ships for the delegates):

- The program (`deserialize_pte_binary`) lists its XNNPACK delegates. Each is a blob: a header, an
  XNNGraph flatbuffer (schema `backends/xnnpack/serialization/schema.fbs`) and no data of its own: its
  constant tensors are entries of the .pte's named data store, keyed by a hash of their bytes. XNNPACK
  packs them for its kernels only when the program loads, so the file holds them as serialized:
  - a linear is a fully-connected node whose filter is a constant tensor [out, in]: int4 groups
    (`qbint4`) two codes a byte, low nibble first, stored + 8, with bfloat16 scales [out, groups];
    int8 per channel (`qcint8`) as int8 with float32 scales [out]; a float weight as float32 (float16
    in an fp16 program). XNNPACK has no zero points, so codes are symmetric.
  - norm weights and biases are constant tensors of the same delegates (float32 / float16).
- The embedding runs outside the delegates (`quantized_decomposed::embedding_byte` / `embedding_4bit`,
  or `aten::embedding`): its table, scales and zero points are the program's constant tensors; 4-bit
  tables two codes a byte, high nibble first, + 8.

The check quantizes the recorded plan again from the reference (quantize/replay.py) and requires, for
every planned weight in forward order, a stored filter (or the embedding table) holding exactly its
codes and scales (or its float values), each stored tensor used once, and the filters met in the
forward method's order of execution in the forward order of the model; every norm weight and bias
must be one of the delegates' constants; and the logits method (module.py) must compute with exactly
forward's lm_head. What it does not prove: that each norm or bias feeds the node it
should (they are found by content), and anything about the kernels that run them (parity measures that).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class StoredWeight:
    kind: str  # "qbint4", "qcint8", "fp32", "fp16", ... (XNNPACK datatypes), or "embedding"
    dims: tuple
    data: bytes  # as serialized
    scales: np.ndarray | None = None  # float32 (bfloat16 widened exactly)
    zero_points: np.ndarray | None = None  # the embedding's, if stored
    where: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


_DTYPES = {"xnn_datatype_fp32": "fp32", "xnn_datatype_fp16": "fp16", "xnn_datatype_qcint8": "qcint8",
           "xnn_datatype_qcint4": "qcint4", "xnn_datatype_qbint4": "qbint4", "xnn_datatype_bf16": "bf16"}
_SCALAR = {6: np.float32, 5: np.float16, 1: np.int8, 0: np.uint8, 3: np.int32, 4: np.int64}  # ExecuTorch ScalarType


def _bf16_to_f32(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _xnn_graphs(blobs: list[bytes]) -> list[dict]:
    """The XNNGraph of each XNNPACK delegate blob, as JSON (flatc with executorch's schema)."""
    import importlib.resources as resources

    import executorch.backends.xnnpack.serialization as schema_package
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _get_flatc_path

    with tempfile.TemporaryDirectory() as d:
        schema = Path(d) / "schema.fbs"
        schema.write_bytes(resources.files(schema_package).joinpath("schema.fbs").read_bytes())
        files = []
        for i, blob in enumerate(blobs):
            header = XNNHeader.from_bytes(blob[:XNNHeader.EXPECTED_LENGTH])
            path = Path(d) / f"delegate{i}.bin"
            path.write_bytes(blob[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
            files.append(str(path))
        subprocess.run([_get_flatc_path(), "--json", "--strict-json", "--defaults-json", "--raw-binary", "-o", d,
                        str(schema), "--", *files], check=True, capture_output=True)
        # flatc writes non-finite floats (a clamp's bounds) as bare inf / nan, which JSON has no words for
        fix = lambda text: re.sub(r"([:\[,]\s*)(-?)(inf|nan)\b",  # noqa: E731
                                  lambda m: m.group(1) + ("NaN" if m.group(3) == "nan" else m.group(2) + "Infinity"), text)
        return [json.loads(fix((Path(d) / f"delegate{i}.json").read_text())) for i in range(len(blobs))]


def read_pte(path: Path, methods: tuple[str, ...] = ("forward",)) -> list[tuple[list[StoredWeight], list[bytes],
                                                                                list[StoredWeight]]]:
    """For each of `methods` (absent ones skipped): (fully-connected filters in order of execution, every
    delegate constant's bytes, embedding tables)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(Path(path).read_bytes())
    program, named = pte.program, pte.named_data
    store = {key: bytes(named.buffers[entry.buffer_index]) for key, entry in named.pte_data.items()} if named else {}
    plans = {plan.name: plan for plan in program.execution_plan}
    return [_read_plan(program, plans[m], store) for m in methods if m in plans]


def _read_plan(program, plan, store: dict) -> tuple[list[StoredWeight], list[bytes], list[StoredWeight]]:
    from executorch.exir.schema import DelegateCall, KernelCall

    order = [ins.instr_args.delegate_index for ins in plan.chains[0].instructions
             if isinstance(ins.instr_args, DelegateCall)]
    xnn = [i for i in order if plan.delegates[i].id == "XnnpackBackend"]
    graphs = _xnn_graphs([bytes(program.backend_delegate_data[plan.delegates[i].processed.index].data) for i in xnn])
    filters, constants = [], []
    for d, graph in zip(xnn, graphs):
        offsets = graph.get("constant_data") or []

        def constant(idx: int) -> bytes:
            key = offsets[idx].get("named_key")
            if not key or key not in store:
                raise RuntimeError(f"delegate {d}: constant {idx} is not in the named data store")
            return store[key]

        values = {}
        for v in graph.get("xvalues") or []:
            kind, body = v.get("xvalue_union_type"), v.get("xvalue_union") or {}
            tensor = body.get("tensor_value", body) if kind == "XNNQuantizedTensorValue" else body
            if kind in ("XNNTensorValue", "XNNQuantizedTensorValue"):
                values[tensor["id_out"]] = (kind, tensor, body.get("quant_params_type"), body.get("quant_params"))
                if tensor.get("constant_buffer_idx"):
                    constants.append(constant(tensor["constant_buffer_idx"]))
        for n, node in enumerate(graph.get("xnodes") or []):
            if node.get("xnode_union_type") != "XNNFullyConnected":
                continue
            _, tensor, qtype, q = values[node["xnode_union"]["filter_id"]]
            if not tensor.get("constant_buffer_idx"):
                continue  # a matmul of two activations
            dtype = _DTYPES.get(tensor["datatype"], tensor["datatype"])
            scales, group = None, None
            if qtype == "PerChannelGroupQuant":
                scales, group = _bf16_to_f32(constant(q["scale_buffer_idx"])), q["group_size"]
            elif qtype == "PerChannelQuant":
                scales = np.frombuffer(constant(q["scale_buffer_idx"]), np.float32) if q.get("scale_buffer_idx") \
                    else np.asarray(q.get("scale") or [], np.float32)
            dims = tuple(tensor["dims"])
            if scales is not None:
                scales = scales[:q.get("num_scales") or scales.size].reshape(dims[0], -1)
            filters.append(StoredWeight(dtype, dims, constant(tensor["constant_buffer_idx"]), scales,
                                        where=f"delegate {d} node {n}" + (f" group {group}" if group else "")))
    for value in plan.values:  # constants outside the delegates (a norm left to the portable ops)
        t = value.val
        if getattr(t, "data_buffer_idx", 0) and int(t.scalar_type) in _SCALAR:
            n = (int(np.prod(t.sizes)) if t.sizes else 1) * np.dtype(_SCALAR[int(t.scalar_type)]).itemsize
            constants.append(bytes(program.constant_buffer[t.data_buffer_idx].storage)[:n])
    embeddings = []
    for ins in plan.chains[0].instructions:
        call = ins.instr_args
        if not isinstance(call, KernelCall):
            continue
        op = plan.operators[call.op_index].name
        if op not in ("quantized_decomposed::embedding_byte", "quantized_decomposed::embedding_4bit", "aten::embedding"):
            continue

        def tensor_of(i: int):
            t = plan.values[call.args[i]].val
            if not getattr(t, "data_buffer_idx", 0):
                return None
            raw = bytes(program.constant_buffer[t.data_buffer_idx].storage)
            dtype = _SCALAR[int(t.scalar_type)]
            n = int(np.prod(t.sizes)) if t.sizes else 1
            return t, np.frombuffer(raw[:n * np.dtype(dtype).itemsize], dtype).reshape(t.sizes)

        weight = tensor_of(0)
        if weight is None:
            continue
        t, table = weight
        scales = zero = None
        if op != "aten::embedding":
            scales = tensor_of(1)[1].astype(np.float32).reshape(t.sizes[0], -1)
            zp = tensor_of(2) if len(call.args) > 2 else None
            zero = None if zp is None else zp[1]
        embeddings.append(StoredWeight(op.split("::")[1], tuple(t.sizes), table.tobytes(), scales, zero, where=op))
    return filters, constants, embeddings


# --- what the exporter stores for a weight, from the re-quantized codes ------------------------------

def _expected_filter(qw, float_weight: np.ndarray | None, fp16: bool) -> StoredWeight:
    if qw is None:
        w = float_weight.astype(np.float16 if fp16 else np.float32)
        return StoredWeight("fp16" if fp16 else "fp32", w.shape, np.ascontiguousarray(w).tobytes())
    out_f, in_f = qw.shape
    if qw.bits == 4:  # groups, one group per row included (XNNPACK stores int4 groups as qbint4 either way)
        u = (qw.codes.astype(np.int16) + 8).astype(np.uint8)
        if in_f % 2:
            u = np.concatenate([u, np.full((out_f, 1), 8, np.uint8)], axis=1)
        packed = u[:, 0::2] | (u[:, 1::2] << 4)  # low nibble first (XNNPACK's convert_to_qc4w)
        return StoredWeight("qbint4", (out_f, in_f), np.ascontiguousarray(packed).tobytes(), qw.scales)
    if qw.bits == 8:
        return StoredWeight("qcint8", (out_f, in_f), np.ascontiguousarray(qw.codes.astype(np.int8)).tobytes(),
                            qw.scales.reshape(out_f, -1))
    raise ValueError(f"int{qw.bits} with group {qw.group} of {in_f} is not what this exporter stores")


def _expected_embedding(qw, table: np.ndarray, fp16: bool) -> StoredWeight:
    if qw is None:
        w = table.astype(np.float16 if fp16 else np.float32)
        return StoredWeight("embedding", w.shape, np.ascontiguousarray(w).tobytes())
    if qw.bits == 4:
        u = (qw.codes.astype(np.int16) + 8).astype(np.uint8)
        packed = (u[:, 0::2] << 4) | u[:, 1::2]  # high nibble first (ExecuTorch's _pack_embedding_weight)
        return StoredWeight("embedding_4bit", packed.shape, np.ascontiguousarray(packed).tobytes(), qw.scales)
    return StoredWeight("embedding_byte", qw.shape, np.ascontiguousarray(qw.codes.astype(np.int8)).tobytes(),
                        qw.scales.reshape(qw.shape[0], -1))


def _codes_of(w: StoredWeight) -> np.ndarray:
    """Unpacked int codes of a stored quantized tensor (for counting what differs)."""
    raw = np.frombuffer(w.data, np.uint8 if w.kind in ("qbint4", "embedding_4bit") else np.int8)
    if w.kind == "qbint4":
        packed = raw.reshape(w.dims[0], -1)
        lo, hi = packed & 0x0F, packed >> 4
        return np.stack([lo, hi], -1).reshape(w.dims[0], -1)[:, :w.dims[1]].astype(np.int16) - 8
    if w.kind == "embedding_4bit":
        packed = raw.reshape(w.dims[0], -1)
        return np.stack([packed >> 4, packed & 0x0F], -1).reshape(w.dims[0], -1).astype(np.int16) - 8
    return raw.astype(np.int16)


def _difference(got: StoredWeight, want: StoredWeight) -> str:
    """Why `got` (the stored tensor in this weight's place) is not `want`."""
    if got.kind != want.kind or got.dims != want.dims:
        return f"stored as {got.kind} {list(got.dims)}, the quantizer's is {want.kind} {list(want.dims)}"
    if got.data != want.data:
        if want.scales is None:  # float values: compare their bits, element by element
            width = {2: np.uint16, 4: np.uint32}[len(want.data) // int(np.prod(want.dims))]
            a, b = (np.frombuffer(x.data, width) for x in (got, want))
            return f"{int((a != b).sum())} of {a.size} values differ from the reference's"
        a, b = _codes_of(got), _codes_of(want)
        return f"{int((a != b).sum())} of {b.size} codes differ from the quantizer's"
    if want.scales is not None and (got.scales is None or got.scales.shape != want.scales.shape or
                                    not np.array_equal(got.scales.view(np.uint32),
                                                       np.asarray(want.scales, np.float32).view(np.uint32))):
        if got.scales is None or got.scales.shape != want.scales.shape:
            return "scales stored in another shape than the quantizer's"
        return f"{int((got.scales != want.scales).sum())} of {want.scales.size} scales differ from the quantizer's"
    if got.zero_points is not None and np.any(got.zero_points):
        return "non-zero zero points stored for symmetric codes"
    return ""


def _linears(dec):
    """(module name, decoder Linear) of every linear in forward order (module.py's names)."""
    from ...architectures import Linear
    from ...quantize.plan import LM_HEAD

    out = []
    for i, layer in enumerate(dec.layers):
        q, k, v = layer.qkv.parts()
        gate, up = layer.gate_up.parts()
        for name, lin in (("attn.q", q), ("attn.k", k), ("attn.v", v), ("attn.o", layer.o), ("gate", gate),
                          ("up", up), ("down", layer.down)):
            out.append((f"layers.{i}.{name}", lin))
    return out + [("lm_head", Linear(dec.lm_head, None, [LM_HEAD]))]


def check_weights(folder: Path, manifest: dict, model) -> dict:
    """{name, passed, detail}: the .pte's weights against the re-quantized reference (module docstring)."""
    from ...errors import SlmExportError
    from ...quantize.plan import EMBEDDING
    from ...quantize.replay import requantize
    from . import ExecuTorchExporter

    folder = Path(folder)
    name = f"{manifest['model_file']} weights are the quantizer's"
    fp16 = manifest.get("target_extra", {}).get("compute_precision") == "float16"
    try:
        plan, codes, dec = requantize(ExecuTorchExporter(), model, folder, manifest)
    except SlmExportError as e:  # e.g. the calibration text the export named is gone: nothing to compare with
        return {"name": name, "passed": False, "detail": f"cannot quantize the reference again: {e}"}
    (filters, constants, embeddings), *rest = read_pte(folder / manifest["model_file"], ("forward", "logits"))

    def codes_for(source: str, rows):
        if not plan[source].quantized:
            return None
        return codes[source] if rows is None else codes[source].rows(*rows)

    linears = _linears(dec)
    expected = [(fqn, _expected_filter(codes_for(lin.sources[0], lin.rows), lin.weight, fp16)) for fqn, lin in linears]
    # (forward rank, message): problems are listed in forward order, as a calibrated method (GPTQ) moves the
    # codes of everything after a changed weight, so the first one listed is the weight that changed
    problems: list[tuple[int, str]] = []
    want_emb = _expected_embedding(codes_for(EMBEDDING, None), dec.embed, fp16)
    if len(embeddings) != 1:
        problems.append((-1, f"embed_tokens: {len(embeddings)} embedding tables in the program, expected one"))
    elif _difference(embeddings[0], want_emb):
        problems.append((-1, f"embed_tokens: {_difference(embeddings[0], want_emb)}"))
    # the linears: each expected filter is a stored one with the same bytes, each stored one used once
    by_digest: dict[str, list[int]] = {}
    for i, f in enumerate(filters):
        by_digest.setdefault(f.digest, []).append(i)
    used, placed, missing = set(), [], []
    for rank, (fqn, want) in enumerate(expected):
        found = [i for i in by_digest.get(want.digest, []) if i not in used and
                 (filters[i].kind, filters[i].dims) == (want.kind, want.dims)]
        if found:
            used.add(found[0])
            placed.append((found[0], fqn))
            why = _difference(filters[found[0]], want)  # the same codes: the scales decide
            if why:
                problems.append((rank, f"{fqn}: {why}"))
        else:
            missing.append((rank, fqn, want))
    # a weight whose codes are nowhere: how it differs from the first unused filter of its kind and shape
    spare = [i for i in range(len(filters)) if i not in used]
    for rank, fqn, want in missing:
        like = [i for i in spare if (filters[i].kind, filters[i].dims) == (want.kind, want.dims)]
        if like:
            spare.remove(like[0])
            problems.append((rank, f"{fqn}: {_difference(filters[like[0]], want)}"))
        else:
            problems.append((rank, f"{fqn}: no {want.kind} {list(want.dims)} filter in the program holds it"))
    extra = [filters[i] for i in spare if filters[i].kind not in ("fp32", "fp16")]
    if extra and not missing:
        problems.append((len(expected), f"{len(extra)} quantized filters in the program are no weight of the plan "
                                        f"(first: {extra[0].where})"))
    # the logits method (every row's logits, for parity and perplexity) computes with forward's lm_head
    lm_head = expected[-1][1]
    head = [f for f in (rest[0][0] if rest else []) if f.dims == lm_head.dims]  # not the norm's [1, hidden]
    if rest and (len(head) != 1 or head[0].digest != lm_head.digest or _difference(head[0], lm_head)):
        problems.append((len(expected) - 1, f"the logits method's lm_head is not forward's ({len(head)} filters)"))
    order = [fqn for _, fqn in sorted(placed)]
    if not missing and order != [fqn for fqn, _ in expected]:
        first = next(a for a, b in zip(order, [fqn for fqn, _ in expected]) if a != b)
        problems.append((len(expected), f"the program runs its linears in another order than the model's forward "
                                        f"(first out of place: {first})"))
    # norm weights and biases: among the program's constants (found by content)
    have = {hashlib.sha256(c).hexdigest() for c in constants}
    fdt = np.float16 if fp16 else np.float32
    vectors = []
    for i, layer in enumerate(dec.layers):
        rank = next(r for r, (fqn, _) in enumerate(expected) if fqn.startswith(f"layers.{i}."))
        vectors += [(rank, f"layers.{i}.{what}", vec) for what, vec in (
            ("attn_norm", layer.attn_norm), ("ffn_norm", layer.ffn_norm), ("post_attn_norm", layer.post_attn_norm),
            ("post_ffn_norm", layer.post_ffn_norm))]
    vectors += [(r, f"{fqn}.bias", lin.bias) for r, (fqn, lin) in enumerate(linears)]
    vectors.append((len(expected) - 1, "final_norm", dec.final_norm))
    vectors = [v for v in vectors if v[2] is not None]
    for rank, what, vec in vectors:
        if hashlib.sha256(np.ascontiguousarray(vec.astype(fdt)).tobytes()).hexdigest() not in have:
            problems.append((rank, f"{what}: its values are not among the program's constants"))
    problems.sort(key=lambda r: r[0])
    n_quant = sum(w.scales is not None for _, w in expected) + (want_emb.scales is not None)
    detail = "; ".join(m for _, m in problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    if not problems:
        n_float = len(expected) + 1 - n_quant
        detail = ", ".join(([f"{n_quant} quantized weights exactly the quantizer's codes and scales"] if n_quant else []) +
                           ([f"{n_float} float weights equal the reference's"] if n_float else [])) + \
            f", linears in the model's forward order; {len(vectors)} norm weights and biases among the program's constants"
    return {"name": name, "passed": not problems, "detail": detail}
