"""Add ffn_packed.safetensors (runtime/packed_rows.py) to a folder converted before `flashlm convert` wrote it.

    python -m flashlm.converters.packed FOLDER

Each layer of ffn.safetensors is read once, checked against its rows' CRC-32 from conversion, written
without the padding; the file appears under its name only when complete, and the manifest (which lists
it with its size and sha256) is replaced atomically afterwards.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from flashlm.runtime.modelfile import ROW_CRC_TENSOR, ModelFileError, open_folder, row_crc32
from flashlm.runtime.packed_rows import PACKED_FILE
from flashlm.runtime.pagecache import drop_cached, drop_file

from .source import ConversionError
from .writer import PackedWriter, _sha256, _write_synced, wants_packed_copy


def add_packed_copy(path) -> Path:
    """Write the packed copy of `path`'s bundle rows into the folder (nothing to do if it is there)."""
    folder = open_folder(path)
    b, c = folder.bundles, folder.config
    target = folder.file(PACKED_FILE)
    if folder.packed is not None:
        return target
    if not wants_packed_copy(b.row_bytes, b.stride_bytes):
        raise ConversionError(f"{folder.path}: bundle rows of {b.row_bytes} bytes are not padded "
                              f"(stride {b.stride_bytes}): layers read whole read ffn.safetensors as it is")
    crc_entry = folder.dense.get(ROW_CRC_TENSOR)
    crc = None
    if crc_entry is not None:
        crc = np.fromfile(folder.file("dense.safetensors"), np.uint8, crc_entry.nbytes, offset=crc_entry.offset) \
            .view(np.uint32).reshape(c.n_layers, c.n_ff)
    tmp = folder.path / f".{PACKED_FILE}.partial-{os.getpid()}"
    try:
        writer = PackedWriter(tmp, c.n_layers, c.n_ff, b.row_bytes, {"format": "flashlm",
                                                                      "format_version": str(folder.manifest["format_version"])})
        with open(folder.file(b.file), "rb") as f:
            for i, off in enumerate(b.layer_offsets):
                f.seek(off)
                rows = np.frombuffer(f.read(b.layer_bytes), np.uint8).reshape(c.n_ff, b.stride_bytes)
                drop_cached(f.fileno())
                if rows.shape[0] * rows.shape[1] != b.layer_bytes:
                    raise ModelFileError(f"{folder.file(b.file)}: layer {i} is truncated")
                if crc is not None:
                    bad = np.flatnonzero(row_crc32(rows) != crc[i])
                    if len(bad):
                        raise ModelFileError(f"{folder.file(b.file)}: layer {i} neuron {int(bad[0])} fails its "
                                             "CRC-32: the bundle file is corrupt; re-convert the model")
                writer.write(i, rows)
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    manifest = dict(folder.manifest)
    manifest["files"] = {**manifest["files"], PACKED_FILE: {"bytes": target.stat().st_size, "sha256": _sha256(target)}}
    drop_file(target)
    mtmp = folder.path / f".manifest.json.partial-{os.getpid()}"
    _write_synced(mtmp, json.dumps(manifest, indent=1))
    os.replace(mtmp, folder.file("manifest.json"))
    open_folder(folder.path)                      # the result opens and checks
    return target


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    try:
        print(add_packed_copy(args[0]))
    except (ConversionError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
