"""Where a layer's FFN bundle rows come from, one class per run mode:

  dense   ResidentFFN  every row in DRAM (read once at load, sha256-checked)
  naive   StreamingFFN every layer's rows read from flash every token (the paper's naive baseline)
  hybrid  StreamingFFN the first layers resident as the budget allows, the rest read every token
  mmap    MmapFFN      rows used through a memory map whose pages are dropped after each layer
  flash   SparseFFN    predictor -> sliding-window neuron cache -> read only the missing rows

All of them end in the same kernel, `ffn_bundles` (`ffn_qbundles` for quantized rows), over some
rows; what differs is which rows are in DRAM and what it costs to get them there. Each records the per-token accounting of the paper's
Table 3 (flash I/O, memory management, compute) in a FlashStats.
"""
from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import kernels as K
from . import qkernels as QK
from .config import ModelConfig
from .flash_reader import aligned_empty
from .modelfile import ModelFileError, check_rows


def read_error(path, layer: int, e: OSError) -> ModelFileError:
    """A failed or short read of bundle rows, as one line naming the file (the file shrank, the disk failed)."""
    return ModelFileError(f"{path}: reading layer {layer}'s bundle rows failed ({e.strerror or e}); "
                          "the file is truncated or unreadable")


def read_layer_checked(reader, layer: int, buf, row_crc, all_rows) -> None:
    """Read one whole layer into buf and check every row's CRC-32 (row_crc None: no check)."""
    try:
        reader.read_layer(layer, buf)
    except OSError as e:
        raise read_error(reader.path, layer, e) from None
    check_rows(buf, all_rows, row_crc, reader.path, layer)


@dataclass
class FlashStats:
    tokens: int = 0          # decode tokens and prefill chunks that ran the FFN
    io_s: float = 0.0        # waiting for flash reads
    mm_s: float = 0.0        # cache bookkeeping: evict (delete-by-swap), append, pin
    predict_s: float = 0.0   # predictor matmuls + selection
    ffn_s: float = 0.0       # FFN kernel time not hidden behind I/O
    bytes_read: int = 0
    reads: int = 0
    wanted: int = 0          # neurons the predictor asked for (sum over layers and tokens)
    hits: int = 0            # ... of which already resident
    streamed_layers: int = 0  # layer-tokens where streaming the whole layer was cheaper than sparse reads

    @property
    def hit_rate(self) -> float:
        return self.hits / self.wanted if self.wanted else 0.0

    def reset(self) -> None:
        self.__init__()


class BundleKernel:
    """Runs ffn_bundles for one model's bundle layout over any set of rows."""

    def __init__(self, config: ModelConfig, parts: dict, threads: int):
        self.act = K.ACTIVATION_OF_KIND[config.ffn_kind]
        self.in_off, self.gate_off, self.down_off = parts["up"], parts.get("gate", 0), parts["down"]
        self.d = config.d_model
        self.threads = threads
        self.partial = np.zeros((threads, 1, config.d_model), np.float32)
        self.scratch = None               # f32 block of widened rows for prompt-sized batches
        self.no_bias = np.zeros(0, np.float32)

    def __call__(self, h, rows, n_rows, neuron_of_row, bias, out) -> None:
        T = h.shape[0]
        if T >= K.BLAS_MIN_TOKENS:
            self._batched(h, rows, n_rows, neuron_of_row, bias, out)
            return
        if self.partial.shape[1] < T:
            self.partial = np.zeros((self.threads, T, self.d), np.float32)
        K.ffn_bundles(h, rows, n_rows, neuron_of_row, self.no_bias if bias is None else bias, self.act,
                      self.in_off, self.gate_off, self.down_off, self.partial, out)


    def _batched(self, h, rows, n_rows, neuron_of_row, bias, out) -> None:
        """Prompt-sized T: widen blocks of bundle rows to f32 and let BLAS do the three products."""
        d = self.d
        block = max(1, K.BLAS_BLOCK_BYTES // (4 * rows.shape[1]))
        if self.scratch is None or self.scratch.shape != (block, rows.shape[1]):
            self.scratch = np.empty((block, rows.shape[1]), np.float32)
        out[:] = 0.0
        for lo in range(0, n_rows, block):
            hi = min(n_rows, lo + block)
            w = self.scratch[:hi - lo]
            K.widen_rows(rows, lo, hi, w)
            u = h @ w[:, self.in_off:self.in_off + d].T                        # [T, block]
            if self.act != K.ACT_RELU:
                a = K.gate_np(h @ w[:, self.gate_off:self.gate_off + d].T, self.act) * u
            else:
                if bias is not None:
                    u += bias[neuron_of_row[lo:hi]]
                a = np.maximum(u, 0.0)
            out += a @ w[:, self.down_off:self.down_off + d]


class QuantBundleKernel:
    """BundleKernel for quantized bundle rows (runtime/qbundle.py): the FFN runs on the stored blocks.

    Decode-sized T: qkernels.ffn_qbundles over the rows as they are (no widening; the input is
    permuted once per call into the rows' lane order). Prompt-sized T: blocks of rows are
    dequantized to f32 (in the permuted order) and BLAS does the three products, as for f16 rows.
    """

    def __init__(self, config: ModelConfig, layout, threads: int):
        from .storage import bundle_qformat
        self.fmt = bundle_qformat(layout.storage)
        self.fmt_array = self.fmt.array()
        self.act = K.ACTIVATION_OF_KIND[config.ffn_kind]
        by_name = {p.name: p.byte_offset for p in layout.parts}
        self.starts = np.array([by_name["up"], by_name.get("gate", 0), by_name["down"]], np.int64)
        names = ("up", "gate", "down") if "gate" in by_name else ("up", "down")
        self.part_starts = np.array([by_name[n] for n in names], np.int64)    # dequant order for BLAS
        self.d = config.d_model
        self.threads = threads
        self.partial = np.zeros((threads, 1, config.d_model), np.float32)
        self.hp = np.zeros((1, config.d_model), np.float32)
        self.scratch = None
        self.no_bias = np.zeros(0, np.float32)

    def __call__(self, h, rows, n_rows, neuron_of_row, bias, out) -> None:
        from .qbundle import permute_input
        T = h.shape[0]
        if self.hp.shape[0] < T:
            self.hp = np.zeros((T, self.d), np.float32)
        hp = permute_input(h, self.hp[:T])
        q, s = self.fmt.views(rows)
        if T >= K.BLAS_MIN_TOKENS:
            self._batched(hp, q, s, n_rows, neuron_of_row, bias, out)
            return
        if self.partial.shape[1] < T:
            self.partial = np.zeros((self.threads, T, self.d), np.float32)
        QK.ffn_qbundles(hp, q, s, n_rows, neuron_of_row, self.no_bias if bias is None else bias, self.act,
                        self.fmt_array, self.starts, self.partial, out)

    def _batched(self, hp, q, s, n_rows, neuron_of_row, bias, out) -> None:
        from .qbundle import unpermute
        d, n_parts = self.d, len(self.part_starts)
        block = max(1, K.BLAS_BLOCK_BYTES // (4 * n_parts * d))
        if self.scratch is None or self.scratch.shape[0] != block:
            self.scratch = np.empty((block, n_parts * d), np.float32)
        acc = np.zeros_like(out)                                   # permuted order
        for lo in range(0, n_rows, block):
            hi = min(n_rows, lo + block)
            w = self.scratch[:hi - lo]
            QK.dequant_rows(q, s, lo, hi, self.fmt_array, self.part_starts, d, w)
            u = hp @ w[:, :d].T
            if self.act != K.ACT_RELU:
                a = K.gate_np(hp @ w[:, d:2 * d].T, self.act) * u
            else:
                if bias is not None:
                    u += bias[neuron_of_row[lo:hi]]
                a = np.maximum(u, 0.0)
            acc += a @ w[:, (n_parts - 1) * d:]
        unpermute(acc, out)


def bundle_kernel(config: ModelConfig, layout, threads: int):
    """The kernel for this model's bundle rows: float (f32/f16) or quantized."""
    from .storage import bundle_qformat
    if bundle_qformat(layout.storage) is not None:
        return QuantBundleKernel(config, layout, threads)
    return BundleKernel(config, layout.item_offsets(), threads)


class ResidentFFN:
    """Every layer's rows in DRAM."""

    def __init__(self, layer_rows: list[np.ndarray], kernel: BundleKernel, biases: list):
        self.layer_rows, self.kernel, self.biases = layer_rows, kernel, biases
        self.all_neurons = np.arange(layer_rows[0].shape[0], dtype=np.int32)
        self.stats = FlashStats()

    def __call__(self, layer, h, out):
        rows = self.layer_rows[layer]
        self.kernel(h, rows, rows.shape[0], self.all_neurons, self.biases[layer], out)

    def close(self):
        pass


class StreamingFFN:
    """Layers in `resident` stay in DRAM; every other layer is read whole from flash each time it runs.

    The read of the next streamed layer starts before the current one computes (double buffering),
    the best a no-sparsity baseline can do with the same reader.
    """

    def __init__(self, reader, resident: dict[int, np.ndarray], kernel: BundleKernel, biases: list,
                 n_layers: int, n_rows: int, row_elems: int, dtype, row_crc=None, streamed=None):
        self.reader, self.resident, self.kernel, self.biases = reader, resident, kernel, biases
        self.row_crc = row_crc                    # [n_layers, n_rows] or None: no verification
        # Layers read whole every time, in execution order (default: all that are not resident).
        self.streamed = streamed if streamed is not None else [i for i in range(n_layers) if i not in resident]
        # Two layer buffers only when something streams (the plan counts them only then).
        self.buffers = [aligned_empty((n_rows, row_elems), dtype) for _ in range(2)] if self.streamed else []
        self.all_neurons = np.arange(n_rows, dtype=np.int32)
        self.pool = ThreadPoolExecutor(1)
        self.pending = {}                 # layer -> (buffer, future)
        self.stats = FlashStats()

    def _start(self, j: int) -> None:
        layer = self.streamed[j]
        if layer not in self.pending:
            buf = self.buffers[j % 2]
            self.pending[layer] = (buf, self.pool.submit(self._read_layer, layer, buf))

    def _read_layer(self, layer, buf):
        read_layer_checked(self.reader, layer, buf, self.row_crc, self.all_neurons)

    def __call__(self, layer, h, out):
        if layer in self.resident:
            rows = self.resident[layer]
            self.kernel(h, rows, rows.shape[0], self.all_neurons, self.biases[layer], out)
            return
        j = self.streamed.index(layer)
        t0 = time.perf_counter()
        self._start(j)
        buf, fut = self.pending.pop(layer)
        fut.result()
        if j + 1 < len(self.streamed):
            self._start(j + 1)            # the other buffer: its previous layer has been computed
        t1 = time.perf_counter()
        self.stats.io_s += t1 - t0
        self.kernel(h, buf, buf.shape[0], self.all_neurons, self.biases[layer], out)
        self.stats.ffn_s += time.perf_counter() - t1

    def close(self):
        for _, fut in self.pending.values():
            fut.result()
        self.pool.shutdown()


def _proc_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (Linux /proc/self/io), 0 if unknown."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MmapFFN:
    """Rows used straight from a memory map of ffn.safetensors, pages dropped after each layer.

    This is what llama.cpp's mmap degrades to when the page cache cannot hold the model: every token
    faults every FFN page back in. Bytes read are what the kernel reports for this process.

    Touching a mapped page past the end of a file that shrank kills the process with SIGBUS, so the
    file's size is checked before each layer is used, and (unless verification is off) each layer's
    rows are checked against their CRC-32 before the kernel runs on them, as flash reads are. A file
    truncated while one layer computes can still raise SIGBUS: the check narrows the window to that.
    """

    def __init__(self, path, layer_offsets, n_rows, row_elems, dtype, kernel: BundleKernel, biases: list,
                 row_crc=None):
        self.path = path
        self.file = open(path, "rb")
        self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        self.row_crc = row_crc
        whole = np.frombuffer(self.map, dtype=np.uint8)
        nbytes = n_rows * row_elems * np.dtype(dtype).itemsize
        self.spans = [(off, nbytes) for off in layer_offsets]
        if max((off + nbytes for off in layer_offsets), default=0) > len(self.map):
            raise ModelFileError(f"{path}: {len(self.map)} bytes, too short for the bundle layout in the manifest")
        self.layers = [whole[off:off + nbytes].view(dtype).reshape(n_rows, row_elems) for off in layer_offsets]
        self.kernel, self.biases = kernel, biases
        self.all_neurons = np.arange(n_rows, dtype=np.int32)
        self.stats = FlashStats()

    def __call__(self, layer, h, out):
        before = _proc_read_bytes()
        t0 = time.perf_counter()
        rows = self.layers[layer]
        off, nbytes = self.spans[layer]
        size = os.fstat(self.file.fileno()).st_size
        if size < off + nbytes:
            raise ModelFileError(f"{self.path}: shrank to {size} bytes while mapped (layer {layer} needs "
                                 f"{off + nbytes}); the model file was truncated during the run")
        check_rows(rows, self.all_neurons, self.row_crc, self.path, layer)
        self.kernel(h, rows, rows.shape[0], self.all_neurons, self.biases[layer], out)
        start = off - off % mmap.PAGESIZE
        self.map.madvise(mmap.MADV_DONTNEED, start, off + nbytes - start)
        os.posix_fadvise(self.file.fileno(), start, off + nbytes - start, os.POSIX_FADV_DONTNEED)
        self.stats.ffn_s += time.perf_counter() - t0      # faults (I/O) and compute are inseparable here
        self.stats.bytes_read += _proc_read_bytes() - before

    def close(self):
        self.layers = []
        try:
            self.map.close()
        except BufferError:     # a caller still holds a view of the rows; the map closes when it is freed
            pass
        self.file.close()


def _consecutive(rows: np.ndarray) -> bool:
    return len(rows) > 0 and int(rows[-1]) - int(rows[0]) == len(rows) - 1


class SparseFFN:
    """The flash path: predictor -> neuron cache (sliding window) -> read only the missing rows.

    Per call: predict the neurons this layer needs; admit them into the layer's cache (evict those that
    left the window by swap-with-last, append the missing); read the missing rows from flash in the
    background while the kernel runs over the rows that were already resident; then add the new rows,
    and stream any overflow (more neurons than the cache holds) through a bounded scratch buffer.
    When reading the missing rows one by one would cost more than streaming the whole layer
    sequentially (estimated from the reader's measured speeds), the layer is streamed instead.
    """

    def __init__(self, reader, predictors, caches, kernel: BundleKernel, biases: list, *,
                 scratch_rows: int, row_elems: int, dtype, n_rows: int, stride_bytes: int,
                 speeds, whole_layers, layer_io: str = "auto", row_crc=None):
        if layer_io not in ("auto", "sparse", "stream"):
            raise ValueError(f"layer_io must be auto, sparse or stream, not {layer_io!r}")
        self.layer_io = layer_io
        self.reader, self.predictors, self.caches = reader, predictors, caches
        self.row_crc = row_crc                    # [n_layers, n_rows] or None: no verification
        self.whole_layers = whole_layers          # StreamingFFN for the layers planned resident or streamed
        self.kernel, self.biases = kernel, biases
        self.scratch = aligned_empty((max(1, scratch_rows), row_elems), dtype)
        self.scratch_ids = np.zeros(len(self.scratch), np.int32)
        self.all_neurons = np.arange(n_rows, dtype=np.int32)
        self.tmp = np.zeros((1, kernel.d), np.float32)
        self.pool = ThreadPoolExecutor(1)
        self.stats = FlashStats()
        # Device read speeds (profile or defaults): the same cost model the planner used.
        self.row_read_s = speeds.random_seconds(stride_bytes)
        self.layer_stream_s = speeds.stream_seconds(n_rows * stride_bytes)

    def load_pinned(self) -> None:
        for layer, cache in enumerate(self.caches):
            if cache is not None and cache.needs_pinned_load:
                adm = cache.load_pinned()
                self._read(layer, adm.missing, cache.rows, adm.dest_rows)

    def _read(self, layer, neurons, out, out_rows) -> None:
        """Read rows and check them (in the calling thread: zlib releases the GIL, so a background
        read's check overlaps with compute)."""
        try:
            self.reader.read_rows(layer, neurons, out, out_rows)
        except OSError as e:
            raise read_error(self.reader.path, layer, e) from None
        if self.row_crc is not None and len(neurons):
            check_rows(out[out_rows[0]:out_rows[0] + len(neurons)] if _consecutive(out_rows) else out[out_rows],
                       neurons, self.row_crc, self.reader.path, layer)

    def _add(self, h, rows, n, ids, layer, out) -> None:
        T = h.shape[0]
        if self.tmp.shape[0] < T:
            self.tmp = np.zeros((T, self.kernel.d), np.float32)
        self.kernel(h, rows, n, ids, self.biases[layer], self.tmp[:T])
        out += self.tmp[:T]

    def _stream(self, layer, neurons, h, out) -> None:
        """FFN over `neurons` read through the scratch buffer, chunk by chunk; adds into out."""
        cap = len(self.scratch)
        for start in range(0, len(neurons), cap):
            chunk = neurons[start:start + cap]
            t0 = time.perf_counter()
            self._read(layer, chunk, self.scratch, np.arange(len(chunk), dtype=np.int32))
            t1 = time.perf_counter()
            self.stats.io_s += t1 - t0
            self.scratch_ids[:len(chunk)] = chunk
            self._add(h, self.scratch, len(chunk), self.scratch_ids, layer, out)
            self.stats.ffn_s += time.perf_counter() - t1

    def __call__(self, layer, h, out):
        cache, pred = self.caches[layer], self.predictors[layer]
        st = self.stats
        if cache is None:                          # planned resident or streamed: no predictor, whole layer
            whole = self.whole_layers
            st.streamed_layers += layer not in whole.resident
            io_before, ffn_before = whole.stats.io_s, whole.stats.ffn_s
            whole(layer, h, out)
            st.io_s += whole.stats.io_s - io_before
            st.ffn_s += whole.stats.ffn_s - ffn_before
            return
        t0 = time.perf_counter()
        wanted = pred.predict(h)
        t1 = time.perf_counter()
        st.predict_s += t1 - t0
        missing_now = wanted[cache.row_of_neuron[wanted] < 0]
        st.wanted += len(wanted)
        st.hits += len(wanted) - len(missing_now)
        if self.layer_io == "auto" and len(missing_now) * self.row_read_s > self.layer_stream_s:
            # Streaming the layer is cheaper (typically a prompt's union): compute it whole, exactly,
            # and leave the cache as it is.
            st.streamed_layers += 1
            out[:] = 0.0
            self._stream(layer, self.all_neurons, h, out)
            return
        adm = cache.step(wanted)
        t2 = time.perf_counter()
        st.mm_s += t2 - t1
        n_valid = cache.n - len(adm.missing)
        fut = self.pool.submit(self._read, layer, adm.missing, cache.rows, adm.dest_rows) \
            if len(adm.missing) else None
        self.kernel(h, cache.rows, n_valid, cache.neuron_of_row, self.biases[layer], out)
        t3 = time.perf_counter()
        st.ffn_s += t3 - t2
        if fut is not None:
            fut.result()
            t4 = time.perf_counter()
            st.io_s += t4 - t3
            self._add(h, cache.rows[n_valid:], len(adm.missing), cache.neuron_of_row[n_valid:], layer, out)
            st.ffn_s += time.perf_counter() - t4
        if len(adm.overflow):
            self._stream(layer, adm.overflow, h, out)

    def close(self):
        self.whole_layers.close()
        self.pool.shutdown()
