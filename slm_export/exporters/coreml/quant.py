"""Putting the quantizer's codes into the Core ML program, palettes, and the weights read back.

Core ML stores weights only quantized (activations stay float16/float32): each planned weight becomes
one iOS18 `constexpr_blockwise_shift_scale` op holding the quantizer's codes (int4/int8; asymmetric ones
with offsets) and its scales in the program's precision. A quantized export builds its module with the
codes as torchao tensors (`module_weights`): torch.export records a torchao `dequantize_affine` per
weight and coremltools' own converter makes it that op, codes as they are, so no float weight exists
and a checkpoint streams. With `--palettize` the program is converted with float weights, and
coremltools palettizes each with our 1-D k-means (a lookup table of 2**bits values per group of 16
output channels, `constexpr_lut_to_dense`).

A tied embedding and lm_head are one table in the package (one op; palettized, coremltools de-duplicates
the two equal consts): the plan quantizes it once, at the finer of the two rules' bit widths.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ...quantize import QuantizedWeight, QuantReport, WeightEntry

PALETTE_GROUP = 16  # output channels sharing one lookup table (coremltools' per_grouped_channel)


def const_name(fqn: str, fp16: bool) -> str:
    """The name torch.export + coremltools give a module's weight const (p_<fqn>_weight[_to_fp16])."""
    return "p_" + fqn.replace(".", "_") + "_weight" + ("_to_fp16" if fp16 else "")


@dataclass
class Packed:
    fqn: str  # module name in CoreMLDecoder
    const: str  # the weight's const name in the converted program
    codes: QuantizedWeight | None  # None: stays float, or palettized (`bits`)
    bits: int | None = None


def packs(module, plan, codes: dict[str, QuantizedWeight], fp16: bool, tied: bool,
          palettize: bool) -> tuple[list[Packed], QuantReport]:
    """One Packed per weight const of the converted program, and the per-weight report."""
    out, report = [], QuantReport()
    elem = 2 if fp16 else 4
    precision = "float16" if fp16 else "float32"
    for fqn, (source, rows) in module.sources.items():
        if tied and fqn == "lm_head":
            continue  # one const with the embedding, packed and reported with it
        w = module.get_submodule(fqn).weight
        out_f, in_f = w.shape
        p = plan[source]
        sources = [source] + (["lm_head.weight"] if tied and fqn == "embed_tokens" else [])
        if p.shares:  # the tied table: the lm_head's codes (at the finer of the two rules)
            p = plan[p.shares]
        float_bytes = w.numel() * 4  # the fp32 baseline every target's report uses
        const = const_name(fqn, fp16)
        if p.bits is None:
            out.append(Packed(fqn, const, None))
            report.add(WeightEntry(fqn, sources, [out_f, in_f], precision, None, None, float_bytes,
                                   w.numel() * elem, p.reason))
            continue
        if palettize:
            groups = -(-out_f // PALETTE_GROUP)
            out.append(Packed(fqn, const, None, p.bits))
            report.add(WeightEntry(fqn, sources, [out_f, in_f], f"palette {p.bits}-bit per {PALETTE_GROUP} rows",
                                   p.bits, None, float_bytes, w.numel() * p.bits // 8 + groups * (2 ** p.bits) * elem,
                                   p.reason))
            continue
        qw = codes[p.name] if rows is None else codes[p.name].rows(*rows)
        out.append(Packed(fqn, const, qw, qw.bits))
        where = "per-channel" if qw.group == in_f else f"block={qw.group}"
        report.add(WeightEntry(fqn, sources, [out_f, in_f], f"int{qw.bits} {where} "
                               f"{'sym' if qw.symmetric else 'asym'} {p.method}", qw.bits,
                               None if qw.group == in_f else qw.group, float_bytes,
                               qw.stored_bytes(elem), p.reason))
    return out, report


def kmeans_1d(values: np.ndarray, nbits: int, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(lookup table of 2**nbits values, index per value): Lloyd's k-means on a line.

    In 1-D the clusters of sorted data are runs, so each step is a search for the midpoints and
    a cumulative sum, not a distance matrix. Every value ends on its nearest table entry (what
    `verify`'s package check tests). The start decides what survives: from quantiles alone, a group's
    few outlier weights fall into the outermost cluster, whose mean stays near the bulk, and are lost
    (SmolLM2-135M, 4-bit palettes on every linear: perplexity 456,851 against 33.8 in fp32 on 512
    tokens). Half the entries start on quantiles (the bulk) and half on an even grid over [min, max]
    (the tails, as linear quantization covers them): perplexity 63.6 at 4 bits, 33.9 at 8 bits.
    """
    x = np.sort(values.astype(np.float32).ravel())
    k = 2 ** nbits
    bulk = x[((np.arange(k // 2) + 0.5) / (k // 2) * (x.size - 1)).astype(int)]
    tails = np.linspace(x[0], x[-1], k - k // 2, dtype=np.float32)
    table = np.sort(np.concatenate([bulk, tails]))
    csum = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    for _ in range(iters):
        cut = np.searchsorted(x, (table[1:] + table[:-1]) / 2)
        lo, hi = np.concatenate([[0], cut]), np.concatenate([cut, [x.size]])
        n = hi - lo
        table = np.sort(np.where(n > 0, (csum[hi] - csum[lo]) / np.maximum(n, 1), table).astype(np.float32))
    table = table.astype(values.dtype)  # the stored precision decides the nearest entry
    mids = (table[1:].astype(np.float32) + table[:-1].astype(np.float32)) / 2
    return table, np.searchsorted(mids, values.astype(np.float32).ravel()).astype(np.uint8)


def _palette_config(bits: int):
    import coremltools.optimize.coreml as cto

    # mode "custom" with our 1-D k-means: coremltools' "kmeans" runs scikit-learn once per group
    # of 16 rows (12,800 groups for SmolLM2-135M: over 10 minutes here); this takes seconds.
    # (Not `enable_per_channel_scale`: coremltools folds that scale into the tables, one table per
    # row group and input column, which made reading an 8-bit package back run out of 24 GB, and
    # it did not rescue 4-bit SmolLM2 either: perplexity 1286 with it, 633k without.)
    return cto.OpPalettizerConfig(mode="custom", lut_function=partial(kmeans_1d, nbits=bits),
                                  granularity="per_grouped_channel", group_size=PALETTE_GROUP, weight_threshold=0)


def stored_name(op_name: str) -> str:
    """The const name a weight op of the program stands for (const_name): coremltools names a constexpr
    op it made from a const `<const>_quantized` or `_palettized`, and one it cast to float16 `<name>_cast_fp16`
    (a const cast to float16 is `<name>_to_fp16`)."""
    name = op_name.removesuffix("_pcs").removesuffix("_quantized").removesuffix("_palettized")
    return name.removesuffix("_cast_fp16") + "_to_fp16" if name.endswith("_cast_fp16") else name


def module_weights(plan, codes: dict[str, QuantizedWeight]):
    """`weight(source, rows, embedding)` for CoreMLDecoder: a planned weight's codes as a torchao tensor
    (the same tensor for a tied table and its lm_head), or None for a float weight.

    torch.export turns each into a torchao `dequantize_affine`, which coremltools converts into a
    constexpr_blockwise_shift_scale holding these codes and scales as they are (`name_weight_ops`
    names it): no float copy of a quantized weight is ever made, so the checkpoint can stream."""
    from ..torch_parts import torchao_weight

    made = {}

    def weight(source: str, rows, embedding: bool = False):
        p = plan[source]
        p = plan[p.shares] if p.shares else p
        if p.bits is None:
            return None
        if (p.name, rows) not in made:
            qw = codes[p.name] if rows is None else codes[p.name].rows(*rows)
            made[p.name, rows] = torchao_weight(qw, "float", embedding)
        return made[p.name, rows]
    return weight


def weight_owners(module) -> dict[str, str]:
    """Module name -> the module its quantized weight is named after: itself, or for codes several modules
    read (a tied embedding and lm_head) the first of them in `module.sources` (the report's order)."""
    first: dict[int, str] = {}
    weights = {fqn: module.get_submodule(fqn).weight for fqn in module.sources}
    return {fqn: first.setdefault(w.qdata.untyped_storage().data_ptr(), fqn) for fqn, w in weights.items()
            if hasattr(w, "qdata")}


def name_weight_ops(program, owners: dict[str, str]) -> None:
    """Name each `dequantize_affine` of the exported program after its weight's const (const_name of its
    module's owner: weight_owners), and make the ops of codes several modules read one op."""
    import torch

    graph = program.graph_module.graph
    params = program.graph_signature.inputs_to_parameters  # placeholder -> "<module>.parametrizations.weight.original0"
    groups: dict[tuple, list] = {}  # the same codes and scales -> the ops reading them, in graph order
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.torchao.dequantize_affine.default:
            key = tuple(program.state_dict[params[a.name]].untyped_storage().data_ptr()
                        for a in node.args if isinstance(a, torch.fx.Node))
            groups.setdefault(key, []).append(node)
    for nodes in groups.values():
        fqn, sep, _ = params[nodes[0].args[0].name].partition(".parametrizations.weight.")
        if not sep or fqn not in owners:
            raise RuntimeError(f"quantized weight {params[nodes[0].args[0].name]} is not a module's parametrized weight")
        for node in nodes[1:]:  # the first in graph order stays: it comes before every use
            node.replace_all_uses_with(nodes[0])
            graph.erase_node(node)
        nodes[0]._rename(const_name(owners[fqn], False))
    program.graph_module.recompile()


def _check_consts(mlmodel, packed: list[Packed]) -> None:
    """Every planned weight is in the program (a weight op made from its codes, or a float const still),
    and no weight matrix is there that the plan does not cover."""
    ops = mlmodel._mil_program.functions["main"].operations
    feeds_weight_op = lambda op: any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops)  # noqa: E731
    consts = {op.name: op.outputs[0].val for op in ops if op.op_type == "const" and not feeds_weight_op(op)}
    made = {stored_name(op.name) for op in ops if op.op_type == "constexpr_blockwise_shift_scale"}
    missing = [p.const for p in packed if (p.const not in made if p.codes is not None else p.const not in consts)]
    if missing:  # a renamed const would silently stay float: refuse instead
        raise RuntimeError(f"weights {missing[:3]} not found in the converted program")
    planned = {p.const for p in packed}
    unplanned = [n for n, v in consts.items() if n.startswith("p_") and getattr(v, "ndim", 0) == 2 and n not in planned]
    if unplanned:  # a weight matrix no rule covered (e.g. a tied table that was not shared)
        raise RuntimeError(f"weight consts {unplanned[:3]} are not covered by the quantization plan")


def apply(mlmodel, packed: list[Packed]):
    """Checks that every planned weight is in `mlmodel` as planned, and palettizes those planned so;
    returns the model."""
    import coremltools.optimize.coreml as cto

    _check_consts(mlmodel, packed)
    palette = {p.const: _palette_config(p.bits) for p in packed if p.codes is None and p.bits is not None}
    if palette:
        mlmodel = cto.palettize_weights(mlmodel, config=cto.OptimizationConfig(op_name_configs=palette))
    return mlmodel


# --- reading the weights back out of a saved package --------------------------------------------

def load_program(package):
    """The MIL program stored in an .mlpackage, loaded without Core ML (works on Linux)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    return spec, milproto_load(spec, spec.specificationVersion, model.weights_dir)


def _dequantize(op, produced: dict) -> np.ndarray:
    """numpy dequantization of one constexpr op (Core ML's documented formulas). `produced`: the
    arrays of earlier constexpr ops (a palette's per-row scale is a second op on the table's output)."""
    if op.op_type == "constexpr_blockwise_shift_scale":
        data = op.data.val if op.data.val is not None else produced[op.data.name]
        data = data.astype(np.float32)
        scale = op.scale.val.astype(np.float32)
        offset = op.offset.val.astype(np.float32) if op.offset is not None else None
        reps = [d // s for d, s in zip(data.shape, scale.shape)]
        if offset is not None:
            data = data - np.kron(offset, np.ones(reps, np.float32))
        return data * np.kron(scale, np.ones(reps, np.float32))
    if op.op_type == "constexpr_lut_to_dense":
        idx = op.indices.val.astype(np.int64)
        lut = effective_lut(op, produced)
        r = np.arange(idx.shape[0]) // (idx.shape[0] // lut.shape[0])
        c = np.arange(idx.shape[1]) // (idx.shape[1] // lut.shape[1])
        return lut[r[:, None], c[None, :], idx]  # a gather: each weight reads its own table
    raise ValueError(f"unexpected weight op {op.op_type}")


def effective_lut(op, produced: dict) -> np.ndarray:
    """A palette op's tables [row groups, column groups, entries], after any scale op on them
    (coremltools folds `enable_per_channel_scale` into the tables as a scale op)."""
    lut = op.lut.val if op.lut.val is not None else produced[op.lut.name]
    return lut.astype(np.float32)[..., 0]


def read_weights(package) -> dict[str, tuple[str, np.ndarray, dict]]:
    """const name -> (storage kind, float weight as computed with, {op type: constexpr op, "tables"}).

    Kinds: "const" (float), "linear" (int codes and scales), "palette" (indices into lookup tables,
    "tables" holding them as computed with, scales folded in).
    """
    _, prog = load_program(package)
    out, produced, chains = {}, {}, {}
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            name = stored_name(op.name)
            produced[op.outputs[0].name] = _dequantize(op, produced)
            chains.setdefault(name, {})[op.op_type] = op
            if op.op_type == "constexpr_lut_to_dense":
                chains[name]["tables"] = effective_lut(op, produced)
            kind = "palette" if "constexpr_lut_to_dense" in chains[name] else "linear"
            out[name] = (kind, produced[op.outputs[0].name], chains[name])
        elif op.op_type == "const" and op.name.startswith("p_") and op.outputs[0].val is not None:
            out[op.name] = ("const", np.asarray(op.outputs[0].val, dtype=np.float32), {})
    return out
