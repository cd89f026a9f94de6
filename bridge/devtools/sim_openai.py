"""Reference simulator of the OpenAI Realtime API (GA interface, WebSocket transport).

The real service is paid and unreachable from CI, so this is "the stranger" the ``openai-realtime``
adapter is tested against. It is written from OpenAI's Realtime documentation and, for the wire
format, from the vendor's own event models in the official ``openai`` package
(``openai.types.realtime``; the ``openai-sim`` extra): every server event is *constructed* as the
package's model and serialised with ``model_dump(mode="json", exclude_unset=True)`` (fields the
sim does not set are absent, fields it sets to null are sent as null), and every client event is
validated against the package's client-event model for its ``type``. The sim imports nothing from
the bridge except its sibling simulator bridge/devtools/gateway_sim.py (audio helpers, energy VAD).

Protocol as implemented
=======================

Connection
    WebSocket on path ``/v1/realtime`` (else HTTP 404). The query must name a ``model`` (else 400).
    ``Authorization: Bearer <key>``, checked against ``accepted_keys`` (None: any non-empty key),
    else HTTP 401. ``OpenAI-Beta: realtime=v1`` selects the *beta* interface on the real service,
    whose events differ: refused with 400 (recorded in ``OpenAIRealtimeSim.refused``).
    The first server event is ``session.created`` with the default session (``audio/pcm`` 24 kHz
    both ways, ``server_vad``, voice ``marin``, no transcription).

Client events (each validated; see :func:`validate_client_event`)
    The model of the event's ``type`` must accept it (JSON types checked strictly), and no object
    in it may carry a key the model does not define (the package's models keep unknown keys as
    "extras", so a misspelt field would pass silently: the sim reports it). A failure is recorded
    in ``violations`` and answered with an ``error`` event (``invalid_request_error``) that carries
    the offending ``event_id``, as the service does; the session goes on.

    * ``session.update``: applied (``audio``, ``audio.input``, ``audio.output`` merged key by key;
      every other key replaced), answered with ``session.updated`` carrying the whole effective
      session. Refused (error, session unchanged): a change of ``model``, a ``transcription``
      session, a ``voice`` change after the model has spoken.
    * ``input_audio_buffer.append``: base64 audio in the session's input format: ``audio/pcm``
      (s16le 24 kHz, an even number of bytes), ``audio/pcmu`` or ``audio/pcma`` (8 kHz), decoded to
      s16le (the sim's own G.711 decoders) and recorded in ``audio``.
    * ``input_audio_buffer.commit`` (error ``input_audio_buffer_commit_empty`` under 100 ms),
      ``input_audio_buffer.clear``, ``response.create`` (error
      ``conversation_already_has_active_response`` while one is active), ``response.cancel`` (error
      ``response_cancel_not_active`` without one), ``conversation.item.create`` (a
      ``function_call_output`` must answer a call the sim made, once),
      ``conversation.item.truncate`` (must name an assistant audio item the sim sent, content 0, and
      ``audio_end_ms`` not beyond the audio sent for it: else a violation and an error; accepted
      ones are recorded in ``truncates`` and answered with ``conversation.item.truncated``).
    * ``conversation.item.delete`` / ``retrieve``, ``output_audio_buffer.clear``: accepted, logged.

    Mid-call (what the bridge's ``context``/``say``/``tools`` commands send): a ``message`` item
    of role ``system`` is recorded in ``system_messages`` (its ``input_text`` texts joined) — any
    other content type in a system message is a violation; a ``session.update`` after the first one
    that carries ``tools`` is recorded in ``tool_updates`` (the tool names, in order), and the
    session's tools are replaced; a ``response.create`` with ``response.instructions`` is recorded
    in ``instructed`` and spoken as described under Responses.

Turn detection (``server_vad`` / ``semantic_vad``: the same energy VAD here)
    gateway_sim's frame VAD (sample-count timed: bursty clients get deterministic results) on the
    decoded caller audio: ``input_audio_buffer.speech_started`` (with ``interrupt_response``, an
    active response is cancelled: ``response.done`` status ``cancelled``, reason
    ``turn_detected``); at the end ``input_audio_buffer.speech_stopped``, ``committed``, the user
    item (``conversation.item.added``/``done``), ``conversation.item.input_audio_transcription.completed``
    ``"(speech 1.20 s)"`` when transcription is on, and with ``create_response`` a response that
    echoes the utterance (when ``echo``). With ``turn_detection: null`` the client commits and asks
    for responses itself.

Responses
    ``response.created``, ``rate_limits.updated``, ``response.output_item.added``,
    ``conversation.item.added``, ``response.content_part.added``, ``response.output_audio.delta``
    bursts (``burst_chunk_ms``, back to back, far faster than real time), ``response.output_audio.done``,
    ``response.output_audio_transcript.done``, ``response.content_part.done``,
    ``response.output_item.done``, ``conversation.item.done``, ``response.done``. What a
    ``response.create`` says: with ``response.instructions``, speech-like audio for the text to say
    (the quoted text, or what follows the first ``": "``, or the whole instructions) with that text
    as transcript (the greeting); after a ``function_call_output``, ``"(result: …)"``; after a
    committed utterance, its echo; else a short ``"(ok)"``.

Scripting (the interface shared by every simulator: see bridge/devtools/gateway_sim.py)
    ``session.send_audio(pcm)`` (a response speaking ``pcm``, s16le at ``output_rate``), ``clear()``
    (``speech_started``, cancelling any active response), ``call_tool(name, args)`` (a response with
    a ``function_call`` item; returns the ``function_call_output``'s ``output``), ``hangup()`` (the
    API has no hang-up event: the service closes, 1000), ``send_error(code, message)``,
    ``send_raw_text``. Recorded: ``messages``, ``violations``, ``audio``, ``truncates``
    ((item_id, audio_end_ms)), ``item_audio_ms`` (audio sent per assistant item).

CLI: ``voxbridge gateway-sim --protocol openai-realtime [--listen HOST:PORT] [--api-key KEY] [--no-echo]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import itertools
import json
import logging
import re
import time
import typing
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pydantic
from openai.types.realtime import (
    ConversationItemAdded,
    ConversationItemDone,
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemTruncatedEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RateLimitsUpdatedEvent,
    RealtimeClientEvent,
    RealtimeErrorEvent,
    ResponseAudioDeltaEvent,
    ResponseAudioDoneEvent,
    ResponseAudioTranscriptDoneEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseDoneEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .gateway_sim import VadConfig, _Vad, speechlike
from .sim_common import (
    SessionClosed,
    SimSessionBase,
    WsSimServer,
    add_server_arguments,
    api_keys,
    how_closed,
    serve_until_cancelled,
)

__all__ = ["OpenAIRealtimeSim", "OpenAIRealtimeSimSession", "add_arguments", "alaw_decode", "model_extras",
           "run_from_args", "server_event", "ulaw_decode", "ulaw_encode", "validate_client_event"]

log = logging.getLogger("voxbridge.sim_openai")

PATH = "/v1/realtime"
PCM_RATE = 24000
G711_RATE = 8000


# --------------------------------------------------------------------------------------------
# The vendor's models: client validation, server construction
# --------------------------------------------------------------------------------------------


def model_extras(value: Any, path: str = "$") -> list[str]:
    """Every key in a validated model tree that its model does not define (openai's models accept
    and keep unknown keys, so a misspelt field would otherwise validate)."""
    found: list[str] = []
    if isinstance(value, pydantic.BaseModel):
        found.extend(f"{path}.{key}" for key in (value.model_extra or {}))
        for name in type(value).model_fields:
            found.extend(model_extras(getattr(value, name), f"{path}.{name}"))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found.extend(model_extras(v, f"{path}[{i}]"))
    return found


@cache
def _client_models() -> dict[str, pydantic.TypeAdapter[Any]]:
    """``type`` -> a TypeAdapter of that client event's model (the members of RealtimeClientEvent)."""
    union = typing.get_args(RealtimeClientEvent)[0]
    out: dict[str, pydantic.TypeAdapter[Any]] = {}
    for model in typing.get_args(union):
        literal = model.model_fields["type"].annotation
        for name in typing.get_args(literal):
            out[name] = pydantic.TypeAdapter(model)
    return out


def validate_client_event(text: str | bytes) -> tuple[dict[str, Any] | None, list[str]]:
    """One client message: ``(the parsed object or None, problems)``; no problems: valid.

    Checked: JSON object; a known ``type``; the package's model for that type accepts it in strict
    JSON mode; no key anywhere that the models do not define."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, [f"not valid JSON ({exc})"]
    if not isinstance(msg, dict):
        return None, [f"not a JSON object ({type(msg).__name__})"]
    mtype = msg.get("type")
    adapter = _client_models().get(mtype) if isinstance(mtype, str) else None
    if adapter is None:
        return msg, [f"unknown client event type {mtype!r}"]
    try:
        model = adapter.validate_json(text, strict=True)
    except pydantic.ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or '$'}: {e['msg']}" for e in exc.errors(include_url=False)]
        fields = adapter.core_schema.get("schema", {}).get("fields", {})  # the model's own fields
        if fields:
            problems += [f"unknown field $.{key}" for key in msg if key not in fields]
        return msg, problems
    return msg, [f"unknown field {p}" for p in model_extras(model)]


def server_event(model: type[pydantic.BaseModel], **fields: Any) -> dict[str, Any]:
    """A server event built as the vendor's model (validated: a sim bug fails loudly here), as the
    JSON object the service sends. ``event_id`` is generated."""
    fields.setdefault("event_id", f"event_{uuid.uuid4().hex[:20]}")
    obj = model(**fields)
    extras = model_extras(obj)
    if extras:
        raise ValueError(f"{model.__name__}: fields the model does not define: {', '.join(extras)}")
    dumped: dict[str, Any] = obj.model_dump(mode="json", exclude_unset=True)
    return dumped


# --------------------------------------------------------------------------------------------
# G.711 (the sim's own, from the standard; not the bridge's)
# --------------------------------------------------------------------------------------------


def ulaw_decode(data: bytes) -> bytes:
    """G.711 µ-law bytes -> s16le."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return bytes(np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype("<i2").tobytes())


def ulaw_encode(pcm: bytes) -> bytes:
    """s16le -> G.711 µ-law (the reference algorithm: 14-bit magnitude, bias 33, clip 8159, eight
    segments, bits inverted)."""
    v = np.frombuffer(pcm[: len(pcm) & ~1], dtype="<i2").astype(np.int32) >> 2
    negative = v < 0
    v = np.minimum(np.where(negative, -v, v), 8159) + 33
    exponent = np.maximum(np.floor(np.log2(v)).astype(np.int32) - 5, 0)
    over = exponent > 7  # beyond the last segment: the largest code
    exponent = np.minimum(exponent, 7)
    mantissa = np.where(over, 0x0F, (v >> (exponent + 1)) & 0x0F)
    code = ((exponent << 4) | mantissa) ^ np.where(negative, 0x7F, 0xFF)
    return bytes(code.astype(np.uint8).tobytes())


def alaw_decode(data: bytes) -> bytes:
    """G.711 A-law bytes -> s16le."""
    a = np.frombuffer(data, dtype=np.uint8).astype(np.int32) ^ 0x55
    seg = (a >> 4) & 0x07
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
    return bytes(np.where(a & 0x80, t, -t).astype("<i2").tobytes())


def _resample(pcm: bytes, src: int, dst: int) -> bytes:
    if src == dst or not pcm:
        return pcm
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    n = max(1, round(len(x) * dst / src))
    y = np.interp(np.arange(n) * (src / dst), np.arange(len(x)), x)
    return bytes(np.clip(np.round(y), -32768, 32767).astype("<i2").tobytes())


def _format_rate(fmt: Mapping[str, Any] | None) -> int:
    return PCM_RATE if (fmt or {}).get("type", "audio/pcm") == "audio/pcm" else G711_RATE


def _say_text(instructions: str) -> str:
    """What a model told "say X" says: the quoted text, else what follows the first ': '."""
    quoted = re.search(r'"([^"]+)"', instructions)
    if quoted:
        return quoted.group(1)
    _, sep, rest = instructions.partition(": ")
    return rest.strip() if sep and rest.strip() else instructions


def _default_session(model: str) -> dict[str, Any]:
    return {
        "type": "realtime",
        "model": model,
        "instructions": "",
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": PCM_RATE},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                   "silence_duration_ms": 500, "create_response": True,
                                   "interrupt_response": True},
            },
            "output": {"format": {"type": "audio/pcm", "rate": PCM_RATE}, "voice": "marin", "speed": 1.0},
        },
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
    }


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


@dataclass
class _Response:
    id: str
    cancelled: str | None = None  # the reason, once cancelled
    output: list[dict[str, Any]] = field(default_factory=list)


class OpenAIRealtimeSimSession(SimSessionBase):
    """One client connection. Read the recorded state freely in tests (see the module doc)."""

    _log = log
    _task_prefix = "sim-openai"
    _accepted_what = "an applied session.update"
    _message_noun = "event"

    def __init__(self, sim: OpenAIRealtimeSim, ws: ServerConnection, index: int, model: str) -> None:
        super().__init__(index, sim.max_messages)
        self._sim = sim
        self._ws = ws
        self.model = model
        self.session: dict[str, Any] = _default_session(model)
        self.config: dict[str, Any] | None = None  # the first session.update's ``session``
        self.errors_sent: list[dict[str, Any]] = []
        self.truncates: list[tuple[str, int]] = []
        self.system_messages: list[str] = []
        self.tool_updates: list[list[str]] = []
        self.instructed: list[str] = []
        self.item_audio_ms: dict[str, int] = {}
        self.barge_ins = 0
        self.speaking_until = 0.0
        self.close_code: int | None = None
        self._input_buffer = bytearray()  # appended since the last commit (manual turns)
        self._committed: bytes | None = None  # the last committed utterance not yet answered
        self._last_output: str | None = None  # the last function_call_output not yet answered
        self._item_samples: dict[str, int] = {}
        self._item_rate: dict[str, int] = {}
        self._active: _Response | None = None
        self._spoke = False
        self._vad: _Vad | None = None
        self._vad_key: tuple[Any, ...] | None = None
        self._input_ms = 0.0
        self._ids = itertools.count(1)

    # ---- formats ------------------------------------------------------------------------------

    @property
    def input_rate(self) -> int:
        """Hz of the decoded caller audio in :attr:`audio` (the session's input format)."""
        return _format_rate(self.session["audio"]["input"].get("format"))

    @property
    def output_rate(self) -> int:
        """Hz of the s16le PCM :meth:`send_audio` takes (the session's output format)."""
        return _format_rate(self.session["audio"]["output"].get("format"))

    @property
    def is_speaking(self) -> bool:
        return time.monotonic() < self.speaking_until

    # ---- scripting API --------------------------------------------------------------------------

    def _accepted_setup(self) -> dict[str, Any] | None:
        """The ``session`` of the first ``session.update`` the sim applied."""
        return self.config

    async def send_audio(self, pcm: bytes, chunk_ms: int = 100, transcript: str | None = None) -> str:
        """A response speaking ``pcm`` (s16le at :attr:`output_rate`); returns its item id."""
        if len(pcm) % 2:
            raise ValueError(f"PCM s16le needs an even number of bytes, got {len(pcm)}")
        return await self._respond_audio(pcm, transcript if transcript is not None else "(audio)", chunk_ms)

    async def say(self, text: str, ms: int | None = None) -> str:
        ms = ms if ms is not None else max(400, min(self._sim.greeting_max_ms, 60 * len(text)))
        return await self._respond_audio(speechlike(text, ms, self.output_rate), text, self._sim.burst_chunk_ms)

    async def clear(self) -> None:
        """The service's barge-in: ``input_audio_buffer.speech_started`` (and the active response,
        if any, cancelled)."""
        await self._speech_started()

    async def call_tool(self, name: str, args: Mapping[str, Any], call_id: str | None = None,
                        timeout: float = 20, raw_arguments: str | None = None) -> str:
        """A response calling ``name``; returns the output of the ``function_call_output`` item.
        ``raw_arguments`` sends that text as the arguments instead (e.g. invalid JSON)."""
        arguments = raw_arguments if raw_arguments is not None else json.dumps(dict(args))

        async def send(cid: str) -> None:
            await self._respond_function_call(name, cid, arguments)

        return await self._call(name, call_id, send, timeout, None, id_hex=16)

    async def hangup(self) -> None:
        """The API has no hang-up event: the service ends a session by closing the WebSocket."""
        await self._ws.close(1000, "session ended")

    async def send_error(self, code: str, message: str, *, about: str | None = None,
                         error_type: str = "invalid_request_error") -> None:
        await self._error(code, message, about, error_type=error_type, violation=None)

    async def send_event(self, event: Mapping[str, Any]) -> None:
        await self._send(json.dumps(event, separators=(",", ":")))

    async def send_raw_text(self, text: str) -> None:
        await self._send(text)

    # ---- plumbing -----------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{self.index}_{next(self._ids)}"

    async def _send(self, text: str) -> None:
        if self._finished:
            raise SessionClosed(f"session {self.index} is closed")
        try:
            await self._ws.send(text)
        except ConnectionClosed as exc:
            raise SessionClosed(f"session {self.index} is closed") from exc

    async def _emit(self, model: type[pydantic.BaseModel], **fields: Any) -> dict[str, Any]:
        event = server_event(model, **fields)
        await self._send(json.dumps(event, separators=(",", ":")))
        return event

    def _violation(self, text: str) -> None:  # no "(further violations not recorded)" marker here
        if len(self.violations) < self._sim.max_messages:
            self.violations.append(text)
        self._notify()

    async def _error(self, code: str, message: str, about: Any, *, param: str | None = None,
                     error_type: str = "invalid_request_error", violation: str | None = "") -> None:
        """An ``error`` event (``about``: the client's event_id it concerns); records a violation
        (``message`` unless ``violation`` says otherwise; None: none)."""
        if violation is not None:
            self._violation(violation or message)
        error: dict[str, Any] = {"type": error_type, "code": code, "message": message,
                                 "event_id": about if isinstance(about, str) else None}
        if param is not None:
            error["param"] = param
        event = await self._emit(RealtimeErrorEvent, type="error", error=error)
        self.errors_sent.append(event)

    # ---- the connection -------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._emit(SessionCreatedEvent, type="session.created", session=self.session)
        log.info("session %d start: model %s", self.index, self.model)
        try:
            async for message in self._ws:
                await self._on_message(message)
        except (ConnectionClosed, SessionClosed):
            pass

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._error("invalid_json", "binary frames are not accepted: send JSON text events", None)
            return
        msg, problems = validate_client_event(message)
        if msg is not None:
            self._record(msg)
        about = msg.get("event_id") if msg is not None else None
        if problems:
            mtype = msg.get("type") if msg is not None else None
            text = f"{mtype or 'message'}: " + "; ".join(problems)
            code = ("invalid_json" if msg is None else "unknown_parameter" if problems[0].startswith("unknown field")
                    else "invalid_value")
            await self._error(code, text, about)
            return
        assert msg is not None
        handler = getattr(self, "_on_" + msg["type"].replace(".", "_"), None)
        if handler is None:
            log.info("session %d: %s accepted (no effect in the sim)", self.index, msg["type"])
            return
        await handler(msg, about)

    # ---- client events -------------------------------------------------------------------------

    async def _on_session_update(self, msg: dict[str, Any], about: Any) -> None:
        update = msg["session"]
        if update.get("type") != "realtime":
            await self._error("invalid_value", "this is a realtime session: session.type must be 'realtime'",
                              about, param="session.type")
            return
        if "model" in update and update["model"] != self.session["model"]:
            await self._error("invalid_value", "the model of a session cannot be changed", about,
                              param="session.model")
            return
        voice = (update.get("audio") or {}).get("output", {}).get("voice")
        if voice is not None and self._spoke and voice != self.session["audio"]["output"].get("voice"):
            await self._error("cannot_update_voice", "voice cannot be changed after the model has spoken", about,
                              param="session.audio.output.voice")
            return
        merged = json.loads(json.dumps(self.session))
        for key, value in update.items():
            if key == "audio" and isinstance(value, dict):
                for side, part in value.items():
                    merged["audio"].setdefault(side, {}).update(part or {})
            else:
                merged[key] = value
        self.session = merged
        self._vad = None  # rebuilt for the new settings at the next audio
        if self.accepted and "tools" in update:
            self.tool_updates.append([str(t.get("name")) for t in update["tools"] or []])
        if not self.accepted:
            self.config = update
            self.accepted = True
        await self._emit(SessionUpdatedEvent, type="session.updated", session=self.session)
        self._notify()

    async def _on_input_audio_buffer_append(self, msg: dict[str, Any], about: Any) -> None:
        try:
            data = base64.b64decode(msg["audio"], validate=True)
        except (binascii.Error, ValueError):
            await self._error("invalid_value", "input_audio_buffer.append: audio is not valid base64", about,
                              param="audio")
            return
        fmt = self.session["audio"]["input"].get("format") or {}
        kind = fmt.get("type", "audio/pcm")
        if kind == "audio/pcmu":
            pcm = ulaw_decode(data)
        elif kind == "audio/pcma":
            pcm = alaw_decode(data)
        else:
            if len(data) % 2:
                await self._error("invalid_value", f"input_audio_buffer.append: {len(data)} bytes of audio/pcm "
                                  "is not a whole number of 16-bit samples", about, param="audio")
                return
            pcm = data
        if not pcm:
            return
        rate = self.input_rate
        self._keep_audio(pcm, self._sim.audio_cap_bytes)
        self._notify()
        td = self.session["audio"]["input"].get("turn_detection")
        if td is None:
            self._input_buffer += pcm
            del self._input_buffer[: max(0, len(self._input_buffer) - 2 * rate * 30)]
            self._input_ms += len(pcm) / 2 / rate * 1000
            return
        key = (rate, json.dumps(td, sort_keys=True))
        if self._vad is None or self._vad_key != key:
            silence = int(td.get("silence_duration_ms") or 500)
            self._vad = _Vad(VadConfig(threshold_rms=self._sim.vad_threshold_rms, min_silence_ms=silence), rate)
            self._vad_key = key
        for event, utterance in self._vad.feed(pcm):
            if event == "speech_start":
                await self._speech_started(interrupt=bool(td.get("interrupt_response", True)))
            else:
                await self._speech_stopped(utterance, rate, create=bool(td.get("create_response", True)))
        self._input_ms += len(pcm) / 2 / rate * 1000

    async def _speech_started(self, interrupt: bool = True) -> None:
        was_speaking = self.is_speaking or self._active is not None
        await self._emit(InputAudioBufferSpeechStartedEvent, type="input_audio_buffer.speech_started",
                         audio_start_ms=int(self._input_ms), item_id=self._id("item"))
        if was_speaking:
            self.barge_ins += 1
        self.speaking_until = time.monotonic()
        if interrupt and self._active is not None:
            self._active.cancelled = "turn_detected"
        self._notify()

    async def _speech_stopped(self, utterance: bytes, rate: int, *, create: bool) -> None:
        item_id = self._id("item")
        await self._emit(InputAudioBufferSpeechStoppedEvent, type="input_audio_buffer.speech_stopped",
                         audio_end_ms=int(self._input_ms), item_id=item_id)
        await self._commit(item_id, utterance, rate)
        if create and self._active is None:
            self._spawn(self._answer(), "answer")

    async def _commit(self, item_id: str, utterance: bytes, rate: int) -> None:
        seconds = len(utterance) / 2 / rate
        await self._emit(InputAudioBufferCommittedEvent, type="input_audio_buffer.committed", item_id=item_id)
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        await self._emit(ConversationItemAdded, type="conversation.item.added", item=item)
        await self._emit(ConversationItemDone, type="conversation.item.done", item=item)
        self._committed = _resample(utterance, rate, self.output_rate)
        transcription = self.session["audio"]["input"].get("transcription")
        if transcription:
            await self._emit(ConversationItemInputAudioTranscriptionCompletedEvent,
                             type="conversation.item.input_audio_transcription.completed", item_id=item_id,
                             content_index=0, transcript=f"(speech {seconds:.2f} s)",
                             usage={"type": "duration", "seconds": round(seconds, 3)})

    async def _on_input_audio_buffer_commit(self, msg: dict[str, Any], about: Any) -> None:
        rate = self.input_rate
        if len(self._input_buffer) < 2 * rate // 10:
            await self._error("input_audio_buffer_commit_empty",
                              f"buffer too small: expected at least 100ms of audio, but buffer only has "
                              f"{len(self._input_buffer) / 2 / rate * 1000:.2f}ms of audio", about)
            return
        utterance, self._input_buffer = bytes(self._input_buffer), bytearray()
        await self._commit(self._id("item"), utterance, rate)

    async def _on_input_audio_buffer_clear(self, msg: dict[str, Any], about: Any) -> None:
        self._input_buffer.clear()
        await self._emit(InputAudioBufferClearedEvent, type="input_audio_buffer.cleared")

    async def _on_response_create(self, msg: dict[str, Any], about: Any) -> None:
        if self._active is not None:
            await self._error("conversation_already_has_active_response",
                              f"Conversation already has an active response in progress: {self._active.id}. "
                              "Wait until the response is finished before creating a new one.", about)
            return
        instructions = (msg.get("response") or {}).get("instructions")
        if instructions:
            self.instructed.append(instructions)
        self._spawn(self._answer(instructions), "response")

    async def _on_response_cancel(self, msg: dict[str, Any], about: Any) -> None:
        if self._active is None:
            await self._error("response_cancel_not_active", "Cancellation failed: no active response found",
                              about, violation=None)  # a race the service tolerates: not a violation
            return
        self._active.cancelled = "client_cancelled"

    async def _on_conversation_item_create(self, msg: dict[str, Any], about: Any) -> None:
        item = dict(msg["item"])
        if item.get("type") == "function_call_output":
            call_id = item["call_id"]
            pending = self._pending_calls.pop(call_id, None)
            if pending is None:
                reason = "answered twice" if call_id in self.tool_results else "not a call the model made"
                await self._error("invalid_value", f"function_call_output for call_id {call_id!r}: {reason}",
                                  about, param="item.call_id")
                return
            self._answer_call(call_id, pending, item["output"])
            self._last_output = item["output"]
        elif item.get("type") == "message" and item.get("role") == "system":
            parts = item.get("content") or []
            if not parts or any(p.get("type") != "input_text" for p in parts):
                await self._error("invalid_value", "a system message's content must be input_text parts", about,
                                  param="item.content")
                return
            self.system_messages.append("".join(str(p.get("text", "")) for p in parts))
        item.setdefault("id", self._id("item"))
        item.setdefault("object", "realtime.item")
        item.setdefault("status", "completed")
        await self._emit(ConversationItemAdded, type="conversation.item.added", item=item)
        await self._emit(ConversationItemDone, type="conversation.item.done", item=item)
        self._notify()

    async def _on_conversation_item_truncate(self, msg: dict[str, Any], about: Any) -> None:
        item_id, end_ms, index = msg["item_id"], msg["audio_end_ms"], msg["content_index"]
        if item_id not in self.item_audio_ms:
            await self._error("invalid_value", f"conversation.item.truncate: no assistant audio item {item_id!r}",
                              about, param="item_id")
            return
        if index != 0:
            await self._error("invalid_value", f"conversation.item.truncate: item {item_id!r} has one content "
                              f"part (0), not {index}", about, param="content_index")
            return
        sent_ms = self.item_audio_ms[item_id]
        if not 0 <= end_ms <= sent_ms:
            await self._error("invalid_value", f"Audio content of {sent_ms}ms is already shorter than {end_ms}ms",
                              about, param="audio_end_ms")
            return
        self.truncates.append((item_id, end_ms))
        await self._emit(ConversationItemTruncatedEvent, type="conversation.item.truncated", item_id=item_id,
                         content_index=0, audio_end_ms=end_ms)
        self._notify()

    # ---- responses ------------------------------------------------------------------------------

    async def _answer(self, instructions: str | None = None) -> None:
        if instructions:
            text = _say_text(instructions)
            await self.say(text)
        elif self._last_output is not None:
            text, self._last_output = f"(result: {self._last_output[:80]})", None
            await self.say(text)
        elif self._committed is not None and self._sim.echo:
            utterance, self._committed = self._committed, None
            seconds = len(utterance) / 2 / self.output_rate
            await self._respond_audio(utterance, f"(echo {seconds:.2f} s)", self._sim.burst_chunk_ms)
        else:
            await self.say("(ok)", ms=400)

    def _response(self, response: _Response, status: str) -> dict[str, Any]:
        out: dict[str, Any] = {"id": response.id, "object": "realtime.response", "status": status,
                               "output": response.output, "output_modalities": ["audio"]}
        if response.cancelled and status == "cancelled":
            out["status_details"] = {"type": "cancelled", "reason": response.cancelled}
        return out

    async def _begin(self) -> _Response:
        response = _Response(self._id("resp"))
        self._active = response
        await self._emit(ResponseCreatedEvent, type="response.created",
                         response=self._response(response, "in_progress"))
        await self._emit(RateLimitsUpdatedEvent, type="rate_limits.updated", rate_limits=[
            {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
            {"name": "tokens", "limit": 40000, "remaining": 39000, "reset_seconds": 1.5}])
        return response

    async def _end(self, response: _Response) -> None:
        self._active = None
        status = "cancelled" if response.cancelled else "completed"
        await self._emit(ResponseDoneEvent, type="response.done", response=self._response(response, status))
        self._notify()

    async def _respond_audio(self, pcm: bytes, transcript: str, chunk_ms: int) -> str:
        async with self._speak_lock:
            response = await self._begin()
            item_id = self._id("item")
            rate = self.output_rate
            ulaw = (self.session["audio"]["output"].get("format") or {}).get("type") == "audio/pcmu"
            where = {"response_id": response.id, "item_id": item_id, "output_index": 0, "content_index": 0}
            item: dict[str, Any] = {"id": item_id, "object": "realtime.item", "type": "message",
                                    "role": "assistant", "status": "in_progress", "content": []}
            await self._emit(ResponseOutputItemAddedEvent, type="response.output_item.added",
                             response_id=response.id, output_index=0, item=item)
            await self._emit(ConversationItemAdded, type="conversation.item.added", item=item)
            await self._emit(ResponseContentPartAddedEvent, type="response.content_part.added",
                             part={"type": "audio", "transcript": ""}, **where)
            self.item_audio_ms[item_id] = 0
            self._item_samples[item_id] = 0
            self._item_rate[item_id] = rate
            chunk = max(2, 2 * round(rate * chunk_ms / 1000))
            for off in range(0, len(pcm), chunk):
                if response.cancelled:
                    break
                piece = pcm[off: off + chunk]
                payload = ulaw_encode(piece) if ulaw else piece
                await self._emit(ResponseAudioDeltaEvent, type="response.output_audio.delta",
                                 delta=base64.b64encode(payload).decode("ascii"), **where)
                self._spoke = True
                samples = self._item_samples[item_id] = self._item_samples[item_id] + len(piece) // 2
                self.item_audio_ms[item_id] = samples * 1000 // rate
                self.speaking_until = max(time.monotonic(), self.speaking_until) + len(piece) / 2 / rate
                await asyncio.sleep(0)  # let a barge-in (speech_started / response.cancel) in
            status = "incomplete" if response.cancelled else "completed"
            content = [{"type": "output_audio", "transcript": transcript}]
            done_item = {**item, "status": status, "content": content}
            if not response.cancelled:
                await self._emit(ResponseAudioDoneEvent, type="response.output_audio.done", **where)
                await self._emit(ResponseAudioTranscriptDoneEvent, type="response.output_audio_transcript.done",
                                 transcript=transcript, **where)
                await self._emit(ResponseContentPartDoneEvent, type="response.content_part.done",
                                 part={"type": "audio", "transcript": transcript}, **where)
            await self._emit(ResponseOutputItemDoneEvent, type="response.output_item.done",
                             response_id=response.id, output_index=0, item=done_item)
            await self._emit(ConversationItemDone, type="conversation.item.done", item=done_item)
            response.output.append(done_item)
            await self._end(response)
            return item_id

    async def _respond_function_call(self, name: str, call_id: str, arguments: str) -> None:
        async with self._speak_lock:
            response = await self._begin()
            item_id = self._id("item")
            item: dict[str, Any] = {"id": item_id, "object": "realtime.item", "type": "function_call",
                                    "status": "in_progress", "name": name, "call_id": call_id, "arguments": ""}
            await self._emit(ResponseOutputItemAddedEvent, type="response.output_item.added",
                             response_id=response.id, output_index=0, item=item)
            where = {"response_id": response.id, "item_id": item_id, "output_index": 0, "call_id": call_id}
            await self._emit(ResponseFunctionCallArgumentsDeltaEvent, type="response.function_call_arguments.delta",
                             delta=arguments, **where)
            await self._emit(ResponseFunctionCallArgumentsDoneEvent, type="response.function_call_arguments.done",
                             name=name, arguments=arguments, **where)
            done_item = {**item, "status": "completed", "arguments": arguments}
            await self._emit(ResponseOutputItemDoneEvent, type="response.output_item.done",
                             response_id=response.id, output_index=0, item=done_item)
            await self._emit(ConversationItemDone, type="conversation.item.done", item=done_item)
            response.output.append(done_item)
            await self._end(response)

    async def _finish(self) -> None:
        await self._stop_tasks()
        await self._ws.wait_closed()
        self.close_code, _, self.closed_by = how_closed(self._ws.protocol)
        self._fail_pending_calls("the output of")
        log.info("session %d end: close %s by %s, caller audio %d B, violations %d", self.index, self.close_code,
                 self.closed_by or "network", self.audio_bytes_total, len(self.violations))
        self._mark_closed()


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class OpenAIRealtimeSim(WsSimServer[OpenAIRealtimeSimSession]):
    """The service: a WebSocket server on ``/v1/realtime``, one session per connection.

    ``accepted_keys=None`` accepts any non-empty bearer key. ``vad_threshold_rms``: the energy the
    sim's server VAD calls speech (about -36 dBFS by default).
    """

    def __init__(
        self,
        *,
        accepted_keys: Iterable[str] | None = None,
        echo: bool = True,
        burst_chunk_ms: int = 200,
        greeting_max_ms: int = 2000,
        vad_threshold_rms: float = 500.0,
        audio_cap_bytes: int = 8 * 1024 * 1024,
        max_messages: int = 10_000,
        keep_sessions: int | None = None,
    ) -> None:
        if burst_chunk_ms <= 0 or max_messages <= 0 or audio_cap_bytes < 0:
            raise ValueError("burst_chunk_ms and max_messages must be positive, audio_cap_bytes >= 0")
        super().__init__(accepted_keys, keep_sessions)
        self.echo = echo
        self.burst_chunk_ms = burst_chunk_ms
        self.greeting_max_ms = greeting_max_ms
        self.vad_threshold_rms = vad_threshold_rms
        self.audio_cap_bytes = audio_cap_bytes
        self.max_messages = max_messages
        #: Handshakes refused: (HTTP status, why).
        self.refused: list[tuple[int, str]] = []

    _path = PATH
    _max_size = 2**22

    def _refuse(self, connection: ServerConnection, status: HTTPStatus, why: str) -> Response:
        self.refused.append((int(status), why))
        log.info("handshake refused: %d %s", status, why)
        body = json.dumps({"error": {"type": "invalid_request_error", "message": why}})
        return connection.respond(status, body + "\n")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path != PATH:
            return self._refuse(connection, HTTPStatus.NOT_FOUND, f"the Realtime endpoint is {PATH}")
        if not parse_qs(parts.query).get("model", [""])[0]:
            return self._refuse(connection, HTTPStatus.BAD_REQUEST, "missing required parameter: 'model'")
        if request.headers.get("OpenAI-Beta", "").strip().lower().startswith("realtime"):
            return self._refuse(connection, HTTPStatus.BAD_REQUEST,
                                "OpenAI-Beta: realtime=v1 selects the beta interface; the GA interface takes none")
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not self._key_accepted(key.strip()):
            return self._refuse(connection, HTTPStatus.UNAUTHORIZED, "Incorrect API key provided")
        return None

    def _new_session(self, ws: ServerConnection, index: int) -> OpenAIRealtimeSimSession:
        assert ws.request is not None
        model = parse_qs(urlsplit(ws.request.path).query)["model"][0]
        return OpenAIRealtimeSimSession(self, ws, index, model)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``voxbridge gateway-sim --protocol openai-realtime``."""
    add_server_arguments(parser, listen_help=f"address to serve ws://HOST:PORT{PATH} on (default 127.0.0.1:8765)",
                         key_help="an accepted bearer key (repeatable); without it any non-empty key is accepted")
    parser.add_argument("--no-echo", dest="echo", action="store_false",
                        help="do not answer the caller's speech with its echo")


async def run_from_args(args: argparse.Namespace) -> None:
    """Serve until cancelled, with the options :func:`add_arguments` declared."""
    host, port = args.listen
    sim = OpenAIRealtimeSim(accepted_keys=api_keys(args), echo=getattr(args, "echo", True), keep_sessions=32)
    await serve_until_cancelled(sim, host, port, log, "OpenAI Realtime sim listening on %s (api keys: %s)",
                                f"{len(args.api_keys)} configured" if args.api_keys else "any non-empty key")
