"""The flash cost model: what a token's FFN reads cost on this device, for one model's bundle layout.

Built once per model (by the builder, from the device profile's measured read speeds) and shared by the
planner, which chooses per layer between resident, sparse and streamed rows, and by the sparse path,
which per token streams a layer whole when reading its missing rows one by one would cost more. The
two must agree: a tuner that changes the speeds changes both at once.

Scope: flash read time only, the one figure a placement decision needs. The whole-token estimate
(flash I/O + memory management + compute with their overlap, and peak memory) that `flashlm tune` ranks
candidate plans by is runtime/cost_model.py's CostModel; it takes an already-made plan and the device
profile, it does not place layers. Both read their speeds from the same device profile (runtime/device.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .device import FlashSpeeds
from .storage import BundleLayout


@dataclass(frozen=True)
class CostModel:
    speeds: FlashSpeeds
    row_read_s: float          # one bundle row by a random direct read, at the reader's concurrency
    layer_stream_s: float      # one whole layer read sequentially

    @classmethod
    def for_layout(cls, speeds: FlashSpeeds, layout: BundleLayout) -> "CostModel":
        return cls(speeds, speeds.random_seconds(layout.stride_bytes), speeds.stream_seconds(layout.layer_bytes))

    @property
    def source(self) -> str:
        return self.speeds.source

    def rows_seconds(self, n_rows: float) -> float:
        """Flash time to read n_rows scattered bundle rows."""
        return n_rows * self.row_read_s

    def stream_is_cheaper(self, n_missing: int) -> bool:
        """Stream the layer whole rather than read n_missing rows one by one?"""
        return n_missing * self.row_read_s > self.layer_stream_s
