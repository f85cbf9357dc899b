"""Packing the quantizer's codes into onnxruntime's MatMulNBits layout, and reading them back.

Layouts (onnxruntime contrib op MatMulNBits): B is [N, k_blocks, block*bits/8] uint8 holding the
codes plus 8 (4-bit) or 128 (8-bit) when symmetric, two 4-bit values per byte, low nibble first; a
last partial block is padded with the zero code. Scales are float32 [N, k_blocks]; zero points
(asymmetric only) are uint8, packed like B: [N * ceil(k_blocks / 2)] at 4 bits, [N * k_blocks] at 8.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...quantize import QuantizedWeight


@dataclass
class PackedWeight:
    packed: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8, None when symmetric
    bits: int
    block_size: int
    k: int
    n: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def _nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16, last axis even -> two per byte, low nibble first."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


PACK_ROWS_BYTES = 32 * 2**20  # codes packed per step


def pack_matmul_nbits(qw: QuantizedWeight) -> PackedWeight:
    """The quantizer's codes for one [N, K] weight in MatMulNBits' layout."""
    n, k = qw.shape
    block, bits = qw.group, qw.bits
    k_blocks = -(-k // block)
    mid = 1 << (bits - 1)
    packed = np.empty((n, k_blocks, block // 2 if bits == 4 else block), np.uint8)
    step = max(1, PACK_ROWS_BYTES // max(1, k_blocks * block))  # rows at a time: a few temporaries of a block, not of N rows
    for r in range(0, n, step):
        rows = slice(r, min(r + step, n))
        if qw.symmetric:
            stored = (qw.codes[rows].astype(np.int16) + mid).astype(np.uint8)
            pad = np.full((stored.shape[0], k_blocks * block - k), mid, np.uint8)
        else:
            stored = qw.codes[rows].astype(np.uint8)
            pad = np.repeat(qw.zero_points[rows, -1:], k_blocks * block - k, axis=1).astype(np.uint8)
        q = np.concatenate([stored, pad], axis=1).reshape(-1, k_blocks, block)
        packed[rows] = _nibbles(q) if bits == 4 else q
    zp = None
    if not qw.symmetric:
        z = qw.zero_points.astype(np.uint8)
        if bits == 4:
            z = np.concatenate([z, np.zeros((n, k_blocks % 2), np.uint8)], axis=1) if k_blocks % 2 else z
            zp = _nibbles(z).reshape(-1)
        else:
            zp = z.reshape(-1)
    return PackedWeight(packed, qw.scales.astype(np.float32).reshape(n, k_blocks), zp,
                        bits, block, k, n)


def unpack_codes(packed: np.ndarray, bits: int, block_size: int, k: int, n: int) -> np.ndarray:
    """The stored codes of B as uint8 [N, k_blocks * block] (padding included), low nibble first at 4 bits."""
    k_blocks = (k + block_size - 1) // block_size
    if bits == 4:
        packed = packed.reshape(n, k_blocks, block_size // 2)
        q = np.empty((n, k_blocks, block_size), dtype=np.uint8)
        q[..., 0::2] = packed & 0x0F  # low nibble first
        q[..., 1::2] = packed >> 4
    else:
        q = packed.reshape(n, k_blocks, block_size)
    return q.reshape(n, k_blocks * block_size)


def unpack_zero_points(zero_points: np.ndarray | None, bits: int, k_blocks: int, n: int) -> np.ndarray:
    """Zero points as uint8 [N, k_blocks]: the stored ones, or the implied 8 / 128 when symmetric."""
    if zero_points is None:
        return np.full((n, k_blocks), 8 if bits == 4 else 128, dtype=np.uint8)
    if bits == 4:
        per_row = (k_blocks + 1) // 2
        z = zero_points.reshape(n, per_row)
        both = np.empty((n, per_row * 2), dtype=np.uint8)
        both[:, 0::2] = z & 0x0F
        both[:, 1::2] = z >> 4
        return both[:, :k_blocks]
    return zero_points.reshape(n, k_blocks)


def dequantize_matmul_weight(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                             bits: int, block_size: int, k: int, n: int) -> np.ndarray:
    """The float [out, in] weight a MatMulNBits node computes with (read back out of a file)."""
    k_blocks = (k + block_size - 1) // block_size
    q = unpack_codes(packed, bits, block_size, k, n).reshape(n, k_blocks, block_size)
    zp = unpack_zero_points(zero_points, bits, k_blocks, n).astype(np.float32)
    s = scales.reshape(n, k_blocks)
    w = (q.astype(np.float32) - zp[..., None]) * s[..., None]
    return w.reshape(n, k_blocks * block_size)[:, :k]
