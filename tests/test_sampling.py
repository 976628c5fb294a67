"""Sampling rules against hand-computed expectations."""
import numpy as np

from flashlm.runtime.sampling import Sampler, SamplingParams

LOGITS = np.array([1.0, 3.0, 2.9, -1.0, 0.5], np.float32)


def _counts(params, n=3000, history=()):
    s = Sampler(params)
    return np.bincount([s(LOGITS, list(history)) for _ in range(n)], minlength=LOGITS.size)


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS, []) == 1


def test_top_k_one_is_greedy_and_top_k_limits_support():
    assert _counts(SamplingParams(temperature=1.0, top_k=1, seed=0), 200)[1] == 200
    c = _counts(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert set(np.nonzero(c)[0]) == {1, 2}


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = np.exp(LOGITS - LOGITS.max())
    p /= p.sum()                       # sorted: 1 (0.46), 2 (0.42), 0 (0.06), ...
    c = _counts(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert set(np.nonzero(c)[0]) == {1, 2}
    assert p[1] < 0.5 < p[1] + p[2]


def test_min_p_drops_tokens_below_fraction_of_best():
    c = _counts(SamplingParams(temperature=1.0, min_p=0.2, seed=0))
    assert set(np.nonzero(c)[0]) == {1, 2}          # exp(1-3)=0.135 < 0.2


def test_temperature_sampling_matches_softmax():
    c = _counts(SamplingParams(temperature=1.0, seed=1), 20000)
    p = np.exp(LOGITS - LOGITS.max())
    np.testing.assert_allclose(c / c.sum(), p / p.sum(), atol=0.015)


def test_repetition_penalty_as_hf():
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5))
    assert s(LOGITS, [1]) == 2                      # 3.0/1.5 = 2.0 < 2.9
    assert s(np.array([-1.0, -1.2], np.float32), [0]) == 1   # -1*1.5 = -1.5 < -1.2


def test_seed_reproducible():
    a = _counts(SamplingParams(temperature=1.0, seed=5), 50)
    b = _counts(SamplingParams(temperature=1.0, seed=5), 50)
    assert (a == b).all()


def test_generation_config_defaults_and_overrides():
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 40}
    p = SamplingParams.from_generation_config(gen, temperature=None, top_k=5)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.9, 5)
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.7}).temperature == 0.0
