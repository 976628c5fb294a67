"""Memory as a device sees it: a memory cgroup charges RSS and page cache; files read once are dropped."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from flashlm.runtime.cgroup import CgroupError, MemoryCgroup, run_capped
from flashlm.runtime.pagecache import drop_file

MiB = 1 << 20
READER = r'''
import os, sys
from flashlm.runtime.pagecache import drop_cached
path, drop = sys.argv[1], sys.argv[2] == "1"
buf = bytearray(1 << 20)
with open(path, "rb", buffering=0) as f:
    off = 0
    while n := f.readinto(buf):
        off += n
        if drop:
            drop_cached(f.fileno(), 0, off)   # as runtime/modelfile.read_verified does
'''


@pytest.fixture(scope="module")
def cgroups():
    try:
        MemoryCgroup.create(64 * MiB).remove()
    except CgroupError as e:
        pytest.skip(f"memory cgroups are not available here: {e}")


def test_cap_is_enforced_and_peak_reported(cgroups):
    alloc = "import numpy as np; a = np.ones({n} << 18, np.float32); a += 1"
    proc, use = run_capped([sys.executable, "-c", alloc.format(n=20)], 200 * MiB, capture_output=True)
    assert proc.returncode == 0 and not use.hit_cap and 20 * MiB < use.peak < 200 * MiB
    proc, use = run_capped([sys.executable, "-c", alloc.format(n=400)], 200 * MiB, capture_output=True)
    assert proc.returncode != 0 and use.hit_cap and use.oom_kills >= 1


def test_page_cache_is_charged_unless_dropped(cgroups, tmp_path):
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 255, 96 * MiB, dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())                  # dirty pages cannot be dropped; written-back ones can
    peaks = {}
    # Dropping first: the libraries both children load are then charged to the first one, which only
    # makes the not-dropping run look smaller.
    for drop in ("1", "0"):
        drop_file(path)                       # cold: the child's reads, not ours, bring the pages in
        proc, use = run_capped([sys.executable, "-c", READER, str(path), drop], 1024 * MiB, capture_output=True)
        assert proc.returncode == 0, proc.stderr
        peaks[drop] = use.peak
    if peaks["0"] < 96 * MiB:
        pytest.skip(f"this file system's page cache is not charged to the reader (peak {peaks['0'] / MiB:.0f} MiB)")
    assert peaks["1"] < peaks["0"] - 64 * MiB, peaks   # dropped chunk by chunk: at most a chunk stays cached


def _cached_bytes(path) -> int:
    """Bytes of `path` in the page cache (mincore over a fresh mapping, which itself faults nothing in)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    view = np.frombuffer(m, np.uint8)
    try:
        addr = view.__array_interface__["data"][0]
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
        return sum(v & 1 for v in vec) * mmap.PAGESIZE
    finally:
        del view
        m.close()


def test_read_verified_leaves_nothing_cached(tmp_path):
    import hashlib
    from types import SimpleNamespace
    from flashlm.runtime.modelfile import read_verified
    data = np.random.default_rng(1).integers(0, 255, 40 * MiB, dtype=np.uint8).tobytes()
    path = tmp_path / "dense.safetensors"
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    folder = SimpleNamespace(file=lambda name: path,
                             files={"dense.safetensors": SimpleNamespace(sha256=hashlib.sha256(data).hexdigest())})
    drop_file(path)
    path.read_bytes()                         # control: a plain read leaves the file cached
    if _cached_bytes(path) < 32 * MiB:
        pytest.skip("this file system does not keep read pages in the page cache")
    drop_file(path)
    assert bytes(read_verified(folder, "dense.safetensors")) == data
    assert _cached_bytes(path) == 0


def test_bench_cgroup_rows(cgroups, tmp_path):
    """`flashlm bench --cgroup`: each mode's row carries its cgroup's peak; a cap too small is reported."""
    import json
    import subprocess
    import tiny_models as tm
    from flashlm.converters.convert import convert
    folder = convert(tm.make_llama(tmp_path / "hf", tied=True), tmp_path / "m.flashlm", progress=False)
    run = lambda cap: subprocess.run([sys.executable, "-m", "flashlm", "bench", str(folder), "--mode", "dense,naive",
                                      "-p", "0", "-n", "4", "-r", "1", "--ctx", "64", "--json", "--cgroup", cap],
                                     capture_output=True, text=True)
    rows = [json.loads(line) for line in run("2GiB").stdout.splitlines()]
    assert [r["mode"] for r in rows] == ["dense", "naive"]
    for r in rows:
        assert r["cgroup_limit"] == 2 << 30 and 20 * MiB < r["cgroup_peak"] < 2 << 30 and not r["cgroup_hit_cap"]
        # (peak RSS may exceed the group's charge: shared-library pages another process cached first are
        # charged to that process's group, not to this child)
    proc = run("40MiB")                     # Python + numba alone need more: every run is killed at the cap
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode != 0 and len(rows) == 2
    assert all("killed at the cgroup cap" in r["error"] and r["cgroup_hit_cap"] for r in rows)


# --- a whole-process memory limit: the planner, embeddings read per token, numba over quantized rows ----
IDS = [1, 5, 17, 42, 7, 99, 3, 8, 250, 11, 64, 0, 2, 180]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    import tiny_models as tm
    from flashlm.converters.convert import convert
    d = tmp_path_factory.mktemp("untied")
    src = tm.make_llama(d / "hf", tied=False)
    return src, convert(src, d / "f16.flashlm", dtype="f16", progress=False), \
        convert(src, d / "q8.flashlm", dtype="q8_0", progress=False)


def _run(folder, **rt):
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.model import Model
    from flashlm.runtime.modelfile import open_folder
    model = Model(open_folder(folder), RuntimeConfig(ctx_len=64, kv_dtype="f32", **rt))
    try:
        pre = model.forward(IDS[:5], all_logits=True)
        dec = [model.forward([t])[0] for t in IDS[5:]]
        return np.concatenate([pre, np.stack(dec)]), model.plan
    finally:
        model.close()


def test_memory_limit_counts_the_runtime_and_refuses_before_loading(untied):
    from flashlm.runtime.builder import activation_bytes
    from flashlm.runtime.config import RuntimeConfig
    from flashlm.runtime.memory import LATE_RUNTIME_BYTES, BudgetError, plan_memory, stream_ring_bytes, whole_layer_bytes
    from flashlm.runtime.modelfile import open_folder
    folder = open_folder(untied[1])
    act = activation_bytes(folder, 1)
    runtime = 150 * MiB
    rt = RuntimeConfig(mode="naive", ctx_len=64, memory_limit="400MiB")
    plan = plan_memory(folder, rt, activations=act, runtime_bytes=runtime)
    assert plan.memory_limit == 400 * MiB and plan.runtime == runtime + LATE_RUNTIME_BYTES
    assert plan.budget == 400 * MiB - plan.runtime and plan.process_total == plan.runtime + plan.total
    assert plan.embeddings_from_file and plan.dense == sum(t.nbytes for t in folder.dense.values()) \
        - folder.dense["tok_embeddings"].nbytes
    # Short of whole-layer buffers, naive streams through smaller ones, down to 1/16 of a layer each;
    # a limit 1 byte below that is refused before loading, naming what does not fit.
    need = plan.process_total
    c, stride = folder.config, folder.bundles.stride_bytes
    assert plan.stream_buffer_rows == c.n_ff
    smallest = -(-c.n_ff // 16)
    minimal = need - plan.scratch + stream_ring_bytes(folder, smallest)      # the ring of two 1/16 layers
    low = lambda limit: plan_memory(folder, RuntimeConfig(mode="naive", ctx_len=64, memory_limit=str(limit)),
                                    activations=act, runtime_bytes=runtime)
    assert low(need - 1).stream_buffer_rows < c.n_ff
    tight = low(minimal)
    assert tight.stream_buffer_rows >= smallest and tight.process_total == minimal   # (rounded to whole blocks)
    with pytest.raises(BudgetError, match=r"memory limit .* too small for naive mode: it needs .*runtime"):
        low(minimal - 1)
    with pytest.raises(BudgetError, match="does not fit the runtime itself"):
        plan_memory(folder, rt, activations=act, runtime_bytes=400 * MiB)
    # hybrid keeps as many layers resident as the limit leaves room for
    layer = whole_layer_bytes(folder)[1]
    hyb = plan_memory(folder, RuntimeConfig(mode="hybrid", ctx_len=64, memory_limit=str(need + layer)),
                      activations=act, runtime_bytes=runtime)
    assert hyb.process_total <= need + layer and hyb.count(hyb.layers[0].placement.__class__("resident")) >= 1


def test_embedding_rows_from_the_file_equal_resident(untied):
    for folder in untied[1:]:
        ref, p0 = _run(folder, mode="naive", embeddings="resident", dense_engine="numba")
        got, p1 = _run(folder, mode="naive", embeddings="flash", dense_engine="numba")
        assert not p0.embeddings_from_file and p1.embeddings_from_file
        assert p0.dense - p1.dense == __import__("flashlm.runtime.modelfile", fromlist=["x"]).open_folder(
            folder).dense["tok_embeddings"].nbytes
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)


def test_numba_over_quantized_rows_equals_onnxruntime_f32(untied):
    """The same q8_0 weights through numba (qmatmul over the stored rows) and through onnxruntime's
    MatMulNBits with f32 activations: the same function up to float summation order."""
    q8 = untied[2]
    ort, _ = _run(q8, mode="naive", dense_engine="onnxruntime", activations="f32")
    nb, _ = _run(q8, mode="naive", dense_engine="numba")
    assert np.abs(nb - ort).max() <= 1e-4 * max(1.0, np.abs(ort).max())


@pytest.mark.parametrize("storage", ["q4_0", "q4_1", "q8_0", "q8_0.b16f32", "q4_1.f32"])
def test_qmatmul_equals_the_reference_decoding(storage):
    from flashlm.runtime import quant as Q
    from flashlm.runtime.qmatmul import QDense
    from flashlm.runtime.storage import STORAGE_TYPES, block_format
    rng = np.random.default_rng(3)
    st = STORAGE_TYPES[storage]
    n, k = 131, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    if storage in Q.QUANTIZE_TYPES:
        rows = st.encode(w)
    else:                                   # GGUF-only layouts: random codes, scales and mins
        fmt = block_format(st)
        rows = rng.integers(0, 255, (n, fmt.row_bytes(k)), dtype=np.uint8)
        qt = Q.from_rows(rows, fmt, k)
        qt.scales[:] = rng.standard_normal(qt.scales.shape).astype(qt.scales.dtype)
        if qt.mins is not None:
            qt.mins[:] = rng.standard_normal(qt.mins.shape).astype(qt.mins.dtype)
    ref = st.decode(rows)
    for T in (1, 3, 9):
        x = rng.standard_normal((T, k)).astype(np.float32)
        out = np.empty((T, n), np.float32)
        QDense.from_stored(rows, st, k).matmul(x, out)
        np.testing.assert_allclose(out, x @ ref.T, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_tie_embeddings_drops_lm_head(tmp_path, untied):
    """convert --tie-embeddings: one matrix; the model equals transformers with lm_head set to it."""
    import torch
    import tiny_models as tm
    from flashlm.converters.convert import convert
    from flashlm.runtime.modelfile import open_folder
    src = untied[0]
    ref_model = tm.load_reference(src)
    with torch.no_grad():
        ref_model.lm_head.weight.copy_(ref_model.model.embed_tokens.weight)
        ref = ref_model(torch.tensor([IDS])).logits[0].numpy()
    out = convert(src, tmp_path / "tied.flashlm", dtype="f32", progress=False, tie_embeddings=True)
    folder = open_folder(out)
    assert folder.config.tied_embeddings and "lm_head" not in folder.dense
    got, _ = _run(out, mode="dense")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
