"""The one quantizer: a `Decoder` and a `QuantPlan` in, integer codes and scales per weight out.

Exporters never round a weight themselves; they pack what this returns (MatMulNBits nibbles, torchao
tensors, Core ML constexpr ops). Data-free methods quantize weight by weight; calibrated ones (GPTQ)
run the calibration text through the decoder layer by layer (calibration.py) and quantize each
weight group with the statistics of its input, the groups before it already quantized.
"""
from __future__ import annotations

import numpy as np

from .. import progress
from .calibration import chunks, walk
from .codes import QuantizedWeight
from .methods import CALIBRATED, METHODS, Factored
from .plan import QuantPlan, WeightPlan, decoder_weights
from ..stored import is_stored, materialize


def _storage(w: WeightPlan) -> tuple:
    return w.method, w.bits, w.group, w.symmetric, w.scale_dtype, w.signed_scales, w.shape[1]


# Every method rounds each output row on its own (GPTQ too: all rows share one Hessian), so a large
# weight is quantized in row blocks of at most this many float32 bytes: a method's working copies are
# then those of one block, not of a whole 128k-row embedding. Smaller weights go in one piece, so
# their codes are the same bytes they always were.
ROW_BLOCK_BYTES = 64 * 2**20


def _quantize_one(w: WeightPlan, array, hessian=None) -> QuantizedWeight:
    method = METHODS.get(w.method)
    blocks = array.nbytes > ROW_BLOCK_BYTES
    if blocks and w.method in CALIBRATED:  # gptq (awq's rounding too): the Hessian factored once for every block
        hessian = Factored(hessian)
    run = (lambda a: method(a, w, hessian)) if w.method in CALIBRATED else (lambda a: method(a, w))
    if not blocks:
        return run(materialize(array))  # a weight still in the checkpoint is read now, and dropped after
    step = max(1, ROW_BLOCK_BYTES // (4 * array.shape[1]))
    rows = array.read_rows if is_stored(array) else (lambda a, b: array[a:b])  # a stored one: block by block
    return QuantizedWeight.concat([run(rows(r, min(r + step, array.shape[0]))) for r in range(0, array.shape[0], step)])


def quantize(dec, plan: QuantPlan, calibration_ids: list[int] | None = None) -> dict[str, QuantizedWeight]:
    """Codes for every weight the plan quantizes (a shared tied embedding has none of its own).

    `calibration_ids`: token ids of the calibration text, needed when a planned method is calibrated.
    """
    arrays = {name: arr for name, _, arr, _ in decoder_weights(dec)}
    todo = [w for w in plan.weights if w.quantized]
    out: dict[str, QuantizedWeight] = {}
    # the largest first: their working copies come and go before the codes of the rest are held
    free = sorted((w for w in todo if w.method not in CALIBRATED), key=lambda w: -w.shape[0] * w.shape[1])
    for w in progress.steps(free, f"quantizing weights ({', '.join(sorted({w.method for w in free}))})"):
        out[w.name] = _quantize_one(w, arrays[w.name])
    calibrated = [w for w in todo if w.method in CALIBRATED]
    if calibrated:
        if not calibration_ids:
            raise ValueError("a calibrated method needs calibration token ids")
        by_unit: dict[str, list[WeightPlan]] = {}
        for w in calibrated:
            by_unit.setdefault(w.unit, []).append(w)
        for unit, ws in by_unit.items():
            if len({_storage(w) for w in ws}) > 1:
                raise ValueError(f"the parts of {unit} are planned differently; a unit's parts share one scheme")
        seqs = chunks(calibration_ids, dec.max_context)
        plan.calibration.update(tokens=sum(len(s) for s in seqs), sequences=len(seqs))

        def on_unit(unit, hessian, forward):
            done = {}
            ws = by_unit.get(unit, [])
            if ws:
                # The parts of a unit share their input, and GPTQ treats rows independently: q|k|v
                # (or gate|up) quantized as one stacked matrix give each part's codes, in one pass.
                source = arrays[ws[0].name] if len(ws) == 1 else np.concatenate([arrays[w.name] for w in ws])
                stacked = _quantize_one(ws[0], source, hessian)
                start = 0
                for w in ws:
                    out[w.name] = stacked.rows(start, start + w.shape[0])
                    start += w.shape[0]
                    done[w.name] = out[w.name]
            if forward is None:  # the last unit: nothing downstream uses its weights
                return
            # weights quantized data-free in this unit are used quantized downstream too
            done.update({w.name: out[w.name] for w in todo if w.unit == unit and w.name in out and w.name not in done})
            forward.set({name: qw.dequantize() for name, qw in done.items()})

        count = progress.Count(f"calibrating and quantizing layers ({', '.join(sorted({w.method for w in calibrated}))})",
                               dec.num_layers)
        walk(dec, calibration_ids, on_unit, lambda i: count.step())
    return out


def linear_plan(plan: QuantPlan, lin) -> WeightPlan:
    """The plan of a decoder Linear (one source, a part of one, or several fused): its parts alike."""
    plans = [plan[s] for s in dict.fromkeys(lin.sources)]
    first = plans[0]
    if any((p.bits, p.group, p.symmetric) != (first.bits, first.group, first.symmetric) for p in plans):
        raise ValueError(f"fused weights {lin.sources} are planned differently; a unit's parts share one scheme")
    return first


def linear_codes(codes: dict[str, QuantizedWeight], lin) -> QuantizedWeight:
    """The codes of a decoder Linear: its source's, the rows it holds of it, or its sources' stacked."""
    if lin.rows is not None:
        return codes[lin.sources[0]].rows(*lin.rows)
    parts = [codes[s] for s in dict.fromkeys(lin.sources)]
    return parts[0] if len(parts) == 1 else QuantizedWeight.concat(parts)
