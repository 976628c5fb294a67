"""Block-quantized dense weights multiplied in numba straight from their stored rows (no second copy).

onnxruntime's MatMulNBits sessions hold more than the stored bytes of their weights: measured on
Qwen2.5-Coder-1.5B (q4_1/q8_0 dense weights, 281 MiB, tied embeddings), the sessions add 424 MiB and the
process peaks at 910 MiB while building them (weights handed over in place, pages released per
session), against a 555 MiB peak for the whole naive-mode process with this engine. Under a whole-process
memory limit that is most of the limit, so there the model runs its quantized dense weights here: the
rows as read from dense.safetensors (runtime/quant.py's layout: codes, then scales, then mins), decoded
row by row into a small f32 buffer. Slower per weight than MatMulNBits' int8 dot
products, and a decode step that also streams FFN layers from flash is bound by the reads anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .kernels import JIT
from .quant import QTensor, from_rows
from .storage import StorageType, block_format

ROWS_PER_TASK = 64
SIXTEENTH = np.float32(0.0625)


@njit(**JIT)
def _decode_row(q, bits, kp, w):
    """w[:kp] = one row's codes as f32 (4 bits: byte j holds element 2j low, 2j+1 high), one flat loop."""
    if bits == 8:
        for j in range(kp):
            w[j] = np.float32(q[j])
    else:
        for j in range(kp // 2):
            v = np.float32(q[j])
            hi = np.floor(v * SIXTEENTH)     # float nibble split: integer ops widen to int64 (no SIMD)
            w[2 * j] = v - np.float32(16.0) * hi
            w[2 * j + 1] = hi


@njit(**JIT)
def _scale_blocks(w, s, m, nb, block):
    """w = w * s[b] + m[b] per block of `block` elements."""
    for b in range(nb):
        wb = w[b * block:(b + 1) * block]
        sb, mb = s[b], m[b]
        for j in range(block):
            wb[j] = wb[j] * sb + mb


@njit(**JIT)
def _dot(w, x, k):
    acc = np.float32(0.0)
    for j in range(k):
        acc += w[j] * x[j]
    return acc


@njit(parallel=True, **JIT)
def qmatmul(x, qs, scales, mins, has_min, bits, block, zero, out):
    """out[T, n] = x[T, k] @ W[n, k].T, W given as QTensor arrays: qs uint8 [n, code bytes], scales f32
    [n, nb], mins f32 [n, nb] (read only when has_min). w = q * s + min, or (q - zero) * s: each row is
    decoded once into f32 (flat loops that vectorize), then dotted with every token's x."""
    T, k = x.shape
    n, nb = scales.shape
    kp = nb * block                               # padded row length (the padding decodes to ~0, x has none)
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        w = np.empty(kp, np.float32)
        m = np.empty(nb, np.float32)
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            _decode_row(qs[r], bits, kp, w)
            s = scales[r]
            if has_min:
                m[:] = mins[r]
            else:
                for b in range(nb):
                    m[b] = -zero * s[b]
            _scale_blocks(w, s, m, nb, block)
            for t in range(T):
                out[t, r] = _dot(w, x[t], k)


@dataclass
class QDense:
    """One block-quantized matrix [n, k] over its stored rows, with f32 views (or copies) of its scales."""
    qs: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    has_min: bool
    bits: int
    block: int
    zero: float
    shape: tuple[int, int]

    @classmethod
    def from_stored(cls, rows: np.ndarray, storage: StorageType, k: int) -> "QDense":
        qt: QTensor = from_rows(rows, block_format(storage), k)
        f32 = lambda a: a if a.dtype == np.float32 else a.astype(np.float32)   # f16 scales: a small copy
        scales = f32(qt.scales)
        mins = f32(qt.mins) if qt.mins is not None else scales
        return cls(qt.qs, scales, mins, qt.mins is not None, qt.qtype.bits, qt.block,
                   float(qt.qtype.zero), qt.shape)

    def matmul(self, x: np.ndarray, out: np.ndarray) -> None:
        qmatmul(x, self.qs, self.scales, self.mins, self.has_min, self.bits, self.block, np.float32(self.zero), out)
