"""Weight quantization for ONNX, with onnxruntime's own kernels (the ones its MatMulNBits
quantizer calls), plus the numpy inverse used by `verify` to rebuild the same-quant PyTorch model.

Layouts (onnxruntime contrib op MatMulNBits): B is [N, k_blocks, block*bits/8] uint8, scales are
[N * k_blocks], zero points (asymmetric only) are packed like B. Symmetric weights have an implicit
zero point of 8 (4-bit) or 128 (8-bit).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def quantize_matmul_weight(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> PackedWeight:
    """Quantize a PyTorch-layout [out, in] weight for MatMulNBits with onnxruntime's quantizer."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = weight.shape
    b = np.ascontiguousarray(weight.T, dtype=np.float32)  # MatMul's B is [K, N]
    k_blocks = (k + block_size - 1) // block_size
    blob = block_size * bits // 8
    packed = np.zeros((n, k_blocks, blob), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    if bits == 4:
        zp = np.zeros(n * ((k_blocks + 1) // 2), dtype=np.uint8)
        quantize_matmul_4bits(packed, b, scales, zp, block_size, n, k, symmetric)
    elif bits == 8:
        zp = np.zeros(n * k_blocks, dtype=np.uint8)
        quantize_matmul_8bits(packed, b, scales, zp, block_size, n, k, symmetric)
    else:
        raise ValueError(f"MatMulNBits supports 4 and 8 bits, not {bits}")
    return PackedWeight(packed, scales, None if symmetric else zp, bits, block_size, k, n)


def dequantize_matmul_weight(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                             bits: int, block_size: int, k: int, n: int) -> np.ndarray:
    """Inverse of `quantize_matmul_weight`: the float [out, in] weight the kernel actually uses."""
    k_blocks = (k + block_size - 1) // block_size
    if bits == 4:
        q = np.empty((n, k_blocks, block_size), dtype=np.uint8)
        q[..., 0::2] = packed & 0x0F  # low nibble first
        q[..., 1::2] = packed >> 4
    else:
        q = packed.reshape(n, k_blocks, block_size)
    if zero_points is None:
        zp = np.full((n, k_blocks), 8 if bits == 4 else 128, dtype=np.float32)
    elif bits == 4:
        per_row = (k_blocks + 1) // 2
        z = zero_points.reshape(n, per_row)
        both = np.empty((n, per_row * 2), dtype=np.uint8)
        both[:, 0::2] = z & 0x0F
        both[:, 1::2] = z >> 4
        zp = both[:, :k_blocks].astype(np.float32)
    else:
        zp = zero_points.reshape(n, k_blocks).astype(np.float32)
    s = scales.reshape(n, k_blocks)
    w = (q.astype(np.float32) - zp[..., None]) * s[..., None]
    return w.reshape(n, k_blocks * block_size)[:, :k]


def quantize_rows_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 for the embedding table: Gather then one multiply recovers a row."""
    amax = np.abs(table).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale
