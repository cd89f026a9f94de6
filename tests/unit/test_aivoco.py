"""The aivoco adapter's pure protocol code: payloads built, events parsed, the function-call mapping."""

from __future__ import annotations

import base64
import time
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.devtools.sim_aivoco import validate_start_call
from bridge.gateway import aivoco
from bridge.gateway.aivoco import (
    AivocoGateway,
    ParseProblem,
    audio_payload,
    build_custom_functions,
    build_function_result,
    build_start_call,
    coerce_arguments,
    decode_audio,
    parse_function_call,
    voice_choice,
)
from bridge.gateway.base import AudioOut, Closed, RemoteError, RemoteHangup, SessionSetup, ToolCall, Transcript

TOOLS: list[dict[str, Any]] = [
    {"name": "transfer", "description": "Transfer the caller", "parameters": {
        "type": "object",
        "properties": {
            "exten": {"type": "string", "description": "Extension"},
            "priority": {"type": "integer"},
            "urgent": {"type": "boolean", "description": "Now?"},
            "ratio": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mode": {"type": "string", "enum": ["warm", "cold"]},
        },
        "required": ["exten"],
    }},
    {"name": "end_call", "description": "Hang up", "parameters": {"type": "object", "properties": {}}},
]


def _setup(**kw: Any) -> SessionSetup:
    base: dict[str, Any] = {"provider": "aivoco", "sample_rate": 16000, "system_prompt": "Be brief.",
                            "first_message": None, "tools": TOOLS}
    base.update(kw)
    return SessionSetup(**base)


def test_event_names_are_the_vendor_examples() -> None:
    assert (aivoco.FUNCTION_CALL_EVENT, aivoco.FUNCTION_RESULT_EVENT) == ("function_called", "function_response")
    assert aivoco.AUDIO_DATA == "audio_data" and aivoco.START_CALL == "start_call" and aivoco.STOP_CALL == "stop_call"


@pytest.mark.parametrize(("voice", "expected"), [
    (None, "female"), ("", "female"), ("Female", "female"), ("MALE", "male"), ("man", "male"), (" boy ", "male"),
    ("girl", "female"), ("f", "female"),
])
def test_voice_choice_maps_profile_voices(voice: str | None, expected: str) -> None:
    assert voice_choice(voice) == expected


def test_voice_choice_names_an_unknown_voice_and_honours_the_default() -> None:
    with pytest.raises(ValueError, match="'alloy'"):
        voice_choice("alloy")
    assert voice_choice(None, "male") == "male"
    with pytest.raises(ValueError, match="default voice"):
        voice_choice(None, "robot")


def test_custom_functions_follow_the_vendor_list_format() -> None:
    funcs = build_custom_functions(TOOLS)
    assert [f["name"] for f in funcs] == ["transfer", "end_call"]
    params = {p["name"]: p for p in funcs[0]["parameters"]}
    assert params["exten"] == {"name": "exten", "type": "string", "description": "Extension", "required": True}
    assert params["priority"]["type"] == "number" and "integer" in params["priority"]["description"]
    assert params["urgent"] == {"name": "urgent", "type": "boolean", "description": "Now?", "required": False}
    assert params["ratio"]["type"] == "number"
    assert params["tags"]["type"] == "string" and "JSON-encoded array" in params["tags"]["description"]
    assert params["mode"]["description"] == "One of: warm, cold"
    assert funcs[1]["parameters"] == []
    # What we build is what the strict simulator accepts.
    assert validate_start_call({"auth_key": "k", "system_message": "", "voice_choice": "male",
                                "custom_functions": funcs}) == []


def test_start_call_payload() -> None:
    msg = build_start_call(_setup(voice="male", first_message="Hi there"), "key-1")
    assert set(msg) == {"auth_key", "system_message", "voice_choice", "custom_functions"}
    assert msg["auth_key"] == "key-1" and msg["voice_choice"] == "male"
    assert msg["system_message"].startswith("Be brief.") and "Hi there" in msg["system_message"]
    plain = build_start_call(_setup(first_message="Hi"), "k", first_message_in_prompt=False)
    assert plain["system_message"] == "Be brief." and plain["voice_choice"] == "female"
    with pytest.raises(ValueError, match="'alloy'"):
        build_start_call(_setup(voice="alloy"), "k")


def test_audio_payload_encodes_pcm_and_measures_the_peak() -> None:
    pcm = (1000).to_bytes(2, "little", signed=True) + (-32768).to_bytes(2, "little", signed=True)
    p = audio_payload(pcm)
    assert base64.b64decode(p["audio_data"]) == pcm
    assert p["max_amplitude"] == 1.0 and p["has_audio"] is True
    quiet = audio_payload((100).to_bytes(2, "little", signed=True) * 160)
    assert quiet["has_audio"] is False and quiet["max_amplitude"] == pytest.approx(100 / 32768)
    # The detector's verdict wins over the energy test.
    assert audio_payload(pcm, has_audio=False)["has_audio"] is False
    assert audio_payload(bytes(320), has_audio=True)["has_audio"] is True


def test_decode_audio_accepts_whole_samples_only() -> None:
    assert decode_audio({"audio_data": base64.b64encode(b"\x01\x02\x03\x04").decode()}) == b"\x01\x02\x03\x04"
    with pytest.raises(ParseProblem, match="not whole 16-bit samples"):
        decode_audio({"audio_data": base64.b64encode(b"\x01\x02\x03").decode()})
    with pytest.raises(ParseProblem, match="not valid base64"):
        decode_audio({"audio_data": "%%%not base64"})
    with pytest.raises(ParseProblem, match="not an object"):
        decode_audio("AAAA")
    with pytest.raises(ParseProblem, match="base64 string"):
        decode_audio({"audio_data": 12})


def test_function_call_parsing_and_argument_coercion() -> None:
    tools = {t["name"]: t for t in TOOLS}
    call = parse_function_call({"call_id": "c1", "function_name": "transfer",
                                "arguments": {"exten": "200", "priority": 2.0, "tags": '["a","b"]', "ratio": 2.0}},
                               tools)
    assert call == ToolCall("c1", "transfer", {"exten": "200", "priority": 2, "tags": ["a", "b"], "ratio": 2.0})
    assert isinstance(call.args["priority"], int) and isinstance(call.args["ratio"], float)
    # Double-encoded arguments, an integer call id, no arguments at all.
    assert parse_function_call({"call_id": 7, "function_name": "end_call", "arguments": "{}"}) == ToolCall(
        "7", "end_call", {})
    assert parse_function_call({"call_id": "x", "function_name": "end_call"}).args == {}


@pytest.mark.parametrize(("data", "problem"), [
    ({"call_id": "c", "function_name": "", "arguments": {}}, "no function_name"),
    ({"call_id": "c", "function_name": "t", "arguments": "{bad"}, "not valid JSON"),
    ({"call_id": "c", "function_name": "t", "arguments": [1]}, "must be a JSON object"),
])
def test_malformed_function_calls_are_still_answered(data: dict[str, Any], problem: str) -> None:
    call = parse_function_call(data)
    assert call.call_id == "c" and call.problem is not None and problem in call.problem


@pytest.mark.parametrize("data", [None, "text", {"function_name": "t"}, {"call_id": "", "function_name": "t"},
                                  {"call_id": True, "function_name": "t"}])
def test_unanswerable_function_calls_are_a_parse_problem(data: Any) -> None:
    with pytest.raises(ParseProblem):
        parse_function_call(data)


def test_coerce_leaves_what_it_cannot_convert() -> None:
    schema = TOOLS[0]["parameters"]
    assert coerce_arguments({"priority": 2.5, "tags": "not json", "exten": 5}, schema) == {
        "priority": 2.5, "tags": "not json", "exten": 5}
    assert coerce_arguments({"a": 1}, None) == {"a": 1}


def test_function_result_carries_the_text_losslessly() -> None:
    text = '{"ok": true,  "n": 1}'
    msg = build_function_result("c1", "lookup", text)
    assert msg == {"call_id": "c1", "function_name": "lookup", "result": {"result": text}}


def _gateway(**kw: Any) -> AivocoGateway:
    return AivocoGateway("ws://127.0.0.1:1", "k", **kw)


def test_constructor_rates_vad_and_validation() -> None:
    gw = _gateway()
    assert gw.sample_rate == 16000 and gw.output_rate == 24000 and gw.local_vad is None
    assert _gateway(output_rate=16000).output_rate == 16000
    vad = SimpleNamespace(mode="webrtc", threshold=0.5, silence_duration_ms=500, prefix_padding_ms=300)
    assert _gateway(vad=vad).local_vad is vad
    assert _gateway(vad=SimpleNamespace(mode="off")).local_vad is None
    with pytest.raises(ValueError, match="auth_key"):
        AivocoGateway("ws://x", "")
    with pytest.raises(ValueError, match="output_rate"):
        _gateway(output_rate=11025)
    with pytest.raises(ValueError, match="default voice"):
        _gateway(default_voice="robot")


def _events(gw: AivocoGateway) -> list[Any]:
    out = list(gw._events)
    gw._events.clear()
    return out


def test_dispatch_of_each_server_event() -> None:
    gw = _gateway()
    gw._tools = {t["name"]: t for t in TOOLS}
    gw._on_event("session_ready", {"message": "ok", "functions_loaded": 2})
    assert gw._ready and gw._released
    pcm = b"\x10\x00" * 480
    gw._on_event("audio_response", {"audio_data": base64.b64encode(pcm).decode()})
    gw._on_event("text_response", {"text": "Hello"})
    gw._on_event("function_called", {"call_id": "c9", "function_name": "transfer", "arguments": {"exten": "1"}})
    gw._on_event("error", {"message": "slow down", "type": "rate_limit_exceeded"})  # logged, ignored
    gw._on_event("error", {"message": "no money", "type": "insufficient_credits"})
    gw._on_event("session_ended", {"reason": "insufficient_user_credits"})
    assert _events(gw) == [AudioOut(pcm), Transcript("assistant", "Hello", True),
                           ToolCall("c9", "transfer", {"exten": "1"}),
                           RemoteError("insufficient_credits: no money"), RemoteHangup()]
    assert gw.stats["bytes_down"] == len(pcm) and gw._open_calls == {"c9": "transfer"}


def test_bad_payloads_are_ignored() -> None:
    gw = _gateway()
    gw._on_event("session_ready", {})
    for event, data in [("audio_response", "garbage"), ("audio_response", {"audio_data": "AAEC"}),
                        ("text_response", {"text": 5}), ("function_called", {"function_name": "x"}),
                        ("made_up", {}), ("session_ready", {}), ("function_result", {"function_name": "x"})]:
        gw._on_event(event, data)
    assert _events(gw) == []


def test_setup_failures_are_remembered_without_the_key() -> None:
    gw = _gateway()
    gw._on_event("auth_failed", {"message": "Invalid API key", "credits": 0})
    assert gw._setup_done.is_set() and gw._setup_failure == "authentication failed: Invalid API key"
    gw2 = _gateway()
    gw2._on_event("error", {"message": "bad", "type": "invalid_request"})
    assert gw2._setup_failure == "error: invalid_request: bad"
    assert _events(gw2) == []


def test_disconnect_is_unclean_unless_ended_or_ours() -> None:
    lost = _gateway()
    lost._on_event("session_ready", {})
    lost._on_disconnect("transport error")
    (closed,) = _events(lost)
    assert closed.clean is False and "transport error" in closed.reason
    ended = _gateway()
    ended._on_event("session_ready", {})
    ended._on_event("session_ended", {"reason": "done"})
    ended._on_disconnect("server disconnect")
    assert [type(e).__name__ for e in ended._events] == ["RemoteHangup", "Closed"]
    assert ended._events[-1] == Closed(None, "session ended by the gateway", clean=True)


def test_send_audio_holds_then_bounds_the_uplink() -> None:
    gw = _gateway(hold_ms=100, uplink_buffer_ms=200)
    frame = b"\x00\x01" * 320
    for _ in range(8):
        gw.send_audio(frame)
    assert len(gw._uplink) == 5 and gw.stats["dropped_up"] == 3  # held: the last 100 ms
    gw._on_event("session_ready", {})
    for _ in range(8):
        gw.send_audio(frame)
    assert len(gw._uplink) == 10 and gw.stats["dropped_up"] == 6
    gw.send_audio(b"")
    gw.send_audio(b"\x01")
    assert len(gw._uplink) == 10


def test_has_audio_follows_the_local_detector() -> None:
    vad = SimpleNamespace(mode="webrtc")
    gw = _gateway(vad=vad)
    loud = (20000).to_bytes(2, "little", signed=True) * 320
    gw.send_audio(loud)
    gw.caller_speech_started(0.0)
    gw.send_audio(bytes(640))
    gw.caller_speech_stopped()
    gw.send_audio(loud)
    assert [p["has_audio"] for p in gw._uplink] == [False, True, False]
    energy = _gateway()
    energy.send_audio(loud)
    energy.send_audio(bytes(640))
    assert [p["has_audio"] for p in energy._uplink] == [True, False]


def test_send_audio_is_cheap() -> None:
    """The hot path (50 frames a second per call): base64, a peak and a deque append."""
    gw = _gateway(hold_ms=100_000)
    frame = (1234).to_bytes(2, "little", signed=True) * 320  # 20 ms at 16 kHz
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        gw.send_audio(frame)
    per_frame = (time.perf_counter() - t0) / n
    assert per_frame < 200e-6, f"{per_frame * 1e6:.1f} µs per frame"
