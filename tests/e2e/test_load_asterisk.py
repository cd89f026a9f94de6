"""Load through the real Asterisk (tests/e2e/asterisk_load.py): a modest step for CI, and the
instrument's own measuring checked against audio whose damage is known.

The step: 30 concurrent calls originated at 10 per second through Asterisk 22 into a bridge
process (AMI correlation on), every caller talking from its first moment, every gateway session
bursting 2 s of speech at the same moment. The sweep (``python -m tests.e2e.asterisk_load
--calls 20,50,100,200,300``) is the same step at larger N; see the README, "Through a real
Asterisk".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bridge.devtools.gateway_sim import tone

from .asterisk_load import (
    BURST_HZ,
    RATE,
    START_TOLERANCE_MS,
    caller_heard,
    caller_speech,
    gateway_heard,
    run_step,
)

CALLS = 30


# ------------------------------------------------------------------ the instrument's measuring


def test_first_words_lost_are_measured_to_the_sample():
    sent = caller_speech(7, 6.0)
    whole = gateway_heard(sent.tobytes(), sent)
    assert (whole.lost_ms, whole.match, whole.whole) == (0.0, 1.0, True)
    clipped = gateway_heard(sent[2437 * 8 :].tobytes(), sent)  # the first 2.437 s never arrived
    assert clipped.lost_ms == 2437.0 and not clipped.whole
    # Silence in front (a session that got frames before the caller spoke) is not a loss.
    late = gateway_heard(bytes(3200) + sent.tobytes(), sent)
    assert late.lost_ms == 0.0 and late.whole


def test_a_gap_in_the_middle_or_another_callers_voice_is_not_whole():
    sent = caller_speech(3, 6.0)
    gap = np.concatenate([sent[: 3 * RATE], sent[3 * RATE + 800 :]])  # 100 ms lost mid-call
    g = gateway_heard(gap.tobytes(), sent)
    assert g.lost_ms == 0.0 and g.contiguous_ms == 3000.0 and not g.whole
    other = gateway_heard(caller_speech(4, 6.0).tobytes(), sent)
    assert other.lost_ms is None and other.match < 0.5 and not other.whole
    assert not gateway_heard(b"", sent).whole


def test_the_burst_is_found_in_a_recording_with_the_callers_voice_mixed_in():
    voice = caller_speech(1, 5.0).astype(np.int32)
    burst = np.frombuffer(tone(BURST_HZ, 2000, RATE), "<i2").astype(np.int32)
    mixed = voice.copy()
    mixed[RATE : RATE + len(burst)] += burst
    heard = caller_heard(np.clip(mixed, -32767, 32767).astype("<i2").tobytes(), 2000)
    assert heard.whole and abs(heard.burst_frames - 100) <= 1 and heard.hole_ms == 0
    cut = voice.copy()
    cut[RATE : RATE + len(burst) // 2] += burst[: len(burst) // 2]  # only the first second played
    assert not caller_heard(np.clip(cut, -32767, 32767).astype("<i2").tobytes(), 2000).whole
    holed = mixed.copy()
    holed[RATE + 8000 : RATE + 8000 + 480] = voice[RATE + 8000 : RATE + 8000 + 480]  # a 60 ms hole
    assert caller_heard(np.clip(holed, -32767, 32767).astype("<i2").tobytes(), 2000).hole_ms == 60.0


# ------------------------------------------------------------------ the load step


@pytest.mark.timeout(240)
async def test_load_step_through_asterisk_keeps_bursts_and_first_words(asterisk_root: Path, tmp_path: Path):
    r = await run_step(asterisk_root, tmp_path / "load", CALLS, rate=10.0)
    report = f"{r.problems[:5]} {[c for c in r.per_call if not (c['gateway']['whole'] and c['caller']['whole'])][:3]}"
    assert r.originated == r.answered == CALLS, report
    assert r.gateway_sessions == r.sessions_at_burst == CALLS, report
    assert not r.problems, report
    # Every caller heard the whole burst, in real time, though all 30 gateways sent it at once.
    assert r.callers_heard_burst_whole == CALLS, report
    # Every gateway heard its caller from the first word on, frame for frame, to the hangup.
    assert r.gateways_lost_start == 0 and r.lost_ms_max is not None and r.lost_ms_max <= START_TOLERANCE_MS, report
    assert r.gateways_heard_caller_whole == CALLS, report
    # The CPU was measured where it is spent.
    assert r.cpu_s["asterisk"] > 0 and r.cpu_s["bridge"] > 0, r.cpu_s


@pytest.mark.timeout(120)
async def test_a_gateway_slow_to_open_still_hears_the_first_words(asterisk_root: Path, tmp_path: Path):
    """A gateway that takes 3 s to open (a loaded service, or a slow AMI channel_wait before it):
    the caller spoke from the first moment, and the gateway must still hear every word of it."""
    r = await run_step(asterisk_root, tmp_path / "slow", 4, rate=4.0, settle_s=5.0, gateway_open_delay_s=3.0)
    report = f"{r.problems[:5]} {[c['gateway'] for c in r.per_call]}"
    assert r.answered == r.gateway_sessions == 4 and not r.problems, report
    assert r.callers_heard_burst_whole == 4, report
    # The caller's audio is held while the gateway opens, bounded by time (PRECONNECT_HOLD_S in
    # bridge/session.py), not by a frame count: a 100-frame cap lost the first second here.
    assert r.gateways_lost_start == 0 and r.lost_ms_max is not None and r.lost_ms_max <= START_TOLERANCE_MS, report
    assert r.gateways_heard_caller_whole == 4, report
