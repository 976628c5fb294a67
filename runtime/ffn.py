"""The FFN backends: where a layer's bundle rows come from, behind one written-down interface.

  ResidentFFN  every row in DRAM (the FFN file read once at load, sha256-checked)       dense
  MmapFFN      rows used through a memory map whose pages are dropped after each layer  mmap
  FlashFFN     per layer, as the memory plan places it: resident rows, a SPARSE layer   naive, hybrid,
               (predictor -> sliding-window neuron cache -> read only the missing rows)  flash
               or a STREAM layer (read whole every time, double-buffered)

All of them end in the same kernel, `ffn_bundles` (`ffn_qbundles` for quantized rows, through
`bundle_kernel`), over some rows; what differs is which rows are in DRAM and what it costs to get them
there. Each records the per-token accounting of the paper's Table 3 (flash I/O, memory management,
compute) in its own FFNStats.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .lazy import lazy_module
from .config import ModelConfig
from .cost_model import CostModel
from .aligned import aligned_empty
from .modelfile import ModelFileError, RowCheck
from .pipeline_switch import PipelineSwitch
from .runstate import BLAS_BLOCK_BYTES, BLAS_MIN_TOKENS
from .storage import BundleLayout

# numba loads on a kernel's first use: the one-graph decoder runs none (runtime/lazy.py)
K = lazy_module(f"{__package__}.kernels")
QK = lazy_module(f"{__package__}.qkernels")
NO_ROWS = np.zeros(0, np.int32)     # an FFN kernel's `keep` that selects no subset: every row is computed


def read_error(path, layer: int, e: OSError) -> ModelFileError:
    """A failed or short read of bundle rows, as one line naming the file (the file shrank, the disk failed)."""
    return ModelFileError(f"{path}: reading layer {layer}'s bundle rows failed ({e.strerror or e}); "
                          "the file is truncated or unreadable")


def read_layer_checked(reader, layer: int, buf, row_crc: RowCheck | None, all_rows) -> None:
    """Read one whole layer into buf and check its rows' CRC-32 (row_crc None: no check)."""
    try:
        reader.read_layer(layer, buf)
    except OSError as e:
        raise read_error(reader.path, layer, e) from None
    if row_crc is not None:
        row_crc.check(buf, all_rows, layer)


@dataclass
class FFNStats:
    """One backend's figures since its last reset_stats(): the only hit counter."""
    tokens: int = 0          # tokens that ran the FFN (decode tokens and prefill chunk tokens)
    io_s: float = 0.0        # the compute thread waiting for flash reads (io_wait)
    io_busy_s: float = 0.0   # wall time with at least one I/O task (plan, read, CRC check) running (_IOClock)
    mm_s: float = 0.0        # cache bookkeeping on the compute thread: evict (delete-by-swap), append, pin
    mm_bg_s: float = 0.0     # cache bookkeeping of lookahead admissions, on the I/O thread (off the critical path)
    predict_s: float = 0.0   # predictor matmuls + selection
    ffn_s: float = 0.0       # FFN kernel time on the compute thread (mmap: page faults included)
    bytes_read: int = 0      # from flash (reader-based backends: the reader's own count)
    reads: int = 0           # read system calls
    wanted: int = 0          # neurons the predictors asked for (sum over sparse layers and tokens)
    hits: int = 0            # ... of which already resident
    overflow: int = 0        # ... of which found no cache row and streamed through the buffers
    cached_skipped: int = 0  # cached or resident rows a decode token skipped (below the compute threshold)
    streamed_layers: int = 0  # layer-steps that read a whole layer (planned STREAM or the sparse fallback)
    stream_bytes: int = 0    # whole-layer reads of planned STREAM layers: bytes ...
    stream_read_s: float = 0.0  # ... and the summed duration of those reads (their rate vs the disk's sequential rate;
    #                              a ring streamer: its readers' wall time with a read in flight)
    guess_rows: int = 0      # lookahead: rows read early on a guess from the previous layer's input ...
    guess_used: int = 0      # ... of which the layer wanted (the rest were over-fetched, then evicted)
    guess_missed: int = 0    # rows a guessed layer still had to read once its true input arrived
    decode_tokens: int = 0   # decode tokens a pipeline switch saw (runtime/pipeline_switch.py) ...
    lookahead_tokens: int = 0  # ... of which ran with the lookahead on
    io_cpu_s: float = 0.0    # CPU time of the sparse reader's threads (the reads' syscalls and copies)

    @property
    def guess_recall(self) -> float | None:
        """Share of a guessed layer's rows to read that the early guess had already read."""
        need = self.guess_used + self.guess_missed
        return self.guess_used / need if need else None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.wanted if self.wanted else 0.0


class FFNBackend:
    """What the forward pass needs from an FFN backend.

    compute(layer, h, out)  out[T, d] = FFN_layer(h[T, d]), layers called in order 0..n-1 per forward
    stats                   FFNStats, owned and written by the backend alone
    reset_stats()           start the figures afresh (e.g. after prefill)
    reset()                 forget per-sequence state (neuron caches refill as tokens come)
    close()                 stop threads, release buffers and files
    """

    def __init__(self):
        self.stats = FFNStats()

    def __call__(self, layer: int, h: np.ndarray, out: np.ndarray) -> None:
        if layer == 0:
            self.stats.tokens += h.shape[0]
        self.compute(layer, h, out)

    def compute(self, layer: int, h: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def io_counts(self) -> tuple[int, int]:
        """(bytes read from flash, read calls) since the last reset_stats(), reads still in flight included
        (a pipelined backend waits for them first)."""
        return self.stats.bytes_read, self.stats.reads


    def reset_stats(self) -> None:
        self.stats.__init__()            # in place: parts of the backend hold this object

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class _IOClock:
    """Adds to stats.io_busy_s the wall time during which at least one I/O task (a read call with its
    planning and CRC check) runs; overlapping tasks count once. Entered by the I/O threads."""

    def __init__(self, stats: FFNStats):
        self.stats = stats
        self.lock = threading.Lock()
        self.active = 0
        self.since = 0.0

    def __enter__(self):
        with self.lock:
            if self.active == 0:
                self.since = time.perf_counter()
            self.active += 1

    def __exit__(self, *exc):
        with self.lock:
            self.active -= 1
            if self.active == 0:
                self.stats.io_busy_s += time.perf_counter() - self.since


class BundleKernel:
    """Runs ffn_bundles for one model's bundle layout over any set of rows.

    For the gate-resident layout (rows hold up | down) the kernel holds every layer's W_gate
    (`gate_weights`) and begin(layer, h) computes gate.h for all neurons once per layer call; the row
    kernel then takes each neuron's gate pre-activation from there. Backends call begin() first."""

    def __init__(self, config: ModelConfig, layout: BundleLayout, threads: int, gate_weights=None, up_weights=None):
        parts = layout.item_offsets()
        self.act, self.thr = K.activation(config)
        self.in_off, self.gate_off, self.down_off = parts.get("up", 0), parts.get("gate", 0), parts["down"]
        self.d = config.d_model
        self.threads = threads
        # Per-thread partial sums for up to BLAS_MIN_TOKENS tokens (larger T takes the BLAS path).
        self.partial = np.zeros((threads, BLAS_MIN_TOKENS, config.d_model), np.float32)
        self.scratch = None               # f32 block of widened rows for prompt-sized batches
        self.no_bias = np.zeros(0, np.float32)
        if layout.gate_resident and (gate_weights is None or len(gate_weights) != config.n_layers):
            raise ValueError("a gate-resident bundle layout needs every layer's W_gate")
        if layout.up_resident and (up_weights is None or len(up_weights) != config.n_layers):
            raise ValueError("a down-only bundle layout needs every layer's W_up")
        self.gate_weights = gate_weights if layout.gate_resident else None
        self.up_weights = up_weights if layout.up_resident else None
        self.gate_buf = np.zeros((1, config.n_ff), np.float32)   # grow once to a prompt chunk
        self.up_buf = np.zeros((1 if self.up_weights is not None else 0, config.n_ff), np.float32)
        self.gate_pre, self.up_pre = self.gate_buf, self.up_buf

    def projections(self, layer: int, w_gate, w_up) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(gate.h, up.h) [T, n_ff] that begin() computed for this layer call from these very tensors
        (None for one it did not): a predictor whose rule multiplies h by the same resident W_gate
        (W_up) takes them instead of computing the product a second time."""
        if self.gate_weights is None:
            return None, None
        gate = self.gate_pre if w_gate is not None and w_gate is self.gate_weights[layer] else None
        up = self.up_pre if self.up_weights is not None and w_up is not None and w_up is self.up_weights[layer] else None
        return gate, up

    def begin(self, layer: int, h: np.ndarray) -> None:
        """Start a layer call on h [T, d]: the gate-resident layout's gate.h for every neuron."""
        if self.gate_weights is None:
            return
        T = h.shape[0]
        if self.gate_buf.shape[0] < T:
            self.gate_buf = np.zeros((T, self.gate_buf.shape[1]), np.float32)
        self.gate_pre = self.gate_buf[:T]
        K.matmul(h, self.gate_weights[layer], self.gate_pre)
        if self.up_weights is not None:
            if self.up_buf.shape[0] < T:
                self.up_buf = np.zeros((T, self.up_buf.shape[1]), np.float32)
            self.up_pre = self.up_buf[:T]
            K.matmul(h, self.up_weights[layer], self.up_pre)

    @staticmethod
    def scratch_bytes(config: ModelConfig, threads: int) -> int:
        return threads * BLAS_MIN_TOKENS * config.d_model * 4 + BLAS_BLOCK_BYTES

    def __call__(self, h, rows, n_rows, neuron_of_row, bias, out, keep=NO_ROWS) -> None:
        """out = the FFN over rows[:n_rows] (keep, decode only: just those row indices; empty: all)."""
        T = h.shape[0]
        if T >= BLAS_MIN_TOKENS:
            self._batched(h, rows, n_rows, neuron_of_row, bias, out)
            return
        if self.gate_weights is not None:        # gated layouts: keep is never set (threshold rule only)
            K.ffn_bundles_pregate(h, rows, n_rows, neuron_of_row, self.gate_pre, self.up_pre, self.act, self.thr,
                                  self.in_off, self.down_off, self.partial, out)
            return
        K.ffn_bundles(h, rows, n_rows, neuron_of_row, self.no_bias if bias is None else bias, self.act, self.thr,
                      self.in_off, self.gate_off, self.down_off, self.partial, out, keep)

    def _batched(self, h, rows, n_rows, neuron_of_row, bias, out) -> None:
        """Prompt-sized T: widen blocks of bundle rows to f32 and let BLAS do the three products."""
        d = self.d
        block = max(1, BLAS_BLOCK_BYTES // (4 * rows.shape[1]))
        if self.scratch is None or self.scratch.shape != (block, rows.shape[1]):
            self.scratch = np.empty((block, rows.shape[1]), np.float32)
        out[:] = 0.0
        for lo in range(0, n_rows, block):
            hi = min(n_rows, lo + block)
            w = self.scratch[:hi - lo]
            K.widen_rows(rows, lo, hi, w)
            u = h @ w[:, self.in_off:self.in_off + d].T if self.up_weights is None \
                else self.up_pre[:, neuron_of_row[lo:hi]]                      # [T, block]
            if self.gate_weights is not None:
                a = K.activate_np(self.gate_pre[:, neuron_of_row[lo:hi]], u, self.act, self.thr)
            elif self.act != K.ACT_RELU:
                a = K.activate_np(h @ w[:, self.gate_off:self.gate_off + d].T, u, self.act, self.thr)
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
        self.act, self.thr = K.activation(config)
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

    def begin(self, layer: int, h: np.ndarray) -> None:
        pass                             # quantized rows always hold every part

    def projections(self, layer: int, w_gate, w_up):
        return None, None

    def __call__(self, h, rows, n_rows, neuron_of_row, bias, out, keep=NO_ROWS) -> None:
        from .qbundle import permute_input
        T = h.shape[0]
        if self.hp.shape[0] < T:
            self.hp = np.zeros((T, self.d), np.float32)
        hp = permute_input(h, self.hp[:T])
        q, s = self.fmt.views(rows)
        if T >= BLAS_MIN_TOKENS:
            self._batched(hp, q, s, n_rows, neuron_of_row, bias, out)
            return
        if self.partial.shape[1] < T:
            self.partial = np.zeros((self.threads, T, self.d), np.float32)
        QK.ffn_qbundles(hp, q, s, n_rows, neuron_of_row, self.no_bias if bias is None else bias, self.act,
                        self.thr, self.fmt_array, self.starts, self.partial, out, keep)

    def _batched(self, hp, q, s, n_rows, neuron_of_row, bias, out) -> None:
        from .qbundle import unpermute
        d, n_parts = self.d, len(self.part_starts)
        block = max(1, BLAS_BLOCK_BYTES // (4 * n_parts * d))
        if self.scratch is None or self.scratch.shape[0] != block:
            self.scratch = np.empty((block, n_parts * d), np.float32)
        acc = np.zeros_like(out)                                   # permuted order
        for lo in range(0, n_rows, block):
            hi = min(n_rows, lo + block)
            w = self.scratch[:hi - lo]
            QK.dequant_rows(q, s, lo, hi, self.fmt_array, self.part_starts, d, w)
            u = hp @ w[:, :d].T
            if self.act != K.ACT_RELU:
                a = K.activate_np(hp @ w[:, d:2 * d].T, u, self.act, self.thr)
            else:
                if bias is not None:
                    u += bias[neuron_of_row[lo:hi]]
                a = np.maximum(u, 0.0)
            acc += a @ w[:, (n_parts - 1) * d:]
        unpermute(acc, out)


def bundle_kernel(config: ModelConfig, layout, threads: int, gate_weights=None, up_weights=None):
    """The kernel for this model's bundle rows: float (f32/f16) or quantized. gate_weights, up_weights:
    every layer's W_gate (W_up) for a layout that keeps them resident."""
    from .storage import bundle_qformat
    if bundle_qformat(layout.storage) is not None:
        return QuantBundleKernel(config, layout, threads)
    return BundleKernel(config, layout, threads, gate_weights, up_weights)


class ResidentFFN(FFNBackend):
    """Every layer's rows in DRAM."""

    def __init__(self, layer_rows: list[np.ndarray], kernel: BundleKernel, biases: list):
        super().__init__()
        self.layer_rows, self.kernel, self.biases = layer_rows, kernel, biases
        self.all_neurons = np.arange(layer_rows[0].shape[0], dtype=np.int32)

    def compute(self, layer, h, out):
        rows = self.layer_rows[layer]
        self.kernel.begin(layer, h)
        self.kernel(h, rows, rows.shape[0], self.all_neurons, self.biases[layer], out)


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


class GraphFFN(FFNBackend):
    """The FFN of a run whose FFN layers all live in the onnxruntime graphs (runtime/ort_model.py, a
    quantized folder in dense mode): nothing to compute here, only the counters every backend keeps."""

    def compute(self, layer, h, out):
        raise RuntimeError("the FFN of this model runs inside its onnxruntime sessions")


class MmapFFN(FFNBackend):
    """Rows used straight from a memory map of the bundle file, pages dropped after each layer.

    This is what llama.cpp's mmap degrades to when the page cache cannot hold the model: every token
    faults every FFN page back in. Bytes read are what the kernel reports for this process.

    Touching a mapped page past the end of a file that shrank kills the process with SIGBUS, so the
    file's size is checked before each layer is used, and (unless verification is off) each layer's
    rows are checked against their CRC-32 before the kernel runs on them, as flash reads are. A file
    truncated while one layer computes can still raise SIGBUS: the check narrows the window to that.
    """

    def __init__(self, path, layout: BundleLayout, kernel: BundleKernel, biases: list, row_crc=None):
        super().__init__()
        self.path = path
        self.file = open(path, "rb")
        self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        self.row_crc = row_crc
        whole = np.frombuffer(self.map, dtype=np.uint8)
        self.spans = [(off, layout.layer_bytes) for off in layout.layer_offsets]
        if max((off + n for off, n in self.spans), default=0) > len(self.map):
            raise ModelFileError(f"{path}: {len(self.map)} bytes, too short for the bundle layout in the manifest")
        self.layers = [whole[off:off + n].view(layout.dtype).reshape(layout.n_rows, layout.stride_items)
                       for off, n in self.spans]
        self.kernel, self.biases = kernel, biases
        self.all_neurons = np.arange(layout.n_rows, dtype=np.int32)

    def compute(self, layer, h, out):
        before = _proc_read_bytes()
        t0 = time.perf_counter()
        rows = self.layers[layer]
        off, nbytes = self.spans[layer]
        size = os.fstat(self.file.fileno()).st_size
        if size < off + nbytes:
            raise ModelFileError(f"{self.path}: shrank to {size} bytes while mapped (layer {layer} needs "
                                 f"{off + nbytes}); the model file was truncated during the run")
        if self.row_crc is not None:
            self.row_crc.check(rows, self.all_neurons, layer)
        self.kernel.begin(layer, h)
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


class LayerStreamer:
    """Reads rows of a layer from flash through two buffers, computing one while the other fills.

    compute(layer, h, out, neurons) runs the FFN over `neurons` (default: all rows of the layer) in
    chunks of one buffer: chunk i+1 is read while chunk i computes. With buffers of a whole layer and
    `order` (the layers that stream whole, in execution order), the next of those layers is read while
    this one computes, and the last wraps to the first: the next token's first streamed layer is read
    while this token's last one computes (weights never change, so a layer read ahead stays valid
    across tokens and sequences). The sparse layers' overflow rows and their per-token fallback (stream
    the layer when scattered reads would cost more) use a streamer too, without `order`.
    """

    def __init__(self, reader, kernel: BundleKernel, biases: list, layout: BundleLayout, buffer_rows: int,
                 stats: FFNStats, clock: _IOClock, *, row_crc=None, order=(), whole: bool = False):
        self.reader, self.kernel, self.biases, self.row_crc = reader, kernel, biases, row_crc
        self.stats, self.clock = stats, clock    # the owning backend's
        self.whole = whole               # planned STREAM layers: time their reads (stream_bytes, stream_read_s)
        self.stride = layout.stride_bytes
        self.buffers = [aligned_empty((buffer_rows, layout.stride_items), layout.dtype) for _ in range(2)]
        self.ids = [np.zeros(buffer_rows, np.int32) for _ in range(2)]
        self.dest = np.arange(buffer_rows, dtype=np.int32)
        self.cap = buffer_rows
        self.all_neurons = np.arange(layout.n_rows, dtype=np.int32)
        self.order = list(order)
        self.next_of = {a: b for a, b in zip(self.order, self.order[1:] + self.order[:1])}
        self.tmp = np.zeros((1, kernel.d), np.float32)      # grows once to a prompt chunk
        self.pool = ThreadPoolExecutor(1)
        self.turn = 0                    # which buffer the next read goes to
        self.ahead = None                # (layer, buffer index, future): a whole next layer read ahead

    def _read(self, layer, neurons, b):
        with self.clock:
            return self._read_timed(layer, neurons, b)

    def _read_timed(self, layer, neurons, b):
        n = len(neurons)
        self.ids[b][:n] = neurons
        t0 = time.perf_counter()
        try:
            self.reader.read_rows(layer, neurons, self.buffers[b], self.dest[:n])
        except OSError as e:
            raise read_error(self.reader.path, layer, e) from None
        if self.whole:                   # only this pool's thread writes these two fields
            self.stats.stream_read_s += time.perf_counter() - t0
            self.stats.stream_bytes += n * self.stride
        if self.row_crc is not None:
            self.row_crc.check(self.buffers[b][:n], neurons, layer)
        return n

    def _submit(self, layer, neurons):
        b = self.turn
        self.turn ^= 1
        return b, self.pool.submit(self._read, layer, neurons, b)

    def compute(self, layer, h, out, neurons=None, *, accumulate: bool = False) -> None:
        ids = self.all_neurons if neurons is None else neurons
        T = h.shape[0]
        if self.ahead is not None and self.ahead[0] == layer and neurons is None:
            _, b, fut = self.ahead
        else:
            self._drain()
            b, fut = self._submit(layer, ids[:self.cap])
        self.ahead = None
        first = not accumulate
        for start in range(0, len(ids), self.cap):
            t0 = time.perf_counter()
            n = fut.result()
            nxt = start + self.cap
            if nxt < len(ids):
                nb, fut = self._submit(layer, ids[nxt:nxt + self.cap])
            elif neurons is None and layer in self.next_of:
                self.ahead = (self.next_of[layer], *self._submit(self.next_of[layer], self.all_neurons[:self.cap]))
            t1 = time.perf_counter()
            self.stats.io_s += t1 - t0
            target = out if first else self._tmp(T)
            self.kernel(h, self.buffers[b], n, self.ids[b], self.biases[layer], target)
            if not first:
                out += target
            first = False
            self.stats.ffn_s += time.perf_counter() - t1
            if nxt < len(ids):
                b = nb
        if neurons is None:
            self.stats.streamed_layers += 1

    def _tmp(self, T):
        if self.tmp.shape[0] < T:
            self.tmp = np.zeros((T, self.kernel.d), np.float32)
        return self.tmp[:T]

    def settle(self) -> None:
        """Wait for a read-ahead in flight, keeping it (its bytes are then in the reader's counts)."""
        if self.ahead is not None:
            self.ahead[2].result()

    def _drain(self):
        if self.ahead is not None:
            self.ahead[2].result()
            self.ahead = None

    def close(self):
        self._drain()
        self.pool.shutdown()


GUESS_DECAY = 0.9           # weight of the past in a layer's guess record (rows, time)
GUESS_RETRY = 16            # tokens after which a layer that is not guessed is guessed again


def guess_pays(read_rows: float, used_rows: float, read_s: float, hidden_s: float) -> bool:
    """Does guessing a layer early save more I/O time than its over-fetch costs? From the layer's own
    record: the guess read `read_rows` rows in `read_s` on the I/O thread, `hidden_s` of it while the
    compute thread was busy elsewhere (the rest it waited for), and the layer wanted `used_rows` of them.
    The hidden share h = hidden_s / read_s of the used rows' read time leaves the critical path; the
    over-fetched rows' read time is charged in full (on an I/O-bound plan the I/O thread's time is the
    token's). So it pays iff h * used > over, i.e. precision > 1 / (1 + h): 0.5 when all of the guess
    hides (the fixed threshold used before), 1 (never) when the compute thread waits for all of it."""
    if read_rows <= 0 or read_s <= 0:
        return True                  # nothing read, or not measured yet: guessing costs nothing
    h = min(max(hidden_s / read_s, 0.0), 1.0)
    return h * used_rows > read_rows - used_rows


class FlashFFN(FFNBackend):
    """Every layer where the memory plan put it: resident rows, sparse (predictor + neuron cache), or
    streamed whole. The flash path of a sparse layer, per call: predict the neurons this layer needs;
    admit them into the layer's cache (evict those that left the window by swap-with-last, append the
    missing); read the missing rows from flash in the background while the kernel runs over the rows
    already resident; then add the new rows, and stream any overflow (more neurons than the cache
    holds) through the sparse streamer. With layer_io "auto", when reading the missing rows one by one
    would cost more than streaming the layer (the shared cost model says), the layer is streamed.

    The pipeline (pipeline=True), for decode tokens: while layer l computes, the reads of layer l+1 are
    in flight. A sparse l+1 is guessed from layer l's FFN input (adjacent layers' inputs differ little:
    Deja Vu's observation): its predictor runs on that input and the cache admits the guess
    (NeuronCache.prefetch) and reads it on the I/O thread, bookkeeping included, while l computes. When
    l+1's true input arrives the step confirms the guessed rows it wants, evicts the over-fetched ones
    and reads only what the guess missed. Streamed layers read the next streamed layer ahead, wrapping
    to the next token (LayerStreamer). What is computed never changes: every layer runs over exactly
    the rows its own predictor selects on its true input.
    """

    def __init__(self, reader, kernel: BundleKernel, biases: list, layout: BundleLayout, *,
                 resident: dict[int, np.ndarray], streamed: list[int], stream_buffer_rows: int,
                 predictors: list, caches: list, sparse_buffer_rows: int, costs: CostModel | None,
                 layer_io: str = "auto", row_crc=None, pipeline: bool = True, pipeline_trial: bool = True,
                 whole=None):
        super().__init__()
        self.pipeline = pipeline         # False: no read starts before the layer that needs it runs
        self.reader, self.kernel, self.biases, self.layout = reader, kernel, biases, layout
        self.resident, self.predictors, self.caches = resident, predictors, caches
        self.costs, self.layer_io, self.row_crc = costs, layer_io, row_crc
        self.all_neurons = np.arange(layout.n_rows, dtype=np.int32)
        self.streamed = set(streamed)
        self.clock = _IOClock(self.stats)
        # Planned STREAM layers: `whole` (layer_stream.RingStreamer, built by the builder) when given.
        self.whole = whole(self.stats) if whole is not None and streamed else \
            LayerStreamer(reader, kernel, biases, layout, stream_buffer_rows, self.stats, self.clock,
                          row_crc=row_crc, order=streamed if pipeline else (), whole=True) if streamed else None
        self.sparse = LayerStreamer(reader, kernel, biases, layout, sparse_buffer_rows, self.stats, self.clock,
                                    row_crc=row_crc) if any(c is not None for c in caches) else None
        n = len(caches)
        # layer -> the sparse layer after it, guessed from this layer's FFN input
        self.lookahead_of = {i: i + 1 for i in range(n - 1) if caches[i + 1] is not None} if pipeline else {}
        self.pending = {}                # sparse layer -> future of its lookahead read
        # the early guess: a predictor's own guess() rule (a wider threshold) where it has one
        self.guess_of = {i: getattr(predictors[i], "guess", predictors[i].predict) for i in self.lookahead_of.values()}
        # Whether the lookahead runs for this decode token: always, or as the switch measures it pays
        self.switch = PipelineSwitch() if pipeline_trial and self.lookahead_of else None
        self.lookahead_on = True
        # Per guessed layer, decayed sums of (rows a guess read, of which the layer wanted, seconds the
        # guess took on the I/O thread, of which hidden behind compute): a layer whose guesses cost more
        # than they save (guess_pays) is not guessed, but retried every GUESS_RETRY tokens.
        self.guess_read = np.zeros(n, np.int64)      # the last guess's rows and seconds (written by the I/O thread)
        self.guess_read_s = np.zeros(n)
        self.guess_score = np.zeros((n, 4))
        self.guess_skipped = np.zeros(n, np.int64)
        self.tmp = np.zeros((1, kernel.d), np.float32)      # grows once to a prompt chunk
        self.keep = NO_ROWS                  # the cached rows a decode token computes (grows once)
        self.pool = ThreadPoolExecutor(1)   # one I/O task at a time: a layer's own misses go before the next guess
        self._load_pinned()
        reader.reset_stats()             # loading resident layers and pinned rows is not per-token I/O

    # -- the interface
    def compute(self, layer, h, out):
        if layer == 0 and self.switch is not None:
            if h.shape[0] == 1:
                self.lookahead_on = self.switch.decode_token(self.switch_counts())
                self.stats.decode_tokens += 1
                self.stats.lookahead_tokens += self.lookahead_on
            else:
                self.switch.interrupt()          # a prompt chunk: the interval is not a decode token's
        self.kernel.begin(layer, h)
        if layer in self.resident:
            self._look_ahead(layer, h)
            rows = self.resident[layer]
            keep = self._resident_rows_to_compute(layer, h, rows.shape[0]) if h.shape[0] == 1 else NO_ROWS
            t0 = time.perf_counter()
            if keep is None:
                out[:] = 0.0
            else:
                self.kernel(h, rows, rows.shape[0], self.all_neurons, self.biases[layer], out, keep)
            self.stats.ffn_s += time.perf_counter() - t0
        elif layer in self.streamed:
            self._look_ahead(layer, h)
            self.whole.compute(layer, h, out)
        else:
            self._sparse(layer, h, out)

    SWITCH_COUNTS = ("ms", "io_wait_ms", "mem_ms", "io_busy_ms", "reads", "bytes", "io_cpu_ms")   # ms: the switch's

    def switch_counts(self) -> tuple:
        """The cumulative counters the pipeline switch keeps per setting for its trial tokens (SWITCH_COUNTS
        after its own "ms"; at a token's start no read is in flight: every layer waited for its own)."""
        st, rs = self.stats, self.reader.stats
        return (1e3 * st.io_s, 1e3 * st.mm_s, 1e3 * st.io_busy_s, rs.reads, rs.bytes_read, 1e3 * rs.cpu_s)

    def io_counts(self) -> tuple[int, int]:
        self.settle()
        nbytes, reads = self.reader.stats.bytes_read, self.reader.stats.reads
        self.stats.io_cpu_s = self.reader.stats.cpu_s
        if hasattr(self.whole, "io_counts"):        # a ring streamer reads through its own descriptor
            b, r = self.whole.io_counts()
            busy = self.whole.ring.busy_s            # its readers' wall time with a read in flight
            self.stats.io_busy_s += busy - self.stats.stream_read_s
            self.stats.stream_bytes, self.stats.stream_read_s = b, busy
            nbytes, reads = nbytes + b, reads + r
        return nbytes, reads

    def settle(self) -> None:
        """Wait for reads started ahead of their layer (their data is kept)."""
        if self.whole is not None:
            self.whole.settle()
        for fut in self.pending.values():
            fut.result()

    def reset_stats(self) -> None:
        super().reset_stats()
        self.reader.reset_stats()
        if hasattr(self.whole, "io_counts"):
            self.whole.reset_stats()

    def close(self):
        for s in (self.whole, self.sparse):
            if s is not None:
                s.close()
        self.pool.shutdown()             # waits for a lookahead read in flight
        self.pending.clear()

    # -- the sparse path
    def _load_pinned(self) -> None:
        for layer, cache in enumerate(self.caches):
            if cache is not None and cache.needs_pinned_load:
                adm = cache.load_pinned()
                self._read(layer, adm.missing, cache.rows, adm.dest_rows)

    def _read_busy(self, layer, neurons, out, out_rows) -> None:
        with self.clock:
            self._read(layer, neurons, out, out_rows)

    def _read(self, layer, neurons, out, out_rows) -> None:
        """Read rows and check the ones read for the first time (RowCheck), in the calling thread.
        out_rows are consecutive (the cache appends)."""
        try:
            self.reader.read_rows(layer, neurons, out, out_rows)
        except OSError as e:
            raise read_error(self.reader.path, layer, e) from None
        if self.row_crc is not None and len(neurons):
            self.row_crc.check(out[out_rows[0]:out_rows[0] + len(neurons)], neurons, layer)

    def _cached_rows_to_compute(self, pred, cache, n_valid):
        """For one decode token, the cached rows (< n_valid) whose neuron the predictor does not rule out
        (LayerPredictor.compute_filter): NO_ROWS to compute all of them, None for none.
        The window holds every neuron of its last tokens, several times what one token fires, and the
        kernel pays a dot product for each (the 7B-class synthetic model at 50%, window 8: ~2300 rows a
        layer held, ~70% of them below the threshold; docs/BENCHMARKS.md, session 11)."""
        filt = getattr(pred, "compute_filter", None)
        filt = filt() if filt is not None else None
        if filt is None or not n_valid:
            return NO_ROWS
        return self._rows_above(filt, cache.neuron_of_row, n_valid, cache.rows.shape[0])

    def _resident_rows_to_compute(self, layer, h, n_rows):
        """A resident layer's rows (row i holds neuron i) that a decode token computes: those its predictor
        does not rule out, where the plan kept one for it (MemoryPlan.predictor_layers); else NO_ROWS, all."""
        pred = self.predictors[layer] if self.predictors is not None else None      # (hybrid: none)
        if pred is None or getattr(pred, "compute_filter", None) is None:
            return NO_ROWS
        t0 = time.perf_counter()
        pred.predict(h)                      # scores every neuron (the selection itself is not used)
        filt = pred.compute_filter()
        self.stats.predict_s += time.perf_counter() - t0
        if filt is None:
            return NO_ROWS
        return self._rows_above(filt, self.all_neurons, n_rows, n_rows)

    def _rows_above(self, filt, neuron_of_row, n_rows, capacity):
        """The rows < n_rows whose neuron scores above the filter's threshold (filt: compute_filter's
        (scores, threshold)), in self.keep (grown once to `capacity` rows); None where no row is."""
        if len(self.keep) < n_rows:
            self.keep = np.zeros(capacity, np.int32)
        k = K.select_rows(filt[0], neuron_of_row, n_rows, filt[1], self.keep)
        self.stats.cached_skipped += n_rows - k
        return self.keep[:k] if k else None

    # -- lookahead
    def _look_ahead(self, layer, h) -> None:
        """Guess the next layer's neurons from this layer's FFN input and start admitting and reading them."""
        nxt = self.lookahead_of.get(layer)
        if nxt is None or h.shape[0] != 1 or not self.lookahead_on:   # decode tokens only: a prompt's union
            return                                                     # is streamed
        if not guess_pays(*self.guess_score[nxt]) and self.guess_skipped[nxt] < GUESS_RETRY:
            self.guess_skipped[nxt] += 1             # this layer's guesses cost more than they hide: read on demand
            return
        self.guess_skipped[nxt] = 0
        t0 = time.perf_counter()
        # a copy: a decode prediction is a view of the layer's buffers, which its true prediction reuses
        # while the I/O thread may still be admitting the guess
        guess = self.guess_of[nxt](h).copy()
        self.stats.predict_s += time.perf_counter() - t0
        self.pending[nxt] = self.pool.submit(self._prefetch, nxt, guess)

    def _prefetch(self, layer, guess) -> None:
        """On the I/O thread: admit the guess into the layer's cache, then read the rows it lacked."""
        with self.clock:
            cache, st = self.caches[layer], self.stats      # only this thread writes mm_bg_s and guess_rows
            t0 = time.perf_counter()
            adm = cache.prefetch(guess)
            st.mm_bg_s += time.perf_counter() - t0
            st.guess_rows += len(adm.missing)
            self.guess_read[layer] = len(adm.missing)
            self._read(layer, adm.missing, cache.rows, adm.dest_rows)
            self.guess_read_s[layer] = time.perf_counter() - t0

    def _sparse(self, layer, h, out) -> None:
        cache, pred, st = self.caches[layer], self.predictors[layer], self.stats
        pending = self.pending.pop(layer, None)
        t0 = time.perf_counter()
        # The gate/exact rules over a resident-part layout multiply h by the W_gate (W_up) that begin()
        # already multiplied: the predictor takes those products (one matmul per part per layer call).
        gate_h, up_h = self.kernel.projections(layer, getattr(pred, "gate_rows", None), getattr(pred, "up_rows", None))
        wanted = pred.predict(h, gate_h=gate_h, up_h=up_h) if gate_h is not None else pred.predict(h)
        t1 = time.perf_counter()
        st.predict_s += t1 - t0
        waited = 0.0
        if pending is not None:
            pending.result()                 # the guessed rows are in before the step moves rows
            t = time.perf_counter()
            waited = t - t1
            st.io_s += waited
            t1 = t
        n_missing = cache.count_missing(wanted)
        st.wanted += len(wanted)
        if self.layer_io == "auto" and self.costs.stream_is_cheaper(n_missing):
            # Streaming the layer is cheaper (typically a prompt's union): compute it whole, exactly,
            # and leave the cache as it was before any guess.
            st.hits += len(wanted) - n_missing
            if pending is not None:
                cache.cancel_prefetch()
            self.sparse.compute(layer, h, out)
            return
        adm = cache.step(wanted)
        st.hits += adm.hits
        if pending is not None:
            st.guess_used += adm.prefetch_hits
            st.guess_missed += len(adm.missing) + len(adm.overflow)
            score = self.guess_score[layer]
            score *= GUESS_DECAY
            read_s = self.guess_read_s[layer]
            score += (self.guess_read[layer], adm.prefetch_hits, read_s, max(read_s - waited, 0.0))
        else:
            st.hits += adm.prefetch_hits     # (none: nothing was guessed)
        t2 = time.perf_counter()
        st.mm_s += t2 - t1
        n_valid = cache.n - len(adm.missing)
        fut = self.pool.submit(self._read_busy, layer, adm.missing, cache.rows, adm.dest_rows) \
            if len(adm.missing) else None
        # Before the lookahead, which scores the next layer: which cached rows this token computes
        keep = self._cached_rows_to_compute(pred, cache, n_valid) if h.shape[0] == 1 else NO_ROWS
        self._look_ahead(layer, h)           # queued behind this layer's own misses (its predictor: predict_s)
        t2 = time.perf_counter()
        if keep is None:
            out[:] = 0.0                     # no cached row is worth computing
        else:
            self.kernel(h, cache.rows, n_valid, cache.neuron_of_row, self.biases[layer], out, keep)
        t3 = time.perf_counter()
        st.ffn_s += t3 - t2
        if fut is not None:
            fut.result()
            t4 = time.perf_counter()
            st.io_s += t4 - t3
            T = h.shape[0]
            if self.tmp.shape[0] < T:
                self.tmp = np.zeros((T, self.kernel.d), np.float32)
            self.kernel(h, cache.rows[n_valid:], len(adm.missing), cache.neuron_of_row[n_valid:],
                        self.biases[layer], self.tmp[:T])
            out += self.tmp[:T]
            st.ffn_s += time.perf_counter() - t4
        if len(adm.overflow):
            st.overflow += len(adm.overflow)
            self.sparse.compute(layer, h, out, adm.overflow, accumulate=True)
