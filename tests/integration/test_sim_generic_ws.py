"""The generic-ws adapter (bridge/gateway/generic_ws.py) against its strict reference server
(bridge/devtools/sim_generic_ws.py), directly: no Bridge, real sockets on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from bridge.devtools.gateway_sim import speechlike, tone
from bridge.devtools.sim_generic_ws import GenericWsSim, ulaw_decode, ulaw_encode, validate_session_init
from bridge.gateway.base import (
    AudioOut,
    ClearPlayback,
    Closed,
    GatewayError,
    RemoteError,
    RemoteHangup,
    ResponseDone,
    SessionSetup,
    ToolCall,
    Transcript,
)
from bridge.gateway.generic_ws import GenericWsGateway

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

SETUP = SessionSetup(provider="generic", sample_rate=8000, system_prompt="Be brief.", voice="v1", language="en")


class Events:
    """Collects a gateway's events in a task; tests wait on predicates over them."""

    def __init__(self, gateway: GenericWsGateway) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(gateway))

    async def _run(self, gateway: GenericWsGateway) -> None:
        async for event in gateway.events():
            self.items.append(event)
            self._changed.set()

    async def wait(self, predicate: Callable[[list[Any]], bool], timeout: float = 5) -> list[Any]:
        async with asyncio.timeout(timeout):
            while not predicate(self.items):
                self._changed.clear()
                await self._changed.wait()
        return self.items

    async def wait_for(self, kind: type, timeout: float = 5) -> Any:
        await self.wait(lambda items: any(isinstance(e, kind) for e in items), timeout)
        return next(e for e in self.items if isinstance(e, kind))

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.items if isinstance(e, kind)]

    def audio(self) -> bytes:
        return b"".join(e.pcm for e in self.of(AudioOut))


@pytest.fixture
async def gateways():
    made: list[tuple[GenericWsGateway, Events]] = []

    async def open_(sim: GenericWsSim, setup: SessionSetup = SETUP, **kw: Any) -> tuple[GenericWsGateway, Events]:
        gw = GenericWsGateway(sim.url, call_id="t", **kw)
        await gw.connect(setup)
        events = Events(gw)
        made.append((gw, events))
        return gw, events

    yield open_
    for gw, events in made:
        await gw.close()
        await asyncio.wait_for(events.task, 5)


def frames(pcm: bytes, rate: int) -> list[bytes]:
    n = 2 * rate // 50
    return [pcm[i:i + n] for i in range(0, len(pcm), n)]


# ---------------------------------------------------------------------------------- set-up


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("ready_event", ["session_started", "ready"])
async def test_setup_first_then_greeting_in_either_variant(gateways, variant, ready_event):
    setup = SessionSetup(provider="g", sample_rate=8000, system_prompt="Be brief.", first_message="Hello there")
    async with GenericWsSim(variant=variant, ready_event=ready_event) as sim:
        _gw, events = await gateways(sim, setup)
        session = await sim.next_session()
        config = await session.wait_accepted()
        assert session.messages[0]["type"] == "session.init"
        assert config["audio_format"] == "g711_ulaw" and config["sample_rate"] == 8000
        assert config["system_prompt"] == "Be brief." and config["vad_enabled"] is True
        assert (await session.wait_message("text.input"))["text"] == "Hello there"
        await events.wait_for(ResponseDone)
        assert events.of(Transcript) == [Transcript("assistant", "Hello there", True)]
        # Speech-like greeting: 60 ms a character, decoded from µ-law to PCM at 8 kHz.
        assert len(events.audio()) == 2 * 8000 * 60 * len("Hello there") // 1000
        assert session.violations == []


# ---------------------------------------------------------------------------------- caller audio


async def test_caller_audio_arrives_intact_as_ulaw(gateways):
    async with GenericWsSim(echo=False) as sim:
        gw, _events = await gateways(sim)
        session = await sim.next_session()
        await session.wait_ready()
        pcm = speechlike("caller", 1000, 8000)
        for frame in frames(pcm, 8000):
            gw.send_audio(frame)
        got = await session.wait_audio(len(pcm))
        assert got == audioop.ulaw2lin(audioop.lin2ulaw(pcm, 2), 2)
        assert session.input_rate == 8000
        assert all(m["format"] == "g711_ulaw" for m in session.messages if m.get("type") == "audio.input")
        assert len([m for m in session.messages if m.get("type") == "audio.input"]) == 50  # one per frame
        assert session.violations == []


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
async def test_caller_audio_arrives_intact_as_pcm16(gateways, rate):
    async with GenericWsSim(echo=False) as sim:
        gw, _events = await gateways(sim, audio_format="pcm16", sample_rate=rate)
        session = await sim.next_session()
        assert (await session.wait_accepted())["sample_rate"] == rate
        await session.wait_ready()
        pcm = speechlike("caller", 600, rate)
        for frame in frames(pcm, rate):
            gw.send_audio(frame)
        assert await session.wait_audio(len(pcm)) == pcm
        assert session.input_rate == rate and session.violations == []


# ---------------------------------------------------------------------------------- AI audio


@pytest.mark.parametrize("variant", ["a", "b"])
async def test_ai_audio_is_decoded_from_ulaw(gateways, variant):
    async with GenericWsSim(variant=variant) as sim:
        _gw, events = await gateways(sim)
        session = await sim.next_session()
        await session.wait_ready()
        pcm = speechlike("reply", 1000, 8000)
        await session.send_audio(pcm, chunk_ms=100)
        await events.wait(lambda _: len(events.audio()) >= len(pcm))
        assert events.audio() == audioop.ulaw2lin(audioop.lin2ulaw(pcm, 2), 2)
        assert len(events.of(AudioOut)) == 10


async def test_ai_audio_pcm16_at_24k_passes_through(gateways):
    async with GenericWsSim(variant="b") as sim:
        gw, events = await gateways(sim, audio_format="pcm16", sample_rate=24000)
        session = await sim.next_session()
        await session.wait_ready()
        pcm = speechlike("reply", 500, 24000)
        await session.send_audio(pcm)
        await events.wait(lambda _: len(events.audio()) >= len(pcm))
        assert events.audio() == pcm
        assert gw.stats["bytes_down"] == len(pcm)


# ---------------------------------------------------------------------------------- barge-in


@pytest.mark.parametrize("variant", ["a", "b"])
async def test_caller_talking_over_the_ai_is_barge_in(gateways, variant):
    async with GenericWsSim(variant=variant, echo=False) as sim:
        gw, events = await gateways(sim)
        session = await sim.next_session()
        await session.wait_ready()
        speaking = asyncio.create_task(session.say("a long answer that goes on and on", ms=3000))
        await events.wait_for(AudioOut)
        for frame in frames(tone(220, 400, 8000), 8000):  # 200 ms of steady voice starts speech
            gw.send_audio(frame)
        await events.wait_for(ClearPlayback)
        await speaking
        assert session.barge_ins == 1
        speech = "user_speech_started" if variant == "a" else "speech_started"
        assert {"type": speech} in session.sent_messages
        # Barge-in, not a speech start in silence: the AI's audio was still playing (by the clock).
        kinds = [type(e) for e in events.items]
        assert kinds.index(ClearPlayback) > kinds.index(AudioOut)
        assert session.is_speaking is False  # the clear reset the sim's playback clock


async def test_scripted_clear_is_barge_in(gateways):
    async with GenericWsSim(variant="b") as sim:
        _gw, events = await gateways(sim)
        session = await sim.next_session()
        await session.clear()
        await events.wait_for(ClearPlayback)


async def test_local_vad_mode_disables_server_speech_events(gateways):
    local = SimpleNamespace(mode="local", threshold=0.5, silence_duration_ms=600, prefix_padding_ms=200)
    async with GenericWsSim() as sim:
        gw, events = await gateways(sim, vad=local)
        assert gw.local_vad is local
        session = await sim.next_session()
        assert (await session.wait_accepted())["vad_enabled"] is False
        await session.wait_ready()
        pcm = tone(220, 600, 8000) + bytes(2 * 8000)
        for frame in frames(pcm, 8000):
            gw.send_audio(frame)
        await session.wait_event("speech_end")
        await events.wait_for(ResponseDone)  # the echo came back
        assert events.of(ClearPlayback) == []
        assert session.violations == []


# ---------------------------------------------------------------------------------- errors and bad input


async def test_non_fatal_error_is_logged_and_the_call_goes_on(gateways, caplog):
    caplog.set_level(logging.WARNING, "voxbridge.gateway")
    async with GenericWsSim() as sim:
        _gw, events = await gateways(sim)
        session = await sim.next_session()
        await session.error("rate limited, retrying", close=False)
        await session.send_json({"type": "error", "message": "no fatal field"})
        await session.transcript("assistant", "still here")
        await events.wait_for(Transcript)
        assert events.of(RemoteError) == [] and events.of(Closed) == []
        assert "rate limited, retrying" in caplog.text and "no fatal field" in caplog.text


async def test_fatal_error_ends_the_call(gateways):
    async with GenericWsSim() as sim:
        _gw, events = await gateways(sim)
        session = await sim.next_session()
        await session.error("model crashed")
        closed = await events.wait_for(Closed)
        assert events.of(RemoteError) == [RemoteError("model crashed")]
        assert closed.code == 1008 and not closed.clean
        assert events.of(RemoteHangup) == []


async def test_bad_messages_are_logged_and_ignored(gateways, caplog):
    caplog.set_level(logging.WARNING, "voxbridge.gateway")
    async with GenericWsSim() as sim:
        _gw, events = await gateways(sim)
        session = await sim.next_session()
        await session.send_raw_text("{not json")
        await session.send_json({"type": "mystery"})
        await session.send_json({"type": "audio_delta", "audio": "%%%"})
        await session.send_json({"type": "transcript", "text": "no role"})
        await session._ws.send(b"\x00\x01")  # a binary frame: not part of the protocol
        await session.transcript("assistant", "after the noise")
        await events.wait_for(Transcript)
        assert events.items == [Transcript("assistant", "after the noise", True)]
        for text in ("invalid JSON", "unknown message type 'mystery'", "not valid base64", "'role'", "binary frame"):
            assert text in caplog.text


async def test_odd_pcm16_audio_is_ignored(gateways, caplog):
    caplog.set_level(logging.WARNING, "voxbridge.gateway")
    async with GenericWsSim() as sim:
        _gw, events = await gateways(sim, audio_format="pcm16", sample_rate=16000)
        session = await sim.next_session()
        await session.wait_accepted()
        await session.send_json({"type": "audio_delta", "audio": base64.b64encode(b"\x01\x02\x03").decode()})
        await session.send_audio(bytes(640))
        await events.wait_for(AudioOut)
        assert events.audio() == bytes(640)
        assert "odd length 3" in caplog.text


# ---------------------------------------------------------------------------------- bearer token


async def test_bearer_token_refused_at_the_handshake():
    async with GenericWsSim(accepted_keys={"s3cret"}) as sim:
        for token in (None, "wrong"):
            gw = GenericWsGateway(sim.url, token=token)
            with pytest.raises(GatewayError, match="401"):
                await gw.connect(SETUP)
            await gw.close()
        assert list(sim.refused) == ["401 no bearer token", "401 bearer token not accepted"]
        assert len(sim.sessions) == 0


async def test_bearer_token_accepted(gateways):
    async with GenericWsSim(accepted_keys={"s3cret"}) as sim:
        await gateways(sim, token="s3cret")
        session = await sim.next_session()
        await session.wait_accepted()
        assert session.token == "s3cret"


# ---------------------------------------------------------------------------------- ready


async def test_audio_is_held_until_ready(gateways):
    setup = SessionSetup(provider="g", sample_rate=8000, system_prompt="", first_message="Hi")
    async with GenericWsSim(ready_delay_ms=300, echo=False) as sim:
        gw, _events = await gateways(sim, setup)
        pcm = speechlike("early", 400, 8000)
        for frame in frames(pcm, 8000):
            gw.send_audio(frame)  # before the server is ready
        session = await sim.next_session()
        assert await session.wait_audio(len(pcm)) == audioop.ulaw2lin(audioop.lin2ulaw(pcm, 2), 2)
        assert session.ready_sent_at is not None
        assert session.audio_chunks[0][0] >= session.ready_sent_at
        assert session.violations == []
        types = [m["type"] for m in session.messages]
        assert types[:3] == ["session.init", "text.input", "audio.input"]  # the first message before audio


async def test_audio_released_after_the_ready_timeout(gateways, caplog):
    caplog.set_level(logging.WARNING, "voxbridge.gateway")
    setup = SessionSetup(provider="g", sample_rate=8000, system_prompt="", first_message="Hi")
    async with GenericWsSim(ready_event=None, echo=False) as sim:
        t0 = time.monotonic()
        gw, _events = await gateways(sim, setup, ready_timeout=0.4)
        pcm = speechlike("early", 200, 8000)
        for frame in frames(pcm, 8000):
            gw.send_audio(frame)
        session = await sim.next_session()
        await session.wait_audio(len(pcm))
        assert session.audio_chunks[0][0] - t0 >= 0.35
        assert session.text_inputs == ["Hi"]
        assert "no session_started/ready within 0.4 s" in caplog.text
        assert session.violations == []


# ---------------------------------------------------------------------------------- hangups and tools


async def test_client_hangup_closes_with_1000(gateways):
    async with GenericWsSim() as sim:
        gw, events = await gateways(sim)
        session = await sim.next_session()
        await session.wait_accepted()
        await gw.hangup()
        await asyncio.wait_for(session.closed.wait(), 5)
        assert session.closed_by == "client" and session.close_code == 1000
        await events.wait_for(Closed)
        assert events.of(RemoteHangup) == []


async def test_server_close_1000_is_a_remote_hangup(gateways):
    async with GenericWsSim() as sim:
        _gw, events = await gateways(sim)
        session = await sim.next_session()
        await session.hangup()
        closed = await events.wait_for(Closed)
        assert closed.code == 1000 and closed.clean
        assert [type(e) for e in events.items][-2:] == [RemoteHangup, Closed]
        assert session.closed_by == "server"


async def test_tool_call_extension_round_trip(gateways):
    tools = [{"name": "lookup", "description": "find an order", "parameters": {"type": "object"}}]
    setup = SessionSetup(provider="g", sample_rate=8000, system_prompt="", tools=tools)
    async with GenericWsSim() as sim:
        gw, events = await gateways(sim, setup)
        session = await sim.next_session()
        assert (await session.wait_accepted())["tools"] == tools
        pending = asyncio.create_task(session.call_tool("lookup", {"id": 7}, call_id="c-1"))
        call = await events.wait_for(ToolCall)
        assert call == ToolCall("c-1", "lookup", {"id": 7})
        await gw.send_tool_result("c-1", "shipped")
        assert await pending == "shipped"
        assert session.violations == []


# ---------------------------------------------------------------------------------- the simulator's strictness


def test_sim_codec_is_bit_exact_with_audioop():
    every = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert ulaw_encode(every) == audioop.lin2ulaw(every, 2)
    assert ulaw_decode(bytes(range(256))) == audioop.ulaw2lin(bytes(range(256)), 2)


GOOD_INIT = {"type": "session.init", "config": {
    "audio_format": "g711_ulaw", "sample_rate": 8000, "channels": 1, "language": "en", "voice": "default",
    "system_prompt": "", "vad_enabled": True, "vad_threshold": 0.6, "vad_silence_duration_ms": 600}}


@pytest.mark.parametrize("change,problem", [
    ({"sample_rate": 16000}, "8000 for g711_ulaw"),
    ({"audio_format": "pcm16", "sample_rate": 44100}, "8000, 16000 or 24000 for pcm16"),
    ({"audio_format": "opus"}, "audio_format"),
    ({"channels": 2}, "channels must be 1"),
    ({"voice": ""}, "voice must be a non-empty string"),
    ({"vad_threshold": 1.5}, "vad_threshold"),
    ({"vad_threshold": None}, "vad_threshold"),
    ({"vad_enabled": "yes"}, "vad_enabled must be true or false"),
    ({"tools": []}, "tools must be a non-empty list"),
    ({"extra": 1}, "unknown field 'extra'"),
])
def test_sim_validates_session_init(change, problem):
    assert validate_session_init(GOOD_INIT) == []
    msg = {"type": "session.init", "config": {**GOOD_INIT["config"], **change}}
    problems = validate_session_init(msg)
    assert any(problem in p for p in problems), problems
    missing = {"type": "session.init", "config": {k: v for k, v in GOOD_INIT["config"].items() if k != "voice"}}
    assert validate_session_init(missing) == ["config.voice is required"]


@pytest.mark.parametrize("second,code,problem", [
    (None, 1008, "invalid session.init"),
    ({"type": "audio.input", "audio": "AAAA", "format": "pcm16"}, 1008, "does not match"),
    ({"type": "audio.input", "audio": "@@@@", "format": "g711_ulaw"}, 1007, "not valid base64"),
])
async def test_sim_refuses_with_a_fatal_error(second, code, problem):
    async with GenericWsSim() as sim:
        async with connect(sim.url) as ws:
            if second is None:
                await ws.send(json.dumps({"type": "session.init", "config": {"audio_format": "g711_ulaw"}}))
            else:
                await ws.send(json.dumps(GOOD_INIT))
                assert json.loads(await ws.recv()) == {"type": "session_started"}
                await ws.send(json.dumps(second))
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error["fatal"] is True and problem in error["message"]
            await ws.wait_closed()
            assert ws.close_code == code
        session = await sim.next_session()
        await asyncio.wait_for(session.closed.wait(), 5)
        assert session.closed_by == "server" and any(problem in v for v in session.violations)


async def test_sim_complains_but_continues_on_unknown_messages():
    async with GenericWsSim() as sim:
        async with connect(sim.url) as ws:
            await ws.send(json.dumps(GOOD_INIT))
            await ws.recv()
            await ws.send(json.dumps({"type": "bogus"}))
            error = json.loads(await ws.recv())
            assert error == {"type": "error", "message": "unknown message type 'bogus'", "fatal": False}
            await ws.send(json.dumps({"type": "text.input", "text": "Hi"}))
            reply = json.loads(await ws.recv())
            assert reply["type"] == "audio_delta"
        session = await sim.next_session()
        assert session.violations == ["unknown message type 'bogus'"]


async def test_sim_records_audio_sent_before_ready():
    async with GenericWsSim(ready_delay_ms=2000) as sim:
        async with connect(sim.url) as ws:
            await ws.send(json.dumps(GOOD_INIT))
            await ws.send(json.dumps({"type": "audio.input", "audio": "/////w==", "format": "g711_ulaw"}))
            session = await sim.next_session()
            await session.wait_audio(8)
        assert "before the server announced it was ready" in session.violations[0]


async def test_sim_variant_b_names_on_the_wire():
    async with GenericWsSim(variant="b", ready_event="ready") as sim:
        async with connect(sim.url) as ws:
            await ws.send(json.dumps(GOOD_INIT))
            assert json.loads(await ws.recv()) == {"type": "ready"}
            await ws.send(json.dumps({"type": "text.input", "text": "Hi"}))
            received = []
            while not received or received[-1]["type"] != "audio_done":
                received.append(json.loads(await ws.recv()))
        assert {m["type"] for m in received} == {"audio_chunk", "transcription", "audio_done"}
        assert {"type": "transcription", "text": "Hi", "speaker": "assistant"} in received
        pcm = ulaw_decode(b"".join(base64.b64decode(m["data"]) for m in received if m["type"] == "audio_chunk"))
        assert pcm == ulaw_decode(ulaw_encode(speechlike("Hi", 400, 8000)))


async def test_cli_options_and_run_from_args(caplog):
    import argparse

    from bridge.devtools.sim_generic_ws import add_arguments, run_from_args

    caplog.set_level(logging.INFO, "voxbridge.sim_generic_ws")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--listen", "127.0.0.1:0", "--api-key", "t", "--variant", "b",
                              "--ready-event", "none", "--ready-delay-ms", "50", "--no-echo"])
    assert (args.listen, args.api_keys, args.variant, args.ready_event, args.ready_delay_ms, args.echo) == (
        ("127.0.0.1", 0), ["t"], "b", "none", 50, False)
    defaults = parser.parse_args([])
    assert (defaults.variant, defaults.ready_event, defaults.echo) == ("a", "session_started", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--variant", "c"])
    task = asyncio.create_task(run_from_args(args))
    async with asyncio.timeout(5):
        while "generic-ws sim listening on ws://127.0.0.1:" not in caplog.text:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "generic-ws sim stopped" in caplog.text
