"""Device profiles (devices/*.toml, written by tools/io_probe.py): how fast this machine's flash reads.

The flash planner turns these into costs: seconds to fetch one bundle row by random direct reads at
the reader's concurrency, and seconds per byte streamed sequentially.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import FlashlmError

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10
    import tomli as tomllib

class ProfileError(FlashlmError):
    """A device profile that is missing or malformed."""


# Without a profile: what DESIGN.md measured on a 2-core VM with a virtio disk (O_DIRECT, 4 threads).
DEFAULT_RANDOM_MB_S = {4096: 150.0, 16384: 500.0, 65536: 1100.0, 262144: 1600.0, 1048576: 1600.0}
DEFAULT_SEQUENTIAL_MB_S = 1200.0


@dataclass
class FlashSpeeds:
    random_mb_s: dict[int, float]      # read size (bytes) -> MB/s at the reader's thread count
    sequential_mb_s: float
    source: str = "built-in defaults"

    def random_seconds(self, read_bytes: int) -> float:
        """Seconds for one random direct read of read_bytes, interpolated in log size."""
        sizes = sorted(self.random_mb_s)
        size = min(max(read_bytes, sizes[0]), sizes[-1])
        hi = next(s for s in sizes if s >= size)
        lo = max(s for s in sizes if s <= size)
        mb_s = self.random_mb_s[lo] if hi == lo else (
            self.random_mb_s[lo] + (self.random_mb_s[hi] - self.random_mb_s[lo]) * (size - lo) / (hi - lo))
        return read_bytes / (mb_s * 1e6)

    def stream_seconds(self, nbytes: int) -> float:
        return nbytes / (self.sequential_mb_s * 1e6)


def shipped_profile(name: str):
    """The profile NAME.toml shipped as package data (the project's devices/ folder), or None."""
    from importlib.resources import files
    entry = files("flashlm.devices") / f"{name}.toml"
    return Path(str(entry)) if entry.is_file() else None


def load_speeds(profile: str | Path | None, threads: int) -> FlashSpeeds:
    """Speeds at `threads` concurrent reads from a profile TOML (path or name in devices/), or defaults."""
    if profile is None:
        return FlashSpeeds(dict(DEFAULT_RANDOM_MB_S), DEFAULT_SEQUENTIAL_MB_S)
    path = Path(profile)
    if not path.exists():
        path = shipped_profile(str(profile))
    if path is None or not path.exists():
        raise ProfileError(f"{profile}: no such device profile (a TOML path or a name in devices/)")
    try:
        flash = tomllib.loads(path.read_text())["flash"]
        idx = min(range(len(flash["threads"])), key=lambda i: abs(flash["threads"][i] - threads))
        random = {int(size): float(v[idx]) for size, v in flash["random_mb_s"].items()}
        seq = flash["sequential_1m_mb_s"]
        sequential = float(seq[min(len(seq) - 1, 1 if threads > 1 else 0)])
    except (KeyError, ValueError, IndexError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: not a device profile with [flash] random_mb_s and sequential_1m_mb_s ({e})") from None
    return FlashSpeeds(random, sequential, source=str(path))
