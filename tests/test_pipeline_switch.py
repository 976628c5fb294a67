"""The pipeline switch (runtime/pipeline_switch.py) keeps the faster lookahead setting it measured
(exactness of a run that switches mid-sequence: tests/test_flash_modes.py)."""
import pytest

from flashlm.runtime.pipeline_switch import PipelineSwitch


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _drive(switch, clock, n, ms_on, ms_off):
    """n decode tokens whose duration depends on the setting the switch gave them; returns the settings."""
    got = []
    for _ in range(n):
        on = switch.decode_token()
        got.append(on)
        clock.t += 1e-3 * (ms_on if on else ms_off)
    return got


def test_switch_keeps_the_faster_setting_and_retries():
    for ms_on, ms_off, want in ((80.0, 100.0, True), (120.0, 100.0, False)):
        clock = FakeClock()
        sw = PipelineSwitch(pattern=(True, False, False, True), warm=2, every=5, clock=clock)
        assert _drive(sw, clock, 2, ms_on, ms_off) == [True, True]                  # warming: the default
        assert _drive(sw, clock, 4, ms_on, ms_off) == [True, False, False, True]    # the trial, ABBA
        assert sw.trials == 0
        assert _drive(sw, clock, 5, ms_on, ms_off) == [want] * 5     # decided from the trial's medians
        assert sw.last == pytest.approx((ms_on, ms_off)) and sw.trials == 1
        assert _drive(sw, clock, 4, ms_on, ms_off) == [True, False, False, True]    # retried after `every`
        assert _drive(sw, clock, 1, ms_on, ms_off) == [want] and sw.trials == 2


def test_switch_drops_interrupted_intervals():
    clock = FakeClock()
    sw = PipelineSwitch(pattern=(True, False), warm=0, every=100, clock=clock)
    assert sw.decode_token() is True
    clock.t += 0.05
    sw.interrupt()                       # a prompt chunk ran: the on token's 50 ms + the chunk are dropped
    clock.t += 10.0
    assert sw.decode_token() is False
    clock.t += 0.1
    assert sw.decode_token() is True     # no "on" sample: nothing decided, the default kept
    assert sw.trials == 0 and sw.last is None



def test_stats_line_says_what_the_switch_decided():
    from types import SimpleNamespace
    from flashlm.runtime.cli import _switch_line
    from flashlm.runtime.ffn import FFNStats
    sw = PipelineSwitch()
    st = FFNStats(decode_tokens=20, lookahead_tokens=8)
    assert _switch_line(SimpleNamespace(switch=sw, stats=st)) == [
        "lookahead switch:    on for 8 of 20 decode tokens; no trial decided yet"]
    sw.last = (120.04, 100.0)
    assert _switch_line(SimpleNamespace(switch=sw, stats=st))[0].endswith("last trial 120.0 ms/token on vs 100.0 off")
    assert _switch_line(SimpleNamespace(switch=None, stats=st)) == []         # --no-pipeline, --pipeline-always
