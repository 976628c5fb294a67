"""Whether the lookahead pays on this machine now: decided by paired decode tokens with it on and off.

Why a whole-token measurement: the per-layer rule (ffn.guess_pays) weighs a guess's over-fetched rows
against the read time it hides, but it cannot see what reads running beside the kernels cost the
kernels and each other. On a 2-core machine whose disk reads cost CPU (~35-44 us per 12 KiB O_DIRECT
read in the guest kernel, docs/BENCHMARKS.md) the lookahead's overlap took CPU from the compute threads
and slowed the reads themselves (I/O busy 367 -> 492 ms per token for 6% more bytes on the 7B-class
model at 50%, idle): the always-on pipeline was 0.84x `--no-pipeline`.

Why paired, sequential and biased to "off" (session 6's lesson): the first design compared the medians
of 6 + 6 token times and kept the lower; on this disk (the host caches the virtual disk, a row read
before comes back 3-5x faster than one never read) a token's time swings more than the effect, and
that trial picked the lookahead in two of three children at idle, where it lost 1.3-1.6x. So now:
  - the setting outside trials starts OFF: without evidence the run is `--no-pipeline`'s;
  - a trial is a run of pairs of adjacent tokens, one on and one off (order alternating, ABBA: a trend
    such as caches filling falls on both sides alike); each pair gives one ratio on/off, so slow drift
    (load, the disk's cache state) cancels inside a pair instead of entering the comparison;
  - the lookahead is adopted only if it won ACCEPT_WINS of PAIRS pairs and the median ratio is at most
    1 - MARGIN (a one-sided sign test: 7 of 8 by chance has p = 0.035); the trial stops as soon as that
    can no longer happen (two lost pairs), so where the lookahead cannot pay a trial costs 2-3 tokens
    with it on;
  - every verdict "off" doubles the gap to the next trial (RETRIAL, 2 x RETRIAL, ... up to MAX_GAP
    tokens), so a machine where it never pays spends well under 1 % of its tokens in trials; a verdict
    "on" keeps the gap at RETRIAL (the load changes).
The switch also keeps, per setting, the trial tokens' counts (I/O wait, reads, bytes, reader CPU) that
the backend hands it, so `--stats` / bench rows can say what the lookahead bought and cost, measured.
A token's result never depends on the setting (the lookahead changes what is read and when, not what
is computed), so switching mid-sequence is exact.
"""
from __future__ import annotations

import statistics
import time

WARM_TOKENS = 4          # decode tokens before the first trial: the neuron caches fill from empty
PAIRS = 8                # pairs of (on, off) adjacent tokens in a full trial
ACCEPT_WINS = 7          # ... of which the lookahead must win to be adopted
MARGIN = 0.05            # ... with the median on/off ratio <= 1 - MARGIN
RETRIAL = 64             # decode tokens between a verdict and the next trial
MAX_GAP = 1024           # the gap after repeated "off" verdicts grows up to this


def trial_order(pairs: int) -> tuple[bool, ...]:
    """The lookahead setting per trial token: pairs alternate (on, off), (off, on), ... (ABBA)."""
    return tuple(s for p in range(pairs) for s in ((True, False) if p % 2 == 0 else (False, True)))


class PipelineSwitch:
    """Call decode_token() at the start of every decode token (it says whether the lookahead runs for
    it) and interrupt() when anything else than decode tokens happened since (a prompt chunk): the
    interval then is not a token's time and is dropped (with the pair it belonged to)."""

    def __init__(self, *, pairs: int = PAIRS, accept_wins: int = ACCEPT_WINS, margin: float = MARGIN,
                 warm: int = WARM_TOKENS, every: int = RETRIAL, max_gap: int = MAX_GAP, clock=time.perf_counter):
        if not 0 < accept_wins <= pairs:
            raise ValueError("accept_wins must be in 1..pairs")
        self.pairs, self.accept_wins, self.margin = pairs, accept_wins, margin
        self.every, self.max_gap, self.clock = every, max_gap, clock
        self.order = trial_order(pairs)
        self.on = False                  # the setting outside trials: off until a trial shows it pays
        self.trials = 0                  # trials decided so far
        self.trial_tokens = 0            # tokens run inside trials (their cost)
        self.last = None                 # (median ms on, median ms off) of the last decided trial's pairs
        self.last_pairs = None           # (pairs won by the lookahead, pairs compared) of that trial
        self.counts = {True: None, False: None}   # per setting: summed per-token count deltas of trial tokens
        self.count_tokens = {True: 0, False: 0}
        self._gap = every
        self._wait = warm                # tokens until the next trial starts
        self._pos = None                 # index into self.order while a trial runs, else None
        self._ratios: list[float] = []   # one on/off ratio per completed pair of this trial
        self._ms = {True: [], False: []}
        self._half = None                # (setting, seconds) of a pair's first token
        self._start = None               # (time, setting, in a trial, counts) of the token in progress

    def interrupt(self) -> None:
        self._start = None
        self._half = None                # the pair lost its first half: it is not compared

    def decode_token(self, counts: tuple | None = None) -> bool:
        """counts: the backend's cumulative counters now (any tuple of numbers, the same every call);
        per setting, self.counts sums over the trial tokens (the token's ms, *the counters' deltas)."""
        now = self.clock()
        if self._start is not None:
            t0, setting, trial, c0 = self._start
            if trial:
                self._sample(setting, now - t0, c0, counts)
        self._start = None
        if self._pos is not None and (self._pos >= len(self.order) or self._hopeless()):
            self._decide()
        if self._pos is None:
            if self._wait > 0:
                self._wait -= 1
                self._start = (now, self.on, False, counts)
                return self.on
            self._pos, self._ratios, self._ms, self._half = 0, [], {True: [], False: []}, None
        setting = self.order[self._pos]
        self._pos += 1
        self.trial_tokens += 1
        self._start = (now, setting, True, counts)
        return setting

    # -- the trial
    def _sample(self, setting: bool, seconds: float, c0, c1) -> None:
        if c0 is not None and c1 is not None:
            d = (1e3 * seconds, *(b - a for a, b in zip(c0, c1)))
            old = self.counts[setting]
            self.counts[setting] = d if old is None else tuple(a + b for a, b in zip(old, d))
            self.count_tokens[setting] += 1
        self._ms[setting].append(seconds)
        if self._half is None or self._half[0] == setting:
            self._half = (setting, seconds)
            return
        on_s = seconds if setting else self._half[1]
        off_s = self._half[1] if setting else seconds
        self._ratios.append(on_s / off_s if off_s > 0 else 1.0)
        self._half = None

    def _wins(self) -> int:
        return sum(r < 1.0 for r in self._ratios)

    def _hopeless(self) -> bool:
        """The lookahead can no longer win accept_wins of the pairs (lost ones, dropped ones count)."""
        done = self._pos // 2            # pairs started and completed (compared or dropped)
        lost = done - self._wins()
        return lost > self.pairs - self.accept_wins

    def _decide(self) -> None:
        wins, n = self._wins(), len(self._ratios)
        adopt = (n == self.pairs and wins >= self.accept_wins
                 and statistics.median(self._ratios) <= 1.0 - self.margin)
        if self._ms[True] and self._ms[False]:
            self.last = (1e3 * statistics.median(self._ms[True]), 1e3 * statistics.median(self._ms[False]))
        self.last_pairs = (wins, n)
        self.trials += 1
        self.on = adopt
        self._gap = self.every if adopt else min(2 * self._gap, self.max_gap) if self.trials > 1 else self.every
        self._wait = self._gap
        self._pos = None
