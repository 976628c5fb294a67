"""Reading and planning safetensors files without loading them whole.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data section.
We validate every offset against the file size so a truncated or corrupt file fails with its name and
the problem, instead of a numpy error later. bf16 is widened to f32 here (numpy has no bf16).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from .errors import FlashlmError
from .pagecache import drop_cached

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8",
               np.dtype(np.int32): "I32", np.dtype(np.uint16): "U16", np.dtype(np.int64): "I64"}


class SafetensorsError(ValueError, FlashlmError):
    pass


def read_header(path) -> tuple[dict, int, dict]:
    """Return (tensors {name: info}, data_start byte offset, metadata), validated against the file size."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: file too short to be safetensors ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    for name, info in header.items():
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            begin, end = (int(v) for v in info["data_offsets"])
            shape = [int(s) for s in info["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry ({e!r})") from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin < 0 or end < begin or end - begin != expected:
            raise SafetensorsError(f"{path}: tensor {name!r} offsets {begin}..{end} do not match shape {shape} {info['dtype']}")
        if end > data_len:
            raise SafetensorsError(f"{path}: tensor {name!r} points past the end of the file "
                                   f"(needs byte {data_start + end}, file has {size}); truncated or corrupt")
    return header, data_start, metadata


def read_tensor(path, info: dict, data_start: int, *, widen_bf16: bool = True) -> np.ndarray:
    """Read one tensor into a fresh array. bf16 becomes f32 exactly (bf16 is the top half of f32)."""
    dtype = np.dtype(DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = (end - begin) // dtype.itemsize
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        arr = np.fromfile(f, dtype=dtype, count=count)
        drop_cached(f.fileno(), data_start + begin, end - begin)   # read once: keep it out of the page cache
    if arr.size != count:
        raise SafetensorsError(f"{path}: short read of a tensor at byte {data_start + begin}")
    arr = arr.reshape(info["shape"])
    if info["dtype"] == "BF16" and widen_bf16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def plan_file(tensors: list[tuple[str, str, list[int]]], *, align: int = 8,
              metadata: dict | None = None) -> tuple[bytes, dict[str, int]]:
    """Lay out a safetensors file: return (8-byte length + header, {name: absolute data offset}).

    `tensors` is [(name, dtype name, shape)] in file order. Every tensor's absolute offset is a multiple
    of `align`: the header is padded with spaces (allowed by the format) so the data section starts
    aligned, and gaps between tensors are filled with U8 tensors named `__pad__.N` because the format
    forbids holes in the data section.
    """
    entries, offsets = {}, {}
    pos, n_pad = 0, 0
    for name, dtype, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        gap = (-pos) % align
        if gap:
            entries[f"__pad__.{n_pad}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [pos, pos + gap]}
            n_pad += 1
            pos += gap
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    if metadata:
        entries["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    n = len(raw) + (-(8 + len(raw)) % align)
    header = struct.pack("<Q", n) + raw + b" " * (n - len(raw))
    return header, {k: v + len(header) for k, v in offsets.items()}
