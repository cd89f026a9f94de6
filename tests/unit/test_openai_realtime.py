"""The OpenAI Realtime adapter's pure parts, without a network.

Every client event the adapter builds is validated against the official ``openai`` package's
client-event models (bridge/devtools/sim_openai.py's :func:`validate_client_event`: strict JSON
types, and no key the models do not define — the package's models keep unknown keys silently,
so that check is ours), and cross-checked with a plain TypeAdapter over ``RealtimeClientEvent``.
"""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest
from openai.types.realtime import ConversationItemTruncateEvent, RealtimeClientEvent, SessionUpdateEvent

from bridge import g711
from bridge.devtools.sim_openai import validate_client_event
from bridge.gateway.base import AudioOut, ClearPlayback, RemoteError, ResponseDone, SessionSetup, ToolCall, Transcript
from bridge.gateway.openai_realtime import (
    OpenAIRealtimeGateway,
    build_greeting,
    build_session_update,
    parse_tool_arguments,
    truncate_point,
    turn_detection,
)
from bridge.gateway.ws import ParseProblem

CLIENT = pydantic.TypeAdapter(RealtimeClientEvent)
TOOLS = [{"name": "lookup", "description": "find an order", "parameters": {
    "type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}}]


def valid(event: dict[str, Any] | str) -> dict[str, Any]:
    """Assert ``event`` is a valid GA client event; return it as a dict."""
    text = event if isinstance(event, str) else json.dumps(event)
    msg, problems = validate_client_event(text)
    assert problems == [], problems
    CLIENT.validate_json(text)  # the plain union agrees
    assert msg is not None
    return msg


def setup(rate: int = 8000, **kw: Any) -> SessionSetup:
    return SessionSetup(provider="openai", sample_rate=rate, system_prompt="Be brief.", caller_rate=rate, **kw)


def vad(mode: str = "server") -> SimpleNamespace:
    return SimpleNamespace(mode=mode, threshold=0.6, silence_duration_ms=600, prefix_padding_ms=200)


def gateway(rate: int = 8000, **kw: Any) -> OpenAIRealtimeGateway:
    gw = OpenAIRealtimeGateway(None, "sk-test", **kw)
    gw._configure(setup(rate))
    return gw


def sent(gw: OpenAIRealtimeGateway) -> list[dict[str, Any]]:
    """The control events the adapter queued (each validated), and forget them."""
    out = [valid(m if isinstance(m, str) else m.decode()) for m in gw._control]
    gw._control.clear()
    return out


def delta(item_id: str, pcm: bytes, ulaw: bool = True) -> str:
    payload = g711.encode(pcm) if ulaw else pcm
    return json.dumps({"type": "response.output_audio.delta", "event_id": "e1", "response_id": "r1",
                       "item_id": item_id, "output_index": 0, "content_index": 0,
                       "delta": base64.b64encode(payload).decode()})


# ---- the validator itself catches what it must --------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_mss": 5},
    {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": 5, "extra": 1},
    {"type": "session.update", "session": {"type": "realtime", "instructons": "x"}},
    {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration": 500}}}}},
    {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "format": {"type": "audio/pcmu", "rate": 8000}}}}},
    {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}}}}},
    {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": "5"},
    {"type": "input_audio_buffer.appendx", "audio": ""},
    {"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c", "result": "x"}},
])
def test_validator_refuses_misspelt_and_mistyped_events(bad: dict[str, Any]) -> None:
    _msg, problems = validate_client_event(json.dumps(bad))
    assert problems


def test_the_package_alone_would_let_a_misspelt_field_through() -> None:
    # Why the validator walks the model tree: the package's models keep unknown keys.
    model = SessionUpdateEvent.model_validate({"type": "session.update",
                                               "session": {"type": "realtime", "instructons": "x"}})
    assert model.session.model_extra == {"instructons": "x"}


# ---- session.update -----------------------------------------------------------------------------


def test_session_update_for_an_8k_call_is_ulaw_both_ways_with_tools_and_server_vad() -> None:
    msg = valid(build_session_update(setup(8000, voice="marin", tools=TOOLS, language="de"), vad=vad(),
                                     event_id="vb_1"))
    session = msg["session"]
    assert session["type"] == "realtime" and session["instructions"] == "Be brief."
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["output"]["voice"] == "marin"
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "threshold": 0.6, "silence_duration_ms": 600, "prefix_padding_ms": 200,
        "create_response": True, "interrupt_response": True}
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe", "language": "de"}
    assert session["tools"] == [{"type": "function", **TOOLS[0]}]
    assert session["tool_choice"] == "auto"
    assert msg["event_id"] == "vb_1"


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
def test_session_update_for_other_calls_is_pcm_24k(rate: int) -> None:
    session = valid(build_session_update(setup(rate)))["session"]
    for side in ("input", "output"):
        assert session["audio"][side]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert "tools" not in session and "voice" not in session["audio"]["output"]


def test_rates_follow_the_call() -> None:
    assert (gateway(8000).sample_rate, gateway(8000).output_rate) == (8000, 8000)
    assert (gateway(16000).sample_rate, gateway(16000).output_rate) == (24000, 24000)


def test_local_vad_means_no_turn_detection_on_the_service() -> None:
    session = valid(build_session_update(setup(), vad=vad("local")))["session"]
    assert session["audio"]["input"]["turn_detection"] is None
    assert OpenAIRealtimeGateway(None, "k", vad=vad("local")).local_vad is not None
    assert OpenAIRealtimeGateway(None, "k", vad=vad("server")).local_vad is None


def test_vad_off_keeps_turns_but_never_barges_in() -> None:
    session = valid(build_session_update(setup(), vad=vad("off")))["session"]
    td = session["audio"]["input"]["turn_detection"]
    assert td["type"] == "server_vad" and td["interrupt_response"] is False and td["create_response"] is True
    gw = gateway(vad=vad("off"))
    assert gw.local_vad is None
    list(gw._on_message(delta("item_a", b"\x10\x00" * 8000)))
    events = list(gw._on_message('{"type": "input_audio_buffer.speech_started", "event_id": "e", '
                                 '"audio_start_ms": 100, "item_id": "u1"}'))
    assert events == [] and sent(gw) == []  # no ClearPlayback, no truncate


def test_semantic_vad_and_no_transcription() -> None:
    session = valid(build_session_update(setup(), vad=vad("semantic"), transcription_model=None))["session"]
    assert session["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    assert "transcription" not in session["audio"]["input"]


def test_unknown_vad_mode_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="vad mode"):
        turn_detection(vad("loud"))
    with pytest.raises(ValueError, match="vad mode"):
        OpenAIRealtimeGateway(None, "k", vad=vad("loud"))


def test_opening_is_session_update_then_the_greeting() -> None:
    gw = OpenAIRealtimeGateway(None, "k")
    s = setup(first_message='Hello, "Acme" here.')
    gw._configure(s)
    first, second = (valid(m if isinstance(m, str) else m.decode()) for m in gw._opening(s))
    assert first["type"] == "session.update"
    assert second["type"] == "response.create"
    assert 'Hello, "Acme" here.' in second["response"]["instructions"]
    assert "input" not in second["response"]  # no conversation item: the greeting is the model's own
    valid(build_greeting("Hi"))


def test_uri_adds_the_model_once() -> None:
    assert OpenAIRealtimeGateway(None, "k")._uri() == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert OpenAIRealtimeGateway("ws://h/v1/realtime?x=1", "k", model="m 1")._uri() == \
        "ws://h/v1/realtime?x=1&model=m%201"
    assert OpenAIRealtimeGateway("ws://h/v1/realtime?model=a", "k")._uri() == "ws://h/v1/realtime?model=a"
    assert OpenAIRealtimeGateway(None, "sk-1")._headers == {"Authorization": "Bearer sk-1"}


# ---- caller audio -------------------------------------------------------------------------------


def test_caller_audio_is_a_valid_append_in_the_session_format() -> None:
    pcm = bytes(range(256)) * 2 + b"\x00\x80" * 32  # 320 bytes: one 20 ms frame at 8 kHz
    gw = gateway(8000)
    msg = valid(str(gw._encode_audio(pcm)))
    assert base64.b64decode(msg["audio"]) == g711.encode(pcm)
    assert gw._pcm_len(gw._encode_audio(pcm)) == len(pcm)
    gw = gateway(16000)
    msg = valid(str(gw._encode_audio(pcm)))
    assert base64.b64decode(msg["audio"]) == pcm


def test_local_vad_turn_end_commits_and_asks_for_a_response() -> None:
    gw = gateway(vad=vad("local"))
    gw.caller_speech_stopped()
    assert [m["type"] for m in sent(gw)] == ["input_audio_buffer.commit", "response.create"]
    list(gw._on_message('{"type": "response.created", "event_id": "e", "response": {}}'))
    list(gw._on_message(delta("item_a", b"\x10\x00" * 8000)))  # 1 s of the AI's answer
    gw.caller_speech_started(0.25)  # the caller heard a quarter of it when they spoke
    cancel, truncate = sent(gw)
    assert cancel["type"] == "response.cancel"
    assert truncate["type"] == "conversation.item.truncate"
    assert (truncate["item_id"], truncate["audio_end_ms"]) == ("item_a", 250)


# ---- barge-in and truncate ----------------------------------------------------------------------


@pytest.mark.parametrize(("heard", "start", "samples", "complete", "expected"), [
    (1.25, 1.0, 8000, True, 250),     # heard a quarter of a 1 s item
    (0.9, 1.0, 8000, True, 0),        # barge-in before the item was reached: clipped to 0
    (2.5, 1.0, 8000, True, None),     # complete and heard to the end: nothing to forget
    (2.5, 1.0, 8000, False, 1000),    # still being generated: the rest must be forgotten
    (1.0004, 1.0, 8000, True, 0),
])
def test_truncate_point(heard: float, start: float, samples: int, complete: bool, expected: int | None) -> None:
    assert truncate_point(heard, start, samples, 8000, complete) == expected


def test_barge_in_clears_then_truncates_at_what_the_caller_heard() -> None:
    gw = gateway(8000)
    position = [0.0]
    gw.playout_position = lambda: position[0]
    frame = b"\x10\x20" * 800  # 100 ms at 8 kHz
    # A first item of 0.5 s, fully heard, then a second one of 1 s.
    for _ in range(5):
        list(gw._on_message(delta("item_a", frame)))
    list(gw._on_message('{"type":"response.output_audio.done","event_id":"e","response_id":"r","item_id":"item_a",'
                        '"output_index":0,"content_index":0}'))
    list(gw._on_message('{"type":"response.created","event_id":"e","response":{"id":"r2"}}'))
    audio = [e for _ in range(10) for e in gw._on_message(delta("item_b", frame))]
    assert sum(len(e.pcm) for e in audio if isinstance(e, AudioOut)) == 16000
    position[0] = 0.5 + 0.37  # the caller heard 370 ms of item_b
    events = gw._on_message('{"type":"input_audio_buffer.speech_started","event_id":"e","audio_start_ms":10,'
                            '"item_id":"u1"}')
    assert next(events) == ClearPlayback()
    assert not gw._control  # the truncate only once the session has cleared
    position[0] = 1.5  # the clear counts the dropped audio as passed
    assert list(events) == []
    (truncate,) = sent(gw)
    ConversationItemTruncateEvent.model_validate(truncate)
    assert truncate["type"] == "conversation.item.truncate"
    assert (truncate["item_id"], truncate["content_index"], truncate["audio_end_ms"]) == ("item_b", 0, 370)
    # Late deltas of the interrupted item are dropped; the next item starts where the clock is.
    assert list(gw._on_message(delta("item_b", frame))) == []
    list(gw._on_message(delta("item_c", frame)))
    assert gw._items["item_c"].start_s == pytest.approx(1.5)


def test_speech_started_after_a_fully_heard_item_sends_no_truncate() -> None:
    gw = gateway(8000)
    gw.playout_position = lambda: 0.2
    list(gw._on_message(delta("item_a", b"\x01\x00" * 1600)))
    list(gw._on_message('{"type":"response.done","event_id":"e","response":{"id":"r","status":"completed",'
                        '"output":[{"id":"item_a","type":"message","role":"assistant","content":[]}]}}'))
    events = list(gw._on_message('{"type":"input_audio_buffer.speech_started","event_id":"e","audio_start_ms":0,'
                                 '"item_id":"u"}'))
    assert events == []  # nothing left to clear either
    assert sent(gw) == []


# ---- tools --------------------------------------------------------------------------------------


def fc_done(call_id: str, arguments: str, name: str = "lookup") -> str:
    return json.dumps({"type": "response.function_call_arguments.done", "event_id": "e", "response_id": "r",
                       "item_id": "fc1", "output_index": 0, "call_id": call_id, "name": name,
                       "arguments": arguments})


def test_function_call_once_even_when_announced_twice() -> None:
    gw = gateway()
    assert list(gw._on_message(fc_done("c1", '{"id": 7}'))) == [ToolCall("c1", "lookup", {"id": 7})]
    item_done = json.dumps({"type": "response.output_item.done", "event_id": "e", "response_id": "r",
                            "output_index": 0, "item": {"id": "fc1", "type": "function_call", "call_id": "c1",
                                                        "name": "lookup", "arguments": '{"id": 7}'}})
    assert list(gw._on_message(item_done)) == []


@pytest.mark.parametrize(("arguments", "problem"), [
    ("{not json", "not valid JSON"), ("[1]", "JSON object"), ("", None)])
def test_bad_arguments_become_a_tool_call_with_a_problem(arguments: str, problem: str | None) -> None:
    (call,) = list(gateway()._on_message(fc_done("c1", arguments)))
    assert isinstance(call, ToolCall) and call.call_id == "c1" and call.args == {}
    assert (call.problem is None) if problem is None else (problem in str(call.problem))
    assert parse_tool_arguments(7)[1] == "arguments must be a JSON text, got int"


def test_call_without_call_id_is_a_parse_problem() -> None:
    with pytest.raises(ParseProblem, match="call_id"):
        list(gateway()._on_message(fc_done("", "{}")))


async def test_results_of_one_turn_make_one_response_after_the_active_one() -> None:
    gw = gateway()
    list(gw._on_message('{"type":"response.created","event_id":"e","response":{"id":"r"}}'))
    list(gw._on_message(fc_done("c1", "{}")))
    list(gw._on_message(fc_done("c2", "{}")))
    await gw.send_tool_result("c1", "one")
    (item,) = sent(gw)
    assert item["item"] == {"type": "function_call_output", "call_id": "c1", "output": "one"}
    await gw.send_tool_result("c2", "two")
    assert [m["type"] for m in sent(gw)] == ["conversation.item.create"]  # a response is still active
    assert list(gw._on_message('{"type":"response.done","event_id":"e","response":{"id":"r"}}')) == [ResponseDone()]
    assert [m["type"] for m in sent(gw)] == ["response.create"]


async def test_a_lone_result_asks_for_a_response_at_once() -> None:
    gw = gateway()
    list(gw._on_message(fc_done("c1", "{}")))
    await gw.send_tool_result("c1", "ok")
    assert [m["type"] for m in sent(gw)] == ["conversation.item.create", "response.create"]


# ---- transcripts, errors, session ---------------------------------------------------------------


def test_transcripts() -> None:
    gw = gateway()
    user = json.dumps({"type": "conversation.item.input_audio_transcription.completed", "event_id": "e",
                       "item_id": "u", "content_index": 0, "transcript": "hello",
                       "usage": {"type": "duration", "seconds": 1.0}})
    ai = json.dumps({"type": "response.output_audio_transcript.done", "event_id": "e", "response_id": "r",
                     "item_id": "a", "output_index": 0, "content_index": 0, "transcript": "hi there"})
    assert list(gw._on_message(user)) == [Transcript("user", "hello", True)]
    assert list(gw._on_message(ai)) == [Transcript("assistant", "hi there", True)]


def error(code: str, about: str | None = None) -> str:
    return json.dumps({"type": "error", "event_id": "e",
                       "error": {"type": "invalid_request_error", "code": code, "message": "m", "event_id": about}})


def test_errors_end_the_call_only_when_the_session_cannot_go_on() -> None:
    gw = gateway()
    gw._opening(setup())
    assert list(gw._on_message(error("invalid_value", "vb_99"))) == []
    assert list(gw._on_message(error("conversation_already_has_active_response"))) == []
    (fatal,) = list(gw._on_message(error("invalid_value", gw._session_update_id)))
    assert isinstance(fatal, RemoteError) and "session configuration" in fatal.message
    (expired,) = list(gw._on_message(error("session_expired")))
    assert isinstance(expired, RemoteError)


def test_session_updated_with_other_audio_formats_ends_the_call() -> None:
    gw = gateway(8000)
    gw._opening(setup(8000))
    ok = {"type": "session.updated", "event_id": "e", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}}
    assert list(gw._on_message(json.dumps(ok))) == []
    ok["session"]["audio"]["output"]["format"] = {"type": "audio/pcm", "rate": 24000}  # type: ignore[index]
    (problem,) = list(gw._on_message(json.dumps(ok)))
    assert isinstance(problem, RemoteError) and "audio/pcm" in problem.message


@pytest.mark.parametrize("text", ["{not json", "[1]", '{"no": "type"}', b"\x00\x01",
                                  '{"type":"response.output_audio.delta","item_id":"i","delta":"***"}'])
def test_bad_messages_are_parse_problems(text: str | bytes) -> None:
    with pytest.raises(ParseProblem):
        list(gateway()._on_message(text))


def test_unknown_and_rate_limit_events_are_ignored() -> None:
    gw = gateway()
    assert list(gw._on_message('{"type":"rate_limits.updated","event_id":"e","rate_limits":[]}')) == []
    assert list(gw._on_message('{"type":"something.new","event_id":"e"}')) == []
