"""Mixed precision in the manner of llama.cpp's Q4_K_M: the most sensitive weights int8, within a size budget.

Sensitivity is measured, not guessed: on the calibration text, each decoder weight group (a unit:
layers.i.qkv, .o, .gate_up, .down, and the lm_head) is rounded to int4 on its own while everything
else stays float, and the mean KL(float || that) of the next-token distributions is its
sensitivity. One sweep over the layers reads each once: the float hidden states and those of every
unit met so far go through each layer in turn (a unit in layer i costs layers i.. onward in compute).
Units are then moved to int8 in order of sensitivity per extra byte until the budget (a fraction of
the plain plan's stored size) is spent; the report says which and why.
"""
from __future__ import annotations

import dataclasses
import itertools

from .. import progress
from .calibration import DecoderForward, chunks
from .methods import METHODS
from .plan import QuantPlan, WeightPlan, at_bits

SENSITIVITY_TOKENS = 64  # calibration tokens the KL is measured on (enough to rank; keeps it cheap)
PROBE_METHOD = "rtn"  # the int4 rounding each unit is probed with (data-free and fast)
TOP_TOKENS = 32  # the KL is taken over the tokens that are in some position's float top-32 (the mass)


def _kl(ref_logp, logits) -> float:
    import torch

    lp = torch.log_softmax(logits.double(), -1)
    return float((ref_logp.exp() * (ref_logp - lp)).sum(-1).mean())


def _vocab_subset(fwd, h):
    """(rows of the lm_head to score, the float reference's log-probabilities over them): the union of
    every position's top tokens carries nearly all the probability, at a fraction of the lm_head's cost."""
    import torch

    full = fwd.logits(h)
    keep = torch.unique(full.topk(min(TOP_TOKENS, full.shape[-1]), -1).indices)
    return keep, torch.log_softmax(full[..., keep].double(), -1)


def unit_sensitivity(dec, plan: QuantPlan, ids: list[int]) -> dict[str, float]:
    """unit -> mean KL on `ids` when only that unit's weights are int4 (as planned) and the rest float."""
    import torch

    units = _units(plan)
    by_layer: dict[int, list[str]] = {}
    for unit in units:
        if unit.startswith("layers."):
            by_layer.setdefault(int(unit.split(".")[1]), []).append(unit)
    seq = torch.tensor([chunks(ids, dec.max_context)[0][:SENSITIVITY_TOKENS]])
    fwd = DecoderForward(dec)

    def probed(unit, run):
        """run() with the unit's weights rounded to int4 (from the float copies the forward holds)."""
        floats = {w.name: fwd.weight(w.name) for w in units[unit]}
        rtn = METHODS.get(PROBE_METHOD)
        fwd.set({w.name: rtn(floats[w.name].numpy(), dataclasses.replace(w, method=PROBE_METHOD)).dequantize()
                 for w in units[unit]})
        try:
            return run()
        finally:
            fwd.set(floats)

    # One sweep over the layers, each read once: the float state, and the state of every unit met so far
    # (its layer run with that unit at int4, the layers after it float), go through each layer in turn.
    # Layer i runs 1 + (units in layers 0..i) states: the later layers take longer (the ETA fits it).
    work = [1 + met for met in itertools.accumulate(len(by_layer.get(i, [])) for i in range(dec.num_layers))]
    with torch.no_grad():
        x, after = fwd.embed(seq), {}
        for i, layer in progress.steps(enumerate(dec.layers), "measuring each weight group's int4 cost",
                                       total=dec.num_layers, work=work):
            after = {unit: fwd.layer(layer, state) for unit, state in after.items()}
            after.update({unit: probed(unit, lambda: fwd.layer(layer, x)) for unit in by_layer.get(i, [])})
            x = fwd.layer(layer, x)
            fwd.release_layer(layer)
        keep, ref = _vocab_subset(fwd, x)
        head = fwd.head_rows(keep)  # read once for every unit's state (from a checkpoint: row by row)
        kl = {unit: _kl(ref, fwd.logits(state, head=head)) for unit, state in after.items()}
        if "lm_head" in units:
            kl["lm_head"] = probed("lm_head", lambda: _kl(ref, fwd.logits(x, rows=keep)))
    return {unit: kl[unit] for unit in units}


def promote(plan: QuantPlan, sensitivity: dict[str, float], budget: float) -> QuantPlan:
    """The plan with the units of highest sensitivity per extra byte at int8, spending at most
    `budget` x the plan's stored bytes."""
    by_unit = _units(plan)
    cost = {u: _extra_bytes(plan, by_unit[u]) for u in sensitivity}
    chosen, spent = [], 0
    for u in sorted(sensitivity, key=lambda u: sensitivity[u] / max(cost[u], 1), reverse=True):
        if spent + cost[u] <= budget * _stored(plan):
            chosen.append(u)
            spent += cost[u]
    return promote_units(plan, chosen, budget, sensitivity)


def promote_units(plan: QuantPlan, units: list[str], budget: float,
                  sensitivity: dict[str, float] | None = None) -> QuantPlan:
    """The plan with `units` at int8 (as measured by `promote`, or as an export recorded them)."""
    by_unit = _units(plan)
    unknown = [u for u in units if u not in by_unit]
    if unknown:
        raise ValueError(f"mixed precision names units {unknown[:3]} that this plan has no int4 weights in")
    sensitivity = sensitivity or {}  # none when replaying the units an export recorded
    rank = {u: i + 1 for i, u in enumerate(sorted(sensitivity, key=sensitivity.get, reverse=True))}
    weights = []
    for w in plan.weights:
        note = f"; sensitivity {sensitivity[w.unit]:.4f} KL (rank {rank[w.unit]} of {len(rank)})" \
            if sensitivity and w.unit in sensitivity else ""
        if w.unit in units:
            weights.append(dataclasses.replace(at_bits(w, 8, plan.limits), reason=w.reason + note +
                                               f": int8 (mixed precision, budget +{budget:.0%} size)"))
        else:
            weights.append(dataclasses.replace(w, reason=w.reason + note))
    out = QuantPlan(plan.target, weights, plan.limits, dict(plan.calibration))
    extra = _stored(out) - _stored(plan)
    order = sorted(units, key=lambda u: -(sensitivity or {}).get(u, 0))
    out.calibration["mixed_precision"] = {"budget": budget, "extra_bytes": int(extra), "int8_units": order}
    return out


def _units(plan: QuantPlan) -> dict[str, list[WeightPlan]]:
    """The int4 linear units a plan could move to int8, with their weights."""
    by_unit: dict[str, list[WeightPlan]] = {}
    for w in plan.weights:
        if w.quantized and w.kind == "linear" and w.bits == 4:
            by_unit.setdefault(w.unit, []).append(w)
    return by_unit


def _extra_bytes(plan: QuantPlan, ws: list[WeightPlan]) -> int:
    return sum(plan.stored_bytes(at_bits(w, 8, plan.limits)) - plan.stored_bytes(w) for w in ws)


def _stored(plan: QuantPlan) -> int:
    return sum(plan.stored_bytes(w) for w in plan.weights)
