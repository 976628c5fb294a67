"""Page-aligned buffers: what O_DIRECT reads need, and what the KV cache uses to grow page by page."""
from __future__ import annotations

import mmap

import numpy as np

BLOCK = 4096                   # alignment unit for O_DIRECT (512 often works; 4096 always does)


def aligned_empty(shape, dtype) -> np.ndarray:
    """A C-contiguous array on page-aligned memory (anonymous mmap), so O_DIRECT can read straight into it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(nbytes, 1))
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
