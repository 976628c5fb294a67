"""What one decode token costs under a plan on a device: flash I/O + memory management + compute,
with the overlap the pipeline achieves, and the peak memory. Pure: numbers in, numbers out.

Per layer (decode, T = 1), with the device's figures (runtime/device.py):
- compute: weights touched / matvec speed of the storage type at the compute threads. Attention and
  norms touch the layer's attention weights; a resident or streamed FFN layer all n_ff bundle rows; a
  sparse layer the rows its cache holds (the kernel runs over the whole window union) plus its
  low-rank predictor (f32).
- flash I/O: a streamed layer reads n_ff rows sequentially (layer bytes / sequential MB/s at the reader
  threads); a sparse layer reads the rows its window missed, each a random read of one stride at
  min(reader threads, rows) in flight; mmap faults the layer back through the page cache.
- memory management: the cache's admission bookkeeping (a fixed cost per sparse layer) plus the
  evicted rows' delete-by-swap copies at DRAM bandwidth.
- overlap: a streamed layer's read runs while the previous layer computes (two layer buffers), so it
  costs max(I/O, compute); a sparse layer reads its missing rows while the kernel runs over the rows
  it already holds, so it costs max(I/O, compute of the held rows) + compute of the new rows.
- a fixed per-layer overhead (Python dispatch of ~10 kernels) and a per-token one (embedding, final
  norm, sampling): constants measured on this project's machine (below), not in device profiles.
The lm_head (tied or not) is a matvec over vocab x d_model weights every token.

Scope: this module prices a plan that already exists (`flashlm tune` ranks candidates with it). Where
each layer's rows go is decided by the planner (runtime/memory.py) with runtime/costs.py's CostModel,
which holds only the flash read times of one bundle layout; both take their speeds from the device
profile, so a placement and its estimate see the same device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .device import DeviceProfile

# Fixed costs. Layer: dense decode of the tiny test models (whose matvecs take ~1 us) on this 2-core VM,
# 0.125 ms/token with 2 layers and 0.188 with 3 (tools/aarch64_fixture_check.py's models, 30 tokens):
# ~62 us per layer and nothing measurable per token. Sparse bookkeeping (predictor dispatch and
# NeuronCache.step) is an estimate, not a measurement; `flashlm tune --measure` checks the pick.
LAYER_OVERHEAD_S = 62e-6
TOKEN_OVERHEAD_S = 0.0
SPARSE_BOOKKEEPING_S = 40e-6


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
    predictor_weights: tuple[int, ...] = ()    # per layer, f32

    @property
    def layer_bytes(self) -> int:
        return self.n_ff * self.stride_bytes

    @classmethod
    def from_folder(cls, folder, predictor_bytes: list[int] | None = None) -> "ModelShape":
        c, b = folder.config, folder.bundles
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return cls(c.n_layers, c.d_model, c.n_ff, c.vocab_size, attn_weights=2 * c.d_model * q + 2 * c.d_model * kv,
                   bundle_elems=c.bundle_elems, stride_bytes=b.stride_bytes, storage=b.storage.name,
                   bytes_per_weight=b.storage.block_bytes / b.storage.block_elems,
                   predictor_weights=tuple(p // 4 for p in (predictor_bytes or [0] * c.n_layers)))


@dataclass(frozen=True)
class LayerCost:
    kind: str                    # "resident" | "sparse" | "stream" | "mmap"
    rows_computed: float         # bundle rows the FFN kernel runs over per token
    rows_read: float             # rows read from flash per token
    bytes_read: float
    io_s: float
    mm_s: float
    compute_s: float             # attention + FFN (+ predictor)
    total_s: float               # with overlap


@dataclass
class TokenCost:
    layers: list[LayerCost]
    head_s: float                # lm_head matvec
    overhead_s: float            # per-token + per-layer fixed costs
    peak_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def io_s(self) -> float:
        return sum(l.io_s for l in self.layers)

    @property
    def mm_s(self) -> float:
        return sum(l.mm_s for l in self.layers)

    @property
    def compute_s(self) -> float:
        return sum(l.compute_s for l in self.layers) + self.head_s

    @property
    def total_s(self) -> float:
        return sum(l.total_s for l in self.layers) + self.head_s + self.overhead_s

    @property
    def overlap_s(self) -> float:
        """Time hidden by overlapping reads with compute."""
        return self.io_s + self.mm_s + self.compute_s + self.overhead_s - self.total_s

    @property
    def bytes_read(self) -> float:
        return sum(l.bytes_read for l in self.layers)

    def lines(self) -> list[str]:
        """The breakdown, like the paper's Table 3 (I/O, memory management, compute, total)."""
        ms = lambda s: f"{1e3 * s:8.2f} ms"  # noqa: E731
        kinds = {k: sum(l.kind == k for l in self.layers) for k in ("resident", "sparse", "stream", "mmap")}
        out = [f"  predicted per token: {ms(self.total_s).strip()}  ({1 / self.total_s:.1f} tok/s)"
               + (f", peak memory {self.peak_bytes / 2**20:,.0f} MiB" if self.peak_bytes else ""),
               f"    flash I/O            {ms(self.io_s)}   {self.bytes_read / 2**20:8.2f} MiB read",
               f"    memory management    {ms(self.mm_s)}",
               f"    compute              {ms(self.compute_s)}   (lm_head {1e3 * self.head_s:.2f} ms)",
               f"    fixed overheads      {ms(self.overhead_s)}",
               f"    hidden by overlap   -{ms(self.overlap_s).strip():>11s}",
               "    layers: " + ", ".join(f"{n} {k}" for k, n in kinds.items() if n)]
        return out + [f"    note: {n}" for n in self.notes]


class CostModel:
    """Predicts a decode token's time on one device at given thread counts."""

    def __init__(self, profile: DeviceProfile, *, compute_threads: int | None = None, io_threads: int = 4,
                 io: str = "direct", engine: str = "numba", layer_overhead_s: float = LAYER_OVERHEAD_S,
                 token_overhead_s: float = TOKEN_OVERHEAD_S, sparse_bookkeeping_s: float = SPARSE_BOOKKEEPING_S):
        self.profile = profile
        self.compute_threads = compute_threads or profile.cores
        self.io_threads = io_threads
        self.io = io
        self.engine = engine
        self.layer_overhead_s = layer_overhead_s
        self.token_overhead_s = token_overhead_s
        self.sparse_bookkeeping_s = sparse_bookkeeping_s
        table = profile.buffered if io == "buffered" and profile.buffered is not None else profile.direct
        self._table = table

    # -- primitives ---------------------------------------------------------------------------------
    def matvec_s(self, weights: float, storage: str, bytes_per_weight: float | None = None) -> float:
        g = self.profile.matvec_gweights_s(f"{self.engine}-{storage}", self.compute_threads, bytes_per_weight)
        return weights / (g * 1e9)

    def random_read_s(self, n_reads: float, read_bytes: int) -> float:
        """n_reads random reads of read_bytes, issued by the reader's threads in one batch."""
        if n_reads <= 0:
            return 0.0
        in_flight = max(1.0, min(float(self.io_threads), n_reads))
        return n_reads * read_bytes / (self._table.random_at(read_bytes, in_flight) * 1e6)

    def stream_s(self, nbytes: float) -> float:
        return nbytes / (self._table.sequential_at(self.io_threads) * 1e6)

    def dram_copy_s(self, nbytes: float) -> float:
        return 2 * nbytes / (self.profile.dram_gb_s_at(self.compute_threads) * 1e9)    # read + write

    # -- layers ----------------------------------------------------------------------------------------
    def layer(self, shape: ModelShape, kind: str, *, held_rows: float = 0.0, miss_rows: float = 0.0,
              predictor_weights: int = 0) -> LayerCost:
        attn_s = self.matvec_s(shape.attn_weights, shape.storage, shape.bytes_per_weight)
        if kind == "resident":
            ffn_s = self.matvec_s(shape.n_ff * shape.bundle_elems, shape.storage, shape.bytes_per_weight)
            return LayerCost(kind, shape.n_ff, 0.0, 0.0, 0.0, 0.0, attn_s + ffn_s, attn_s + ffn_s)
        if kind in ("stream", "mmap"):
            ffn_s = self.matvec_s(shape.n_ff * shape.bundle_elems, shape.storage, shape.bytes_per_weight)
            if kind == "stream":
                io_s = self.stream_s(shape.layer_bytes)
                total = max(io_s, attn_s + ffn_s)          # double-buffered: the read overlaps compute
            else:                                          # page faults through the page cache, serial
                buffered = self.profile.buffered or self._table
                io_s = shape.layer_bytes / (buffered.sequential_at(1) * 1e6)
                total = io_s + attn_s + ffn_s
            return LayerCost(kind, shape.n_ff, shape.n_ff, shape.layer_bytes, io_s, 0.0, attn_s + ffn_s, total)
        if kind != "sparse":
            raise ValueError(f"unknown layer kind {kind!r}")
        pred_s = self.matvec_s(predictor_weights, "f32", 4.0) if predictor_weights else 0.0
        held_s = self.matvec_s(max(0.0, held_rows - miss_rows) * shape.bundle_elems, shape.storage, shape.bytes_per_weight)
        new_s = self.matvec_s(miss_rows * shape.bundle_elems, shape.storage, shape.bytes_per_weight)
        io_s = self.random_read_s(miss_rows, shape.stride_bytes)
        mm_s = self.sparse_bookkeeping_s + self.dram_copy_s(miss_rows * shape.stride_bytes)
        compute = attn_s + pred_s + held_s + new_s
        total = attn_s + pred_s + mm_s + max(io_s, held_s) + new_s
        return LayerCost(kind, held_rows, miss_rows, miss_rows * shape.stride_bytes, io_s, mm_s, compute, total)

    def token(self, shape: ModelShape, layers: list[LayerCost], peak_bytes: int | None = None,
              notes: list[str] | None = None) -> TokenCost:
        head_s = self.matvec_s(shape.vocab * shape.d_model, shape.storage, shape.bytes_per_weight)
        overhead = self.token_overhead_s + self.layer_overhead_s * shape.n_layers
        return TokenCost(layers, head_s, overhead, peak_bytes, list(notes or []))


def plan_layers(model: CostModel, shape: ModelShape, plan, calibration: dict | None, pin: float = 0.0) -> list[LayerCost]:
    """The per-layer costs of a MemoryPlan (runtime/memory.py): its mode, layer kinds and window."""
    n = shape.n_layers
    if plan.mode == "dense":
        kinds = ["resident"] * n
    elif plan.mode == "mmap":
        kinds = ["mmap"] * n
    elif plan.mode in ("naive", "hybrid"):
        kinds = ["resident" if i in set(plan.resident_layers) else "stream" for i in range(n)]
    else:
        kinds = list(plan.layer_kinds)
    stats = (calibration or {}).get("layers") or [{} for _ in range(n)]
    out = []
    for i, kind in enumerate(kinds):
        if kind != "sparse":
            out.append(model.layer(shape, kind))
            continue
        w = stats[i].get("windows", {}).get(str(plan.window), {})
        n_pin = int(pin * shape.n_ff)
        capacity = plan.capacities[i] if plan.capacities else shape.n_ff
        # rows held: the window union (mean over calibration tokens) plus pinned rows, within the cache
        held = min(capacity, n_pin + w.get("mean_held", 1.0) * shape.n_ff)
        wanted = stats[i].get("predicted_fraction", 1.0) * shape.n_ff
        miss = w.get("miss_fraction", 1.0) * wanted
        if n_pin:   # pinned rows are the hottest: they never miss (a first-order correction)
            miss *= max(0.0, 1.0 - n_pin / max(1.0, wanted))
        out.append(model.layer(shape, "sparse", held_rows=held, miss_rows=miss,
                               predictor_weights=shape.predictor_weights[i] if shape.predictor_weights else 0))
    return out
