"""Write a flashlm model folder from a Source, one tensor (or one layer's FFN) at a time.

Folder layout (see manifest.json for the exact offsets):
  dense.safetensors   embeddings, attention, norms, lm_head; 2-D weights in the storage dtype, 1-D in f32
  ffn.safetensors     per layer `layers.{i}.ffn.bundles` [n_ff, stride_elems]: row i = neuron i's
                      gate row | up row | down column, zero-padded to `stride_bytes`
  ffn_packed.safetensors  (rows padded to their stride) the same rows without the padding, for layers read
                      whole, with a checksum per group of rows (runtime/packed_rows.py)
  ffn_matrices.safetensors  (quantized conversions) the FFN weights as whole matrices in their block
                      types, for layers kept whole in DRAM (onnxruntime sessions, runtime/ort_model.py):
                      a GGUF down matrix is blocked along n_ff, which a bundle's down column cannot hold
  tokenizer.json, chat_template.jinja, generation_config.json, manifest.json (written last)

The folder is built under a temporary name beside the destination and renamed only when complete, so a
failed or interrupted conversion never leaves a folder that looks like a model.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
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
from flashlm.runtime.modelfile import MATRICES_FILE, ROW_CRC_TENSOR, row_crc32
from flashlm.runtime.group_sums import layer_sums
from flashlm.runtime.packed_rows import PACKED_FILE, SUMS_TENSOR, group_rows_for, layer_tensor
from flashlm.runtime.safetensors_file import DTYPES, plan_file
from flashlm.runtime.storage import BUNDLE_STORAGE, STORAGE_TYPES, StorageError, StorageType

from . import dense_storage
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


def wants_packed_copy(row_bytes: int, stride_bytes: int) -> bool:
    """Rows carry padding (and are whole uint16 words): layers read whole get the packed copy."""
    return stride_bytes > row_bytes and row_bytes % 2 == 0


class PackedWriter:
    """Writes ffn_packed.safetensors layer by layer (rows as stored in ffn.safetensors, padding cut)."""

    def __init__(self, path: Path, n_layers: int, n_rows: int, row_bytes: int, metadata: dict):
        self.row_bytes, self.group = row_bytes, group_rows_for(row_bytes)
        self.sums = np.zeros((n_layers, -(-n_rows // self.group)), np.uint64)
        plan = [(layer_tensor(i), "U8", [n_rows, row_bytes]) for i in range(n_layers)]
        plan.append((SUMS_TENSOR, "U64", list(self.sums.shape)))
        self.file = _FileWriter(path, plan, DIRECT_IO_BLOCK, metadata)

    def write(self, layer: int, padded_rows: np.ndarray) -> int:
        rows = np.ascontiguousarray(padded_rows.view(np.uint8)[:, :self.row_bytes])
        self.sums[layer] = layer_sums(rows, self.group)
        return self.file.write(layer_tensor(layer), rows)

    def close(self) -> None:
        self.file.write(SUMS_TENSOR, self.sums)
        self.file.close()


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


def write_model(source: Source, out_dir, *, dtype: str = "auto", bundle_dtype: str | None = None,
                resident: tuple[str, ...] = (), force: bool = False, progress: bool = True) -> Path:
    """Convert `source` into the flashlm folder `out_dir`. Returns the folder path.

    dtype: storage of the dense 2-D weights (converters/dense_storage.py: auto, f32, f16, q8_0, q4_0,
    q4_1); bundle_dtype: of the FFN bundle rows (default: the FFN gate's type when it is a bundle block
    type, stored lane-major, see storage.BUNDLE_STORAGE; else f16, or f32 for an f32 conversion).
    resident (gated FFNs, float rows): ("gate",) rows hold up | down and every layer's W_gate goes into
    dense.safetensors in the rows' storage type; ("gate", "up") rows hold the down column only and W_up
    is dense too (storage.BundleLayout.gate_resident / up_resident).

    The folder is built beside the destination as `.NAME.partial-PID` while a lock on the destination
    is held (a second convert to the same path fails at once), and only a complete folder is moved into
    place: an existing model (with `force`) is swapped out atomically, so a crash at any moment leaves
    either the old model or the new one, never neither. Partial folders of conversions that died are
    removed when the lock is next taken.
    """
    if dtype not in dense_storage.DTYPE_CHOICES:
        raise ConversionError(f"unknown storage dtype {dtype!r}; choose one of {dense_storage.DTYPE_CHOICES}")
    out_dir = Path(out_dir)
    shapes = source.shapes()
    # Each 2-D weight in its storage type (block types change the stored last dimension), 1-D in f32.
    storage = {n: dense_storage.choose(source, n, s, dtype) for n, s in shapes.items() if len(s) == 2}
    gate = storage.get("layers.0.ffn.gate.weight", storage.get("layers.0.ffn.up.weight"))
    default_bundle = gate if gate in BUNDLE_STORAGE else ("f32" if dtype == "f32" else "f16")
    bundle_name = BUNDLE_STORAGE.get(bundle_dtype or default_bundle, bundle_dtype or default_bundle)
    if bundle_name not in STORAGE_TYPES:
        raise ConversionError(f"unknown bundle dtype {bundle_dtype!r}; choose one of "
                              f"{sorted(['f32', 'f16', *BUNDLE_STORAGE])}")
    config = source.config
    if shapes != expected_tensors(config):
        missing = set(expected_tensors(config)) - set(shapes)
        raise ConversionError(f"source tensors do not match the model config (missing: {sorted(missing)[:5]})")
    resident = tuple(resident)
    if resident not in ((), ("gate",), ("gate", "up")):
        raise ConversionError(f"resident parts {resident!r}: choose none, gate, or gate and up")
    if resident:
        if not config.gated:
            raise ConversionError(f"--resident needs a gated FFN; this model's FFN is {config.ffn_kind}")
        if STORAGE_TYPES[bundle_name].block_elems != 1 or any(
                STORAGE_TYPES[t].block_elems != 1 for n, t in storage.items() if not is_ffn_bundle_tensor(n)):
            raise ConversionError("--resident keeps W_gate (and W_up) as float dense tensors; convert with "
                                  "--dtype f16 (or f32) and float bundle rows")
        for i in range(config.n_layers):          # dense tensors, stored as the rows are
            for part in resident:
                storage[f"layers.{i}.ffn.{part}.weight"] = bundle_name
    in_rows = lambda n: is_ffn_bundle_tensor(n) and not any(n.endswith(f".ffn.{p}.weight") for p in resident)
    row_parts = config.row_parts(resident)
    def planned(n, s):
        return (n, STORAGE_TYPES[storage[n]].safetensors_dtype, list(STORAGE_TYPES[storage[n]].stored_shape(s))) \
            if len(s) == 2 else (n, "F32", list(s))
    dense_plan = [planned(n, s) for n, s in shapes.items() if not in_rows(n)]
    ffn_names = [n for n in shapes if is_ffn_bundle_tensor(n)]
    matrices_plan = [planned(n, shapes[n]) for n in ffn_names] \
        if any(STORAGE_TYPES[storage[n]].block_elems > 1 for n in ffn_names) else []
    bst = STORAGE_TYPES[bundle_name]
    try:
        row_bytes = bst.row_bytes(sum(n for _, n in row_parts))
        bst.row_bytes(config.d_model)                     # every part a whole number of blocks
    except StorageError as e:
        raise ConversionError(f"bundle rows: {e} (d_model {config.d_model}); use --dtype f16") from None
    item = bst.view_dtype.itemsize
    stride_bytes = bundle_stride(row_bytes)
    ffn_plan = [(f"layers.{i}.ffn.bundles", bst.safetensors_dtype, [config.n_ff, stride_bytes // item])
                for i in range(config.n_layers)]
    # CRC-32 of every stored bundle row: flash mode never reads ffn.safetensors whole, so its sha256
    # cannot be checked at load; each row read from flash is checked against this instead.
    dense_plan.append((ROW_CRC_TENSOR, "U32", [config.n_layers, config.n_ff]))

    where = (source.info.description or {}).get("path", "the source")

    with output_lock(out_dir):
        _check_destination(out_dir, force)
        tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            tmp.mkdir()
            meta = {"format": "flashlm", "format_version": FORMAT_VERSION}
            dense = _FileWriter(tmp / "dense.safetensors", dense_plan, 64, meta)
            ffn = _FileWriter(tmp / "ffn.safetensors", ffn_plan, DIRECT_IO_BLOCK, meta)
            matrices = _FileWriter(tmp / MATRICES_FILE, matrices_plan, 64, meta) if matrices_plan else None
            packed = PackedWriter(tmp / PACKED_FILE, config.n_layers, config.n_ff, row_bytes, meta) \
                if wants_packed_copy(row_bytes, stride_bytes) else None
            total = sum(dense.sizes.values()) + sum(ffn.sizes.values()) + \
                (sum(matrices.sizes.values()) if matrices else 0)
            with tqdm(total=total, unit="B", unit_scale=True, desc="Writing", disable=not progress,
                      file=sys.stderr) as bar:
                for name, dt, _ in dense_plan[:-1] + matrices_plan:
                    out = matrices if name in ffn_names and not resident else dense
                    if name in storage and _exact(source, name, storage[name]):
                        bar.update(out.write(name, dense_storage.stored(source, name, storage[name])))
                        continue
                    w = source.load(name)
                    _check_finite(w, name, where, STORAGE_TYPES[storage.get(name, "f32")])
                    bar.update(out.write(name, STORAGE_TYPES[storage[name]].encode(w) if w.ndim == 2
                                         else w.astype(np.float32)))
                    del w
                crc = np.zeros((config.n_layers, config.n_ff), np.uint32)
                for i in range(config.n_layers):
                    rows = _bundle_rows(source, config, i, bst, stride_bytes // item, where, row_parts)
                    crc[i] = row_crc32(rows)
                    bar.update(ffn.write(f"layers.{i}.ffn.bundles", rows))
                    if packed:
                        packed.write(i, rows)
                    del rows
                dense.write(ROW_CRC_TENSOR, crc)
            dense.close()
            ffn.close()
            if matrices:
                matrices.close()
            if packed:
                packed.close()
            _write_side_files(tmp, source)
            written = [n for n, _, _ in dense_plan + matrices_plan if n in storage]
            st = STORAGE_TYPES[storage["layers.0.attn.q.weight"]]
            manifest = _manifest(tmp, source, st, bst, row_bytes, stride_bytes, ffn.offsets, ffn_plan,
                                 {n: storage[n] for n in written}, row_parts)
            manifest["dtype_requested"] = dtype
            manifest["converter"]["seconds"] = round(time.perf_counter() - t0, 2)
            _write_synced(tmp / "manifest.json", json.dumps(manifest, indent=1))
            _fsync_dir(tmp)
            _install(tmp, out_dir)
        except OSError as e:   # disk full, quota, permissions: one line naming the file, nothing left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConversionError(f"{e.filename or tmp}: cannot write the model ({e.strerror or e})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


# --- output folder safety ---------------------------------------------------------------------------

class output_lock:
    """An exclusive lock on `.NAME.lock` beside the output folder, held for the whole conversion.

    The lock file is removed on release; an acquirer re-checks that the file it locked is still the one
    at the path (the standard guard against locking a file another process just unlinked).
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.fd = None

    def __enter__(self):
        parent = self.out_dir.parent
        if parent.exists() and not parent.is_dir():
            raise ConversionError(f"{self.out_dir}: cannot create it, {parent} is not a folder")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConversionError(f"{self.out_dir}: cannot create its parent folder ({e.strerror or e})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConversionError(f"{self.path}: cannot create the conversion lock ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ConversionError(f"{self.out_dir}: another `flashlm convert` (pid {holder}) is writing it; "
                                      "wait for it to finish or choose another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)                  # locked a file its previous holder had just removed: retry
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        _remove_stale(self.out_dir)
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


def _remove_stale(out_dir: Path) -> None:
    """With the lock held no other conversion to this path is alive: every `.NAME.partial-*` folder was
    left by one that died. A `.NAME.old-*` folder is a previous model moved aside by a swap that did not
    finish (only without RENAME_EXCHANGE); it is put back if the destination is missing."""
    for p in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.old-*")):
        if not out_dir.exists():
            os.rename(p, out_dir)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.partial-*"):
        shutil.rmtree(p, ignore_errors=True)


def _check_destination(out_dir: Path, force: bool) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise ConversionError(f"{out_dir} already exists (use --force to replace it)")
    # --force replaces a model, never an arbitrary folder (a mistyped -o must not delete someone's data).
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder; not replacing it")
    manifest = out_dir / "manifest.json"
    entries = list(out_dir.iterdir())
    if entries and not _is_flashlm_manifest(manifest):
        raise ConversionError(f"{out_dir} exists and is not a flashlm model folder (no flashlm manifest.json); "
                              "not replacing it, even with --force")


def _is_flashlm_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == "flashlm"
    except (OSError, ValueError, AttributeError):
        return False


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the complete folder `tmp` to `out_dir`; an existing model there is replaced atomically."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
    elif _exchange(tmp, out_dir):
        shutil.rmtree(tmp)                # now the previous model
    else:                                 # two renames; _remove_stale restores `old` if we die between them
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    _fsync_dir(out_dir.parent)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


F16_MAX = 65504.0


def _exact(source, name: str, storage: str) -> bool:
    """The source holds this weight's blocks in `storage` already (a GGUF tensor repacked without loss)."""
    return STORAGE_TYPES[storage].block_elems > 1 and dense_storage.exact_storage(source, name) == storage


def _check_finite(w: np.ndarray, name: str, where, st: StorageType) -> None:
    """NaN or inf in a weight would turn every output into NaN without a word: refuse the source
    (and values an f16 store would turn into inf)."""
    if not np.isfinite(w).all():
        bad = int(np.count_nonzero(~np.isfinite(w)))
        raise ConversionError(f"{where}: tensor {name} holds {bad} NaN or infinite values; the source is corrupt")
    if st.name == "f16" and w.size and float(np.abs(w).max()) > F16_MAX:
        raise ConversionError(f"{where}: tensor {name} has values beyond the f16 range (|x| > 65504) and would "
                              "overflow to inf; convert with --dtype f32")


def _bundle_rows(source: Source, config, layer: int, st: StorageType, stride_items: int,
                 where="the source", parts=None) -> np.ndarray:
    """[n_ff, stride_items]: neuron i's gate row, up row and down column side by side, each stored
    in `st` (a block type blocks each part on its own, so parts start on block boundaries)."""
    p = f"layers.{layer}.ffn."
    rows = np.zeros((config.n_ff, stride_items), dtype=st.view_dtype)
    col = 0
    for part, length in (config.bundle_parts if parts is None else parts):
        if part == "down":
            w = source.load(p + "down.weight").T          # [d, n_ff] -> column i becomes row i
        else:
            w = source.load(p + part + ".weight")
        _check_finite(w, p + part + ".weight", where, st)
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


def _manifest(tmp: Path, source: Source, st: StorageType, bst: StorageType, row_bytes: int, stride_bytes: int,
              offsets: dict, ffn_plan, weights: dict[str, str], row_parts) -> dict:
    config = source.config
    parts, col = [], 0
    for name, length in row_parts:
        parts.append({"name": name, "offset": col, "length": length})
        col += length
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    return {
        "format": "flashlm",
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "dtype": st.name,
        # Tensors whose storage type their safetensors dtype does not tell (block types are stored as bytes).
        "tensor_storage": {n: t for n, t in weights.items() if STORAGE_TYPES[t].block_elems > 1},
        "bundles": {
            "file": "ffn.safetensors",
            "tensor": "layers.{layer}.ffn.bundles",
            "dtype": bst.safetensors_dtype,
            "storage": bst.name,
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
