"""The aivoco adapter against its strict simulator, on loopback, without the Bridge."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import socketio

from bridge.devtools.gateway_sim import speechlike, tone
from bridge.devtools.sim_aivoco import AivocoSim
from bridge.gateway.aivoco import AivocoGateway
from bridge.gateway.base import AudioOut, Closed, GatewayError, RemoteHangup, SessionSetup, ToolCall, Transcript

KEY = "test-key"
TOOLS = [{"name": "lookup", "description": "Find an order",
          "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}]


def _setup(**kw: Any) -> SessionSetup:
    return SessionSetup(provider="aivoco", sample_rate=16000, system_prompt="Be brief.", tools=TOOLS, **kw)


@pytest.fixture
async def sim() -> AsyncIterator[AivocoSim]:
    async with AivocoSim(accepted_keys={KEY}, echo=False) as s:
        yield s


class Reader:
    """Collects a gateway's events in a task."""

    def __init__(self, gw: AivocoGateway) -> None:
        self.events: list[Any] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(gw))

    async def _run(self, gw: AivocoGateway) -> None:
        async for ev in gw.events():
            self.events.append(ev)
            self.changed.set()

    async def wait(self, pred: Any, timeout: float = 5) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                self.changed.clear()
                await self.changed.wait()

    def audio(self) -> bytes:
        return b"".join(e.pcm for e in self.events if isinstance(e, AudioOut))


async def _connected(sim: AivocoSim, **kw: Any) -> tuple[AivocoGateway, Reader]:
    assert sim.url is not None
    gw = AivocoGateway(sim.url, KEY, connect_timeout=5, **kw)
    await gw.connect(_setup())
    return gw, Reader(gw)


async def test_setup_and_greeting_at_24k(sim: AivocoSim) -> None:
    gw, reader = await _connected(sim)
    try:
        session = await sim.next_session()
        start = await session.wait_accepted()
        assert start["auth_key"] == KEY and start["voice_choice"] == "female"
        assert start["custom_functions"][0]["parameters"][0] == {
            "name": "n", "type": "number", "description": "An integer", "required": True}
        assert session.violations == [] and (gw.sample_rate, gw.output_rate) == (16000, 24000)
        await reader.wait(lambda e: isinstance(e, Transcript) and e.text == sim.greeting)
        assert reader.audio() == speechlike(sim.greeting or "", sim.speech_ms(sim.greeting or ""), 24000)
    finally:
        await gw.close()


async def test_auth_failure_is_a_quick_gateway_error_without_the_key(sim: AivocoSim) -> None:
    assert sim.url is not None
    gw = AivocoGateway(sim.url, "wrong-secret-key", connect_timeout=10)
    t0 = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await gw.connect(_setup())
    assert time.monotonic() - t0 < 3
    assert "authentication failed: Invalid API key" in str(info.value) and "wrong-secret-key" not in str(info.value)
    session = await sim.next_session()
    await asyncio.wait_for(session.closed.wait(), 5)  # the adapter let go of the connection
    assert session.auth_failed and session.violations == [] and session.audio_bytes_total == 0


async def test_unreachable_service_is_a_gateway_error() -> None:
    gw = AivocoGateway("ws://127.0.0.1:9", KEY, connect_timeout=3)
    with pytest.raises(GatewayError, match="cannot connect"):
        await gw.connect(_setup())


async def test_audio_intact_both_ways(sim: AivocoSim) -> None:
    gw, reader = await _connected(sim)
    try:
        session = await sim.next_session()
        await session.wait_accepted()
        await reader.wait(lambda e: isinstance(e, Transcript))  # greeting over
        rng = np.random.default_rng(1)
        up = rng.integers(-20000, 20000, 16000, dtype=np.int16).astype("<i2").tobytes()  # 1 s at 16 kHz
        for off in range(0, len(up), 640):
            gw.send_audio(up[off:off + 640])
        assert await session.wait_audio(len(up)) == up
        assert session.violations == []
        assert gw.stats["bytes_up"] == len(up) and gw.stats["frames_up"] == len(up) // 640
        down = rng.integers(-20000, 20000, 24000, dtype=np.int16).astype("<i2").tobytes()  # 1 s at 24 kHz
        before = len(reader.audio())
        await session.send_audio(down, chunk_ms=100)
        async with asyncio.timeout(5):
            while len(reader.audio()) < before + len(down):
                reader.changed.clear()
                await reader.changed.wait()
        assert reader.audio()[before:] == down
    finally:
        await gw.close()


async def test_audio_is_held_until_session_ready() -> None:
    async with AivocoSim(accepted_keys={KEY}, greeting=None) as sim:
        gw = AivocoGateway(sim.url or "", KEY)
        frame = b"\x01\x00" * 320
        gw.send_audio(frame)  # before connect: held, not sent to a session that is not ready
        await gw.connect(_setup())
        session = await sim.next_session()
        gw.send_audio(frame)
        assert await session.wait_audio(1280) == frame * 2
        assert session.violations == []
        await gw.close()


async def test_tool_round_trip_exactly_once(sim: AivocoSim) -> None:
    gw, reader = await _connected(sim)
    try:
        session = await sim.next_session()
        await session.wait_accepted()
        task = asyncio.create_task(session.call_tool("lookup", {"n": 7.0}, call_id="c-1"))
        call = await reader.wait(lambda e: isinstance(e, ToolCall))
        assert call == ToolCall("c-1", "lookup", {"n": 7}) and isinstance(call.args["n"], int)
        await gw.send_tool_result("c-1", '{"status": "shipped"}')
        assert await asyncio.wait_for(task, 5) == '{"status": "shipped"}'
        msg = await session.wait_message("function_response")
        assert msg["function_name"] == "lookup"
        with pytest.raises(TimeoutError):
            await session.wait_message("function_response", timeout=0.3)
        assert session.violations == []
    finally:
        await gw.close()


async def test_session_ended_is_a_remote_hangup_then_clean_close(sim: AivocoSim) -> None:
    gw, reader = await _connected(sim)
    try:
        session = await sim.next_session()
        await session.wait_accepted()
        await session.hangup()
        await reader.wait(lambda e: isinstance(e, RemoteHangup))
        closed = await reader.wait(lambda e: isinstance(e, Closed))
        assert closed.clean
        await asyncio.wait_for(reader.task, 5)
    finally:
        await gw.close()


async def test_hangup_sends_stop_call_and_leaves(sim: AivocoSim) -> None:
    gw, reader = await _connected(sim)
    session = await sim.next_session()
    await session.wait_accepted()
    await gw.hangup()
    await session.wait_message("stop_call")
    await asyncio.wait_for(session.closed.wait(), 5)
    assert session.closed_by == "client" and session.stopped and session.violations == []
    closed = await reader.wait(lambda e: isinstance(e, Closed))
    assert closed.clean


async def test_dropped_connection_is_unclean_and_never_restarts_the_call(sim: AivocoSim) -> None:
    gw, reader = await _connected(sim)
    try:
        session = await sim.next_session()
        await session.wait_accepted()
        session.drop()
        closed = await reader.wait(lambda e: isinstance(e, Closed), timeout=10)
        assert closed.clean is False and "connection lost" in closed.reason
        await asyncio.wait_for(session.closed.wait(), 10)
        assert session.closed_by is None
        gw.send_audio(b"\x01\x00" * 320)  # a dead gateway drops quietly
        # No reconnection: no second connection, no second start_call (give a client that
        # would reconnect its default first delay, and then some).
        with pytest.raises(TimeoutError):
            await sim.next_session(timeout=2.5)
        assert sim.start_calls == 1 and len(sim.sessions) == 1
    finally:
        await gw.close()


async def test_bad_payloads_are_ignored_and_the_call_goes_on(sim: AivocoSim) -> None:
    gw, reader = await _connected(sim)
    try:
        session = await sim.next_session()
        await session.wait_accepted()
        await reader.wait(lambda e: isinstance(e, Transcript))
        before = len(reader.audio())
        await session.send_raw_text("this is not a payload")
        await session.emit("audio_response", {"audio_data": base64.b64encode(b"\x01\x02\x03").decode()})
        await session.emit("audio_response", {"audio_data": "@@@"})
        await session.emit("text_response", ["no"])
        await session.emit("function_called", {"function_name": "lookup"})
        await session.emit("no_such_event", {"x": 1})
        await session.emit("error", {"message": "slow down", "type": "rate_limit_exceeded"})
        await session.send_audio(b"\x05\x00" * 480)
        await session.emit("text_response", {"text": "still here"})
        await reader.wait(lambda e: isinstance(e, Transcript) and e.text == "still here")
        assert reader.audio()[before:] == b"\x05\x00" * 480
        assert not any(isinstance(e, Closed | RemoteHangup) for e in reader.events)
    finally:
        await gw.close()


async def test_fatal_error_after_ready_is_a_remote_error(sim: AivocoSim) -> None:
    gw, reader = await _connected(sim)
    try:
        session = await sim.next_session()
        await session.wait_accepted()
        await session.emit("error", {"message": "Insufficient credits", "type": "insufficient_credits"})
        ev = await reader.wait(lambda e: type(e).__name__ == "RemoteError")
        assert "insufficient_credits" in ev.message
    finally:
        await gw.close()


async def test_echo_returns_caller_speech_at_24k() -> None:
    async with AivocoSim(accepted_keys={KEY}, greeting=None) as sim:
        gw, reader = await _connected(sim)
        try:
            speech = tone(300, 1000, 16000) + bytes(2 * 16000)  # 1 s of "speech", 1 s of silence
            for off in range(0, len(speech), 640):
                gw.send_audio(speech[off:off + 640])
            ev = await reader.wait(lambda e: isinstance(e, Transcript) and e.text.startswith("(echo"))
            seconds = float(ev.text.split()[1])
            assert 0.9 < seconds <= 1.0
            assert abs(len(reader.audio()) - round(seconds * 24000) * 2) <= 4
        finally:
            await gw.close()


async def test_simulator_is_strict() -> None:
    """A raw client breaking the protocol: every breach is refused and recorded."""
    async with AivocoSim(accepted_keys={KEY}, greeting=None) as sim:
        client = socketio.AsyncClient(reconnection=False, handle_sigint=False)
        errors: list[Any] = []
        got = asyncio.Event()

        def on_error(data: Any) -> None:
            errors.append(data)
            got.set()

        client.on("error", on_error)
        await client.connect(sim.url or "", transports=["websocket"])
        try:
            session = await sim.next_session()

            async def expect_error(event: str, data: Any) -> Any:
                got.clear()
                await client.emit(event, data)
                await asyncio.wait_for(got.wait(), 5)
                return errors[-1]

            assert (await expect_error("audio_data", {"audio_data": "AAAA", "has_audio": True,
                                                      "max_amplitude": 0.1}))["type"] == "session_not_active"
            bad = await expect_error("start_call", {"auth_key": KEY, "system_message": 3, "voice_choice": "alloy",
                                                    "custom_functions": [{"name": "x", "parameters": [{"name": "a",
                                                                          "type": "integer"}]}]})
            assert KEY not in bad["message"]
            for needle in ("system_message", "voice_choice", "custom_functions[0]: missing field 'description'",
                           "type must be one of string, number, boolean"):
                assert needle in bad["message"]
            assert not session.accepted
        finally:
            await client.disconnect()
        assert any("before session_ready" in v for v in session.violations)
        assert any("invalid start_call" in v for v in session.violations)


async def test_simulator_refuses_bad_audio_after_ready() -> None:
    async with AivocoSim(accepted_keys={KEY}, greeting=None) as sim:
        gw, _reader = await _connected(sim)
        try:
            session = await sim.next_session()
            await session.wait_accepted()
            sio = gw._sio
            await sio.emit("audio_data", {"audio_data": base64.b64encode(b"\x01\x02\x03").decode(),
                                          "has_audio": True, "max_amplitude": 0.5})
            await sio.emit("audio_data", {"audio_data": "AAAAAA==", "has_audio": 1, "max_amplitude": 1.5})
            await session.wait_message("audio_data")
            await session.wait_message("audio_data")
            assert session.audio_bytes_total == 0
            assert any("not whole 16-bit samples" in v for v in session.violations)
            assert any("has_audio must be a boolean" in v and "max_amplitude" in v for v in session.violations)
        finally:
            await gw.close()
