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

so a part takes exactly GGUF's bytes (row_bytes(q4_0, 2560) = 80 blocks * 18 B) and converts from
GGUF blocks (through runtime/quant.py, the block math) by a byte permutation: repacking a Q4_0 / Q4_1
/ Q8_0 GGUF row is exact. Why: a
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


# --- quant.QTensor (GGUF-exact block math, runtime/quant.py) -> lane-major parts; numpy reference -------------

def lanes_from_qtensor(qt, fmt: QFormat) -> np.ndarray:
    """One part per row of a quant.QTensor [n, L] (blocks of 32 of fmt's type) -> lanes uint8 [n, row_bytes].

    A byte permutation of the codes plus the scales (and mins): exact whenever the scales fit fmt's
    scale dtype, which it checks."""
    n, L = qt.shape
    if qt.qtype.name != fmt.name or qt.block != QBLOCK or L % QBLOCK:
        raise ValueError(f"{qt.qtype.name} blocks of {qt.block} over rows of {L} do not make {fmt.name} "
                         f"bundle parts (blocks of {QBLOCK}, whole rows)")
    nb = L // QBLOCK
    c = qt.codes()[:, :L].reshape(n, nb, QBLOCK)
    if fmt.bits == 4:
        lanes = c[:, :, :16] | (c[:, :, 16:] << 4)                               # [n, nb, 16]
    else:
        lanes = (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)         # GGUF's signed codes
    cols = [np.ascontiguousarray(lanes.transpose(0, 2, 1)).reshape(n, -1)]
    for arr in (qt.scales, qt.mins) if fmt.has_min else (qt.scales,):
        narrowed = arr.astype(fmt.scale_dtype)
        if not np.array_equal(narrowed.astype(arr.dtype), arr):
            raise ValueError(f"{fmt.name} scales do not fit {fmt.scale_dtype.name}: the repack would not be exact")
        cols.append(narrowed.view(np.uint8).reshape(n, -1))
    return np.concatenate(cols, axis=1)


def quantize_part(w: np.ndarray, fmt: QFormat) -> np.ndarray:
    """f32 [n, L] -> lane-major parts [n, row_bytes], quantized by quant.quantize (llama.cpp's rounding)."""
    from .quant import quantize
    return lanes_from_qtensor(quantize(np.ascontiguousarray(w, dtype=np.float32), fmt.name), fmt)


def from_gguf_blocks(blocks: np.ndarray, fmt: QFormat) -> np.ndarray:
    """A GGUF Q4_0 / Q4_1 / Q8_0 tensor's rows (raw blocks [n, bytes]) -> lane-major parts, exactly."""
    from .quant import from_gguf
    n = blocks.shape[0]
    return lanes_from_qtensor(from_gguf(blocks, fmt.gguf_type, (n, blocks.shape[1] // fmt.block_bytes * QBLOCK)), fmt)


def dequantize_part(part: np.ndarray, fmt: QFormat) -> np.ndarray:
    """Lane-major parts [n, row_bytes] -> f32 [n, L]: the numpy reference the kernels are tested against."""
    part = np.ascontiguousarray(part).view(np.uint8)
    n = part.shape[0]
    qb = fmt.quant_bytes_per_block
    nb = part.shape[1] // fmt.block_bytes
    item = fmt.scale_dtype.itemsize
    qs = part[:, :qb * nb].reshape(n, qb, nb).transpose(0, 2, 1)          # [n, nb, qb]
    d = part[:, qb * nb:qb * nb + item * nb].copy().view(fmt.scale_dtype).astype(np.float32)[:, :, None]
    if fmt.bits == 8:
        return (qs.view(np.int8).astype(np.float32) * d).reshape(n, -1)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float32)    # [n, nb, 32]
    if fmt.has_min:
        m = part[:, qb * nb + item * nb:qb * nb + 2 * item * nb].copy().view(fmt.scale_dtype)
        return (q * d + m.astype(np.float32)[:, :, None]).reshape(n, -1)
    return ((q - 8.0) * d).reshape(n, -1)
