"""Next-token choice from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed."""
from __future__ import annotations

from dataclasses import dataclass, fields

import math

import numpy as np

from .errors import FlashlmError


class SamplingError(FlashlmError, ValueError):
    """A sampling parameter outside its range (from the command line or the model's generation_config)."""


@dataclass
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    min_p: float = 0.0            # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, gen: dict, *, where: str = "generation_config", **overrides) -> "SamplingParams":
        """The model's generation_config.json defaults (HF semantics), then explicit overrides (None = keep).
        Every value is checked (`where` names the defaults' source in errors)."""
        p = cls()
        if not isinstance(gen, dict):
            raise SamplingError(f"{where}: must be an object")
        if gen.get("do_sample", True) is False:
            p.temperature = 0.0
        elif gen.get("temperature") is not None:
            p.temperature = gen["temperature"]
        for key in ("top_k", "top_p", "min_p", "repetition_penalty"):
            if gen.get(key) is not None:
                setattr(p, key, gen[key])
        p.check(where)
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if value is not None and key in names:
                setattr(p, key, value)
        p.check("sampling options")
        return p

    def check(self, where: str) -> None:
        """Raise SamplingError naming the first value outside its range."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        rules = {
            "temperature": (number(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            "top_k": (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
                      "an integer >= 0"),
            "top_p": (number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            "min_p": (number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            "repetition_penalty": (number(self.repetition_penalty) and self.repetition_penalty > 0,
                                   "a finite number > 0"),
            "seed": (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                           and self.seed >= 0), "an integer >= 0"),
        }
        for key, (ok, what) in rules.items():
            if not ok:
                raise SamplingError(f"{where}: {key} must be {what}, got {getattr(self, key)!r}")
        self.temperature, self.top_p, self.min_p = float(self.temperature), float(self.top_p), float(self.min_p)
        self.repetition_penalty = float(self.repetition_penalty)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.params
        logits = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and history:
            # As HF/llama.cpp: divide positive logits, multiply negative ones, once per distinct token.
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits / p.temperature
        idx = np.arange(logits.size)
        if 0 < p.top_k < logits.size:
            idx = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
        order = idx[np.argsort(-logits[idx], kind="stable")]
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        keep = probs.size
        if p.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int(np.count_nonzero(probs >= p.min_p * probs[0]))))
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(keep, p=probs)])
