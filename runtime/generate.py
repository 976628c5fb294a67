"""The generation loop: prompt ids -> prefill -> sample -> decode, as a stream of text pieces.

Layered as in mlx-lm: `generate_step` yields token ids, `stream_generate` yields text with stop handling
and fills a `GenerationStats` record.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Iterator

from .errors import FlashlmError
from .memory import PREFILL_CHUNK   # tokens per prefill forward: a cancelled prompt stops within one chunk
from .model import Model
from .sampling import Sampler, SamplingParams



class PromptError(FlashlmError):
    """A prompt that is empty or longer than the context."""


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class GenerationStats:
    load_s: float = 0.0
    prompt_tokens: int = 0        # tokens actually run through prefill (cached prefix excluded)
    cached_tokens: int = 0        # prompt tokens reused from the KV cache
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0            # decode time after the first token
    ttft_s: float = 0.0           # prefill + first sample
    finish_reason: str = ""
    peak_rss: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tps(self) -> float:
        return (self.gen_tokens - 1) / self.gen_s if self.gen_s and self.gen_tokens > 1 else 0.0

    def lines(self) -> list[str]:
        return [
            f"load time:           {self.load_s:8.2f} s",
            f"prompt eval:         {self.prompt_tokens} tokens in {self.prompt_s:.2f} s "
            f"({self.prompt_tps:.1f} tokens/s){f', {self.cached_tokens} cached' if self.cached_tokens else ''}",
            f"time to first token: {self.ttft_s:8.2f} s",
            f"eval:                {self.gen_tokens} tokens in {self.gen_s:.2f} s ({self.gen_tps:.1f} tokens/s)",
            f"peak RSS:            {self.peak_rss / 2**20:8.1f} MiB",
        ]


def prefill(model: Model, prompt: list[int], stats: GenerationStats, cancel=None):
    """Run the prompt, reusing the longest prefix already in the KV cache; returns last logits [vocab],
    or None if `cancel` was set between two chunks (what ran stays in the cache, for the next prompt)."""
    if not prompt:
        raise PromptError("empty prompt")
    common = 0
    for a, b in zip(model.history, prompt):
        if a != b:
            break
        common += 1
    common = min(common, len(prompt) - 1)       # always run at least one token to get logits
    model.reset(common)
    if len(prompt) > model.ctx_len:
        raise PromptError(f"prompt of {len(prompt)} tokens exceeds the context length {model.ctx_len} (--ctx)")
    t0 = time.perf_counter()
    logits, done = None, common
    for start in range(common, len(prompt), PREFILL_CHUNK):
        if cancel is not None and cancel.is_set():
            break
        logits = model.forward(prompt[start:start + PREFILL_CHUNK], out=model.state.logits)
        done = min(start + PREFILL_CHUNK, len(prompt))
    stats.prompt_s = time.perf_counter() - t0
    stats.prompt_tokens = done - common
    stats.cached_tokens = common
    return logits[-1] if done == len(prompt) else None


def generate_step(model: Model, prompt: list[int], sampler: Sampler, stats: GenerationStats,
                  max_tokens: int, cancel=None) -> Iterator[int]:
    """Yield up to max_tokens sampled ids; the caller stops early by closing the generator (or, during a
    long prefill, by setting `cancel`)."""
    t0 = time.perf_counter()
    logits = prefill(model, prompt, stats, cancel)
    if logits is None:
        stats.finish_reason = "cancelled"
        return
    model.reset_io_stats()
    history = list(prompt)
    for i in range(max_tokens):
        token = sampler(logits, history)
        history.append(token)
        if i == 0:
            stats.ttft_s = time.perf_counter() - t0
            t1 = time.perf_counter()
        stats.gen_tokens = i + 1
        stats.gen_s = time.perf_counter() - t1
        yield token
        if model.pos >= model.ctx_len:
            stats.finish_reason = "context"
            return
        logits = model.forward([token], out=model.state.logits)[-1]


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` might be the start of a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def stream_generate(model: Model, tokenizer, prompt: list[int], params: SamplingParams, *,
                    max_tokens: int = 256, stop: list[str] | tuple = (),
                    stats: GenerationStats | None = None, cancel=None) -> Iterator[str]:
    """Yield text pieces as they become printable; stops on EOS, stop strings or max_tokens.

    `cancel` (a threading.Event, or anything with is_set()) is checked before every token, also those
    that print nothing yet, and between prefill chunks, so a server stops a generation whose client
    went away within one token or one chunk.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.finish_reason = "length"
    decoder = tokenizer.decoder()
    stops = [s for s in stop if s]
    text, emitted = "", 0
    steps = generate_step(model, prompt, Sampler(params), stats, max_tokens, cancel)
    try:
        for token in steps:
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            if tokenizer.is_eos(token):
                stats.finish_reason = "stop"
                break
            text += decoder.step(token)
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)
                stats.finish_reason = "stop"
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text) - _held_back(text, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text += decoder.flush()           # a reply cut inside a UTF-8 character ends as decode() shows it
        if len(text) > emitted:
            yield text[emitted:]
    finally:
        steps.close()
        stats.peak_rss = peak_rss_bytes()
