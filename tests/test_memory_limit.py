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
