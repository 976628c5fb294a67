"""Where a decode token's wall time went, and how much of the flash I/O hid behind compute.

The compute thread's time per token splits into three disjoint parts:
  io_wait   waiting for flash data (the reads a kernel needed were not finished)
  mem       neuron-cache bookkeeping on the compute thread (admission, delete-by-swap, eviction)
  compute   everything else: embedding, attention, dense matmuls, predictors, FFN kernels, the head
Beside it the reader has its own clock:
  io_busy   wall time with at least one flash read in flight (concurrent reads count once)
A perfect pipeline costs max(io_busy, compute) per token (bound_ms); `ratio` is how far the measured
ms/token is from it, `overlap` the share of the reader's busy time that the compute thread did not
wait for. Where a token goes beyond the bound, as two sums of the same wall time:
  ms = io_busy + disk_idle      disk_idle: no read in flight (compute and bookkeeping the disk sat out:
                                 what reading earlier could hide, on a plan whose disk is the bound)
  ms = io_wait + mem + compute, compute = predict + ffn kernels + other (attention, dense, head, Python)
  io_hidden = io_busy - io_wait: the reads the compute thread did not wait for
These field names are what `flashlm bench --json` rows and `--stats` carry.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CriticalPath:
    tokens: int
    ms: float                # wall ms per token (the whole forward)
    io_wait_ms: float
    io_busy_ms: float
    mem_ms: float
    compute_ms: float
    predict_ms: float        # the predictors' share of compute_ms
    ffn_ms: float = 0.0      # the FFN kernels' share of compute_ms

    @property
    def other_ms(self) -> float:
        """compute outside predictors and FFN kernels: attention, dense matmuls, the head, Python."""
        return max(0.0, self.compute_ms - self.predict_ms - self.ffn_ms)

    @property
    def disk_idle_ms(self) -> float:
        return max(0.0, self.ms - self.io_busy_ms)

    @property
    def io_hidden_ms(self) -> float:
        return max(0.0, self.io_busy_ms - self.io_wait_ms)

    @property
    def bound_ms(self) -> float:
        return max(self.io_busy_ms, self.compute_ms)

    @property
    def ratio(self) -> float | None:
        return self.ms / self.bound_ms if self.bound_ms > 0 else None

    @property
    def overlap(self) -> float | None:
        """Share of io_busy the compute thread did not wait for (1: all of the I/O hidden)."""
        if self.io_busy_ms <= 0:
            return None
        return max(0.0, 1.0 - self.io_wait_ms / self.io_busy_ms)

    def fields(self) -> dict:
        """The per-token figures as flat JSON fields."""
        return dict(ms_per_token=self.ms, io_wait_ms=self.io_wait_ms, io_busy_ms=self.io_busy_ms,
                    mem_ms=self.mem_ms, compute_ms=self.compute_ms, predict_ms=self.predict_ms,
                    ffn_kernel_ms=self.ffn_ms, other_compute_ms=self.other_ms, disk_idle_ms=self.disk_idle_ms,
                    io_hidden_ms=self.io_hidden_ms, bound_ms=self.bound_ms, bound_ratio=self.ratio,
                    overlap=self.overlap)

    def line(self) -> str:
        ov = "-" if self.overlap is None else f"{100 * self.overlap:.0f} %"
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        return (f"{self.ms:.2f} ms = I/O wait {self.io_wait_ms:.2f} + memory mgmt {self.mem_ms:.2f} + compute "
                f"{self.compute_ms:.2f} (predictors {self.predict_ms:.2f}, FFN kernels {self.ffn_ms:.2f}, other "
                f"{self.other_ms:.2f}); I/O busy {self.io_busy_ms:.2f} ms (hidden {self.io_hidden_ms:.2f}) + disk "
                f"idle {self.disk_idle_ms:.2f}, overlap {ov}; {ratio} max(I/O busy, compute)")


def critical_path(seconds: float, tokens: int, *, io_wait_s: float, mem_s: float, predict_s: float,
                  io_busy_s: float, ffn_s: float = 0.0) -> CriticalPath:
    """The per-token figures of `tokens` forwards that took `seconds` of wall time in all."""
    n = max(tokens, 1)
    ms = 1e3 * seconds / n
    io_wait, mem = 1e3 * io_wait_s / n, 1e3 * mem_s / n
    return CriticalPath(tokens, ms, io_wait, 1e3 * io_busy_s / n, mem, max(0.0, ms - io_wait - mem),
                        1e3 * predict_s / n, 1e3 * ffn_s / n)
