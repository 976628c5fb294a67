"""The pipeline switch (runtime/pipeline_switch.py): off until paired tokens show the lookahead wins,
a hopeless trial stops early, "off" verdicts back off (exactness of a run that switches mid-sequence:
tests/test_flash_modes.py)."""
import pytest

from flashlm.runtime.pipeline_switch import PipelineSwitch, trial_order


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _drive(switch, clock, n, ms):
    """n decode tokens; ms(setting, i) is the duration of the i-th driven token; returns the settings."""
    got = []
    for i in range(n):
        on = switch.decode_token()
        got.append(on)
        clock.t += 1e-3 * ms(on, i)
    return got


def test_trial_order_is_abba():
    assert trial_order(3) == (True, False, False, True, True, False)


def test_lookahead_that_wins_every_pair_is_adopted_and_retried():
    clock = FakeClock()
    sw = PipelineSwitch(pairs=4, accept_wins=4, warm=2, every=5, clock=clock)
    ms = lambda on, i: 80.0 if on else 100.0
    assert _drive(sw, clock, 2, ms) == [False, False]             # warming: off, as --no-pipeline
    assert _drive(sw, clock, 8, ms) == list(trial_order(4))       # the whole trial
    assert sw.trials == 0
    assert _drive(sw, clock, 5, ms) == [True] * 5                 # adopted: won 4 of 4 pairs by 20 %
    assert sw.last == pytest.approx((80.0, 100.0)) and sw.last_pairs == (4, 4) and sw.trials == 1
    assert _drive(sw, clock, 8, ms) == list(trial_order(4))       # retried after `every`
    assert sw.on and sw.trials == 1 and _drive(sw, clock, 1, ms) == [True] and sw.trials == 2
    assert sw.trial_tokens == 16


def test_a_losing_lookahead_stops_the_trial_early_and_backs_off():
    clock = FakeClock()
    sw = PipelineSwitch(pairs=8, accept_wins=7, warm=0, every=10, max_gap=30, clock=clock)
    ms = lambda on, i: 120.0 if on else 100.0
    # two lost pairs make 7 wins of 8 impossible: the trial ends after 4 tokens, 2 of them on
    assert _drive(sw, clock, 4, ms) == [True, False, False, True]
    assert _drive(sw, clock, 10, ms) == [False] * 10 and sw.trials == 1 and sw.last_pairs == (0, 2)
    assert _drive(sw, clock, 4, ms) == [True, False, False, True]
    assert _drive(sw, clock, 20, ms) == [False] * 20              # the second "off": the gap doubles
    assert _drive(sw, clock, 4, ms) == [True, False, False, True]
    assert _drive(sw, clock, 30, ms) == [False] * 30              # ... up to max_gap
    assert _drive(sw, clock, 1, ms) == [True] and sw.trials == 3 and sw.trial_tokens == 13


def test_noise_that_wins_only_most_pairs_does_not_adopt():
    """On is faster in 6 of 8 pairs by a lot but loses 2: not the 7 of 8 a sign test asks for."""
    clock = FakeClock()
    sw = PipelineSwitch(pairs=8, accept_wins=7, warm=0, every=50, clock=clock)
    lose = {3, 8}                                    # on-tokens 3 and 8 (pairs 1 and 4) are slow
    ms = lambda on, i: (150.0 if i in lose else 60.0) if on else 100.0
    got = _drive(sw, clock, 17, ms)
    assert got[:10] == list(trial_order(8))[:10] and not any(got[10:])   # stopped after the 2nd loss
    assert not sw.on and sw.last_pairs == (3, 5)


def test_a_small_gain_is_not_enough():
    clock = FakeClock()
    sw = PipelineSwitch(pairs=4, accept_wins=4, margin=0.05, warm=0, every=50, clock=clock)
    ms = lambda on, i: 98.0 if on else 100.0                       # wins every pair by 2 % < the margin
    _drive(sw, clock, 9, ms)
    assert sw.trials == 1 and sw.last_pairs == (4, 4) and not sw.on


def test_switch_drops_interrupted_pairs():
    clock = FakeClock()
    sw = PipelineSwitch(pairs=2, accept_wins=1, warm=0, every=100, clock=clock)
    assert sw.decode_token() is True
    clock.t += 0.05
    sw.interrupt()                       # a prompt chunk ran: the on token's 50 ms + the chunk are dropped
    clock.t += 10.0
    assert sw.decode_token() is False    # the pair's second half: nothing to compare it with
    clock.t += 0.1
    assert sw.decode_token() is False
    clock.t += 0.1
    assert sw.decode_token() is True
    clock.t += 0.05
    sw.decode_token()
    assert sw.trials == 1 and sw.last_pairs == (1, 1) and not sw.on      # one pair of two: not adopted


def test_trial_tokens_counts_are_kept_per_setting():
    clock = FakeClock()
    sw = PipelineSwitch(pairs=1, accept_wins=1, warm=1, every=100, clock=clock)
    total = [0.0, 0]
    for i, add in enumerate([(5.0, 10), (3.0, 14), (7.0, 9), (1.0, 1)]):
        sw.decode_token(tuple(total))
        clock.t += 0.1
        total = [total[0] + add[0], total[1] + add[1]]
    # token 0 warming (not kept), token 1 on (3 ms, 14 reads), token 2 off (7, 9); token 3 after the trial
    assert sw.counts == {True: pytest.approx((100.0, 3.0, 14)), False: pytest.approx((100.0, 7.0, 9))}
    assert sw.count_tokens == {True: 1, False: 1}


def test_stats_line_says_what_the_switch_decided():
    from types import SimpleNamespace
    from flashlm.runtime.cli import _switch_line
    from flashlm.runtime.ffn import FFNStats
    sw = PipelineSwitch()
    st = FFNStats(decode_tokens=20, lookahead_tokens=8)
    assert _switch_line(SimpleNamespace(switch=sw, stats=st)) == [
        "lookahead switch:    on for 8 of 20 decode tokens; no trial decided yet"]
    sw.last, sw.last_pairs = (120.04, 100.0), (1, 2)
    assert _switch_line(SimpleNamespace(switch=sw, stats=st))[0].endswith(
        "last trial 120.0 ms/token on vs 100.0 off, on won 1 of 2 pairs")
    assert _switch_line(SimpleNamespace(switch=None, stats=st)) == []         # --no-pipeline, --pipeline-always
