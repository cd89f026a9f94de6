"""OpenAI Realtime adapter: the GA Realtime API over one WebSocket.

Wire protocol: OpenAI's Realtime API (GA interface, no ``OpenAI-Beta`` header), as modelled by the
official ``openai`` Python package (``openai.types.realtime``). The adapter does not import that
package (the bridge must run without it); tests/unit/test_openai_realtime.py validates every client
event built here against its client-event models, and bridge/devtools/sim_openai.py, the strict
reference simulator the adapter is tested against, builds its server events from its server-event
models.

Connection
    ``wss://api.openai.com/v1/realtime?model=<model>`` with ``Authorization: Bearer <key>``; a bad
    key is refused at the handshake (HTTP 401), which :meth:`connect` reports as ``GatewayError``.

Session set-up (:func:`build_session_update`)
    One ``session.update`` right after the handshake: ``type: realtime``, the prompt as
    ``instructions``, ``audio.output.voice``, the profile's tools as ``function`` tools with
    ``tool_choice: auto``, the audio formats, turn detection and input transcription.

    Audio formats: an 8 kHz call (``setup.caller_rate == 8000``) speaks ``audio/pcmu`` both ways:
    :attr:`sample_rate` = :attr:`output_rate` = 8000 and the adapter converts s16le <-> µ-law with
    bridge/g711.py, so the call's audio is never resampled. Any other call speaks ``audio/pcm`` at
    24 kHz (the only PCM rate the API takes) and the session resamples.

    Turn detection from the ``vad`` settings (``mode``, ``threshold``, ``silence_duration_ms``,
    ``prefix_padding_ms``): ``server`` → ``server_vad`` with those values, ``semantic`` →
    ``semantic_vad``, both with ``create_response`` and ``interrupt_response``; ``off`` →
    ``server_vad`` with ``interrupt_response: false`` (the service still takes turns, nobody
    cuts the AI short, and its ``speech_started`` is not a barge-in); ``local`` →
    ``turn_detection: null``: the session runs bridge/vad.py's detector (:attr:`local_vad` holds
    the settings), :meth:`caller_speech_started` cancels the response and truncates the item at
    what the caller heard, and :meth:`caller_speech_stopped` commits the caller's audio and asks
    for a response.

Caller audio
    ``input_audio_buffer.append {audio: base64}``, one event per 20 ms frame. The uplink is
    released as soon as ``session.update`` is written: the service handles a connection's events
    in order, so audio appended after it is read in the new format, and waiting for
    ``session.updated`` would only delay the caller's first words by a round trip. A
    ``session.update`` the service refuses ends the session (see Errors).

First message
    A ``response.create`` whose ``response.instructions`` tells the model to say the first
    message (:func:`build_greeting`), sent right after ``session.update``. No conversation item is
    created: the greeting becomes the assistant's first item, as if the model had chosen the words.

AI audio and barge-in
    ``response.output_audio.delta`` → :class:`AudioOut`. For every assistant item the adapter
    records where its audio starts in the stream of AudioOut it yielded and how much it yielded.
    ``input_audio_buffer.speech_started`` → barge-in: the position the caller has heard
    (:attr:`playout_position`, read before anything is cleared) minus the item's start is what
    the caller heard of the current item; :class:`ClearPlayback` is yielded (the session drops the
    queued audio when it receives it), then ``conversation.item.truncate`` is sent with that many
    milliseconds, clipped to the item, so the model's memory of what it said matches what the
    caller heard (:func:`truncate_point`). No truncate when the item is complete and the caller
    heard all of it. Afterwards the stream position is re-read from the playout clock (a clear
    counts the dropped audio as passed), and late deltas of the interrupted item are dropped.

Tool calls
    ``response.function_call_arguments.done`` (or, if that was missed, ``response.output_item.done``
    with a ``function_call`` item) → :class:`ToolCall`, once per ``call_id``; arguments that are
    not a JSON object give a ToolCall with ``problem`` set (the router still answers it).
    :meth:`send_tool_result` sends ``conversation.item.create`` with a ``function_call_output``
    item, and one ``response.create`` once every call dispatched so far is answered and no
    response is in progress (else when the current one is done): several results of one turn make
    one response, and a response is never asked for while one is active (the API refuses that).

Transcripts, ends, errors
    ``conversation.item.input_audio_transcription.completed`` → ``Transcript(user)``,
    ``response.output_audio_transcript.done`` → ``Transcript(assistant)``; ``response.done`` →
    :class:`ResponseDone` (a failed or incomplete status is logged with its reason).
    ``error`` is logged with its type, code and the ``event_id`` of our event it refers to; most
    errors concern one request and the call goes on. :class:`RemoteError` (which ends the call) only
    for: an error about our ``session.update`` (the audio formats are then unknown), and the codes
    in :data:`FATAL_ERROR_CODES` (the session itself is over). ``session.updated`` whose audio
    formats differ from those asked for is also a RemoteError (audio would be misread); other
    differences are logged. ``rate_limits.updated`` is logged at debug level; unknown events too.
    Hang-up: close 1000 (the API has no hang-up message).

Mid-call commands (:attr:`capabilities`: context, say, tools)
    ``context`` → ``conversation.item.create`` with a ``system`` message item (``input_text``)
    (:func:`build_context_item`): the model reads it from its next response on, and nothing is
    spoken because of it. ``say`` → ``response.create`` whose ``response.instructions`` tell the
    model to say the text (:func:`build_say`), as for the first message; while a response is in
    progress (the API refuses a second one) the text waits and goes out when it is done, and a
    ``response.create`` the service refuses as "already active" is queued again, text and all.
    ``tools`` → ``session.update`` carrying only ``type``, ``tools`` and ``tool_choice``
    (:func:`build_tools_update`): every other session setting stays as it is.
"""

from __future__ import annotations

import base64
import binascii
import collections
import itertools
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from .. import g711
from .base import (
    AudioOut,
    ClearPlayback,
    GatewayEvent,
    RemoteError,
    ResponseDone,
    SessionSetup,
    ToolCall,
    Transcript,
)
from .ws import ParseProblem, WebSocketGateway, clip, load_json_object

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TRANSCRIPTION_MODEL",
    "DEFAULT_URL",
    "FATAL_ERROR_CODES",
    "OpenAIRealtimeGateway",
    "build_context_item",
    "build_greeting",
    "build_say",
    "build_tools_update",
    "build_session_update",
    "parse_tool_arguments",
    "truncate_point",
    "turn_detection",
]

log = logging.getLogger("voxbridge.gateway")

DEFAULT_URL = "wss://api.openai.com/v1/realtime"
DEFAULT_MODEL = "gpt-realtime"
DEFAULT_TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"
#: The only PCM rate the API takes (``audio/pcm``); µ-law (``audio/pcmu``) is 8 kHz.
PCM_RATE = 24000
ULAW_RATE = 8000
#: Error codes after which the service's session is gone: the call cannot go on.
FATAL_ERROR_CODES = frozenset({"session_expired", "invalid_api_key", "insufficient_quota"})
#: Our own events remembered (by ``event_id``) to say which one an ``error`` refers to.
_SENT_MEMORY = 256
#: Assistant items whose audio position is remembered (only the latest matters for a truncate).
_ITEM_MEMORY = 32
_CALL_MEMORY = 256
#: ``say`` texts waiting for the active response to finish (oldest dropped beyond this).
_SAY_QUEUE = 8

_APPEND_PREFIX = '{"type":"input_audio_buffer.append","audio":"'
_APPEND_SUFFIX = '"}'


# --------------------------------------------------------------------------------------------
# Pure builders and parsers (tested without a network)
# --------------------------------------------------------------------------------------------


def turn_detection(vad: Any) -> dict[str, Any] | None:
    """``audio.input.turn_detection`` for the ``vad`` settings (None: the service's server VAD with
    its defaults). ``None`` is returned for ``local``/``off``: no turn detection on the service."""
    if vad is None:
        return {"type": "server_vad", "create_response": True, "interrupt_response": True}
    mode = getattr(vad, "mode", "server") or "server"
    if mode == "local":
        return None
    if mode == "off":
        # No barge-in, but the service still takes turns: without turn detection nothing would
        # ever end the caller's turn and the model would only speak the greeting.
        return {"type": "server_vad", "create_response": True, "interrupt_response": False}
    if mode == "semantic":
        return {"type": "semantic_vad", "create_response": True, "interrupt_response": True}
    if mode != "server":
        raise ValueError(f"vad mode must be server, semantic, local or off (got {mode!r})")
    td: dict[str, Any] = {"type": "server_vad"}
    threshold = getattr(vad, "threshold", None)
    if threshold is not None:
        td["threshold"] = float(threshold)
    for key in ("silence_duration_ms", "prefix_padding_ms"):
        value = getattr(vad, key, None)
        if value is not None:
            td[key] = int(value)
    td["create_response"] = True
    td["interrupt_response"] = True
    return td


def build_session_update(setup: SessionSetup, *, vad: Any = None,
                         transcription_model: str | None = DEFAULT_TRANSCRIPTION_MODEL,
                         event_id: str | None = None) -> dict[str, Any]:
    """The ``session.update`` configuring the whole session (see the module doc)."""
    fmt: dict[str, Any] = ({"type": "audio/pcmu"} if setup.caller_rate == ULAW_RATE
                           else {"type": "audio/pcm", "rate": PCM_RATE})
    audio_in: dict[str, Any] = {"format": fmt, "turn_detection": turn_detection(vad)}
    if transcription_model:
        transcription: dict[str, Any] = {"model": transcription_model}
        if setup.language:
            transcription["language"] = setup.language
        audio_in["transcription"] = transcription
    audio_out: dict[str, Any] = {"format": dict(fmt)}
    if setup.voice:
        audio_out["voice"] = setup.voice
    session: dict[str, Any] = {
        "type": "realtime",
        "instructions": setup.system_prompt,
        "audio": {"input": audio_in, "output": audio_out},
    }
    if setup.tools:
        session["tools"] = _function_tools(setup.tools)
        session["tool_choice"] = "auto"
    msg: dict[str, Any] = {"type": "session.update", "session": session}
    if event_id is not None:
        msg["event_id"] = event_id
    return msg


def build_greeting(first_message: str, event_id: str | None = None) -> dict[str, Any]:
    """The ``response.create`` that makes the model speak the profile's first message."""
    msg: dict[str, Any] = {
        "type": "response.create",
        "response": {"instructions": "Start the call by saying exactly this to the caller, "
                                     f"and nothing else: {first_message}"},
    }
    if event_id is not None:
        msg["event_id"] = event_id
    return msg


def build_say(text: str, event_id: str | None = None) -> dict[str, Any]:
    """The ``response.create`` that makes the model say ``text`` now (the ``say`` command)."""
    msg: dict[str, Any] = {
        "type": "response.create",
        "response": {"instructions": f"Say exactly this to the caller, and nothing else: {text}"},
    }
    if event_id is not None:
        msg["event_id"] = event_id
    return msg


def build_context_item(text: str, event_id: str | None = None) -> dict[str, Any]:
    """The ``conversation.item.create`` adding ``text`` as a system message (the ``context`` command)."""
    msg: dict[str, Any] = {"type": "conversation.item.create",
                           "item": {"type": "message", "role": "system",
                                    "content": [{"type": "input_text", "text": text}]}}
    if event_id is not None:
        msg["event_id"] = event_id
    return msg


def _function_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "name": t["name"], "description": t.get("description", ""),
             "parameters": t.get("parameters") or {"type": "object", "properties": {}}} for t in tools]


def build_tools_update(tools: list[dict[str, Any]], event_id: str | None = None) -> dict[str, Any]:
    """The ``session.update`` replacing the session's tools (the ``tools`` command); nothing else in
    the session changes. ``tool_choice: none`` when no tool is left."""
    msg: dict[str, Any] = {"type": "session.update",
                           "session": {"type": "realtime", "tools": _function_tools(tools),
                                       "tool_choice": "auto" if tools else "none"}}
    if event_id is not None:
        msg["event_id"] = event_id
    return msg


def truncate_point(heard_position_s: float, item_start_s: float, item_samples: int, rate: int,
                   item_complete: bool) -> int | None:
    """``audio_end_ms`` for ``conversation.item.truncate`` after a barge-in, or None for none.

    ``heard_position_s``: where the caller is in the stream of AI audio; ``item_start_s``: where
    the item's audio starts in that stream; ``item_samples`` at ``rate``: how much of the item was
    received. The result is what the caller heard of the item, clipped to ``[0, item length]``;
    None when the item is complete and was heard to its end (nothing to forget).
    """
    item_ms = item_samples * 1000 // rate
    heard_ms = round((heard_position_s - item_start_s) * 1000)
    heard_ms = max(0, min(heard_ms, item_ms))
    if item_complete and heard_ms >= item_ms:
        return None
    return heard_ms


def parse_tool_arguments(arguments: Any) -> tuple[dict[str, Any], str | None]:
    """A function call's ``arguments`` (a JSON text) as ``(args, problem)``."""
    if not isinstance(arguments, str):
        return {}, f"arguments must be a JSON text, got {type(arguments).__name__}"
    if not arguments.strip():
        return {}, None
    try:
        args = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError) as exc:
        return {}, f"arguments are not valid JSON ({exc})"
    if not isinstance(args, dict):
        return {}, f"arguments must be a JSON object, got {type(args).__name__}"
    return args, None


def _obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (optional sub-objects of server events)."""
    return value if isinstance(value, dict) else {}


def _str_field(msg: Mapping[str, Any], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value:
        raise ParseProblem(f"{msg.get('type')} without a string {key!r}")
    return value


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    """One assistant item's audio: where it starts in the AudioOut stream, how much came."""

    start_s: float
    samples: int = 0
    complete: bool = False
    cut: bool = False  # interrupted: later deltas are dropped


class OpenAIRealtimeGateway(WebSocketGateway):
    """One OpenAI Realtime session (GA) over a WebSocket."""

    protocol_name = "openai-realtime"
    capabilities = frozenset({"context", "say", "tools"})

    def __init__(
        self,
        url: str | None,
        api_key: str,
        *,
        model: str = DEFAULT_MODEL,
        transcription_model: str | None = DEFAULT_TRANSCRIPTION_MODEL,
        vad: Any = None,
        connect_timeout: float = 5.0,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 10.0,
        hold_ms: int = 2000,
        call_id: str = "",
    ) -> None:
        if not model:
            raise ValueError("model must be a non-empty model name")
        turn_detection(vad)  # a bad mode fails here, at construction, not mid-call
        super().__init__(url or DEFAULT_URL, call_id=call_id, connect_timeout=connect_timeout,
                         keepalive_interval=keepalive_interval, keepalive_timeout=keepalive_timeout,
                         hold_ms=hold_ms, headers={"Authorization": f"Bearer {api_key}"})
        self._model = model
        self._transcription_model = transcription_model
        self._vad = vad
        mode = getattr(vad, "mode", None)
        self.local_vad = vad if mode == "local" else None
        self._barge_in_off = mode == "off"
        self._ulaw = False
        self._ids = itertools.count(1)
        self._sent: collections.OrderedDict[str, str] = collections.OrderedDict()  # event_id -> type
        self._session_update_id: str | None = None
        self._requested_formats: tuple[str, str] | None = None
        self._stream_s = 0.0  # seconds of AudioOut yielded (the stream the playout clock counts)
        self._items: collections.OrderedDict[str, _Item] = collections.OrderedDict()
        self._current: str | None = None  # the assistant item audio last came from
        self._calls_seen: collections.deque[str] = collections.deque(maxlen=_CALL_MEMORY)
        self._calls_open: set[str] = set()  # dispatched, not answered
        self._response_active = False
        self._want_response = False
        self._no_clock_logged = False
        self._says: collections.deque[str] = collections.deque(maxlen=_SAY_QUEUE)  # waiting for the floor
        self._say_sent: collections.OrderedDict[str, str] = collections.OrderedDict()  # event_id -> text

    # ------------------------------------------------------------------ set-up

    def _uri(self) -> str:
        parts = urlsplit(self._url)
        if "model" in parse_qs(parts.query):
            return self._url
        return self._url + ("&" if parts.query else "?") + "model=" + quote(self._model, safe="")

    def _configure(self, setup: SessionSetup) -> None:
        self._ulaw = setup.caller_rate == ULAW_RATE
        self.sample_rate = ULAW_RATE if self._ulaw else PCM_RATE
        self.output_rate = self.sample_rate

    def _event_id(self, mtype: str) -> str:
        event_id = f"vb_{next(self._ids)}"
        self._sent[event_id] = mtype
        while len(self._sent) > _SENT_MEMORY:
            self._sent.popitem(last=False)
        return event_id

    def _opening(self, setup: SessionSetup) -> list[str | bytes]:
        update = build_session_update(setup, vad=self._vad, transcription_model=self._transcription_model,
                                      event_id=self._event_id("session.update"))
        self._session_update_id = update["event_id"]
        audio = update["session"]["audio"]
        self._requested_formats = (audio["input"]["format"]["type"], audio["output"]["format"]["type"])
        messages: list[str | bytes] = [json.dumps(update, separators=(",", ":"))]
        if setup.first_message:
            messages.append(json.dumps(build_greeting(setup.first_message, self._event_id("response.create")),
                                       separators=(",", ":")))
        return messages

    def _send_event(self, msg: dict[str, Any]) -> None:
        """Queue one client event with an ``event_id`` (errors name it)."""
        msg["event_id"] = self._event_id(str(msg["type"]))
        self.send_soon(msg)

    # ------------------------------------------------------------------ uplink

    def _encode_audio(self, pcm: bytes) -> str | bytes:
        # Hot path: one string concatenation, no dict, no json.dumps (base64 needs no escaping).
        payload = g711.encode(pcm) if self._ulaw else pcm
        return _APPEND_PREFIX + base64.b64encode(payload).decode("ascii") + _APPEND_SUFFIX

    def _pcm_len(self, message: str | bytes) -> int:
        encoded = len(message) - len(_APPEND_PREFIX) - len(_APPEND_SUFFIX)
        raw = encoded * 3 // 4
        return raw * 2 if self._ulaw else raw

    def caller_speech_started(self, heard_s: float) -> None:
        """Local VAD: the caller spoke over the AI (the session has cleared the playout already;
        ``heard_s`` is where the caller was in the AI's audio just before).

        The service does not detect turns in this mode, so its response goes on unless cancelled;
        the item is truncated at what the caller heard, as with the service's own barge-in."""
        if self._response_active:
            self._send_event({"type": "response.cancel"})
        self._truncate_current(heard_s)

    def _truncate_current(self, heard_s: float) -> None:
        """The current item ends where the caller stopped hearing it (``heard_s`` in the stream)."""
        item_id = self._current
        item = self._items.get(item_id) if item_id is not None else None
        truncate: int | None = None
        if item is not None and not item.cut:
            truncate = truncate_point(heard_s, item.start_s, item.samples, self.output_rate or self.sample_rate,
                                      item.complete)
        self._cut_current()
        if truncate is not None and item_id is not None:
            self._send_event({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                              "audio_end_ms": truncate})
            self._log.info("barge-in: truncated %s at %d ms (heard %.3f s of the stream)", item_id, truncate,
                           heard_s)
        self._resync()

    def caller_speech_stopped(self) -> None:
        """Local VAD: the caller's turn ended: commit the audio and ask for an answer."""
        self._send_event({"type": "input_audio_buffer.commit"})
        if self._response_active:
            self._want_response = True
        else:
            self._send_event({"type": "response.create"})

    # ------------------------------------------------------------------ tools

    async def send_tool_result(self, call_id: str, result: str) -> None:
        self._send_event({"type": "conversation.item.create",
                       "item": {"type": "function_call_output", "call_id": call_id, "output": result}})
        self._calls_open.discard(call_id)
        if self._calls_open:
            return  # one response.create once every result of the turn is in
        if self._response_active:
            self._want_response = True  # asked for when the current response is done
        else:
            self._send_event({"type": "response.create"})

    # ------------------------------------------------------------------ mid-call commands

    def add_context(self, text: str) -> None:
        self._send_event(build_context_item(text))

    def say(self, text: str) -> None:
        self._says.append(text)
        if not self._response_active:
            self._next_say()

    def _next_say(self) -> bool:
        """Send the oldest waiting ``say`` (when no response is active); True if one went out."""
        if not self._says:
            return False
        text = self._says.popleft()
        msg = build_say(text)
        self._send_event(msg)
        self._say_sent[msg["event_id"]] = text
        while len(self._say_sent) > _SAY_QUEUE:
            self._say_sent.popitem(last=False)
        return True

    def set_tools(self, tools: list[dict[str, Any]]) -> None:
        self._send_event(build_tools_update(tools))

    async def hangup(self) -> None:
        # The API has no hang-up message: closing the WebSocket (1000) ends the session.
        await self.close()

    # ------------------------------------------------------------------ downlink

    def _on_message(self, message: str | bytes) -> Iterator[GatewayEvent]:
        if isinstance(message, bytes):
            raise ParseProblem(f"binary message ({len(message)} bytes): the API sends JSON text only")
        msg = load_json_object(message)
        mtype = msg.get("type")
        if not isinstance(mtype, str):
            raise ParseProblem(f"message has no string 'type': {clip(message)}")
        if mtype == "response.output_audio.delta":
            event = self._on_audio_delta(msg)
            if event is not None:
                yield event
        elif mtype == "input_audio_buffer.speech_started":
            yield from self._on_speech_started(msg)
        elif mtype == "response.function_call_arguments.done":
            call = self._tool_call(msg.get("call_id"), msg.get("name"), msg.get("arguments"), message)
            if call is not None:
                yield call
        elif mtype == "response.output_item.done":
            yield from self._on_output_item_done(msg, message)
        elif mtype == "conversation.item.input_audio_transcription.completed":
            transcript = msg.get("transcript")
            if not isinstance(transcript, str):
                raise ParseProblem("input transcription without a string 'transcript'")
            yield Transcript(role="user", text=transcript, final=True)
        elif mtype == "response.output_audio_transcript.done":
            transcript = msg.get("transcript")
            if not isinstance(transcript, str):
                raise ParseProblem("output audio transcript without a string 'transcript'")
            yield Transcript(role="assistant", text=transcript, final=True)
        elif mtype == "response.output_audio.done":
            item = self._items.get(str(msg.get("item_id")))
            if item is not None:
                item.complete = True
        elif mtype == "response.created":
            self._response_active = True
        elif mtype == "response.done":
            yield from self._on_response_done(msg)
        elif mtype == "error":
            yield from self._on_error(msg)
        elif mtype == "session.created":
            session = msg.get("session")
            self._log.debug("openai-realtime session created: %s",
                            session.get("id") if isinstance(session, dict) else "?")
        elif mtype == "session.updated":
            yield from self._on_session_updated(msg)
        elif mtype == "rate_limits.updated":
            self._log.debug("openai-realtime rate limits: %s", clip(json.dumps(msg.get("rate_limits")), 300))
        else:
            self._log.debug("openai-realtime event %s ignored", mtype)

    def _on_audio_delta(self, msg: Mapping[str, Any]) -> AudioOut | None:
        item_id = _str_field(msg, "item_id")
        delta = msg.get("delta")
        if not isinstance(delta, str):
            raise ParseProblem("response.output_audio.delta without a string 'delta'")
        try:
            data = base64.b64decode(delta, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ParseProblem(f"response.output_audio.delta: delta is not base64 ({exc})") from None
        pcm = g711.decode(data) if self._ulaw else data
        if len(pcm) % 2:
            self._log.warning("openai-realtime sent odd-length PCM (%d bytes); last byte dropped", len(pcm))
            pcm = pcm[:-1]
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = _Item(start_s=self._stream_s)
            while len(self._items) > _ITEM_MEMORY:
                self._items.popitem(last=False)
        if item.cut:
            self._log.debug("dropped %d bytes of interrupted item %s", len(pcm), item_id)
            return None
        if not pcm:
            return None
        self._current = item_id
        samples = len(pcm) // 2
        item.samples += samples
        self._stream_s += samples / (self.output_rate or self.sample_rate)
        self._count_down(len(pcm))
        return AudioOut(pcm)

    def _position(self) -> float:
        clock = self.playout_position
        if clock is None:
            if not self._no_clock_logged:
                self._no_clock_logged = True
                self._log.debug("no playout clock: a barge-in counts all audio received as heard")
            return self._stream_s
        return clock()

    def _on_speech_started(self, msg: Mapping[str, Any]) -> Iterator[GatewayEvent]:
        if self._barge_in_off:
            return  # vad mode "off": the service takes the turn, the AI is not cut short
        heard_s = self._position()  # before anything is cleared
        unheard = heard_s < self._stream_s - 0.0005
        if unheard or self._response_active or self.playout_position is None:
            yield ClearPlayback()  # the session drops the queued audio before we go on
        self._truncate_current(heard_s)

    def _cut_current(self) -> None:
        item = self._items.get(self._current) if self._current is not None else None
        if item is not None and not item.complete:
            item.cut = True
        self._current = None

    def _resync(self) -> None:
        """After a clear the playout clock counts the dropped audio as passed: follow it."""
        if self.playout_position is not None:
            self._stream_s = self.playout_position()

    def _tool_call(self, call_id: Any, name: Any, arguments: Any, raw: str) -> ToolCall | None:
        if not isinstance(call_id, str) or not call_id:
            raise ParseProblem(f"function call without a usable call_id cannot be answered: {clip(raw)}")
        if call_id in self._calls_seen:
            return None  # announced twice (arguments.done and output_item.done): dispatch once
        self._calls_seen.append(call_id)
        self._calls_open.add(call_id)
        if not isinstance(name, str) or not name:
            return ToolCall(call_id, "", {}, problem="function call has no name")
        args, problem = parse_tool_arguments(arguments)
        return ToolCall(call_id, name, args, problem=problem)

    def _on_output_item_done(self, msg: Mapping[str, Any], raw: str) -> Iterator[GatewayEvent]:
        item = msg.get("item")
        if not isinstance(item, dict):
            raise ParseProblem("response.output_item.done without an 'item' object")
        known = self._items.get(str(item.get("id")))
        if known is not None:
            known.complete = True
        if item.get("type") == "function_call":
            event = self._tool_call(item.get("call_id"), item.get("name"), item.get("arguments"), raw)
            if event is not None:
                yield event

    def _on_response_done(self, msg: Mapping[str, Any]) -> Iterator[GatewayEvent]:
        self._response_active = False
        response = msg.get("response")
        if isinstance(response, dict):
            for out in response.get("output") or ():
                if isinstance(out, dict) and (item := self._items.get(str(out.get("id")))) is not None:
                    item.complete = True
            status = response.get("status")
            if status in ("failed", "incomplete"):
                details = _obj(response.get("status_details"))
                error = _obj(details.get("error"))
                self._log.warning("openai-realtime response %s %s: reason=%s error=%s %s", response.get("id"),
                                  status, details.get("reason"), error.get("code"), error.get("message") or "")
        if self._next_say():
            return  # a tool result's answer (if wanted) follows this one
        if self._want_response and not self._calls_open:
            self._want_response = False
            self._send_event({"type": "response.create"})
        yield ResponseDone()

    def _on_error(self, msg: Mapping[str, Any]) -> Iterator[GatewayEvent]:
        error = _obj(msg.get("error"))
        etype, code, message = error.get("type"), error.get("code"), error.get("message")
        about = error.get("event_id")
        about_type = self._sent.get(about) if isinstance(about, str) else None
        self._log.warning("openai-realtime error: type=%s code=%s event_id=%s (%s) param=%s: %s", etype, code,
                          about, about_type or "?", error.get("param"), message)
        if about is not None and about == self._session_update_id:
            yield RemoteError(f"openai-realtime refused the session configuration: {code}: {message}")
        elif code in FATAL_ERROR_CODES:
            yield RemoteError(f"openai-realtime: {code}: {message}")
        elif about_type == "response.create" and code == "conversation_already_has_active_response":
            text = self._say_sent.pop(about, None) if isinstance(about, str) else None
            if text is not None:
                self._says.appendleft(text)  # said when the active response is done
                self._response_active = True
            else:
                self._want_response = True  # ask again when the active one is done

    def _on_session_updated(self, msg: Mapping[str, Any]) -> Iterator[GatewayEvent]:
        session = msg.get("session")
        if not isinstance(session, dict):
            raise ParseProblem("session.updated without a 'session' object")
        audio = _obj(session.get("audio"))
        got = [_obj(_obj(audio.get(side)).get("format")).get("type") for side in ("input", "output")]
        if self._requested_formats is not None and tuple(got) != self._requested_formats:
            yield RemoteError(f"openai-realtime session uses audio formats {got[0]}/{got[1]}, not the "
                              f"{self._requested_formats[0]}/{self._requested_formats[1]} asked for")
            return
        self._log.info("openai-realtime session updated: model=%s voice=%s turn_detection=%s tools=%d",
                       session.get("model"), _obj(audio.get("output")).get("voice"),
                       _obj(_obj(audio.get("input")).get("turn_detection")).get("type"),
                       len(session.get("tools") or ()))
