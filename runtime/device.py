"""Device profiles (devices/*.toml, written by `flashlm probe` or from published figures): what a
machine is and how fast it reads flash, streams DRAM and runs matvecs.

A profile is parsed and validated once into a DeviceProfile; a bad one is a one-line ProfileError
naming the file and the key. The planner and the cost model take their speeds from it: seconds to
fetch one bundle row by random direct reads at the reader's concurrency, seconds per byte streamed
sequentially, and weights per second of a decode matvec for a storage type, engine and thread count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FlashlmError

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10
    import tomli as tomllib

# Without a profile: what DESIGN.md measured on a 2-core VM with a virtio disk (O_DIRECT, 4 threads).
DEFAULT_RANDOM_MB_S = {4096: 150.0, 16384: 500.0, 65536: 1100.0, 262144: 1600.0, 1048576: 1600.0}
DEFAULT_SEQUENTIAL_MB_S = 1200.0
DEFAULT_DRAM_GB_S = 10.0
# What a FlashReader.read_rows call pays beyond its reads (handing a batch to each worker, joining
# them), when a profile did not measure it: a thread hand-off on that VM is 20-40 us.
DEFAULT_READER_CALL_US = 30.0
# A sparse layer's cache step (count_missing + step) when a profile did not measure it: an estimate.
DEFAULT_CACHE_STEP_US = 40.0


class ProfileError(FlashlmError, ValueError):
    """A device or run profile that cannot be used: the message names the file and the key."""


@dataclass
class FlashSpeeds:
    random_mb_s: dict[int, float]      # read size (bytes) -> MB/s at the reader's thread count
    sequential_mb_s: float
    source: str = "built-in defaults"

    def random_seconds(self, read_bytes: int) -> float:
        """Seconds for one random direct read of read_bytes (see _mb_s_at_size)."""
        sizes = sorted(self.random_mb_s)
        return read_bytes / (_mb_s_at_size(sizes, [self.random_mb_s[s] for s in sizes], read_bytes) * 1e6)

    def stream_seconds(self, nbytes: int) -> float:
        return nbytes / (self.sequential_mb_s * 1e6)


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear in log2(x), clamped at the ends (thread counts and read sizes are geometric)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            a, b = math.log2(xs[i - 1]), math.log2(xs[i])
            t = (math.log2(x) - a) / (b - a)
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def _mb_s_at_size(sizes: list[int], mb_s: list[float], size: float) -> float:
    """MB/s of reads of `size` bytes: the time per read is interpolated linearly in size between
    measured sizes (latency + size / bandwidth on each segment, exact at the measured points), so a
    bigger read never takes less time than a smaller one; outside the range MB/s is held."""
    if size <= sizes[0]:
        return mb_s[0]
    if size >= sizes[-1]:
        return mb_s[-1]
    i = next(k for k in range(1, len(sizes)) if size <= sizes[k])
    t0, t1 = sizes[i - 1] / mb_s[i - 1], sizes[i] / mb_s[i]
    t = t0 + (t1 - t0) * (size - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
    return size / t


@dataclass
class FlashTable:
    """MB/s by read size (rows) and concurrency (columns), plus sequential 1 MiB reads."""
    read_bytes: list[int]
    threads: list[int]
    random_mb_s: dict[int, list[float]]          # read size -> MB/s at each of threads
    sequential_threads: list[int]
    sequential_mb_s: list[float]

    def random_at(self, read_bytes: int, threads: int) -> float:
        """MB/s of random reads of read_bytes with `threads` in flight (interpolated)."""
        col = [_interp(self.threads, self.random_mb_s[s], threads) for s in self.read_bytes]
        return _mb_s_at_size(self.read_bytes, col, read_bytes)

    def sequential_at(self, threads: int) -> float:
        return _interp(self.sequential_threads, self.sequential_mb_s, threads)


@dataclass
class DeviceProfile:
    name: str
    measured: bool                         # true: written by `flashlm probe` on the device itself
    cores: int                             # physical cores (compute threads worth using)
    ram_bytes: int
    memory_limit_bytes: int | None         # cgroup limit when one applies, else None
    page_size: int
    machine: str                           # CPU architecture (x86_64, aarch64)
    direct: FlashTable                     # O_DIRECT reads
    buffered: FlashTable | None            # page-cache reads of cold data (None: not measured)
    dram_threads: list[int]
    dram_gb_s: list[float]                 # read bandwidth at each of dram_threads
    compute_threads: list[int]
    compute_gweights_s: dict[str, list[float]]   # "engine-storage" (numba-f16, ort-int4) -> G weights/s
    reader_call_us: list[float] | None = None    # a FlashReader.read_rows call's hand-off, at each of direct.threads,
    reader_row_us: list[float] | None = None     # each random 4 KiB read of such a call,
    reader_stream_mb_s: list[float] | None = None  # whole layers through the ring streamer (None: not measured)
    # whole layers through the ring streamer by the ring's size: ring 1/k of two whole layers -> MB/s at
    # each of direct.threads (None: not measured; then reader_stream_mb_s for every ring size)
    ring_stream_mb_s: dict[int, list[float]] | None = None
    cache_step_us: float = DEFAULT_CACHE_STEP_US  # a sparse layer's NeuronCache step per token ...
    cache_step_row_us: float = 0.0               # ... plus this per wanted neuron
    # compute slowed by reads in flight: per reader thread count, at each of compute_threads (None: 1x)
    stream_slowdown: dict[int, list[float]] | None = None    # ... while the ring streamer reads whole layers
    # compute-thread time lost per FlashReader.read_rows call (its workers wake, take the GIL and cores)
    reader_call_compute_us: dict[int, list[float]] | None = None
    description: str = ""
    sources: list[str] = field(default_factory=list)
    path: str = "built-in defaults"
    raw: dict = field(default_factory=dict, repr=False)   # the parsed TOML, for `probe --show`

    @property
    def memory_bytes(self) -> int:
        """What a process may use: the cgroup limit when lower than RAM."""
        return min(self.ram_bytes, self.memory_limit_bytes or self.ram_bytes)

    def flash_speeds(self, threads: int, io: str = "direct") -> FlashSpeeds:
        table = self.buffered if io == "buffered" and self.buffered is not None else self.direct
        return FlashSpeeds({s: table.random_at(s, threads) for s in table.read_bytes},
                           table.sequential_at(threads), source=self.path)

    def reader_call_s(self, threads: int) -> float:
        """Fixed seconds of one FlashReader.read_rows call with `threads` workers (beyond its reads)."""
        if self.reader_call_us is None:
            return 1e-6 * DEFAULT_READER_CALL_US
        return 1e-6 * _interp(self.direct.threads, self.reader_call_us, threads)

    def reader_row_s(self, threads: int) -> float | None:
        """Seconds per random 4 KiB read in a read_rows call of a sparse layer's size (None: not measured)."""
        return None if self.reader_row_us is None else 1e-6 * _interp(self.direct.threads, self.reader_row_us, threads)

    def reader_stream_mb_s_at(self, threads: int, ring_fraction: float = 1.0) -> float | None:
        """MB/s of whole layers streamed by the ring streamer during decode steps with `threads` readers and
        a ring of 1/ring_fraction of two whole layers (interpolated in log2 of the fraction between the
        ring sizes measured, held outside them); None: not measured."""
        if self.ring_stream_mb_s:
            sizes = sorted(self.ring_stream_mb_s)
            return _interp(sizes, [_interp(self.direct.threads, self.ring_stream_mb_s[k], threads) for k in sizes],
                           ring_fraction)
        return None if self.reader_stream_mb_s is None else _interp(self.direct.threads, self.reader_stream_mb_s, threads)

    def _per_readers(self, table: dict[int, list[float]], io_threads: int, compute_threads: int) -> float:
        readers = sorted(table)
        return _interp(readers, [_interp(self.compute_threads, table[n], compute_threads) for n in readers], io_threads)

    def stream_compute_slowdown(self, io_threads: int, compute_threads: int) -> float:
        """How much longer compute takes while `io_threads` readers stream whole layers, at
        `compute_threads` compute threads (1.0: not measured)."""
        if not self.stream_slowdown:
            return 1.0
        return max(1.0, self._per_readers(self.stream_slowdown, io_threads, compute_threads))

    def reader_call_compute_s(self, io_threads: int, compute_threads: int) -> float:
        """Compute-thread seconds one read_rows call with `io_threads` workers costs (0: not measured)."""
        if not self.reader_call_compute_us:
            return 0.0
        return 1e-6 * max(0.0, self._per_readers(self.reader_call_compute_us, io_threads, compute_threads))

    def dram_gb_s_at(self, threads: int) -> float:
        return _interp(self.dram_threads, self.dram_gb_s, threads)

    def matvec_gweights_s(self, kind: str, threads: int, bytes_per_weight: float | None = None) -> float:
        """G weights/s of a decode matvec with `kind` ("numba-f16", ...) on `threads` threads.

        A kind the profile lacks follows the DRAM bound: read GB/s / bytes per weight."""
        if kind in self.compute_gweights_s:
            return _interp(self.compute_threads, self.compute_gweights_s[kind], threads)
        if kind.startswith("numba-bundle-"):     # the FFN row kernel: else the dense matmul's figure
            return self.matvec_gweights_s("numba-" + kind[len("numba-bundle-"):], threads, bytes_per_weight)
        known = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "int8": 1.0625, "int4": 0.5625}
        per_weight = bytes_per_weight or known.get(kind.split("-", 1)[-1])
        if per_weight is None:
            raise ProfileError(f"{self.path}: compute has no figures for {kind!r} (has {sorted(self.compute_gweights_s)})")
        return self.dram_gb_s_at(threads) / per_weight


def shipped_profile(name: str):
    """The profile NAME.toml shipped as package data (the project's devices/ folder), or None."""
    from importlib.resources import files
    entry = files("flashlm.devices") / f"{name}.toml"
    return Path(str(entry)) if entry.is_file() else None


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped as package data."""
    from importlib.resources import files
    return sorted(Path(str(e)).stem for e in files("flashlm.devices").iterdir() if str(e).endswith(".toml"))


def resolve_profile(profile: str | Path) -> Path:
    path = Path(profile)
    if path.exists():
        return path
    shipped = shipped_profile(str(profile))
    if shipped is None:
        raise ProfileError(f"{profile}: no such device profile (a TOML path, or one of: {', '.join(shipped_profiles())})")
    return shipped


# --- parsing ---------------------------------------------------------------------------------------
class _Reader:
    """Typed access to a parsed TOML table: every failure names the file and the dotted key."""

    def __init__(self, path: str, data: dict, prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def fail(self, key: str, problem: str):
        raise ProfileError(f"{self.path}: {self.prefix}{key}: {problem}")

    def table(self, key: str, required: bool = True) -> "_Reader | None":
        v = self.data.get(key)
        if v is None:
            if required:
                self.fail(key, "missing table")
            return None
        if not isinstance(v, dict):
            self.fail(key, f"expected a table, got {type(v).__name__}")
        return _Reader(self.path, v, f"{self.prefix}{key}.")

    def get(self, key: str, kind, default=..., positive: bool = False):
        if key not in self.data:
            if default is ...:
                self.fail(key, "missing")
            return default
        v = self.data[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            self.fail(key, f"expected {kind.__name__}, got {type(v).__name__} {v!r}")
        if positive and not v > 0:
            self.fail(key, f"must be > 0, got {v!r}")
        return v

    def numbers(self, key: str, length: int | None = None, integer: bool = False, increasing: bool = False,
                what: str = "") -> list:
        v = self.data.get(key)
        if v is None:
            self.fail(key, "missing")
        if not isinstance(v, list) or not v:
            self.fail(key, f"expected a non-empty list of numbers, got {v!r}")
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int if integer else (int, float)) or not x > 0:
                self.fail(key, f"expected positive {'integers' if integer else 'numbers'}, got {x!r}")
        if length is not None and len(v) != length:
            self.fail(key, f"expected {length} numbers ({what}), got {len(v)}")
        if increasing and any(b <= a for a, b in zip(v, v[1:])):
            self.fail(key, f"must be strictly increasing, got {v}")
        return [int(x) for x in v] if integer else [float(x) for x in v]


def _flash_table(r: _Reader, key: str, read_bytes: list[int], threads: list[int]) -> dict[int, list[float]]:
    t = r.table(key)
    out = {}
    for size in read_bytes:
        if str(size) not in t.data:
            t.fail(str(size), f"missing row for read size {size} (flash.read_bytes)")
        out[size] = t.numbers(str(size), len(threads), what="one per flash.threads")
    extra = sorted(set(t.data) - {str(s) for s in read_bytes})
    if extra:
        t.fail(extra[0], "not one of flash.read_bytes")
    return out


def parse_profile(data: dict, path: str = "<profile>") -> DeviceProfile:
    """Validate a parsed device-profile TOML; raises ProfileError naming the first bad key."""
    r = _Reader(path, data)
    dev = r.table("device")
    measured = dev.get("measured", bool)
    sources = dev.get("sources", list, default=[])
    if not measured and not sources:
        dev.fail("sources", "a profile with measured = false must cite where its figures come from")
    if any(not isinstance(s, str) or not s for s in sources):
        dev.fail("sources", "expected a list of non-empty strings")
    ram = dev.get("ram_bytes", int, positive=True)
    limit = dev.get("memory_limit_bytes", int, default=None)
    if limit is not None and limit <= 0:
        dev.fail("memory_limit_bytes", f"must be > 0, got {limit}")

    fl = r.table("flash")
    read_bytes = fl.numbers("read_bytes", integer=True, increasing=True)
    threads = fl.numbers("threads", integer=True, increasing=True)
    seq_threads = fl.numbers("sequential_threads", integer=True, increasing=True)
    seq = fl.numbers("sequential_1m_mb_s", len(seq_threads), what="one per flash.sequential_threads")
    direct = FlashTable(read_bytes, threads, _flash_table(fl, "random_mb_s", read_bytes, threads), seq_threads, seq)
    def per_thread(key: str, positive: bool = False):
        v = fl.data.get(key)
        if v is None:
            return None
        if (not isinstance(v, list) or len(v) != len(threads)
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 or (positive and x == 0) for x in v)):
            fl.fail(key, f"expected {len(threads)} numbers {'> 0' if positive else '>= 0'} (one per flash.threads), got {v!r}")
        return [float(x) for x in v]
    call_us, row_us = per_thread("reader_call_us"), per_thread("reader_row_us", positive=True)
    stream_mb_s = per_thread("reader_stream_mb_s", positive=True)
    ring = fl.table("ring_stream_mb_s", required=False)
    ring_mb_s = None
    if ring is not None:
        ring_mb_s = {}
        for k in ring.data:
            if not k.isdigit() or int(k) < 1:
                ring.fail(k, "expected a ring fraction (the k of a ring 1/k of two whole layers) as the key")
            ring_mb_s[int(k)] = ring.numbers(k, len(threads), what="one per flash.threads")
        ring_mb_s = ring_mb_s or None
    buffered = None
    if "buffered_random_mb_s" in fl.data:
        bseq = fl.numbers("buffered_sequential_1m_mb_s", len(seq_threads), what="one per flash.sequential_threads")
        buffered = FlashTable(read_bytes, threads, _flash_table(fl, "buffered_random_mb_s", read_bytes, threads),
                              seq_threads, bseq)

    mem = r.table("memory")
    dram_threads = mem.numbers("threads", integer=True, increasing=True)
    dram = mem.numbers("read_gb_s", len(dram_threads), what="one per memory.threads")

    # [compute] is optional: a profile from published figures has no numba/onnxruntime measurements,
    # and its matvec speed then follows the DRAM bound (DeviceProfile.matvec_gweights_s).
    comp = r.table("compute", required=False)
    cores = dev.get("cores", int, positive=True)
    c_threads, gweights = [cores], {}
    step = dict(cache_step_us=DEFAULT_CACHE_STEP_US, cache_step_row_us=0.0)
    slowdown: dict = {}
    if comp is not None:
        step = dict(cache_step_us=comp.get("cache_step_us", float, default=DEFAULT_CACHE_STEP_US),
                    cache_step_row_us=comp.get("cache_step_row_us", float, default=0.0))
        for k, v in step.items():
            if v < 0:
                comp.fail(k, f"must be >= 0, got {v!r}")
        c_threads = comp.numbers("threads", integer=True, increasing=True)
        g = comp.table("gweights_s", required=False)
        gweights = {k: g.numbers(k, len(c_threads), what="one per compute.threads") for k in g.data} if g else {}
        for key, low in (("stream_slowdown", 1.0), ("reader_call_compute_us", 0.0)):
            t = comp.table(key, required=False)
            if t is None:
                continue
            table = {}
            for k, v in t.data.items():
                if not k.isdigit() or int(k) < 1:
                    t.fail(k, "expected a reader thread count (a positive integer) as the key")
                if (not isinstance(v, list) or len(v) != len(c_threads)
                        or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < low for x in v)):
                    t.fail(k, f"expected {len(c_threads)} numbers >= {low:g} (one per compute.threads), got {v!r}")
                table[int(k)] = [float(x) for x in v]
            slowdown[key] = table or None

    return DeviceProfile(
        name=dev.get("name", str), measured=measured, cores=cores, ram_bytes=ram,
        memory_limit_bytes=limit, page_size=dev.get("page_size", int, default=4096, positive=True),
        machine=dev.get("machine", str, default=""), direct=direct, buffered=buffered, dram_threads=dram_threads,
        dram_gb_s=dram, compute_threads=c_threads, compute_gweights_s=gweights, **step, **slowdown,
        reader_call_us=call_us, reader_row_us=row_us, reader_stream_mb_s=stream_mb_s, ring_stream_mb_s=ring_mb_s,
        description=dev.get("description", str, default=""), sources=list(sources), path=path, raw=data)


def load_profile(profile: str | Path) -> DeviceProfile:
    """A device profile from a TOML path or the name of a shipped one."""
    path = resolve_profile(profile)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read ({e.strerror})") from None
    return parse_profile(data, str(path))


def default_profile() -> DeviceProfile:
    """The device without a profile: DESIGN.md's flash figures for a 2-core VM with a virtio disk (O_DIRECT,
    4 threads, the same at every concurrency), a DRAM bound for compute (no matvec figures)."""
    sizes = sorted(DEFAULT_RANDOM_MB_S)
    flash = FlashTable(sizes, [4], {s: [DEFAULT_RANDOM_MB_S[s]] for s in sizes}, [4], [DEFAULT_SEQUENTIAL_MB_S])
    return DeviceProfile(name="built-in defaults", measured=False, cores=2, ram_bytes=8 << 30, memory_limit_bytes=None,
                         page_size=4096, machine="", direct=flash, buffered=None, dram_threads=[1],
                         dram_gb_s=[DEFAULT_DRAM_GB_S], compute_threads=[1], compute_gweights_s={},
                         sources=["DESIGN.md (measured on the project's 2-core VM)"])


def load_device(profile: str | Path | None) -> DeviceProfile:
    """A device profile from a TOML path or a shipped name; None: the built-in defaults."""
    return default_profile() if profile is None else load_profile(profile)
