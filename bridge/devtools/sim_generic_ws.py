"""Reference server for the generic AI WebSocket protocol (``generic-ws``): a strict, scriptable simulator.

Seed 001 ("Asterisk to External AI via WebSocket") defines a small JSON protocol that "your external
AI server must implement". This module is such a server, written from that protocol description
(spelled out below, with every choice made where the description is silent), never from the
bridge's adapter, and importing nothing from the bridge except the sibling simulator
:mod:`bridge.devtools.gateway_sim` (test audio, the energy VAD, scenario files). Its G.711 µ-law
codec is its own, computed from the companding formula, so a mistake in the bridge's table-driven
codec (bridge/g711.py) cannot hide behind the same mistake here.

Protocol as implemented
=======================

Connection
    WebSocket on path ``/ws`` (others: HTTP 404). With ``accepted_keys`` set, the handshake must
    carry ``Authorization: Bearer <key>`` with one of them, else HTTP 401 before the upgrade (the
    refusal is recorded in ``GenericWsSim.refused``); without it any token, or none, is accepted
    and recorded (``session.token``).

``session.init`` (client → server, MUST be the first message)
    ``{"type": "session.init", "config": {...}}``, nothing else at the top level. ``config``:

    ==========================  ===========================================================================
    ``audio_format``            ``"g711_ulaw"`` (8 kHz µ-law) or ``"pcm16"`` (s16le mono) — required
    ``sample_rate``             integer; 8000 for g711_ulaw; 8000, 16000 or 24000 for pcm16 — required
    ``channels``                integer 1 — required
    ``language``, ``voice``     non-empty strings — required
    ``system_prompt``           string (may be empty) — required
    ``vad_enabled``             boolean — required
    ``vad_threshold``           number 0..1 — required when vad_enabled is true
    ``vad_silence_duration_ms`` integer 1..10000 — required when vad_enabled is true
    ``vad_prefix_padding_ms``   integer 0..10000 — optional
    ``tools``                   extension: a non-empty list of ``{"name", "description", "parameters"}``
    ==========================  ===========================================================================

    Unknown keys are refused. Every problem is listed (``; ``-separated, each naming its field) in
    ``{"type": "error", "message": "invalid session.init: …", "fatal": true}``, then close 1008.
    A binary frame, non-JSON, a non-object or another type first: the same (fatal error, 1008). No
    ``session.init`` within ``init_timeout_s``: fatal error, 1008.

Ready
    After ``ready_delay_ms`` the server sends ``{"type": <ready_event>}`` (``session_started`` or
    ``ready``; ``ready_event=None`` sends nothing: a server that never announces itself). Caller
    audio arriving before a ready announcement is a violation (recorded, not heard by the "AI").

``audio.input`` ``{"audio": <base64>, "format": <audio_format>}``
    ``format`` must equal session.init's ``audio_format``; ``audio`` must be valid base64 (strict
    alphabet, padding) of whole samples (any length for µ-law, even for pcm16). Violations: a
    fatal error and close 1008 for a format mismatch, 1007 (invalid payload data) for undecodable
    audio — a real server cannot make sense of the rest of such a stream either. The decoded audio
    is recorded as s16le at the session rate (``audio``, ``input_rate``).

``text.input`` ``{"text": <non-empty string>}``
    The "AI" says it: speech-like audio, then an assistant transcript and the end of the
    response. The first one is the greeting (scenario event ``greeting_done``).

``tool.result`` ``{"call_id", "result": <string>}`` (extension)
    Must answer an outstanding ``tool_call`` exactly once; anything else is a violation (no error
    sent). No answer within ``tool_deadline_s`` is a violation too.

Anything else
    Unknown/missing ``type``, non-JSON text, a binary frame, a second ``session.init``, an empty
    ``text.input``: a violation, ``{"type": "error", "message": …, "fatal": false}``, and the
    session goes on.

Server → client, in one of the seed's two naming variants (``variant``)
    ========================  ====================================  ==========================================
    meaning                   ``variant="a"``                       ``variant="b"``
    ========================  ====================================  ==========================================
    AI speech                 ``audio_delta {audio}``               ``audio_chunk {data}``
    transcript                ``transcript {text, role}``           ``transcription {text, speaker}``
    caller started speaking   ``user_speech_started``               ``speech_started``
    response finished         ``response_complete``                 ``audio_done``
    ========================  ====================================  ==========================================

    plus ``error {message, fatal}`` and ``tool_call {call_id, name, arguments}`` (extension).
    Audio is base64 in the session's format, sent in bursts (``burst_chunk_ms`` chunks) much
    faster than real time; ``speaking_until`` is when a client playing in real time would finish.

Echo agent
    Energy VAD (:class:`bridge.devtools.gateway_sim.VadConfig`) on the caller's decoded audio, by
    sample count. With ``vad_enabled`` true, each speech start sends the "caller started speaking"
    message, and if the "AI" is still speaking it stops its burst (barge-in, ``barge_ins``). With
    ``vad_enabled`` false the server sends no speech events (the client detects speech itself),
    but still ends turns with its own endpointing. At speech end: a final user transcript
    ``(speech 1.20 s)`` and, with ``echo``, the utterance back, an assistant transcript
    ``(echo 1.20 s)`` and the end of the response.

Scripting
    In-process: ``session.send_audio / clear / call_tool / hangup / error / say / transcript /
    send_json / send_raw_text / wait_message / wait_audio / wait_accepted``; scenario files as in
    :mod:`bridge.devtools.gateway_sim` (``do: say | tool_call | clear | hangup | error |
    transcript``). ``hangup`` closes with 1000: the seed has no hang-up message.

CLI
    ``add_arguments(parser)`` / ``run_from_args(args)``, wired as ``voxbridge gateway-sim
    --protocol generic-ws``; ``python -m bridge.devtools.sim_generic_ws`` also works.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .gateway_sim import Scenario, VadConfig, _Vad, load_scenario, speechlike, tone
from .sim_common import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    ScriptedWsSession,
    SessionClosed,
    WsSimServer,
    add_server_arguments,
    api_keys,
    chunk_bytes,
    key_accepted,
    main,
    serve_until_cancelled,
)

__all__ = [
    "GenericWsSim",
    "GenericWsSession",
    "SessionClosed",
    "add_arguments",
    "run_from_args",
    "ulaw_decode",
    "ulaw_encode",
    "validate_session_init",
]

log = logging.getLogger("voxbridge.sim_generic_ws")

PATH: Final = "/ws"
AUDIO_FORMATS: Final = ("g711_ulaw", "pcm16")
PCM_RATES: Final = (8000, 16000, 24000)
CONFIG_FIELDS: Final = frozenset({
    "audio_format", "sample_rate", "channels", "language", "voice", "system_prompt", "vad_enabled",
    "vad_threshold", "vad_silence_duration_ms", "vad_prefix_padding_ms", "tools",
})
TOOL_FIELDS: Final = ("name", "description", "parameters")
CLOSE_INVALID_PAYLOAD: Final = 1007

Variant = Literal["a", "b"]
#: meaning -> (message type, field) per naming variant.
VARIANTS: Final[dict[str, dict[str, tuple[str, str]]]] = {
    "a": {"audio": ("audio_delta", "audio"), "transcript": ("transcript", "role"),
          "speech": ("user_speech_started", ""), "done": ("response_complete", "")},
    "b": {"audio": ("audio_chunk", "data"), "transcript": ("transcription", "speaker"),
          "speech": ("speech_started", ""), "done": ("audio_done", "")},
}


# --------------------------------------------------------------------------------------------
# G.711 µ-law from the formula (independent of bridge/g711.py's tables)
# --------------------------------------------------------------------------------------------


def ulaw_encode(pcm: bytes) -> bytes:
    """s16le → µ-law. Per sample: the 14-bit magnitude (``|x| / 4`` rounded up, the sign apart),
    clipped at 8159, biased by 33; the segment is ``floor(log2(biased)) - 5`` (from ``frexp``, exact);
    the 4-bit step inside it ``(biased >> (segment + 1)) & 15``; the code is sign, segment and step,
    every bit inverted."""
    if len(pcm) % 2:
        raise ValueError(f"PCM s16le needs an even number of bytes, got {len(pcm)}")
    x = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    shifted = x >> 2
    negative = x < 0
    magnitude = np.where(negative, -shifted, shifted)
    biased = np.minimum(magnitude, 8159) + 33
    _, exp2 = np.frexp(biased.astype(np.float64))
    segment = exp2.astype(np.int32) - 6  # biased = m * 2**exp2 with 0.5 <= m < 1
    overflow = segment > 7
    segment = np.minimum(segment, 7)
    step = np.where(overflow, 15, (biased >> (segment + 1)) & 15)
    code = (np.where(negative, 0x80, 0) | (segment << 4) | step) ^ 0xFF  # inverted: positive is 1
    out: npt.NDArray[np.uint8] = code.astype(np.uint8)
    return out.tobytes()


def ulaw_decode(ulaw: bytes) -> bytes:
    """µ-law → s16le: ``±4 * (((2 * step + 33) << segment) - 33)`` (G.711's decoder output ×4)."""
    u = np.frombuffer(ulaw, dtype=np.uint8).astype(np.int32) ^ 0xFF
    segment = (u >> 4) & 7
    step = u & 15
    value = 4 * (((2 * step + 33) << segment) - 33)
    out: npt.NDArray[np.int16] = np.where(u & 0x80, -value, value).astype("<i2")
    return out.tobytes()


# --------------------------------------------------------------------------------------------
# session.init validation
# --------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_session_init(msg: Mapping[str, Any]) -> list[str]:
    """The problems with a ``session.init`` message (empty when valid), each naming its field."""
    problems = [f"unknown top-level field {k!r}" for k in sorted(msg) if k not in ("type", "config")]
    if msg.get("type") != "session.init":
        problems.append("type must be 'session.init'")
    cfg = msg.get("config")
    if not isinstance(cfg, dict):
        return [*problems, "config must be an object"]
    problems += [f"config: unknown field {k!r}" for k in sorted(cfg) if k not in CONFIG_FIELDS]
    for key in ("audio_format", "sample_rate", "channels", "language", "voice", "system_prompt", "vad_enabled"):
        if key not in cfg:
            problems.append(f"config.{key} is required")
    fmt, rate = cfg.get("audio_format"), cfg.get("sample_rate")
    if "audio_format" in cfg and fmt not in AUDIO_FORMATS:
        problems.append(f"config.audio_format must be g711_ulaw or pcm16 (got {fmt!r})")
    if "sample_rate" in cfg:
        if not _is_int(rate):
            problems.append(f"config.sample_rate must be an integer (got {rate!r})")
        elif fmt == "g711_ulaw" and rate != 8000:
            problems.append(f"config.sample_rate must be 8000 for g711_ulaw (got {rate})")
        elif fmt == "pcm16" and rate not in PCM_RATES:
            problems.append(f"config.sample_rate must be 8000, 16000 or 24000 for pcm16 (got {rate})")
    if "channels" in cfg and not (_is_int(cfg["channels"]) and cfg["channels"] == 1):
        problems.append(f"config.channels must be 1 (got {cfg['channels']!r})")
    for key in ("language", "voice"):
        if key in cfg and not (isinstance(cfg[key], str) and cfg[key]):
            problems.append(f"config.{key} must be a non-empty string")
    if "system_prompt" in cfg and not isinstance(cfg["system_prompt"], str):
        problems.append("config.system_prompt must be a string")
    enabled = cfg.get("vad_enabled")
    if "vad_enabled" in cfg and not isinstance(enabled, bool):
        problems.append(f"config.vad_enabled must be true or false (got {enabled!r})")
    if enabled is True:
        for key in ("vad_threshold", "vad_silence_duration_ms"):
            if key not in cfg:
                problems.append(f"config.{key} is required when vad_enabled is true")
    if "vad_threshold" in cfg and not (_is_number(cfg["vad_threshold"]) and 0 <= cfg["vad_threshold"] <= 1):
        problems.append(f"config.vad_threshold must be a number from 0 to 1 (got {cfg['vad_threshold']!r})")
    for key, low in (("vad_silence_duration_ms", 1), ("vad_prefix_padding_ms", 0)):
        if key in cfg and not (_is_int(cfg[key]) and low <= cfg[key] <= 10_000):
            problems.append(f"config.{key} must be an integer from {low} to 10000 (got {cfg[key]!r})")
    if "tools" in cfg:
        problems += _validate_tools(cfg["tools"])
    return problems


def _validate_tools(tools: Any) -> list[str]:
    if not isinstance(tools, list) or not tools:
        return ["config.tools must be a non-empty list (omit it when there are no tools)"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"config.tools[{i}]"
        if not isinstance(tool, dict):
            problems.append(f"{where} must be an object")
            continue
        problems += [f"{where}: unknown field {k!r}" for k in sorted(tool) if k not in TOOL_FIELDS]
        problems += [f"{where}.{k} is required" for k in TOOL_FIELDS if k not in tool]
        name = tool.get("name")
        if "name" in tool:
            if not (isinstance(name, str) and name):
                problems.append(f"{where}.name must be a non-empty string")
            elif name in seen:
                problems.append(f"{where}.name {name!r} is a duplicate")
            else:
                seen.add(name)
        if "description" in tool and not isinstance(tool["description"], str):
            problems.append(f"{where}.description must be a string")
        if "parameters" in tool and not isinstance(tool["parameters"], dict):
            problems.append(f"{where}.parameters must be an object (a JSON Schema)")
    return problems


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


class GenericWsSession(ScriptedWsSession):
    """One client connection. Recorded state (read it freely): ``index``, ``token``, ``init`` (the
    session.init message), ``config`` (its config), ``accepted``, ``ready_sent_at``, ``messages``,
    ``audio`` (decoded caller audio, s16le at ``input_rate``), ``audio_bytes_total``,
    ``audio_chunks`` ((monotonic time, decoded bytes)), ``text_inputs``, ``tool_results``,
    ``violations``, ``sent_messages``, ``sent_audio_bytes``, ``speaking_until``, ``barge_ins``,
    ``utterances``, ``closed``, ``close_code``, ``close_reason``, ``closed_by``."""

    _log = log
    _task_prefix = "sim-generic-ws"
    _accepted_what = "an accepted session.init"
    _no_result = "no tool.result for call_id {call_id!r} ({name}) within {seconds:g} s"

    def __init__(self, sim: GenericWsSim, ws: ServerConnection, index: int, token: str | None) -> None:
        super().__init__(ws, index, sim.max_messages)
        self._sim = sim
        self.token = token
        self.init: dict[str, Any] | None = None
        self.config: dict[str, Any] | None = None
        self.ready_sent_at: float | None = None
        self.reject_reason: str | None = None
        self.audio_chunks: collections.deque[tuple[float, bytes]] = collections.deque(maxlen=sim.max_messages)
        self.text_inputs: list[str] = []
        self._names = VARIANTS[sim.variant]
        self._echo = sim.echo if sim.scenario is None or sim.scenario.echo is None else sim.scenario.echo
        self._vad: _Vad | None = None

    # ---- properties --------------------------------------------------------------------------

    @property
    def audio_format(self) -> str:
        if self.config is None or not self.accepted:
            raise RuntimeError("the session has no accepted session.init yet")
        return str(self.config["audio_format"])

    @property
    def input_rate(self) -> int:
        """Hz of the decoded caller audio in :attr:`audio` (the session's wire rate)."""
        if self.config is None or not self.accepted:
            raise RuntimeError("the session has no accepted session.init yet")
        return int(self.config["sample_rate"])

    @property
    def output_rate(self) -> int:
        """Hz of the PCM :meth:`send_audio` takes (the same wire rate)."""
        return self.input_rate

    @property
    def ready(self) -> bool:
        return self.ready_sent_at is not None

    @property
    def server_vad(self) -> bool:
        return bool(self.config and self.config.get("vad_enabled"))

    # ---- scripting API -----------------------------------------------------------------------

    async def send_json(self, obj: Mapping[str, Any]) -> None:
        """Send one JSON text frame (anything: tests may send what a real server would not)."""
        await self._send(json.dumps(obj, separators=(",", ":")))
        self.sent_messages.append(dict(obj))

    def encode_audio(self, pcm: bytes) -> bytes:
        """PCM s16le at :attr:`output_rate` in the session's wire format."""
        return ulaw_encode(pcm) if self.audio_format == "g711_ulaw" else pcm

    async def send_audio(self, pcm: bytes, chunk_ms: int = 100) -> None:
        """Send PCM s16le (at :attr:`output_rate`) as a burst of ``chunk_ms`` audio messages, back to
        back, in the session's format and variant. Serialised with the sim's own speech; stops
        early when the playback is cleared (barge-in or :meth:`clear`)."""
        rate = self.output_rate
        chunk = chunk_bytes(pcm, rate, chunk_ms)
        mtype, field_ = self._names["audio"]
        async with self._speak_lock:
            gen = self._clear_gen
            for off in range(0, len(pcm), chunk):
                if self._clear_gen != gen:
                    break
                piece = pcm[off:off + chunk]
                payload = base64.b64encode(self.encode_audio(piece)).decode("ascii")
                await self._send(json.dumps({"type": mtype, field_: payload}, separators=(",", ":")))
                self.sent_audio_bytes += len(piece)
                self.speaking_until = max(time.monotonic(), self.speaking_until) + len(piece) / 2 / rate

    async def say(self, text: str | None = None, *, tone_hz: float | None = None, ms: int | None = None) -> None:
        """Speak a tone or speech-like audio for ``text``, then (for text) an assistant transcript;
        then the end of the response."""
        if text is None and tone_hz is None:
            raise ValueError("say() needs text or tone_hz")
        rate = self.output_rate
        if tone_hz is not None:
            pcm = tone(tone_hz, ms if ms is not None else 1000, rate)
        else:
            assert text is not None
            pcm = speechlike(text, ms if ms is not None else self._sim.speech_ms(text), rate)
        await self.send_audio(pcm, chunk_ms=self._sim.burst_chunk_ms)
        if text is not None:
            await self.transcript("assistant", text)
        await self.response_done()

    async def transcript(self, role: str, text: str, final: bool = True) -> None:
        """A transcript in the session's variant (the protocol's are always final: ``final`` is
        accepted for the common scripting interface and ignored)."""
        mtype, who = self._names["transcript"]
        await self.send_json({"type": mtype, "text": text, who: role})

    async def response_done(self) -> None:
        await self.send_json({"type": self._names["done"][0]})

    async def clear(self) -> None:
        """The protocol's barge-in: the "caller started speaking" message; stops any burst."""
        self._clear_gen += 1
        self.speaking_until = time.monotonic()
        await self.send_json({"type": self._names["speech"][0]})

    async def call_tool(self, name: str, args: Mapping[str, Any], call_id: str | None = None,
                        timeout: float = 20) -> str:
        """Send ``tool_call`` (the extension) and return the matching ``tool.result``'s ``result``.
        ``TimeoutError`` after ``timeout``; :class:`SessionClosed` if the session ends first."""
        async def send(cid: str) -> None:
            await self.send_json({"type": "tool_call", "call_id": cid, "name": name, "arguments": dict(args)})

        return await self._call(name, call_id, send, timeout, self._sim.tool_deadline_s)

    async def hangup(self) -> None:
        """The service ends the call: the seed has no message for it, so a normal close (1000)."""
        await self._close(CLOSE_NORMAL, "session ended")

    async def error(self, message: str, close: bool = True, code: int = CLOSE_POLICY,
                    fatal: bool | None = None) -> None:
        """Send ``{"type": "error", "message", "fatal"}`` (``fatal`` defaults to ``close``); then,
        with ``close``, close with ``code``."""
        await self.send_json({"type": "error", "message": message, "fatal": close if fatal is None else fatal})
        if close:
            await self._close(code, message)

    def _accepted_setup(self) -> dict[str, Any] | None:
        return self.config

    async def wait_ready(self, timeout: float = 5) -> None:
        await self._wait_for(lambda: self.ready, timeout, "the ready announcement")

    # ---- internals ---------------------------------------------------------------------------

    async def _refuse(self, message: str, code: int = CLOSE_POLICY, *, violation: bool = True) -> None:
        """What a real server refuses: a fatal error, then close."""
        self.reject_reason = message
        if violation:
            self._violation(message)
        try:
            await self.send_json({"type": "error", "message": message, "fatal": True})
        except SessionClosed:
            pass
        await self._close(code, message)

    async def _complain(self, violation: str, message: str) -> None:
        """A client mistake a server shrugs off: recorded, a non-fatal error, the session goes on."""
        self._violation(violation)
        await self.send_json({"type": "error", "message": message, "fatal": False})

    async def _run(self) -> None:
        try:
            first = await asyncio.wait_for(self._ws.recv(), self._sim.init_timeout_s)
        except TimeoutError:
            await self._refuse(f"no session.init received within {self._sim.init_timeout_s:g} s")
            return
        except ConnectionClosed:
            return
        if not await self._handle_init(first):
            return
        assert self.config is not None
        log.info("session %d start: %s %d Hz, vad %s, %d tools", self.index, self.config["audio_format"],
                 self.config["sample_rate"], "server" if self.server_vad else "client",
                 len(self.config.get("tools", [])))
        self._vad = _Vad(self._sim.vad, self.input_rate)
        self._spawn(self._announce(), "ready")
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    await self._complain(f"binary frame of {len(message)} bytes",
                                         "invalid message: binary frames are not part of the protocol; "
                                         "send audio as base64 in audio.input")
                elif not await self._on_text(message):
                    return
        except (ConnectionClosed, SessionClosed):
            pass

    async def _handle_init(self, first: str | bytes) -> bool:
        if isinstance(first, bytes):
            await self._refuse("binary frame before session.init: the first message must be session.init")
            return False
        try:
            msg = json.loads(first)
        except ValueError:
            await self._refuse("first message is not valid JSON: it must be session.init")
            return False
        if not isinstance(msg, dict):
            await self._refuse(f"first message must be a JSON object, got {type(msg).__name__}")
            return False
        self._record(msg)
        if msg.get("type") != "session.init":
            await self._refuse(f"first message must be session.init, got type {msg.get('type')!r}")
            return False
        self.init = msg
        self.config = msg.get("config") if isinstance(msg.get("config"), dict) else None
        problems = validate_session_init(msg)
        if problems:
            log.info("session %d refused: invalid session.init (%s)", self.index, "; ".join(problems))
            await self._refuse("invalid session.init: " + "; ".join(problems))
            return False
        self.accepted = True
        self._notify()
        return True

    async def _announce(self) -> None:
        sim = self._sim
        if sim.ready_delay_ms:
            await asyncio.sleep(sim.ready_delay_ms / 1000)
        if sim.ready_event is not None:
            await self.send_json({"type": sim.ready_event})
            self.ready_sent_at = time.monotonic()
            self._notify()
        if sim.scenario is not None and sim.scenario.steps:
            self._spawn(self._run_scenario(sim.scenario), "scenario")

    async def _on_text(self, text: str) -> bool:
        """One text frame; False when the session was refused (closed)."""
        try:
            msg = json.loads(text)
        except ValueError:
            await self._complain("text frame is not valid JSON", "invalid message: not valid JSON")
            return True
        if not isinstance(msg, dict):
            await self._complain(f"message is not a JSON object ({type(msg).__name__})",
                                 "invalid message: must be a JSON object")
            return True
        self._record(msg)
        mtype = msg.get("type")
        if mtype == "audio.input":
            return await self._on_audio(msg)
        if mtype == "text.input":
            value = msg.get("text")
            if not (isinstance(value, str) and value.strip()):
                await self._complain("text.input without a non-empty string 'text'",
                                     "invalid text.input: text must be a non-empty string")
                return True
            self.text_inputs.append(value)
            self._spawn(self._say_text(value, first=len(self.text_inputs) == 1), "text")
        elif mtype == "tool.result":
            self._on_tool_result(msg)
        elif mtype == "session.init":
            await self._complain("session.init received twice", "invalid message: session already initialised")
        elif mtype is None:
            await self._complain("message without a 'type' field", "invalid message: missing 'type' field")
        else:
            await self._complain(f"unknown message type {mtype!r}", f"unknown message type {mtype!r}")
        return True

    async def _say_text(self, text: str, *, first: bool) -> None:
        await self.say(text)
        if first:
            self._emit("greeting_done")

    async def _on_audio(self, msg: Mapping[str, Any]) -> bool:
        now = time.monotonic()
        fmt = self.audio_format
        if msg.get("format") != fmt:
            await self._refuse(f"audio.input format {msg.get('format')!r} does not match session.init's "
                               f"audio_format {fmt!r}")
            return False
        data = msg.get("audio")
        if not isinstance(data, str):
            await self._refuse(f"audio.input needs a base64 string 'audio', got {type(data).__name__}",
                               CLOSE_INVALID_PAYLOAD)
            return False
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            await self._refuse("audio.input: 'audio' is not valid base64", CLOSE_INVALID_PAYLOAD)
            return False
        if fmt == "pcm16" and len(raw) % 2:
            await self._refuse(f"audio.input: pcm16 audio of odd length {len(raw)} is not whole 16-bit samples",
                               CLOSE_INVALID_PAYLOAD)
            return False
        if not raw:
            return True
        pcm = ulaw_decode(raw) if fmt == "g711_ulaw" else raw
        self._keep_audio(pcm, self._sim.audio_cap_bytes)
        self.audio_chunks.append((now, pcm))
        self._notify()
        if self._sim.ready_event is not None and not self.ready:
            self._violation("audio.input before the server announced it was ready "
                            f"({self._sim.ready_event}): not heard")
            return True
        assert self._vad is not None
        for event, utterance in self._vad.feed(pcm):
            if event == "speech_start":
                await self._on_speech_start()
            else:
                await self._on_speech_end(utterance)
        return True

    async def _on_speech_start(self) -> None:
        self._emit("speech_start")
        if not self.server_vad:
            return  # the client detects speech itself: no speech events from the server
        if self.is_speaking:
            self.barge_ins += 1
            await self.clear()
            self._emit("barge_in")
        else:
            await self.send_json({"type": self._names["speech"][0]})

    async def _on_speech_end(self, utterance: bytes) -> None:
        seconds = len(utterance) / 2 / self.input_rate
        self.utterances.append(seconds)
        self._emit("speech_end")
        await self.transcript("user", f"(speech {seconds:.2f} s)")
        if self._echo:
            self._spawn(self._echo_back(utterance, seconds), "echo")

    async def _echo_back(self, utterance: bytes, seconds: float) -> None:
        await self.send_audio(utterance, chunk_ms=self._sim.burst_chunk_ms)
        await self.transcript("assistant", f"(echo {seconds:.2f} s)")
        await self.response_done()

    def _on_tool_result(self, msg: Mapping[str, Any]) -> None:
        call_id, result = msg.get("call_id"), msg.get("result")
        if not isinstance(call_id, str):
            self._violation(f"tool.result without a string call_id (got {call_id!r})")
            return
        if not isinstance(result, str):
            self._violation(f"tool.result for call_id {call_id!r}: result must be a string, "
                            f"got {type(result).__name__}")
            return
        pending = self._take_call(call_id, f"duplicate tool.result for call_id {call_id!r}",
                                  f"tool.result for unknown call_id {call_id!r}")
        if pending is None:
            return
        self._answer_call(call_id, pending, result)
        self._emit("tool_result")

    async def _finish(self) -> None:
        await self._end_connection()
        self._fail_pending_calls("tool.result")
        log.info("session %d end: close %s by %s%s, %.1f s, caller audio %d B, sent audio %d B, violations %d",
                 self.index, self.close_code, self.closed_by or "network",
                 f" ({self.close_reason})" if self.close_reason else "", time.monotonic() - self.connected_at,
                 self.audio_bytes_total, self.sent_audio_bytes, len(self.violations))
        self._mark_closed()


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class GenericWsSim(WsSimServer[GenericWsSession]):
    """The AI server: a WebSocket server on ``/ws``, one :class:`GenericWsSession` per connection.

    Knobs: ``accepted_keys`` (bearer tokens; None: any or none), ``echo``, ``variant`` ("a" or "b":
    which of the seed's message names it sends), ``ready_event`` ("session_started", "ready" or
    None), ``ready_delay_ms``, ``scenario``, ``vad`` (the energy VAD), ``burst_chunk_ms``,
    ``greeting_max_ms``, ``audio_cap_bytes``, ``max_messages``, ``keep_sessions``,
    ``init_timeout_s``, ``tool_deadline_s``.
    """

    def __init__(
        self,
        *,
        accepted_keys: Iterable[str] | None = None,
        echo: bool = True,
        variant: Variant = "a",
        ready_event: Literal["session_started", "ready"] | None = "session_started",
        ready_delay_ms: int = 0,
        scenario: Scenario | None = None,
        vad: VadConfig | None = None,
        burst_chunk_ms: int = 200,
        greeting_max_ms: int = 2000,
        audio_cap_bytes: int = 8 * 1024 * 1024,
        max_messages: int = 10_000,
        keep_sessions: int | None = None,
        init_timeout_s: float = 10.0,
        tool_deadline_s: float = 15.0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be 'a' or 'b', got {variant!r}")
        if ready_event not in ("session_started", "ready", None):
            raise ValueError(f"ready_event must be 'session_started', 'ready' or None, got {ready_event!r}")
        if ready_delay_ms < 0 or burst_chunk_ms <= 0 or audio_cap_bytes < 0 or max_messages <= 0:
            raise ValueError("ready_delay_ms, audio_cap_bytes must be >= 0; burst_chunk_ms, max_messages > 0")
        super().__init__(accepted_keys, keep_sessions)
        self.echo = echo
        self.variant: Variant = variant
        self.ready_event = ready_event
        self.ready_delay_ms = ready_delay_ms
        self.scenario = scenario
        self.vad = vad if vad is not None else VadConfig()
        self.burst_chunk_ms = burst_chunk_ms
        self.greeting_max_ms = greeting_max_ms
        self.audio_cap_bytes = audio_cap_bytes
        self.max_messages = max_messages
        self.init_timeout_s = init_timeout_s
        self.tool_deadline_s = tool_deadline_s
        #: Handshakes refused (401/404), with the reason; bounded.
        self.refused: collections.deque[str] = collections.deque(maxlen=max_messages)

    _path = PATH

    def speech_ms(self, text: str) -> int:
        return max(400, min(self.greeting_max_ms, 60 * len(text)))

    def _token_accepted(self, token: str | None) -> bool:
        if self.accepted_keys is None:
            return True
        return bool(token) and key_accepted(self.accepted_keys, token or "")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        from urllib.parse import urlsplit

        if urlsplit(request.path).path != PATH:
            self.refused.append(f"404 path {request.path!r}")
            return connection.respond(HTTPStatus.NOT_FOUND, f"Not Found: the AI endpoint is {PATH}\n")
        token = _bearer(request.headers)
        if not self._token_accepted(token):
            why = "no bearer token" if token is None else "bearer token not accepted"
            self.refused.append(f"401 {why}")
            log.info("handshake refused: %s", why)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, f"Unauthorized: {why}\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="ai"'
            return response
        return None

    def _new_session(self, ws: ServerConnection, index: int) -> GenericWsSession:
        token = _bearer(ws.request.headers) if ws.request is not None else None
        return GenericWsSession(self, ws, index, token)


def _bearer(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None without one)."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``voxbridge gateway-sim --protocol generic-ws`` (dest: listen, api_keys, scenario,
    variant, ready_event, ready_delay_ms, echo)."""
    add_server_arguments(parser, listen_help="address to serve ws://HOST:PORT/ws on (default 127.0.0.1:8765)",
                         key_help="an accepted bearer token (repeatable); without it no token is required",
                         key_metavar="TOKEN")
    parser.add_argument("--scenario", metavar="FILE", help="scenario file (JSON or YAML) run in every session")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="a",
                        help="message names: a = audio_delta/transcript/user_speech_started/response_complete, "
                             "b = audio_chunk/transcription/speech_started/audio_done (default a)")
    parser.add_argument("--ready-event", choices=["session_started", "ready", "none"], default="session_started",
                        help="what the server says when it takes audio (default session_started)")
    parser.add_argument("--ready-delay-ms", type=int, default=0, metavar="MS",
                        help="delay before the ready announcement (default 0)")
    parser.add_argument("--no-echo", dest="echo", action="store_false", help="do not echo the caller's speech")


async def run_from_args(args: argparse.Namespace) -> None:
    """Serve until cancelled, with the options declared by :func:`add_arguments`."""
    host, port = args.listen
    scenario = load_scenario(args.scenario) if args.scenario else None
    ready_event = None if args.ready_event == "none" else args.ready_event
    sim = GenericWsSim(accepted_keys=api_keys(args), echo=args.echo,
                       variant=args.variant, ready_event=ready_event, ready_delay_ms=args.ready_delay_ms,
                       scenario=scenario, keep_sessions=32)
    await serve_until_cancelled(sim, host, port, log,
                                "generic-ws sim listening on %s (tokens: %s, variant %s, ready: %s, scenario: %s)",
                                f"{len(args.api_keys)} configured" if args.api_keys else "not required",
                                args.variant, args.ready_event, args.scenario or "none (echo agent)",
                                stopped="generic-ws sim stopped")


def _main() -> None:
    main("python -m bridge.devtools.sim_generic_ws", "generic AI WebSocket (seed 001) reference server",
         add_arguments, run_from_args)


if __name__ == "__main__":
    _main()
