"""A validating reader for GGUF files (llama.cpp's format), checked before anything is trusted.

Why not `gguf.GGUFReader` alone: it builds a numpy view per metadata element (a 49k-token vocabulary
costs seconds) before any check can run, trusts every count (a 2**62-entry array or a 2**31
`block_count` exhausts memory) and never checks where tensor data lies (offsets that overlap, are
misaligned or point into the header are accepted, and so are type swaps that shrink a tensor).

Here every count and length is bounded by the bytes left in the file before it is used, each tensor's
size is computed from its type and dims, and the tensors must tile the data section exactly as
llama.cpp and gguf-py write it (each at the aligned end of the previous one). The result exposes the
subset of GGUFReader's interface the converter uses (`fields[key].contents()`, `tensors[i].name /
shape / tensor_type / n_bytes / data_offset / data`), with tensor data as views of one read-only map.

`check_model_metadata` then checks the model hyperparameters any llama.cpp architecture stores under
`{arch}.` (positive integers, finite positive floats) and the tokenizer arrays, so every later
division, shape and allocation works on checked values. Errors name the file and the key or tensor.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .source import ConversionError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                     # GGML_MAX_DIMS
MAX_NAME_BYTES = 64              # GGML_MAX_NAME (including the terminating zero in C)
MAX_KEY_BYTES = 65535

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
           U64: "<Q", I64: "<q", F64: "<d"}
_NUMPY = {U8: "<u1", I8: "<i1", U16: "<u2", I16: "<i2", U32: "<u4", I32: "<i4", F32: "<f4", BOOL: "<u1",
          U64: "<u8", I64: "<i8", F64: "<f8"}
INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)
FLOAT_TYPES = (F32, F64)
# Integer tensor types never hold weights; accepting one would let a type swap of a same-size float
# type (F16 <-> I16) pass the size checks.
_INTEGER_TENSOR_TYPES = {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                         GGMLQuantizationType.I64}
_NUMPY_TENSOR = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.F64: np.float64}


class GGUFFormatError(ConversionError):
    """A GGUF file whose structure (header, metadata, tensor table, data layout) is invalid."""


@dataclass
class Field:
    """One metadata entry: `types` as GGUFReader has them ([ARRAY, element type] for arrays)."""
    name: str
    types: list[int]
    value: object                # a Python scalar, a list of str, or a numpy array of numbers

    def contents(self):
        if isinstance(self.value, np.ndarray):
            return self.value.tolist()
        if isinstance(self.value, _LazyStrings):
            return self.value.decode()
        return self.value

    @property
    def count(self) -> int | None:
        return len(self.value) if self.types[0] == ARRAY else None


@dataclass
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray            # dims fastest-first (ne[0] first), as GGUFReader
    n_elements: int
    n_bytes: int
    data_offset: int             # absolute byte offset in the file
    data: np.ndarray             # read-only view; quantized types as uint8 [..., bytes per row]


class _Cursor:
    """Bounded little-endian reads from a buffer; every length is checked against what is left."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str):
        raise GGUFFormatError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} runs past the end of the file (needs {n} bytes at byte {self.pos}, "
                      f"file has {self.size}); truncated or corrupt")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("<Q", what + " length")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long (at most {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")


class _LazyStrings:
    """An array of strings located (each length checked) at parse time, decoded on first use: walking
    the lengths of a 262k-token vocabulary takes milliseconds, decoding it most of a second."""

    def __init__(self, cur: _Cursor, key: str, count: int):
        self.buf, self.path, self.key = cur.buf, cur.path, key
        self.start = cur.pos
        unpack, buf, pos, size = struct.unpack_from, cur.buf, cur.pos, cur.size
        for j in range(count):
            if pos + 8 > size:
                cur.pos = pos
                cur.need(8, f"metadata {key!r}[{j}] length")
            pos += 8 + unpack("<Q", buf, pos)[0]
        if pos > size:
            cur.fail(f"metadata {key!r}[{count - 1}] runs past the end of the file; truncated or corrupt")
        cur.pos = pos
        self.count, self._decoded = count, None

    def __len__(self) -> int:
        return self.count

    def decode(self) -> list[str]:
        if self._decoded is None:
            out, pos, buf = [], self.start, self.buf
            for j in range(self.count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                try:
                    out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
                except UnicodeDecodeError:
                    raise GGUFFormatError(f"{self.path}: metadata {self.key!r}[{j}] is not valid UTF-8") from None
                pos += 8 + n
            self._decoded = out
        return list(self._decoded)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


class GGUFFile:
    """A parsed and structurally validated GGUF file. Raises GGUFFormatError naming the problem."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
            size = os.fstat(self._file.fileno()).st_size
            if size < 24:
                raise GGUFFormatError(f"{self.path}: {size} bytes is too short for a GGUF header; truncated")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ConversionError(f"{self.path}: cannot read ({e.strerror or e})") from None
        cur = _Cursor(self._map, self.path)
        if cur.buf[:4] != GGUF_MAGIC:
            cur.fail(f"not a GGUF file (magic {bytes(cur.buf[:4])!r})")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            cur.fail(f"GGUF version {self.version} is not supported (supported: 2, 3)"
                     + ("; this looks like a big-endian file" if swapped in SUPPORTED_VERSIONS else ""))
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        # Each metadata entry takes at least 13 bytes (key length, type, 1-byte value) and each tensor
        # entry at least 32 (name length, n_dims, one dim, type, offset): bound both before looping.
        if n_kv * 13 > size - cur.pos:
            cur.fail(f"header says {n_kv} metadata entries, more than the file can hold; truncated or corrupt")
        if n_tensors * 32 > size - cur.pos:
            cur.fail(f"header says {n_tensors} tensors, more than the file can hold; truncated or corrupt")
        self.fields: dict[str, Field] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}", MAX_KEY_BYTES)
            if key in self.fields:
                cur.fail(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(cur, key)
        self.alignment = self._alignment()
        infos = [self._tensor_info(cur, i) for i in range(n_tensors)]
        self.data_start = _align(cur.pos, self.alignment)
        if self.data_start > size:
            cur.fail("the tensor table runs into the end of the file; truncated")
        self.tensors = self._place(infos, size)

    # --- metadata -------------------------------------------------------------------------------
    def _value(self, cur: _Cursor, key: str) -> Field:
        vtype = cur.scalar("<I", f"metadata {key!r} type")
        if vtype == STRING:
            return Field(key, [STRING], cur.string(f"metadata {key!r}"))
        if vtype in _SCALAR:
            v = cur.scalar(_SCALAR[vtype], f"metadata {key!r}")
            return Field(key, [vtype], bool(v) if vtype == BOOL else v)
        if vtype != ARRAY:
            cur.fail(f"metadata {key!r} has unknown value type {vtype}")
        etype = cur.scalar("<I", f"metadata {key!r} element type")
        count = cur.scalar("<Q", f"metadata {key!r} element count")
        if etype == STRING:
            if count * 8 > cur.size - cur.pos:    # every string has an 8-byte length
                cur.fail(f"metadata {key!r}: array of {count} strings is larger than the file; truncated or corrupt")
            return Field(key, [ARRAY, STRING], _LazyStrings(cur, key, count))
        if etype not in _NUMPY:
            cur.fail(f"metadata {key!r}: arrays of value type {etype} are not supported")
        nbytes = count * np.dtype(_NUMPY[etype]).itemsize
        cur.need(nbytes, f"metadata {key!r} ({count} elements)")
        arr = np.frombuffer(self._map, dtype=_NUMPY[etype], count=count, offset=cur.pos)
        cur.pos += nbytes
        return Field(key, [ARRAY, etype], arr.astype(bool) if etype == BOOL else arr)

    def _alignment(self) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return DEFAULT_ALIGNMENT
        a = f.value
        if f.types[0] not in INT_TYPES or not 0 < a <= 1 << 20 or a & (a - 1):
            raise GGUFFormatError(f"{self.path}: metadata 'general.alignment' must be a power of two "
                                  f"up to 1 MiB, got {a!r}")
        return int(a)

    # --- tensors --------------------------------------------------------------------------------
    def _tensor_info(self, cur: _Cursor, i: int):
        name = cur.string(f"tensor #{i} name", MAX_NAME_BYTES)
        n_dims = cur.scalar("<I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [cur.scalar("<Q", f"tensor {name!r} dims") for _ in range(n_dims)]
        raw_type = cur.scalar("<I", f"tensor {name!r} type")
        offset = cur.scalar("<Q", f"tensor {name!r} offset")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            cur.fail(f"tensor {name!r} has unknown type {raw_type}")
        if qtype in _INTEGER_TENSOR_TYPES:
            cur.fail(f"tensor {name!r} has integer type {qtype.name}, not a weight type")
        if any(d < 1 for d in dims):
            cur.fail(f"tensor {name!r} has a zero dimension {dims}")
        if dims[0] % block:
            cur.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
        n_elements = math.prod(dims)          # Python ints: no overflow; bounded by the file size below
        return name, dims, qtype, n_elements, n_elements // block * type_size, offset

    def _place(self, infos, size: int) -> list[Tensor]:
        names = set()
        data_len = size - self.data_start
        for name, _, _, _, n_bytes, offset in infos:
            if name in names:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} appears twice")
            names.add(name)
            if offset % self.alignment:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} offset {offset} is not a multiple of the "
                                      f"alignment {self.alignment}; corrupt")
            if offset + n_bytes > data_len:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} (bytes {offset}..{offset + n_bytes} of the data "
                                      f"section) ends past the end of the file ({data_len} data bytes); truncated or corrupt")
        # Writers place tensors back to back, each padded to the alignment: anything else means an
        # offset, a dim or a type was altered (overlaps, gaps left by a type that shrank a tensor).
        expect = 0
        for name, _, qtype, _, n_bytes, offset in sorted(infos, key=lambda t: t[5]):
            if offset != expect:
                kind = "overlaps the tensor before it" if offset < expect else "leaves a gap before it"
                raise GGUFFormatError(f"{self.path}: tensor {name!r} at data offset {offset} {kind} (expected "
                                      f"{expect}); the tensor table is corrupt (offset, dims or type {qtype.name})")
            expect = _align(offset + n_bytes, self.alignment)
        if infos and size - self.data_start > expect:
            raise GGUFFormatError(f"{self.path}: {size - self.data_start - expect} bytes after the last tensor; "
                                  "the tensor table does not describe the data (a dims or type change?)")
        tensors = []
        for name, dims, qtype, n_elements, n_bytes, offset in infos:
            start = self.data_start + offset
            np_dims = tuple(reversed(dims))
            if qtype in _NUMPY_TENSOR:
                data = np.frombuffer(self._map, dtype=_NUMPY_TENSOR[qtype], count=n_elements, offset=start)
            else:
                block, type_size = GGML_QUANT_SIZES[qtype]
                data = np.frombuffer(self._map, dtype=np.uint8, count=n_bytes, offset=start)
                np_dims = (*np_dims[:-1], np_dims[-1] // block * type_size)
            tensors.append(Tensor(name, qtype, np.array(dims, dtype=np.uint64), n_elements, n_bytes, start,
                                  data.reshape(np_dims)))
        return tensors

    def close(self) -> None:
        self.fields, self.tensors = {}, []
        try:
            self._map.close()
        except BufferError:          # a loaded tensor still views the map; it is freed with that view
            pass
        self._file.close()


# --- model metadata ---------------------------------------------------------------------------------

# `{arch}.KEY` -> what the value must be. Present keys are checked whatever the architecture; which
# keys are required is up to the architecture's reader.
POSITIVE_INTS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
                 "attention.head_count", "attention.head_count_kv", "attention.key_length",
                 "attention.value_length", "attention.sliding_window", "rope.dimension_count",
                 "rope.scaling.original_context_length")
POSITIVE_FLOATS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
                   "rope.freq_base_swa", "rope.scaling.factor", "rope.scale_linear")
MAX_DIM = 1 << 31
TOKEN_TYPES = range(0, 7)        # llama.cpp: undefined, normal, unknown, control, user-defined, unused, byte
TOKEN_ID_KEYS = ("bos", "eos", "unknown", "padding", "seperator", "sep", "mask", "eot", "eom")


def _bad(f: GGUFFile, key: str, what: str, got) -> GGUFFormatError:
    return GGUFFormatError(f"{f.path}: GGUF metadata {key!r} {what}, got {got!r}")


def _check_int(f: GGUFFile, key: str, low: int, high: int) -> None:
    field = f.fields.get(key)
    if field is None:
        return
    values = field.value if field.types[0] == ARRAY else [field.value]
    etype = field.types[-1]
    if etype not in INT_TYPES:
        raise _bad(f, key, "must be an integer", field.contents() if field.types[0] != ARRAY else "an array")
    for v in np.asarray(values).reshape(-1)[:1 << 16].tolist():
        if not low <= v <= high:
            raise _bad(f, key, f"must be in [{low}, {high}]", v)


def _check_float(f: GGUFFile, key: str) -> None:
    field = f.fields.get(key)
    if field is None:
        return
    if field.types != [F32] and field.types != [F64]:
        raise _bad(f, key, "must be a float", field.contents() if field.types[0] != ARRAY else "an array")
    if not (math.isfinite(field.value) and field.value > 0):
        raise _bad(f, key, "must be a finite number > 0", field.value)


def check_model_metadata(f: GGUFFile) -> str:
    """Check the architecture's hyperparameters and the tokenizer arrays; returns the architecture."""
    arch = f.fields.get("general.architecture")
    if arch is None:
        raise GGUFFormatError(f"{f.path}: GGUF metadata key 'general.architecture' is missing")
    if arch.types != [STRING]:
        raise _bad(f, "general.architecture", "must be a string", arch.contents())
    a = arch.value
    for k in POSITIVE_INTS:
        _check_int(f, f"{a}.{k}", 1, MAX_DIM)
    _check_int(f, f"{a}.expert_count", 0, 1 << 16)
    for k in POSITIVE_FLOATS:
        _check_float(f, f"{a}.{k}")
    # The layer count drives loops and allocations: it must match the blocks the tensors describe.
    blocks = {int(m[1]) for t in f.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    n_blocks = max(blocks) + 1 if blocks else 0
    count = f.fields.get(f"{a}.block_count")
    if count is not None and count.value != n_blocks:
        raise GGUFFormatError(f"{f.path}: GGUF metadata '{a}.block_count' is {count.value} but the file has "
                              f"tensors for {n_blocks} blocks")
    if blocks and len(blocks) != n_blocks:
        missing = sorted(set(range(n_blocks)) - blocks)[:5]
        raise GGUFFormatError(f"{f.path}: tensors of blocks {missing} are missing")
    _check_tokenizer(f)
    return a


def _check_tokenizer(f: GGUFFile) -> None:
    tokens = f.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if tokens.types != [ARRAY, STRING]:
        raise _bad(f, "tokenizer.ggml.tokens", "must be an array of strings", tokens.types)
    n = len(tokens.value)
    if n == 0:
        raise _bad(f, "tokenizer.ggml.tokens", "must not be empty", [])
    for key, types in (("tokenizer.ggml.token_type", INT_TYPES), ("tokenizer.ggml.scores", FLOAT_TYPES)):
        field = f.fields.get(key)
        if field is None:
            continue
        if field.types[0] != ARRAY or field.types[-1] not in types:
            raise _bad(f, key, "must be an array of " + ("integers" if types is INT_TYPES else "floats"), field.types)
        if len(field.value) != n:
            raise _bad(f, key, f"must have one entry per token ({n})", f"{len(field.value)} entries")
        if key.endswith("token_type"):
            bad = np.flatnonzero((field.value < TOKEN_TYPES.start) | (field.value >= TOKEN_TYPES.stop))
            if len(bad):
                raise _bad(f, key, f"entries must be token types 0..6 (token {int(bad[0])})", int(field.value[bad[0]]))
        elif not np.isfinite(field.value).all():
            raise _bad(f, key, "must be finite", "nan or inf")
    merges = f.fields.get("tokenizer.ggml.merges")
    if merges is not None and merges.types != [ARRAY, STRING]:
        raise _bad(f, "tokenizer.ggml.merges", "must be an array of strings", merges.types)
    for name in TOKEN_ID_KEYS:
        _check_int(f, f"tokenizer.ggml.{name}_token_id", 0, n - 1)
