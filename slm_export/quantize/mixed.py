"""Mixed precision in the manner of llama.cpp's Q4_K_M: the most sensitive weights int8, within a size budget.

Sensitivity is measured, not guessed: on the calibration text, each decoder weight group (a unit:
layers.i.qkv, .o, .gate_up, .down, and the lm_head) is rounded to int4 on its own while everything
else stays float, and the mean KL(float || that) of the next-token distributions is its
sensitivity. The hidden states entering every layer are computed once, so a unit in layer i costs
only layers i.. onward. Units are then moved to int8 in order of sensitivity per extra byte until
the budget (a fraction of the plain plan's stored size) is spent; the report says which and why.
"""
from __future__ import annotations

import dataclasses

from .calibration import DecoderForward, chunks
from .methods import METHODS
from .plan import QuantPlan, WeightPlan, at_bits, decoder_weights

SENSITIVITY_TOKENS = 128  # calibration tokens the KL is measured on (enough to rank; keeps it cheap)
PROBE_METHOD = "mse"  # the int4 rounding each unit is probed with (data-free, close to what GPTQ leaves)


def _kl(ref_logp, logits) -> float:
    import torch

    lp = torch.log_softmax(logits.double(), -1)
    return float((ref_logp.exp() * (ref_logp - lp)).sum(-1).mean())


def unit_sensitivity(dec, plan: QuantPlan, ids: list[int]) -> dict[str, float]:
    """unit -> mean KL on `ids` when only that unit's weights are int4 (as planned) and the rest float."""
    import torch

    arrays = {name: arr for name, _, arr, _ in decoder_weights(dec)}
    units: dict[str, list[WeightPlan]] = {}
    for w in plan.weights:
        if w.quantized and w.kind == "linear" and w.bits == 4:
            units.setdefault(w.unit, []).append(w)
    seq = torch.tensor([chunks(ids, dec.max_context)[0][:SENSITIVITY_TOKENS]])
    fwd = DecoderForward(dec)
    with torch.no_grad():
        xs = [fwd.embed(seq)]
        for layer in dec.layers:
            xs.append(fwd.layer(layer, xs[-1]))
        ref = torch.log_softmax(fwd.logits(xs[-1]).double(), -1)
        out = {}
        for unit, ws in units.items():
            probe = {w.name: METHODS.get(PROBE_METHOD)(arrays[w.name], dataclasses.replace(w, method=PROBE_METHOD))
                     .dequantize() for w in ws}
            fwd.set(probe)
            start = int(unit.split(".")[1]) if unit.startswith("layers.") else dec.num_layers
            x = xs[start]
            for layer in dec.layers[start:]:
                x = fwd.layer(layer, x)
            out[unit] = _kl(ref, fwd.logits(x))
            fwd.set({name: arrays[name] for name in probe})
    return out


def promote(plan: QuantPlan, sensitivity: dict[str, float], budget: float) -> QuantPlan:
    """The plan with the units of highest sensitivity per extra byte at int8, spending at most
    `budget` x the plan's stored bytes."""
    def int8_plan(w: WeightPlan) -> WeightPlan:
        return at_bits(w, 8, plan.limits)

    base = sum(plan.stored_bytes(w) for w in plan.weights)
    allowance = budget * base
    by_unit: dict[str, list[WeightPlan]] = {}
    for w in plan.weights:
        if w.unit in sensitivity:
            by_unit.setdefault(w.unit, []).append(w)
    cost = {u: sum(plan.stored_bytes(int8_plan(w)) - plan.stored_bytes(w) for w in ws) for u, ws in by_unit.items()}
    ranked = sorted(sensitivity, key=lambda u: sensitivity[u] / max(cost[u], 1), reverse=True)
    rank = {u: i + 1 for i, u in enumerate(sorted(sensitivity, key=sensitivity.get, reverse=True))}
    chosen, spent = set(), 0
    for u in ranked:
        if spent + cost[u] <= allowance:
            chosen.add(u)
            spent += cost[u]
    weights = []
    for w in plan.weights:
        if w.unit not in sensitivity:
            weights.append(w)
            continue
        note = (f"; sensitivity {sensitivity[w.unit]:.4f} KL (rank {rank[w.unit]} of {len(rank)})")
        if w.unit in chosen:
            weights.append(dataclasses.replace(int8_plan(w), reason=w.reason + note +
                                               f": int8 (mixed precision, +{budget:.0%} size budget)"))
        else:
            weights.append(dataclasses.replace(w, reason=w.reason + note))
    out = QuantPlan(plan.target, weights, plan.limits, dict(plan.calibration))
    out.calibration["mixed_precision"] = {"budget": budget, "extra_bytes": int(spent),
                                          "int8_units": sorted(chosen, key=lambda u: -sensitivity[u])}
    return out

