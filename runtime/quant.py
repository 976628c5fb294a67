"""Block-quantized weight storage: the block math of the q8_0 / q4_0 / q4_1 / q8_1 storage types.

A quantized matrix W [n, k] is cut into blocks of `block` consecutive elements along k (the input
dimension, as GGUF and onnxruntime's MatMulNBits both do). Each block has a scale (and for the "_1"
types a min) and `block` unsigned codes of `bits` bits:

    q8_0, q4_0:  w = (q - zero) * scale        zero = 128 (8 bits) / 8 (4 bits), implicit
    q4_1, q8_1:  w = q * scale + min           (q unsigned, no zero point)

Three arrays per matrix, in the layout MatMulNBits takes as its constant B input, so building an
onnxruntime session never re-packs codes:
    qs      uint8 [n, n_blocks * block * bits / 8]   4 bits: byte j holds element 2j in its low nibble
                                                     and element 2j+1 in its high nibble (of the row)
    scales  float16 or float32 [n, n_blocks]
    mins    same dtype as scales [n, n_blocks]       (q4_1 / q8_1 only)
k need not be a multiple of the block: the last block is padded with codes that decode to 0 (or to
the block's min) and `dequantize` drops the padding.

GGUF tensors map onto these types without loss wherever the block math allows (`from_gguf`):
    Q8_0 -> q8_0 (codes + 128)          Q4_0 -> q4_0 (nibbles reordered)     Q4_1 -> q4_1
    Q5_0 -> q8_0 (codes + 112)          Q5_1 -> q8_1                         Q6_K -> q8_0, block 16,
    Q4_K -> q4_1, f32 scale d*sc and    Q5_K -> q8_1, f32 scale and min         f32 scale d*sc
            min -dmin*m per 32
The values `dequantize` returns are bit-identical to `gguf.quants.dequantize` for those types: the
f32 scale and min are formed with the same operations in the same order as gguf's dequantizer.

`quantize` uses gguf's own block quantizers (llama.cpp's reference rounding), so a tensor quantized
here holds exactly the codes `llama-quantize` would write for the same f32 values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256            # GGUF K-quant super-block


@dataclass(frozen=True)
class QuantType:
    name: str
    bits: int          # 4 or 8
    has_min: bool      # w = q * scale + min; else w = (q - zero) * scale
    gguf_block: int    # block size of the GGUF type this is bit-compatible with when scales are f16

    @property
    def zero(self) -> int:
        """Implicit zero point of the codes (0 for types with a min)."""
        return 0 if self.has_min else 1 << (self.bits - 1)

    def code_bytes(self, k: int, block: int) -> int:
        """Bytes of codes per row of k elements."""
        return n_blocks(k, block) * block * self.bits // 8


QUANT_TYPES = {
    "q8_0": QuantType("q8_0", 8, False, 32),
    "q4_0": QuantType("q4_0", 4, False, 32),
    "q4_1": QuantType("q4_1", 4, True, 32),
    "q8_1": QuantType("q8_1", 8, True, 32),
}
# The types `quantize` produces from float weights (the others only come from GGUF tensors).
QUANTIZE_TYPES = ("q8_0", "q4_0", "q4_1")


class QuantError(ValueError):
    pass


def n_blocks(k: int, block: int) -> int:
    return -(-k // block)


@dataclass
class QTensor:
    """One block-quantized matrix [n, k] (see the module docstring for the layout)."""
    qtype: QuantType
    shape: tuple[int, int]
    block: int
    qs: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    def __post_init__(self):
        n, k = self.shape
        nb = n_blocks(k, self.block)
        if self.block < 16 or self.block & (self.block - 1):
            raise QuantError(f"block size {self.block} is not a power of two >= 16")
        if self.qs.dtype != np.uint8 or self.qs.shape != (n, self.qtype.code_bytes(k, self.block)):
            raise QuantError(f"{self.qtype.name} codes: {self.qs.dtype}{list(self.qs.shape)}, expected "
                             f"uint8{[n, self.qtype.code_bytes(k, self.block)]} for shape {list(self.shape)}")
        if self.scales.dtype not in (np.float16, np.float32) or self.scales.shape != (n, nb):
            raise QuantError(f"{self.qtype.name} scales: {self.scales.dtype}{list(self.scales.shape)}, expected "
                             f"float16/float32{[n, nb]}")
        if self.qtype.has_min != (self.mins is not None):
            raise QuantError(f"{self.qtype.name}: mins {'missing' if self.mins is None else 'not expected'}")
        if self.mins is not None and (self.mins.dtype != self.scales.dtype or self.mins.shape != (n, nb)):
            raise QuantError(f"{self.qtype.name} mins: {self.mins.dtype}{list(self.mins.shape)}, expected "
                             f"{self.scales.dtype}{[n, nb]}")

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.scales.nbytes + (0 if self.mins is None else self.mins.nbytes)

    def codes(self, rows=slice(None)) -> np.ndarray:
        """Unsigned codes uint8 [rows, n_blocks * block] (padding included)."""
        return unpack_codes(self.qs[rows], self.qtype.bits)

    def dequantize(self, rows=slice(None)) -> np.ndarray:
        """float32 [rows, k]: the reference decoding (MatMulNBits and the numba kernels must match it)."""
        q = self.codes(rows)
        m = q.shape[0]
        nb = self.scales.shape[1]
        q = q.reshape(m, nb, self.block).astype(np.float32)
        s = self.scales[rows].astype(np.float32).reshape(m, nb, 1)
        if self.qtype.has_min:
            w = q * s + self.mins[rows].astype(np.float32).reshape(m, nb, 1)
        else:
            w = (q - np.float32(self.qtype.zero)) * s
        return w.reshape(m, nb * self.block)[:, :self.shape[1]]


def unpack_codes(qs: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [n, bytes] -> codes uint8 [n, bytes * 8 / bits]."""
    if bits == 8:
        return qs
    out = np.empty((qs.shape[0], qs.shape[1] * 2), np.uint8)
    out[:, 0::2] = qs & 0x0F
    out[:, 1::2] = qs >> 4
    return out


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes uint8 [n, m] (m even for 4 bits) -> the row layout of `qs`."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    return (codes[:, 0::2] & 0x0F) | (codes[:, 1::2] << 4)


# --- quantizing float weights ------------------------------------------------------------------------

def quantize(w: np.ndarray, type_name: str, block: int = 32) -> QTensor:
    """Quantize float weights [n, k] with llama.cpp's reference rounding (f16 scales, blocks of 32).

    k is padded with zeros to whole blocks; the padded codes decode to (nearly) zero and are never
    multiplied with real inputs (MatMulNBits and the kernels stop at k).
    """
    import gguf
    if type_name not in QUANTIZE_TYPES:
        raise QuantError(f"cannot quantize to {type_name!r}; choose one of {QUANTIZE_TYPES}")
    if block != 32:
        raise QuantError(f"{type_name} is quantized in blocks of 32, not {block}")
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise QuantError(f"quantize expects a matrix, got shape {list(w.shape)}")
    n, k = w.shape
    kp = n_blocks(k, block) * block
    if kp != k:
        w = np.concatenate([w, np.zeros((n, kp - k), np.float32)], axis=1)
    gtype = getattr(gguf.GGMLQuantizationType, type_name.upper())
    raw = gguf.quants.quantize(np.ascontiguousarray(w), gtype)
    return from_gguf(raw, gtype, (n, kp), k=k)


# --- GGUF blocks -> storage types ----------------------------------------------------------------------

def gguf_target(ggml_type) -> str | None:
    """The storage type a GGUF tensor type maps onto without loss, or None (float or unsupported)."""
    return _GGUF_TARGET.get(getattr(ggml_type, "name", str(ggml_type)))


_GGUF_TARGET = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q8_0", "Q5_1": "q8_1",
                "Q4_K": "q4_1", "Q5_K": "q8_1", "Q6_K": "q8_0"}


def from_gguf(raw: np.ndarray, ggml_type, shape: tuple[int, int], k: int | None = None) -> QTensor:
    """Repack a GGUF tensor's blocks (raw bytes, any shape with shape[0]*...*shape[1] elements) exactly.

    shape: (n, k) in numpy orientation (GGUF ne[1], ne[0]). k: the true row length if the rows were
    padded to whole blocks before quantizing (`quantize`); the padding stays in the codes.
    """
    import gguf
    name = getattr(ggml_type, "name", str(ggml_type))
    if name not in _GGUF_TARGET:
        raise QuantError(f"GGUF type {name} has no exact storage type")
    n, kp = shape
    bs, ts = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, name)]
    if kp % bs:
        raise QuantError(f"GGUF {name} rows of {kp} elements are not whole blocks of {bs}")
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.size != n * kp // bs * ts:
        raise QuantError(f"GGUF {name} tensor of shape {list(shape)} needs {n * kp // bs * ts} bytes, got {raw.size}")
    blocks = raw.reshape(n * kp // bs, ts)
    codes, scales, mins, block = _DECODERS[name](blocks)
    nb = kp // block
    qtype = QUANT_TYPES[_GGUF_TARGET[name]]
    return QTensor(qtype, (n, kp if k is None else k), block,
                   pack_codes(codes.reshape(n, kp), qtype.bits),
                   scales.reshape(n, nb), None if mins is None else mins.reshape(n, nb))


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)


def _nibbles_halves(qs: np.ndarray) -> np.ndarray:
    """GGUF Q4_0/Q4_1/Q5 low bits: byte j holds element j (low) and j + 16 (high) -> [blocks, 32]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q8_0(b):
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b[:, :2]), None, 32


def _q4_0(b):
    return _nibbles_halves(b[:, 2:]), _f16(b[:, :2]), None, 32


def _q4_1(b):
    return _nibbles_halves(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _q5_high(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")   # [blocks, 32] bit i = element i


def _q5_0(b):
    q5 = _nibbles_halves(b[:, 6:]) | (_q5_high(b[:, 2:6]) << 4)
    return q5 + np.uint8(112), _f16(b[:, :2]), None, 32          # (q5 + 112) - 128 = q5 - 16


def _q5_1(b):
    q5 = _nibbles_halves(b[:, 8:]) | (_q5_high(b[:, 4:8]) << 4)
    return q5, _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _k_scale_min(scales: np.ndarray):
    """The 6-bit sub-block scales and mins of Q4_K / Q5_K (12 bytes -> 8 + 8)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _k_scales(b):
    d = _f16(b[:, 0:2]).astype(np.float32)
    dmin = _f16(b[:, 2:4]).astype(np.float32)
    sc, mn = _k_scale_min(b[:, 4:16])
    # gguf: d * sc, dmin * m in f32; value = (d*sc) * q - (dmin*m) == q * scale + (-(dmin*m)) exactly.
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def _q4_k(b):
    scale, mn = _k_scales(b)
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(-1, QK_K), scale, mn, 32


def _q5_k(b):
    scale, mn = _k_scales(b)
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    ql = b[:, 48:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (ql & 0x0F).reshape(-1, 8, 32) | ((qh & 1) << 4)
    return q.reshape(-1, QK_K), scale, mn, 32


def _q6_k(b):
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(-1, 8, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(-1, 8, 32)
    q6 = (ql | (qh << 4)).reshape(-1, QK_K)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210]).astype(np.float32)
    return q6 + np.uint8(96), d * sc, None, 16                    # (q6 + 96) - 128 = q6 - 32


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


# --- storage in safetensors files ------------------------------------------------------------------------

PARTS = ("qs", "scales", "mins")


def tensor_parts(name: str, qt: QTensor) -> dict[str, np.ndarray]:
    """The arrays a quantized weight `name` is stored as: name.qs, name.scales (, name.mins)."""
    out = {f"{name}.qs": qt.qs, f"{name}.scales": qt.scales}
    if qt.mins is not None:
        out[f"{name}.mins"] = qt.mins
    return out


def part_shapes(type_name: str, shape: tuple[int, int], block: int, scale_dtype: str) -> dict[str, tuple[str, list[int]]]:
    """{suffix: (safetensors dtype, shape)} of a quantized weight, for planning a file before writing it."""
    qtype = QUANT_TYPES[type_name]
    n, k = shape
    out = {"qs": ("U8", [n, qtype.code_bytes(k, block)]), "scales": (scale_dtype, [n, n_blocks(k, block)])}
    if qtype.has_min:
        out["mins"] = (scale_dtype, [n, n_blocks(k, block)])
    return out


def from_parts(type_name: str, shape: tuple[int, int], parts: dict[str, np.ndarray]) -> QTensor:
    """Rebuild a QTensor from its stored arrays (views; nothing is copied). parts: suffix -> array,
    f16 scales may arrive as uint16 bits."""
    qtype = QUANT_TYPES[type_name]
    scales = parts["scales"]
    mins = parts.get("mins")
    if scales.dtype == np.uint16:
        scales = scales.view(np.float16)
        mins = None if mins is None else mins.view(np.float16)
    nb = scales.shape[1]
    block = parts["qs"].shape[1] * 8 // qtype.bits // nb
    return QTensor(qtype, tuple(shape), block, parts["qs"], scales, mins)


# --- row-planar storage: one uint8 row per matrix row (the storage-type table's block entries) ----------

@dataclass(frozen=True)
class BlockFormat:
    """A storage type of the dense-weight table: codes | scales | mins of one matrix row, back to back.

    Keeping each row's codes contiguous lets a session take the codes of all rows as one [n, bytes]
    slice (MatMulNBits' B), and the scales as another, without re-packing bits."""
    name: str
    qtype: QuantType
    block: int
    scale_dtype: np.dtype

    @property
    def block_bytes(self) -> int:
        return self.block * self.qtype.bits // 8 + (2 if self.qtype.has_min else 1) * self.scale_dtype.itemsize

    def row_bytes(self, k: int) -> int:
        if k % self.block:
            raise QuantError(f"{self.name} stores rows in whole blocks of {self.block}; a row of {k} elements is not")
        return k // self.block * self.block_bytes


BLOCK_FORMATS = {f.name: f for f in (
    BlockFormat("q8_0", QUANT_TYPES["q8_0"], 32, np.dtype(np.float16)),
    BlockFormat("q4_0", QUANT_TYPES["q4_0"], 32, np.dtype(np.float16)),
    BlockFormat("q4_1", QUANT_TYPES["q4_1"], 32, np.dtype(np.float16)),
    BlockFormat("q8_1", QUANT_TYPES["q8_1"], 32, np.dtype(np.float16)),
    # K-quants, exact: the f32 scale (and min) of each 32 (Q4_K, Q5_K) or 16 (Q6_K) elements.
    BlockFormat("q4_1.f32", QUANT_TYPES["q4_1"], 32, np.dtype(np.float32)),
    BlockFormat("q8_1.f32", QUANT_TYPES["q8_1"], 32, np.dtype(np.float32)),
    BlockFormat("q8_0.b16f32", QUANT_TYPES["q8_0"], 16, np.dtype(np.float32)),
)}


def format_of(qt: QTensor) -> BlockFormat:
    for f in BLOCK_FORMATS.values():
        if f.qtype == qt.qtype and f.block == qt.block and f.scale_dtype == qt.scales.dtype:
            return f
    raise QuantError(f"no storage type for {qt.qtype.name} blocks of {qt.block} with {qt.scales.dtype} scales")


def to_rows(qt: QTensor) -> np.ndarray:
    """uint8 [n, row_bytes] in the row-planar layout of format_of(qt)."""
    fmt = format_of(qt)
    n, k = qt.shape
    fmt.row_bytes(k)
    parts = [qt.qs, qt.scales.view(np.uint8).reshape(n, -1)]
    if qt.mins is not None:
        parts.append(qt.mins.view(np.uint8).reshape(n, -1))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def from_rows(rows: np.ndarray, fmt: BlockFormat, k: int) -> QTensor:
    """Views of stored rows uint8 [n, row_bytes] as a QTensor (nothing is copied)."""
    rows = rows.view(np.uint8)
    n = rows.shape[0]
    if rows.ndim != 2 or rows.shape[1] != fmt.row_bytes(k):
        raise QuantError(f"{fmt.name} rows of {k} elements are {fmt.row_bytes(k)} bytes, got {list(rows.shape)}")
    nb = k // fmt.block
    cb = fmt.qtype.code_bytes(k, fmt.block)
    sb = nb * fmt.scale_dtype.itemsize
    scales = rows[:, cb:cb + sb].view(fmt.scale_dtype)
    mins = rows[:, cb + sb:cb + 2 * sb].view(fmt.scale_dtype) if fmt.qtype.has_min else None
    return QTensor(fmt.qtype, (n, k), fmt.block, rows[:, :cb], scales, mins)


def permute_rows(qt: QTensor, order: np.ndarray) -> QTensor:
    """The matrix with its rows reordered (GGUF's interleaved Q/K heads back to rotate-half)."""
    return QTensor(qt.qtype, qt.shape, qt.block, qt.qs[order], qt.scales[order],
                   None if qt.mins is None else qt.mins[order])
