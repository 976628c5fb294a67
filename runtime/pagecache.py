"""Keep files read once during load out of the page cache.

A device's memory limit (a cgroup here, a phone's RAM) charges the page cache a process brings in to that
process: reading a 300 MiB dense file through the cache would cost 300 MiB more than the weights it
fills. While a file is read in chunks, everything before the current position is dropped with
posix_fadvise(POSIX_FADV_DONTNEED) after each chunk. Dropping only the chunk just read is not enough:
measured on this machine (read_ahead_kb 8192, 1 MiB chunks of a 96 MiB file), 66 MiB stayed cached,
the kernel does not drop pages it has only just added; dropping the whole prefix each time kept at most
8 MiB (the read-ahead) cached and none after. (Pages of a live mapping and dirty pages are never dropped;
the runtime maps no file it reads this way, and the converter fsyncs what it writes.)
"""
from __future__ import annotations

import os


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop the cached pages of fd's byte range (length 0: to the end of the file). Best effort: a file
    system without fadvise support keeps its pages, which costs memory, not correctness."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def drop_file(path) -> None:
    """Drop every cached page of the file at `path` (missing files are ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        drop_cached(fd)
    finally:
        os.close(fd)
