"""The generic-ws adapter's pure parts: parse_server_message and the client message builders."""

from __future__ import annotations

import base64
import json
import struct
import warnings
from types import SimpleNamespace

import pytest

from bridge import g711
from bridge.gateway.base import (
    AudioOut,
    ClearPlayback,
    RemoteError,
    ResponseDone,
    SessionSetup,
    ToolCall,
    Transcript,
)
from bridge.gateway.generic_ws import (
    GenericWsGateway,
    ServerNotice,
    SessionReady,
    build_audio_input,
    build_session_init,
    build_text_input,
    build_tool_result,
    parse_server_message,
)
from bridge.gateway.ws import ParseProblem

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def parse(obj: object, audio_format: str = "g711_ulaw"):
    return parse_server_message(json.dumps(obj), audio_format)  # type: ignore[arg-type]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PCM = struct.pack("<6h", 0, 1000, -1000, 32767, -32768, 8)


# ---------------------------------------------------------------------------------- server → client


@pytest.mark.parametrize("mtype,field", [("audio_delta", "audio"), ("audio_chunk", "data")])
def test_ulaw_audio_is_decoded_like_the_reference(mtype, field):
    ulaw = audioop.lin2ulaw(PCM, 2)
    event = parse({"type": mtype, field: b64(ulaw)})
    assert event == AudioOut(audioop.ulaw2lin(ulaw, 2))
    assert len(event.pcm) == 2 * len(ulaw)


@pytest.mark.parametrize("mtype,field", [("audio_delta", "audio"), ("audio_chunk", "data")])
def test_pcm16_audio_passes_through(mtype, field):
    assert parse({"type": mtype, field: b64(PCM)}, "pcm16") == AudioOut(PCM)


def test_audio_in_the_other_variants_field_is_accepted():
    assert parse({"type": "audio_chunk", "audio": b64(PCM)}, "pcm16") == AudioOut(PCM)
    assert parse({"type": "audio_delta", "data": b64(PCM)}, "pcm16") == AudioOut(PCM)


def test_empty_audio_is_nothing_to_do():
    assert parse({"type": "audio_delta", "audio": ""}) is None


@pytest.mark.parametrize("payload,problem", [
    ("not base64!!", "not valid base64"),
    ("QUJ", "not valid base64"),             # missing padding
    (None, "base64 string"),
    (123, "base64 string"),
])
def test_bad_audio_is_a_parse_problem(payload, problem):
    with pytest.raises(ParseProblem, match=problem):
        parse({"type": "audio_delta", "audio": payload})


def test_odd_length_pcm16_is_a_parse_problem():
    with pytest.raises(ParseProblem, match="odd length 3"):
        parse({"type": "audio_chunk", "data": b64(b"\x01\x02\x03")}, "pcm16")
    # µ-law has one byte per sample: any length is whole samples.
    assert parse({"type": "audio_chunk", "data": b64(b"\x01\x02\x03")}) == AudioOut(g711.decode(b"\x01\x02\x03"))


@pytest.mark.parametrize("obj,expected", [
    ({"type": "transcript", "text": "hi", "role": "user"}, Transcript("user", "hi", True)),
    ({"type": "transcript", "text": "yes", "role": "assistant"}, Transcript("assistant", "yes", True)),
    ({"type": "transcription", "text": "AI response", "speaker": "assistant"},
     Transcript("assistant", "AI response", True)),
    ({"type": "transcription", "text": "x", "speaker": "AI"}, Transcript("assistant", "x", True)),
    ({"type": "transcription", "text": "x", "speaker": "caller"}, Transcript("user", "x", True)),
    ({"type": "transcript", "text": "x", "role": "narrator"}, Transcript("narrator", "x", True)),
])
def test_transcripts_are_final(obj, expected):
    assert parse(obj) == expected


@pytest.mark.parametrize("obj,problem", [
    ({"type": "transcript", "text": "x"}, "'role'"),
    ({"type": "transcript", "text": "x", "speaker": "user"}, "'role'"),   # the other variant's field
    ({"type": "transcription", "text": "x", "role": "user"}, "'speaker'"),
    ({"type": "transcript", "role": "user"}, "'text'"),
    ({"type": "transcript", "text": 5, "role": "user"}, "'text'"),
])
def test_malformed_transcripts(obj, problem):
    with pytest.raises(ParseProblem, match=problem):
        parse(obj)


@pytest.mark.parametrize("mtype", ["user_speech_started", "speech_started"])
def test_speech_started_is_barge_in(mtype):
    assert parse({"type": mtype}) == ClearPlayback()


@pytest.mark.parametrize("mtype", ["response_complete", "audio_done"])
def test_response_done(mtype):
    assert parse({"type": mtype}) == ResponseDone()


@pytest.mark.parametrize("mtype", ["session_started", "ready"])
def test_ready_variants(mtype):
    assert parse({"type": mtype}) == SessionReady(mtype)


def test_only_fatal_true_is_a_remote_error():
    assert parse({"type": "error", "message": "boom", "fatal": True}) == RemoteError("boom")
    assert parse({"type": "error", "message": "meh", "fatal": False}) == ServerNotice("meh")
    assert parse({"type": "error", "message": "meh"}) == ServerNotice("meh")  # missing: non-fatal
    notice = parse({"type": "error", "message": "odd", "fatal": "true"})
    assert isinstance(notice, ServerNotice) and "not a boolean" in notice.message
    assert parse({"type": "error", "fatal": True}) == RemoteError("(no message)")


def test_tool_call_extension():
    assert parse({"type": "tool_call", "call_id": "c1", "name": "lookup", "arguments": {"id": 7}}) == \
        ToolCall("c1", "lookup", {"id": 7})
    assert parse({"type": "tool_call", "call_id": 5, "name": "lookup", "arguments": '{"id": 7}'}) == \
        ToolCall("5", "lookup", {"id": 7})
    assert parse({"type": "tool_call", "call_id": "c", "name": "t"}) == ToolCall("c", "t", {})
    broken = parse({"type": "tool_call", "call_id": "c", "name": "t", "arguments": "{nope"})
    assert broken.call_id == "c" and broken.problem == "arguments are not valid JSON"
    assert parse({"type": "tool_call", "call_id": "c", "name": "t", "arguments": [1]}).problem.startswith(
        "arguments must be a JSON object")
    assert parse({"type": "tool_call", "call_id": "c"}).problem == "tool_call has no tool name"
    with pytest.raises(ParseProblem, match="call_id"):
        parse({"type": "tool_call", "name": "t"})
    with pytest.raises(ParseProblem, match="call_id"):
        parse({"type": "tool_call", "call_id": True, "name": "t"})


@pytest.mark.parametrize("text,problem", [
    ("not json", "invalid JSON"),
    ("[1, 2]", "JSON list"),
    ('{"no": "type"}', "no 'type'"),
    ('{"type": "surprise"}', "unknown message type 'surprise'"),
])
def test_unusable_messages(text, problem):
    with pytest.raises(ParseProblem, match=problem):
        parse_server_message(text, "g711_ulaw")


# ---------------------------------------------------------------------------------- client → server


SETUP = SessionSetup(provider="x", sample_rate=8000, system_prompt="Be brief.", voice="alloy", language="fr",
                     first_message="Hello")


def test_session_init_with_server_vad_settings():
    vad = SimpleNamespace(mode="server", threshold=0.4, silence_duration_ms=800, prefix_padding_ms=300)
    msg = build_session_init(SETUP, audio_format="g711_ulaw", sample_rate=8000, vad=vad)
    assert msg == {"type": "session.init", "config": {
        "audio_format": "g711_ulaw", "sample_rate": 8000, "channels": 1, "language": "fr", "voice": "alloy",
        "system_prompt": "Be brief.", "vad_enabled": True, "vad_threshold": 0.4,
        "vad_silence_duration_ms": 800, "vad_prefix_padding_ms": 300}}


def test_session_init_defaults_follow_the_seed():
    setup = SessionSetup(provider="x", sample_rate=16000, system_prompt="")
    cfg = build_session_init(setup, audio_format="pcm16", sample_rate=16000)["config"]
    assert cfg["language"] == "en" and cfg["voice"] == "default"
    assert cfg["vad_enabled"] is True and cfg["vad_threshold"] == 0.6 and cfg["vad_silence_duration_ms"] == 600
    assert "tools" not in cfg


@pytest.mark.parametrize("mode", ["local", "off"])
def test_session_init_without_server_vad(mode):
    vad = SimpleNamespace(mode=mode, threshold=0.4, silence_duration_ms=800, prefix_padding_ms=300)
    cfg = build_session_init(SETUP, audio_format="g711_ulaw", sample_rate=8000, vad=vad)["config"]
    assert cfg["vad_enabled"] is False
    assert not any(k.startswith("vad_") and k != "vad_enabled" for k in cfg)


def test_session_init_tools_only_when_there_are_some():
    tools = [{"name": "lookup", "description": "find", "parameters": {"type": "object"}}, {"name": "bare"}]
    setup = SessionSetup(provider="x", sample_rate=8000, system_prompt="", tools=tools)
    cfg = build_session_init(setup, audio_format="g711_ulaw", sample_rate=8000)["config"]
    assert cfg["tools"] == [tools[0], {"name": "bare", "description": "",
                                       "parameters": {"type": "object", "properties": {}}}]


def test_audio_input_ulaw_and_pcm16():
    msg = json.loads(build_audio_input(PCM, "g711_ulaw"))
    assert msg["type"] == "audio.input" and msg["format"] == "g711_ulaw"
    assert base64.b64decode(msg["audio"]) == audioop.lin2ulaw(PCM, 2)
    msg = json.loads(build_audio_input(PCM, "pcm16"))
    assert msg["format"] == "pcm16" and base64.b64decode(msg["audio"]) == PCM


def test_text_input_and_tool_result():
    assert build_text_input("Hello") == {"type": "text.input", "text": "Hello"}
    assert build_tool_result("c1", "ok") == {"type": "tool.result", "call_id": "c1", "result": "ok"}


# ---------------------------------------------------------------------------------- constructor


def test_constructor_checks_and_vad_modes():
    with pytest.raises(ValueError, match="g711_ulaw is 8000"):
        GenericWsGateway("ws://x/ws", audio_format="g711_ulaw", sample_rate=16000)
    with pytest.raises(ValueError, match="sample_rate"):
        GenericWsGateway("ws://x/ws", audio_format="pcm16", sample_rate=44100)
    with pytest.raises(ValueError, match="audio_format"):
        GenericWsGateway("ws://x/ws", audio_format="opus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ready_timeout"):
        GenericWsGateway("ws://x/ws", ready_timeout=0)
    with pytest.raises(ValueError, match=r"vad\.mode"):
        GenericWsGateway("ws://x/ws", vad=SimpleNamespace(mode="maybe"))
    local = SimpleNamespace(mode="local", threshold=0.5, silence_duration_ms=600, prefix_padding_ms=200)
    assert GenericWsGateway("ws://x/ws", vad=local).local_vad is local
    assert GenericWsGateway("ws://x/ws", vad=SimpleNamespace(mode="off")).local_vad is None
    assert GenericWsGateway("ws://x/ws").local_vad is None
    g = GenericWsGateway("ws://x/ws", audio_format="pcm16", sample_rate=24000, token="t0k")
    assert g.sample_rate == 24000 and g.output_rate is None
    assert g._headers == {"Authorization": "Bearer t0k"}
    assert GenericWsGateway("ws://x/ws")._headers == {}
