"""The OpenAI Realtime adapter against its strict reference simulator, without the Bridge.

The simulator builds every server event from the ``openai`` package's models and validates every
client event against them; each test ends by checking it recorded no violation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge import g711
from bridge.devtools.gateway_sim import silence, tone
from bridge.devtools.sim_openai import OpenAIRealtimeSim, OpenAIRealtimeSimSession
from bridge.gateway.base import (
    AudioOut,
    ClearPlayback,
    GatewayError,
    GatewayEvent,
    RemoteError,
    SessionSetup,
    ToolCall,
    Transcript,
)
from bridge.gateway.openai_realtime import OpenAIRealtimeGateway

KEY = "sk-test"


class Call:
    """The adapter plus a consumer standing in for the session: collects events and keeps a fake
    playout clock (``heard``; a ClearPlayback moves it to everything received, as the playout does)."""

    def __init__(self, gw: OpenAIRealtimeGateway) -> None:
        self.gw = gw
        self.queue: asyncio.Queue[GatewayEvent] = asyncio.Queue()
        self.received_s = 0.0
        self.heard: float | None = None  # None: the caller heard everything received
        gw.playout_position = lambda: self.received_s if self.heard is None else self.heard
        self.task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        async for event in self.gw.events():
            if isinstance(event, AudioOut):
                self.received_s += len(event.pcm) / 2 / (self.gw.output_rate or self.gw.sample_rate)
            elif isinstance(event, ClearPlayback):
                self.heard = None  # cleared: the stream position moves past the dropped audio
            self.queue.put_nowait(event)

    async def next(self, kind: type[Any], timeout: float = 5) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.queue.get()
                if isinstance(event, kind):
                    return event

    async def audio(self, nbytes: int, timeout: float = 5) -> bytes:
        out = bytearray()
        while len(out) < nbytes:
            out += (await self.next(AudioOut, timeout)).pcm
        return bytes(out)


@pytest.fixture
async def sim() -> AsyncIterator[OpenAIRealtimeSim]:
    async with OpenAIRealtimeSim(accepted_keys={KEY}) as s:
        yield s


async def open_call(sim: OpenAIRealtimeSim, rate: int = 8000, **kw: Any) -> tuple[Call, OpenAIRealtimeSimSession]:
    setup_kw = {k: kw.pop(k) for k in ("first_message", "tools") if k in kw}
    gw = OpenAIRealtimeGateway(sim.url, kw.pop("key", KEY), **kw)
    call = Call(gw)
    await gw.connect(SessionSetup(provider="openai", sample_rate=rate, system_prompt="Be brief.",
                                  caller_rate=rate, **setup_kw))
    call.task = asyncio.create_task(call._pump())
    session = await sim.next_session()
    await session.wait_accepted()
    return call, session


async def finish(call: Call, session: OpenAIRealtimeSimSession) -> None:
    await call.gw.hangup()
    await asyncio.wait_for(session.closed.wait(), 5)
    assert call.task is not None
    await asyncio.wait_for(call.task, 5)
    assert session.closed_by == "client" and session.close_code == 1000
    assert session.violations == []


def send_frames(gw: OpenAIRealtimeGateway, pcm: bytes) -> None:
    frame = gw.sample_rate * 2 // 50
    for off in range(0, len(pcm), frame):
        gw.send_audio(pcm[off: off + frame])


@pytest.mark.parametrize(("rate", "wire_rate", "fmt"), [(8000, 8000, "audio/pcmu"), (16000, 24000, "audio/pcm")])
async def test_session_update_first_and_audio_intact_both_ways(sim: OpenAIRealtimeSim, rate: int, wire_rate: int,
                                                               fmt: str) -> None:
    call, session = await open_call(sim, rate)
    assert session.messages[0]["type"] == "session.update"
    assert session.config is not None and session.config["audio"]["input"]["format"]["type"] == fmt
    assert (call.gw.sample_rate, call.gw.output_rate) == (wire_rate, wire_rate)
    assert (session.input_rate, session.output_rate) == (wire_rate, wire_rate)
    # Caller -> service: below the sim's VAD threshold, so no response interferes.
    caller = tone(300, 400, wire_rate, amplitude=0.01)
    send_frames(call.gw, caller)
    got = await session.wait_audio(len(caller))
    expected = g711.decode(g711.encode(caller)) if fmt == "audio/pcmu" else caller
    assert got == expected
    # Service -> caller: a 1 s burst arrives whole, in order.
    ai = tone(440, 1000, wire_rate)
    await session.send_audio(ai)
    assert await call.audio(len(ai)) == (g711.decode(g711.encode(ai)) if fmt == "audio/pcmu" else ai)
    await finish(call, session)


async def test_greeting_is_a_response_create_spoken_by_the_service(sim: OpenAIRealtimeSim) -> None:
    call, session = await open_call(sim, first_message="Welcome to Acme.")
    create = await session.wait_message("response.create")
    assert "Welcome to Acme." in create["response"]["instructions"]
    assert (await call.next(Transcript)) == Transcript("assistant", "Welcome to Acme.", True)
    assert call.received_s > 0.3
    await finish(call, session)


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_barge_in_truncates_at_what_the_caller_heard(sim: OpenAIRealtimeSim, rate: int) -> None:
    call, session = await open_call(sim, rate)
    item_id = await session.send_audio(tone(440, 2000, session.output_rate))
    await call.audio(2 * session.output_rate * 2)
    assert session.item_audio_ms[item_id] == 2000
    call.heard = 0.730  # the caller has heard 730 ms of the 2 s item
    # The caller speaks: the service's VAD hears it and says speech_started.
    send_frames(call.gw, tone(300, 400, call.gw.sample_rate, amplitude=0.3))
    await call.next(ClearPlayback)
    truncate = await session.wait_message("conversation.item.truncate")
    assert truncate["item_id"] == item_id
    assert abs(truncate["audio_end_ms"] - 730) <= 20
    assert session.truncates == [(item_id, truncate["audio_end_ms"])]
    await finish(call, session)


async def test_function_call_round_trip(sim: OpenAIRealtimeSim) -> None:
    call, session = await open_call(sim, tools=[{"name": "lookup", "description": "d", "parameters": {
        "type": "object", "properties": {"id": {"type": "integer"}}}}])
    assert session.config is not None and session.config["tools"][0]["name"] == "lookup"
    result = asyncio.create_task(session.call_tool("lookup", {"id": 7}, call_id="call_1"))
    tool_call = await call.next(ToolCall)
    assert tool_call == ToolCall("call_1", "lookup", {"id": 7})
    await call.gw.send_tool_result("call_1", '{"status": "shipped"}')
    assert await asyncio.wait_for(result, 5) == '{"status": "shipped"}'
    await session.wait_message("response.create")
    spoken = await call.next(Transcript)
    assert spoken.role == "assistant" and "shipped" in spoken.text
    await finish(call, session)


async def test_bad_arguments_are_answered_with_the_problem(sim: OpenAIRealtimeSim) -> None:
    call, session = await open_call(sim)
    result = asyncio.create_task(session.call_tool("lookup", {}, call_id="call_2", raw_arguments="{oops"))
    tool_call = await call.next(ToolCall)
    assert tool_call.call_id == "call_2" and tool_call.problem and "JSON" in tool_call.problem
    await call.gw.send_tool_result("call_2", "error: " + tool_call.problem)
    assert (await asyncio.wait_for(result, 5)).startswith("error:")
    await finish(call, session)


async def test_caller_speech_is_transcribed_and_echoed(sim: OpenAIRealtimeSim) -> None:
    call, session = await open_call(sim)
    rate = call.gw.sample_rate
    send_frames(call.gw, tone(300, 600, rate) + silence(800, rate))
    user = await call.next(Transcript)
    assert user.role == "user" and user.text.startswith("(speech 0.6")
    echoed = await call.next(Transcript)
    assert echoed.role == "assistant" and echoed.text.startswith("(echo")
    assert call.received_s == pytest.approx(0.6, abs=0.05)
    await finish(call, session)


async def test_non_fatal_error_and_bad_json_keep_the_session(sim: OpenAIRealtimeSim) -> None:
    call, session = await open_call(sim)
    await session.send_error("invalid_value", "something about one request", about="vb_1000")
    await session.send_raw_text("{not json")
    await session.send_raw_text('{"type": "response.output_audio.delta", "item_id": "x", "delta": "%%"}')
    pcm = tone(440, 200, session.output_rate)
    await session.send_audio(pcm)
    assert len(await call.audio(len(pcm))) == len(pcm)
    assert call.queue.empty() or not any(isinstance(e, RemoteError) for e in call.queue._queue)  # type: ignore[attr-defined]
    await finish(call, session)


async def test_a_refused_session_update_ends_the_call(sim: OpenAIRealtimeSim) -> None:
    call, session = await open_call(sim)
    await session.send_error("invalid_value", "bad", about="vb_1")  # vb_1 is the adapter's session.update
    assert isinstance(await call.next(RemoteError), RemoteError)
    await finish(call, session)


async def test_wrong_key_is_refused_at_the_handshake(sim: OpenAIRealtimeSim) -> None:
    gw = OpenAIRealtimeGateway(sim.url, "sk-wrong")
    with pytest.raises(GatewayError, match="401"):
        await gw.connect(SessionSetup(provider="openai", sample_rate=8000, system_prompt="x"))
    assert sim.refused == [(401, "Incorrect API key provided")]
    await gw.close()


async def test_a_key_the_header_cannot_carry_is_refused_without_showing_it(sim: OpenAIRealtimeSim) -> None:
    """websockets quotes a header it refuses, credential included: the error (which becomes the
    call's end reason, in events, webhooks and history) must not carry it."""
    gw = OpenAIRealtimeGateway(sim.url, "sk-SECRET-0123\nX")
    with pytest.raises(GatewayError) as exc:
        await gw.connect(SessionSetup(provider="openai", sample_rate=8000, system_prompt="x"))
    assert "SECRET" not in str(exc.value) and "header" in str(exc.value)
    await gw.close()


async def test_the_sim_refuses_a_misspelt_event_with_an_error_naming_it(sim: OpenAIRealtimeSim) -> None:
    call, session = await open_call(sim)
    await call.gw.send_json({"type": "conversation.item.truncate", "event_id": "ev_bad", "item_id": "x",
                             "content_index": 0, "audio_end_msec": 10})
    async with asyncio.timeout(5):
        while not session.errors_sent:
            await session.wait_message("conversation.item.truncate")
    assert session.errors_sent[-1]["error"]["event_id"] == "ev_bad"
    assert "audio_end_ms: Field required" in session.violations[-1]
    assert "unknown field $.audio_end_msec" in session.violations[-1]
    session.violations.clear()
    await finish(call, session)
