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
which at ~500 MB streamed per token would take a quarter of this machine's two cores; the kernels are
in runtime/group_sums.py). Any change to a
single word changes it (the multipliers are odd), and so do truncated, zeroed or misplaced reads of
nonzero data. It guards against a damaged or replaced file, not against an adversary.

The rows are byte-identical to ffn.safetensors' (without the padding), so whole layers computed from
either give the same result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .aligned import BLOCK

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
