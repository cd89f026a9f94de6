"""The bridge against a real Asterisk 22: audio both ways, AMI tools, channel tracking, reconnects.

Asterisk calls the bridge exactly as in production: an AMI Originate of a Local channel whose
``;1`` half runs the shipped-style AI extension (Answer, AS_UUID, AS_PROFILE, AudioSocket) and
whose ``;2`` half is the "caller" (plays a WAV, records what it hears with MixMonitor).
The test observes Asterisk through its own AMI client (tests/e2e/ami_client.py), independently
of the bridge's.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.devtools.dial import analyse, tone
from bridge.devtools.gateway_sim import GatewaySim
from bridge.devtools.gateway_sim import tone as sim_tone

from .ami_client import AmiClient
from .asterisk import AsteriskSandbox
from .checks import (
    dtmf_reaches_the_caller,
    gateway_heard_the_caller,
    hangup_ends_the_channel,
    heard_tone,
    place_call,
    session_for,
    transfer_is_refused_then_done,
)
from .test_sandbox import wait_recording

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

KEY = "e2e-key"


@pytest.fixture
async def sim():
    s = GatewaySim(accepted_keys={KEY})
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def bridge(asterisk: AsteriskSandbox, sim: GatewaySim):
    cfg = Config.model_validate({
        "audiosocket": {"listen": f"127.0.0.1:{asterisk.audiosocket_port}"},
        "gateway": {"url": sim.url, "api_key": KEY, "settle_ms": 0},
        "api": {"enabled": False},
        "ami": {"enabled": True, "port": asterisk.ami_port, "username": asterisk.ami_username,
                "secret": asterisk.ami_secret, "ping_interval": 1.0, "action_timeout": 3.0},
        "allow": {"transfer": ["voxbridge-transfer,100"], "originate": ["answer", "busy", "noanswer"]},
        "originate": {"channel": "Local/{destination}@voxbridge-outbound", "context": "voxbridge-outbound",
                      "exten": "answer", "ring_timeout": 3},
        "profiles": {
            "default": {"first_message": None, "tools": ["transfer", "hangup", "originate", "send_dtmf", "end_call"]},
            "sales": {"first_message": None, "prompt": "Sales for {customer}; caller {caller_id}.", "tools": []},
        },
    })
    b = Bridge(cfg)
    await b.start()
    await b.ami.wait_connected(10)
    yield b
    await b.stop()
    assert b.sessions == {}


async def test_caller_audio_reaches_the_gateway_through_asterisk(bridge, sim, asterisk, ami):
    as_uuid, _rec = await place_call(ami, asterisk, tone(1000, 1500, 8000), wait_after=2)
    session = await sim.next_session(10)
    call = await session_for(bridge, as_uuid)
    # The channel was found from AMI events: the ;1 half, the one running AudioSocket().
    assert call.channel is not None and call.channel.name.startswith("Local/caller@voxbridge-test-")
    assert call.channel.name.endswith(";1")
    await gateway_heard_the_caller(session)


async def test_gateway_audio_is_heard_by_the_caller_in_real_time(bridge, sim, asterisk, ami):
    as_uuid, rec = await place_call(ami, asterisk, tone(300, 200, 8000), wait_after=4)
    session = await sim.next_session(10)
    await session.wait_accepted()
    await session_for(bridge, as_uuid)
    await session.send_audio(sim_tone(440, 2000, 8000), chunk_ms=1000)  # 2 s, sent in a burst
    pcm = await wait_recording(ami, asterisk, rec, timeout=20)
    loud = heard_tone(pcm, 440)  # MixMonitor mixes both directions: only where the bridge's tone is
    heard_s = len(loud) * 0.02
    frames = np.frombuffer(pcm[: len(pcm) // 320 * 320], "<i2").reshape(-1, 160)
    # Paced at 20 ms the caller hears all of it; written at once, a Local channel drops ~70 %.
    assert 1.8 < heard_s < 2.3, heard_s
    assert analyse(frames[loud].tobytes(), 8000)["dominant_hz"] == pytest.approx(440, abs=10)


async def test_transfer_moves_the_caller_and_a_forbidden_target_is_refused(bridge, sim, asterisk, ami):
    as_uuid, _ = await place_call(ami, asterisk, tone(300, 200, 8000), wait_after=8)
    session = await sim.next_session(10)
    await session.wait_accepted()
    call = await session_for(bridge, as_uuid)
    await transfer_is_refused_then_done(bridge, session, call, ami)


async def test_hangup_tool_ends_the_channel(bridge, sim, asterisk, ami):
    as_uuid, _ = await place_call(ami, asterisk, tone(300, 200, 8000), wait_after=8)
    session = await sim.next_session(10)
    await session.wait_accepted()
    call = await session_for(bridge, as_uuid)
    await hangup_ends_the_channel(session, call, ami)


@pytest.mark.parametrize("destination,outcome", [("answer", "answered"), ("busy", "busy")])
async def test_originate_reports_the_outcome(bridge, sim, asterisk, ami, destination, outcome):
    await place_call(ami, asterisk, tone(300, 200, 8000), wait_after=10)
    session = await sim.next_session(10)
    await session.wait_accepted()
    result = json.loads(await session.call_tool("originate", {"destination": destination}))
    assert result == {"destination": destination, "outcome": outcome}


async def test_originate_to_a_number_not_allowed_is_refused(bridge, sim, asterisk, ami):
    await place_call(ami, asterisk, tone(300, 200, 8000), wait_after=6)
    session = await sim.next_session(10)
    await session.wait_accepted()
    mark = ami.mark()
    result = json.loads(await session.call_tool("originate", {"destination": "0900123456"}))
    assert "not allowed" in result["error"]
    assert not ami.find_events(lambda e: e.get("Event") == "Newchannel" and "0900" in e.get("Channel", ""), since=mark)


async def test_send_dtmf_plays_digits_to_the_caller(bridge, sim, asterisk, ami):
    as_uuid, _ = await place_call(ami, asterisk, tone(300, 200, 8000), wait_after=6)
    session = await sim.next_session(10)
    await session.wait_accepted()
    await session_for(bridge, as_uuid)
    await dtmf_reaches_the_caller(session, ami)


async def test_dialplan_chooses_the_profile_and_fills_the_prompt(bridge, sim, asterisk, ami):
    as_uuid, _ = await place_call(ami, asterisk, tone(300, 200, 8000), wait_after=3,
                                  variables={"AS_PROFILE": "sales", "AS_VARS": "customer=Ana%20Lima"})
    session = await sim.next_session(10)
    cfg = await session.wait_accepted()
    assert cfg["system_prompt"] == "Sales for Ana Lima; caller 5551234."
    assert "tools" not in cfg  # the sales profile offers none
    assert bridge.sessions[as_uuid].profile_name == "sales"


async def test_dial_audiosocket_slin16_variant(bridge, sim, asterisk, ami):
    as_uuid, _ = await place_call(ami, asterisk, tone(1000, 1000, 8000), wait_after=2, exten="ai16")
    session = await sim.next_session(10)
    call = await session_for(bridge, as_uuid)
    await session.wait_audio(8000, timeout=10)
    assert call.caller_rate == 16000
    async with asyncio.timeout(15):
        await session.closed.wait()
    assert analyse(bytes(session.audio), 8000)["dominant_hz"] == pytest.approx(1000, abs=15)


async def test_unknown_uuid_is_refused_when_the_policy_says_so(bridge, asterisk):
    bridge.config.audiosocket.unknown_uuid = "refuse"
    bridge.config.ami.channel_wait = 0.5
    from bridge.devtools.dial import AudioSocketCaller

    caller = AudioSocketCaller()
    await caller.connect("127.0.0.1", asterisk.audiosocket_port)  # no channel claims this UUID
    t0 = time.monotonic()
    assert await caller.wait_ended(5) == "hangup-frame"
    assert time.monotonic() - t0 < 2
    assert bridge.metrics["calls_refused"] == 1
    await caller.aclose()


async def test_bridge_reconnects_after_asterisk_restarts_and_transfer_works(bridge, sim, asterisk, ami):
    assert bridge.ami.connects == 1
    await ami.close()
    await asyncio.to_thread(asterisk.restart)
    async with asyncio.timeout(20):
        while not (bridge.ami.connected.is_set() and bridge.ami.connects == 2):
            await asyncio.sleep(0.05)
    assert bridge.channels.resyncs == 2  # the channel map was rebuilt after the reconnect
    fresh = await AmiClient.connect("127.0.0.1", asterisk.ami_port, asterisk.ami_username, asterisk.ami_secret)
    try:
        as_uuid, _ = await place_call(fresh, asterisk, tone(300, 200, 8000), wait_after=8)
        session = await sim.next_session(10)
        await session.wait_accepted()
        call = await session_for(bridge, as_uuid)
        mark = fresh.mark()
        result = json.loads(await session.call_tool("transfer", {"extension": "100", "after_speech": False}))
        assert result["status"] == "transferred"
        await fresh.wait_event(lambda e: e.get("UserEvent") == "VoxbridgeTransferred", timeout=5, since=mark)
        await asyncio.wait_for(call.ended.wait(), 5)
    finally:
        await fresh.close()


async def test_half_open_ami_connection_is_noticed(bridge, asterisk):
    """Asterisk frozen (SIGSTOP): no FIN, no RST — only an unanswered Ping tells."""
    import os
    import signal

    pid = asterisk.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        async with asyncio.timeout(15):
            while bridge.ami.connected.is_set():
                await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 8  # ping every 1 s, 1 s to answer
        assert "liveness check failed" in (bridge.ami.last_error or "")
    finally:
        os.kill(pid, signal.SIGCONT)
    async with asyncio.timeout(20):
        while not bridge.ami.connected.is_set():
            await asyncio.sleep(0.05)
