"""Token embedding rows read from the model file per lookup, instead of a resident matrix.

A decoder needs one embedding row per token; keeping the whole [vocab, d] matrix resident for that costs
a fifth of a small model's bytes (Qwen2.5-1.5B: 167 MiB of q4_1 blocks for 1.5 KiB used per token). The
rows are read with pread from dense.safetensors, whose sha256 the loader checked while reading the
rest of the file, and dropped from the page cache after each read (a memory limit charges the cache
to the process). posix_fadvise(RANDOM) stops the kernel from reading ahead around each row.
"""
from __future__ import annotations

import os

import numpy as np

from .modelfile import ModelFileError
from .storage import TensorEntry
from .pagecache import drop_cached


class FileEmbeddingRows:
    """Stored rows of one [vocab, d] tensor of a file, read on demand and widened to f32."""

    def __init__(self, path, entry: TensorEntry):
        self.path, self.entry = path, entry
        self.n_rows = entry.shape[0]
        self.row_bytes = entry.nbytes // self.n_rows
        self.row_items = self.row_bytes // np.dtype(entry.dtype).itemsize
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot open for embedding reads ({e.strerror or e})") from None
        try:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        except (AttributeError, OSError):
            pass
        self._buf = np.empty((0, self.row_bytes), np.uint8)

    def stored(self, tokens: np.ndarray) -> np.ndarray:
        """The stored rows [T, row_items] (the tensor's dtype) of `tokens`."""
        T = len(tokens)
        if self._buf.shape[0] < T:
            self._buf = np.empty((T, self.row_bytes), np.uint8)
        out = self._buf[:T]
        for i, t in enumerate(tokens):
            t = int(t)
            if not 0 <= t < self.n_rows:
                raise IndexError(f"token id {t} is outside the vocabulary (0..{self.n_rows - 1})")
            off = self.entry.offset + t * self.row_bytes
            if os.preadv(self.fd, [out[i]], off) != self.row_bytes:
                raise ModelFileError(f"{self.path}: short read of embedding row {t}")
            drop_cached(self.fd, off, self.row_bytes)
        return out.view(self.entry.dtype)

    def lookup(self, tokens: np.ndarray, out: np.ndarray) -> None:
        """out[T, d] = the tokens' rows in f32."""
        out[:] = self.entry.storage.decode(self.stored(tokens))

    @property
    def nbytes_resident(self) -> int:
        return self._buf.nbytes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
