"""Open a flashlm model folder: parse and check the manifest into typed objects, read files verified
against their sha256."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import FORMAT_VERSION, ModelConfig
from .errors import FlashlmError
from .aligned import BLOCK, aligned_empty
from .packed_rows import PACKED_FILE, SUMS_TENSOR as PACKED_SUMS, PackedLayout, group_rows_for
from .packed_rows import layer_tensor as packed_layer_tensor
from .pagecache import drop_cached
from .safetensors_file import DTYPES, SafetensorsError, read_header
from .schema import ConfigError, config_from_dict, expected_dense_tensors, expected_tensors
from .storage import BundleLayout, BundlePart, StorageError, StorageType, TensorEntry, float_storage_of, storage_type


MATRICES_FILE = "ffn_matrices.safetensors"   # quantized folders: FFN weights as whole matrices
ROW_CRC_TENSOR = "ffn.row_crc32"    # [n_layers, n_ff] uint32 in dense.safetensors


class ModelFileError(FlashlmError):
    """A model folder that is missing, incomplete or corrupt; the message names the file."""


def row_crc32(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's stored bytes, padding included. rows: [n, stride] any dtype."""
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
    return np.fromiter((zlib.crc32(r) for r in raw), dtype=np.uint32, count=len(rows))


class RowCheck:
    """Checks bundle rows read from flash against their CRC-32 from conversion, each row the first time
    this process reads it.

    Why only the first time: a streamed layer is read again every token, and hashing it again cost more
    than reading it (zlib.crc32 runs ~0.7-1.5 GB/s on one core, holding the GIL for 4 KiB rows, against
    the disk's ~1.1 GB/s: SmolLM2 naive decode 0.50 tok/s checking every read vs 1.56 unchecked, one run
    under load). What the check exists for, a corrupt or half-written bundle file, shows on the first
    read; the file is opened read-only and convert never rewrites a folder in place (it swaps a new one
    in), and a failing disk read surfaces as an OSError."""

    def __init__(self, expected: np.ndarray, path, stride_bytes: int = 0):
        self.expected = expected                                   # [n_layers, n_ff] uint32
        self.path = path
        # the CRC covers a row at the file's stride, zero padding included (the converter writes zeros);
        # a row checked without its padding (a cache's packed row) is continued over these zeros
        self.pad = bytes(stride_bytes)
        self.seen = np.zeros(expected.shape, np.bool_)
        self.unseen_left = np.full(expected.shape[0], expected.shape[1], np.int64)

    def check(self, rows: np.ndarray, neurons: np.ndarray, layer: int) -> None:
        """rows[j] holds neuron neurons[j] of `layer`; raise ModelFileError if a new one fails its CRC."""
        if not self.unseen_left[layer] or not len(neurons):
            return
        seen, expected = self.seen[layer], self.expected[layer]
        raw = rows.view(np.uint8).reshape(len(rows), -1)
        pad = memoryview(self.pad)[:max(0, len(self.pad) - raw.shape[1])]
        for j in np.flatnonzero(~seen[neurons]):          # positions of rows not verified yet
            neuron = int(neurons[j])
            if seen[neuron]:                      # a duplicate within this call
                continue
            if zlib.crc32(pad, zlib.crc32(raw[j])) != expected[neuron]:
                raise ModelFileError(f"{self.path}: layer {layer} neuron {neuron} fails its CRC-32: the bundle "
                                     f"file is corrupt; re-convert the model")
            seen[neuron] = True
            self.unseen_left[layer] -= 1


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass
class ModelFolder:
    """A model folder parsed and checked once at open: every later step reads these typed fields."""
    path: Path
    manifest: dict                        # the raw manifest, for side data (generation config, tokens)
    config: ModelConfig
    storage: StorageType                  # storage of the dense 2-D weights
    files: dict[str, FileEntry]
    dense: dict[str, TensorEntry]         # dense.safetensors, every tensor checked against the config
    bundles: BundleLayout                 # ffn.safetensors
    matrices: dict[str, TensorEntry] = field(default_factory=dict)  # ffn_matrices.safetensors (quantized folders)
    packed: PackedLayout | None = None    # ffn_packed.safetensors: the rows without padding (layers read whole)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def model_bytes(self) -> int:
        """Dense tensors plus every FFN layer, as stored (padding included)."""
        return sum(t.nbytes for t in self.dense.values()) + self.config.n_layers * self.bundles.layer_bytes


def _field(mpath: Path, where: str, value, kind, *, positive: bool = False):
    if not isinstance(value, kind) or isinstance(value, bool) or (positive and value <= 0):
        raise ModelFileError(f"{mpath}: {where} is {value!r}, expected a{' positive' if positive else 'n'} "
                             f"{getattr(kind, '__name__', kind)}")
    return value


def _files(mpath: Path, manifest: dict) -> dict[str, FileEntry]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ModelFileError(f"{mpath}: files is missing or not an object")
    out = {}
    for name, info in files.items():
        if not isinstance(info, dict) or "/" in name or name in ("", ".", ".."):
            raise ModelFileError(f"{mpath}: files.{name} is malformed")
        out[name] = FileEntry(_field(mpath, f"files.{name}.bytes", info.get("bytes"), int),
                              _field(mpath, f"files.{name}.sha256", info.get("sha256"), str))
    for name in ("dense.safetensors", "ffn.safetensors"):
        if name not in out:
            raise ModelFileError(f"{mpath}: files has no {name}")
    return out


def _header(path: Path):
    try:
        return read_header(path)
    except SafetensorsError as e:
        raise ModelFileError(str(e)) from None


def _tensor_entries(path: Path, overrides: dict) -> tuple[dict[str, TensorEntry], dict]:
    header, data_start, _ = _header(path)
    out = {}
    for name, info in header.items():
        if name.startswith("__pad__"):
            continue
        begin, end = info["data_offsets"]
        storage = storage_type(overrides[name]) if name in overrides else float_storage_of(info["dtype"])
        dtype = storage.view_dtype if storage else np.dtype(DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if storage is not None and name in overrides:      # block types: the header holds the stored shape
            shape = shape[:-1] + (shape[-1] * dtype.itemsize // storage.block_bytes * storage.block_elems,)
        out[name] = TensorEntry(name, shape, storage, dtype, data_start + begin, end - begin)
    return out, header


def _matrix_tensors(path: Path, config: ModelConfig, overrides: dict) -> dict[str, TensorEntry]:
    """ffn_matrices.safetensors: every layer's FFN weights as whole 2-D matrices of the config's shapes."""
    out, _ = _tensor_entries(path, overrides)
    want = {n: s for n, s in expected_tensors(config).items() if ".ffn." in n and n.endswith(".weight")}
    for name, shape in want.items():
        t = out.get(name)
        if t is None or t.shape != shape or t.storage is None:
            raise ModelFileError(f"{path}: tensor {name!r} is "
                                 f"{'missing' if t is None else list(t.shape)}; the config implies {list(shape)}")
    return out


def _dense_tensors(path: Path, config: ModelConfig, overrides: dict) -> dict[str, TensorEntry]:
    """dense.safetensors' tensors, each expected one present with the shape the config implies."""
    out, header = _tensor_entries(path, overrides)
    for name, shape in expected_dense_tensors(config).items():
        t = out.get(name)
        if t is None:
            raise ModelFileError(f"{path}: tensor {name!r} is missing (the config needs it)")
        if t.shape != shape:
            raise ModelFileError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the config implies {list(shape)}")
        if len(shape) == 1 and t.dtype != np.float32:
            raise ModelFileError(f"{path}: tensor {name!r} is {t.dtype}; norms and biases must be F32")
        if len(shape) == 2 and t.storage is None:
            raise ModelFileError(f"{path}: tensor {name!r} has dtype {header[name]['dtype']}, not a storage type")
    crc = out.get(ROW_CRC_TENSOR)
    if crc is not None and (crc.shape != (config.n_layers, config.n_ff) or crc.dtype != np.uint32):
        raise ModelFileError(f"{path}: tensor {ROW_CRC_TENSOR!r} is {crc.dtype} {list(crc.shape)}, "
                             f"expected uint32 {[config.n_layers, config.n_ff]}")
    return out


def _bundle_layout(folder: Path, mpath: Path, manifest: dict, config: ModelConfig) -> BundleLayout:
    b = manifest.get("bundles")
    if not isinstance(b, dict):
        raise ModelFileError(f"{mpath}: bundles is missing or not an object")
    try:
        storage = storage_type(b.get("storage", b.get("dtype")))
    except StorageError as e:
        raise ModelFileError(f"{mpath}: bundles.dtype: {e}") from None
    if b.get("dtype", storage.safetensors_dtype) != storage.safetensors_dtype:
        raise ModelFileError(f"{mpath}: bundles.dtype {b.get('dtype')!r} is not how {storage.name} is stored "
                             f"({storage.safetensors_dtype})")
    name = _field(mpath, "bundles.file", b.get("file"), str)
    if name not in manifest["files"]:
        raise ModelFileError(f"{mpath}: bundles.file {name!r} is not listed in files")
    row_bytes = _field(mpath, "bundles.row_bytes", b.get("row_bytes"), int, positive=True)
    stride = _field(mpath, "bundles.stride_bytes", b.get("stride_bytes"), int, positive=True)
    alignment = _field(mpath, "bundles.alignment", b.get("alignment"), int, positive=True)
    parts_in = b.get("parts")
    names_in = [p.get("name") if isinstance(p, dict) else None for p in parts_in] if isinstance(parts_in, list) else None
    # Two layouts: every part in the row, or (gated FFNs) the gate-resident variant whose rows hold up | down.
    resident = {("up", "down"): ("gate",), ("down",): ("gate", "up")}.get(tuple(names_in or ()), ()) \
        if config.gated else ()
    want = config.row_parts(resident)
    if names_in != [n for n, _ in want]:
        raise ModelFileError(f"{mpath}: bundles.parts must be {[n for n, _ in config.bundle_parts]}"
                             + (", ['up', 'down'] (W_gate resident) or ['down'] (W_gate, W_up resident)"
                                if config.gated else "")
                             + f" for a {config.ffn_kind} FFN")
    parts, col = [], 0
    for p, (pname, length) in zip(parts_in, want):
        if p.get("offset") != col or p.get("length") != length:
            raise ModelFileError(f"{mpath}: bundles.parts.{pname} is at {p.get('offset')} length {p.get('length')}, "
                                 f"the config implies {col} length {length}")
        parts.append(BundlePart(pname, col, length, storage.row_bytes(col)))
        col += length
    if row_bytes != storage.row_bytes(col):
        raise ModelFileError(f"{mpath}: bundles.row_bytes is {row_bytes}, {storage.name} rows of {col} elements "
                             f"are {storage.row_bytes(col)}")
    if stride < row_bytes or stride % storage.view_dtype.itemsize or not (stride % BLOCK == 0 or BLOCK % stride == 0):
        raise ModelFileError(f"{mpath}: bundles.stride_bytes {stride} must hold a row ({row_bytes} B) and be a "
                             f"multiple or a divisor of {BLOCK}")
    offsets = b.get("layer_offsets")
    if not isinstance(offsets, list) or len(offsets) != config.n_layers:
        raise ModelFileError(f"{mpath}: bundles.layer_offsets must list {config.n_layers} offsets")
    layout = BundleLayout(name, storage, tuple(parts), row_bytes, stride, alignment,
                          tuple(_field(mpath, "bundles.layer_offsets", o, int) for o in offsets), config.n_ff,
                          resident)
    # The file itself: one [n_ff, stride] tensor per layer exactly where the manifest says.
    path = folder / name
    header, data_start, _ = _header(path)
    for i, off in enumerate(layout.layer_offsets):
        t = header.get(f"layers.{i}.ffn.bundles")
        if t is None:
            raise ModelFileError(f"{path}: tensor 'layers.{i}.ffn.bundles' is missing")
        if (list(t["shape"]) != [config.n_ff, layout.stride_items] or t["dtype"] != storage.safetensors_dtype
                or data_start + t["data_offsets"][0] != off or off % alignment):
            raise ModelFileError(f"{path}: layer {i}'s bundles are {t['dtype']} {t['shape']} at byte "
                                 f"{data_start + t['data_offsets'][0]}; the manifest implies {storage.safetensors_dtype} "
                                 f"{[config.n_ff, layout.stride_items]} at {off} (aligned to {alignment})")
    return layout


def resident_part_name(layer: int, part: str) -> str:
    """The dense tensor holding a part a bundle layout keeps resident (layers.{i}.ffn.gate.weight)."""
    return f"layers.{layer}.ffn.{part}.weight"


def _check_resident_parts(path: Path, dense: dict, layout: BundleLayout, config: ModelConfig) -> None:
    """A gate-resident layout's W_gate is in dense.safetensors, [n_ff, d], float (the gate matmul runs on it)."""
    for part in layout.resident:
        for i in range(config.n_layers):
            t = dense.get(resident_part_name(i, part))
            if t is None or t.shape != (config.n_ff, config.d_model) or t.storage is None or t.storage.block_elems != 1:
                raise ModelFileError(f"{path}: the bundle rows leave out {part}, so tensor "
                                     f"{resident_part_name(i, part)!r} must be a float [{config.n_ff}, {config.d_model}] "
                                     f"here; it is {'missing' if t is None else f'{t.storage and t.storage.name} {list(t.shape)}'}")


def open_folder(path) -> ModelFolder:
    """Read manifest.json and check it against its schema and the files it lists: sizes, tensor shapes
    and the bundle layout must match the config, so no kernel ever runs on a shape nobody checked."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise ModelFileError(f"{path}: not a flashlm model folder (convert a checkpoint with `flashlm convert`)")
    if not mpath.exists():
        raise ModelFileError(f"{mpath}: missing; the folder is not a complete flashlm model")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{mpath}: not a JSON object")
    if manifest.get("format") != "flashlm" or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{mpath}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                             f"is not flashlm version {FORMAT_VERSION}; re-convert the model")
    files = _files(mpath, manifest)
    for name, info in files.items():
        f = path / name
        if not f.exists():
            raise ModelFileError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != info.bytes:
            raise ModelFileError(f"{f}: {f.stat().st_size} bytes, manifest says {info.bytes}; truncated or replaced")
    try:
        config = config_from_dict(manifest.get("config"))
        storage = storage_type(manifest.get("dtype", "f32"))
    except (ConfigError, StorageError) as e:
        raise ModelFileError(f"{mpath}: {e}") from None
    overrides = manifest.get("tensor_storage", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, str) for v in overrides.values()):
        raise ModelFileError(f"{mpath}: tensor_storage must map tensor names to storage type names")
    try:
        dense = _dense_tensors(path / "dense.safetensors", config, overrides)
        bundles = _bundle_layout(path, mpath, manifest, config)
        _check_resident_parts(path / "dense.safetensors", dense, bundles, config)
        matrices = _matrix_tensors(path / MATRICES_FILE, config, overrides) if MATRICES_FILE in files else {}
        packed = _packed_layout(path / PACKED_FILE, config, bundles) if PACKED_FILE in files else None
    except StorageError as e:
        raise ModelFileError(f"{mpath}: {e}") from None
    return ModelFolder(path, manifest, config, storage, files, dense, bundles, matrices, packed)


def _packed_layout(path: Path, config: ModelConfig, bundles: BundleLayout) -> PackedLayout:
    """ffn_packed.safetensors (runtime/packed_rows.py): every layer [n_ff, row_bytes] U8 on a block boundary,
    and the group sums [n_layers, n_groups] U64."""
    header, data_start, _ = _header(path)
    group = group_rows_for(bundles.row_bytes)
    offsets = []
    for i in range(config.n_layers):
        t = header.get(packed_layer_tensor(i))
        off = None if t is None else data_start + t["data_offsets"][0]
        if t is None or list(t["shape"]) != [config.n_ff, bundles.row_bytes] or t["dtype"] != "U8" or off % BLOCK:
            raise ModelFileError(f"{path}: tensor {packed_layer_tensor(i)!r} must be U8 {[config.n_ff, bundles.row_bytes]} "
                                 f"on a {BLOCK}-byte boundary; found {t and (t['dtype'], t['shape'], off)}")
        offsets.append(off)
    sums = header.get(PACKED_SUMS)
    n_groups = -(-config.n_ff // group)
    if sums is None or list(sums["shape"]) != [config.n_layers, n_groups] or sums["dtype"] != "U64":
        raise ModelFileError(f"{path}: tensor {PACKED_SUMS!r} must be U64 {[config.n_layers, n_groups]}")
    return PackedLayout(PACKED_FILE, bundles.row_bytes, config.n_ff, group, tuple(offsets),
                        data_start + sums["data_offsets"][0])


def read_verified(folder: ModelFolder, name: str, skip: tuple[tuple[int, int], ...] = ()) -> np.ndarray:
    """Read a whole file into page-aligned memory, checking its sha256 on the way. Returns uint8 [bytes].

    `skip`: (offset, nbytes) ranges that are hashed but not kept: the pages of `buf` they cover are never
    written, so an anonymous mapping never backs them with memory (e.g. token embeddings read per token
    from the file instead, runtime/embedding_rows.py)."""
    path = folder.file(name)
    expected = folder.files[name].sha256
    size = os.path.getsize(path)
    buf = aligned_empty((size,), np.uint8)
    h = hashlib.sha256()
    chunk = 1 << 24
    scratch = np.empty(chunk, np.uint8) if skip else None
    with open(path, "rb", buffering=0) as f:
        for start in range(0, size, chunk):
            end = min(start + chunk, size)
            cut = [(max(o, start), min(o + n, end)) for o, n in skip if o < end and o + n > start]
            view = buf[start:end] if not cut else scratch[:end - start]
            if f.readinto(memoryview(view)) != view.size:
                raise ModelFileError(f"{path}: short read at byte {start}")
            if cut:                      # keep only the bytes outside the skipped ranges
                pos = start
                for lo, hi in sorted(cut) + [(end, end)]:
                    if lo > pos:
                        buf[pos:lo] = view[pos - start:lo - start]
                    pos = max(pos, hi)
            drop_cached(f.fileno(), 0, start + view.size)   # read once: a memory limit must not pay for it twice
            h.update(view)
    if h.hexdigest() != expected:
        raise ModelFileError(f"{path}: sha256 {h.hexdigest()[:16]}... does not match the manifest "
                             f"({expected[:16]}...); the file is corrupt")
    return buf


def map_verified(folder: ModelFolder, name: str) -> np.ndarray:
    """A whole file as a private memory map, its sha256 checked on the way. Returns uint8 [bytes].

    For weights that are only read while building onnxruntime sessions (which keep their own prepacked
    copies): the pages are file-backed, so they count in the RSS only while touched, and each hashed
    chunk is unmapped again at once; `release_mapped` hands back what building touched. A heap copy
    (read_verified) would stay resident beside the sessions' copies until freed."""
    path = folder.file(name)
    expected = folder.files[name].sha256
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ModelFileError(f"{path}: empty file")
        # copy-on-write rather than read-only: the arrays keep the writeable flag numba's kernels are
        # compiled for; nothing writes them, so every page stays a clean page of the file.
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    h = hashlib.sha256()
    chunk = 1 << 24
    view = memoryview(m)
    for start in range(0, size, chunk):
        h.update(view[start:start + chunk])
        m.madvise(mmap.MADV_DONTNEED, start, min(chunk, size - start))
    view.release()
    if h.hexdigest() != expected:
        raise ModelFileError(f"{path}: sha256 {h.hexdigest()[:16]}... does not match the manifest "
                             f"({expected[:16]}...); the file is corrupt")
    return np.frombuffer(m, np.uint8)


def release_mapped(buf: np.ndarray) -> None:
    """Unmap the resident pages of a map_verified buffer (or a view of one) from this process. Clean
    file-backed pages: whatever still reads them (embedding rows, norm weights) faults them back in."""
    base = buf
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is not None:
        base.madvise(mmap.MADV_DONTNEED)


def read_small_verified(folder_path, manifest: dict, name: str) -> bytes:
    """A small side file (tokenizer, chat template) read whole and checked against the manifest's sha256:
    a corrupt or swapped file must fail here, not change what the model is fed."""
    path = Path(folder_path) / name
    entry = (manifest.get("files") or {}).get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ModelFileError(f"{path}: not listed with a sha256 in manifest.json; re-convert the model")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ModelFileError(f"{path}: sha256 {digest[:16]}... does not match the manifest "
                             f"({entry['sha256'][:16]}...); the file is corrupt or was replaced")
    return data


def tensors_from_buffer(buf: np.ndarray, entries: dict[str, TensorEntry]) -> dict[str, np.ndarray]:
    """Views into `buf` (a whole file read by read_verified) per checked tensor, as the kernels take them."""
    return {t.name: buf[t.offset:t.offset + t.nbytes].view(t.dtype).reshape(
        t.storage.stored_shape(t.shape) if t.storage else t.shape) for t in entries.values()}


def bundle_layers(folder: ModelFolder, buf: np.ndarray) -> list[np.ndarray]:
    """Per layer the [n_ff, stride_items] array of bundle rows inside `buf` (the whole bundle file)."""
    b = folder.bundles
    return [buf[off:off + b.layer_bytes].view(b.dtype).reshape(b.n_rows, b.stride_items) for off in b.layer_offsets]
