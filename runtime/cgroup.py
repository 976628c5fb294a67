"""Run a child process inside a memory cgroup capped at a limit, as a device with that much RAM would.

A memory cgroup charges a process for its RSS *and* the page cache it brings in, and reclaims (or
OOM-kills) at the cap: what a board with that much RAM does to a process that maps its weights. The
group is created under this process's own memory cgroup, so whatever accounts for this process keeps
accounting for the child; it is removed when the child has exited.

cgroup v1 (`/sys/fs/cgroup/memory/...`): memory.limit_in_bytes (and memsw when swap accounting is on),
peak = memory.max_usage_in_bytes, reached the cap = memory.failcnt > 0, OOM kills from memory.oom_control.
cgroup v2: memory.max (and memory.swap.max = 0), peak = memory.peak, reached the cap = memory.events
`max` > 0. Where neither can be created (not root, read-only cgroupfs, v2 without the memory controller
delegated) `MemoryCgroup.create` raises CgroupError saying why.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import FlashlmError

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupError(FlashlmError):
    """A memory cgroup cannot be created or used here; the message says why."""


@dataclass
class CgroupUsage:
    limit: int          # bytes
    peak: int | None    # bytes: the group's highest charge (RSS + page cache), None if the kernel has no counter
    hit_cap: bool       # the charge reached the limit at least once (the kernel had to reclaim)
    oom_kills: int      # processes of the group the kernel killed for memory
    failcnt: int = 0    # charges refused at the cap (v1 memory.failcnt; v2 memory.events max)

    def as_dict(self) -> dict:
        return {"cgroup_limit": self.limit, "cgroup_peak": self.peak, "cgroup_hit_cap": self.hit_cap,
                "cgroup_oom_kills": self.oom_kills, "cgroup_failcnt": self.failcnt}


def _own_cgroup() -> tuple[int, Path]:
    """(version, directory) of this process's memory cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        raise CgroupError(f"cannot read /proc/self/cgroup ({e.strerror}): no cgroups on this system") from None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = CGROUP_ROOT / "memory"
            if (base / "memory.limit_in_bytes").exists():
                return 1, base / path.lstrip("/")
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
                d = base / path.lstrip("/")
                if (d / "cgroup.controllers").exists():
                    return 2, d
    raise CgroupError("no memory cgroup controller is mounted (looked for cgroup v1 /sys/fs/cgroup/memory "
                      "and cgroup v2 /sys/fs/cgroup)")


def _write(path: Path, value) -> None:
    try:
        path.write_text(str(value))
    except OSError as e:
        raise CgroupError(f"cannot write {value} to {path}: {e.strerror}"
                          + (" (run as root, or with a delegated cgroup)" if e.errno in (1, 13, 30) else "")) from None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


class MemoryCgroup:
    """A fresh memory cgroup below this process's own, capped at `limit` bytes."""

    def __init__(self, version: int, path: Path, limit: int):
        self.version, self.path, self.limit = version, path, limit

    @classmethod
    def create(cls, limit: int, name: str | None = None) -> "MemoryCgroup":
        if limit <= 0:
            raise CgroupError(f"cgroup limit must be positive, got {limit}")
        version, parent = _own_cgroup()
        if version == 2:
            enabled = (parent / "cgroup.subtree_control")
            if "memory" not in (enabled.read_text().split() if enabled.exists() else []):
                raise CgroupError(f"cgroup v2 at {parent}: the memory controller is not enabled for child groups "
                                  "(cgroup.subtree_control); a process inside the group cannot enable it itself")
        path = parent / (name or f"flashlm-{os.getpid()}-{time.monotonic_ns()}")
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {path}: {e.strerror}"
                              + (" (needs root or a delegated cgroup)" if e.errno in (1, 13, 30) else "")) from None
        group = cls(version, path, limit)
        try:
            if version == 1:
                _write(path / "memory.limit_in_bytes", limit)
                if (path / "memory.memsw.limit_in_bytes").exists():   # swap would let the group exceed the cap
                    _write(path / "memory.memsw.limit_in_bytes", limit)
            else:
                _write(path / "memory.max", limit)
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", 0)
        except CgroupError:
            group.remove()
            raise
        return group

    def join_self(self) -> None:
        """Move the calling process into the group (meant for a child's preexec_fn, before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> CgroupUsage:
        if self.version == 1:
            peak = _read_int(self.path / "memory.max_usage_in_bytes")
            fails = sum(_read_int(self.path / f) or 0 for f in ("memory.failcnt", "memory.memsw.failcnt"))
            oom = _read_keyed(self.path / "memory.oom_control").get("oom_kill", 0)
            # failcnt counts charges refused at the cap; an allocation that ends in an OOM kill may not add one
            hit = fails > 0 or oom > 0 or (peak is not None and peak >= self.limit)
        else:
            peak = _read_int(self.path / "memory.peak")
            events = _read_keyed(self.path / "memory.events")
            oom = events.get("oom_kill", 0)
            fails = events.get("max", 0)
            hit = fails > 0 or oom > 0 or (peak is not None and peak >= self.limit)
        return CgroupUsage(self.limit, peak, hit, oom, fails)

    def remove(self) -> None:
        """Delete the group (its processes must have exited); charges left by page cache move to the parent."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)     # the kernel may still be tearing down an exited task
        try:
            self.path.rmdir()
        except OSError as e:
            raise CgroupError(f"cannot remove cgroup {self.path}: {e.strerror}") from None


def run_capped(cmd: list[str], limit: int, **kwargs) -> tuple[subprocess.CompletedProcess, CgroupUsage]:
    """Run `cmd` to completion inside a new memory cgroup of `limit` bytes; its output and the group's usage."""
    group = MemoryCgroup.create(limit)
    try:
        proc = subprocess.run(cmd, preexec_fn=group.join_self, **kwargs)
        return proc, group.usage()
    finally:
        group.remove()
