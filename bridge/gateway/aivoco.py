"""Aivoco speech-to-speech adapter: one AI session over Socket.IO (python-socketio's asyncio client).

Wire protocol (the vendor's API documentation; bridge/devtools/sim_aivoco.py is our strict reference
implementation of it, and the adapter is tested against that):

* Socket.IO (Engine.IO 4) over the **websocket transport only**: no long-polling fallback (audio at
  50 messages a second does not belong on HTTP requests) and **no automatic reconnection**: a
  reconnect would be a new Socket.IO session without the call, and re-sending ``start_call``
  would silently restart the conversation mid-call. A lost connection ends this gateway with an
  unclean :class:`~bridge.gateway.base.Closed`, on which the session plays its fallback.
* Client → server: ``start_call`` {auth_key, system_message, voice_choice, custom_functions},
  ``audio_data`` {audio_data: base64 PCM s16le 16 kHz mono, has_audio: bool, max_amplitude:
  0..1}, ``stop_call`` (no payload).
* Server → client: ``auth_success`` {credits}, ``auth_failed`` {message, credits},
  ``session_ready`` {message, credits_available, cost_per_minute, functions_loaded},
  ``audio_response`` {audio_data: base64 PCM s16le}, ``text_response`` {text},
  ``session_ended`` {reason, …}, ``error`` {message, type}.

Choices where the documentation is silent (each one is a constant or one function here)
----------------------------------------------------------------------------------------
* **Function calls** — the one place to change is :data:`FUNCTION_CALL_EVENT`,
  :data:`FUNCTION_RESULT_EVENT`, :func:`build_custom_functions`, :func:`parse_function_call` and
  :func:`build_function_result`. The API document names ``custom_functions`` but not their format
  nor how a call travels; we follow the vendor's published example clients (the CLI and the demo
  page the document links to): ``custom_functions`` is a list of ``{name, description,
  parameters: [{name, type: string|number|boolean, description, required}]}``; the server
  emits ``function_called`` {call_id, function_name, arguments (an object)} and the client
  answers ``function_response`` {call_id, function_name, result}. The examples send ``result``
  as an object, so the router's result text travels losslessly as ``{"result": "<text>"}``.
  JSON Schema types that list format cannot say travel as ``string`` with a note in the
  description (``integer`` as ``number``); their arguments are converted back (an integral
  float to ``int``, JSON text to an object or array) before the router validates them.
* **Output rate** — the documents do not state it; their browser and CLI examples play the output
  at 24 kHz, so :attr:`output_rate` is 24000 (constructor option ``output_rate``).
* **Voice** — ``voice_choice`` is ``female`` or ``male``; :func:`voice_choice` maps the profile's
  voice (``female``/``woman``/``girl``/``f``, ``male``/``man``/``boy``/``m``, any case) and falls back
  to ``default_voice`` (``female``), with a warning naming the unknown voice.
* **First message** — the protocol has no text input: a profile's ``first_message`` is added to the
  system message as an instruction to open the call with it (``first_message_in_prompt``).
* **Errors** — the vendor's examples end the call on every ``error``; so do we
  (:class:`~bridge.gateway.base.RemoteError`, the session plays its fallback), except the types in
  :data:`NONFATAL_ERROR_TYPES` (``rate_limit_exceeded``: a request was refused, the session is not
  said to be over), which are logged and ignored. A ``session_ended`` or a disconnect still ends
  the call whatever came before.
* **Barge-in** — the server sends no speech-started event, so this adapter asks for the bridge's own
  detector (:attr:`local_vad`), whose verdict is also what ``has_audio`` says.

The uplink
----------
:meth:`AivocoGateway.send_audio` (50 times a second per call) encodes the frame (base64, peak)
and appends it to a bounded deque, then sets an :class:`asyncio.Event`: no task and no coroutine
per frame. One sender task per call drains the deque with ``AsyncClient.emit`` (a coroutine: this
is the only place one is made per frame). Control messages (``function_response``) wait in their
own deque and go before queued audio, never dropped. Caller audio is held (``hold_ms``, oldest
dropped) until ``session_ready``; afterwards at most ``uplink_buffer_ms`` waits, oldest dropped
(``dropped_up``), and the sender stops feeding Engine.IO's own (unbounded) packet queue while more
than :data:`EIO_QUEUE_LIMIT` packets wait there, so a slow link loses stale audio rather than
growing memory.

Liveness is Engine.IO's heartbeat: the server pings, and python-socketio drops the connection when
no ping came for ``pingInterval + pingTimeout`` (25 + 20 s with the server defaults).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
import socketio

from .base import (
    AudioOut,
    Closed,
    Gateway,
    GatewayError,
    GatewayEvent,
    RemoteError,
    RemoteHangup,
    SessionSetup,
    ToolCall,
    Transcript,
)
from .ws import ParseProblem, clip, redact_url

__all__ = [
    "AUDIO_DATA", "AUDIO_RESPONSE", "AUTH_FAILED", "AUTH_SUCCESS", "DEFAULT_URL", "ERROR", "FUNCTION_CALL_EVENT",
    "FUNCTION_RESULT_EVENT", "INPUT_RATE", "NONFATAL_ERROR_TYPES", "OUTPUT_RATE", "SESSION_ENDED",
    "SESSION_READY", "START_CALL", "STOP_CALL", "TEXT_RESPONSE", "AivocoGateway", "ParseProblem",
    "audio_payload", "build_custom_functions", "build_function_result", "build_start_call",
    "coerce_arguments", "decode_audio", "parse_function_call", "voice_choice",
]

log = logging.getLogger("voxbridge.gateway")

DEFAULT_URL = "wss://sts.aivoco.on.cloud.vispark.in"

# Event names (client → server).
START_CALL = "start_call"
AUDIO_DATA = "audio_data"
STOP_CALL = "stop_call"
# Event names (server → client).
AUTH_SUCCESS = "auth_success"
AUTH_FAILED = "auth_failed"
SESSION_READY = "session_ready"
AUDIO_RESPONSE = "audio_response"
TEXT_RESPONSE = "text_response"
SESSION_ENDED = "session_ended"
ERROR = "error"
#: Server → client: the model calls one of the custom functions (see the module doc).
FUNCTION_CALL_EVENT = "function_called"
#: Client → server: the function's result.
FUNCTION_RESULT_EVENT = "function_response"
#: Server → client notices about functions that need no action (logged at debug level).
FUNCTION_NOTICES = frozenset({"function_result", "function_error", "function_response_sent"})

#: ``error`` types logged and ignored; every other type ends the call.
NONFATAL_ERROR_TYPES = frozenset({"rate_limit_exceeded"})

INPUT_RATE = 16000
OUTPUT_RATE = 24000
VOICES = ("female", "male")
_VOICE_ALIASES = {
    "female": "female", "woman": "female", "girl": "female", "f": "female",
    "male": "male", "man": "male", "boy": "male", "m": "male",
}
#: Without a running detector, a frame "has audio" when its peak exceeds 1 % of full scale
#: (the threshold of the vendor's CLI example).
ENERGY_PEAK_THRESHOLD = 328
#: Engine.IO packets allowed to wait in python-socketio's own queue before the sender holds back.
EIO_QUEUE_LIMIT = 25
#: Events queued for the session before new audio is dropped (a consumer that stopped reading).
MAX_PENDING_EVENTS = 5000
#: Function calls remembered for their answer (their name goes back with the result).
MAX_OPEN_CALLS = 256

_FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_VENDOR_TYPES = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean"}


# ---------------------------------------------------------------------------------------------
# Pure protocol code (no I/O): what the unit tests exercise
# ---------------------------------------------------------------------------------------------


def voice_choice(voice: str | None, default: str = "female") -> str:
    """The ``voice_choice`` for a profile voice; :class:`ValueError` naming an unknown one."""
    if default not in VOICES:
        raise ValueError(f"default voice must be one of {', '.join(VOICES)}, got {default!r}")
    if voice is None or not voice.strip():
        return default
    mapped = _VOICE_ALIASES.get(voice.strip().lower())
    if mapped is None:
        raise ValueError(f"voice {voice!r} is not one aivoco offers (female or male)")
    return mapped


def _param_spec(name: str, schema: Any, required: bool) -> dict[str, Any]:
    schema = schema if isinstance(schema, Mapping) else {}
    jtype = schema.get("type")
    if isinstance(jtype, list):  # e.g. ["string", "null"]
        jtype = next((t for t in jtype if t != "null"), "string")
    description = str(schema.get("description") or "")
    notes: list[str] = []
    vtype = _VENDOR_TYPES.get(jtype) if isinstance(jtype, str) else None
    if jtype == "integer":
        notes.append("an integer")
    elif vtype is None:
        vtype = "string"
        if isinstance(jtype, str):
            notes.append(f"a JSON-encoded {jtype}")
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        notes.append("one of: " + ", ".join(json.dumps(v) if not isinstance(v, str) else v for v in enum))
    if notes:
        joined = "; ".join(notes)
        description = f"{description} ({joined})" if description else joined[0].upper() + joined[1:]
    return {"name": name, "type": vtype, "description": description, "required": required}


def build_custom_functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``custom_functions`` from the session's tools (``{name, description, parameters: JSON Schema}``)."""
    out: list[dict[str, Any]] = []
    for tool in tools:
        schema = tool.get("parameters")
        schema = schema if isinstance(schema, Mapping) else {}
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = schema.get("required")
        required_set = set(required) if isinstance(required, list) else set()
        out.append({
            "name": str(tool["name"]),
            "description": str(tool.get("description") or ""),
            "parameters": [_param_spec(str(name), sub, name in required_set) for name, sub in props.items()],
        })
    return out


def build_start_call(setup: SessionSetup, auth_key: str, *, default_voice: str = "female",
                     first_message_in_prompt: bool = True) -> dict[str, Any]:
    """The ``start_call`` payload. Raises :class:`ValueError` for a voice aivoco does not offer."""
    system = setup.system_prompt
    if first_message_in_prompt and setup.first_message:
        system = (f"{system}\n\n" if system else "") + (
            f"Open the call by saying exactly: {setup.first_message}")
    return {
        "auth_key": auth_key,
        "system_message": system,
        "voice_choice": voice_choice(setup.voice, default_voice),
        "custom_functions": build_custom_functions(setup.tools),
    }


def audio_payload(pcm: bytes, has_audio: bool | None = None) -> dict[str, Any]:
    """One ``audio_data`` payload for s16le PCM. ``has_audio`` None: the energy test decides."""
    samples = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2)
    peak = max(int(samples.max()), -int(samples.min())) if samples.size else 0
    return {
        "audio_data": base64.b64encode(pcm).decode("ascii"),
        "has_audio": peak > ENERGY_PEAK_THRESHOLD if has_audio is None else has_audio,
        "max_amplitude": min(peak / 32768, 1.0),
    }


def decode_audio(data: Any) -> bytes:
    """The PCM of an ``audio_response`` payload; :class:`ParseProblem` saying what is wrong."""
    if not isinstance(data, Mapping):
        raise ParseProblem(f"audio_response payload is a {type(data).__name__}, not an object")
    b64 = data.get("audio_data")
    if not isinstance(b64, str):
        raise ParseProblem("audio_response without a base64 string in audio_data")
    try:
        pcm = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ParseProblem(f"audio_response audio_data is not valid base64 ({exc})") from None
    if len(pcm) % 2:
        raise ParseProblem(f"audio_response holds {len(pcm)} bytes: not whole 16-bit samples")
    return pcm


def coerce_arguments(args: dict[str, Any], schema: Any) -> dict[str, Any]:
    """Arguments back to the tool's JSON Schema types where the vendor format lost them."""
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(props, Mapping):
        return args
    out = dict(args)
    for name, value in args.items():
        sub = props.get(name)
        jtype = sub.get("type") if isinstance(sub, Mapping) else None
        if jtype == "integer" and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            out[name] = int(value)
        elif jtype in ("object", "array") and isinstance(value, str):
            try:
                decoded = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                continue  # the router's validation names the problem
            if isinstance(decoded, dict if jtype == "object" else list):
                out[name] = decoded
    return out


def parse_function_call(data: Any, tools: Mapping[str, Mapping[str, Any]] | None = None) -> ToolCall:
    """A :data:`FUNCTION_CALL_EVENT` payload as a :class:`ToolCall`.

    :class:`ParseProblem` when it has no usable ``call_id`` (nothing could be answered);
    otherwise a malformed call is a :class:`ToolCall` with ``problem`` set, which the router
    answers (exactly once) with the error.
    """
    if not isinstance(data, Mapping):
        raise ParseProblem(f"{FUNCTION_CALL_EVENT} payload is a {type(data).__name__}, not an object")
    call_id = data.get("call_id")
    if isinstance(call_id, bool) or not isinstance(call_id, (str, int)) or str(call_id) == "":
        raise ParseProblem(f"{FUNCTION_CALL_EVENT} without a usable call_id cannot be answered")
    call_id = str(call_id)
    name = data.get("function_name")
    if not isinstance(name, str) or not name:
        return ToolCall(call_id, "", {}, problem=f"{FUNCTION_CALL_EVENT} has no function_name")
    args = data.get("arguments")
    if args is None:
        args = {}
    elif isinstance(args, str):  # double-encoded by some model back ends
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return ToolCall(call_id, name, {}, problem="arguments are not valid JSON")
    if not isinstance(args, dict):
        return ToolCall(call_id, name, {}, problem=f"arguments must be a JSON object, got {type(args).__name__}")
    tool = (tools or {}).get(name)
    if tool is not None:
        args = coerce_arguments(args, tool.get("parameters"))
    return ToolCall(call_id, name, args)


def build_function_result(call_id: str, name: str, result: str) -> dict[str, Any]:
    """The :data:`FUNCTION_RESULT_EVENT` payload: the router's text, losslessly, in an object."""
    return {"call_id": call_id, "function_name": name, "result": {"result": result}}


def _error_text(data: Any) -> tuple[str, str | None]:
    """(message, type) of an ``error``/``auth_failed`` payload, whatever its shape."""
    if isinstance(data, Mapping):
        message, etype = data.get("message"), data.get("type")
        return (str(message) if message is not None else "(no message)",
                etype if isinstance(etype, str) else None)
    return (clip(str(data)) if data is not None else "(no message)", None)


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


class AivocoGateway(Gateway):
    """One aivoco speech-to-speech session (see the module doc)."""

    protocol_name = "aivoco"
    #: No mid-call commands of its own: the protocol (seed 003) has no client event but start_call,
    #: audio_data and stop_call:
    #: the system message and functions are fixed at start_call.
    capabilities: frozenset[str] = frozenset()

    def __init__(
        self,
        url: str = DEFAULT_URL,
        auth_key: str = "",
        *,
        vad: Any = None,
        output_rate: int = OUTPUT_RATE,
        default_voice: str = "female",
        first_message_in_prompt: bool = True,
        connect_timeout: float = 10.0,
        hold_ms: int = 2000,
        uplink_buffer_ms: int = 2000,
        socketio_path: str = "socket.io",
        call_id: str = "",
    ) -> None:
        if not auth_key:
            raise ValueError("aivoco needs an auth_key")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
        if output_rate not in (8000, 16000, 24000, 48000):
            raise ValueError(f"output_rate must be 8000, 16000, 24000 or 48000 Hz, got {output_rate!r}")
        if hold_ms < 20 or uplink_buffer_ms < 20:
            raise ValueError("hold_ms and uplink_buffer_ms must be at least one 20 ms frame")
        voice_choice(None, default_voice)  # validates the default
        self._url = url
        self._auth_key = auth_key
        self.sample_rate = INPUT_RATE
        self.output_rate = output_rate
        # The service has no speech-started event: the bridge detects barge-in itself.
        self.local_vad = vad if vad is not None and getattr(vad, "mode", None) != "off" else None
        self._default_voice = default_voice
        self._first_in_prompt = first_message_in_prompt
        self._connect_timeout = connect_timeout
        self._hold_limit = max(hold_ms // 20, 1)
        self._uplink_limit = max(uplink_buffer_ms // 20, 1)
        self._socketio_path = socketio_path
        self._call = call_id
        self._log = logging.LoggerAdapter(log, {"call": call_id})
        self._sio: Any = None
        self._tools: dict[str, Mapping[str, Any]] = {}
        self._open_calls: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._uplink: collections.deque[dict[str, Any]] = collections.deque()
        self._control: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = asyncio.Event()
        self._released = False
        self._sender: asyncio.Task[None] | None = None
        self._speaking = False
        self._events: collections.deque[GatewayEvent] = collections.deque()
        self._events_ready = asyncio.Event()
        self._setup_done = asyncio.Event()
        self._setup_failure: str | None = None
        self._ready = False
        self._ended = False  # session_ended received
        self._closing = False  # we are disconnecting on purpose
        self._closed = False
        self._final = False  # Closed queued
        self._dropped_events = 0
        self._stats = {"frames_up": 0, "bytes_up": 0, "frames_down": 0, "bytes_down": 0, "dropped_up": 0}

    # ------------------------------------------------------------------ Gateway

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def caller_speech_started(self, heard_s: float) -> None:
        self._speaking = True  # has_audio is true from the next frame on (the service cannot be told where)

    def caller_speech_stopped(self) -> None:
        self._speaking = False

    async def connect(self, setup: SessionSetup) -> None:
        try:
            start = build_start_call(setup, self._auth_key, default_voice=self._default_voice,
                                     first_message_in_prompt=self._first_in_prompt)
        except ValueError as exc:
            self._log.warning("%s; using voice %r", exc, self._default_voice)
            start = build_start_call(dataclasses.replace(setup, voice=None), self._auth_key,
                                     default_voice=self._default_voice,
                                     first_message_in_prompt=self._first_in_prompt)
        self._tools = {str(t["name"]): t for t in setup.tools}
        sio = socketio.AsyncClient(reconnection=False, handle_sigint=False, logger=False, engineio_logger=False)
        sio.on("disconnect", self._on_disconnect)
        sio.on("*", self._on_event)
        self._sio = sio
        where = redact_url(self._url)
        try:
            async with asyncio.timeout(self._connect_timeout):
                try:
                    await sio.connect(self._url, transports=["websocket"], socketio_path=self._socketio_path,
                                      wait_timeout=self._connect_timeout)
                except socketio.exceptions.ConnectionError as exc:
                    raise GatewayError(f"cannot connect to aivoco gateway {where}: {exc}") from None
                try:
                    await sio.emit(START_CALL, start)
                except socketio.exceptions.SocketIOError as exc:  # e.g. dropped right after the handshake
                    raise GatewayError(f"aivoco gateway {where} went away before start_call: "
                                       f"{type(exc).__name__}") from None
                await self._setup_done.wait()
        except TimeoutError:
            await self._abandon()
            raise GatewayError(f"aivoco gateway {where}: no session_ready within {self._connect_timeout:g} s") from None
        except GatewayError:
            await self._abandon()
            raise
        if self._setup_failure is not None:
            await self._abandon()
            raise GatewayError(f"aivoco gateway {where}: {self._setup_failure}")
        self._sender = asyncio.create_task(self._send_loop(), name=f"gateway-uplink-{self._call}")
        self._log.info("aivoco gateway session open: %s rate=%d/%d tools=%d voice=%s", where, self.sample_rate,
                       self.output_rate, len(setup.tools), start["voice_choice"])

    async def _abandon(self) -> None:
        """Set-up failed: drop the connection, keep nothing."""
        self._closing = True
        await self.close()

    def send_audio(self, pcm: bytes) -> None:
        if self._closed or len(pcm) < 2:
            return
        if len(pcm) % 2:
            pcm = pcm[:-1]
        payload = audio_payload(pcm, self._speaking if self.local_vad is not None else None)
        uplink = self._uplink
        uplink.append(payload)
        limit = self._uplink_limit if self._released else self._hold_limit
        if len(uplink) > limit:
            # Oldest first: held, we keep the most recent speech; later, a link that cannot keep
            # up loses stale audio rather than falling ever further behind.
            uplink.popleft()
            self._stats["dropped_up"] += 1
        if self._released:
            self._wake.set()

    async def send_tool_result(self, call_id: str, result: str) -> None:
        if self._closed:
            return
        name = self._open_calls.pop(call_id, "")
        self._control.append((FUNCTION_RESULT_EVENT, build_function_result(call_id, name, result)))
        self._wake.set()

    async def hangup(self) -> None:
        sio = self._sio
        if sio is not None and not self._closed and sio.connected:
            self._closing = True
            await self._stop_sender()  # no more audio: stop_call is the last word
            try:
                async with asyncio.timeout(2.0):
                    await sio.emit(STOP_CALL)
                    # python-socketio's disconnect closes the WebSocket without sending what still
                    # waits in Engine.IO's queue: wait until stop_call is on the wire.
                    eio_queue = getattr(getattr(sio, "eio", None), "queue", None)
                    if eio_queue is not None:
                        await eio_queue.join()
            except (TimeoutError, socketio.exceptions.SocketIOError) as exc:
                self._log.warning("aivoco gateway: could not send stop_call: %s", exc or type(exc).__name__)
        await self.close()

    async def _stop_sender(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            try:
                await self._sender
            except asyncio.CancelledError:
                pass
            self._sender = None

    async def events(self) -> AsyncIterator[GatewayEvent]:
        if self._sio is None:
            yield Closed(None, "never connected", clean=False)
            return
        queue = self._events
        while True:
            while not queue:
                self._events_ready.clear()
                await self._events_ready.wait()
            event = queue.popleft()
            yield event
            if isinstance(event, Closed):
                return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        await self._stop_sender()
        sio = self._sio
        if sio is not None:
            try:
                async with asyncio.timeout(3.0):
                    await sio.disconnect()
            except Exception as exc:  # noqa: BLE001 - closing a dead connection must not fail teardown
                self._log.debug("aivoco gateway: disconnect failed: %s", exc)
            # Whatever happened underneath, the stream ends with a Closed.
            self._push_final(Closed(None, "client closed", clean=True))
        self._uplink.clear()
        self._control.clear()

    # ------------------------------------------------------------------ sending

    async def _send_loop(self) -> None:
        sio = self._sio
        control, uplink, stats = self._control, self._uplink, self._stats
        eio_queue = getattr(getattr(sio, "eio", None), "queue", None)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while control or (self._released and uplink):
                    if control:
                        event, data = control.popleft()
                        await sio.emit(event, data)
                        continue
                    if eio_queue is not None and eio_queue.qsize() > EIO_QUEUE_LIMIT:
                        # The socket is not keeping up: let the deque (bounded) hold the backlog.
                        await asyncio.sleep(0.02)
                        continue
                    payload = uplink.popleft()
                    await sio.emit(AUDIO_DATA, payload)
                    stats["frames_up"] += 1
                    b64 = payload["audio_data"]
                    stats["bytes_up"] += len(b64) * 3 // 4 - (2 if b64.endswith("==") else b64.endswith("="))
        except socketio.exceptions.SocketIOError as exc:
            self._log.debug("aivoco gateway: uplink stopped: %s", exc)  # the disconnect handler reports it

    # ------------------------------------------------------------------ receiving

    def _push(self, event: GatewayEvent) -> None:
        if self._final:
            return
        if len(self._events) >= MAX_PENDING_EVENTS and isinstance(event, AudioOut):
            self._dropped_events += 1
            if self._dropped_events in (1, 100) or self._dropped_events % 1000 == 0:
                self._log.warning("aivoco gateway: %d AI audio chunks dropped: the session is not reading",
                                  self._dropped_events)
            return
        self._events.append(event)
        self._events_ready.set()

    def _push_final(self, event: Closed) -> None:
        if self._final:
            return
        self._events.append(event)
        self._final = True
        self._events_ready.set()

    def _fail_setup(self, why: str) -> None:
        if self._setup_failure is None:
            self._setup_failure = why
        self._setup_done.set()

    def _on_disconnect(self, *args: Any) -> None:
        reason = str(args[0]) if args else "disconnected"
        if not self._ready:
            self._fail_setup(f"connection closed during set-up ({reason})")
        if self._closing:
            closed = Closed(None, "client closed", clean=True)
        elif self._ended:
            closed = Closed(None, "session ended by the gateway", clean=True)
        else:
            self._log.warning("aivoco gateway connection lost (%s); the call is not restarted", reason)
            closed = Closed(None, f"connection lost ({reason})", clean=False)
        self._push_final(closed)

    def _on_event(self, event: str, *args: Any) -> None:
        data = args[0] if args else None
        try:
            self._dispatch(event, data)
        except ParseProblem as exc:
            self._log.warning("ignored aivoco gateway event %s: %s", event, exc)

    def _dispatch(self, event: str, data: Any) -> None:
        if event == AUDIO_RESPONSE:
            pcm = decode_audio(data)
            if pcm:
                self._stats["frames_down"] += 1
                self._stats["bytes_down"] += len(pcm)
                self._push(AudioOut(pcm))
        elif event == TEXT_RESPONSE:
            text = data.get("text") if isinstance(data, Mapping) else None
            if not isinstance(text, str):
                raise ParseProblem("text_response without a string text")
            self._push(Transcript("assistant", text, final=True))
        elif event == FUNCTION_CALL_EVENT:
            call = parse_function_call(data, self._tools)
            self._open_calls[call.call_id] = call.name
            while len(self._open_calls) > MAX_OPEN_CALLS:
                self._open_calls.popitem(last=False)
            self._push(call)
        elif event == SESSION_READY:
            if self._ready:
                raise ParseProblem("session_ready received twice")
            self._ready = self._released = True
            self._log.info("aivoco session ready: %s", clip(str(data)))
            self._setup_done.set()
            self._wake.set()
        elif event == AUTH_SUCCESS:
            self._log.debug("aivoco authentication accepted")
        elif event == AUTH_FAILED:
            message, _ = _error_text(data)
            self._fail_setup(f"authentication failed: {message}")
            if self._ready:
                self._push(RemoteError(f"authentication failed: {message}"))
        elif event == SESSION_ENDED:
            reason = data.get("reason") if isinstance(data, Mapping) else None
            self._log.info("aivoco gateway ended the session: %s", reason or "(no reason)")
            self._ended = True
            self._fail_setup(f"session ended during set-up ({reason or 'no reason'})")
            self._push(RemoteHangup())
        elif event == ERROR:
            message, etype = _error_text(data)
            text = f"{etype}: {message}" if etype else message
            if not self._ready:
                self._fail_setup(f"error: {text}")
            elif etype in NONFATAL_ERROR_TYPES:
                self._log.warning("aivoco gateway error (ignored, the call goes on): %s", text)
            else:
                self._push(RemoteError(text))
        elif event in FUNCTION_NOTICES:
            self._log.debug("aivoco %s: %s", event, clip(str(data)))
        else:
            raise ParseProblem(f"unknown event {event!r}")

