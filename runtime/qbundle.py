"""Quantized bundle rows: GGUF's block types, rearranged so the FFN kernels run flat loops.

A bundle row holds one neuron's parts (gate row, up row, down column; d elements each, d a multiple
of 32) back to back in the model's bundle order. Each part is d / 32 blocks of 32 elements with
GGUF's block semantics:

  q4_0  value = (q - 8) * scale          q in 0..15
  q4_1  value = q * scale + min          q in 0..15
  q8_0  value = q * scale                q int8

Inside a part the blocks are stored "lane-major" instead of GGUF's block after block:

  quants  byte j * nb + b = block b's byte j (j < 16 for 4-bit: element b*32+j in the low nibble,
          b*32+16+j in the high one, as in GGUF; j < 32 for q8_0: element b*32+j)
  scales  [nb] (f16 or f32), then mins [nb] (q4_1 only)

so a part takes exactly GGUF's bytes (row_bytes(q4_0, 2560) = 80 blocks * 18 B) and converts to and
from GGUF blocks by a byte permutation: repacking a Q4_0 / Q4_1 / Q8_0 GGUF row is exact. Why: a
numba loop over 16-byte blocks with a scale each runs ~1.2 us per 2560-element row (the inner loops
are too short to vectorize and each ends in a horizontal sum); the same arithmetic over lane-major
bytes, with the input permuted the same way once per call (`permute_input`), is a flat loop over
nb blocks with contiguous scales: ~0.24 us (measured on this machine, one thread; f16 rows 0.12 us
from L2). See runtime/qkernels.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QBLOCK = 32


@dataclass(frozen=True)
class QFormat:
    """One quantized bundle type: what the kernels need to know, parsed once."""
    name: str                  # q4_0 | q4_1 | q8_0
    bits: int                  # 4 or 8
    has_min: bool
    scale_dtype: np.dtype      # float16 (GGUF's) or float32

    @property
    def quant_bytes_per_block(self) -> int:
        return 16 if self.bits == 4 else 32

    @property
    def block_bytes(self) -> int:
        return self.quant_bytes_per_block + (2 if self.has_min else 1) * self.scale_dtype.itemsize

    def row_bytes(self, n: int) -> int:
        if n % QBLOCK:
            raise ValueError(f"{self.name} stores rows in blocks of {QBLOCK}; a row of {n} elements is not")
        return n // QBLOCK * self.block_bytes

    @property
    def scale_view(self):
        """dtype of the `s` view the kernels index (f16 scales as their bits)."""
        return np.uint16 if self.scale_dtype == np.float16 else np.float32

    def array(self) -> np.ndarray:
        """The kernels' fmt argument: [bits, has_min, scale itemsize]."""
        return np.array([self.bits, int(self.has_min), self.scale_dtype.itemsize], np.int64)

    def views(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q, s): uint8 and scale-typed views of rows [N, stride] (stride a multiple of the scale size)."""
        q = rows.view(np.uint8)
        return q, q.view(self.scale_view)

    @property
    def gguf_type(self):
        import gguf
        return {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}[self.name]


QFORMATS = {"q4_0": (4, False), "q4_1": (4, True), "q8_0": (8, False)}


def qformat(name: str, scale_dtype=np.float16) -> QFormat:
    if name not in QFORMATS:
        raise ValueError(f"no quantized bundle type {name!r}; choose one of {sorted(QFORMATS)}")
    bits, has_min = QFORMATS[name]
    return QFormat(name, bits, has_min, np.dtype(scale_dtype))


def permute_input(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """h[T, d] -> [T, d] with element b*32+j at j*nb+b: the order a lane-major part's quants are in."""
    T, d = h.shape
    nb = d // QBLOCK
    if out is None:
        out = np.empty((T, d), np.float32)
    out.reshape(T, QBLOCK, nb)[:] = h.reshape(T, nb, QBLOCK).transpose(0, 2, 1)
    return out


def unpermute(hp: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Inverse of permute_input."""
    T, d = hp.shape
    nb = d // QBLOCK
    out.reshape(T, nb, QBLOCK)[:] = hp.reshape(T, QBLOCK, nb).transpose(0, 2, 1)
    return out


# --- GGUF blocks <-> lane-major parts (numpy; conversion and tests) -------------------------------------------

def _block_fields(fmt: QFormat) -> list[tuple[str, np.dtype, int]]:
    sd = fmt.scale_dtype
    fields = [("d", sd, 1)] + ([("m", sd, 1)] if fmt.has_min else [])
    return fields + [("qs", np.dtype(np.uint8), fmt.quant_bytes_per_block)]


def from_gguf_blocks(blocks: np.ndarray, fmt: QFormat) -> np.ndarray:
    """GGUF blocks uint8 [n, nb * gguf_block_bytes] (scales f16) -> lane-major parts [n, row_bytes]."""
    n = blocks.shape[0]
    g = blocks.reshape(n, -1, 2 * (2 if fmt.has_min else 1) + fmt.quant_bytes_per_block)
    nb = g.shape[1]
    qs = g[:, :, -fmt.quant_bytes_per_block:]
    d = g[:, :, 0:2].copy().view(np.float16)[:, :, 0]
    parts = [np.ascontiguousarray(qs.transpose(0, 2, 1)).reshape(n, -1),
             d.astype(fmt.scale_dtype).view(np.uint8)]
    if fmt.has_min:
        parts.append(g[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(fmt.scale_dtype).view(np.uint8))
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == fmt.row_bytes(nb * QBLOCK)
    return out


def to_gguf_blocks(part: np.ndarray, fmt: QFormat) -> np.ndarray:
    """Inverse of from_gguf_blocks (f32 scales are narrowed to f16: exact only if they fit)."""
    n = part.shape[0]
    qb = fmt.quant_bytes_per_block
    nb = part.shape[1] // fmt.block_bytes
    item = fmt.scale_dtype.itemsize
    qs = part[:, :qb * nb].reshape(n, qb, nb).transpose(0, 2, 1)
    d = part[:, qb * nb:qb * nb + nb * item].copy().view(fmt.scale_dtype).astype(np.float16).view(np.uint8)
    cols = [d.reshape(n, nb, 2)]
    if fmt.has_min:
        m = part[:, qb * nb + nb * item:qb * nb + 2 * nb * item].copy().view(fmt.scale_dtype)
        cols.append(m.astype(np.float16).view(np.uint8).reshape(n, nb, 2))
    cols.append(qs)
    return np.ascontiguousarray(np.concatenate(cols, axis=2)).reshape(n, -1)


def quantize_part(w: np.ndarray, fmt: QFormat) -> np.ndarray:
    """f32 [n, L] -> lane-major parts [n, row_bytes], rounded as ggml's reference quantizers
    (gguf.quants), scales f16 (f32-scale formats hold the same f16 values widened)."""
    from gguf import quants
    return from_gguf_blocks(quants.quantize(np.ascontiguousarray(w, dtype=np.float32), fmt.gguf_type), fmt)


def dequantize_part(part: np.ndarray, fmt: QFormat) -> np.ndarray:
    """Lane-major parts [n, row_bytes] -> f32 [n, L], independently of the kernels: numpy for f32
    scales, gguf's own dequantizer for f16 ones."""
    if fmt.scale_dtype == np.float16:
        from gguf import quants
        return quants.dequantize(to_gguf_blocks(part, fmt), fmt.gguf_type).astype(np.float32)
    n = part.shape[0]
    qb = fmt.quant_bytes_per_block
    nb = part.shape[1] // fmt.block_bytes
    qs = part[:, :qb * nb].reshape(n, qb, nb).transpose(0, 2, 1)          # [n, nb, qb]
    d = part[:, qb * nb:qb * nb + 4 * nb].copy().view(np.float32)[:, :, None]
    if fmt.bits == 8:
        return (qs.view(np.int8).astype(np.float32) * d).reshape(n, -1)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float32)    # [n, nb, 32]
    if fmt.has_min:
        m = part[:, qb * nb + 4 * nb:qb * nb + 8 * nb].copy().view(np.float32)[:, :, None]
        return (q * d + m).reshape(n, -1)
    return ((q - 8.0) * d).reshape(n, -1)
