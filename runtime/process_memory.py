"""What this process occupies now, as a memory limit counts it: the resident set (RSS).

A whole-process `--memory-limit` has to leave room for the runtime itself (Python, numpy, numba and
llvmlite, onnxruntime, the tokenizer): the builder measures it here just before it plans, after the
imports the run needs, instead of assuming a constant that differs between machines and versions.
"""
from __future__ import annotations

import os
import resource
import sys


def rss_bytes() -> int:
    """Resident bytes of this process now (/proc/self/statm); the peak so far where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def physical_memory_bytes() -> int:
    """This machine's RAM (what a percentage --memory-limit is a share of)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc keeps them otherwise). Loading a tokenizer
    of a 151k vocabulary allocates ~140 MiB of which ~50 stay live: without this the RSS, and a memory
    limit, keep paying for the other ~90 (measured with tokenizers 0.22, Qwen2.5's tokenizer.json)."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):   # not glibc: nothing to do
        pass
