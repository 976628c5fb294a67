"""Device profiles: the shipped ones parse, bad ones fail naming the key, the probe writes one that loads."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

from flashlm.runtime import device as D
from flashlm.runtime import probe as P

GOOD = {
    "device": {"name": "t", "measured": False, "cores": 4, "ram_bytes": 8 << 30, "sources": ["https://example.org/m"]},
    "flash": {"read_bytes": [4096, 65536], "threads": [1, 4], "sequential_threads": [1],
              "sequential_1m_mb_s": [800.0], "random_mb_s": {"4096": [40.0, 120.0], "65536": [300.0, 700.0]}},
    "memory": {"threads": [1, 4], "read_gb_s": [5.0, 11.0]},
    "compute": {"threads": [1, 4], "gweights_s": {"numba-f16": [2.0, 6.0]}},
}


def test_every_shipped_profile_parses_and_cites_its_figures():
    names = D.shipped_profiles()
    for want in ("laptop-nvme", "rpi5-8gb-nvme", "rpi5-8gb-sd", "rpi5-4gb-nvme", "rpi5-4gb-sd",
                 "jetson-orin-nano-8gb", "phone-ufs4", "this-machine-2core"):
        assert want in names
    for name in names:
        p = D.load_profile(name)
        assert p.name == name
        if not p.measured:
            assert p.sources and all(s.startswith("http") for s in p.sources), name
        assert p.memory_bytes <= p.ram_bytes
        # a 16 KiB row costs no less than a 4 KiB one, and is never faster than the sequential rate
        sp = p.flash_speeds(4)
        assert sp.random_seconds(16384) >= 0.99 * sp.random_seconds(4096) > 0
        assert 16384 / sp.random_seconds(16384) <= sp.sequential_mb_s * 1e6 * 1.0001
    assert D.load_profile("this-machine-2core").measured


def test_interpolation_hand_computed():
    p = D.parse_profile(copy.deepcopy(GOOD))
    # threads 2 lies halfway between 1 and 4 in log2: 40 + (120 - 40) * 0.5 = 80 MB/s at 4 KiB
    assert p.direct.random_at(4096, 2) == pytest.approx(80.0)
    # 16 KiB at 4 threads: the time per read is linear in size between 4 KiB (4096 B / 120 MB/s) and
    # 64 KiB (65536 B / 700 MB/s), a fifth of the way: 34.13 + (93.62 - 34.13) * 0.2 = 46.03 us
    t16 = 4096 / 120e6 + (65536 / 700e6 - 4096 / 120e6) * (16384 - 4096) / (65536 - 4096)
    assert p.direct.random_at(16384, 4) == pytest.approx(16384 / t16 / 1e6)
    assert p.direct.random_at(1 << 20, 64) == pytest.approx(700.0)      # clamped at both ends
    assert p.matvec_gweights_s("numba-f16", 2) == pytest.approx(4.0)
    # a kind without figures follows the DRAM bound: 11 GB/s over 4 bytes per f32 weight
    assert p.matvec_gweights_s("numba-f32", 4) == pytest.approx(11.0 / 4)
    # FlashSpeeds at 4 threads gives the same time per 16 KiB read
    assert p.flash_speeds(4).random_seconds(16384) == pytest.approx(t16)


def _broken(edit):
    d = copy.deepcopy(GOOD)
    edit(d)
    return d


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.pop("flash"), "flash"),
    (lambda d: d["device"].pop("measured"), "device.measured"),
    (lambda d: d["device"].__setitem__("cores", "four"), "device.cores"),
    (lambda d: d["device"].__setitem__("ram_bytes", -1), "device.ram_bytes"),
    (lambda d: d["device"].__setitem__("sources", []), "device.sources"),
    (lambda d: d["flash"]["random_mb_s"].__setitem__("4096", [40.0]), "flash.random_mb_s.4096"),
    (lambda d: d["flash"]["random_mb_s"].pop("65536"), "flash.random_mb_s.65536"),
    (lambda d: d["flash"]["random_mb_s"].__setitem__("8192", [1.0, 2.0]), "flash.random_mb_s.8192"),
    (lambda d: d["flash"].__setitem__("threads", [4, 1]), "flash.threads"),
    (lambda d: d["flash"].__setitem__("sequential_1m_mb_s", [0.0]), "flash.sequential_1m_mb_s"),
    (lambda d: d["memory"].__setitem__("read_gb_s", [5.0]), "memory.read_gb_s"),
    (lambda d: d["compute"]["gweights_s"].__setitem__("ort-int4", [1.0, "x"]), "compute.gweights_s.ort-int4"),
    (lambda d: d["flash"].__setitem__("reader_call_us", [1.0]), "flash.reader_call_us"),
    (lambda d: d["flash"].__setitem__("reader_row_us", [0.0, 1.0, 1.0, 1.0]), "flash.reader_row_us"),
    (lambda d: d["flash"].__setitem__("ring_stream_mb_s", {"4": [100.0]}), "flash.ring_stream_mb_s.4"),
    (lambda d: d["flash"].__setitem__("ring_stream_mb_s", {"quarter": [1.0, 1.0]}), "flash.ring_stream_mb_s.quarter"),
    (lambda d: d["compute"].__setitem__("cache_step_us", -1.0), "compute.cache_step_us"),
    (lambda d: d["compute"].__setitem__("stream_slowdown", {"4": [0.5, 1.0]}), "compute.stream_slowdown.4"),
    (lambda d: d["compute"].__setitem__("stream_slowdown", {"four": [1.0, 1.0]}), "compute.stream_slowdown.four"),
    (lambda d: d["compute"].__setitem__("reader_call_compute_us", {"4": [10.0]}), "compute.reader_call_compute_us.4"),
])
def test_bad_profile_is_one_line_naming_the_key(edit, key):
    with pytest.raises(D.ProfileError) as e:
        D.parse_profile(_broken(edit), "bad.toml")
    msg = str(e.value)
    assert msg.startswith(f"bad.toml: {key}:") and "\n" not in msg


def test_bad_toml_and_missing_profile(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("[device\nname = 1")
    with pytest.raises(D.ProfileError, match=r"x\.toml: not valid TOML"):
        D.load_profile(f)
    with pytest.raises(D.ProfileError, match="no such device profile"):
        D.load_profile("no-such-device")


def test_toml_writer_round_trips():
    data = copy.deepcopy(GOOD)
    data["device"]["description"] = 'quote " and \\ backslash'
    assert tomllib.loads(P.to_toml(data, ["header"])) == data


def test_probe_measures_and_writes_a_profile_that_loads(tmp_path):
    s = P.ProbeSettings(read_bytes=(4096, 65536), threads=(1, 2), sequential_threads=(1,), file_bytes=4 << 20,
                        seconds=0.02, compute_threads=(1,), buffered=True, reader_checks=False,
                        matvec_shape=(64, 128), dram_bytes=4 << 20)
    try:
        fd = os.open(tmp_path, os.O_RDONLY)
        os.close(fd)
        probe_file = tmp_path / "flashlm-probe.bin"
        P.ensure_file(str(probe_file), 4096)
        os.close(os.open(probe_file, os.O_RDONLY | os.O_DIRECT))
        probe_file.unlink()
    except OSError:
        pytest.skip(f"{tmp_path}: no O_DIRECT on this filesystem")
    points = []
    data = P.probe(tmp_path, s, on_point=lambda kind, pt: points.append(kind))
    assert not (tmp_path / "flashlm-probe.bin").exists()          # the probe removes what it created
    data["device"]["name"] = "probed"
    prof = D.parse_profile(tomllib.loads(P.to_toml(data)), "probed.toml")
    assert prof.measured and prof.cores >= 1 and prof.ram_bytes > 0
    assert set(prof.direct.random_mb_s) == {4096, 65536} and prof.buffered is not None
    assert all(v > 0 for row in prof.direct.random_mb_s.values() for v in row)
    assert prof.compute_gweights_s["numba-f16"][0] > 0 and prof.dram_gb_s[0] > 0
    assert prof.compute_gweights_s["numba-bundle-f16"][0] > 0
    assert prof.cache_step_us >= 0 and prof.cache_step_row_us >= 0
    assert len(prof.reader_call_us) == 2 and prof.reader_call_s(1) >= 0
    assert prof.reader_stream_mb_s_at(1) > 0 and prof.reader_row_s(2) > 0
    # the ring streamer through each ring size the planner may give streamed layers
    assert set(prof.ring_stream_mb_s) == set(P.RING_FRACTIONS) and prof.reader_stream_mb_s_at(2, 16) > 0
    # compute with reads in flight: the ring streamer's slowdown and each rows call's compute-thread cost
    assert set(prof.stream_slowdown) == {1, 2} and prof.stream_compute_slowdown(2, 1) >= 1.0
    assert set(prof.reader_call_compute_us) == {1, 2} and prof.reader_call_compute_s(2, 1) >= 0.0
    assert points.count("flash") == 2 * (2 * 2 + 1)
    # the reader points say how the reader submitted its reads (native AIO, or pread and why)
    assert data["probe"]["reader_submit"].startswith(("native AIO ", "pread ("))


def test_cli_list_and_show(tmp_path):
    # cwd elsewhere: from a non-editable install's checkout (the aarch64 root), `-m flashlm` would find the
    # checkout's flashlm/ folder instead of the installed package
    run = lambda *a: subprocess.run([sys.executable, "-m", "flashlm", "probe", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path)
    r = run("--list")
    assert r.returncode == 0 and "rpi5-8gb-nvme" in r.stdout and "phone-ufs4" in r.stdout
    r = run("--show", "jetson-orin-nano-8gb")
    assert r.returncode == 0 and "measured = false" in r.stdout
    r = run("--show", "nope")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such device profile" in r.stderr


def test_aarch64_check_dry_run_prints_the_emulation_steps(tmp_path):
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "tools" / "aarch64_check.py"
    r = subprocess.run([sys.executable, str(script), "--dry-run", "--root", str(tmp_path / "root")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    order = ["apt-get install -y -qq debootstrap qemu-user-static binfmt-support",
             "mount -t binfmt_misc", "update-binfmts --enable qemu-aarch64",
             "debootstrap --arch=arm64 --variant=minbase", "ca-certificates.crt",
             "wheel /opt/flashlm", "aarch64_fixture_check.py make",
             "pytest -q -p no:cacheprovider", "aarch64_fixture_check.py check", "flashlm probe --quick"]
    positions = [out.find(s) for s in order]
    assert all(p >= 0 for p in positions), [s for s, p in zip(order, positions) if p < 0]
    assert positions == sorted(positions)
    assert not (tmp_path / "root").exists()             # a dry run changes nothing
    bad = subprocess.run([sys.executable, str(script), "--dry-run", "--steps", "root,nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown step 'nope'" in bad.stderr


def test_a_slow_device_s_figures_are_written_nonzero():
    # the emulated aarch64 root measured the row kernel at ~0.0004 G weights/s: written as 0.0 (three
    # decimals), its own profile failed to load
    assert P.round_figure(0.00042) == 0.00042 and P.round_figure(1234.567) == 1234.6
    assert P.round_figure(7.02449) == 7.024
