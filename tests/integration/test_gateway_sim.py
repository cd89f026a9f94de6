"""Tests of the gateway simulator itself, driven by a plain ``websockets`` client.

The simulator is the reference the bridge is tested against, so these tests pin down the protocol
as implemented (see the docstring of ``bridge.devtools.gateway_sim``). Synchronisation is by awaiting
messages and events, never by sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bridge.devtools.gateway_sim import (
    GatewaySim,
    ScenarioError,
    SessionClosed,
    add_arguments,
    load_scenario,
    parse_scenario,
    run_gateway_sim,
    silence,
    tone,
)

SR = 16000
BYTES_PER_S = SR * 2
FRAME_MS = 20


def make_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "type": "config",
        "apikey": "test-key",
        "provider": "openai",
        "sample_rate": SR,
        "system_prompt": "You are a test.",
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


class Client:
    """A plain WebSocket client that records everything the gateway sends, with arrival times."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.json: list[dict[str, Any]] = []
        self.audio: list[tuple[float, bytes]] = []
        self.texts: list[str] = []
        self.done = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._changed = asyncio.Event()
        self._consumed: dict[str, int] = {}
        self.on_json: Callable[[dict[str, Any]], Any] | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    self.audio.append((time.monotonic(), msg))
                else:
                    self.texts.append(msg)
                    obj = json.loads(msg)
                    self.json.append(obj)
                    if self.on_json is not None:
                        await self.on_json(obj)
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason
            self.done.set()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.done.is_set():
                    raise AssertionError("connection closed while waiting")
                await self._changed.wait()

    def of_type(self, mtype: str) -> list[dict[str, Any]]:
        return [m for m in self.json if m.get("type") == mtype]

    async def wait_json(self, mtype: str, timeout: float = 5, **match: Any) -> dict[str, Any]:
        """The next message of ``mtype`` (matching ``match``) not returned before."""
        key = json.dumps([mtype, match], sort_keys=True)

        def candidates() -> list[dict[str, Any]]:
            found = [m for m in self.of_type(mtype) if all(m.get(k) == v for k, v in match.items())]
            return found[self._consumed.get(key, 0) :]

        await self._wait(lambda: bool(candidates()), timeout)
        found = candidates()[0]
        self._consumed[key] = self._consumed.get(key, 0) + 1
        return found

    def audio_bytes(self) -> int:
        return sum(len(b) for _, b in self.audio)

    async def wait_audio(self, nbytes: int, timeout: float = 5) -> None:
        await self._wait(lambda: self.audio_bytes() >= nbytes, timeout)

    async def wait_closed(self, timeout: float = 5) -> tuple[int | None, str | None]:
        async with asyncio.timeout(timeout):
            await self.done.wait()
        return self.close_code, self.close_reason

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj))

    async def send_pcm(self, pcm: bytes, frame_ms: int = FRAME_MS) -> None:
        """Send as AudioSocket would frame it (but without real-time pacing)."""
        step = 2 * SR * frame_ms // 1000
        for off in range(0, len(pcm), step):
            await self.ws.send(pcm[off : off + step])

    async def aclose(self) -> None:
        await self.ws.close()
        await self._reader


class Env:
    """Starts simulators and clients and tears all of them down."""

    def __init__(self) -> None:
        self.sims: list[GatewaySim] = []
        self.clients: list[Client] = []

    async def sim(self, **kwargs: Any) -> GatewaySim:
        sim = GatewaySim(**kwargs)
        await sim.start()
        self.sims.append(sim)
        return sim

    async def client(self, url: str, config: dict[str, Any] | None = None) -> Client:
        ws = await connect(url, compression=None)
        client = Client(ws)
        self.clients.append(client)
        if config is not None:
            await client.send_json(config)
        return client

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        for sim in self.sims:
            await sim.stop()


@pytest.fixture
async def env():
    e = Env()
    try:
        yield e
    finally:
        await e.aclose()
    # Everything the simulator (and the clients) started must be gone.
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert leftover == []


# ---------------------------------------------------------------------------------------------
# Handshake and config
# ---------------------------------------------------------------------------------------------


async def test_other_paths_are_404(env: Env) -> None:
    sim = await env.sim()
    with pytest.raises(InvalidStatus) as info:
        await connect(sim.url.replace("/ws", "/other"))
    assert info.value.response.status_code == 404


async def test_api_key_query_is_recorded_not_used(env: Env) -> None:
    sim = await env.sim(accepted_keys={"good"})
    client = await env.client(sim.url + "?apiKey=good", make_config(apikey="bad"))
    assert (await client.wait_json("error"))["message"] == "unauthorized"
    session = await sim.next_session()
    assert session.query_api_key == "good"
    assert not session.accepted


async def test_binary_before_config_closes_1008(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url)
    await client.ws.send(b"\x00\x00")
    code, reason = await client.wait_closed()
    assert code == 1008
    assert "binary frame before config" in reason
    session = await sim.next_session()
    await session.closed.wait()
    assert session.close_code == 1008 and session.closed_by == "server"
    assert session.config is None and not session.accepted
    assert session.violations == [session.reject_reason]


async def test_non_json_first_message_closes_1008(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url)
    await client.ws.send("this is not json")
    code, reason = await client.wait_closed()
    assert code == 1008 and "not valid JSON" in reason
    assert "not valid JSON" in client.of_type("error")[0]["message"]


async def test_wrong_first_type_closes_1008(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url, {"type": "hangup"})
    code, reason = await client.wait_closed()
    assert code == 1008
    assert reason == "first message must have type 'config', got type 'hangup'"


async def test_unknown_config_key_is_rejected_by_name(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url, make_config(apikey="s3cret-value", bogus=1, apiKey="x"))
    error = await client.wait_json("error")
    assert "unknown field 'bogus'" in error["message"]
    assert "unknown field 'apiKey'" in error["message"]
    assert "s3cret-value" not in error["message"]
    code, _ = await client.wait_closed()
    assert code == 1008
    session = await sim.next_session()
    await session.closed.wait()
    assert session.reject_reason == error["message"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sample_rate": 44100}, "sample_rate must be one of 8000, 16000, 24000 (got 44100)"),
        ({"sample_rate": 16000.0}, "sample_rate must be one of"),
        ({"sample_rate": True}, "sample_rate must be one of"),
        ({"provider": "acme"}, "provider must be one of"),
        ({"system_prompt": None}, "missing required field 'system_prompt'"),
        ({"apikey": ""}, "apikey must be a non-empty string"),
        ({"max_duration": 30}, "max_duration must be an integer from 60 to 3600"),
        ({"max_duration": 3601}, "max_duration must be an integer from 60 to 3600"),
        ({"voice": 7}, "voice must be a string"),
        ({"tools": {}}, "tools must be a list"),
        ({"tools": [{"name": "t", "description": "d"}]}, "tools[0]: missing required field 'parameters'"),
        (
            {"tools": [{"name": "t", "description": "d", "parameters": {}, "type": "function"}]},
            "tools[0]: unknown field 'type'",
        ),
        ({"tools": [{"name": "t", "description": "d", "parameters": []}]}, "tools[0].parameters must be an object"),
    ],
)
async def test_invalid_config_is_rejected(env: Env, overrides: dict[str, Any], expected: str) -> None:
    sim = await env.sim()
    cfg = make_config(**{k: v for k, v in overrides.items() if v is not None})
    for key in [k for k, v in overrides.items() if v is None]:
        del cfg[key]
    client = await env.client(sim.url, cfg)
    error = await client.wait_json("error")
    assert error["message"].startswith("invalid config: ")
    assert expected in error["message"]
    assert (await client.wait_closed())[0] == 1008


async def test_valid_full_config_is_accepted(env: Env) -> None:
    sim = await env.sim(echo=False)
    cfg = make_config(
        provider="aillomvox", sample_rate=8000, voice="Edward", language="en-US", max_duration=3600,
        farewell_message="Bye", tools=[{"name": "hangup", "description": "End the call.",
                                        "parameters": {"type": "object", "properties": {}}}],
    )
    t0 = time.monotonic()
    await env.client(sim.url, cfg)
    session = await sim.next_session()
    await session.wait_accepted()
    assert session.accepted and session.config == cfg
    assert session.config_received_at >= t0


async def test_wrong_key_is_unauthorized(env: Env) -> None:
    sim = await env.sim(accepted_keys={"good-key"})
    bad = await env.client(sim.url, make_config(apikey="bad-key"))
    assert (await bad.wait_json("error")) == {"type": "error", "message": "unauthorized"}
    assert await bad.wait_closed() == (1008, "unauthorized")

    good = await env.client(sim.url, make_config(apikey="good-key"))
    first, second = await sim.next_session(), await sim.next_session()
    await second.wait_accepted()
    assert not first.accepted and first.violations == []
    assert second.accepted
    await good.send_json({"type": "hangup"})
    assert (await good.wait_closed())[0] == 1000


async def test_config_timeout(env: Env) -> None:
    sim = await env.sim(config_timeout_s=0.2)
    client = await env.client(sim.url)
    code, reason = await client.wait_closed()
    assert (code, reason) == (1008, "no config received within 0.2 s")


# ---------------------------------------------------------------------------------------------
# Audio behaviour
# ---------------------------------------------------------------------------------------------


async def test_greeting_is_a_burst_plus_transcript(env: Env) -> None:
    sim = await env.sim()
    greeting = "Hello! How can I help you today?"
    client = await env.client(sim.url, make_config(first_message=greeting))
    transcript = await client.wait_json("transcript", role="assistant")
    assert transcript == {"type": "transcript", "role": "assistant", "text": greeting, "final": True}
    duration = client.audio_bytes() / BYTES_PER_S
    assert 1.5 <= duration <= 2.0  # 60 ms per character, capped at 2 s
    span = client.audio[-1][0] - client.audio[0][0]
    assert span < duration / 4, f"{duration:.2f} s of audio took {span:.3f} s: not a burst"
    assert len(client.audio) >= 5  # ~200 ms chunks, not one giant frame
    pcm = np.frombuffer(b"".join(b for _, b in client.audio), dtype="<i2")
    assert 0.25 * 32767 <= np.abs(pcm).max() <= 0.31 * 32767
    session = await sim.next_session()
    assert session.is_speaking  # still "speaking" in real time although everything was sent


async def test_speech_then_silence_is_echoed(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url, make_config())
    speech = tone(300, 1000, SR)
    await client.send_pcm(speech + silence(700, SR))
    partial = await client.wait_json("transcript", role="user", final=False)
    final = await client.wait_json("transcript", role="user", final=True)
    assert partial["text"] and final["text"] == "(speech 1.00 s)"
    echo = await client.wait_json("transcript", role="assistant")
    assert echo["text"] == "(echo 1.00 s)"
    assert b"".join(b for _, b in client.audio) == speech  # first to last voiced frame, exactly
    assert client.of_type("playback_clear_buffer") == []  # the sim was silent: no barge-in
    session = await sim.next_session()
    assert session.utterances == [1.0]
    await session.wait_audio(len(speech) + 2 * SR * 700 // 1000)
    assert session.audio == speech + silence(700, SR)
    assert all(isinstance(t, float) for t, _ in session.audio_chunks)


async def test_short_blip_is_not_speech(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url, make_config())
    await client.send_pcm(tone(300, 100, SR) + silence(600, SR) + tone(300, 300, SR) + silence(600, SR))
    final = await client.wait_json("transcript", role="user", final=True)
    assert final["text"] == "(speech 0.30 s)"
    assert (await sim.next_session()).utterances == [0.3]


async def test_barge_in_sends_playback_clear_buffer(env: Env) -> None:
    sim = await env.sim(echo=False)
    client = await env.client(sim.url, make_config(first_message="A rather long greeting to interrupt"))
    await client.wait_audio(1)
    await client.send_pcm(tone(500, 300, SR))
    await client.wait_json("playback_clear_buffer")
    session = await sim.next_session()
    await session.wait_event("barge_in")
    assert session.barge_ins == 1
    assert not session.is_speaking
    # The clear comes before the user's (non-final) transcript of the interrupting speech.
    types = [m["type"] + ("/" + m["role"] if "role" in m else "") for m in client.json]
    assert types.index("playback_clear_buffer") < types.index("transcript/user")


async def test_settle_time_audio_is_recorded_but_not_heard(env: Env) -> None:
    sim = await env.sim(settle_ms=500, echo=False)
    client = await env.client(sim.url, make_config(first_message="Hi"))
    session = await sim.next_session()
    await session.wait_accepted()
    await client.send_pcm(tone(300, 240, SR) + silence(100, SR))  # during the settle window
    await session.wait_audio(2 * SR * 340 // 1000)
    assert session.audio_chunks[-1][0] < session.config_received_at + 0.5
    await client.wait_json("transcript", role="assistant")  # the greeting: settle is over
    assert client.audio[0][0] >= session.config_received_at + 0.5
    await client.send_pcm(tone(300, 400, SR) + silence(600, SR))
    final = await client.wait_json("transcript", role="user", final=True)
    assert final["text"] == "(speech 0.40 s)"
    assert session.utterances == [0.4]


async def test_odd_length_audio_closes_1007(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url, make_config())
    await client.ws.send(b"\x00\x00\x00")
    error = await client.wait_json("error")
    assert "odd length 3" in error["message"]
    assert (await client.wait_closed())[0] == 1007


async def test_audio_memory_is_capped(env: Env) -> None:
    sim = await env.sim(audio_cap_bytes=3200, max_messages=4)
    client = await env.client(sim.url, make_config())
    chunks = [bytes([i]) * 3200 for i in range(10)]
    for chunk in chunks:
        await client.ws.send(chunk)
    session = await sim.next_session()
    await session.wait_audio(32000)
    assert session.audio_bytes_total == 32000
    assert session.audio == chunks[-1]
    assert [c for _, c in session.audio_chunks] == chunks[-4:]


async def test_server_send_audio_bursts_and_stops_on_clear(env: Env) -> None:
    sim = await env.sim(echo=False)
    client = await env.client(sim.url, make_config())
    session = await sim.next_session()
    await session.wait_accepted()
    pcm = tone(700, 500, SR)
    await session.send_audio(pcm, chunk_ms=100)
    await client.wait_audio(len(pcm))
    assert [len(b) for _, b in client.audio] == [3200] * 5
    assert session.is_speaking and session.sent_audio_bytes == len(pcm)
    with pytest.raises(ValueError):
        await session.send_audio(b"\x00")
    await session.clear()
    assert not session.is_speaking
    await client.wait_json("playback_clear_buffer")


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


async def test_call_tool_round_trip_and_violations(env: Env) -> None:
    sim = await env.sim(echo=False)
    client = await env.client(sim.url, make_config())
    session = await sim.next_session()
    await session.wait_accepted()
    call = asyncio.create_task(session.call_tool("lookup", {"order": 7}, call_id="c1"))
    tool_call = await client.wait_json("tool_call")
    assert tool_call == {"type": "tool_call", "call_id": "c1", "name": "lookup", "args": {"order": 7}}
    assert session.pending_tool_calls == {"c1": "lookup"}
    await client.send_json({"type": "tool_result", "call_id": "c1", "result": "shipped"})
    assert await call == "shipped"
    assert session.tool_results == {"c1": "shipped"} and session.violations == []

    await client.send_json({"type": "tool_result", "call_id": "c1", "result": "again"})
    await client.send_json({"type": "tool_result", "call_id": "nope", "result": "x"})
    await client.send_json({"type": "tool_result", "call_id": "c1", "result": {"not": "a string"}})
    for _ in range(4):
        await session.wait_message("tool_result")
    assert session.tool_results == {"c1": "shipped"}
    assert session.violations == [
        "duplicate tool_result for call_id 'c1'",
        "tool_result for unknown call_id 'nope'",
        "tool_result for call_id 'c1': result must be a string, got dict",
    ]
    assert client.of_type("error") == []  # stray results are recorded, not answered with errors
    with pytest.raises(ValueError):
        await session.call_tool("lookup", {}, call_id="c1")


async def test_tool_deadline_is_a_violation(env: Env) -> None:
    sim = await env.sim(echo=False, tool_deadline_s=0.1)
    client = await env.client(sim.url, make_config())
    session = await sim.next_session()
    await session.wait_accepted()
    with pytest.raises(TimeoutError):
        await session.call_tool("slow", {}, call_id="s1", timeout=0.3)
    assert session.violations == ["no tool_result for call_id 's1' (slow) within 0.1 s"]
    await client.send_json({"type": "tool_result", "call_id": "s1", "result": "late"})
    await session.wait_message("tool_result")
    assert session.tool_results == {"s1": "late"}  # a late result is still stored, once


async def test_call_tool_fails_when_session_closes(env: Env) -> None:
    sim = await env.sim(echo=False)
    client = await env.client(sim.url, make_config())
    session = await sim.next_session()
    await session.wait_accepted()
    call = asyncio.create_task(session.call_tool("x", {}))
    await client.wait_json("tool_call")
    await client.send_json({"type": "hangup"})
    with pytest.raises(SessionClosed):
        await call
    await session.closed.wait()
    assert list(session.pending_tool_calls.values()) == ["x"]  # unanswered, not a violation
    assert session.violations == []


# ---------------------------------------------------------------------------------------------
# Other client messages, hangups, governance
# ---------------------------------------------------------------------------------------------


async def test_unknown_message_type_is_an_error_but_session_continues(env: Env) -> None:
    sim = await env.sim(echo=False)
    client = await env.client(sim.url, make_config())
    await client.send_json({"type": "dance"})
    assert (await client.wait_json("error"))["message"] == "unknown message type 'dance'"
    await client.ws.send("{oops")
    assert (await client.wait_json("error"))["message"] == "invalid message: text frame is not valid JSON"
    await client.send_json(make_config())
    assert (await client.wait_json("error"))["message"] == "invalid message: config already received"
    await client.send_json({"type": "hangup"})
    assert (await client.wait_closed())[0] == 1000
    session = await sim.next_session()
    await session.closed.wait()
    assert session.violations == ["unknown message type 'dance'", "text frame is not valid JSON",
                                  "config received twice"]


async def test_client_hangup_closes_1000(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url, make_config())
    await client.send_json({"type": "hangup"})
    assert await client.wait_closed() == (1000, "client hangup")
    session = await sim.next_session()
    await session.closed.wait()
    assert (session.close_code, session.closed_by) == (1000, "server")
    assert session.messages[-1] == {"type": "hangup"}


async def test_server_hangup_client_closes(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url, make_config())

    async def close_on_hangup(msg: dict[str, Any]) -> None:
        if msg["type"] == "hangup":
            await client.ws.close()

    client.on_json = close_on_hangup
    session = await sim.next_session()
    await session.wait_accepted()
    await session.hangup()
    await session.closed.wait()
    assert client.of_type("hangup") == [{"type": "hangup"}]
    assert (session.close_code, session.closed_by) == (1000, "client")


async def test_server_hangup_closes_after_grace(env: Env) -> None:
    sim = await env.sim(hangup_grace_s=0.1)
    client = await env.client(sim.url, make_config())
    session = await sim.next_session()
    await session.wait_accepted()
    await session.hangup()
    assert await client.wait_closed() == (1000, "hangup")
    await session.closed.wait()
    assert session.closed_by == "server"
    with pytest.raises(SessionClosed):
        await session.send_json({"type": "transcript"})


async def test_server_error(env: Env) -> None:
    sim = await env.sim()
    client = await env.client(sim.url, make_config())
    session = await sim.next_session()
    await session.wait_accepted()
    await session.error("insufficient_balance", close=False)
    assert (await client.wait_json("error"))["message"] == "insufficient_balance"
    await session.error("insufficient_balance")
    assert await client.wait_closed() == (1008, "insufficient_balance")


async def test_max_duration_farewell_then_close(env: Env) -> None:
    sim = await env.sim(max_duration_override_s=0.6, farewell_lead_s=0.3)
    client = await env.client(sim.url, make_config(farewell_message="Goodbye now", max_duration=60))
    session = await sim.next_session()
    await session.wait_accepted()
    farewell = await client.wait_json("transcript", role="assistant", text="Goodbye now")
    assert farewell["final"] is True
    t_farewell = time.monotonic()
    assert t_farewell - session.config_received_at >= 0.3
    assert (await client.wait_json("error"))["message"] == "max_duration_reached"
    assert await client.wait_closed() == (1008, "max_duration_reached")
    assert time.monotonic() - session.config_received_at >= 0.6
    await session.closed.wait()
    assert session.closed_by == "server"


# ---------------------------------------------------------------------------------------------
# Scenarios, sessions, CLI, housekeeping
# ---------------------------------------------------------------------------------------------


SCENARIO_YAML = """
echo: false
steps:
  - after_ms: 10
    do: tool_call
    name: end_call
    args: {reason: done}
  - on: speech_end
    do: clear
  - do: say
    tone_hz: 440
    ms: 200
  - do: transcript
    role: assistant
    text: Still there?
  - do: error
    message: insufficient_balance
    close: false
  - do: hangup
"""


async def test_scenario_file(env: Env, tmp_path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(SCENARIO_YAML)
    sim = await env.sim(scenario=load_scenario(path), hangup_grace_s=0.1)
    client = await env.client(sim.url, make_config())
    call = await client.wait_json("tool_call")
    assert (call["name"], call["args"]) == ("end_call", {"reason": "done"})
    await client.send_json({"type": "tool_result", "call_id": call["call_id"], "result": "ok"})
    await client.send_pcm(tone(300, 300, SR) + silence(600, SR))
    await client.wait_json("playback_clear_buffer")
    await client.wait_json("transcript", role="assistant", text="Still there?")
    assert client.audio_bytes() == 2 * SR * 200 // 1000  # the tone only: echo is off
    assert (await client.wait_json("error"))["message"] == "insufficient_balance"
    await client.wait_json("hangup")
    assert await client.wait_closed() == (1000, "hangup")
    session = await sim.next_session()
    await session.closed.wait()
    assert session.tool_results == {call["call_id"]: "ok"} and session.violations == []


def test_scenario_validation(tmp_path) -> None:
    assert parse_scenario([{"do": "hangup"}]).steps[0].do == "hangup"
    with pytest.raises(ScenarioError, match="unknown field"):
        parse_scenario([{"do": "clear", "text": "x"}])
    with pytest.raises(ScenarioError, match="'do' must be one of"):
        parse_scenario([{"do": "dance"}])
    with pytest.raises(ScenarioError, match="'on' must be one of"):
        parse_scenario([{"on": "never", "do": "clear"}])
    with pytest.raises(ScenarioError, match="missing required field 'name'"):
        parse_scenario([{"do": "tool_call"}])
    with pytest.raises(ScenarioError, match="needs 'text' or 'tone_hz'"):
        parse_scenario({"steps": [{"do": "say"}]})
    with pytest.raises(ScenarioError, match="after_ms"):
        parse_scenario([{"do": "clear", "after_ms": -1}])
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ScenarioError, match="cannot parse"):
        load_scenario(bad)


async def test_sessions_in_connect_order(env: Env) -> None:
    sim = await env.sim(echo=False)
    await env.client(sim.url, make_config(system_prompt="one"))
    first = await sim.next_session()
    await env.client(sim.url, make_config(system_prompt="two"))
    second = await sim.next_session()
    assert (first.index, second.index) == (1, 2)
    assert list(sim.sessions) == [first, second]
    with pytest.raises(TimeoutError):
        await sim.next_session(timeout=0.05)


async def test_stop_closes_sessions_and_leaks_no_tasks(env: Env) -> None:
    sim = GatewaySim(max_duration_override_s=30)
    await sim.start()
    client = await env.client(sim.url, make_config(first_message="Hello there", farewell_message="Bye"))
    session = await sim.next_session()
    await client.wait_json("transcript", role="assistant")
    pending = asyncio.create_task(session.call_tool("never_answered", {}))
    await client.wait_json("tool_call")
    await sim.stop()
    assert session.closed.is_set() and session.close_code == 1001
    with pytest.raises(SessionClosed):
        await pending
    await client.wait_closed()
    await client.aclose()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert others == []


async def test_logs_never_contain_the_api_key(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voxbridge.gateway_sim")
    sim = await env.sim(accepted_keys={"av_super_secret"})
    ok = await env.client(sim.url + "?apiKey=av_super_secret", make_config(apikey="av_super_secret"))
    await ok.send_json({"type": "hangup"})
    await ok.wait_closed()
    bad = await env.client(sim.url, make_config(apikey="av_wrong_secret"))
    await bad.wait_closed()
    await (await sim.next_session()).closed.wait()
    await (await sim.next_session()).closed.wait()
    text = caplog.text
    assert "session 1 start" in text and "session 2 rejected: unauthorized" in text
    assert "system_prompt" in text
    assert "secret" not in text


async def test_run_gateway_sim_serves_until_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    listening = asyncio.Event()
    url: list[str] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"listening on (\S+)", record.getMessage())
            if found:
                url.append(found.group(1))
                listening.set()

    logger = logging.getLogger("voxbridge.gateway_sim")
    handler = Watch()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        task = asyncio.create_task(
            run_gateway_sim("127.0.0.1", 0, api_keys={"k"}, scenario_path=None, settle_ms=0)
        )
        async with asyncio.timeout(5):
            await listening.wait()
        async with connect(url[0]) as ws:
            await ws.send(json.dumps(make_config(apikey="k", first_message="Hi")))
            while not isinstance(await ws.recv(), bytes):
                pass
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.listen, args.api_keys, args.scenario, args.settle_ms) == (("127.0.0.1", 8765), None, None, 500)
    args = parser.parse_args(
        ["--listen", "0.0.0.0:9000", "--api-key", "a", "--api-key", "b", "--scenario", "s.yaml", "--settle-ms", "0"]
    )
    assert (args.listen, args.api_keys, args.scenario, args.settle_ms) == (("0.0.0.0", 9000), ["a", "b"], "s.yaml", 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--listen", "nonsense"])


def test_tone_helper() -> None:
    pcm = tone(1000, 100, 8000)
    assert len(pcm) == 2 * 800
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    assert abs(np.sqrt(np.mean(x * x)) - 0.3 * 32767 / np.sqrt(2)) < 50
    assert np.abs(x).max() <= round(0.3 * 32767)
    assert silence(10, 16000) == bytes(320)
    with pytest.raises(ValueError):
        tone(440, 10, 8000, amplitude=1.5)
