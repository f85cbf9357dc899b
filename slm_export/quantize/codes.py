"""What the quantizer hands an exporter for one weight: integer codes, scales and zero points.

    weight[r, c] ~= (codes[r, c] - zero_points[r, c // group]) * scales[r, c // group]

Codes are int8 in the weight's own [out, in] layout. Symmetric weights have no zero points and codes
in [qmin, qmax] (int4: [-8, 7]); asymmetric ones have codes and zero points in [0, 2**bits - 1].
Scales are float32 holding values the target stores exactly (rounded to its scale precision, e.g.
bfloat16 for XNNPACK's int4 groups), so `dequantize()` is the weight the target computes with.
A last partial group (a width no group size divides, on targets that pad) is simply shorter here;
the exporter pads it as its format wants.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# What the codes of a weight hold per float32 byte of it: one int8 code per element and a float32
# scale per group of 32 (the smallest group a plan chooses by default).
HELD_PER_FP32_BYTE = (1 + 4 / 32) / 4


def grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def round_scales(scales: np.ndarray, dtype: str) -> np.ndarray:
    """float32 scales holding exactly what a target storing them as `dtype` keeps (round to nearest even)."""
    s = np.asarray(scales, dtype=np.float32)
    if dtype == "float32":
        return s
    if dtype == "float16":
        return s.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = s.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # torch's fp32 -> bf16 rounding
        out = rounded.astype(np.uint32).view(np.float32)
        return np.where(np.isnan(s), s, out).astype(np.float32)
    raise ValueError(f"unknown scale precision {dtype}")


@dataclass
class QuantizedWeight:
    codes: np.ndarray  # int8 [out, in]
    scales: np.ndarray  # float32 [out, groups]
    zero_points: np.ndarray | None  # int8 [out, groups]; None when symmetric
    bits: int
    group: int  # elements per scale along `in`; == in for one scale per output channel (or row)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def dequantize(self) -> np.ndarray:
        """The float [out, in] weight the target computes with."""
        out, k = self.codes.shape
        q = self.codes.astype(np.float32)
        if k % self.group == 0 and self.scales.shape[1] == k // self.group:  # per group, broadcast: no [out, in] index
            g = q.reshape(out, -1, self.group)
            if self.zero_points is not None:
                g -= self.zero_points.astype(np.float32)[..., None]
            g *= self.scales[..., None]
            return q
        idx = np.arange(k) // self.group
        if self.zero_points is not None:
            q = q - self.zero_points.astype(np.float32)[:, idx]
        return q * self.scales[:, idx]

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """The output rows [start, stop): a part of a fused weight (q of q|k|v)."""
        zp = None if self.zero_points is None else self.zero_points[start:stop]
        return QuantizedWeight(self.codes[start:stop], self.scales[start:stop], zp, self.bits, self.group)

    @staticmethod
    def concat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Row-wise concatenation (q, k, v -> q|k|v); the parts must be stored alike."""
        first = parts[0]
        if any((p.bits, p.group, p.symmetric, p.shape[1]) != (first.bits, first.group, first.symmetric, first.shape[1])
               for p in parts):
            raise ValueError("fused parts must share bits, group, symmetry and width")
        zp = None if first.symmetric else np.concatenate([p.zero_points for p in parts])
        return QuantizedWeight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                               zp, first.bits, first.group)

    def stored_bytes(self, scale_bytes: int) -> int:
        """Bytes of codes (bits each), scales (`scale_bytes` each) and zero points (bits each)."""
        n = self.codes.size * self.bits // 8 + self.scales.size * scale_bytes
        return n + (0 if self.zero_points is None else -(-self.zero_points.size * self.bits // 8))
