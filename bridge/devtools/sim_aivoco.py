"""Reference implementation of the aivoco speech-to-speech API (Socket.IO): a strict, scriptable simulator.

The real service is paid and unreachable from CI, so this is "the stranger" the aivoco adapter is
tested against. It is written from the vendor's API document and its published example clients
(a CLI and a demo page), not from the bridge's adapter, and it imports nothing from the bridge but
its sibling simulator module (bridge/devtools/gateway_sim.py: audio helpers and the energy VAD).

Protocol as implemented
=======================

Transport
    Socket.IO 5 / Engine.IO 4 (python-socketio's ``AsyncServer`` on aiohttp), default namespace,
    path ``/socket.io/``, **websocket transport only** (a long-polling client is refused), loopback
    by default. Engine.IO pings every ``ping_interval`` s (25 like the reference server). One
    connection is one :class:`AivocoSimSession`; a reconnect is a new session, which is how a test
    sees a client that silently restarted a call (:attr:`AivocoSim.start_calls` counts every
    ``start_call`` on every connection).

``start_call`` (client → server, MUST be the first event)
    ==================  ===================================================================
    field               rule
    ==================  ===================================================================
    ``auth_key``        non-empty string
    ``system_message``  string (may be empty)
    ``voice_choice``    ``female`` or ``male``
    ``custom_functions`` list (may be empty) of ``{name, description, parameters}``: ``name``
                        matching ``[A-Za-z_][A-Za-z0-9_.-]{0,63}`` and unique, ``description`` a
                        string, ``parameters`` a list of ``{name, type, description?,
                        required?}`` with ``type`` one of string, number, boolean, ``required`` a
                        boolean, names unique (the format of the vendor's examples)
    ==================  ===================================================================

    Unknown keys are rejected. Problems (all listed, each naming its field; the key is never echoed)
    → ``error`` {message: "invalid start_call: …", type: "invalid_request"} and a violation; the
    connection stays open without a session. A key not in ``accepted_keys`` (``None``: any
    non-empty key) → ``auth_failed`` {message: "Invalid API key", credits: 0}; the connection stays
    open and audio is refused. Otherwise ``auth_success`` {credits} then ``session_ready``
    {message, credits_available, cost_per_minute, functions_loaded}. A second ``start_call`` on the
    same connection is a violation answered with an ``error``.

``audio_data`` (client → server)
    An object {audio_data: base64 of PCM s16le 16 kHz mono, has_audio: bool, max_amplitude: a
    number in 0..1}. Before ``session_ready`` (including after ``auth_failed``): violation plus
    ``error`` {type: "session_not_active"}, the frame is dropped. base64 that does not decode, or
    decodes to an odd number of bytes: violation plus ``error`` {type: "invalid_audio"}, dropped.
    Wrongly typed ``has_audio``/``max_amplitude``: violation, dropped (no error event). Accepted
    audio is recorded (``audio``, within ``audio_cap_bytes``) with its arrival time.

``stop_call`` (client → server, no payload)
    Ends the session: ``session_ended`` {reason: "user_stopped", message: "Call stopped by user",
    total_credits_used, remaining_credits}; the connection stays up until the client leaves.

Function calls (the vendor's example clients; the API document is silent)
    Server → client ``function_called`` {call_id, function_name, arguments (object)}; the client
    answers ``function_response`` {call_id, function_name, result (object or string)} exactly
    once. Unknown or repeated ``call_id``, a mismatched ``function_name`` or a missing ``result`` are
    violations; no answer within ``tool_deadline_s`` is a violation (a late one is still stored).

Server → client audio and text
    ``audio_response`` {audio_data: base64 PCM s16le at 24 kHz}, sent in bursts of
    ``burst_chunk_ms`` far faster than real time; ``text_response`` {text} after each utterance.

Default agent
    After ``session_ready`` it greets (``greeting``: speech-like audio, 60 ms a character capped at
    ``greeting_max_ms``, then its text). An energy VAD (gateway_sim's) runs over the decoded caller
    audio; with ``echo`` each utterance is sent back (resampled 16 → 24 kHz) followed by
    ``text_response`` "(echo 1.20 s)". The protocol has no barge-in event: the sim keeps talking.

Scripting (the common simulator interface)
    ``session.send_audio`` (a burst at 24 kHz), ``call_tool``, ``hangup`` (``session_ended``
    {reason: "ended_by_server"} then a server disconnect), ``send_raw_text`` (``audio_response``
    whose payload is the bare text), ``emit`` (any event and payload), ``drop`` (the TCP connection
    is aborted, no Socket.IO goodbye), ``say``; ``clear`` raises :class:`NotImplementedError`.

CLI
    ``voxbridge gateway-sim --protocol aivoco`` through :func:`add_arguments` / :func:`run_from_args`,
    or ``python -m bridge.devtools.sim_aivoco --listen 127.0.0.1:8766``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import socketio
from aiohttp import web

from .gateway_sim import VadConfig, _Vad, speechlike
from .sim_common import (
    SessionClosed,
    SimServerBase,
    SimSessionBase,
    add_server_arguments,
    api_keys,
    chunk_bytes,
    main,
    serve_until_cancelled,
)

__all__ = ["INPUT_RATE", "OUTPUT_RATE", "AivocoSim", "AivocoSimSession", "SessionClosed", "add_arguments",
           "run_from_args", "validate_start_call"]

log = logging.getLogger("voxbridge.sim_aivoco")

INPUT_RATE = 16000
OUTPUT_RATE = 24000
VOICES = ("female", "male")
PARAM_TYPES = ("string", "number", "boolean")
START_FIELDS = ("auth_key", "system_message", "voice_choice", "custom_functions")
FUNCTION_FIELDS = frozenset({"name", "description", "parameters"})
PARAM_FIELDS = frozenset({"name", "type", "description", "required"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _validate_functions(funcs: Any) -> list[str]:
    if not isinstance(funcs, list):
        return ["custom_functions must be a list"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, fn in enumerate(funcs):
        where = f"custom_functions[{i}]"
        if not isinstance(fn, dict):
            problems.append(f"{where} must be an object")
            continue
        problems += [f"{where}: unknown field {k!r}" for k in sorted(set(fn) - FUNCTION_FIELDS)]
        problems += [f"{where}: missing field {k!r}" for k in sorted(FUNCTION_FIELDS - set(fn))]
        name = fn.get("name")
        if "name" in fn:
            if not (isinstance(name, str) and _NAME.match(name)):
                problems.append(f"{where}.name must match {_NAME.pattern} (got {name!r})")
            elif name in seen:
                problems.append(f"{where}.name {name!r} is a duplicate")
            else:
                seen.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            problems.append(f"{where}.description must be a string")
        if "parameters" in fn:
            problems += _validate_params(where, fn["parameters"])
    return problems


def _validate_params(where: str, params: Any) -> list[str]:
    if not isinstance(params, list):
        return [f"{where}.parameters must be a list of parameter objects"]
    problems: list[str] = []
    seen: set[str] = set()
    for j, p in enumerate(params):
        pw = f"{where}.parameters[{j}]"
        if not isinstance(p, dict):
            problems.append(f"{pw} must be an object")
            continue
        problems += [f"{pw}: unknown field {k!r}" for k in sorted(set(p) - PARAM_FIELDS)]
        name = p.get("name")
        if not (isinstance(name, str) and name):
            problems.append(f"{pw}.name must be a non-empty string")
        elif name in seen:
            problems.append(f"{pw}.name {name!r} is a duplicate")
        else:
            seen.add(name)
        if p.get("type") not in PARAM_TYPES:
            problems.append(f"{pw}.type must be one of {', '.join(PARAM_TYPES)} (got {p.get('type')!r})")
        if "description" in p and not isinstance(p["description"], str):
            problems.append(f"{pw}.description must be a string")
        if "required" in p and not isinstance(p["required"], bool):
            problems.append(f"{pw}.required must be true or false")
    return problems


def validate_start_call(data: Any) -> list[str]:
    """The problems with a ``start_call`` payload (empty when valid); the key is never echoed."""
    if not isinstance(data, dict):
        return [f"start_call payload must be an object, got {type(data).__name__}"]
    problems = [f"unknown field {k!r}" for k in sorted(set(data) - set(START_FIELDS))]
    problems += [f"missing field {k!r}" for k in START_FIELDS if k not in data]
    if "auth_key" in data and not (isinstance(data["auth_key"], str) and data["auth_key"]):
        problems.append("auth_key must be a non-empty string")
    if "system_message" in data and not isinstance(data["system_message"], str):
        problems.append("system_message must be a string")
    if "voice_choice" in data and data["voice_choice"] not in VOICES:
        problems.append(f"voice_choice must be female or male (got {data['voice_choice']!r})")
    if "custom_functions" in data:
        problems += _validate_functions(data["custom_functions"])
    return problems


def _resample(pcm: bytes, src: int, dst: int) -> bytes:
    """Linear-interpolation resampling (good enough for an echo)."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if not x.size or src == dst:
        return pcm
    n = round(x.size * dst / src)
    y = np.interp(np.arange(n) * (src / dst), np.arange(x.size), x)
    return bytes(np.clip(np.round(y), -32768, 32767).astype("<i2").tobytes())


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


class AivocoSimSession(SimSessionBase):
    """One Socket.IO connection. Recorded state: ``start_call`` (the accepted payload),
    ``start_call_count``, ``accepted``, ``auth_failed``, ``messages``, ``audio``, ``audio_bytes_total``,
    ``audio_chunks``, ``has_audio_frames``, ``tool_results``, ``violations``, ``sent_messages``,
    ``sent_audio_bytes``, ``utterances``, ``stopped`` (stop_call received), ``closed``,
    ``closed_by``, ``close_reason``."""

    input_rate = INPUT_RATE
    output_rate = OUTPUT_RATE
    _log = log
    _task_prefix = "sim-aivoco"
    _accepted_what = "an accepted start_call"
    _message_noun = "event"
    _no_result = "no function_response for {call_id!r} ({name}) within {seconds:g} s"

    def __init__(self, sim: AivocoSim, sid: str, index: int, request: Any) -> None:
        super().__init__(index, sim.max_messages)
        self._sim = sim
        self.sid = sid
        self._request = request
        self.start_call: dict[str, Any] | None = None
        self.start_call_count = 0
        self.auth_failed = False
        self.stopped = False
        self.audio_chunks: collections.deque[tuple[float, int]] = collections.deque(maxlen=sim.max_messages)
        self.has_audio_frames = 0
        self.sent_messages: collections.deque[tuple[str, Any]] = collections.deque(maxlen=sim.max_messages)
        self.sent_audio_bytes = 0
        self.utterances: list[float] = []
        self.close_reason: str | None = None
        self._server_closing = False
        self._vad = _Vad(sim.vad, INPUT_RATE)

    # ---- scripting API -----------------------------------------------------------------------

    async def emit(self, event: str, data: Any = None) -> None:
        """Emit any event to this client (tests may send what the real service would not)."""
        if self._finished:
            raise SessionClosed(f"session {self.index} is closed")
        await self._sim.sio.emit(event, data, to=self.sid)
        if event != "audio_response":
            self.sent_messages.append((event, data))

    async def send_audio(self, pcm: bytes, chunk_ms: int = 100) -> None:
        """PCM s16le at 24 kHz as ``audio_response`` events of ``chunk_ms``, back to back."""
        chunk = chunk_bytes(pcm, OUTPUT_RATE, chunk_ms)
        async with self._speak_lock:
            for off in range(0, len(pcm), chunk):
                piece = pcm[off:off + chunk]
                await self.emit("audio_response", {"audio_data": base64.b64encode(piece).decode("ascii")})
                self.sent_audio_bytes += len(piece)

    async def say(self, text: str, ms: int | None = None) -> None:
        """Speech-like audio for ``text`` then ``text_response`` {text}."""
        await self.send_audio(speechlike(text, ms if ms is not None else self._sim.speech_ms(text), OUTPUT_RATE),
                              chunk_ms=self._sim.burst_chunk_ms)
        await self.emit("text_response", {"text": text})

    async def clear(self) -> None:
        """The protocol has no barge-in event."""
        raise NotImplementedError("the aivoco protocol has no barge-in (clear playback) event")

    async def call_tool(self, name: str, args: Mapping[str, Any], call_id: str | None = None,
                        timeout: float = 20) -> str:
        """Emit ``function_called`` and return the answer's result as text (a string result as is, the
        ``{"result": text}`` object the bridge sends as its text, any other value as compact JSON)."""
        async def send(cid: str) -> None:
            await self.emit("function_called", {"call_id": cid, "function_name": name, "arguments": dict(args)})

        return await self._call(name, call_id, send, timeout, self._sim.tool_deadline_s)

    async def hangup(self) -> None:
        """The service ends the session: ``session_ended`` then a server-side disconnect."""
        await self.emit("session_ended", {"reason": "ended_by_server", "message": "Session ended by the server"})
        await self.disconnect()

    async def disconnect(self) -> None:
        """A Socket.IO disconnect from the server side, without any protocol message."""
        self._server_closing = True
        await self._sim.sio.disconnect(self.sid)

    def drop(self) -> None:
        """Abort the TCP connection: no Socket.IO or WebSocket goodbye (a network failure)."""
        transport = getattr(self._request, "transport", None)
        if transport is None:
            raise RuntimeError("no transport to abort")
        transport.abort()

    async def send_raw_text(self, text: str) -> None:
        """A malformed message: ``audio_response`` whose payload is the bare string."""
        await self.emit("audio_response", text)

    # ---- internals ---------------------------------------------------------------------------

    def _accepted_setup(self) -> dict[str, Any] | None:
        """The ``start_call`` payload (:meth:`wait_accepted` waits until ``session_ready`` was sent)."""
        return self.start_call

    def _violation(self, text: str) -> None:  # logged; no "(further violations not recorded)" marker
        if len(self.violations) < self._sim.max_messages:
            self.violations.append(text)
        log.info("session %d: violation: %s", self.index, text)
        self._notify()

    async def _error(self, message: str, etype: str) -> None:
        await self.emit("error", {"message": message, "type": etype})

    def _record_event(self, event: str, data: Any) -> None:
        msg: dict[str, Any] = {"type": event}
        if isinstance(data, dict):
            msg.update(data)
            if event == "audio_data" and isinstance(data.get("audio_data"), str):
                msg["audio_data"] = f"<{len(data['audio_data'])} base64 chars>"
            if event == "start_call" and "auth_key" in msg:
                msg["auth_key"] = "<redacted>"
        elif data is not None:
            msg["data"] = data
        self._record_as(event, msg)

    async def _on_event(self, event: str, data: Any) -> None:
        self._record_event(event, data)
        if event == "start_call":
            self._sim.start_calls += 1
            await self._on_start_call(data)
        elif event == "audio_data":
            await self._on_audio(data)
        elif event == "stop_call":
            await self._on_stop()
        elif event == "function_response":
            self._on_function_response(data)
        else:
            self._violation(f"unknown event {event!r}")
            await self._error(f"unknown event {event!r}", "invalid_request")

    async def _on_start_call(self, data: Any) -> None:
        self.start_call_count += 1
        if self.start_call_count > 1:
            self._violation("start_call received twice on one connection")
            await self._error("a call is already started on this connection", "invalid_request")
            return
        problems = validate_start_call(data)
        if problems:
            text = "invalid start_call: " + "; ".join(problems)
            self._violation(text)
            await self._error(text, "invalid_request")
            return
        if not self._sim.key_accepted(data["auth_key"]):
            self.auth_failed = True
            log.info("session %d: auth failed", self.index)
            await self.emit("auth_failed", {"message": "Invalid API key", "credits": 0})
            self._notify()
            return
        sim = self._sim
        self.start_call = data
        await self.emit("auth_success", {"credits": sim.credits})
        await self.emit("session_ready", {
            "message": "Voice session started", "credits_available": sim.credits,
            "cost_per_minute": sim.cost_per_minute, "functions_loaded": len(data["custom_functions"]),
        })
        self.accepted = True
        self._notify()
        log.info("session %d: call started (voice %s, %d functions)", self.index, data["voice_choice"],
                 len(data["custom_functions"]))
        if sim.greeting:
            self._spawn(self.say(sim.greeting), "greeting")

    async def _on_audio(self, data: Any) -> None:
        if not self.accepted or self.stopped:
            self._violation("audio_data before session_ready" if not self.stopped else "audio_data after stop_call")
            await self._error("no active session: send start_call and wait for session_ready", "session_not_active")
            return
        if not isinstance(data, dict):
            self._violation(f"audio_data payload is a {type(data).__name__}, not an object")
            return
        b64, has_audio, amp = data.get("audio_data"), data.get("has_audio"), data.get("max_amplitude")
        try:
            pcm = base64.b64decode(b64, validate=True) if isinstance(b64, str) else None
        except (binascii.Error, ValueError):
            pcm = None
        if pcm is None or len(pcm) % 2:
            why = "is not base64" if pcm is None else f"decodes to {len(pcm)} bytes: not whole 16-bit samples"
            self._violation(f"audio_data.audio_data {why}")
            await self._error(f"invalid audio: audio_data {why}", "invalid_audio")
            return
        bad = []
        if not isinstance(has_audio, bool):
            bad.append(f"has_audio must be a boolean (got {type(has_audio).__name__})")
        if (isinstance(amp, bool) or not isinstance(amp, (int, float)) or not math.isfinite(amp)
                or not 0.0 <= amp <= 1.0):
            bad.append(f"max_amplitude must be a number in 0..1 (got {amp!r})")
        if bad:
            self._violation("audio_data: " + "; ".join(bad))
            return
        if has_audio:
            self.has_audio_frames += 1
        self._keep_audio(pcm, self._sim.audio_cap_bytes)
        self.audio_chunks.append((time.monotonic(), len(pcm)))
        self._notify()
        for event, utterance in self._vad.feed(pcm):
            if event == "speech_end":
                seconds = len(utterance) / 2 / INPUT_RATE
                self.utterances.append(seconds)
                if self._sim.echo:
                    self._spawn(self._echo(utterance, seconds), "echo")

    async def _echo(self, utterance: bytes, seconds: float) -> None:
        await self.send_audio(_resample(utterance, INPUT_RATE, OUTPUT_RATE), chunk_ms=self._sim.burst_chunk_ms)
        await self.emit("text_response", {"text": f"(echo {seconds:.2f} s)"})

    async def _on_stop(self) -> None:
        if not self.accepted:
            self._violation("stop_call without an active session")
            return
        if self.stopped:
            self._violation("stop_call received twice")
            return
        self.stopped = True
        minutes = (time.monotonic() - self.connected_at) / 60
        used = round(minutes * self._sim.cost_per_minute, 4)
        try:
            await self.emit("session_ended", {"reason": "user_stopped", "message": "Call stopped by user",
                                              "total_credits_used": used,
                                              "remaining_credits": round(self._sim.credits - used, 4)})
        except SessionClosed:
            pass

    def _on_function_response(self, data: Any) -> None:
        if not isinstance(data, dict):
            self._violation(f"function_response payload is a {type(data).__name__}, not an object")
            return
        call_id = data.get("call_id")
        if not isinstance(call_id, str):
            self._violation(f"function_response without a string call_id (got {call_id!r})")
            return
        if "result" not in data:
            self._violation(f"function_response for call_id {call_id!r} has no result")
            return
        pending = self._take_call(call_id, f"duplicate function_response for {call_id!r}",
                                  f"unknown call_id in function_response for {call_id!r}")
        if pending is None:
            return
        if data.get("function_name") != pending.name:
            self._violation(f"function_response for {call_id!r} names {data.get('function_name')!r}, "
                            f"the call was {pending.name!r}")
        result = data["result"]
        if isinstance(result, dict) and set(result) == {"result"} and isinstance(result["result"], str):
            text = result["result"]
        elif isinstance(result, str):
            text = result
        else:
            text = json.dumps(result, separators=(",", ":"))
        self._answer_call(call_id, pending, text)
        self._notify()

    async def _finish(self, reason: str) -> None:
        await self._stop_tasks()
        client_reasons = {socketio.AsyncServer.reason.CLIENT_DISCONNECT}
        if self._server_closing or reason == socketio.AsyncServer.reason.SERVER_DISCONNECT:
            self.closed_by = "server"
        elif reason in client_reasons or (self.stopped and reason == socketio.AsyncServer.reason.TRANSPORT_CLOSE):
            # python-socketio's client closes its WebSocket without flushing its goodbye packet, so
            # a client that said stop_call and then closed counts as having left on purpose.
            self.closed_by = "client"
        else:
            self.closed_by = None  # the network: transport closed or error, ping timeout
        self.close_reason = str(reason)
        self._fail_pending_calls("function_response")
        log.info("session %d end: %s by %s, %.1f s, caller audio %d B, sent audio %d B, violations %d",
                 self.index, reason, self.closed_by or "network", time.monotonic() - self.connected_at,
                 self.audio_bytes_total, self.sent_audio_bytes, len(self.violations))
        self._mark_closed()


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class AivocoSim(SimServerBase[AivocoSimSession]):
    """The service: a Socket.IO server creating one :class:`AivocoSimSession` per connection."""

    def __init__(
        self,
        *,
        accepted_keys: Iterable[str] | None = None,
        echo: bool = True,
        greeting: str | None = "Hello! How can I help you?",
        greeting_max_ms: int = 2000,
        credits: float = 100.0,
        cost_per_minute: float = 1.0,
        vad: VadConfig | None = None,
        burst_chunk_ms: int = 200,
        audio_cap_bytes: int = 8 * 1024 * 1024,
        max_messages: int = 10_000,
        keep_sessions: int | None = None,
        tool_deadline_s: float = 15.0,
        ping_interval: float = 25.0,
        ping_timeout: float = 20.0,
    ) -> None:
        if burst_chunk_ms <= 0 or audio_cap_bytes < 0 or max_messages <= 0:
            raise ValueError("burst_chunk_ms and max_messages must be positive, audio_cap_bytes >= 0")
        super().__init__(accepted_keys, keep_sessions)
        self.echo = echo
        self.greeting = greeting
        self.greeting_max_ms = greeting_max_ms
        self.credits = credits
        self.cost_per_minute = cost_per_minute
        self.vad = vad if vad is not None else VadConfig()
        self.burst_chunk_ms = burst_chunk_ms
        self.audio_cap_bytes = audio_cap_bytes
        self.max_messages = max_messages
        self.tool_deadline_s = tool_deadline_s
        #: Every start_call received, on every connection (a client that re-sends it after a
        #: reconnect shows here as more than one per call).
        self.start_calls = 0
        self.sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"], async_handlers=False,
                                        ping_interval=ping_interval, ping_timeout=ping_timeout,
                                        cors_allowed_origins=[], logger=False, engineio_logger=False)
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.on("*", self._on_any)
        self._by_sid: dict[str, AivocoSimSession] = {}
        self._runner: web.AppRunner | None = None

    def speech_ms(self, text: str) -> int:
        return max(400, min(self.greeting_max_ms, 60 * len(text)))

    def key_accepted(self, key: str) -> bool:
        return self._key_accepted(key)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError("AivocoSim already started")
        app = web.Application()
        self.sio.attach(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None and getattr(server, "sockets", None)
        bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"ws://{shown}:{bound}"

    async def stop(self) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        for session in list(self._by_sid.values()):
            try:
                await session.disconnect()
            except Exception:  # noqa: BLE001 - already gone
                pass
        await runner.cleanup()

    async def _on_connect(self, sid: str, environ: Mapping[str, Any], auth: Any = None) -> None:
        session = AivocoSimSession(self, sid, next(self._counter), environ.get("aiohttp.request"))
        self._by_sid[sid] = session
        self._add_session(session)
        log.info("session %d connected", session.index)

    async def _on_disconnect(self, sid: str, reason: str = "") -> None:
        session = self._by_sid.pop(sid, None)
        if session is not None:
            await session._finish(reason)

    async def _on_any(self, event: str, sid: str, *args: Any) -> None:
        session = self._by_sid.get(sid)
        if session is None:
            return
        try:
            await session._on_event(event, args[0] if args else None)
        except SessionClosed:
            pass


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for ``voxbridge gateway-sim --protocol aivoco``."""
    add_server_arguments(parser, listen_help="address to serve Socket.IO on (default 127.0.0.1:8766)",
                         key_help="an accepted auth_key (repeatable); without it any non-empty key is accepted",
                         default_port=8766)
    parser.add_argument("--greeting", default="Hello! How can I help you?", metavar="TEXT",
                        help="what the agent says once the session is ready ('' for nothing)")
    parser.add_argument("--no-echo", dest="echo", action="store_false", help="do not echo the caller's speech")


async def run_from_args(args: argparse.Namespace) -> None:
    """Serve until cancelled, with the options of :func:`add_arguments`."""
    host, port = args.listen
    keys = api_keys(args)
    sim = AivocoSim(accepted_keys=keys, echo=getattr(args, "echo", True),
                    greeting=getattr(args, "greeting", None) or None, keep_sessions=32)
    await serve_until_cancelled(sim, host, port, log, "aivoco sim listening on %s (api keys: %s)",
                                f"{len(keys)} configured" if keys else "any non-empty key")


def _main() -> None:
    main("python -m bridge.devtools.sim_aivoco", "aivoco simulator", add_arguments, run_from_args)


if __name__ == "__main__":
    _main()
