"""How weights are stored: the storage-type table and the byte layout of tensors and bundle rows.

A storage type says how a row of n elements (along the input dimension, the one matmul kernels
reduce over) is stored in bytes, and which numpy array the kernels get for it:
- f32: 4-byte floats, the kernels get float32;
- f16: IEEE half, the kernels get uint16 holding the bits (numba has no float16 on CPU; the kernels
  widen in-register, see kernels.f32).
Block types (a scale per block of 32 elements, like GGUF's q8_0 / q4_0 / q4_1) are entries with
`block_elems` 32 and `block_bytes` the size of one block; a stored row is then
n / block_elems blocks, viewed by the kernels as `view_dtype` (uint8 for byte-packed blocks).
`fields` writes the block structure down (name, numpy dtype, count per block) so readers and tests
do not re-derive it. Scales kept in a separate tensor instead of inside the blocks are a
separate TensorEntry of their own storage type.

Every place that needs "what dtype do the kernels see" or "how many bytes is this row" asks this
table; nothing compares dtype names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import FlashlmError
from .qbundle import QBLOCK, QFORMATS, QFormat, dequantize_part, qformat, quantize_part


class StorageError(FlashlmError):
    """A storage type that is unknown or a shape it cannot store."""


@dataclass(frozen=True)
class StorageType:
    name: str                         # as written in the manifest: "f32", "f16", later "q8_0", ...
    block_elems: int                  # elements per block along a row (1: plain floats)
    block_bytes: int                  # bytes per block
    view_dtype: np.dtype              # dtype of the array the kernels get for stored rows
    safetensors_dtype: str            # dtype name of such a tensor in a safetensors header
    fields: tuple[tuple[str, str, int], ...]   # one block: (field, numpy dtype name, count), in byte order
    encode: Callable[[np.ndarray], np.ndarray] = field(repr=False)  # f32 [..., n] -> stored [..., row items]
    decode: Callable[[np.ndarray], np.ndarray] = field(repr=False)  # stored [..., row items] -> f32 [..., n]
    description: str = ""

    def row_bytes(self, n: int) -> int:
        """Bytes of one stored row of n elements."""
        if n % self.block_elems:
            raise StorageError(f"{self.name} stores rows in blocks of {self.block_elems} elements; "
                               f"a row of {n} is not a whole number of blocks")
        return n // self.block_elems * self.block_bytes

    def row_items(self, n: int) -> int:
        """Length in view_dtype items of one stored row of n elements."""
        return self.row_bytes(n) // np.dtype(self.view_dtype).itemsize

    def stored_shape(self, shape) -> tuple[int, ...]:
        """Shape of the stored (view_dtype) array for a logical tensor shape [..., n]."""
        shape = tuple(int(s) for s in shape)
        return (*shape[:-1], self.row_items(shape[-1]))

    def nbytes(self, shape) -> int:
        shape = tuple(int(s) for s in shape)
        return int(np.prod(shape[:-1], dtype=np.int64)) * self.row_bytes(shape[-1])


def _f16_encode(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def _f16_decode(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).view(np.float16).astype(np.float32)


def _f32_encode(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _f32_decode(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _lanes_type(fmt: QFormat) -> StorageType:
    """A bundle-row storage type: GGUF blocks of `fmt`, lane-major inside each part (runtime/qbundle.py)."""
    def encode(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return quantize_part(x.reshape(-1, x.shape[-1]), fmt).reshape(*x.shape[:-1], -1)

    def decode(b: np.ndarray) -> np.ndarray:
        b = np.asarray(b, dtype=np.uint8)
        return dequantize_part(b.reshape(-1, b.shape[-1]), fmt).reshape(*b.shape[:-1], -1)

    qs = fmt.quant_bytes_per_block
    fields = (("qs", "uint8" if fmt.bits == 4 else "int8", qs), ("d", fmt.scale_dtype.name, 1)) + \
        ((("m", fmt.scale_dtype.name, 1),) if fmt.has_min else ())
    return StorageType(f"{fmt.name}.lanes", QBLOCK, fmt.block_bytes, np.dtype(np.uint8), "U8", fields, encode, decode,
                       f"GGUF {fmt.name} blocks of one bundle part stored lane-major (quants [{qs} x nb], then "
                       f"scales [nb]{', mins [nb]' if fmt.has_min else ''}): FFN bundle rows only")


def _block_type(fmt) -> StorageType:
    """A dense-weight block type (runtime/quant.py): per matrix row its codes, then scales (then mins)."""
    from . import quant as Q

    def encode(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if fmt.name not in Q.QUANTIZE_TYPES:
            raise StorageError(f"{fmt.name} holds GGUF K-quant blocks exactly; float weights are quantized to "
                               f"one of {Q.QUANTIZE_TYPES}")
        fmt.row_bytes(x.shape[-1])
        return Q.to_rows(Q.quantize(x.reshape(-1, x.shape[-1]), fmt.name)).reshape(*x.shape[:-1], -1)

    def decode(b: np.ndarray) -> np.ndarray:
        b = np.asarray(b).view(np.uint8)
        rows = b.reshape(-1, b.shape[-1])
        k = rows.shape[1] // fmt.block_bytes * fmt.block
        return Q.from_rows(rows, fmt, k).dequantize().reshape(*b.shape[:-1], k)

    bits, per = fmt.qtype.bits, fmt.block * fmt.qtype.bits // 8
    fields = (("codes", "uint8", per), ("scale", fmt.scale_dtype.name, 1)) + \
        ((("min", fmt.scale_dtype.name, 1),) if fmt.qtype.has_min else ())
    formula = "q * scale + min" if fmt.qtype.has_min else f"(q - {fmt.qtype.zero}) * scale"
    return StorageType(fmt.name, fmt.block, fmt.block_bytes, np.dtype(np.uint8), "U8", fields, encode, decode,
                       f"{bits}-bit blocks of {fmt.block}, w = {formula}; a row stores all its codes, then its "
                       f"{fmt.scale_dtype.name} scales" + (", then mins" if fmt.qtype.has_min else "")
                       + " (MatMulNBits' layout, runtime/quant.py)")


def block_format(storage: StorageType):
    """The quant.BlockFormat of a dense block type, None for float storage."""
    from .quant import BLOCK_FORMATS
    return BLOCK_FORMATS.get(storage.name)


def _block_types() -> tuple[StorageType, ...]:
    from .quant import BLOCK_FORMATS
    return tuple(_block_type(f) for f in BLOCK_FORMATS.values())


STORAGE_TYPES: dict[str, StorageType] = {t.name: t for t in (
    StorageType("f32", 1, 4, np.dtype(np.float32), "F32", (("value", "float32", 1),),
                _f32_encode, _f32_decode, "IEEE single precision"),
    StorageType("f16", 1, 2, np.dtype(np.uint16), "F16", (("value", "float16", 1),),
                _f16_encode, _f16_decode, "IEEE half precision; kernels get the bits as uint16"),
    *(_lanes_type(qformat(name)) for name in sorted(QFORMATS)),
    *_block_types(),
)}
# Bundle rows of a model converted to block type X are stored as this type (dense weights as X itself).
BUNDLE_STORAGE = {name: f"{name}.lanes" for name in QFORMATS}


def bundle_qformat(storage: StorageType) -> QFormat | None:
    """The quantized-kernel format of a bundle storage type, None for float rows."""
    if storage.name.endswith(".lanes"):
        return qformat(storage.name[:-len(".lanes")])
    return None


def storage_type(name: str) -> StorageType:
    """The table entry for a manifest name ("f16"); older manifests wrote safetensors names ("F16")."""
    t = STORAGE_TYPES.get(name) or next((s for s in STORAGE_TYPES.values() if s.safetensors_dtype == name), None)
    if t is None:
        raise StorageError(f"unknown storage type {name!r}; known: {sorted(STORAGE_TYPES)}")
    return t


def float_storage_of(safetensors_dtype: str) -> StorageType | None:
    """The float storage type whose safetensors dtype is this one (F16 -> f16), None for other dtypes."""
    return next((s for s in STORAGE_TYPES.values() if s.block_elems == 1 and s.safetensors_dtype == safetensors_dtype),
                None)


# ---------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as the runtime sees it."""
    name: str
    shape: tuple[int, ...]            # logical shape (elements)
    storage: StorageType | None       # None: not a weight (e.g. uint32 CRCs): raw safetensors dtype
    dtype: np.dtype                   # dtype of the array handed out (storage.view_dtype for weights)
    offset: int                       # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class BundlePart:
    """One piece of a bundle row (a neuron's gate row, up row or down column)."""
    name: str                         # "gate" | "up" | "down"
    offset: int                       # in elements of the row (what the manifest records)
    length: int                       # elements
    byte_offset: int                  # where the part starts inside the row


CACHE_ROW_ALIGN = 16        # cached rows start on 16-byte boundaries (a multiple of every scale view's item)


@dataclass(frozen=True)
class BundleLayout:
    """The FFN bundle file: per layer one [n_rows, stride] block of rows, row i = neuron i's parts.

    Rows start every stride_bytes (row_bytes padded so no row straddles an `alignment` block), each
    layer's first row on an `alignment` boundary at layer_offsets[layer] (absolute file offsets)."""
    file: str
    storage: StorageType
    parts: tuple[BundlePart, ...]
    row_bytes: int
    stride_bytes: int
    alignment: int
    layer_offsets: tuple[int, ...]
    n_rows: int
    resident: tuple[str, ...] = ()    # parts kept as dense tensors instead of in the rows ("gate")

    @property
    def stride_items(self) -> int:
        """Row stride in view_dtype items: the second dimension of a layer's array."""
        return self.stride_bytes // self.storage.view_dtype.itemsize

    @property
    def layer_bytes(self) -> int:
        return self.n_rows * self.stride_bytes

    @property
    def cache_row_bytes(self) -> int:
        """Bytes of one row in a neuron cache: the row's parts without the file's block padding (rounded up
        to CACHE_ROW_ALIGN), not the file's stride. Why: the stride pads rows so none straddles a 4 KiB
        block (q4_0 rows of 2880 B sit at a 4096 B stride, f16 rows of 10240 B at 12288 B), and a cache
        holding the padding spent 30 % (q4) / 17 % (f16) of its bytes on nothing; packed, the same budget
        holds 1.42x / 1.2x the rows. Reads still fetch whole blocks; the reader copies each row's parts out
        of its staging buffer."""
        width = -(-self.row_bytes // CACHE_ROW_ALIGN) * CACHE_ROW_ALIGN
        item = self.dtype.itemsize
        return min(self.stride_bytes, -(-width // item) * item)

    @property
    def dtype(self) -> np.dtype:
        return self.storage.view_dtype

    def item_offsets(self) -> dict[str, int]:
        """Part name -> offset in view_dtype items inside a row (what the FFN kernel indexes)."""
        item = self.storage.view_dtype.itemsize
        return {p.name: p.byte_offset // item for p in self.parts}

    def part(self, name: str) -> BundlePart:
        return next(p for p in self.parts if p.name == name)

    def has(self, name: str) -> bool:
        return any(p.name == name for p in self.parts)

    @property
    def gate_resident(self) -> bool:
        """The gate-resident variant of a gated FFN: rows hold up | down only (2/3 of the bytes) and
        W_gate is a dense tensor, layers.{i}.ffn.gate.weight, in DRAM: act(gate.h) is computed exactly
        for every neuron, so a selector can rank on it before any row is read (PowerInfer-2's
        gate-first order), and rows are read only for the neurons it keeps."""
        return "gate" in self.resident

    @property
    def up_resident(self) -> bool:
        """The down-only variant: W_gate and W_up both dense, rows hold only the down column (1/3 of the
        bytes): what the exact selector (|act(gate.h) * up.h| * ||W_down[:, i]||) needs."""
        return "up" in self.resident

    def decode_part(self, rows: np.ndarray, name: str) -> np.ndarray:
        """f32 [len(rows), length] of one part of stored rows [n, stride_items] (tests, calibration)."""
        p, item = self.part(name), self.storage.view_dtype.itemsize
        start = p.byte_offset // item
        return self.storage.decode(rows[:, start:start + self.storage.row_items(p.length)])
