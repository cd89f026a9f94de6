"""Mid-call control and the silence watchdog, end to end: real HTTP to the control API, a simulated
Asterisk caller, the bridge in-process and each protocol's strict reference simulator. What a command
did is read where it lands: on the simulator's wire (what it recorded), in what the caller heard, and
in the call's events.
"""

from __future__ import annotations

import asyncio
import json
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.devtools.dial import AudioSocketCaller, tone
from bridge.devtools.gateway_sim import speechlike
from bridge.events import Event, Subscription

from .test_protocols import KEY, EchoArgs, _make_sim

pytestmark = pytest.mark.timeout(90)

TOKEN = "midcall-token-0123456789"
ALL = ["context", "say", "tools", "mute", "tag"]
#: What each protocol can do mid-call (the capability matrix of README.md).
CAPABILITIES = {
    "openai-realtime": ALL,
    "generic-ws": ["say", "mute", "tag"],
    "aillomvox": ["mute", "tag"],
    "aivoco": ["mute", "tag"],
}


class Rig:
    """One protocol's simulator, a bridge pointed at it with the API on, and an HTTP client."""

    def __init__(self, protocol: str, sim: Any, bridge: Bridge, client: httpx.AsyncClient) -> None:
        self.protocol, self.sim, self.bridge, self.client = protocol, sim, bridge, client
        self.events: Subscription = bridge.events.subscribe(maxsize=5000)

    async def event(self, type: str, timeout: float = 10, **match: Any) -> Event:
        """The next event of ``type`` (whose data has ``match``), skipping others."""
        async with asyncio.timeout(timeout):
            while True:
                e = await self.events.get()
                if e.type == type and all(e.data.get(k) == v for k, v in match.items()):
                    return e


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[Any, Bridge, httpx.AsyncClient, AudioSocketCaller | None]] = []
    callers: list[AudioSocketCaller] = []

    async def factory(protocol: str, profile: dict[str, Any] | None = None,
                      gateway: dict[str, Any] | None = None) -> Rig:
        sim, extra = _make_sim(protocol)
        extra = {**extra, **(gateway or {})}
        await sim.start()
        data = {
            "audiosocket": {"listen": "127.0.0.1:0"},
            "api": {"enabled": True, "listen": "127.0.0.1:0", "token": TOKEN},
            "store": {"path": str(tmp_path / f"{protocol}.db")},
            "gateways": {"ai": {"protocol": protocol, "url": sim.url, "api_key": KEY, **extra}},
            "profiles": {"default": {"gateway": "ai", "first_message": None, "tools": ["lookup", "end_call"],
                                     **(profile or {})}},
        }
        bridge = Bridge(Config.model_validate(data), tools=[EchoArgs()])
        await bridge.start()
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.api.port}",
                                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        made.append((sim, bridge, client, None))
        return Rig(protocol, sim, bridge, client)

    async def dial(rig: Rig) -> tuple[AudioSocketCaller, Any, str]:
        caller = AudioSocketCaller()
        callers.append(caller)
        await caller.connect(*rig.bridge.audiosocket_address)
        session = await rig.sim.next_session(5)
        await session.wait_accepted(5)
        call_id = str(caller.uuid)
        await rig.event("call.answered")
        return caller, session, call_id

    factory.dial = dial  # type: ignore[attr-defined]
    yield factory
    for c in callers:
        await c.aclose()
    for sim, bridge, client, _ in made:
        await client.aclose()
        await bridge.stop()
        await sim.stop()
        assert bridge.sessions == {}, f"sessions left behind: {list(bridge.sessions)}"


def rms(pcm: bytes) -> float:
    x = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], "<i2").astype(np.float64)
    return float(np.sqrt((x ** 2).mean())) if len(x) else 0.0


# --------------------------------------------------------------------------- capabilities and refusals


@pytest.mark.parametrize("protocol", list(CAPABILITIES))
async def test_capabilities_are_declared_and_the_rest_refused_with_409(make_rig, protocol):
    rig = await make_rig(protocol)
    caller, session, call_id = await make_rig.dial(rig)
    info = (await rig.client.get(f"/v1/calls/{call_id}")).json()
    assert info["capabilities"] == CAPABILITIES[protocol]
    requests = {"context": ("POST", "context", {"text": "This caller is a VIP."}),
                "say": ("POST", "say", {"text": "One moment please."}),
                "tools": ("PUT", "tools", {"tools": ["lookup"]})}
    before = len(session.messages)
    for command, (method, path, body) in requests.items():
        if command in CAPABILITIES[protocol]:
            continue
        r = await rig.client.request(method, f"/v1/calls/{call_id}/{path}", json=body)
        assert r.status_code == 409, (command, r.text)
        detail = r.json()["detail"]
        assert protocol in detail and f"'{command}'" in detail, detail
    # Refused means nothing was sent: the simulator saw no new control message.
    await asyncio.sleep(0.3)
    new = [m.get("type") for m in list(session.messages)[before:]]
    assert all(t in ("audio.input", "audio_data", "input_audio_buffer.append", None) for t in new), new
    assert session.violations == []
    # The bridge's own commands work on every protocol.
    r = await rig.client.post(f"/v1/calls/{call_id}/tags", json={"tags": {"ticket": "T-1"}})
    assert r.status_code == 200 and r.json()["metadata"] == {"ticket": "T-1"}
    caller.hangup()
    ended = await rig.event("call.ended")
    assert ended.data["metadata"] == {"ticket": "T-1"}


# --------------------------------------------------------------------------- each command end to end


async def test_context_say_and_tools_on_openai_realtime(make_rig):
    rig = await make_rig("openai-realtime")
    caller, session, call_id = await make_rig.dial(rig)
    c = rig.client

    r = await c.post(f"/v1/calls/{call_id}/context", json={"text": "This caller is a VIP.\nBe brief."})
    assert r.status_code == 200
    assert r.json() == {"call_id": call_id, "command": "context", "ok": True}
    await session._wait_for(lambda: session.system_messages, 5, "a system message")
    assert session.system_messages == ["This caller is a VIP.\nBe brief."]
    e = await rig.event("call.context")
    assert e.data["text"] == "This caller is a VIP.\nBe brief." and e.data["origin"] == "api"

    heard_before = caller.received_seconds
    r = await c.post(f"/v1/calls/{call_id}/say", json={"text": "Your order has shipped."})
    assert r.status_code == 200 and r.json()["command"] == "say"
    await rig.event("call.say", text="Your order has shipped.")
    # The model was told to say it, said it (its transcript), and the caller heard it.
    said = await rig.event("transcript", role="assistant")
    assert said.data["text"] == "Your order has shipped."
    assert session.instructed and session.instructed[-1].endswith(": Your order has shipped.")
    assert await caller.wait_audio(int(0.3 * 8000 * 2), timeout=5)
    assert caller.received_seconds > heard_before
    assert rms(bytes(caller.received_audio[-8000:])) > 100

    r = await c.put(f"/v1/calls/{call_id}/tools", json={"tools": ["lookup", "nope", "transfer"]})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "nope" in detail and "transfer" in detail and "lookup, end_call" in detail
    assert session.tool_updates == []
    r = await c.put(f"/v1/calls/{call_id}/tools", json={"tools": ["lookup"]})
    assert r.status_code == 200 and r.json()["tools"] == ["lookup"]
    await session._wait_for(lambda: session.tool_updates, 5, "a tools update")
    assert session.tool_updates == [["lookup"]]
    assert [t["name"] for t in session.session["tools"]] == ["lookup"]
    assert (await rig.event("call.tools")).data["tools"] == ["lookup"]
    # The AI may no longer end the call itself; its remaining tool still runs.
    refused = await session.call_tool("end_call", {"reason": "done"})
    assert "end_call" in refused and "error" in refused.lower()
    assert call_id in rig.bridge.sessions
    assert '"found"' in await session.call_tool("lookup", {"q": 1})
    r = await c.put(f"/v1/calls/{call_id}/tools", json={"tools": []})
    assert r.status_code == 200
    await session._wait_for(lambda: len(session.tool_updates) == 2, 5, "a second tools update")
    assert session.tool_updates[-1] == [] and session.session["tool_choice"] == "none"
    assert session.violations == []
    caller.hangup()
    await rig.event("call.ended")


async def test_say_during_an_ai_answer_is_said_after_it(make_rig):
    """While the AI answers, a say waits for the floor (or is re-sent once the service refuses a
    second response: tests/unit/test_midcall_adapters.py checks both paths step by step)."""
    rig = await make_rig("openai-realtime")
    caller, session, call_id = await make_rig.dial(rig)
    speaking = asyncio.create_task(session.say("a long answer", ms=1500))
    r = await rig.client.post(f"/v1/calls/{call_id}/say", json={"text": "Sorry to interrupt."})
    assert r.status_code == 200
    await speaking
    texts = []
    while "Sorry to interrupt." not in texts:
        texts.append((await rig.event("transcript", role="assistant")).data["text"])
    assert "a long answer" in texts
    assert session.violations == []
    caller.hangup()
    await rig.event("call.ended")


async def test_say_on_generic_ws_is_a_text_input(make_rig):
    rig = await make_rig("generic-ws")
    caller, session, call_id = await make_rig.dial(rig)
    r = await rig.client.post(f"/v1/calls/{call_id}/say", json={"text": "Please hold."})
    assert r.status_code == 200
    msg = await session.wait_message("text.input", 5)
    assert msg == {"type": "text.input", "text": "Please hold."}
    assert session.violations == []
    caller.hangup()
    await rig.event("call.ended")


async def test_mute_sends_silence_and_unmute_resumes(make_rig):
    rig = await make_rig("aillomvox")
    caller, session, call_id = await make_rig.dial(rig)
    c = rig.client
    r = await c.post(f"/v1/calls/{call_id}/mute")
    assert r.json() == {"call_id": call_id, "command": "mute", "ok": True, "muted": True, "changed": True}
    assert (await c.post(f"/v1/calls/{call_id}/mute")).json()["changed"] is False  # idempotent
    assert (await rig.event("call.muted")).call_id == call_id
    assert (await c.get(f"/v1/calls/{call_id}")).json()["muted"] is True

    mark = session.audio_bytes_total
    caller.say(tone(440, 600))
    await caller.wait_spoken(5)
    audio = await session.wait_audio(mark + 600 * 16, 5)  # the uplink keeps flowing: silence
    muted = audio[-(session.audio_bytes_total - mark):]
    assert len(muted) >= 600 * 16 and rms(muted) == 0.0

    r = await c.post(f"/v1/calls/{call_id}/unmute")
    assert r.status_code == 200 and r.json()["muted"] is False
    await rig.event("call.unmuted")
    mark = session.audio_bytes_total
    caller.say(tone(440, 600))
    await caller.wait_spoken(5)
    audio = await session.wait_audio(mark + 600 * 16, 5)
    assert rms(audio[-(session.audio_bytes_total - mark):]) > 1000
    caller.hangup()
    await rig.event("call.ended")


async def test_a_muted_caller_does_not_barge_in_through_the_local_vad(make_rig):
    rig = await make_rig("openai-realtime", gateway={"vad": {"mode": "local"}})
    caller, session, call_id = await make_rig.dial(rig)
    assert (await rig.client.post(f"/v1/calls/{call_id}/mute")).status_code == 200
    await session.say("a long answer", ms=6000)
    await asyncio.sleep(0.3)
    caller.say(speechlike("I want to talk to a person", 1500, 8000))
    await caller.wait_spoken(5)
    await asyncio.sleep(0.8)
    assert rig.bridge.sessions[call_id].stats["barge_ins"] == 0 and session.truncates == []
    # The same words unmuted do cut the AI short (the test can see a barge-in).
    assert (await rig.client.post(f"/v1/calls/{call_id}/unmute")).status_code == 200
    caller.say(speechlike("I want to talk to a person", 1500, 8000))
    barge_in = await rig.event("barge_in", timeout=5)
    assert barge_in.data["source"] == "local"
    caller.hangup()
    await rig.event("call.ended")


async def test_tags_ride_on_every_later_event(make_rig):
    rig = await make_rig("aillomvox")
    caller, session, call_id = await make_rig.dial(rig)
    r = await rig.client.post(f"/v1/calls/{call_id}/tags", json={"tags": {"tier": "gold", "agent": "n8n"}})
    assert r.status_code == 200
    tagged = await rig.event("call.tagged")
    assert tagged.data["tags"] == {"tier": "gold", "agent": "n8n"}
    assert tagged.data["metadata"] == {"tier": "gold", "agent": "n8n"}
    await session.transcript("user", "hello")
    t = await rig.event("transcript")
    assert t.data["metadata"] == {"tier": "gold", "agent": "n8n"}
    r = await rig.client.post(f"/v1/calls/{call_id}/tags", json={"tags": {"tier": "platinum"}})
    assert r.json()["metadata"] == {"tier": "platinum", "agent": "n8n"}
    caller.hangup()
    ended = await rig.event("call.ended")
    assert ended.data["metadata"] == {"tier": "platinum", "agent": "n8n"}
    stored = await rig.bridge.store.get_call(call_id)
    assert stored is not None and stored["metadata"] == {"tier": "platinum", "agent": "n8n"}


async def test_bad_requests_unknown_and_ended_calls(make_rig):
    rig = await make_rig("openai-realtime")
    c = rig.client
    r = await c.post("/v1/calls/nope/say", json={"text": "hi"})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    caller, session, call_id = await make_rig.dial(rig)
    base = f"/v1/calls/{call_id}"
    for path, body in (("say", {"text": ""}), ("say", {"text": "   "}), ("say", {"text": "x" * 4001}),
                       ("say", {"text": "hi", "extra": 1}), ("context", {}), ("say", {"text": "a\x00b"}),
                       ("tags", {"tags": {}}), ("tags", {"tags": {"k": "v\n"}}), ("tags", {"tags": {"k": 5}}),
                       ("tags", {"tags": {f"k{i}": "v" for i in range(33)}})):
        r = await c.post(f"{base}/{path}", json=body)
        assert r.status_code == 422, (path, body, r.text)
    r = await c.put(f"{base}/tools", json={"tools": "lookup"})
    assert r.status_code == 422
    async with httpx.AsyncClient(base_url=str(c.base_url)) as anon:
        assert (await anon.post(f"{base}/say", json={"text": "hi"})).status_code == 401
        assert (await anon.post(f"{base}/mute")).status_code == 401
    assert session.instructed == []  # none of that reached the AI
    caller.hangup()
    await rig.event("call.ended")
    await asyncio.sleep(0.1)
    r = await c.post(f"{base}/say", json={"text": "too late"})
    assert r.status_code == 404 and "ended" in r.json()["detail"]
    r = await c.post(f"{base}/mute")
    assert r.status_code == 404


# --------------------------------------------------------------------------- silence watchdog


async def test_silence_prompts_then_hangs_up(make_rig):
    rig = await make_rig("openai-realtime", profile={
        "silence": {"timeout_s": 2, "action": "prompt", "prompt_text": "Hello, are you there?", "hangup_after_s": 2}})
    caller, session, call_id = await make_rig.dial(rig)
    assert (await rig.client.get(f"/v1/calls/{call_id}")).json()["state"] == "active"
    t0 = time.monotonic()
    detected = await rig.event("silence.detected", timeout=10)
    assert 1.8 <= time.monotonic() - t0 <= 4.5
    assert detected.data["action"] == "prompt" and detected.data["silent_s"] >= 2
    said = await rig.event("transcript", role="assistant")
    assert said.data["text"] == "Hello, are you there?"
    t1 = time.monotonic()
    hangup = await rig.event("silence.hangup", timeout=10)
    assert time.monotonic() - t1 >= 1.5 and hangup.data["silent_s"] >= 2
    ended = await rig.event("call.ended", timeout=10)
    assert ended.data["reason"] == "silence-timeout" and ended.call_id == call_id
    assert await caller.wait_ended(5) is not None
    assert session.instructed[-1].endswith(": Hello, are you there?") and session.violations == []


async def test_silence_does_not_nag_a_caller_who_is_listening(make_rig):
    rig = await make_rig("openai-realtime", profile={"silence": {"timeout_s": 2, "action": "prompt"}})
    caller, session, _ = await make_rig.dial(rig)
    t0 = time.monotonic()
    await session.say("a long story", ms=4000)  # 4 s of AI speech, sent in a burst
    detected = await rig.event("silence.detected", timeout=15)
    # Not before the story has played out (~4 s) plus the timeout.
    assert time.monotonic() - t0 >= 5.5, time.monotonic() - t0
    assert detected.data["silent_s"] >= 2
    caller.hangup()
    await rig.event("call.ended")


async def test_caller_speech_resets_the_watchdog_and_play_action(make_rig, tmp_path):
    wav = tmp_path / "still-there.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tone(660, 500, 16000))
    rig = await make_rig("aillomvox", profile={"silence": {"timeout_s": 2, "action": "play", "wav": str(wav)}})
    caller, _, call_id = await make_rig.dial(rig)
    await asyncio.sleep(1.2)
    caller.say(tone(300, 1500, amplitude=0.2))  # the caller speaks from 1.2 s to 2.7 s
    await caller.wait_spoken(5)
    t_spoke = time.monotonic()
    received = caller.received_seconds
    detected = await rig.event("silence.detected", timeout=10)
    assert time.monotonic() - t_spoke >= 1.7, "the watchdog counted from before the caller spoke"
    assert detected.data["action"] == "play" and detected.call_id == call_id
    await asyncio.sleep(0.8)
    tail = bytes(caller.received_audio[-int(0.8 * 16000):])
    assert caller.received_seconds > received and rms(tail) > 500  # the WAV was played to the caller
    caller.hangup()
    ended = await rig.event("call.ended")
    assert ended.data["reason"] != "silence-timeout"


async def test_silence_through_the_local_vad(make_rig):
    """With the bridge's own VAD the watchdog hears the caller through it (no energy gate)."""
    rig = await make_rig("openai-realtime", profile={"silence": {"timeout_s": 2, "action": "prompt"}},
                         gateway={"vad": {"mode": "local"}})
    caller, _, call_id = await make_rig.dial(rig)
    assert rig.bridge.sessions[call_id]._gate is None  # the VAD is the ear
    await asyncio.sleep(1.0)
    # Speech from 1 s to 4 s: a watchdog deaf to it would fire at 2 s, mid-sentence.
    caller.say(speechlike("Hello, I am calling about my bill and the late fee on it", 3000, 8000))
    await caller.wait_spoken(5)
    t_spoke = time.monotonic()
    await rig.event("silence.detected", timeout=10)
    assert time.monotonic() - t_spoke >= 1.7, "the watchdog did not hear the caller through the VAD"
    caller.hangup()
    await rig.event("call.ended")


# --------------------------------------------------------------------------- commands outside ACTIVE

LIVE_COMMANDS = (("POST", "context", {"text": "This caller is a VIP."}), ("POST", "say", {"text": "Hello?"}),
                 ("PUT", "tools", {"tools": ["lookup"]}))


async def _all_refused(rig: Rig, call_id: str, state_words: str) -> None:
    """Every AI command is a 409 whose detail names the call's state (never a 200 that did nothing)."""
    for method, path, body in LIVE_COMMANDS:
        r = await rig.client.request(method, f"/v1/calls/{call_id}/{path}", json=body)
        assert r.status_code == 409, (state_words, path, r.status_code, r.text)
        assert state_words in r.json()["detail"], (path, r.json()["detail"])


async def _wait_state(rig: Rig, call_id: str, state: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while (s := rig.bridge.sessions.get(call_id)) is None or s._fsm.state.value != state:
            await asyncio.sleep(0.02)


async def test_ai_commands_answer_409_naming_the_state_while_connecting(make_rig):
    """A backend that accepts the connection and never answers: the call stays CONNECTING."""
    mute_server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = mute_server.sockets[0].getsockname()[1]
    try:
        rig = await make_rig("openai-realtime", gateway={"url": f"ws://127.0.0.1:{port}/v1/realtime",
                                                         "connect_timeout": 4})
        caller = AudioSocketCaller()
        await caller.connect(*rig.bridge.audiosocket_address)
        call_id = str(caller.uuid)
        await _wait_state(rig, call_id, "connecting")
        await _all_refused(rig, call_id, "state connecting")
        caller.hangup()
        await rig.event("call.ended")
        await caller.aclose()
    finally:
        mute_server.close()


async def test_ai_commands_answer_409_naming_the_state_while_falling_back(make_rig, tmp_path):
    """The gateway is lost and the fallback message plays: the failed gateway must not take commands."""
    wav = tmp_path / "sorry.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(tone(440, 4000))
    rig = await make_rig("openai-realtime", profile={"fallback": {"message_wav": str(wav)}})
    caller, session, call_id = await make_rig.dial(rig)
    await session._ws.close(1011, "internal error")
    await _wait_state(rig, call_id, "falling-back")
    await _all_refused(rig, call_id, "state falling-back")
    assert session.system_messages == [] and session.instructed == [] and session.tool_updates == []
    caller.hangup()
    await rig.event("call.ended")


async def test_ai_commands_answer_409_naming_the_state_while_ending(make_rig):
    """The AI hung up mid-answer: the call drains its last words and takes no more commands."""
    rig = await make_rig("openai-realtime")
    caller, session, call_id = await make_rig.dial(rig)
    await session.say("a long goodbye", ms=5000)
    await session.hangup()
    await _wait_state(rig, call_id, "draining")
    await _all_refused(rig, call_id, "is ending (state draining)")
    caller.hangup()
    await rig.event("call.ended")


async def test_the_ai_cannot_call_a_dtmf_shortcuts_tool_it_was_not_offered(make_rig):
    """DTMF shortcuts and the AI have separate allowances: ``PUT /tools`` narrows only the AI's, the
    AI's unknown-tool error names only what it was offered, and the key on the phone still works."""
    rig = await make_rig("openai-realtime", profile={"tools": ["lookup"], "dtmf": {"#": {"tool": "end_call"}}})
    caller, session, call_id = await make_rig.dial(rig)
    refused = json.loads(await session.call_tool("end_call", {"reason": "done"}))
    assert "unknown tool 'end_call'" in refused["error"] and refused["error"].endswith("available: lookup")
    r = await rig.client.put(f"/v1/calls/{call_id}/tools", json={"tools": []})
    assert r.status_code == 200
    for args in ({"reason": "done"}, {}):
        refused = json.loads(await session.call_tool("end_call", args))
        assert refused["error"] == "unknown tool 'end_call'; available: none", refused
    refused = json.loads(await session.call_tool("lookup", {"q": 1}))
    assert refused["error"] == "unknown tool 'lookup'; available: none", refused
    await asyncio.sleep(0.3)
    assert call_id in rig.bridge.sessions and rig.bridge.sessions[call_id].end_reason is None  # nothing ran
    caller.send_dtmf("#")
    done = await rig.event("tool.completed", origin="dtmf")
    assert done.data["tool"] == "end_call" and done.data["outcome"] == "ok"
    await rig.event("call.ended")
