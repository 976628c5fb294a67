"""Next-token choice from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed."""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    min_p: float = 0.0            # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingParams":
        """The model's generation_config.json defaults (HF semantics), then explicit overrides (None = keep)."""
        p = cls()
        if gen.get("do_sample", True) is False:
            p.temperature = 0.0
        elif "temperature" in gen:
            p.temperature = float(gen["temperature"])
        for key in ("top_k", "top_p", "min_p", "repetition_penalty"):
            if gen.get(key) is not None:
                setattr(p, key, type(getattr(p, key))(gen[key]))
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if value is not None and key in names:
                setattr(p, key, value)
        return p


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
