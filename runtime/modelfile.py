"""Open a flashlm model folder: read and check the manifest, read files verified against their sha256."""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import FORMAT_VERSION, ModelConfig
from .flash_reader import aligned_empty
from .safetensors_file import DTYPES, SafetensorsError, read_header


ROW_CRC_TENSOR = "ffn.row_crc32"    # [n_layers, n_ff] uint32 in dense.safetensors


class ModelFileError(Exception):
    """A model folder that is missing, incomplete or corrupt; the message names the file."""


def row_crc32(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's stored bytes, padding included. rows: [n, stride] any dtype."""
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
    return np.fromiter((zlib.crc32(r) for r in raw), dtype=np.uint32, count=len(rows))


def check_rows(rows: np.ndarray, neurons: np.ndarray, expected: np.ndarray | None, path, layer: int) -> None:
    """Raise ModelFileError if a row read from flash does not match its CRC-32 from conversion."""
    if expected is None or not len(neurons):
        return
    bad = np.flatnonzero(row_crc32(rows) != expected[layer][neurons])
    if len(bad):
        raise ModelFileError(f"{path}: layer {layer} neuron {int(neurons[bad[0]])} (and {len(bad) - 1} more rows) "
                             f"fail their CRC-32: the bundle file is corrupt; re-convert the model")


@dataclass
class ModelFolder:
    path: Path
    manifest: dict
    config: ModelConfig

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def bundles(self) -> dict:
        return self.manifest["bundles"]


def open_folder(path) -> ModelFolder:
    """Read manifest.json and check that every listed file exists with its recorded size."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise ModelFileError(f"{path}: not a flashlm model folder (convert a checkpoint with `flashlm convert`)")
    if not mpath.exists():
        raise ModelFileError(f"{mpath}: missing; the folder is not a complete flashlm model")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != "flashlm" or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{mpath}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                             f"is not flashlm version {FORMAT_VERSION}; re-convert the model")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.exists():
            raise ModelFileError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != info["bytes"]:
            raise ModelFileError(f"{f}: {f.stat().st_size} bytes, manifest says {info['bytes']}; truncated or replaced")
    return ModelFolder(path, manifest, ModelConfig.from_dict(manifest["config"]))


def read_verified(folder: ModelFolder, name: str) -> np.ndarray:
    """Read a whole file into page-aligned memory, checking its sha256 on the way. Returns uint8 [bytes]."""
    path = folder.file(name)
    expected = folder.manifest["files"][name]["sha256"]
    size = os.path.getsize(path)
    buf = aligned_empty((size,), np.uint8)
    h = hashlib.sha256()
    chunk = 1 << 24
    with open(path, "rb", buffering=0) as f:
        for start in range(0, size, chunk):
            view = buf[start:start + chunk]
            if f.readinto(memoryview(view)) != view.size:
                raise ModelFileError(f"{path}: short read at byte {start}")
            h.update(view)
    if h.hexdigest() != expected:
        raise ModelFileError(f"{path}: sha256 {h.hexdigest()[:16]}... does not match the manifest "
                             f"({expected[:16]}...); the file is corrupt")
    return buf


def tensors_from_buffer(path: Path, buf: np.ndarray) -> dict[str, np.ndarray]:
    """Views into `buf` (a whole safetensors file) per tensor; f16 stays as uint16 bits for the kernels."""
    try:
        header, data_start, _ = read_header(path)
    except SafetensorsError as e:
        raise ModelFileError(str(e)) from None
    out = {}
    for name, info in header.items():
        if name.startswith("__pad__"):
            continue
        begin, end = info["data_offsets"]
        dtype = np.uint16 if info["dtype"] == "F16" else DTYPES[info["dtype"]]
        out[name] = buf[data_start + begin:data_start + end].view(dtype).reshape(info["shape"])
    return out
