"""The few ONNX protobuf messages flashlm's graphs need, written straight to bytes.

Why not the `onnx` package: importing it costs a decoding process ~17 MiB of RSS (13 anonymous: its
protobuf descriptors and modules; nothing of it is freed when the modules are dropped afterwards), 6% of
SmolLM2's whole `flashlm run` (measured, onnxruntime 1.32, onnx 1.20: 45 -> 62 MiB), and onnxruntime only
wants the serialized bytes. The encoding is protobuf's wire format (varints, length-delimited fields,
fixed32 floats) for the subset of onnx.proto that GraphBuilder uses; tests/test_onnx_proto.py parses
every message back with the `onnx` package and compares it with what onnx.helper builds.

Field numbers are onnx.proto's (IR version 9). Repeated scalars are written unpacked, which proto2 parsers
(onnxruntime's included) read as written.
"""
from __future__ import annotations

import struct

import numpy as np

# TensorProto.DataType
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, BOOL, FLOAT16, DOUBLE, UINT32, UINT64 = \
    1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13
_DTYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.uint8): UINT8, np.dtype(np.int8): INT8,
           np.dtype(np.uint16): UINT16, np.dtype(np.int16): INT16, np.dtype(np.int32): INT32,
           np.dtype(np.int64): INT64, np.dtype(np.bool_): BOOL, np.dtype(np.float16): FLOAT16,
           np.dtype(np.float64): DOUBLE, np.dtype(np.uint32): UINT32, np.dtype(np.uint64): UINT64}
# AttributeProto.AttributeType
_ATTR_FLOAT, _ATTR_INT, _ATTR_STRING, _ATTR_FLOATS, _ATTR_INTS = 1, 2, 3, 6, 7
_EXTERNAL = 1                   # TensorProto.DataLocation


def tensor_dtype(dtype) -> int:
    """The TensorProto data type of a numpy dtype."""
    try:
        return _DTYPES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no ONNX tensor type for numpy dtype {np.dtype(dtype)}") from None


# --- wire format ------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1            # negative int64s: ten bytes of two's complement, as protobuf writes them
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(int(n))


def _bytes(field: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _float(field: int, x: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", x)


# --- messages ---------------------------------------------------------------------------------------------
def tensor(name: str, arr: np.ndarray) -> bytes:
    """TensorProto holding `arr` (raw little-endian data), as onnx.numpy_helper.from_array."""
    arr = np.asarray(arr)           # (not ascontiguousarray: it makes a 0-d array 1-d; tobytes is C order)
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return b"".join(_int(1, d) for d in arr.shape) + _int(2, tensor_dtype(arr.dtype)) + _bytes(8, name) + _bytes(9, data)


def external_tensor(name: str, dtype, shape, location: str, offset: int, length: int) -> bytes:
    """TensorProto whose data lives outside the model (location / offset / length entries)."""
    entries = b"".join(_bytes(13, _bytes(1, k) + _bytes(2, v))
                       for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))))
    return b"".join(_int(1, d) for d in shape) + _int(2, tensor_dtype(dtype)) + _bytes(8, name) + entries \
        + _int(14, _EXTERNAL)


def _attribute(name: str, value) -> bytes:
    out = _bytes(1, name)
    if isinstance(value, (int, np.integer)):     # (bool is an int: 0 / 1, as onnx.helper writes it)
        return out + _int(3, int(value)) + _int(20, _ATTR_INT)
    if isinstance(value, (float, np.floating)):
        return out + _float(2, float(value)) + _int(20, _ATTR_FLOAT)
    if isinstance(value, (str, bytes)):
        return out + _bytes(4, value) + _int(20, _ATTR_STRING)
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else []
    if values and all(isinstance(v, (int, np.integer)) for v in values):
        return out + b"".join(_int(8, int(v)) for v in values) + _int(20, _ATTR_INTS)
    if values and all(isinstance(v, (float, np.floating, int)) for v in values):
        return out + b"".join(_float(7, float(v)) for v in values) + _int(20, _ATTR_FLOATS)
    raise ValueError(f"attribute {name}: unsupported value {value!r}")


def node(op_type: str, inputs: list[str], outputs: list[str], name: str = "", domain: str = "", **attrs) -> bytes:
    """NodeProto, as onnx.helper.make_node (attributes sorted by name, as it writes them)."""
    out = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
    if name:
        out += _bytes(3, name)
    out += _bytes(4, op_type)
    if domain:
        out += _bytes(7, domain)
    return out + b"".join(_bytes(5, _attribute(k, attrs[k])) for k in sorted(attrs))


def value_info(name: str, elem_type: int, shape: list) -> bytes:
    """ValueInfoProto of a tensor: ints are fixed sizes, strings named free ones."""
    dims = b"".join(_bytes(1, _int(1, d) if isinstance(d, (int, np.integer)) else _bytes(2, d)) for d in shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, elem_type) + _bytes(2, dims)))


def model(nodes: list[bytes], name: str, inputs: list[bytes], outputs: list[bytes], initializers: list[bytes],
          opsets: list[tuple[str, int]], ir_version: int) -> bytes:
    """A serialized ModelProto: the graph and its operator-set imports."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, name) + b"".join(_bytes(5, t) for t in initializers) \
        + b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    return _int(1, ir_version) + _bytes(7, graph) + b"".join(_bytes(8, _bytes(1, d) + _int(2, v)) for d, v in opsets)
