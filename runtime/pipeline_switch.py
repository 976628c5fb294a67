"""Whether the lookahead pays on this machine now: decided by timing decode tokens with it on and off.

Why a whole-token measurement: the per-layer rule (ffn.guess_pays) weighs a guess's over-fetched rows
against the read time it hides, but it cannot see what reads running beside the kernels cost the
kernels and each other. On a 2-core machine whose disk reads cost CPU (~20-50 us per 4-12 KiB O_DIRECT
read in the guest kernel, docs/BENCHMARKS.md) the lookahead's overlap took CPU from the compute threads
and raised the reader's own busy time (493 -> 621 ms per token for 3.7% more bytes on the 7B-class
model at 50%): the pipeline was 0.85x `--no-pipeline` although every layer's guess "paid". So the
switch times what matters, the interval between one decode token's start and the next's, with the
lookahead on and off in an interleaved trial (ABBA order, so a trend such as caches still filling falls
on both sides alike), keeps the faster setting, and repeats the trial every RETRIAL tokens because
the machine's load changes. A token's result never depends on the setting (the lookahead changes what
is read and when, not what is computed), so switching mid-sequence is exact.
"""
from __future__ import annotations

import statistics
import time

WARM_TOKENS = 2          # decode tokens before the first trial: the neuron caches fill from empty
TRIAL_PATTERN = (True, False, False, True) * 3   # lookahead on/off per trial token (ABBA: trend-balanced)
RETRIAL = 64             # decode tokens between trials


class PipelineSwitch:
    """Call decode_token() at the start of every decode token (it says whether the lookahead runs for
    it) and interrupt() when anything else than decode tokens happened since (a prompt chunk): the
    interval then is not a token's time and is dropped."""

    def __init__(self, *, pattern=TRIAL_PATTERN, warm: int = WARM_TOKENS, every: int = RETRIAL,
                 clock=time.perf_counter):
        self.pattern, self.warm, self.every, self.clock = tuple(pattern), warm, every, clock
        self.on = True                   # the setting outside trials (the pipeline's default until measured)
        self.trials = 0                  # trials decided so far
        self.last = None                 # (median ms on, median ms off) of the last decided trial
        self._pos = -warm                # tokens into the current trial; < 0: warming; >= len: decided phase
        self._times = {True: [], False: []}
        self._start = None               # (start time, setting, in a trial) of the token in progress

    def interrupt(self) -> None:
        self._start = None

    def decode_token(self) -> bool:
        now = self.clock()
        if self._start is not None:
            t0, setting, trial = self._start
            if trial:
                self._times[setting].append(now - t0)
        n = len(self.pattern)
        if self._pos == n:               # the trial's last token has just finished
            self._decide()
        if 0 <= self._pos < n:
            setting, trial = self.pattern[self._pos], True
        else:
            setting, trial = self.on, False
        self._pos += 1
        if self._pos >= n + self.every:  # the decided phase is over: a new trial
            self._pos = 0
        self._start = (now, setting, trial)
        return setting

    def _decide(self) -> None:
        on, off = self._times[True], self._times[False]
        if on and off:
            m_on, m_off = statistics.median(on), statistics.median(off)
            self.on = m_on <= m_off
            self.last = (1e3 * m_on, 1e3 * m_off)
            self.trials += 1
        # (a side without a sample, every interval interrupted: keep the setting until the next trial)
        self._times = {True: [], False: []}
