"""The cost model on hand-computed cases (a made-up device with round numbers)."""
from __future__ import annotations

import math

import pytest

from flashlm.runtime.cost_model import CostModel, ModelShape
from flashlm.runtime.device import parse_profile
from flashlm.runtime.memory import Placement

# 1 G weights/s for f16 at any thread count, 2 G for f32; DRAM 10 GB/s; flash: 4 KiB random reads at
# 40 MB/s on one thread and 160 MB/s with 4 in flight, 1 MiB at 400 / 800 MB/s, sequential 1000 MB/s;
# no per-call reader cost.
ROUND = {
    "device": {"name": "round", "measured": True, "cores": 2, "ram_bytes": 1 << 33},
    "flash": {"read_bytes": [4096, 1048576], "threads": [1, 4], "sequential_threads": [4],
              "sequential_1m_mb_s": [1000.0], "random_mb_s": {"4096": [40.0, 160.0], "1048576": [400.0, 800.0]},
              "reader_call_us": [0.0, 0.0]},
    "memory": {"threads": [2], "read_gb_s": [10.0]},
    "compute": {"threads": [2], "gweights_s": {"numba-f16": [1.0], "numba-f32": [2.0]}},
}
DEVICE = parse_profile(ROUND, "round.toml")

SHAPE = ModelShape(n_layers=2, d_model=100, n_ff=1000, vocab=500, attn_weights=40_000, bundle_elems=300,
                   stride_bytes=4096, storage="f16")


def t_read(size, threads):
    """ROUND's time per random read: linear in size between 4 KiB and 1 MiB (at 1 or 4 in flight)."""
    lo, hi = {1: (40e6, 400e6), 4: (160e6, 800e6)}[threads]
    t4, t1m = 4096 / lo, 1048576 / hi
    return t4 + (t1m - t4) * (size - 4096) / (1048576 - 4096)


def coalesced(u, total):
    """Reads of u random units (rows, or blocks) of `total` once adjacent ones are merged: a unit starts
    a read when the one before it is not wanted."""
    return max(1.0, u * (1 - u / total))


def model(io_threads=4, **kw):
    return CostModel(DEVICE, SHAPE, compute_threads=2, io_threads=io_threads, layer_overhead_s=0.0,
                     token_overhead_s=0.0, sparse_bookkeeping_s=0.0, **kw)


def test_resident_layer_is_its_matvecs():
    c = model().layer("resident")
    # attention 40k + FFN 1000 rows x 300 weights = 340k f16 weights at 1 G/s = 340 us, nothing read
    assert c.compute_s == pytest.approx(340e-6) and c.total_s == pytest.approx(340e-6)
    assert c.io_busy_s == 0 and c.bytes_read == 0


def test_streamed_layer_overlaps_its_read_with_compute():
    c = model().layer("stream")
    # 1000 rows x 4096 B = 4.096 MB at 1000 MB/s = 4.096 ms, which hides the 340 us of compute
    assert c.io_busy_s == pytest.approx(4.096e-3)
    assert c.io_wait_s == pytest.approx(4.096e-3 - 340e-6)      # the compute thread waits for the rest
    assert c.total_s == pytest.approx(4.096e-3)
    assert c.bytes_read == 4096 * 1000


def test_sparse_layer_by_hand():
    c = model().layer("sparse", held_rows=300, miss_rows=50, predictor_weights=10_000)
    # reads: 50 random rows of 1000 are 50 x 0.95 = 47.5 reads (adjacent rows merge) of 50 x 4 KiB / 47.5
    # = 4311 B each, with 4 in flight
    reads = coalesced(50, 1000)
    assert reads == pytest.approx(47.5)
    assert c.io_busy_s == pytest.approx(reads * t_read(50 * 4096 / reads, 4))
    # compute: attention 40 us + predictor 10k f32 at 2 G/s = 5 us + held 250 rows x 300 = 75 us + new 50 x 300 = 15 us
    assert c.compute_s == pytest.approx(40e-6 + 5e-6 + 75e-6 + 15e-6)
    # memory management: swap copies of 50 rows, read + written at 10 GB/s = 2 x 204800 / 1e10
    assert c.mm_s == pytest.approx(2 * 50 * 4096 / 10e9)
    # the read overlaps the held rows' compute: attention + predictor + mm + max(io, held) + new rows
    assert c.total_s == pytest.approx(40e-6 + 5e-6 + c.mm_s + max(c.io_busy_s, 75e-6) + 15e-6)
    assert c.io_wait_s == pytest.approx(c.io_busy_s - 75e-6)


def test_few_missing_rows_cannot_use_every_reader_thread():
    one = model().layer("sparse", held_rows=10, miss_rows=1)
    # one row is one read in flight: 4096 B at the 1-thread 40 MB/s
    assert one.io_busy_s == pytest.approx(4096 / 40e6)
    two = model(io_threads=1).layer("sparse", held_rows=300, miss_rows=50)
    assert two.io_busy_s == pytest.approx(47.5 * t_read(50 * 4096 / 47.5, 1))


def test_adjacent_rows_are_one_read_and_a_gap_merges_more():
    m = model()
    # every row of the layer: one read (a run of 1000 rows), not 1000
    assert m.shape.row_runs(1000) == pytest.approx(1.0)
    # 500 of 1000: 500 x 0.5 = 250 reads; with an 8 KiB gap (2 rows), a row starts a read only when
    # none of the 3 before it is wanted: 500 x 0.5^3 = 62.5
    assert m.shape.row_runs(500) == pytest.approx(250.0)
    assert m.shape.row_runs(500, gap_bytes=8192) == pytest.approx(62.5)
    # 8 KiB rows: units are rows; a 4 KiB gap is less than a row, so it merges nothing more
    big = ModelShape(2, 100, 1000, 500, 40_000, 300, 8192, "f16")
    assert big.row_runs(500, gap_bytes=4096) == pytest.approx(250.0)
    # the time: 250 reads of 8 KiB with 4 in flight
    assert m.rows_seconds(500) == pytest.approx(250 * t_read(8192, 4))


def test_token_adds_lm_head_and_overheads():
    m = CostModel(DEVICE, SHAPE, compute_threads=2, io_threads=4, layer_overhead_s=10e-6, token_overhead_s=100e-6,
                  sparse_bookkeeping_s=0.0)
    layers = [m.layer("resident"), m.layer("stream")]
    t = m.token(layers)
    # lm_head 500 x 100 = 50k weights = 50 us; overheads 100 + 2 x 10 us
    assert t.head_s == pytest.approx(50e-6)
    # the ring reads the streamed layer while the whole token computes: the resident layer 340 us, the
    # streamed layer's kernel 340 us, lm_head 50 us, overheads 120 us = 850 us hide under the 4.096 ms read
    rest = 340e-6 + 340e-6 + 50e-6 + 120e-6
    assert t.total_s == pytest.approx(4.096e-3)
    assert t.overlap_s == pytest.approx(rest)
    text = "\n".join(t.lines())
    assert "flash I/O" in text and "memory management" in text and "1 resident, 1 stream" in text
    ms = t.per_token_ms()      # the runtime's accounting fields
    assert ms["io_busy_ms"] == pytest.approx(4.096) and ms["io_wait_ms"] == pytest.approx(1e3 * (4.096e-3 - rest))
    assert ms["compute_ms"] == pytest.approx(0.340 + 0.340 + 0.050)
    assert ms["total_ms"] == pytest.approx(ms["compute_ms"] + ms["mem_ms"] + ms["io_wait_ms"] + ms["overhead_ms"])
    # without the pipeline a streamed layer's read starts when the layer runs: all of it is waited for
    serial = CostModel(DEVICE, SHAPE, compute_threads=2, io_threads=4, layer_overhead_s=10e-6,
                       token_overhead_s=100e-6, sparse_bookkeeping_s=0.0, pipeline=False)
    assert serial.token([serial.layer("resident"), serial.layer("stream")]).total_s == pytest.approx(4.096e-3 + rest)
    # compute beyond the read: nothing waited for
    fast = CostModel(DEVICE, SHAPE, compute_threads=2, io_threads=4, layer_overhead_s=0.0, token_overhead_s=0.0,
                     sparse_bookkeeping_s=0.0)
    many = fast.token([fast.layer("resident")] * 20 + [fast.layer("stream")])
    assert many.io_wait_s == 0 and many.total_s == pytest.approx(21 * 340e-6 + 50e-6)


def test_measured_reader_calls_cache_steps_and_row_kernel():
    """What the probe measures beyond raw reads: each reader call's hand-off (at the reader's thread
    count), the neuron cache's step (fixed + per wanted neuron), and the FFN row kernel's own speed
    (numba-bundle-f16), which the FFN rows use instead of the matmul's."""
    import copy
    data = copy.deepcopy(ROUND)
    data["flash"]["reader_call_us"] = [10.0, 50.0]
    data["compute"].update(cache_step_us=20.0, cache_step_row_us=0.01)
    data["compute"]["gweights_s"]["numba-bundle-f16"] = [0.5]
    dev = parse_profile(data, "measured.toml")
    m = CostModel(dev, SHAPE, compute_threads=2, io_threads=4, layer_overhead_s=0.0, token_overhead_s=0.0)
    c = m.layer("sparse", held_rows=300, miss_rows=50, wanted_rows=100)
    # 50 us per call at 4 readers + 47.5 merged reads of 4311 B
    assert c.io_busy_s == pytest.approx(50e-6 + 47.5 * t_read(50 * 4096 / 47.5, 4))
    # the measured cache step: 20 us + 100 wanted x 0.01 us, and the swap copies of 50 rows at 10 GB/s
    assert c.mm_s == pytest.approx(20e-6 + 1e-6 + 2 * 50 * 4096 / 10e9)
    # the rows through the row kernel at 0.5 G/s: 300 x 300 / 0.5e9 = 180 us; attention at the matmul's 1 G/s
    assert c.compute_s == pytest.approx(40e-6 + 300 * 300 / 0.5e9)
    # a streamed layer is one sequential read: no per-call cost on top of 4.096 MB at 1000 MB/s
    assert m.layer("stream").io_busy_s == pytest.approx(4.096e-3)
    # the per-token fallback: streaming (4.096 ms) beats one call (50 us, paid once, not per row) + the
    # merged reads of n rows from the first n where they take longer
    first = next(n for n in range(1, 1001) if 50e-6 + coalesced(n, 1000) * t_read(4096 * n / coalesced(n, 1000), 4)
                 > 4.096e-3)
    assert not m.stream_is_cheaper(first - 1) and m.stream_is_cheaper(first)
    assert m.rows_seconds(first - 1) < m.layer_stream_s < m.rows_seconds(first)
    # one reader thread: the 1-thread call cost
    assert CostModel(dev, SHAPE, io_threads=1).rows_seconds(1) == pytest.approx(10e-6 + 4096 / 40e6)
    # rows of 2 KiB cost a 4 KiB block each (direct reads are whole blocks), two rows to a block: 3
    # random rows of 1000 touch 500 x (1 - (1 - 3/1000)^2) = 2.9955 blocks (two may share one)
    half = CostModel(dev, ModelShape(2, 100, 1000, 500, 40_000, 300, 2048, "f16"), io_threads=1)
    blocks = 500 * (1 - (1 - 3 / 1000) ** 2)
    reads = coalesced(blocks, 500)               # blocks, merged when adjacent
    assert half.rows_seconds(3) == pytest.approx(10e-6 + reads * t_read(blocks * 4096 / reads, 1))
    assert half.layer("sparse", held_rows=10, miss_rows=3).bytes_read == pytest.approx(blocks * 4096)
    # every row of the layer: every block once
    assert half.shape.row_reads(1000) == pytest.approx(500)
    # no figure for the row kernel: the matmul's
    assert model().layer("resident").compute_s == pytest.approx(340e-6)


def test_streamed_layers_go_at_the_ring_rate_of_their_ring_size():
    """With the probe's ring figures, a streamed layer goes at the rate measured through a ring of the
    plan's size (interpolated in log2 of the fraction between measured sizes, held outside them);
    without the by-size table, at reader_stream_mb_s for every size. Rows: one call's hand-off plus
    reads at the probe's time per read in a reader call."""
    import copy
    from types import SimpleNamespace
    data = copy.deepcopy(ROUND)
    data["flash"].update(reader_call_us=[10.0, 50.0], reader_row_us=[100.0, 40.0], reader_stream_mb_s=[300.0, 500.0])
    old = parse_profile(data, "old.toml")
    m = CostModel(old, SHAPE, compute_threads=2, io_threads=4)
    assert m.layer_stream_s == pytest.approx(4.096e6 / 500e6)
    assert m.layer("stream", ring_rows=250).io_busy_s == pytest.approx(4.096e6 / 500e6)     # no by-size figures
    # rows: one call (50 us at 4 readers) + 47.5 merged reads x 40 us x what the raw table says a read
    # of 50 x 4 KiB / 47.5 costs more than one of 4 KiB
    size = 50 * 4096 / 47.5
    assert m.rows_seconds(50) == pytest.approx(50e-6 + 47.5 * 40e-6 * t_read(size, 4) / t_read(4096, 4))
    assert m.rows_seconds(1) == pytest.approx(50e-6 + 100e-6)       # one read: one in flight, the 1-thread figures
    # 8 KiB rows: 4 KiB's measured time x what the raw table says an 8 KiB read costs more
    big = CostModel(old, ModelShape(2, 100, 1000, 500, 40_000, 300, 8192, "f16"), io_threads=4)
    size = 50 * 8192 / 47.5
    assert big.rows_seconds(50) == pytest.approx(50e-6 + 47.5 * 40e-6 * t_read(size, 4) / t_read(4096, 4))

    data["flash"]["ring_stream_mb_s"] = {"1": [300.0, 600.0], "4": [200.0, 400.0], "16": [100.0, 200.0]}
    dev = parse_profile(data, "rings.toml")
    m = CostModel(dev, SHAPE, compute_threads=2, io_threads=4, layer_overhead_s=0.0, token_overhead_s=0.0)
    assert m.layer_stream_s == pytest.approx(4.096e6 / 600e6)                  # the full ring's row
    assert m.layer("stream", ring_rows=250).io_busy_s == pytest.approx(4.096e6 / 400e6)    # 1/4
    assert m.layer("stream", ring_rows=500).io_busy_s == pytest.approx(4.096e6 / 500e6)    # 1/2: halfway in log2
    assert m.layer("stream", ring_rows=32).io_busy_s == pytest.approx(4.096e6 / 200e6)     # below 1/16: held
    assert m.layer("stream", ring_rows=1000).io_busy_s == pytest.approx(4.096e6 / 600e6)
    # 2.5 reader threads: halfway (in log2) between 1 and 4 of each row... at 1/4: 200 -> 400
    assert CostModel(dev, SHAPE, io_threads=2).layer("stream", ring_rows=250).io_busy_s == pytest.approx(
        4.096e6 / 300e6)
    # a plan prices its streamed layers at its ring: 2 x 4.096 MB through a quarter ring at 400 MB/s
    plan = SimpleNamespace(layers=[SimpleNamespace(placement=Placement.STREAM)] * 2, window=0, total=0,
                           stream_buffer_rows=250)
    quarter = m.plan_cost(plan)
    assert quarter.io_busy_s == pytest.approx(2 * 4.096e6 / 400e6)
    assert quarter.ring_fraction == 4 and "1/4 ring: 400 MB/s (a whole-layer ring: 600)" in quarter.notes[-1]
    plan.stream_buffer_rows = 1000
    assert m.plan_cost(plan).io_busy_s == pytest.approx(2 * 4.096e6 / 600e6) and m.plan_cost(plan).ring_fraction == 1
    # buffered reads keep the raw buffered/direct table (the ring figures are direct reads)
    assert CostModel(dev, SHAPE, io_threads=4, io="buffered").layer_stream_s == pytest.approx(4.096e-3)


def test_pinned_rows_save_the_misses_of_the_neurons_they_hold():
    from flashlm.runtime.cost_model import pinned_miss_share
    # 10% of neurons selected per token, the hottest 5% carrying half of it: the hot group is selected
    # with p = 0.5 x 0.1 / 0.05 = 1.0 per token... take 40% of it instead: p_hot = 0.4 x 0.1 / 0.05 = 0.8,
    # p_cold = 0.6 x 0.1 / 0.95 = 0.06316
    stats = {"predicted_fraction": 0.1, "hot_top5pct_share": 0.4, "windows": {"1": {"miss_fraction": 0.6}}}
    p_h, p_c = 0.8, 0.6 * 0.1 / 0.95
    m_h1, m_c1 = 0.05 * p_h * (1 - p_h), 0.95 * p_c * (1 - p_c)          # misses of a 1-token window
    assert pinned_miss_share(stats, 0.05, 1) == pytest.approx(m_h1 / (m_h1 + m_c1))
    # half the hot group pinned: half its misses
    assert pinned_miss_share(stats, 0.025, 1) == pytest.approx(0.5 * m_h1 / (m_h1 + m_c1))
    # 24% pinned: the hot group and a fifth of the cold one
    assert pinned_miss_share(stats, 0.24, 1) == pytest.approx((m_h1 + 0.2 * m_c1) / (m_h1 + m_c1))
    # at an 8-token window the hot neurons are almost always still held: pinning them saves little
    m_h8, m_c8 = 0.05 * p_h * (1 - p_h) ** 8, 0.95 * p_c * (1 - p_c) ** 8
    assert pinned_miss_share(stats, 0.05, 8) == pytest.approx(m_h8 / (m_h8 + m_c8)) and m_h8 / (m_h8 + m_c8) < 0.001
    assert pinned_miss_share(stats, 0.0, 1) == 0.0 and pinned_miss_share(stats, 1.0, 1) == 1.0
    assert pinned_miss_share({}, 0.1, 1) == pytest.approx(0.1)           # no calibrated skew: all alike
    m = model()
    # 1000 neurons, 10% selected, 60% of those missed at window 1 = 60 rows, less the pinned share
    assert m.missed_rows(stats, 1) == pytest.approx(60.0)
    assert m.missed_rows(stats, 1, pin_rows=50) == pytest.approx(60.0 * (1 - m_h1 / (m_h1 + m_c1)))
    # pinning more rows than the layer selects still leaves the misses outside the pinned set
    assert m.missed_rows(stats, 1, pin_rows=200) > 0


def test_missing_engine_figures_follow_the_dram_bound():
    m = CostModel(DEVICE, SHAPE, compute_threads=2, engine="ort")
    # no ort-f16 figures: 10 GB/s over 2 bytes per weight = 5 G weights/s
    assert m.matvec_s(5e9, "f16", 2.0) == pytest.approx(1.0)


def test_placement_decisions_use_the_same_flash_figures():
    """The planner's and the sparse path's questions are answered from the figures the pricing uses."""
    m = model()
    # a whole layer: 4.096 MB at 1000 MB/s
    assert m.layer_stream_s == pytest.approx(4.096e-3)
    assert m.rows_seconds(50) == pytest.approx(m.layer(Placement.SPARSE, held_rows=300, miss_rows=50).io_busy_s)
    # streaming beats scattered reads from the first n whose merged reads take longer
    first = next(n for n in range(1, 1001) if coalesced(n, 1000) * t_read(4096 * n / coalesced(n, 1000), 4) > 4.096e-3)
    assert not m.stream_is_cheaper(first - 1) and m.stream_is_cheaper(first)
    assert not m.stream_is_cheaper(1) and not m.stream_is_cheaper(0)
    slow = CostModel(DEVICE, ModelShape(2, 100, 2, 500, 40_000, 300, 4096, "f16"), io_threads=4)
    # a 2-row layer streams in 8 us; 1 scattered row at 40 MB/s takes 102 us: stream from 1 row on
    assert slow.stream_is_cheaper(1) and not slow.stream_is_cheaper(0)


def test_the_builder_shares_one_cost_model_with_the_planner_and_the_sparse_path(tmp_path):
    import importlib.util
    from pathlib import Path

    from flashlm.converters.writer import write_model
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.model import Model
    from flashlm.runtime.modelfile import open_folder
    spec = importlib.util.spec_from_file_location("make_synthetic", Path(__file__).parent.parent / "tools" / "make_synthetic.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)        # a synthetic model: this module stays torch-free (aarch64 check)
    src = ms.SyntheticReluSource(d_model=64, n_layers=2, n_ff=128, n_heads=4, vocab=100, max_position=64,
                                 predictor_rank=8, seed=0)
    folder = open_folder(write_model(src, tmp_path / "m.flashlm", progress=False))
    model = Model(folder, RuntimeConfig(mode="naive", io="buffered"))
    try:
        assert model.costs.source == "built-in defaults"
        cost = model.costs.plan_cost(model.plan)
        assert [l.kind for l in cost.layers] == ["stream"] * folder.config.n_layers
        assert cost.bytes_read == folder.config.n_layers * folder.bundles.layer_bytes
        assert cost.peak_bytes > model.plan.total
    finally:
        model.close()


def test_a_cache_smaller_than_its_window_reads_the_rest_again():
    """The planner shrinks sparse caches to fit a budget; a cache holding a tenth of its window's union
    keeps a tenth of the rows the window would have kept, and reads the rest every token."""
    from types import SimpleNamespace

    from flashlm.runtime.predictor import Calibration
    stats = {"predicted_fraction": 0.5, "windows": {"2": {"mean_held": 0.8, "miss_fraction": 0.2}}}
    cal = Calibration([0, 0], {"layers": [stats, stats]})
    m = model()

    def plan(cache_rows):
        layer = SimpleNamespace(placement=Placement.SPARSE, cache_rows=cache_rows, window=0)
        return SimpleNamespace(layers=[layer, layer], window=2, total=0)
    # 1000 neurons: 500 wanted, 100 missed by the window; its union holds 800 rows
    full = m.plan_cost(plan(1000), cal)
    assert [l.rows_read for l in full.layers] == pytest.approx([100.0, 100.0])
    # 80 rows of cache: a tenth of the union, so 10% of the 400 the window keeps stay: 500 - 40 read
    small = m.plan_cost(plan(80), cal)
    assert [l.rows_read for l in small.layers] == pytest.approx([460.0, 460.0])
    assert small.io_busy_s > full.io_busy_s


def test_reads_in_flight_slow_compute_down():
    """The probe's compute-with-reads figures: a rows call costs the compute thread its measured time
    (at the reader's thread count), and compute that overlaps the ring streamer's reads runs slower."""
    import copy
    data = copy.deepcopy(ROUND)
    data["compute"]["stream_slowdown"] = {"1": [1.5], "4": [2.0]}
    data["compute"]["reader_call_compute_us"] = {"1": [100.0], "4": [300.0]}
    dev = parse_profile(data, "contended.toml")
    m = CostModel(dev, SHAPE, compute_threads=2, io_threads=4, layer_overhead_s=0.0, token_overhead_s=0.0,
                  sparse_bookkeeping_s=0.0)
    # a sparse layer that reads: + 300 us of compute for its call at 4 readers; one that reads nothing: none
    assert m.layer("sparse", held_rows=300, miss_rows=50).compute_s == pytest.approx(
        model().layer("sparse", held_rows=300, miss_rows=50).compute_s + 300e-6)
    assert m.layer("sparse", held_rows=300, miss_rows=0).compute_s == pytest.approx(
        model().layer("sparse", held_rows=300, miss_rows=0).compute_s)
    # a resident and a streamed layer: compute 340 + 340 us + lm_head 50k weights (50 us) = 730 us, all
    # of it under the 4.096 ms of streamed reads, so 2x: 730 us more; the token still waits for the reads
    t = m.token([m.layer("resident"), m.layer("stream")])
    assert t.contention_s == pytest.approx(730e-6) and t.compute_s == pytest.approx(2 * 730e-6)
    assert t.total_s == pytest.approx(4.096e-3)
    # one reader thread: 1.5x; a token without streamed layers: no slowdown
    one = CostModel(dev, SHAPE, compute_threads=2, io_threads=1, layer_overhead_s=0.0, token_overhead_s=0.0)
    assert one.token([one.layer("resident"), one.layer("stream")]).contention_s == pytest.approx(0.5 * 730e-6)
    assert m.token([m.layer("resident"), m.layer("resident")]).contention_s == 0.0
