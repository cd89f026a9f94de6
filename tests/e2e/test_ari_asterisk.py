"""The bridge against a real Asterisk 22 in ARI mode: Stasis, External Media over RTP, ARI call control.

The same checks as the AudioSocket path (test_bridge_asterisk.py), through the other way in. A
call is an AMI Originate (the *test's* AMI client: the bridge has no AMI at all here) of a Local
channel whose ``;1`` half runs ``Stasis(voxbridge,${AS_PROFILE},${AS_VARS})`` and whose ``;2``
half is the caller (plays a WAV, records what it hears with MixMonitor). The bridge answers the
StasisStart with an External Media channel sending RTP to one of its ports, bridged with the caller.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.devtools.dial import analyse, tone
from bridge.devtools.gateway_sim import GatewaySim
from bridge.devtools.gateway_sim import tone as sim_tone

from . import checks
from .ami_client import AmiClient
from .asterisk import AsteriskSandbox
from .checks import (
    dtmf_reaches_the_caller,
    hangup_ends_the_channel,
    heard_tone,
    session_for,
    transfer_is_refused_then_done,
)
from .conftest import free_port
from .test_sandbox import is_user_event, wait_recording

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

KEY = "e2e-key"

#: A caller who presses 5 after a second, then listens (DTMF reaches the ;1 half through the Local channel).
DTMF_CALLER = """
[voxbridge-test-dtmf]
exten => caller,1,Answer()
 same => n,MixMonitor(${REC_FILE})
 same => n,Wait(1.5)
 same => n,SendDTMF(5)
 same => n,Wait(${WAIT_AFTER})
 same => n,Hangup()
"""


@pytest.fixture
def ari_asterisk(make_asterisk):
    return make_asterisk(DTMF_CALLER, http_port=free_port(), rtp_ports=(31000, 31499))


@pytest.fixture
async def ami(ari_asterisk: AsteriskSandbox):
    client = await AmiClient.connect("127.0.0.1", ari_asterisk.ami_port, ari_asterisk.ami_username,
                                     ari_asterisk.ami_secret)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def sim():
    s = GatewaySim(accepted_keys={KEY})
    await s.start()
    yield s
    await s.stop()


def ari_config(asterisk: AsteriskSandbox, sim: GatewaySim, fmt: str = "ulaw") -> Config:
    return Config.model_validate({
        "ingress": "ari",
        "ari": {"url": asterisk.ari_url, "username": asterisk.ari_username, "password": asterisk.ari_password,
                "format": fmt, "rtp": {"ports": "41000-41099"}, "reconnect_max": 1.0},
        "gateway": {"url": sim.url, "api_key": KEY, "settle_ms": 0},
        "api": {"enabled": False},
        "allow": {"transfer": ["voxbridge-transfer,100"]},
        "profiles": {
            "default": {"first_message": None, "tools": ["transfer", "hangup", "send_dtmf", "end_call"],
                        "dtmf": {"5": {"tool": "transfer", "args": {"extension": "100"}}}},
            "sales": {"first_message": None, "prompt": "Sales for {customer}.", "tools": []},
        },
    })


@pytest.fixture(params=["ulaw", "slin16"])
async def bridge(request, ari_asterisk: AsteriskSandbox, sim: GatewaySim):
    b = Bridge(ari_config(ari_asterisk, sim, request.param))
    await b.start()
    await asyncio.wait_for(b.ari.client.connected.wait(), 10)
    yield b
    await b.stop()
    assert b.sessions == {}
    assert b.ari is None


@pytest.fixture
async def ulaw_bridge(ari_asterisk: AsteriskSandbox, sim: GatewaySim):
    b = Bridge(ari_config(ari_asterisk, sim))
    await b.start()
    await asyncio.wait_for(b.ari.client.connected.wait(), 10)
    yield b
    await b.stop()
    assert b.sessions == {}


async def place_call(ami: AmiClient, asterisk: AsteriskSandbox, play_pcm: bytes, wait_after: float = 6,
                     variables: dict[str, str] | None = None, caller: str = "voxbridge-test") -> tuple[str, str]:
    """A call into the Stasis extension (no profile or variables unless given)."""
    return await checks.place_call(ami, asterisk, play_pcm, wait_after,
                                   {"AS_PROFILE": "", "AS_VARS": "", **(variables or {})},
                                   context="voxbridge-ari", caller_context=caller)


async def test_caller_audio_reaches_the_gateway_over_rtp(bridge, sim, ari_asterisk, ami):
    as_uuid, _rec = await place_call(ami, ari_asterisk, tone(1000, 1500, 8000), wait_after=2)
    session = await sim.next_session(10)
    call = await session_for(bridge, as_uuid)
    assert call.channel is not None and call.channel.name.startswith("Local/caller@voxbridge-test-")
    assert call.channel.driver is not None and call.channel.driver.via == "ARI"
    assert call.caller_rate == (16000 if bridge.config.ari.format == "slin16" else 8000)
    await checks.gateway_heard_the_caller(session)
    await asyncio.wait_for(call.ended.wait(), 5)
    assert call.end_reason == "caller-hangup"
    leg = call.leg
    assert leg.stats.wrong_source == 0 and leg.stats.duplicates == 0
    media = call.info()["media"]["leg"]  # what the API and the console show of the RTP leg
    assert media["received"] >= 60 and media["delivered"] >= 60 and media["wrong_source"] == 0


async def test_a_burst_from_the_gateway_is_heard_paced_in_real_time(bridge, sim, ari_asterisk, ami):
    as_uuid, rec = await place_call(ami, ari_asterisk, tone(300, 200, 8000), wait_after=4)
    session = await sim.next_session(10)
    cfg = await session.wait_accepted()
    await session_for(bridge, as_uuid)
    # 2 s, sent in a burst, at the rate the call asked the gateway for (16 kHz for a slin16 call)
    await session.send_audio(sim_tone(440, 2000, cfg["sample_rate"]), chunk_ms=1000)
    pcm = await wait_recording(ami, ari_asterisk, rec, timeout=20)
    loud = heard_tone(pcm, 440)
    heard_s = len(loud) * 0.02
    # Paced at 20 ms over RTP the caller hears all of it (written at once, Asterisk drops most).
    assert 1.8 < heard_s < 2.3, heard_s


async def test_barge_in_cuts_the_ai_off_at_once(ulaw_bridge, sim, ari_asterisk, ami):
    as_uuid, rec = await place_call(ami, ari_asterisk, tone(300, 200, 8000), wait_after=5)
    session = await sim.next_session(10)
    await session.wait_accepted()
    await session_for(ulaw_bridge, as_uuid)
    await session.send_audio(sim_tone(440, 4000, 8000), chunk_ms=1000)  # 4 s queued
    await asyncio.sleep(1.0)
    await session.clear()  # the caller spoke: the service says stop
    pcm = await wait_recording(ami, ari_asterisk, rec, timeout=20)
    heard_s = len(heard_tone(pcm, 440)) * 0.02
    assert 0.7 < heard_s < 1.6, heard_s  # about the 1 s before the clear, not the 4 s queued


async def test_transfer_through_ari_and_a_forbidden_target_is_refused(ulaw_bridge, sim, ari_asterisk, ami):
    as_uuid, _ = await place_call(ami, ari_asterisk, tone(300, 200, 8000), wait_after=8)
    session = await sim.next_session(10)
    await session.wait_accepted()
    call = await session_for(ulaw_bridge, as_uuid)
    await transfer_is_refused_then_done(ulaw_bridge, session, call, ami)  # continued once, there
    await _released(ulaw_bridge)


async def test_hangup_through_ari_ends_the_channel(ulaw_bridge, sim, ari_asterisk, ami):
    as_uuid, _ = await place_call(ami, ari_asterisk, tone(300, 200, 8000), wait_after=8)
    session = await sim.next_session(10)
    await session.wait_accepted()
    call = await session_for(ulaw_bridge, as_uuid)
    await hangup_ends_the_channel(session, call, ami)
    await _released(ulaw_bridge)


async def test_the_session_ending_returns_the_caller_to_the_dialplan(ulaw_bridge, sim, ari_asterisk, ami):
    as_uuid, _ = await place_call(ami, ari_asterisk, tone(300, 200, 8000), wait_after=8)
    session = await sim.next_session(10)
    await session.wait_accepted()
    call = await session_for(ulaw_bridge, as_uuid)
    mark = ami.mark()
    await session.hangup()  # the AI ends the conversation: the dialplan goes on after Stasis()
    ev = await ami.wait_event(is_user_event("VoxbridgeReturned", as_uuid), timeout=5, since=mark)
    assert ev["Status"] == "SUCCESS"
    await asyncio.wait_for(call.ended.wait(), 5)
    await _released(ulaw_bridge)


async def test_send_dtmf_through_ari(ulaw_bridge, sim, ari_asterisk, ami):
    as_uuid, _ = await place_call(ami, ari_asterisk, tone(300, 200, 8000), wait_after=6)
    session = await sim.next_session(10)
    await session.wait_accepted()
    await session_for(ulaw_bridge, as_uuid)
    await dtmf_reaches_the_caller(session, ami)


async def test_a_dtmf_shortcut_from_the_caller_runs_its_tool(ulaw_bridge, sim, ari_asterisk, ami):
    mark = ami.mark()
    as_uuid, _ = await place_call(ami, ari_asterisk, b"", wait_after=6, caller="voxbridge-test-dtmf")
    await sim.next_session(10)
    call = await session_for(ulaw_bridge, as_uuid)
    # "5" is a shortcut to transfer to 100: the caller's key press, through ARI, moves the call.
    await ami.wait_event(lambda e: e.get("UserEvent") == "VoxbridgeTransferred", timeout=10, since=mark)
    await asyncio.wait_for(call.ended.wait(), 5)
    assert call.end_reason == "transferred:voxbridge-transfer,100"


async def test_the_dialplan_chooses_the_profile_through_stasis_arguments(ulaw_bridge, sim, ari_asterisk, ami):
    as_uuid, _ = await place_call(ami, ari_asterisk, tone(300, 200, 8000), wait_after=3,
                                  variables={"AS_PROFILE": "sales", "AS_VARS": "customer=Ana%20Lima"})
    session = await sim.next_session(10)
    cfg = await session.wait_accepted()
    assert cfg["system_prompt"] == "Sales for Ana Lima."
    assert ulaw_bridge.sessions[as_uuid].profile_name == "sales"


async def test_asterisk_restart_mid_call_then_a_new_call_works(ulaw_bridge, sim, ari_asterisk, ami):
    bridge = ulaw_bridge
    as_uuid, _ = await place_call(ami, ari_asterisk, tone(300, 200, 8000), wait_after=20)
    await sim.next_session(10)
    call = await session_for(bridge, as_uuid)
    await ami.close()
    # Killed, not stopped: Asterisk says nothing (a stop would hang the channel up and send
    # StasisEnd). The event stream drops; once Asterisk is back, the resync finds the channel gone.
    ari_asterisk.kill()
    assert not call.ended.is_set()
    await asyncio.to_thread(ari_asterisk.start)
    await asyncio.wait_for(call.ended.wait(), 20)
    assert call.end_reason.startswith("connection-lost"), call.end_reason
    async with asyncio.timeout(20):
        while not (bridge.ari.client.connected.is_set() and bridge.ari.client.connects >= 2):
            await asyncio.sleep(0.05)
    await _released(bridge)
    fresh = await AmiClient.connect("127.0.0.1", ari_asterisk.ami_port, ari_asterisk.ami_username,
                                    ari_asterisk.ami_secret)
    try:
        as_uuid2, _ = await place_call(fresh, ari_asterisk, tone(1000, 1000, 8000), wait_after=2)
        session = await sim.next_session(10)
        call2 = await session_for(bridge, as_uuid2)
        async with asyncio.timeout(15):
            await session.closed.wait()
        assert analyse(bytes(session.audio), 8000)["dominant_hz"] == pytest.approx(1000, abs=15)
        await asyncio.wait_for(call2.ended.wait(), 5)
    finally:
        await fresh.close()
    await _released(bridge)


async def _released(bridge: Bridge, timeout: float = 5) -> None:
    """Every call's ARI leftovers are gone: no call, no External Media channel, no port held."""
    async with asyncio.timeout(timeout):
        while bridge.ari.calls or bridge.ari.ports.in_use:
            await asyncio.sleep(0.02)


async def test_a_dropped_event_stream_reconnects_and_live_calls_carry_on_untouched(ulaw_bridge, sim, ari_asterisk, ami):
    bridge = ulaw_bridge
    as_uuid, _ = await place_call(ami, ari_asterisk, tone(1000, 3000, 8000), wait_after=2)
    session = await sim.next_session(10)
    call = await session_for(bridge, as_uuid)
    await session.wait_audio(3200, timeout=10)  # 200 ms of the caller
    channels_before = await bridge.ari.client.request("GET", "/channels")
    await bridge.ari.client.drop_connection()  # the stream drops; Asterisk keeps the call in Stasis
    async with asyncio.timeout(10):
        while bridge.ari.client.connects < 2 or not bridge.ari.client.connected.is_set():
            await asyncio.sleep(0.02)
    # The resync found the call's channels alive: nothing ended, nothing set up again.
    assert not call.ended.is_set() and as_uuid in bridge.sessions
    heard = len(session.audio)
    await session.wait_audio(heard + 8000, timeout=10)  # the caller is still heard after the reconnect
    assert len(await bridge.ari.client.request("GET", "/channels")) == len(channels_before)
    async with asyncio.timeout(15):
        await session.closed.wait()
    await asyncio.wait_for(call.ended.wait(), 5)
    assert call.end_reason == "caller-hangup"
    await _released(bridge)
