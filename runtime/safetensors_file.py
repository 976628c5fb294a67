"""Reading and planning safetensors files without loading them whole.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data section.
We validate every offset against the file size so a truncated or corrupt file fails with its name and
the problem, instead of a numpy error later. bf16 is widened to f32 here (numpy has no bf16).
"""
from __future__ import annotations

import json
import math
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


class SafetensorsError(FlashlmError, ValueError):
    """A safetensors file that is truncated or whose header is malformed; the message names the file."""


MAX_RANK = 8


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise SafetensorsError(f"key {dup!r} appears twice")
    return dict(pairs)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path) -> tuple[dict, int, dict]:
    """Return (tensors {name: info}, data_start byte offset, metadata), validated against the file size.

    Checked as the format requires: a JSON object without duplicate keys, every entry a known dtype with
    a shape of non-negative integers whose byte size matches its offsets, and the tensors tiling the
    data section exactly (no overlaps, no holes, nothing after the last one). Offsets that were shifted,
    swapped or made to overlap therefore fail here instead of silently reading other bytes.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: file too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except SafetensorsError as e:
        raise SafetensorsError(f"{path}: header JSON: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    except RecursionError:
        raise SafetensorsError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of strings")
    data_start = 8 + n
    data_len = size - data_start
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"{path}: tensor {name!r} entry is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(_is_int(d) and 0 <= d < 1 << 62 for d in shape)):
            raise SafetensorsError(f"{path}: tensor {name!r} shape must be a list of at most {MAX_RANK} "
                                   f"non-negative integers, got {str(shape)[:80]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(v) for v in offsets):
            raise SafetensorsError(f"{path}: tensor {name!r} data_offsets must be two integers, got {str(offsets)[:80]}")
        begin, end = offsets
        expected = math.prod(shape) * np.dtype(DTYPES[dtype_name]).itemsize   # Python ints: no overflow
        if begin < 0 or end < begin or end - begin != expected:
            raise SafetensorsError(f"{path}: tensor {name!r} offsets {begin}..{end} do not match shape {shape} {dtype_name}")
        if end > data_len:
            raise SafetensorsError(f"{path}: tensor {name!r} points past the end of the file "
                                   f"(needs byte {data_start + end}, file has {size}); truncated or corrupt")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else "leaves a hole before it"
            raise SafetensorsError(f"{path}: tensor {name!r} at offsets {begin}..{end} {what} (expected to start at "
                                   f"{pos}); the header's data_offsets are corrupt")
        pos = end
    if pos != data_len:
        raise SafetensorsError(f"{path}: {data_len - pos} bytes after the last tensor are not described by the header; "
                               "corrupt or not a safetensors file")
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
