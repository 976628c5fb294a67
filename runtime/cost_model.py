"""The cost model: what a decode token costs under a memory plan on a device. One object per run,
built once (`CostModel.for_run`, by the builder and by `flashlm tune`) from the device profile and the
model's shape, and shared by

- the planner (runtime/memory.py), which places each layer's FFN rows by their flash read time
  (`rows_seconds`, `layer_stream_s`),
- the sparse path (runtime/ffn.py), which per token streams a layer whole when reading its missing
  rows one by one would cost more (`stream_is_cheaper`),
- `flashlm tune`, which ranks whole plans by their predicted time per token (`plan_cost`) and prints
  the breakdown (`TokenCost.lines`, like the paper's Table 3).

Because all three use one object, a placement, the per-token fallback and the estimate see the same
device at the same reader and compute thread counts. Pure: numbers in, numbers out.

Per layer (decode, T = 1), with the device's figures (runtime/device.py):
- compute: weights touched / matvec speed of the storage type at the compute threads. Attention and
  norms touch the layer's attention weights; a resident, streamed or mapped FFN layer all n_ff bundle
  rows; a sparse layer the rows its cache holds (the kernel runs over the whole window union) plus
  its predictor (f32).
- flash I/O (io_busy): a streamed layer reads n_ff rows through the ring streamer (layer bytes / the
  probe's ring rate at the reader threads and the plan's ring size: a smaller ring streams slower); a
  sparse layer reads the rows its window missed, merged where adjacent: one reader call's hand-off plus
  its reads at the probe's time per read of such calls (scaled by size from the raw table) at
  min(reader threads, reads) in flight; a mapped layer faults back through the page cache.
- memory management (mem): the cache's admission bookkeeping (a fixed cost per sparse layer) plus the
  evicted rows' delete-by-swap copies at DRAM bandwidth.
- overlap: a streamed layer's read runs while the previous layer computes (two layer buffers), so the
  compute thread waits max(0, I/O - compute); a sparse layer reads its missing rows while the kernel
  runs over the rows it already holds, so it waits max(0, I/O - compute of the held rows); a mapped
  layer waits for all of its faults. io_wait is that wait, overlap = io_busy - io_wait, and a layer's
  time is compute + mem + io_wait.
- a fixed per-layer overhead (Python dispatch of ~10 kernels) and a per-token one (embedding, final
  norm, sampling): constants measured on this project's machine (below), not in device profiles.
The lm_head (tied or not) is a matvec over vocab x d_model weights every token.

The per-token fields (io_wait_ms, io_busy_ms, compute_ms, mem_ms, overlap_ms) are the ones the
runtime's measured accounting uses, so a prediction and a measurement compare field by field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .device import DeviceProfile, load_device
from .memory import RUNTIME_OVERHEAD, Calibration, MemoryPlan, Placement

# Fixed costs. Layer: dense decode of the tiny test models (whose matvecs take ~1 us) on this 2-core VM,
# 0.125 ms/token with 2 layers and 0.188 with 3 (tools/aarch64_fixture_check.py's models, 30 tokens):
# ~62 us per layer and nothing measurable per token. A sparse layer's cache step is the profile's
# (`flashlm probe` measures NeuronCache.step; device.DEFAULT_CACHE_STEP_US without it).
LAYER_OVERHEAD_S = 62e-6
ROW_READ_UNIT = 4096         # flash_reader.BLOCK: the smallest direct read
TOKEN_OVERHEAD_S = 0.0


@dataclass(frozen=True)
class ModelShape:
    """The sizes a token's cost depends on (from ModelConfig and the bundle layout)."""
    n_layers: int
    d_model: int
    n_ff: int
    vocab: int
    attn_weights: int            # per layer: q, k, v, o projections
    bundle_elems: int            # weights in one neuron's bundle row
    stride_bytes: int            # bytes of one bundle row on flash (padded)
    storage: str                 # storage type name of bundles and dense weights ("f16", "f32", ...)
    bytes_per_weight: float = 2.0
    whole_row_bytes: int | None = None   # a row of a layer read whole (the packed copy has no padding); None: stride

    @property
    def layer_bytes(self) -> int:
        return self.n_ff * self.stride_bytes

    @property
    def stream_bytes(self) -> int:
        """Bytes of one layer read whole (memory.whole_layer_bytes: the packed copy when there is one)."""
        return self.n_ff * (self.whole_row_bytes or self.stride_bytes)

    @property
    def row_read_bytes(self) -> int:
        """Bytes one scattered row read fetches: direct I/O reads whole 4 KiB blocks (and the page
        cache whole pages), so a row smaller than a block costs a block (rows never straddle one)."""
        return max(self.stride_bytes, ROW_READ_UNIT)

    def row_reads(self, n_rows: float) -> float:
        """Reads (of row_read_bytes) that n_rows scattered rows of one layer take: one each for rows of a
        block or more; smaller rows share blocks (4096 // stride rows each), so n random rows touch
        blocks x (1 - (1 - n / n_ff) ** rows_per_block) blocks, and a block read once serves all its rows."""
        if n_rows <= 0:
            return 0.0
        if self.stride_bytes >= ROW_READ_UNIT:
            return n_rows
        per_block = ROW_READ_UNIT // self.stride_bytes
        density = min(1.0, n_rows / self.n_ff)
        return self.n_ff / per_block * (1.0 - (1.0 - density) ** per_block)

    def row_runs(self, n_rows: float, gap_bytes: int = 0) -> float:
        """Read requests that n_rows scattered rows of one layer become: the reader (runtime/flash_reader.py)
        sorts them and merges rows whose blocks are adjacent, or apart by at most gap_bytes, into one
        read. Of u units (rows, or blocks for rows smaller than a block) touched out of U, taken as
        spread at random, a unit starts a new read when none of the 1 + gap units before it is touched:
        u (1 - u/U)^(1 + gap) reads (at least one). E.g. SmolLM2's 650 of 1536 rows: 375 reads, not 650."""
        units = self.row_reads(n_rows)
        if units <= 0:
            return 0.0
        unit_blocks = max(1, self.stride_bytes // ROW_READ_UNIT)
        total = self.n_ff / (ROW_READ_UNIT // self.stride_bytes) if self.stride_bytes < ROW_READ_UNIT else self.n_ff
        density = min(1.0, units / total)
        gap_units = gap_bytes // ROW_READ_UNIT // unit_blocks
        return max(1.0, units * (1.0 - density) ** (1 + gap_units))

    @classmethod
    def from_folder(cls, folder) -> "ModelShape":
        from .memory import whole_layer_bytes
        c, b = folder.config, folder.bundles
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return cls(c.n_layers, c.d_model, c.n_ff, c.vocab_size, attn_weights=2 * c.d_model * q + 2 * c.d_model * kv,
                   bundle_elems=c.bundle_elems, stride_bytes=b.stride_bytes, storage=b.storage.name,
                   bytes_per_weight=b.storage.block_bytes / b.storage.block_elems,
                   whole_row_bytes=whole_layer_bytes(folder)[0])


@dataclass(frozen=True)
class LayerCost:
    kind: str                    # a Placement value: "resident" | "sparse" | "stream" | "mapped"
    rows_computed: float         # bundle rows the FFN kernel runs over per token
    rows_read: float             # rows read from flash per token
    bytes_read: float
    io_busy_s: float             # flash reads in flight
    io_wait_s: float             # ... of which the compute thread waits for (not hidden behind compute)
    mm_s: float                  # memory management
    compute_s: float             # attention + FFN (+ predictor)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.mm_s + self.io_wait_s


@dataclass
class TokenCost:
    layers: list[LayerCost]
    head_s: float                # lm_head matvec
    overhead_s: float            # per-token + per-layer fixed costs
    peak_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    contention_s: float = 0.0    # compute slowed by the streamed reads in flight (the probe's stream_slowdown)
    ring_fraction: float = 1.0   # streamed layers' ring: 1/ring_fraction of two whole layers

    @property
    def io_busy_s(self) -> float:
        return sum(l.io_busy_s for l in self.layers)

    @property
    def io_wait_s(self) -> float:
        return sum(l.io_wait_s for l in self.layers)

    @property
    def mm_s(self) -> float:
        return sum(l.mm_s for l in self.layers)

    @property
    def compute_s(self) -> float:
        return sum(l.compute_s for l in self.layers) + self.head_s + self.contention_s

    @property
    def total_s(self) -> float:
        return sum(l.total_s for l in self.layers) + self.head_s + self.overhead_s + self.contention_s

    @property
    def overlap_s(self) -> float:
        """Flash time hidden behind compute."""
        return self.io_busy_s - self.io_wait_s

    @property
    def bytes_read(self) -> float:
        return sum(l.bytes_read for l in self.layers)

    def per_token_ms(self) -> dict[str, float]:
        """The breakdown in the runtime's accounting fields (ms per token)."""
        return {"total_ms": 1e3 * self.total_s, "io_wait_ms": 1e3 * self.io_wait_s, "io_busy_ms": 1e3 * self.io_busy_s,
                "compute_ms": 1e3 * self.compute_s, "mem_ms": 1e3 * self.mm_s, "overhead_ms": 1e3 * self.overhead_s,
                "overlap_ms": 1e3 * self.overlap_s, "mib_read": self.bytes_read / 2**20}

    def lines(self) -> list[str]:
        """The breakdown, like the paper's Table 3 (I/O, memory management, compute, total)."""
        ms = lambda s: f"{1e3 * s:8.2f} ms"  # noqa: E731
        kinds = {p.value: sum(l.kind == p for l in self.layers) for p in Placement}
        out = [f"  predicted per token: {ms(self.total_s).strip()}  ({1 / self.total_s:.1f} tok/s)"
               + (f", peak memory {self.peak_bytes / 2**20:,.0f} MiB" if self.peak_bytes else ""),
               f"    flash I/O            {ms(self.io_busy_s)}   {self.bytes_read / 2**20:8.2f} MiB read",
               f"      hidden by overlap -{ms(self.overlap_s).strip():>11s}   (waited for: {ms(self.io_wait_s).strip()})",
               f"    memory management    {ms(self.mm_s)}",
               f"    compute              {ms(self.compute_s)}   (lm_head {1e3 * self.head_s:.2f} ms"
               + (f", slowed by the streaming readers {1e3 * self.contention_s:.2f} ms)" if self.contention_s else ")"),
               f"    fixed overheads      {ms(self.overhead_s)}",
               "    layers: " + ", ".join(f"{n} {k}" for k, n in kinds.items() if n)]
        return out + [f"    note: {n}" for n in self.notes]


HOT_FRACTION = 0.05     # the calibration's hot set: `hot_top5pct_share` is the activations it carries


def pinned_miss_share(layer_stats: dict, fraction: float, window: int) -> float:
    """Share of a sparse layer's window misses that pinning its `fraction` hottest neurons removes.

    From what calibration measured: the mean share of neurons the predictor selects (q =
    `predicted_fraction`) and the share of those selections the 5% hottest neurons carry (s5 =
    `hot_top5pct_share`). Two groups of neurons: the hot 5% selected with probability p_h = s5 q / 0.05
    per token, the rest with p_c = (1 - s5) q / 0.95. A neuron selected with probability p misses a
    window of w tokens with probability p (1 - p)^w (selected now, in none of the w before), so at
    larger windows nearly every miss is a cold neuron: a hot one is almost always still held. (For
    the synthetic ReLU model this gives 0.70 of selections missed at w = 1 and 0.40 at w = 8; its
    calibration measured 0.71 and 0.36.) Pinned neurons are the hottest first: the hot group, then
    cold ones (taken as alike within their group). Without s5: every neuron alike (share = fraction)."""
    if fraction <= 0:
        return 0.0
    if fraction >= 1:
        return 1.0
    q = layer_stats.get("predicted_fraction")
    s5 = layer_stats.get("hot_top5pct_share")
    if not q or not s5 or not 0 < s5 < 1:
        return fraction
    h = HOT_FRACTION
    p_hot, p_cold = min(1.0, s5 * q / h), min(1.0, (1 - s5) * q / (1 - h))
    m_hot = h * p_hot * (1 - p_hot) ** window
    m_cold = (1 - h) * p_cold * (1 - p_cold) ** window
    if m_hot + m_cold <= 0:
        return fraction
    covered = m_hot * min(1.0, fraction / h) + m_cold * max(0.0, (fraction - h) / (1 - h))
    return covered / (m_hot + m_cold)


class CostModel:
    """One device's speeds priced for one model's shape, at given reader and compute thread counts."""

    def __init__(self, profile: DeviceProfile, shape: ModelShape, *, compute_threads: int | None = None,
                 io_threads: int = 4, io: str = "direct", engine: str = "numba", pipeline: bool = True,
                 layer_overhead_s: float = LAYER_OVERHEAD_S, token_overhead_s: float = TOKEN_OVERHEAD_S,
                 sparse_bookkeeping_s: float | None = None, max_gap_bytes: int = 0):
        self.profile, self.shape = profile, shape
        self.compute_threads = compute_threads or profile.cores
        self.io_threads = io_threads
        self.max_gap_bytes = max_gap_bytes
        # compute slowed by reads in flight (the probe's figures; none: 1x and 0)
        self.stream_slowdown = profile.stream_compute_slowdown(io_threads, self.compute_threads)
        self.call_compute_s = profile.reader_call_compute_s(io_threads, self.compute_threads)
        self.io = io
        self.engine = engine
        self.pipeline = pipeline
        self.reader_call_s = profile.reader_call_s(io_threads)
        self.layer_overhead_s = layer_overhead_s
        self.token_overhead_s = token_overhead_s
        # the profile's measured cache step (count_missing + step) unless given
        self.sparse_bookkeeping_s = 1e-6 * profile.cache_step_us if sparse_bookkeeping_s is None else sparse_bookkeeping_s
        self.step_row_s = 1e-6 * profile.cache_step_row_us
        self._table = profile.buffered if io == "buffered" and profile.buffered is not None else profile.direct
        # The figures the per-token decisions use, computed once (the sparse path asks every token).
        # one more row at full concurrency (the reader call's fixed cost is paid once per call, not per row)
        self.row_read_s = (self.rows_seconds(2 * io_threads) - self.rows_seconds(io_threads)) / io_threads
        self.layer_stream_s = self.stream_s(shape.stream_bytes)
        self._stream_above = self._first_rows_slower_than(self.layer_stream_s) - 1

    @classmethod
    def for_run(cls, folder, rt, *, compute_threads: int | None = None, profile: DeviceProfile | None = None,
                **overheads) -> "CostModel":
        """The cost model of one run: rt's device profile (or the built-in defaults), reader threads and
        I/O mode, for the folder's model."""
        return cls(profile or load_device(rt.profile), ModelShape.from_folder(folder),
                   compute_threads=compute_threads or rt.threads, io_threads=rt.io_threads, io=rt.io,
                   pipeline=rt.pipeline, max_gap_bytes=rt.max_gap_bytes, **overheads)

    @property
    def source(self) -> str:
        return self.profile.path

    # -- flash reads: what placement and the per-token fallback decide by ---------------------------------
    def random_read_s(self, n_reads: float, read_bytes: int) -> float:
        """n_reads random reads of read_bytes, issued by the reader's threads in one batch."""
        if n_reads <= 0:
            return 0.0
        in_flight = max(1.0, min(float(self.io_threads), n_reads))
        return n_reads * read_bytes / (self._table.random_at(read_bytes, in_flight) * 1e6)

    def rows_seconds(self, n_rows: float) -> float:
        """I/O thread time to read n_rows scattered bundle rows in one reader call. (Their CRC-32 check
        is not priced: modelfile.RowCheck checks a row the first time the process reads it, so a
        steady decode token checks next to nothing.)"""
        if n_rows <= 0:
            return 0.0
        if self.io != "direct":    # the page cache: rows at their stride (pages read ahead serve neighbours)
            return self.reader_call_s + self.random_read_s(n_rows, self.shape.stride_bytes)
        # adjacent rows are one read: fewer, larger reads (runs of the mean size)
        reads = self.shape.row_runs(n_rows, self.max_gap_bytes)
        size = self.shape.row_reads(n_rows) * self.shape.row_read_bytes / reads
        in_flight = max(1.0, min(float(self.io_threads), reads))
        row_s = self.profile.reader_row_s(in_flight)
        if row_s is None:          # not measured through the reader: the raw reads' figures
            return self.reader_call_s + self.random_read_s(reads, size)
        # measured for 4 KiB reads; a bigger read costs what the raw table says one such read costs more
        scale = (size / self._table.random_at(size, in_flight)) / (ROW_READ_UNIT / self._table.random_at(ROW_READ_UNIT, in_flight))
        return self.reader_call_s + reads * row_s * scale

    def _first_rows_slower_than(self, seconds: float) -> int:
        """The fewest rows whose scattered read takes longer than `seconds` (n_ff + 1: none do).
        rows_seconds grows with the rows, so a bisection finds it."""
        lo, hi = 1, self.shape.n_ff + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.rows_seconds(mid) > seconds:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def stream_is_cheaper(self, n_missing: int) -> bool:
        """Stream the layer whole rather than read n_missing rows one by one?"""
        return n_missing > self._stream_above

    def missed_rows(self, layer_stats: dict, window: int, pin_rows: int = 0) -> float:
        """Rows a sparse layer reads per token, from its calibrated window statistics (the planner's and
        the pricing's one estimate): the predicted neurons the window did not hold, less the share of
        them the pinned hottest neurons would have missed (`pinned_miss_share`: pinned rows never miss)."""
        w = layer_stats.get("windows", {}).get(str(window), {})
        wanted = layer_stats.get("predicted_fraction", 1.0) * self.shape.n_ff
        miss = w.get("miss_fraction", 1.0) * wanted
        if pin_rows:
            miss *= 1.0 - pinned_miss_share(layer_stats, pin_rows / self.shape.n_ff, window)
        return miss

    def stream_s(self, nbytes: float, ring_fraction: float = 1.0) -> float:
        """Whole layers read by the ring streamer during decode steps through a ring of 1/ring_fraction of
        two whole layers (the probe's `ring_stream_mb_s` by ring size, else `reader_stream_mb_s` for every
        size), or without those figures, raw sequential 1 MiB reads at the reader's thread count."""
        mb_s = self.profile.reader_stream_mb_s_at(self.io_threads, ring_fraction) if self.io == "direct" else None
        return nbytes / ((mb_s or self._table.sequential_at(self.io_threads)) * 1e6)

    # -- compute and memory ----------------------------------------------------------------------------
    def matvec_s(self, weights: float, storage: str, bytes_per_weight: float | None = None) -> float:
        g = self.profile.matvec_gweights_s(f"{self.engine}-{storage}", self.compute_threads, bytes_per_weight)
        return weights / (g * 1e9)

    def rows_compute_s(self, n_rows: float) -> float:
        """The FFN row kernel over n_rows bundle rows (its own figure: "numba-bundle-<storage>")."""
        s = self.shape
        g = self.profile.matvec_gweights_s(f"{self.engine}-bundle-{s.storage}", self.compute_threads, s.bytes_per_weight)
        return n_rows * s.bundle_elems / (g * 1e9)

    def dram_copy_s(self, nbytes: float) -> float:
        return 2 * nbytes / (self.profile.dram_gb_s_at(self.compute_threads) * 1e9)    # read + write

    # -- a token ---------------------------------------------------------------------------------------
    def layer(self, kind: str, *, held_rows: float = 0.0, miss_rows: float = 0.0,
              predictor_weights: int = 0, wanted_rows: float = 0.0, ring_rows: int | None = None) -> LayerCost:
        """One layer's decode cost with its FFN rows placed as `kind` (a Placement or its value); a streamed
        layer's ring holds two buffers of `ring_rows` rows (None: two whole layers)."""
        s = self.shape
        attn_s = self.matvec_s(s.attn_weights, s.storage, s.bytes_per_weight)
        whole_s = attn_s + self.rows_compute_s(s.n_ff)
        if kind == Placement.RESIDENT:
            return LayerCost(Placement.RESIDENT.value, s.n_ff, 0.0, 0.0, 0.0, 0.0, 0.0, whole_s)
        if kind == Placement.STREAM:          # double-buffered: the read overlaps the previous compute
            io_s = self.layer_stream_s if not ring_rows or ring_rows >= s.n_ff else \
                self.stream_s(s.stream_bytes, s.n_ff / ring_rows)
            return LayerCost(Placement.STREAM.value, s.n_ff, s.n_ff, s.stream_bytes, io_s, max(0.0, io_s - whole_s),
                             0.0, whole_s)
        if kind == Placement.MAPPED:          # page faults through the page cache, serial with compute
            buffered = self.profile.buffered or self._table
            io_s = s.layer_bytes / (buffered.sequential_at(1) * 1e6)
            return LayerCost(Placement.MAPPED.value, s.n_ff, s.n_ff, s.layer_bytes, io_s, io_s, 0.0, whole_s)
        if kind != Placement.SPARSE:
            raise ValueError(f"unknown layer placement {kind!r}")
        pred_s = self.matvec_s(predictor_weights, "f32", 4.0) if predictor_weights else 0.0
        held_s = self.rows_compute_s(max(0.0, held_rows - miss_rows))
        new_s = self.rows_compute_s(miss_rows)
        io_s = self.rows_seconds(miss_rows)
        mm_s = (self.sparse_bookkeeping_s + self.step_row_s * wanted_rows
                + self.dram_copy_s(miss_rows * s.stride_bytes))
        nbytes = s.row_reads(miss_rows) * s.row_read_bytes if self.io == "direct" else miss_rows * s.stride_bytes
        # the compute thread's share of the reader call (its workers wake and take the GIL and cores)
        call_s = self.call_compute_s if miss_rows > 0 else 0.0
        return LayerCost(Placement.SPARSE.value, held_rows, miss_rows, nbytes, io_s,
                         max(0.0, io_s - held_s), mm_s, attn_s + pred_s + held_s + new_s + call_s)

    def token(self, layers: list[LayerCost], peak_bytes: int | None = None, notes: list[str] | None = None) -> TokenCost:
        """A decode token of these layers. Streamed layers, with the pipeline, come through a ring the
        reader threads keep filling across layers and tokens (runtime/layer_stream.py): their reads
        overlap the whole token's compute, not only the previous layer's, so the compute thread waits
        for what the streamed bytes take beyond everything else the token does (max(stream, rest)),
        shared among the streamed layers by their bytes. Without the pipeline each waits for its read."""
        s = self.shape
        head_s = self.matvec_s(s.vocab * s.d_model, s.storage, s.bytes_per_weight)
        overhead = self.token_overhead_s + self.layer_overhead_s * s.n_layers
        streamed = [l for l in layers if l.kind == Placement.STREAM.value]
        contention = 0.0
        if streamed:
            read = sum(l.io_busy_s for l in streamed)
            # compute while the ring streams runs slower (the probe's stream_slowdown): the part of the
            # token's compute that overlaps the streamed reads, at most all of it
            compute = sum(l.compute_s for l in layers) + head_s
            contention = (self.stream_slowdown - 1.0) * min(compute, read)
            if self.pipeline:
                rest = sum(l.total_s for l in layers if l.kind != Placement.STREAM.value) + head_s + overhead \
                    + sum(l.compute_s for l in streamed) + contention
                wait = max(0.0, read - rest)
                layers = [dataclasses.replace(l, io_wait_s=wait * l.io_busy_s / read) if l.kind == Placement.STREAM.value
                          and read > 0 else l for l in layers]
            else:
                layers = [dataclasses.replace(l, io_wait_s=l.io_busy_s) if l.kind == Placement.STREAM.value else l
                          for l in layers]
        return TokenCost(layers, head_s, overhead, peak_bytes, list(notes or []), contention)

    def plan_cost(self, plan: MemoryPlan, calibration: Calibration | None = None, pin: float = 0.0,
                  notes: list[str] | None = None) -> TokenCost:
        """A decode token under `plan` (runtime/memory.py): each layer as placed, a sparse layer from the
        calibrated window statistics at the plan's window; peak memory = the plan + the runtime's own."""
        s = self.shape
        stats = (calibration.report.get("layers") if calibration else None) or [{} for _ in range(s.n_layers)]
        weights = [b // 4 for b in calibration.predictor_bytes] if calibration else [0] * s.n_layers
        out = []
        for i, lp in enumerate(plan.layers):
            if lp.placement != Placement.SPARSE:
                out.append(self.layer(lp.placement, ring_rows=plan.stream_buffer_rows or None))
                continue
            window = lp.window or plan.window        # a layer's own window where the plan mixes them
            w = stats[i].get("windows", {}).get(str(window), {})
            n_pin = int(pin * s.n_ff)
            capacity = lp.cache_rows or s.n_ff
            # rows held: the window union (mean over calibration tokens) plus pinned rows, within the cache
            held = min(capacity, n_pin + w.get("mean_held", 1.0) * s.n_ff)
            miss = self.missed_rows(stats[i], window, n_pin)
            wanted = stats[i].get("predicted_fraction", 1.0) * s.n_ff
            # a cache smaller than its window's union (the planner shrinks caches to fit a budget) keeps
            # only that share of the rows the window would have held: the rest are read again, as misses
            # or as overflow streamed through the sparse buffers
            union = w.get("mean_held", 1.0) * s.n_ff
            keep = min(1.0, max(0.0, capacity - n_pin) / union) if union > 0 else 1.0
            miss = wanted - (wanted - miss) * keep
            out.append(self.layer(Placement.SPARSE, held_rows=held, miss_rows=miss, predictor_weights=weights[i],
                                  wanted_rows=wanted))
        token = self.token(out, plan.total + RUNTIME_OVERHEAD, notes)
        rows = getattr(plan, "stream_buffer_rows", 0)
        if rows and rows < s.n_ff and any(l.kind == Placement.STREAM.value for l in out):
            token.ring_fraction = s.n_ff / rows
            token.notes.append(f"streamed layers through a 1/{token.ring_fraction:g} ring: "
                               f"{s.stream_bytes / self.stream_s(s.stream_bytes, token.ring_fraction) / 1e6:.0f} MB/s "
                               f"(a whole-layer ring: {s.stream_bytes / self.layer_stream_s / 1e6:.0f})")
        return token
