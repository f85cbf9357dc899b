"""The quant spec mapped to coremltools.optimize, and the weights read back out of a package.

Core ML quantizes weights only (activations stay float16/float32): int8 per output channel or
int4 per block of `group_size` along the input dimension (`constexpr_blockwise_shift_scale`), or,
with `--palettize`, a k-means lookup table of 2**bits values per group of 16 output channels
(`constexpr_lut_to_dense`). The plan is one `OptimizationConfig` with one entry per weight const,
applied once to the converted program.

A tied embedding and lm_head are one table in the package (coremltools de-duplicates the two
equal consts). It is quantized once, at the finer of the two rules' bit widths, so that neither
rule gets less precision than it asked for; the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ...quantize import QuantReport, QuantSpec, WeightEntry
from ...quantize.spec import block_size_for

PALETTE_GROUP = 16  # output channels sharing one lookup table (coremltools' per_grouped_channel)
MIN_BLOCK = 16


@dataclass
class WeightPlan:
    fqn: str  # module name in CoreMLDecoder
    const: str  # the weight's const name in the converted program
    bits: int | None
    block: int | None  # int4 block; None = per channel
    symmetric: bool
    palettize: bool


def const_name(fqn: str, fp16: bool) -> str:
    """The name torch.export + coremltools give a module's weight const (p_<fqn>_weight[_to_fp16])."""
    return "p_" + fqn.replace(".", "_") + "_weight" + ("_to_fp16" if fp16 else "")


def plan(module, spec: QuantSpec, fp16: bool, tied: bool) -> tuple[list[WeightPlan], QuantReport]:
    """One WeightPlan per weight const of the converted program, and the per-weight report."""
    plans, report = [], QuantReport()
    elem = 2 if fp16 else 4
    emb_plan = spec.plan_for("model.embed_tokens.weight")
    head_plan = spec.plan_for("lm_head.weight")
    for fqn, source in module.sources.items():
        w = module.get_submodule(fqn).weight
        out_f, in_f = w.shape
        p = spec.plan_for(source)
        bits, reason = p.bits, p.reason
        if tied and fqn == "lm_head":
            continue  # one table with the embedding, reported with it
        if tied and fqn == "embed_tokens":
            finer = [b for b in (emb_plan.bits, head_plan.bits)]
            bits = None if None in finer else max(finer)
            reason = (f"tied embedding and lm_head: one table, at the finer of the two rules "
                      f"({emb_plan.reason}: {emb_plan.bits}; {head_plan.reason}: {head_plan.bits})")
        float_bytes = w.numel() * 4  # the fp32 baseline every target's report uses
        precision = "float16" if fp16 else "float32"
        if bits is None:
            plans.append(WeightPlan(fqn, const_name(fqn, fp16), None, None, p.symmetric, False))
            report.add(WeightEntry(fqn, [source] + (["lm_head.weight"] if tied and fqn == "embed_tokens" else []),
                                   [out_f, in_f], f"{precision}", None, None, float_bytes, w.numel() * elem, reason))
            continue
        block = None
        if spec.palettize:
            groups = -(-out_f // PALETTE_GROUP)
            stored = w.numel() * bits // 8 + groups * (2 ** bits) * elem
            scheme = f"palette {bits}-bit per {PALETTE_GROUP} rows"
        else:
            if bits == 4:
                block, note = block_size_for(in_f, p.group_size, minimum=MIN_BLOCK)
                if in_f % block:  # no power-of-two block >= 16 divides: int8 per channel, said so
                    bits, block = 8, None
                    note = f"in-features {in_f} not divisible by {MIN_BLOCK}: stored int8 per-channel instead"
                reason = f"{reason}; {note}" if note else reason
            n_scales = out_f * (1 if block is None else in_f // block)
            stored = w.numel() * bits // 8 + n_scales * elem * (1 if p.symmetric else 2)
            scheme = (f"int{bits} " + ("per-channel" if block is None else f"block={block}") +
                      (" sym" if p.symmetric else " asym"))
        plans.append(WeightPlan(fqn, const_name(fqn, fp16), bits, block, p.symmetric, spec.palettize))
        report.add(WeightEntry(fqn, [source] + (["lm_head.weight"] if tied and fqn == "embed_tokens" else []),
                               [out_f, in_f], scheme, bits, block, float_bytes, stored, reason))
    return plans, report


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


def _op_config(p: WeightPlan):
    import coremltools.optimize.coreml as cto

    if p.palettize:
        # mode "custom" with our 1-D k-means: coremltools' "kmeans" runs scikit-learn once per group
        # of 16 rows (12,800 groups for SmolLM2-135M: over 10 minutes here); this takes seconds.
        # (Not `enable_per_channel_scale`: coremltools folds that scale into the tables, one table per
        # row group and input column, which made reading an 8-bit package back run out of 24 GB, and
        # it did not rescue 4-bit SmolLM2 either: perplexity 1286 with it, 633k without.)
        return cto.OpPalettizerConfig(mode="custom", lut_function=partial(kmeans_1d, nbits=p.bits),
                                      granularity="per_grouped_channel", group_size=PALETTE_GROUP, weight_threshold=0)
    return cto.OpLinearQuantizerConfig(
        mode="linear_symmetric" if p.symmetric else "linear", dtype=f"int{p.bits}" if p.symmetric else f"uint{p.bits}",
        granularity="per_channel" if p.block is None else "per_block",
        block_size=0 if p.block is None else p.block, weight_threshold=0)


def apply(mlmodel, plans: list[WeightPlan]):
    """Quantize (or palettize) every planned weight const of `mlmodel`; returns the new model."""
    import coremltools.optimize.coreml as cto

    consts = {op.name: op.outputs[0].val for op in mlmodel._mil_program.functions["main"].operations
              if op.op_type == "const"}
    missing = [p.const for p in plans if p.const not in consts]
    if missing:  # a renamed const would silently stay float: refuse instead
        raise RuntimeError(f"weight consts {missing[:3]} not found in the converted program")
    planned = {p.const for p in plans}
    unplanned = [n for n, v in consts.items() if n.startswith("p_") and getattr(v, "ndim", 0) == 2 and n not in planned]
    if unplanned:  # a weight matrix no rule covered (e.g. a tied table that was not shared)
        raise RuntimeError(f"weight consts {unplanned[:3]} are not covered by the quantization plan")
    plans = [p for p in plans if p.bits is not None]
    linear = {p.const: _op_config(p) for p in plans if p.bits is not None and not p.palettize}
    palette = {p.const: _op_config(p) for p in plans if p.bits is not None and p.palettize}
    if linear:
        mlmodel = cto.linear_quantize_weights(mlmodel, config=cto.OptimizationConfig(op_name_configs=linear))
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
            name = op.name.removesuffix("_pcs").removesuffix("_quantized").removesuffix("_palettized")
            produced[op.outputs[0].name] = _dequantize(op, produced)
            chains.setdefault(name, {})[op.op_type] = op
            if op.op_type == "constexpr_lut_to_dense":
                chains[name]["tables"] = effective_lut(op, produced)
            kind = "palette" if "constexpr_lut_to_dense" in chains[name] else "linear"
            out[name] = (kind, produced[op.outputs[0].name], chains[name])
        elif op.op_type == "const" and op.name.startswith("p_") and op.outputs[0].val is not None:
            out[op.name] = ("const", np.asarray(op.outputs[0].val, dtype=np.float32), {})
    return out
