"""Write a flashlm model folder from a Source, one tensor (or one layer's FFN) at a time.

Folder layout (see manifest.json for the exact offsets):
  dense.safetensors   embeddings, attention, norms, lm_head; 2-D weights in the storage dtype, 1-D in f32
  ffn.safetensors     per layer `layers.{i}.ffn.bundles` [n_ff, stride_elems]: row i = neuron i's
                      gate row | up row | down column, zero-padded to `stride_bytes`
  tokenizer.json, chat_template.jinja, generation_config.json, manifest.json (written last)

The folder is built under a temporary name beside the destination and renamed only when complete, so a
failed or interrupted conversion never leaves a folder that looks like a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flashlm.runtime.config import FORMAT_VERSION
from flashlm.runtime.modelfile import ROW_CRC_TENSOR, row_crc32
from flashlm.runtime.safetensors_file import DTYPES, plan_file
from flashlm.runtime.storage import STORAGE_TYPES, StorageType

from .source import ConversionError, Source, expected_tensors, is_ffn_bundle_tensor

DIRECT_IO_BLOCK = 4096
CONVERTER_VERSION = "0.1.0"


def bundle_stride(row_bytes: int, block: int = DIRECT_IO_BLOCK) -> int:
    """Bytes between bundle rows such that no row straddles a direct-I/O block boundary.

    A row padded to a multiple of the block (large rows) or to a power-of-two divisor of it (small
    rows) is fetched by a direct read of exactly ceil(row_bytes / block) blocks, the minimum; an
    unpadded row straddles one extra block on average.
    """
    if row_bytes >= block:
        return -(-row_bytes // block) * block
    stride = 1
    while stride < row_bytes:
        stride *= 2
    return stride


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


class _FileWriter:
    """Writes a planned safetensors file; tensors may arrive in any order, gaps stay zero."""

    def __init__(self, path: Path, plan: list[tuple[str, str, list[int]]], align: int, metadata: dict):
        header, self.offsets = plan_file(plan, align=align, metadata=metadata)
        self.sizes = {name: int(np.prod(shape)) * np.dtype(DTYPES[dt]).itemsize for name, dt, shape in plan}
        end = max((self.offsets[n] + self.sizes[n] for n, _, _ in plan), default=len(header))
        self.f = open(path, "wb")
        self.f.write(header)
        self.f.truncate(end)

    def write(self, name: str, arr: np.ndarray) -> int:
        data = np.ascontiguousarray(arr)
        assert data.nbytes == self.sizes[name], (name, data.nbytes, self.sizes[name])
        self.f.seek(self.offsets[name])
        self.f.write(memoryview(data).cast("B"))
        return data.nbytes

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def write_model(source: Source, out_dir, *, dtype: str = "f16", force: bool = False,
                progress: bool = True) -> Path:
    """Convert `source` into the flashlm folder `out_dir`. Returns the folder path."""
    if dtype not in STORAGE_TYPES:
        raise ConversionError(f"unknown storage dtype {dtype!r}; choose one of {sorted(STORAGE_TYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ConversionError(f"{out_dir} already exists (use --force to replace it)")
    config = source.config
    shapes = source.shapes()
    if shapes != expected_tensors(config):
        missing = set(expected_tensors(config)) - set(shapes)
        raise ConversionError(f"source tensors do not match the model config (missing: {sorted(missing)[:5]})")
    st = STORAGE_TYPES[dtype]
    # 2-D weights in the storage type (as stored: block types change the last dimension), 1-D in f32.
    dense_plan = [(n, st.safetensors_dtype, list(st.stored_shape(s))) if len(s) == 2 else (n, "F32", list(s))
                  for n, s in shapes.items() if not is_ffn_bundle_tensor(n)]
    item = st.view_dtype.itemsize
    row_bytes = st.row_bytes(config.bundle_elems)
    stride_bytes = bundle_stride(row_bytes)
    ffn_plan = [(f"layers.{i}.ffn.bundles", st.safetensors_dtype, [config.n_ff, stride_bytes // item])
                for i in range(config.n_layers)]
    # CRC-32 of every stored bundle row: flash mode never reads ffn.safetensors whole, so its sha256
    # cannot be checked at load; each row read from flash is checked against this instead.
    dense_plan.append((ROW_CRC_TENSOR, "U32", [config.n_layers, config.n_ff]))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        meta = {"format": "flashlm", "format_version": FORMAT_VERSION}
        dense = _FileWriter(tmp / "dense.safetensors", dense_plan, 64, meta)
        ffn = _FileWriter(tmp / "ffn.safetensors", ffn_plan, DIRECT_IO_BLOCK, meta)
        total = sum(dense.sizes.values()) + sum(ffn.sizes.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="Writing", disable=not progress,
                  file=sys.stderr) as bar:
            for name, dt, _ in dense_plan[:-1]:
                w = source.load(name)
                bar.update(dense.write(name, st.encode(w) if w.ndim == 2 else w.astype(np.float32)))
            crc = np.zeros((config.n_layers, config.n_ff), np.uint32)
            for i in range(config.n_layers):
                rows = _bundle_rows(source, config, i, st, stride_bytes // item)
                crc[i] = row_crc32(rows)
                bar.update(ffn.write(f"layers.{i}.ffn.bundles", rows))
                del rows
            dense.write(ROW_CRC_TENSOR, crc)
        dense.close()
        ffn.close()
        _write_side_files(tmp, source)
        manifest = _manifest(tmp, source, st, row_bytes, stride_bytes, ffn.offsets, ffn_plan,
                             [n for n, _, s in dense_plan if len(s) == 2 and n != ROW_CRC_TENSOR])
        manifest["converter"]["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _bundle_rows(source: Source, config, layer: int, st: StorageType, stride_items: int) -> np.ndarray:
    """[n_ff, stride_items]: neuron i's gate row, up row and down column side by side, each stored
    in `st` (a block type blocks each part on its own, so parts start on block boundaries)."""
    p = f"layers.{layer}.ffn."
    rows = np.zeros((config.n_ff, stride_items), dtype=st.view_dtype)
    col = 0
    for part, length in config.bundle_parts:
        if part == "down":
            w = source.load(p + "down.weight").T          # [d, n_ff] -> column i becomes row i
        else:
            w = source.load(p + part + ".weight")
        start = st.row_items(col)
        rows[:, start:start + st.row_items(length)] = st.encode(w)
        col += length
        del w
    return rows


def _write_side_files(tmp: Path, source: Source) -> None:
    info = source.info
    if info.tokenizer_json is not None:
        (tmp / "tokenizer.json").write_text(info.tokenizer_json, encoding="utf-8")
    if info.chat_template:
        (tmp / "chat_template.jinja").write_text(info.chat_template, encoding="utf-8")
    (tmp / "generation_config.json").write_text(json.dumps(info.generation_config, indent=1))


def _manifest(tmp: Path, source: Source, st: StorageType, row_bytes: int, stride_bytes: int,
              offsets: dict, ffn_plan, weights: list[str]) -> dict:
    config = source.config
    parts, col = [], 0
    for name, length in config.bundle_parts:
        parts.append({"name": name, "offset": col, "length": length})
        col += length
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    return {
        "format": "flashlm",
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "dtype": st.name,
        # Tensors whose storage type their safetensors dtype does not tell (block types are stored as bytes).
        "tensor_storage": {n: st.name for n in weights} if st.block_elems > 1 else {},
        "bundles": {
            "file": "ffn.safetensors",
            "tensor": "layers.{layer}.ffn.bundles",
            "dtype": st.safetensors_dtype,
            "storage": st.name,
            "parts": parts,                      # element offsets inside a row
            "row_bytes": row_bytes,
            "stride_bytes": stride_bytes,
            "alignment": DIRECT_IO_BLOCK,        # every layer's first row starts on this boundary
            "layer_offsets": [offsets[name] for name, _, _ in ffn_plan],
        },
        "files": files,
        "special_tokens": source.info.special_tokens,
        "generation_config": source.info.generation_config,
        "source": source.info.description,
        "converter": {"name": "flashlm", "version": CONVERTER_VERSION,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
