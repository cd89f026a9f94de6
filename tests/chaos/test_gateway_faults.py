"""The gateway fails under a live call: the caller hears the fallback, never dead air.

Two ways a gateway fails mid-call that the bridge must tell apart from a normal end:

* its process dies: the TCP connection is reset or closed with no WebSocket close frame;
* it goes silent (half-open: a NAT or firewall dropped the flow, the host froze): no close of
  any kind ever arrives. Only the bridge's keepalive (``gateway.keepalive_interval`` /
  ``gateway.keepalive_timeout``) can notice that.

Either way the profile's fallback runs: its ``message_wav`` is played to the caller, then
AudioSocket 0x00 ends the session so the dialplan continues (to a human, in the shipped one).
The gateway sits behind :class:`~tests.chaos.conftest.ChaosProxy`, which injects the faults.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.devtools.dial import tone, write_wav
from bridge.devtools.gateway_sim import tone as sim_tone

from .conftest import accepted, tone_frames, wait_tone

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]

AI_HZ = 500  # what the AI "says"
FALLBACK_HZ = 1200  # the fallback message
FALLBACK_MS = 1000


@pytest.fixture
def fallback_wav(tmp_path):
    path = tmp_path / "fallback.wav"
    write_wav(path, tone(FALLBACK_HZ, FALLBACK_MS, 8000), 8000)
    return path


def ended_reasons(events) -> list[str]:
    out = []
    while not events.queue.empty():
        e = events.queue.get_nowait()
        if e.type == "call.ended":
            out.append(e.data["reason"])
    return out


@pytest.mark.parametrize("how", ["rst", "fin"])
async def test_gateway_killed_mid_call_caller_hears_the_fallback_then_the_dialplan(
        make_bridge, sim, proxy, dial, fallback_wav, how):
    bridge = await make_bridge(gateway={"url": proxy.url},
                               profile={"first_message": None, "fallback": {"message_wav": str(fallback_wav)}})
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    session = await accepted(sim)
    # 5 s of AI speech, sent as a burst: most of it is still queued for the caller when the gateway dies.
    await session.send_audio(sim_tone(AI_HZ, 5000, 8000), chunk_ms=500)
    await wait_tone(caller, AI_HZ, since=0, frames=10, timeout=5)  # the AI is audibly talking

    killed_at = time.monotonic()
    proxy.kill(how)

    assert await caller.wait_ended(10) == "hangup-frame"  # 0x00: the dialplan continues
    fallback = tone_frames(caller, FALLBACK_HZ, since=killed_at)
    assert len(fallback) >= 0.9 * FALLBACK_MS / 20, f"only {len(fallback)} frames of the fallback message heard"
    assert fallback[0] - killed_at < 1.0, f"the fallback started {fallback[0] - killed_at:.2f} s after the gateway died"
    # What the dead gateway had queued is dropped for the message, not played after it or over it.
    assert tone_frames(caller, AI_HZ, since=fallback[0]) == []
    assert caller.ended_at >= fallback[-1]  # the whole message, then 0x00
    async with asyncio.timeout(5):
        while str(caller.uuid) in bridge.sessions:
            await bridge.sessions[str(caller.uuid)].ended.wait()
    reasons = ended_reasons(events)
    assert len(reasons) == 1 and reasons[0].startswith("fallback"), reasons


async def test_half_open_gateway_is_noticed_by_keepalive_and_the_caller_hears_the_fallback(
        make_bridge, sim, proxy, dial, fallback_wav):
    interval, timeout = 0.5, 1.0
    # The keepalive's own cost beyond interval + timeout: closing a connection nobody answers
    # (the WebSocket close handshake is bounded by the adapter) and one playout tick.
    slack = 3.0
    bridge = await make_bridge(
        gateway={"url": proxy.url, "keepalive_interval": interval, "keepalive_timeout": timeout},
        profile={"first_message": None, "fallback": {"message_wav": str(fallback_wav)}},
    )
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    session = await accepted(sim)
    await session.send_audio(sim_tone(AI_HZ, 300, 8000))
    await wait_tone(caller, AI_HZ, since=0, frames=10, timeout=5)

    # A gateway that answers pings but says nothing is healthy: a quiet spell of several
    # keepalive periods must not end the call.
    await asyncio.sleep(2 * (interval + timeout))  # an observation window, not synchronisation
    assert not caller.ended.is_set() and not session.closed.is_set(), "a quiet but healthy gateway was dropped"
    assert tone_frames(caller, FALLBACK_HZ) == []

    frozen_at = time.monotonic()
    proxy.freeze()  # from now on nothing is read or forwarded either way, and no FIN or RST arrives
    bound = interval + timeout + slack
    try:
        heard = await wait_tone(caller, FALLBACK_HZ, since=frozen_at, timeout=bound + 2)
    except TimeoutError as exc:
        pytest.fail(f"a half-open gateway was not noticed within {bound + 2:g} s (keepalive_interval {interval:g} s, "
                    f"keepalive_timeout {timeout:g} s): {exc}")
    noticed = heard[0] - frozen_at
    assert noticed <= bound, f"half-open gateway noticed after {noticed:.2f} s (bound {bound:g} s)"
    assert await caller.wait_ended(FALLBACK_MS / 1000 + 5) == "hangup-frame"
    assert len(tone_frames(caller, FALLBACK_HZ, since=frozen_at)) >= 0.9 * FALLBACK_MS / 20
    async with asyncio.timeout(5):
        while str(caller.uuid) in bridge.sessions:
            await bridge.sessions[str(caller.uuid)].ended.wait()
    reasons = ended_reasons(events)
    assert len(reasons) == 1 and reasons[0].startswith("fallback"), reasons
