"""What the real-Asterisk tests of both ways in (AudioSocket, ARI) look at the same way."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import numpy as np
import pytest

from bridge.devtools.dial import analyse

from .ami_client import AmiClient


async def place_call(ami: AmiClient, asterisk: Any, play_pcm: bytes, wait_after: float = 6,
                     variables: dict[str, str] | None = None, *, context: str = "voxbridge-ai", exten: str = "ai",
                     caller_context: str = "voxbridge-test") -> tuple[str, str]:
    """A call from ``Local/caller@<caller_context>`` (plays ``play_pcm``, records what it hears) into
    ``<context>,<exten>``, named by a fresh AS_UUID; returns (that UUID, the recording's chroot path)."""
    as_uuid = str(uuid.uuid4())
    play = asterisk.write_wav(f"play-{as_uuid[:8]}", play_pcm)
    rec = asterisk.recording_path(f"rec-{as_uuid[:8]}.wav")
    resp = await ami.originate_caller(play, rec, wait_after, {"AS_UUID": as_uuid, **(variables or {})},
                                      context=context, exten=exten, caller_context=caller_context)
    assert resp["Response"] == "Success", resp
    return as_uuid, rec


async def gateway_heard_the_caller(session: Any, hz: int = 1000, played_s: float = 1.5) -> None:
    """Once the caller hung up after its Wait() (the gateway is told), the gateway had heard the
    caller's tone, about as long as it was played (Asterisk sends nothing during Wait())."""
    async with asyncio.timeout(15):
        await session.closed.wait()
    stats = analyse(bytes(session.audio), 8000)
    assert stats["dominant_hz"] == pytest.approx(hz, abs=15)
    assert played_s - 0.4 < stats["non_silent_s"] < played_s + 0.4
    assert any(m.get("type") == "hangup" for m in session.messages)


async def session_for(bridge: Any, call_id: str, timeout: float = 10) -> Any:
    """The bridge's session of ``call_id`` once its gateway is connected."""
    async with asyncio.timeout(timeout):
        while call_id not in bridge.sessions or bridge.sessions[call_id].gateway is None:
            await asyncio.sleep(0.02)
    return bridge.sessions[call_id]


def heard_tone(pcm: bytes, hz: int) -> np.ndarray:
    """Indices of the 20 ms frames of an 8 kHz recording where ``hz`` stands out (MixMonitor mixes
    both directions: this finds the bridge's tone among the caller's own sound)."""
    x = np.frombuffer(pcm, "<i2").astype(float)
    frames = x[: len(x) // 160 * 160].reshape(-1, 160)
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(160), axis=1))
    b = round(hz / 50)
    return np.where(spectrum[:, b] > 50 * np.median(spectrum[:, b] + 1))[0]


async def dtmf_heard(ami: AmiClient, since: int, count: int, timeout: float = 5) -> list[str]:
    """The next ``count`` digits Asterisk reports (DTMFEnd) after event index ``since``."""
    digits = []
    async with asyncio.timeout(timeout):
        while len(digits) < count:
            ev = await ami.wait_event(lambda e: e.get("Event") == "DTMFEnd", since=since, timeout=timeout)
            since = ami.events.index(ev) + 1
            digits.append(ev["Digit"])
    return digits


# The same call-control checks for both ways in: the AI's tool calls, seen from Asterisk's side.


async def transfer_is_refused_then_done(bridge: Any, session: Any, call: Any, ami: AmiClient) -> None:
    """A transfer outside the allowlist is refused and touches nothing; one inside it moves the
    caller's channel (VoxbridgeTransferred on it), ends the call once, and the dialplan never
    sees the call return (no VoxbridgeReturned)."""
    mark = ami.mark()
    refused = json.loads(await session.call_tool("transfer", {"extension": "666", "context": "voxbridge-forbidden"}))
    assert "not allowed" in refused["error"]
    assert call.call_id in bridge.sessions and not call.end_reason  # untouched
    assert not ami.find_events(lambda e: e.get("UserEvent") == "VoxbridgeForbiddenReached", since=mark)
    result = json.loads(await session.call_tool("transfer", {"extension": "100", "after_speech": False}))
    assert result == {"status": "transferred", "context": "voxbridge-transfer", "extension": "100"}
    ev = await ami.wait_event(lambda e: e.get("UserEvent") == "VoxbridgeTransferred", timeout=5, since=mark)
    assert ev["Channel"] == call.channel.name  # the caller's channel, now in the target extension
    await asyncio.wait_for(call.ended.wait(), 5)
    assert call.end_reason == "transferred:voxbridge-transfer,100"
    assert not ami.find_events(
        lambda e: e.get("UserEvent") == "VoxbridgeReturned" and e.get("UUID") == call.call_id, since=mark)


async def hangup_ends_the_channel(session: Any, call: Any, ami: AmiClient) -> None:
    """The AI's hangup hangs the caller's channel up (cause 16) and ends the call as ai-hangup."""
    mark = ami.mark()
    assert "hung up" in await session.call_tool("hangup", {"after_speech": False})
    ev = await ami.wait_event(lambda e: e.get("Event") == "Hangup" and e.get("Channel") == call.channel.name,
                              timeout=5, since=mark)
    assert ev["Cause"] == "16"
    await asyncio.wait_for(call.ended.wait(), 5)
    assert call.end_reason.startswith("ai-hangup")


async def dtmf_reaches_the_caller(session: Any, ami: AmiClient) -> None:
    """The AI's send_dtmf plays its digits on the caller's channel, in order."""
    mark = ami.mark()
    assert await session.call_tool("send_dtmf", {"digits": "42"}) == "ok: sent 42"
    assert await dtmf_heard(ami, mark, 2) == ["4", "2"]
