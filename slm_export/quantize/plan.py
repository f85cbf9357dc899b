"""The quantization plan: the spec's rules resolved, weight by weight, against a target's limits.

One `WeightPlan` per PyTorch weight (q_proj, k_proj, ... by their parameter names): whether it is
stored float or as integer codes, at which bits and group, symmetric or not, with which algorithm
and at which scale precision, and why. The quantizer computes codes from it, the exporters pack
them, and `fit` and the per-weight report count bytes from it, so all of them agree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np

from .limits import SCALE_BYTES, TargetLimits
from .methods import CALIBRATED, EQUALIZING, METHODS
from .spec import QuantSpec, block_size_for

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
DATA_FREE_FALLBACK = "mse"  # for weights no activation statistics exist for (an embedding is a lookup)


@dataclass(frozen=True)
class WeightPlan:
    name: str  # the PyTorch parameter name
    unit: str  # the decoder weight it is part of (layers.3.qkv): parts of one unit share bits
    shape: tuple[int, int]  # [out, in]
    kind: str  # "linear" or "embedding"
    bits: int | None  # None: kept float
    group: int | None  # elements per scale along `in`; None: one per output channel (or row)
    symmetric: bool
    method: str | None
    scale_dtype: str
    reason: str
    shares: str | None = None  # a tied embedding gathered out of this weight's codes (stores no codes)
    signed_scales: bool = True  # scales may be negative (quantize/limits.py)

    @classmethod
    def of(cls, shape: tuple[int, int], bits: int, group: int | None = 32, symmetric: bool = True,
           method: str = "rtn", scale_dtype: str = "float32", signed_scales: bool = True) -> "WeightPlan":
        """A plan for one linear weight on its own (tests, experiments, the Python API)."""
        return cls("weight", "weight", tuple(shape), "linear", bits, group, symmetric, method, scale_dtype,
                   "given", signed_scales=signed_scales)

    def group_for(self, k: int) -> int:
        return self.group or k

    @property
    def quantized(self) -> bool:
        return self.bits is not None and self.shares is None

    def scheme(self) -> str:
        if self.shares:
            return f"int{self.bits} shared with {self.shares}"
        if self.bits is None:
            return "float"
        where = "per-row" if self.kind == "embedding" and self.group is None else \
            "per-channel" if self.group is None else f"group={self.group}"
        return f"int{self.bits} {where} {'sym' if self.symmetric else 'asym'} {self.method}"


@dataclass
class QuantPlan:
    target: str
    weights: list[WeightPlan]
    limits: TargetLimits
    calibration: dict = field(default_factory=dict)  # what text calibrated it (filled by the quantizer)

    def __getitem__(self, name: str) -> WeightPlan:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {w.name: w for w in self.weights}

    def get(self, name: str) -> WeightPlan | None:
        return self._by_name.get(name)

    @property
    def calibrated(self) -> bool:
        return any(w.method in CALIBRATED for w in self.weights if w.quantized)

    @property
    def equalizes(self) -> bool:
        """Whether the model is rescaled before rounding (AWQ, quantize/awq.py)."""
        return any(w.method in EQUALIZING for w in self.weights if w.quantized)

    def stored_bytes(self, w: WeightPlan) -> int:
        """Bytes the target stores for weight `w` (codes, scales, zero points; or float)."""
        out, k = w.shape
        if w.bits is None:
            return out * k * self.limits.float_bytes
        group = w.group_for(k)
        n_scales = out * -(-k // group)
        scale_bytes = SCALE_BYTES[w.scale_dtype]
        if w.shares:
            return n_scales * scale_bytes if self.limits.shared_table_copies_scales else 0
        codes = out * -(-k // group) * group * w.bits // 8
        return codes + n_scales * scale_bytes + (0 if w.symmetric else -(-n_scales * w.bits // 8))

    def to_dict(self) -> dict:
        return {"target": self.target, "calibration": self.calibration,
                "weights": [asdict(w) | {"shape": list(w.shape)} for w in self.weights]}



def _group(k: int, asked: int, minimum: int, indivisible: str) -> tuple[int | None, int | None, str]:
    """(group, bits override, note) for an int4 weight of width k."""
    group, note = block_size_for(k, asked, minimum)
    if k % group == 0 or indivisible == "pad":
        return group, None, note
    return None, 8, f"in-features {k} not divisible by {minimum} (the smallest int4 group here): stored int8 per-channel instead"


def resolve(spec: QuantSpec, limits: TargetLimits, shapes: list[tuple[str, str, tuple[int, int], str]],
            tied: bool, default_method) -> QuantPlan:
    """The plan for weights `shapes` = [(name, unit, (out, in), kind)], in order.

    `default_method(bits, symmetric) -> name`: the target's method at the spec's bits when the spec names none.
    """
    by_name = {name: (unit, shape, kind) for name, unit, shape, kind in shapes}
    head_req = spec.plan_for(LM_HEAD) if LM_HEAD in by_name else None
    emb_req = spec.plan_for(EMBEDDING) if EMBEDDING in by_name else None
    shared = None  # how a tied table is stored: "lm_head" (the embedding gathers its codes) or None
    if tied and head_req is not None and emb_req is not None and emb_req.bits is not None and head_req.bits is not None:
        if limits.tied_table == "shared":
            shared = "finer"
        elif limits.tied_table == "shared-if-alike" and emb_req.bits == head_req.bits and head_req.symmetric:
            hidden = by_name[LM_HEAD][1][1]
            group = block_size_for(hidden, head_req.group_size, limits.min_group)[0]
            shared = "alike" if hidden % group == 0 else None

    plans = []
    for name, unit, (out, k), kind in shapes:
        req = spec.plan_for(name)
        bits, reason, symmetric = req.bits, req.reason, req.symmetric
        if shared == "finer" and name in (EMBEDDING, LM_HEAD):
            bits = max(emb_req.bits, head_req.bits)
            reason = (f"tied embedding and lm_head: one table, at the finer of the two rules "
                      f"({emb_req.reason}: {emb_req.bits}; {head_req.reason}: {head_req.bits})")
            if name == EMBEDDING:
                plans.append(WeightPlan(name, unit, (out, k), kind, bits, None, symmetric, None, "float32",
                                        reason, shares=LM_HEAD))
                continue
            kind = "linear"
        if bits is None:
            plans.append(WeightPlan(name, unit, (out, k), kind, None, None, symmetric, None, "float32", reason))
            continue
        if kind == "embedding" and shared == "alike":
            head = head_req
            group = block_size_for(k, head.group_size, limits.min_group)[0]
            plans.append(WeightPlan(name, unit, (out, k), kind, head.bits, group, True, None,
                                    limits.scale_precision(head.bits), reason + "; tied: stored once with lm_head",
                                    shares=LM_HEAD))
            continue
        # the export's method (at its --bits), whatever this weight's own bits: an int8 lm_head in an int4
        # export is rounded like the rest
        method = spec.method or default_method(spec.bits, spec.symmetric)
        if kind == "embedding":
            if not symmetric and not limits.embedding_zero_points:
                symmetric = True
                reason += f"; the {limits.target} target stores a table of its own symmetric"
            if bits not in limits.embedding_bits:
                reason += f"; the {limits.target} target stores a table of its own at int{max(limits.embedding_bits)}"
                bits = max(limits.embedding_bits)
            group = None
            if bits == 4:
                group, override, note = _group(k, req.group_size, limits.embedding_min_group, "int8")
                bits = override or bits
                reason += f"; {note}" if note else ""
            if method in CALIBRATED:
                reason += f"; {method} needs activations and a lookup has none: {DATA_FREE_FALLBACK}"
                method = DATA_FREE_FALLBACK
            plans.append(WeightPlan(name, unit, (out, k), kind, bits, group, symmetric, method,
                                    limits.embedding_scale_dtype, reason))
            continue
        group = None
        if bits == 4 or not limits.int8_per_channel:
            group, override, note = _group(k, req.group_size, limits.min_group, limits.indivisible)
            if override:
                bits, group = override, (None if limits.int8_per_channel else group)
            reason += f"; {note}" if note else ""
        plans.append(WeightPlan(name, unit, (out, k), kind, bits, group, symmetric, method,
                                limits.scale_precision(bits), reason))
    METHODS.get(spec.method) if spec.method else None  # an unknown name lists the choices
    if not limits.signed_scales:
        plans = [dataclasses.replace(p, signed_scales=False) for p in plans]
    return QuantPlan(limits.target, plans, limits)


def at_bits(w: WeightPlan, bits: int, limits: TargetLimits) -> WeightPlan:
    """Linear weight `w` planned at `bits` instead (int8 per channel where the target keeps it so)."""
    group = None if bits == 8 and limits.int8_per_channel else (w.group or block_size_for(
        w.shape[1], 32, limits.min_group)[0])
    return dataclasses.replace(w, bits=bits, group=group, scale_dtype=limits.scale_precision(bits))


def decoder_weights(dec) -> list[tuple[str, str, np.ndarray, str]]:
    """(name, unit, float32 [out, in] array, kind) of every weight matrix of a `Decoder`, in forward order.

    Parts of a fused decoder weight (q, k, v of qkv) are listed under their own parameter names; a
    parameter that is fused already (Phi-3's qkv_proj) is one entry.
    """
    out = [(EMBEDDING, "embed", dec.embed, "embedding")]
    for i, layer in enumerate(dec.layers):
        for key, lin in (("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.gate_up), ("down", layer.down)):
            parts = lin.parts() if len(lin.sources) > 1 else [lin]
            out += [(p.sources[0], f"layers.{i}.{key}", p.weight, "linear") for p in parts]
    out.append((LM_HEAD, "lm_head", dec.lm_head, "linear"))
    return out


def plan_for_decoder(spec: QuantSpec, limits: TargetLimits, dec, default_method) -> QuantPlan:
    shapes = [(name, unit, tuple(w.shape), kind) for name, unit, w, kind in decoder_weights(dec)]
    return resolve(spec, limits, shapes, dec.tied_embeddings, default_method)
