"""Generic AI WebSocket adapter (``generic-ws``): the protocol a self-hosted AI server implements.

This is the "AI Server Protocol" of the Asterisk-to-external-AI connector (issue 11, seed 001): a
deliberately small JSON-over-WebSocket contract that any AI model server can implement.
bridge/devtools/sim_generic_ws.py is our strict reference server for it, and the adapter is tested
against that.

Client → server (JSON text frames)
    * ``session.init`` first, right after the handshake::

          {"type": "session.init", "config": {"audio_format": "g711_ulaw", "sample_rate": 8000,
           "channels": 1, "language": "en", "voice": "default", "system_prompt": "…",
           "vad_enabled": true, "vad_threshold": 0.6, "vad_silence_duration_ms": 600,
           "vad_prefix_padding_ms": 200}}

      ``language``/``voice`` default to the seed's ``"en"``/``"default"`` when the profile sets
      none. The ``vad_*`` settings are sent only with ``vad_enabled: true`` (server VAD).
    * ``audio.input`` ``{"audio": <base64>, "format": <audio_format>}``: one per 20 ms frame.
    * ``text.input`` ``{"text": <first message>}`` once the server is ready, before the caller's
      audio (the seed's "initial message").
    * ``text.input`` ``{"text": …}`` again for the mid-call ``say`` command (:attr:`capabilities`):
      the seed's only other client message, read by its servers as text to speak, like the first
      message; held (bounded) until the server is ready. The seed has nothing for ``context``
      (no system or instruction message) or ``tools`` (no session update): refused.
    * Hang-up: the seed defines no message; the adapter closes the WebSocket with 1000.

Server → client: every variant the seed lists, each pair meaning the same thing:
``session_started``/``ready`` (release the caller's audio), ``audio_delta {audio}``/
``audio_chunk {data}`` (AI speech, base64 in the session's format), ``transcript {text, role}``/
``transcription {text, speaker}`` (final transcripts), ``user_speech_started``/``speech_started``
(barge-in), ``response_complete``/``audio_done``, ``error {message, fatal}``. Unknown types are
logged and ignored. A close with 1000 from the server is the service ending the call
(:class:`~bridge.gateway.base.RemoteHangup`).

Where the seed is silent, the choices made here
-----------------------------------------------
* **PCM**: the seed shows only ``g711_ulaw`` (8 kHz). ``audio_format: "pcm16"`` is raw s16le mono
  at ``sample_rate`` (8000, 16000 or 24000), both ways, base64 in the same fields: the name and
  layout the OpenAI Realtime API (which the seed's connector replaced) uses for PCM.
* **Authentication**: the optional token goes in ``Authorization: Bearer <token>`` on the
  handshake (the seed's ``AI_AUTH_TOKEN``); a server refuses it there (HTTP 401), which
  :meth:`connect` reports as :class:`~bridge.gateway.base.GatewayError`.
* **Ready**: caller audio is held (bounded, oldest dropped) until ``session_started``/``ready``;
  a server that never says so gets it after ``ready_timeout`` seconds anyway (logged), since the
  seed's connector does not wait for it at all.
* **error without ``fatal``**: the seed's example carries ``"fatal": false``. Only
  ``"fatal": true`` ends the call (:class:`~bridge.gateway.base.RemoteError`, the session plays
  its fallback); a missing or non-boolean ``fatal`` is logged as a warning and the call goes on —
  a server that really gave up closes the socket, which ends the call anyway, while treating an
  unspecified error as fatal would drop calls a server meant to keep.
* **Tools** (an extension; the seed has no tool messages): with tools in the profile,
  ``session.init``'s config carries ``"tools": [{"name", "description", "parameters"}]`` (absent
  when there are none, so a profile without tools sends exactly the seed's message); the server
  calls one with ``{"type": "tool_call", "call_id", "name", "arguments": {…} or "<json>"}`` and
  gets ``{"type": "tool.result", "call_id", "result": "<text>"}`` back (client messages are
  dotted, server messages underscored, as in the seed). A server that knows no tools ignores the
  key and never calls one.
* **VAD**: mode ``server`` sends ``vad_enabled: true`` with the settings; ``local`` and ``off`` send
  ``vad_enabled: false`` (with ``local`` the session runs the bridge's detector and flushes the
  playout itself; the seed has no message telling the server, so the hooks do nothing).

Parsing is split from I/O: :func:`parse_server_message` is pure (text in, one item out) and is
what the unit tests exercise; :func:`build_session_init` and friends build the client messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from .. import g711
from .base import (
    AudioOut,
    ClearPlayback,
    Closed,
    GatewayEvent,
    RemoteError,
    RemoteHangup,
    ResponseDone,
    SessionSetup,
    ToolCall,
    Transcript,
)
from .ws import ParseProblem, WebSocketGateway, clip, load_json_object

__all__ = [
    "AUDIO_FORMATS",
    "PCM_RATES",
    "GenericWsGateway",
    "ServerNotice",
    "SessionReady",
    "build_audio_input",
    "build_session_init",
    "build_text_input",
    "build_tool_result",
    "parse_server_message",
]

AudioFormat = Literal["g711_ulaw", "pcm16"]
AUDIO_FORMATS: Final = ("g711_ulaw", "pcm16")
#: Rates ``pcm16`` may use; ``g711_ulaw`` is 8000 Hz by definition.
PCM_RATES: Final = (8000, 16000, 24000)
#: The seed's defaults for fields the profile leaves unset.
DEFAULT_LANGUAGE: Final = "en"
DEFAULT_VOICE: Final = "default"

#: Role names servers use, mapped to the bridge's two.
_ROLES: Final = {"user": "user", "caller": "user", "human": "user", "customer": "user",
                 "assistant": "assistant", "ai": "assistant", "agent": "assistant", "bot": "assistant"}


@dataclass(frozen=True, slots=True)
class SessionReady:
    """``session_started`` / ``ready``: the server takes caller audio now (not a session event)."""

    variant: str


@dataclass(frozen=True, slots=True)
class ServerNotice:
    """A non-fatal ``error``: logged, the call goes on (not a session event)."""

    message: str


ServerItem = GatewayEvent | SessionReady | ServerNotice | None


# ---------------------------------------------------------------------------------- client messages


def build_session_init(setup: SessionSetup, *, audio_format: AudioFormat, sample_rate: int,
                       vad: Any = None) -> dict[str, Any]:
    """The first message. ``vad``: an object with ``mode``, ``threshold``, ``silence_duration_ms``
    and ``prefix_padding_ms`` (bridge/vad.py's ``VadSettings``); ``None`` is server VAD with the
    seed's defaults."""
    config: dict[str, Any] = {
        "audio_format": audio_format,
        "sample_rate": sample_rate,
        "channels": 1,
        "language": setup.language or DEFAULT_LANGUAGE,
        "voice": setup.voice or DEFAULT_VOICE,
        "system_prompt": setup.system_prompt,
    }
    mode = "server" if vad is None else vad.mode
    if mode == "server":
        config["vad_enabled"] = True
        config["vad_threshold"] = 0.6 if vad is None else float(vad.threshold)
        config["vad_silence_duration_ms"] = 600 if vad is None else int(vad.silence_duration_ms)
        config["vad_prefix_padding_ms"] = 200 if vad is None else int(vad.prefix_padding_ms)
    else:
        config["vad_enabled"] = False
    if setup.tools:
        config["tools"] = [{"name": t["name"], "description": t.get("description", ""),
                            "parameters": t.get("parameters", {"type": "object", "properties": {}})}
                           for t in setup.tools]
    return {"type": "session.init", "config": config}


def build_audio_input(pcm: bytes, audio_format: AudioFormat) -> str:
    """One ``audio.input`` message (JSON text) for s16le ``pcm`` at the wire rate."""
    payload = g711.encode(pcm) if audio_format == "g711_ulaw" else pcm
    return ('{"type":"audio.input","audio":"' + base64.b64encode(payload).decode("ascii")
            + '","format":"' + audio_format + '"}')


def build_text_input(text: str) -> dict[str, Any]:
    return {"type": "text.input", "text": text}


def build_tool_result(call_id: str, result: str) -> dict[str, Any]:
    return {"type": "tool.result", "call_id": call_id, "result": result}


# ---------------------------------------------------------------------------------- server messages


def _decode_audio(msg: Mapping[str, Any], primary: str, fallback: str, audio_format: AudioFormat,
                  mtype: str) -> AudioOut | None:
    data = msg.get(primary, msg.get(fallback))
    if not isinstance(data, str):
        raise ParseProblem(f"{mtype} needs a base64 string in {primary!r}, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ParseProblem(f"{mtype}: {primary!r} is not valid base64 ({exc})") from None
    if not raw:
        return None
    if audio_format == "g711_ulaw":
        return AudioOut(g711.decode(raw))
    if len(raw) % 2:
        raise ParseProblem(f"{mtype}: pcm16 audio of odd length {len(raw)} is not whole 16-bit samples")
    return AudioOut(raw)


def _transcript(msg: Mapping[str, Any], who_key: str, mtype: str) -> Transcript:
    text, who = msg.get("text"), msg.get(who_key)
    if not isinstance(text, str):
        raise ParseProblem(f"{mtype} needs a string 'text', got {type(text).__name__}")
    if not isinstance(who, str) or not who:
        raise ParseProblem(f"{mtype} needs a string {who_key!r} (user or assistant), got {who!r}")
    return Transcript(role=_ROLES.get(who.lower(), who), text=text, final=True)


def parse_server_message(text: str, audio_format: AudioFormat) -> ServerItem:
    """One JSON text frame from the server as what it means.

    Returns a :class:`~bridge.gateway.base.GatewayEvent`, a :class:`SessionReady`, a
    :class:`ServerNotice` (non-fatal error) or ``None`` (nothing to do: empty audio). Raises
    :class:`~bridge.gateway.ws.ParseProblem`, naming the problem, for anything unusable: the
    caller logs it and the call goes on. A ``tool_call`` with a usable ``call_id`` is always a
    :class:`~bridge.gateway.base.ToolCall` (with ``problem`` set if the rest is broken), because
    the server waits for an answer.
    """
    msg = load_json_object(text)
    mtype = msg.get("type")
    if mtype in ("audio_delta", "audio_chunk"):
        primary, fallback = ("audio", "data") if mtype == "audio_delta" else ("data", "audio")
        return _decode_audio(msg, primary, fallback, audio_format, mtype)
    if mtype in ("user_speech_started", "speech_started"):
        return ClearPlayback()
    if mtype == "transcript":
        return _transcript(msg, "role", mtype)
    if mtype == "transcription":
        return _transcript(msg, "speaker", mtype)
    if mtype in ("response_complete", "audio_done"):
        return ResponseDone()
    if mtype in ("session_started", "ready"):
        return SessionReady(mtype)
    if mtype == "error":
        message = msg.get("message")
        message = message if isinstance(message, str) and message else "(no message)"
        fatal = msg.get("fatal")
        if fatal is True:
            return RemoteError(message)
        if fatal is None or fatal is False:
            return ServerNotice(message)
        return ServerNotice(f"{message} (fatal is {fatal!r}, not a boolean: taken as non-fatal)")
    if mtype == "tool_call":
        return _tool_call(msg, text)
    if mtype is None:
        raise ParseProblem(f"message has no 'type': {clip(text)}")
    raise ParseProblem(f"unknown message type {mtype!r}")


def _tool_call(msg: Mapping[str, Any], text: str) -> ToolCall:
    call_id = msg.get("call_id")
    if not isinstance(call_id, (str, int)) or isinstance(call_id, bool) or str(call_id) == "":
        raise ParseProblem(f"tool_call without a usable call_id cannot be answered: {clip(text)}")
    call_id = str(call_id)
    name = msg.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(call_id, "", {}, problem="tool_call has no tool name")
    args = msg.get("arguments")
    if isinstance(args, str):  # JSON-encoded arguments, as OpenAI-style servers send them
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return ToolCall(call_id, name, {}, problem="arguments are not valid JSON")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ToolCall(call_id, name, {}, problem=f"arguments must be a JSON object, got {type(args).__name__}")
    return ToolCall(call_id, name, args)


# ---------------------------------------------------------------------------------- the adapter


class GenericWsGateway(WebSocketGateway):
    """One session with a seed-001 AI server over a WebSocket (see the module doc)."""

    protocol_name = "generic-ws"
    capabilities = frozenset({"say"})

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        audio_format: AudioFormat = "g711_ulaw",
        sample_rate: int = 8000,
        vad: Any = None,
        ready_timeout: float = 3.0,
        connect_timeout: float = 5.0,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 10.0,
        hold_ms: int = 2000,
        call_id: str = "",
    ) -> None:
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}")
        if audio_format == "g711_ulaw" and sample_rate != 8000:
            raise ValueError(f"audio_format g711_ulaw is 8000 Hz; sample_rate {sample_rate} needs pcm16")
        if sample_rate not in PCM_RATES:
            raise ValueError(f"sample_rate must be one of {', '.join(map(str, PCM_RATES))}, got {sample_rate!r}")
        if not ready_timeout > 0:
            raise ValueError(f"ready_timeout must be a positive number of seconds, got {ready_timeout!r}")
        mode = getattr(vad, "mode", "server") if vad is not None else "server"
        if mode not in ("server", "local", "off"):
            raise ValueError(f"vad.mode must be server, local or off, got {mode!r}")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        super().__init__(url, call_id=call_id, connect_timeout=connect_timeout, hold_ms=hold_ms,
                         keepalive_interval=keepalive_interval, keepalive_timeout=keepalive_timeout,
                         headers=headers)
        self.audio_format: AudioFormat = audio_format
        self.sample_rate = sample_rate
        self.output_rate = None
        self._vad = vad
        self.local_vad = vad if mode == "local" else None
        self._ready_timeout = ready_timeout
        self._ready_timer: asyncio.TimerHandle | None = None
        self._first_message: str | None = None
        self._closing_ourselves = False
        #: ``say`` texts from before the server was ready (sent after the first message).
        self._held_says: collections.deque[str] = collections.deque(maxlen=8)

    def _configure(self, setup: SessionSetup) -> None:
        pass  # the wire rate is the configured one; the session resamples to and from the caller's

    def _opening(self, setup: SessionSetup) -> list[str | bytes]:
        self._first_message = setup.first_message or None
        return [json.dumps(build_session_init(setup, audio_format=self.audio_format,
                                              sample_rate=self.sample_rate, vad=self._vad),
                           separators=(",", ":"))]

    def _after_open(self, setup: SessionSetup) -> None:
        # Hold the caller's audio until the server says it is ready, but never forever.
        self._ready_timer = asyncio.get_running_loop().call_later(self._ready_timeout, self._ready_timed_out)

    def _ready_timed_out(self) -> None:
        self._ready_timer = None
        if not self._released and not self._closed:
            self._log.warning("generic-ws server sent no session_started/ready within %.1f s; sending caller "
                              "audio anyway", self._ready_timeout)
            self._on_ready()

    def _on_ready(self) -> None:
        if self._ready_timer is not None:
            self._ready_timer.cancel()
            self._ready_timer = None
        if self._released:
            return
        if self._first_message:
            self.send_soon(build_text_input(self._first_message))  # control: before the held audio
        while self._held_says:
            self.send_soon(build_text_input(self._held_says.popleft()))
        self.release_uplink()

    def say(self, text: str) -> None:
        if self._released:
            self.send_soon(build_text_input(text))
        else:
            self._held_says.append(text)

    def _encode_audio(self, pcm: bytes) -> str:
        return build_audio_input(pcm, self.audio_format)

    def _pcm_len(self, message: str | bytes) -> int:
        # A queued audio.input message: the base64 payload inside the JSON wrapper (whose length is
        # fixed for the session); µ-law is one byte per sample, PCM two. For the counters only:
        # base64 padding may add up to two bytes.
        wrapper = len(build_audio_input(b"", self.audio_format))
        payload = (len(message) - wrapper) * 3 // 4
        return payload * 2 if self.audio_format == "g711_ulaw" else payload

    def _on_message(self, message: str | bytes) -> Iterable[GatewayEvent]:
        if isinstance(message, bytes):
            raise ParseProblem(f"binary frame of {len(message)} bytes: the protocol carries audio as base64 "
                               "in JSON text")
        item = parse_server_message(message, self.audio_format)
        if item is None:
            return ()
        if isinstance(item, SessionReady):
            self._log.debug("generic-ws server ready (%s)", item.variant)
            self._on_ready()
            return ()
        if isinstance(item, ServerNotice):
            self._log.warning("generic-ws server reported a non-fatal error: %s", item.message)
            return ()
        if isinstance(item, AudioOut):
            self._count_down(len(item.pcm))
        return (item,)

    def _final_events(self, closed: Closed) -> tuple[GatewayEvent, ...]:
        if closed.code == 1000 and not self._closing_ourselves:
            # The seed has no hang-up message: a normal close from the server ends the call.
            return (RemoteHangup(), closed)
        return (closed,)

    async def send_tool_result(self, call_id: str, result: str) -> None:
        await self.send_json(build_tool_result(call_id, result))

    async def hangup(self) -> None:
        # No hang-up message in the protocol: a normal close (1000) says it.
        await self.close()

    async def close(self) -> None:
        self._closing_ourselves = True
        if self._ready_timer is not None:
            self._ready_timer.cancel()
            self._ready_timer = None
        await super().close()

