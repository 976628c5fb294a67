"""What the CPU can do, as the kernels' speed depends on it: the instruction-set flags the OS reports.

Read once where a choice depends on them (config.activation_policy) and by the benchmarks that print
the machine they ran on. Linux reports flags in /proc/cpuinfo; elsewhere none are known, and callers
take the choice that suits a CPU without the extension.
"""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's flags (x86 "flags", aarch64 "Features"); empty where the file is absent."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
