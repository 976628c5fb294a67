"""The packed copy of the FFN bundle rows, for layers read whole (naive, hybrid, flash's streamed layers).

ffn.safetensors pads every row to a stride that no 4096-byte block boundary cuts, so one random row is
one direct read: q4_0 rows of 2592 bytes (Qwen2.5-1.5B) sit on a 4096-byte stride, 37% of the file is
padding, and a layer read whole reads it too. ffn_packed.safetensors holds the same rows back to back:

  layers.{i}.ffn.rows   U8 [n_ff, row_bytes], each layer starting on a 4096-byte boundary
  group_sums            U64 [n_layers, n_groups]: a checksum per group of `group_rows` rows

A group is the fewest rows whose bytes are a whole number of 4096-byte blocks (4096 / gcd(row_bytes,
4096): 128 rows of 2592 bytes), so a read of whole groups is an aligned direct read and is checked on the
reader thread by the groups' sums. The sum of a group is over its little-endian uint16 words w_j:
sum_j w_j * (2j + 1) mod 2^64 (numba, ~12 GB/s on one core here; zlib's CRC-32 per row runs ~2 GB/s,
which at ~500 MB streamed per token would take a quarter of this machine's two cores). Any change to a
single word changes it (the multipliers are odd), and so do truncated, zeroed or misplaced reads of
nonzero data. It guards against a damaged or replaced file, not against an adversary.

The rows are byte-identical to ffn.safetensors' (without the padding), so whole layers computed from
either give the same result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

BLOCK = 4096
PACKED_FILE = "ffn_packed.safetensors"
SUMS_TENSOR = "group_sums"


def layer_tensor(layer: int) -> str:
    return f"layers.{layer}.ffn.rows"


def group_rows_for(row_bytes: int, block: int = BLOCK) -> int:
    """Rows per checksum group: the fewest whose bytes are whole blocks."""
    return block // math.gcd(int(row_bytes), block)


@dataclass(frozen=True)
class PackedLayout:
    """ffn_packed.safetensors as checked at open (runtime/modelfile.py)."""
    file: str
    row_bytes: int
    n_rows: int
    group_rows: int
    layer_offsets: tuple[int, ...]     # absolute, multiples of BLOCK
    sums_offset: int                   # absolute offset of group_sums [n_layers, n_groups] U64

    @property
    def n_groups(self) -> int:
        return -(-self.n_rows // self.group_rows)

    @property
    def layer_bytes(self) -> int:
        return self.n_rows * self.row_bytes

    @property
    def group_bytes(self) -> int:
        return self.group_rows * self.row_bytes

    def group_span(self, g: int) -> tuple[int, int]:
        """Rows [lo, hi) of group g (the last group may be short)."""
        lo = g * self.group_rows
        return lo, min(self.n_rows, lo + self.group_rows)


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
