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
        if drop:
            drop_cached(f.fileno(), off, n)
        off += n
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
    for drop in ("0", "1"):
        drop_file(path)                       # cold: the child's reads, not ours, bring the pages in
        proc, use = run_capped([sys.executable, "-c", READER, str(path), drop], 1024 * MiB, capture_output=True)
        assert proc.returncode == 0, proc.stderr
        peaks[drop] = use.peak
    if peaks["0"] < 96 * MiB:
        pytest.skip(f"this file system's page cache is not charged to the reader (peak {peaks['0'] / MiB:.0f} MiB)")
    assert peaks["1"] < peaks["0"] - 64 * MiB, peaks   # dropped chunk by chunk: at most a chunk stays cached
