"""The packed copy's group checksums (format: runtime/packed_rows.py): numba loops over uint16 words,
kept apart from the layout so that opening a folder does not import numba."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _sum_words(w, lo, hi):
    h = np.uint64(0)
    for j in range(hi - lo):
        h += np.uint64(w[lo + j]) * np.uint64(2 * j + 1)
    return h


@njit(nogil=True, cache=True)
def group_sums_of(words, group_words, n_words, out):
    """out[g] = checksum of words[g * group_words : min(n_words, (g + 1) * group_words)] (uint16 words)."""
    for g in range(out.shape[0]):
        lo = g * group_words
        out[g] = _sum_words(words, lo, min(n_words, lo + group_words))


@njit(nogil=True, cache=True)
def first_bad_group(words, group_words, n_words, expected):
    """Index of the first group whose checksum differs from expected[g], or -1 (runs without the GIL)."""
    for g in range(expected.shape[0]):
        lo = g * group_words
        if _sum_words(words, lo, min(n_words, lo + group_words)) != expected[g]:
            return g
    return -1


def layer_sums(rows: np.ndarray, group_rows: int) -> np.ndarray:
    """The group sums of one layer's packed rows [n, row_bytes] (uint8 or any dtype of those bytes)."""
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
    if raw.size % 2:
        raise ValueError("packed rows must have an even number of bytes (uint16 words)")
    n, row_bytes = rows.shape[0], raw.size // max(rows.shape[0], 1)
    out = np.zeros(-(-n // group_rows), np.uint64)
    group_sums_of(raw.view(np.uint16), group_rows * row_bytes // 2, raw.size // 2, out)
    return out
