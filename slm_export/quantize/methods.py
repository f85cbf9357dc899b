"""Quantization algorithms, registered by name: weight (+ calibration statistics) -> codes and scales.

Every method receives one float32 [out, in] weight and its resolved `WeightPlan` (bits, group,
symmetry, the target's scale precision) and returns a `QuantizedWeight`. Calibrated methods also
receive `hessian`: X^T X / n of the weight's input over the calibration text ([in, in], float32).

  rtn   round to nearest. Symmetric: the group's largest-magnitude weight maps exactly to the grid's
        end (-8 at int4, scale = that weight / -8), as onnxruntime's own quantizer does; asymmetric:
        [min, max] over the full grid. Codes = round-half-away(w / scale + zero point), in float32.
  mse   per group, the scale with the least squared error among 22 candidates: rtn's and
        |extreme| / qmax, each x 0.80 .. 1.00. Never worse than rtn for any group (rtn is a candidate).
  hqq   torchao's HQQ scale-only solver (alternating least squares on the scale, symmetric only).
  gptq  GPTQ (Frantar et al. 2023): columns quantized in order of activation energy, each one's
        rounding error spread over the columns not yet quantized through the inverse Hessian; group
        scales chosen first by the activation-weighted version of `mse` (static groups, so the
        stored layout is the plain one every target reads).
  awq   AWQ's per-channel scales (quantize/awq.py), folded into the preceding norms and rows before
        anything is rounded, then GPTQ's rounding of the rescaled weights.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..registry import Registry
from .codes import QuantizedWeight, grid, round_scales

METHODS: Registry = Registry("quantization method (--quant-method)")
# Methods that need calibration text (their statistics come from running the model on it).
CALIBRATED: set[str] = set()
# Methods that first rescale the model, outputs unchanged (quantize/awq.py), then round like another.
EQUALIZING: set[str] = {"awq"}

_FRACTIONS = np.linspace(0.80, 1.0, 11, dtype=np.float32)[::-1]  # 1.0 first: ties keep rtn's scale
# The scale search goes over a weight in chunks of rows of about this many float32 bytes: each candidate
# scale makes eight passes over a chunk, which stay in the CPU's cache when the chunk is this small (3B
# shapes: 1.6x faster than chunks of 4096 rows). Every row is searched on its own: same scales at any size.
_SEARCH_CHUNK_BYTES = 4 * 2**20


def method(name: str, calibrated: bool = False) -> Callable:
    def add(fn):
        if calibrated:
            CALIBRATED.add(name)
        return METHODS.register(name)(fn)
    return add


def _groups(w: np.ndarray, group: int) -> np.ndarray:
    """[out, in] -> [out, groups, group], a last partial group zero-padded (zeros round to 0 exactly)."""
    out, k = w.shape
    n = -(-k // group)
    if n * group != k:
        w = np.concatenate([w, np.zeros((out, n * group - k), w.dtype)], axis=1)
    return w.reshape(out, n, group)


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (what onnxruntime's quantizer uses), in one new array."""
    a = np.abs(x)
    a += np.float32(0.5)
    return np.copysign(np.floor(a, out=a), x, out=a)


def _codes_ort(wg: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, qmin: int, qmax: int) -> np.ndarray:
    """round-half-away(w * (1 / scale) + zero point), clamped, in float32, minus the zero point:
    onnxruntime's quantizer bit for bit (symmetric codes are offset by 2**(bits-1) while rounding)."""
    s = scales[..., None]
    recip = np.where(s != 0, np.float32(1) / np.where(s != 0, s, np.float32(1)), np.float32(0)).astype(np.float32)
    if zero is None:
        mid = np.float32(-qmin)
        return np.clip(_round_away((wg * recip + mid).astype(np.float32)), 0, qmax - qmin) - mid
    z = zero[..., None]
    return np.clip(_round_away((wg * recip + z).astype(np.float32)), qmin, qmax) - z


def _codes_even(wg: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, qmin: int, qmax: int) -> np.ndarray:
    """round-half-even(w / scale) (+ zero), clamped; returns the codes minus the zero point."""
    q = np.rint(wg / scales[..., None])
    if zero is None:
        return np.clip(q, qmin, qmax)
    return np.clip(q + zero[..., None], qmin, qmax) - zero[..., None]


def _finish(w: np.ndarray, wg: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, plan,
            codes_fn=_codes_ort) -> QuantizedWeight:
    """Codes for the (already target-rounded) scales, as a QuantizedWeight with the weight's own width."""
    qmin, qmax = grid(plan.bits, plan.symmetric)
    q = codes_fn(wg, scales, zero, qmin, qmax)
    if zero is not None:
        q = q + zero[..., None]
    codes = q.reshape(w.shape[0], -1)[:, :w.shape[1]].astype(np.int8 if plan.symmetric else np.uint8)
    return QuantizedWeight(codes, scales.astype(np.float32), None if zero is None else zero.astype(np.uint8),
                           plan.bits, plan.group_for(w.shape[1]))


def _extreme(wg: np.ndarray) -> np.ndarray:
    """Each group's largest-magnitude weight, with its sign."""
    return np.take_along_axis(wg, np.abs(wg).argmax(-1)[..., None], -1)[..., 0]


def _rtn_scale(ext: np.ndarray, qmin: int, qmax: int, signed: bool) -> np.ndarray:
    """The scale that maps a group's extreme weight exactly onto the grid's end: -8 (int4) whatever
    its sign with signed scales; with positive scales only, -8 for a negative extreme, 7 for a positive one."""
    if signed:
        return (ext / np.float32(qmin)).astype(np.float32)
    s = np.where(ext < 0, ext / np.float32(qmin), ext / np.float32(qmax)).astype(np.float32)
    return np.where(ext == 0, np.float32(1), s)  # an all-zero group: any positive scale gives codes 0


def _asym_params(lo: np.ndarray, hi: np.ndarray, qmax: int, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(lo, 0).astype(np.float32), np.maximum(hi, 0).astype(np.float32)
    scales = round_scales(((hi - lo) / np.float32(qmax)).astype(np.float32), scale_dtype)
    safe = np.where(scales != 0, scales, np.float32(1))
    zero = np.where(scales != 0, np.float32(0) - lo / safe, lo).astype(np.float32)
    return scales, np.clip(_round_away(zero), 0, qmax).astype(np.float32)


@method("rtn")
def rtn(weight: np.ndarray, plan, hessian=None) -> QuantizedWeight:
    w = np.asarray(weight, np.float32)
    wg = _groups(w, plan.group_for(w.shape[1]))
    qmin, qmax = grid(plan.bits, plan.symmetric)
    if plan.symmetric:
        scales = round_scales(_rtn_scale(_extreme(wg), qmin, qmax, plan.signed_scales), plan.scale_dtype)
        return _finish(w, wg, scales, None, plan)
    scales, zero = _asym_params(wg.min(-1), wg.max(-1), qmax, plan.scale_dtype)
    return _finish(w, wg, scales, zero, plan)


def search_scales(wg: np.ndarray, plan, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(scales, zero points or None) per group of `wg` [out, groups, group] with the least squared
    error, weighted per input column by `importance` [groups, group] when given.

    Symmetric candidates: rtn's scale and |extreme| / qmax (|qmin| with positive scales), each x 1.00 .. 0.80:
    a smaller scale rounds the bulk of the group more finely and clips its outlier a little.
    Asymmetric candidates: [min, max] x 1.00 .. 0.80. Errors use round-half-even(w / scale).
    """
    import torch

    qmin, qmax = grid(plan.bits, plan.symmetric)
    imp = None if importance is None else torch.from_numpy(np.ascontiguousarray(importance, np.float32))[None]
    best_s = np.empty(wg.shape[:2], np.float32)
    best_z = None if plan.symmetric else np.empty(wg.shape[:2], np.float32)
    rows = max(1, _SEARCH_CHUNK_BYTES // (4 * wg.shape[1] * wg.shape[2]))
    for r0 in range(0, wg.shape[0], rows):
        g = wg[r0:r0 + rows]
        if plan.symmetric:
            ext = _extreme(g)
            nonzero = ext != 0
            # the second base lets a positive extreme clip a little at qmax (or reach -qmin's magnitude)
            second = np.abs(ext) / np.float32(qmax if plan.signed_scales else -qmin)
            candidates = [(np.where(nonzero, base * f, np.float32(1)).astype(np.float32), None)
                          for base in (_rtn_scale(ext, qmin, qmax, plan.signed_scales), second) for f in _FRACTIONS]
        else:
            lo, hi = g.min(-1), g.max(-1)
            candidates = [_asym_params(lo * f, hi * f, qmax, plan.scale_dtype) for f in _FRACTIONS]
        s_best, z_best = candidates[0][0].copy(), None if plan.symmetric else candidates[0][1].copy()
        err_best = np.full(g.shape[:2], np.inf, np.float32)
        gt = torch.from_numpy(np.ascontiguousarray(g))
        q = torch.empty_like(gt)  # one temporary, reused in place by every candidate
        for s, z in candidates:
            s = round_scales(s, plan.scale_dtype)
            st = torch.from_numpy(s)[..., None]
            torch.div(gt, torch.where(st != 0, st, torch.ones_like(st)), out=q).round_()  # half to even, as np.rint
            if z is None:
                q.clamp_(qmin, qmax)
            else:
                zt = torch.from_numpy(z)[..., None]
                q.add_(zt).clamp_(qmin, qmax).sub_(zt)
            d = torch.sub(gt, q.mul_(st), out=q).square_()  # (w - q * s)^2
            err = (d if imp is None else d.mul_(imp)).sum(-1).numpy()
            better = err < err_best
            err_best[better], s_best[better] = err[better], s[better]
            if z is not None:
                z_best[better] = z[better]
        best_s[r0:r0 + len(g)] = s_best
        if best_z is not None:
            best_z[r0:r0 + len(g)] = z_best
    return best_s, best_z


@method("mse")
def mse(weight: np.ndarray, plan, hessian=None) -> QuantizedWeight:
    w = np.asarray(weight, np.float32)
    wg = _groups(w, plan.group_for(w.shape[1]))
    scales, zero = search_scales(wg, plan)
    return _finish(w, wg, scales, zero, plan, _codes_even)


@method("hqq")
def hqq(weight: np.ndarray, plan, hessian=None) -> QuantizedWeight:
    import torch
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    w = np.asarray(weight, np.float32)
    group = plan.group_for(w.shape[1])
    qmin, qmax = grid(plan.bits, True)
    q, s = _choose_qparams_and_quantize_scale_only_hqq(torch.from_numpy(w), [1, group], qmin, qmax)
    scales = s.reshape(w.shape[0], -1).float().numpy()
    rounded = round_scales(scales, plan.scale_dtype)
    if np.array_equal(rounded, scales):
        return QuantizedWeight(q.to(torch.int8).numpy(), scales, None, plan.bits, group)
    return _finish(w, _groups(w, group), rounded, None, plan, _codes_even)  # codes against the kept scales


class Factored:
    """A weight's Hessian made ready for GPTQ: act-order and the upper Cholesky factor of its dampened
    inverse. Factoring is O(in^3), the costliest step at large widths (8192 inputs: most of a layer's
    time), so a weight quantized in blocks of rows (quantizer.py) factors it once for all of them."""

    def __init__(self, hessian: np.ndarray, damp: float = 0.01):
        import torch

        # H is [in, in] (268 MB at 8192 inputs): permuted once and factored in place of copies where it can be
        h = torch.from_numpy(np.asarray(hessian, np.float32))
        dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights do not matter
        diag = torch.where(dead, torch.ones_like(torch.diagonal(h)), torch.diagonal(h))
        self.importance = diag.numpy()
        self.order = torch.argsort(diag, descending=True)  # act-order: the busiest inputs first
        h = h[self.order[:, None], self.order[None, :]]  # one gather, not a copy per axis
        torch.diagonal(h).copy_(diag[self.order])
        torch.diagonal(h).add_((torch.ones(1) * damp * torch.mean(torch.diagonal(h)))[0])  # dampening: as eye * damp * mean
        h = torch.linalg.cholesky(h)
        h = torch.cholesky_inverse(h)
        self.hinv = torch.linalg.cholesky(h, upper=True)


@method("gptq", calibrated=True)
def gptq(weight: np.ndarray, plan, hessian: np.ndarray | Factored | None = None, damp: float = 0.01,
         block: int = 128) -> QuantizedWeight:
    import torch

    if hessian is None:
        raise ValueError("gptq needs the weight's input statistics (calibration)")
    w = np.asarray(weight, np.float32)
    out, k = w.shape
    group = plan.group_for(k)
    qmin, qmax = grid(plan.bits, plan.symmetric)
    f = hessian if isinstance(hessian, Factored) else Factored(hessian, damp)
    importance, order, hinv = f.importance, f.order, f.hinv
    # Static group scales from the activation-weighted search, chosen before any column moves.
    wg = _groups(w, group)
    imp = np.concatenate([importance, np.zeros(wg.shape[1] * group - k, np.float32)]).reshape(-1, group)
    scales, zero = search_scales(wg, plan, imp)
    # per group (rows of these), every output row's scale, its reciprocal and zero point
    Sg = torch.from_numpy(scales).t().contiguous()
    Rg = torch.where(Sg != 0, 1.0 / torch.where(Sg != 0, Sg, torch.ones_like(Sg)), torch.zeros_like(Sg))
    Zg = torch.zeros_like(Sg) if zero is None else torch.from_numpy(zero).t().contiguous()

    col_group = (order // group).tolist()  # the group of each column, in quantization order
    # Transposed (one row per input column, contiguous): each step reads and updates whole rows.
    Wt = torch.from_numpy(w).t()[order].contiguous()
    Qt = torch.empty_like(Wt)
    product = torch.empty_like(Wt)  # each block's update, written here rather than into a fresh temporary
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1, E1 = Wt[b0:b1].clone(), torch.empty(b1 - b0, out)
        Hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col, g = W1[i], col_group[b0 + i]
            if zero is None:
                q = torch.clamp(torch.round(col * Rg[g]), qmin, qmax)
                err = (col - q * Sg[g]) / Hb[i, i]
            else:
                q = torch.clamp(torch.round(col * Rg[g] + Zg[g]), qmin, qmax)
                err = (col - (q - Zg[g]) * Sg[g]) / Hb[i, i]
            Qt[b0 + i] = q
            W1[i:].addr_(Hb[i, i:], err, alpha=-1)  # spread this column's error over the ones after it
            E1[i] = err
        if b1 < k:
            Wt[b1:].sub_(torch.mm(hinv[b0:b1, b1:].t(), E1, out=product[:k - b1]))
    del Wt, product
    # back to input order (whole rows of Qt), then [out, in]
    codes = np.ascontiguousarray(Qt[torch.argsort(order)].t().numpy(), np.int8 if plan.symmetric else np.uint8)
    return QuantizedWeight(codes, scales.astype(np.float32),
                           None if zero is None else zero.astype(np.uint8), plan.bits, group)


@method("awq", calibrated=True)
def awq(weight: np.ndarray, plan, hessian: np.ndarray | None = None) -> QuantizedWeight:
    """The rounding half of AWQ: GPTQ on a weight that quantize/awq.py has already rescaled."""
    return gptq(weight, plan, hessian)
