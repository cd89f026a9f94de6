"""Reference implementation of the AillomVox gateway protocol: a scriptable simulator.

The real gateway (``wss://vox.aillom.com/ws``) is a paid service that cannot be reached from CI, so
this module is "the stranger" the bridge is tested against, and also the bridge's zero-config demo
upstream. It is written from the AillomVox protocol documents (published with the gateway, not part
of this repository; the protocol as implemented is spelled out below), never from the bridge's code,
and it imports nothing from the bridge.

Protocol as implemented
=======================

Connection
    WebSocket upgrade on path ``/ws``; any other path is refused with HTTP 404 before the upgrade.
    An optional ``?apiKey=`` query parameter is accepted and recorded (``SimSession.query_api_key``)
    but is NOT used for authentication: the documents say authentication is in-band.
    permessage-deflate is not negotiated (audio does not compress and bursts stay representative).

Config (client -> server, MUST be the first message)
    A JSON text frame ``{"type": "config", ...}``:

    ==================  ========  =====================================================================
    field               required  rule
    ==================  ========  =====================================================================
    ``apikey``          yes       non-empty string
    ``provider``        yes       one of aillomvox, openai, gemini, aws, ultravox, grok, qwen
    ``sample_rate``     yes       JSON integer, one of 8000, 16000, 24000
    ``system_prompt``   yes       string (may be empty)
    ``voice``           no        string
    ``language``        no        string
    ``first_message``   no        string, spoken as the greeting
    ``farewell_message`` no       string, spoken 15 s before ``max_duration``
    ``max_duration``    no        JSON integer, 60..3600 seconds, default 300
    ``tools``           no        list of ``{"name": str, "description": str, "parameters": object}``
                                  (exactly those keys; names non-empty and unique)
    ==================  ========  =====================================================================

    Any other key, at the top level or inside a tool, is rejected. ``null`` is not a string.
    Failures, all answered with ``{"type": "error", "message": ...}`` then a close frame:

    * binary frame before the config              -> close 1008
    * text that is not JSON / not an object / not ``type: "config"`` -> close 1008
    * schema problems (every problem listed, ``; `` separated, each naming the field; values of
      ``apikey`` are never echoed)               -> close 1008, message ``invalid config: ...``
    * key not in ``accepted_keys``                 -> message ``unauthorized``, close 1008
    * no config within ``config_timeout_s``        -> close 1008

    Schema validation runs before the key check. Close reasons are truncated to the 123-byte limit
    of RFC 6455; the error message carries the full text.

Settle
    The documents mention "~500 ms stabilization" after the config and define no ready event. Caller
    audio arriving during the first ``settle_ms`` after the config is recorded but not fed to the
    VAD (the "AI" does not hear it), and the greeting and scenario start after ``settle_ms``.
    Default 0 in-process (tests), 500 from the CLI (like the real service).

Audio (both directions)
    Raw binary frames of PCM s16le mono at ``sample_rate``, no JSON wrapper. A client frame of odd
    length cannot be a whole number of samples: it gets an error message and close **1007**
    (invalid frame payload data, RFC 6455 7.4.1 - the data is inconsistent with the message type;
    1003 would mean "binary not accepted at all", which is false). Empty frames are ignored.
    Every frame is recorded with its ``time.monotonic()`` arrival time, within a memory cap.
    Server audio is sent in bursts, back to back, much faster than real time (``burst_chunk_ms``
    chunks, default 200 ms), as real gateways do; the client must pace playback itself. The sim
    tracks ``speaking_until``: the monotonic time at which a client playing in real time would
    finish what has been sent.

Server -> client messages
    ``transcript {role, text, final}``, ``tool_call {call_id, name, args}``,
    ``playback_clear_buffer``, ``hangup``, ``error {message}``.

Client -> server messages (after the config)
    * ``{"type": "hangup"}`` -> the sim closes with 1000 ("client hangup").
    * ``{"type": "tool_result", "call_id": str, "result": str}`` -> must answer an outstanding
      ``tool_call`` exactly once. Unknown ``call_id``, a second result for the same call, a
      non-string ``result`` or a missing ``call_id`` are recorded in ``SimSession.violations``
      (no error frame is sent: on the real service an error frame ends calls, and a stray result
      does not). A call with no result within ``tool_deadline_s`` (15 s) is also a violation; a
      result arriving later is still stored.
    * anything else (unknown ``type``, missing ``type``, a second ``config``, non-JSON text,
      JSON that is not an object) -> ``{"type": "error", "message": ...}`` naming the problem, a
      violation is recorded, and the session **continues**.

Governance
    The clock starts when the config is accepted. At ``max_duration - 15 s`` the sim speaks the
    ``farewell_message`` (if any); at ``max_duration`` it sends
    ``{"type": "error", "message": "max_duration_reached"}`` and closes with 1008 (every
    error-and-close in this sim uses 1008, policy violation). ``max_duration_override_s`` and
    ``farewell_lead_s`` are **test-only** knobs that shorten the clock.

Server hangup
    ``{"type": "hangup"}`` is sent, the sim waits up to ``hangup_grace_s`` for the client to close
    the socket (the document says the client closes), then closes with 1000 itself.
    ``SimSession.closed_by`` tells which side sent the first close frame.

Default agent ("echo agent")
    * Greeting: with a ``first_message``, synthetic speech-like audio (harmonic chirps at ~0.3 FS,
      60 ms per character, 400 ms .. ``greeting_max_ms`` (2 s)) is sent as a burst, followed by
      ``{"type": "transcript", "role": "assistant", "text": <first_message>, "final": true}``.
    * Energy VAD on caller audio in 20 ms frames, timed by sample count (not wall clock, so bursty
      test clients get deterministic results; AudioSocket streams continuously, silence included):
      speech starts after >= 200 ms of consecutive frames with RMS above the threshold (default
      500, about -36 dBFS) and ends after >= 500 ms below it. At speech start a non-final user
      transcript is sent; if the sim is still speaking (``now < speaking_until``) it sends
      ``playback_clear_buffer`` (barge-in) and stops any burst in progress. At speech end it
      sends a final user transcript ``"(speech 1.20 s)"`` and, when ``echo`` is on, echoes the
      utterance (first to last voiced frame) back as a burst followed by an assistant transcript
      ``"(echo 1.20 s)"``. Utterances are capped at 30 s.
    * The sim never sends a tool call on its own; tests and scenarios do.

Scripting
    (a) In-process, for tests::

            async with GatewaySim(accepted_keys={"k"}) as sim:
                ... connect the bridge to sim.url ...
                session = await sim.next_session()
                await session.wait_message("hangup")
                result = await session.call_tool("lookup", {"id": 7})

    (b) Scenario files (JSON or YAML) for the CLI: either a list of steps or a mapping
        ``{"echo": bool (optional), "steps": [...]}``. Steps run once per session, in order,
        starting when the session is accepted (after the settle time). A step first waits for its
        trigger, then performs its action, then the next step starts::

            - after_ms: 2000                 # trigger: a delay after the previous step
              do: tool_call                  # send a tool_call and wait (<= 15 s) for the result
              name: end_call
              args: {}
            - on: speech_end                 # trigger: the next occurrence of an event
              do: clear                      # playback_clear_buffer
            - do: say                        # no trigger: right after the previous step
              text: "Let me check that."     # synthetic speech + assistant transcript
            - do: say
              tone_hz: 440                   # a pure tone instead of speech (no transcript)
              ms: 1000
            - do: transcript
              role: assistant
              text: "Still there?"
              final: true
            - do: error                      # close: false keeps the session open
              message: insufficient_balance
            - do: hangup

        Events for ``on``: ``speech_start``, ``speech_end``, ``barge_in``, ``tool_result``,
        ``greeting_done``. The n-th step waiting on an event fires on the n-th occurrence of that
        event in the session, immediately if it already happened (events are consumed in order,
        so none is lost to a race). With both ``on`` and ``after_ms`` the delay counts from the
        moment the step fires. (YAML 1.1 reads a bare ``on:`` key as ``true``; that is accepted.)
        ``tool_call`` also takes ``call_id`` (default: generated), ``wait`` (default true) and
        ``timeout_ms`` (default 15000). Unknown keys are rejected when the file is loaded.

Bench echo mode (opt-in, default off; ``GatewaySim(bench_echo=True)`` / ``--bench-echo``)
    For the load benchmark (``voxbridge bench``). No greeting, no VAD, no scenario, no audio
    recording: every binary frame from the client is returned at once. A frame that starts with
    the 4 bytes ``VXBM`` carries a 64-byte little-endian marker the sim stamps before echoing::

        0 magic "VXBM" | 4 u8 kind (1 caller frame, 2 burst frame) | 8 u32 caller | 12 u32 seq
        16 u32 first skipped seq | 20 u32 skipped count | 24 f64 caller send time
        32 f64 sim receive time | 40 f64 sim send time | 48 f64 clear sent at | 56 f64 tool RTT

    (the receive time is when the read that brought the frame reached the sim's process, before
    its WebSocket parser and coroutine: ``sim_common.ArrivalStamped``)

    (times are ``time.monotonic()``, the same clock in every process of one machine). Every
    ``bench_barge_every_s`` (first at a random offset) a session stops echoing, sends 200 ms of
    kind-2 frames as one burst, sends ``playback_clear_buffer`` 100 ms later and resumes: the next
    echoed frame carries when the clear was sent and which seqs were not echoed. Every
    ``bench_tool_every_s`` it sends a ``tool_call`` of ``bench_tool`` (args ``{}``) and reports the
    round trip (tool_call sent to tool_result received) in the next echoed frame.

CLI
    ``add_arguments(parser)`` and ``run_gateway_sim(...)`` (see below), wired as ``voxbridge
    gateway-sim`` by :mod:`bridge.cli`; ``python -m bridge.devtools.gateway_sim --listen
    127.0.0.1:8765`` also works stand-alone (the benchmark starts it that way). Logs go to the
    ``voxbridge.gateway_sim`` logger, one line per session start and end; API keys are never
    logged.

Memory
    Per session, recorded caller audio keeps the last ``audio_cap_bytes`` (default 8 MiB);
    ``audio_chunks``, ``messages`` and ``sent_messages`` keep the last ``max_messages`` entries;
    ``GatewaySim.sessions`` keeps the last ``keep_sessions`` sessions (unbounded by default, 32
    from the CLI). Every task a session starts is cancelled and awaited when it closes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import os
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from .sim_common import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    ScriptedWsSession,
    SessionClosed,
    WsSimServer,
    add_server_arguments,
    api_keys,
    chunk_bytes,
    serve_until_cancelled,
)
from .sim_common import listen_address as _listen_address  # noqa: F401 - the name the other simulators used

__all__ = [
    "PROVIDERS",
    "SAMPLE_RATES",
    "GatewaySim",
    "Scenario",
    "ScenarioError",
    "ScenarioStep",
    "SessionClosed",
    "SimSession",
    "VadConfig",
    "add_arguments",
    "load_scenario",
    "parse_scenario",
    "run_gateway_sim",
    "silence",
    "speechlike",
    "tone",
    "validate_config",
]

log = logging.getLogger("voxbridge.gateway_sim")

PATH = "/ws"
PROVIDERS = frozenset({"aillomvox", "openai", "gemini", "aws", "ultravox", "grok", "qwen"})
SAMPLE_RATES = (8000, 16000, 24000)
MAX_DURATION_RANGE = (60, 3600)
MAX_DURATION_DEFAULT = 300
REQUIRED_FIELDS = ("apikey", "provider", "sample_rate", "system_prompt")
OPTIONAL_STRING_FIELDS = ("voice", "language", "first_message", "farewell_message")
CONFIG_FIELDS = frozenset({"type", *REQUIRED_FIELDS, *OPTIONAL_STRING_FIELDS, "max_duration", "tools"})
TOOL_FIELDS = ("name", "description", "parameters")

CLOSE_INVALID_PAYLOAD = 1007

# Bench echo marker (see "Bench echo mode" above).
_BENCH_MAGIC = b"VXBM"
_BENCH_MARK = struct.Struct("<4sB3xIIIIddddd")
_BENCH_U32 = struct.Struct("<I")
_BENCH_2U32 = struct.Struct("<II")
_BENCH_3F64 = struct.Struct("<ddd")
_BENCH_F64 = struct.Struct("<d")

SCENARIO_EVENTS = frozenset({"speech_start", "speech_end", "barge_in", "tool_result", "greeting_done"})


# --------------------------------------------------------------------------------------------
# Audio helpers
# --------------------------------------------------------------------------------------------


def _check_audio_args(ms: float, sample_rate: int, amplitude: float) -> None:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if ms < 0:
        raise ValueError(f"ms must be >= 0, got {ms}")
    if not 0.0 <= amplitude <= 1.0:
        raise ValueError(f"amplitude must be within 0..1 (fraction of full scale), got {amplitude}")


def _to_s16le(x: np.ndarray) -> bytes:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2").tobytes()


def tone(freq_hz: float, ms: float, sample_rate: int, amplitude: float = 0.3) -> bytes:
    """A pure sine tone as PCM s16le mono: ``round(sample_rate * ms / 1000)`` samples.

    ``amplitude`` is the peak as a fraction of full scale (0.3 FS has an RMS of about 6950).
    """
    _check_audio_args(ms, sample_rate, amplitude)
    n = round(sample_rate * ms / 1000)
    t = np.arange(n, dtype=np.float64) / sample_rate
    return _to_s16le(amplitude * np.sin(2.0 * math.pi * freq_hz * t))


def silence(ms: float, sample_rate: int) -> bytes:
    """Digital silence as PCM s16le mono: ``round(sample_rate * ms / 1000)`` samples."""
    _check_audio_args(ms, sample_rate, 0.0)
    return bytes(2 * round(sample_rate * ms / 1000))


def speechlike(text: str, ms: float, sample_rate: int, amplitude: float = 0.3) -> bytes:
    """Deterministic speech-like audio: one harmonic chirp "syllable" per 200 ms.

    Each syllable is 160 ms voiced (a fundamental between 120 and 280 Hz picked from the text,
    gliding by +-7.5 %, with two harmonics and 15 ms raised-cosine fades) and 40 ms of silence.
    The peak is normalised to ``amplitude`` of full scale.
    """
    _check_audio_args(ms, sample_rate, amplitude)
    n = round(sample_rate * ms / 1000)
    out = np.zeros(n, dtype=np.float64)
    seed = text or "a"
    syllable = int(0.200 * sample_rate)
    voiced_s = 0.160
    voiced = int(voiced_s * sample_rate)
    fade = max(1, int(0.015 * sample_rate))
    for i, start in enumerate(range(0, n, syllable)):
        f0 = 120.0 + (ord(seed[i % len(seed)]) * 37) % 160
        seg = min(voiced, n - start)
        t = np.arange(seg, dtype=np.float64) / sample_rate
        # Instantaneous frequency f0 * (1 + 0.15 * (t / voiced_s - 0.5)), integrated to a phase.
        phase = 2.0 * math.pi * f0 * (t + 0.15 * (t * t / (2.0 * voiced_s) - 0.5 * t))
        wave = np.sin(phase) + 0.5 * np.sin(2.0 * phase) + 0.25 * np.sin(3.0 * phase)
        env = np.ones(seg)
        k = min(fade, seg // 2)
        if k:
            ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, k))
            env[:k] = ramp
            env[seg - k :] = ramp[::-1]
        out[start : start + seg] = wave * env
    peak = float(np.max(np.abs(out))) if n else 0.0
    if peak > 0.0:
        out *= amplitude / peak
    return _to_s16le(out)


def _rms(frame: bytes) -> float:
    x = np.frombuffer(frame, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def _duration_s(nbytes: int, sample_rate: int) -> float:
    return nbytes / 2 / sample_rate


# --------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(cfg: Mapping[str, Any]) -> list[str]:
    """Return the problems with a config message (empty when valid), each naming its field.

    The value of ``apikey`` never appears in a problem text.
    """
    problems: list[str] = []
    unknown = sorted(k for k in cfg if k not in CONFIG_FIELDS)
    for key in unknown:
        problems.append(f"unknown field {key!r}")
    if cfg.get("type") != "config":
        problems.append("type must be 'config'")
    for key in REQUIRED_FIELDS:
        if key not in cfg:
            problems.append(f"missing required field {key!r}")
    if "apikey" in cfg and not (isinstance(cfg["apikey"], str) and cfg["apikey"]):
        problems.append("apikey must be a non-empty string")
    if "provider" in cfg and cfg["provider"] not in PROVIDERS:
        problems.append(
            f"provider must be one of {', '.join(sorted(PROVIDERS))} (got {cfg['provider']!r})"
        )
    if "sample_rate" in cfg:
        sr = cfg["sample_rate"]
        if not (_is_int(sr) and sr in SAMPLE_RATES):
            problems.append(
                f"sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))} (got {sr!r})"
            )
    if "system_prompt" in cfg and not isinstance(cfg["system_prompt"], str):
        problems.append("system_prompt must be a string")
    for key in OPTIONAL_STRING_FIELDS:
        if key in cfg and not isinstance(cfg[key], str):
            problems.append(f"{key} must be a string")
    if "max_duration" in cfg:
        md = cfg["max_duration"]
        lo, hi = MAX_DURATION_RANGE
        if not (_is_int(md) and lo <= md <= hi):
            problems.append(f"max_duration must be an integer from {lo} to {hi} seconds (got {md!r})")
    if "tools" in cfg:
        problems.extend(_validate_tools(cfg["tools"]))
    return problems


def _validate_tools(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        return ["tools must be a list"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            problems.append(f"{where} must be an object")
            continue
        for key in sorted(k for k in tool if k not in TOOL_FIELDS):
            problems.append(f"{where}: unknown field {key!r}")
        for key in TOOL_FIELDS:
            if key not in tool:
                problems.append(f"{where}: missing required field {key!r}")
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


def _redacted_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config for logs: no apikey, tools by name, long strings shortened."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in ("apikey", "type"):
            continue
        if key == "tools" and isinstance(value, list):
            value = [t.get("name") if isinstance(t, dict) else "?" for t in value]
        elif isinstance(value, str) and len(value) > 60:
            value = value[:57] + "..."
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# VAD
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VadConfig:
    """Energy VAD parameters. Times are audio time (sample count), not wall-clock time."""

    threshold_rms: float = 500.0
    frame_ms: int = 20
    min_speech_ms: int = 200
    min_silence_ms: int = 500
    max_utterance_ms: int = 30_000


class _Vad:
    """Frame-based energy VAD. ``feed`` returns ``("speech_start", b"")`` / ``("speech_end", pcm)``."""

    def __init__(self, cfg: VadConfig, sample_rate: int) -> None:
        self._cfg = cfg
        self._frame_bytes = 2 * (sample_rate * cfg.frame_ms // 1000)
        self._max_bytes = 2 * (sample_rate * cfg.max_utterance_ms // 1000)
        self._pending = bytearray()
        self._state = "idle"  # idle | candidate | speech
        self._utt = bytearray()
        self._voiced_ms = 0
        self._silence_ms = 0
        self._voiced_end = 0  # length of self._utt up to the end of the last voiced frame

    def feed(self, pcm: bytes) -> list[tuple[str, bytes]]:
        events: list[tuple[str, bytes]] = []
        self._pending += pcm
        fb = self._frame_bytes
        while len(self._pending) >= fb:
            frame = bytes(self._pending[:fb])
            del self._pending[:fb]
            self._frame(frame, _rms(frame) >= self._cfg.threshold_rms, events)
        return events

    def _frame(self, frame: bytes, voiced: bool, events: list[tuple[str, bytes]]) -> None:
        cfg = self._cfg
        if self._state == "idle":
            if voiced:
                self._state, self._utt, self._voiced_ms = "candidate", bytearray(frame), cfg.frame_ms
                self._voiced_end = len(self._utt)
                self._promote(events)
            return
        if self._state == "candidate":
            if not voiced:  # a start must be consecutive voiced frames
                self._state, self._utt = "idle", bytearray()
                return
            self._utt += frame
            self._voiced_end = len(self._utt)
            self._voiced_ms += cfg.frame_ms
            self._promote(events)
            return
        # speech
        self._utt += frame
        if voiced:
            self._silence_ms = 0
            self._voiced_end = len(self._utt)
        else:
            self._silence_ms += cfg.frame_ms
        if self._silence_ms >= cfg.min_silence_ms or len(self._utt) >= self._max_bytes:
            events.append(("speech_end", bytes(self._utt[: self._voiced_end])))
            self._state, self._utt = "idle", bytearray()

    def _promote(self, events: list[tuple[str, bytes]]) -> None:
        if self._voiced_ms >= self._cfg.min_speech_ms:
            self._state, self._silence_ms = "speech", 0
            events.append(("speech_start", b""))


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


class ScenarioError(ValueError):
    """A scenario file or structure is invalid."""


_STEP_PARAMS: dict[str, dict[str, tuple[type, ...]]] = {
    "say": {"text": (str,), "tone_hz": (int, float), "ms": (int,)},
    "tool_call": {
        "name": (str,), "args": (dict,), "call_id": (str,), "wait": (bool,), "timeout_ms": (int,)
    },
    "clear": {},
    "hangup": {},
    "error": {"message": (str,), "close": (bool,)},
    "transcript": {"role": (str,), "text": (str,), "final": (bool,)},
}
_STEP_REQUIRED = {"tool_call": ("name",), "error": ("message",), "transcript": ("role", "text")}


@dataclass(frozen=True)
class ScenarioStep:
    """One scenario step: wait for ``on`` (an event) and/or ``after_ms``, then perform ``do``."""

    do: str
    on: str | None = None
    after_ms: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    steps: tuple[ScenarioStep, ...]
    echo: bool | None = None  # overrides GatewaySim(echo=...) when set


def parse_scenario(data: Any) -> Scenario:
    """Build a :class:`Scenario` from parsed JSON/YAML, raising :class:`ScenarioError`."""
    echo: bool | None = None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"steps", "echo"})
        if unknown:
            raise ScenarioError(f"scenario: unknown top-level field(s) {', '.join(map(repr, unknown))}")
        if "echo" in data:
            if not isinstance(data["echo"], bool):
                raise ScenarioError("scenario: echo must be true or false")
            echo = data["echo"]
        data = data.get("steps", [])
    if not isinstance(data, list):
        raise ScenarioError("scenario must be a list of steps or a mapping with 'steps'")
    return Scenario(tuple(_parse_step(i, raw) for i, raw in enumerate(data)), echo)


def _parse_step(i: int, raw: Any) -> ScenarioStep:
    where = f"scenario step {i}"
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a mapping")
    if True in raw and "on" not in raw:  # YAML 1.1 reads a bare `on:` key as the boolean true
        raw = {("on" if k is True else k): v for k, v in raw.items()}
    action = raw.get("do")
    if action not in _STEP_PARAMS:
        raise ScenarioError(f"{where}: 'do' must be one of {', '.join(sorted(_STEP_PARAMS))} (got {action!r})")
    allowed = _STEP_PARAMS[action]
    unknown = sorted(set(raw) - {"do", "on", "after_ms"} - set(allowed))
    if unknown:
        raise ScenarioError(f"{where} ({action}): unknown field(s) {', '.join(map(repr, unknown))}")
    on = raw.get("on")
    if on is not None and on not in SCENARIO_EVENTS:
        raise ScenarioError(f"{where}: 'on' must be one of {', '.join(sorted(SCENARIO_EVENTS))} (got {on!r})")
    after_ms = raw.get("after_ms", 0)
    if not _is_int(after_ms) or after_ms < 0:
        raise ScenarioError(f"{where}: after_ms must be a non-negative integer")
    params = {k: v for k, v in raw.items() if k in allowed}
    for key, value in params.items():
        if (isinstance(value, bool) and bool not in allowed[key]) or not isinstance(value, allowed[key]):
            raise ScenarioError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    for key in _STEP_REQUIRED.get(action, ()):
        if key not in params:
            raise ScenarioError(f"{where} ({action}): missing required field {key!r}")
    if action == "say" and "text" not in params and "tone_hz" not in params:
        raise ScenarioError(f"{where} (say): needs 'text' or 'tone_hz'")
    if action == "transcript" and params["role"] not in ("user", "assistant"):
        raise ScenarioError(f"{where} (transcript): role must be 'user' or 'assistant'")
    for key in ("ms", "timeout_ms"):
        if key in params and params[key] <= 0:
            raise ScenarioError(f"{where}: {key} must be positive")
    return ScenarioStep(do=action, on=on, after_ms=after_ms, params=params)


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Load a scenario from a ``.json`` file or a YAML file (any other extension)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ScenarioError(f"{path}: cannot parse scenario: {exc}") from exc
    try:
        return parse_scenario(data)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


class SimSession(ScriptedWsSession):
    """One client connection, from the WebSocket handshake to the close.

    Recorded state (read it freely in tests): ``index``, ``query_api_key``, ``connected_at``,
    ``config`` (the received config object, or None), ``config_received_at``, ``accepted``,
    ``reject_reason``, ``messages`` (every JSON object received, config included),
    ``audio`` (caller audio, last ``audio_cap_bytes``), ``audio_bytes_total``, ``audio_chunks``
    ((monotonic arrival time, bytes) pairs), ``tool_results`` (call_id -> result),
    ``violations``, ``sent_messages``, ``sent_audio_bytes``, ``speaking_until``, ``barge_ins``,
    ``utterances`` (durations in seconds), ``closed`` (Event), ``close_code``, ``close_reason``,
    ``closed_by`` ("server" / "client" / None if the TCP connection just dropped).
    """

    _log = log
    _task_prefix = "gateway-sim"

    def __init__(self, sim: GatewaySim, ws: ServerConnection, index: int) -> None:
        super().__init__(ws, index, sim.max_messages)
        self._sim = sim
        query = parse_qs(urlsplit(ws.request.path).query) if ws.request else {}
        self.query_api_key: str | None = query.get("apiKey", [None])[0]
        self.config: dict[str, Any] | None = None
        self.config_received_at: float | None = None
        self.reject_reason: str | None = None
        self.audio_chunks: collections.deque[tuple[float, bytes]] = collections.deque(
            maxlen=sim.max_messages
        )
        self._echo = sim.echo if sim.scenario is None or sim.scenario.echo is None else sim.scenario.echo
        self._vad: _Vad | None = None

    # ---- properties --------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        if self.config is None or not self.accepted:
            raise RuntimeError("the session has no accepted config yet")
        return int(self.config["sample_rate"])

    @property
    def input_rate(self) -> int:
        """Rate of the caller audio in :attr:`audio` (the common simulator interface's name)."""
        return self.sample_rate

    @property
    def output_rate(self) -> int:
        """Rate of the PCM :meth:`send_audio` takes (the common simulator interface's name)."""
        return self.sample_rate

    # ---- scripting API -----------------------------------------------------------------------

    async def send_json(self, obj: Mapping[str, Any]) -> None:
        """Send one JSON text frame (anything: tests may send what a real gateway would not)."""
        await self._send(json.dumps(obj, separators=(",", ":")))
        self.sent_messages.append(dict(obj))

    async def send_audio(self, pcm: bytes, chunk_ms: int = 100) -> None:
        """Send PCM s16le as a burst of ``chunk_ms`` binary frames, back to back.

        Bursts are serialised with the sim's own speech. The burst stops early when the playback
        buffer is cleared (barge-in or :meth:`clear`) while it is being sent.
        """
        sr = self.sample_rate
        chunk = chunk_bytes(pcm, sr, chunk_ms)
        async with self._speak_lock:
            gen = self._clear_gen
            for off in range(0, len(pcm), chunk):
                if self._clear_gen != gen:
                    break
                piece = pcm[off : off + chunk]
                await self._send(piece)
                self.sent_audio_bytes += len(piece)
                self.speaking_until = max(time.monotonic(), self.speaking_until) + _duration_s(
                    len(piece), sr
                )

    async def say(
        self, text: str | None = None, *, tone_hz: float | None = None, ms: int | None = None
    ) -> None:
        """Speak: a tone (``tone_hz`` for ``ms``, default 1000) or speech-like audio for ``text``
        (duration from its length unless ``ms``), then an assistant transcript if ``text``."""
        if text is None and tone_hz is None:
            raise ValueError("say() needs text or tone_hz")
        sr = self.sample_rate
        if tone_hz is not None:
            pcm = tone(tone_hz, ms if ms is not None else 1000, sr)
        else:
            assert text is not None
            pcm = speechlike(text, ms if ms is not None else self._sim._speech_ms(text), sr)
        await self.send_audio(pcm, chunk_ms=self._sim.burst_chunk_ms)
        if text is not None:
            await self.transcript("assistant", text, final=True)

    async def transcript(self, role: str, text: str, final: bool = True) -> None:
        await self.send_json({"type": "transcript", "role": role, "text": text, "final": final})

    async def clear(self) -> None:
        """Send ``playback_clear_buffer`` and stop any burst in progress."""
        self._clear_gen += 1
        self.speaking_until = time.monotonic()
        await self.send_json({"type": "playback_clear_buffer"})

    async def call_tool(
        self, name: str, args: Mapping[str, Any], call_id: str | None = None, timeout: float = 20
    ) -> str:
        """Send a ``tool_call`` and return the matching ``tool_result``'s ``result``.

        Raises ``TimeoutError`` after ``timeout`` s (the call stays outstanding: a late result is
        still stored) and :class:`SessionClosed` if the session ends first.
        """
        async def send(cid: str) -> None:
            await self.send_json({"type": "tool_call", "call_id": cid, "name": name, "args": dict(args)})

        return await self._call(name, call_id, send, timeout, self._sim.tool_deadline_s)

    async def hangup(self) -> None:
        """Server-initiated end: send ``hangup``, let the client close for ``hangup_grace_s``,
        then close with 1000 ourselves."""
        await self.send_json({"type": "hangup"})
        try:
            await asyncio.wait_for(self._ws.wait_closed(), self._sim.hangup_grace_s)
        except TimeoutError:
            await self._close(CLOSE_NORMAL, "hangup")

    async def error(self, message: str, close: bool = True, code: int = CLOSE_POLICY) -> None:
        """Send ``{"type": "error", "message": message}``; by default then close (1008)."""
        await self.send_json({"type": "error", "message": message})
        if close:
            await self._close(code, message)

    # ---- internals ---------------------------------------------------------------------------

    def _accepted_setup(self) -> dict[str, Any] | None:
        return self.config

    async def _reject(self, message: str, code: int = CLOSE_POLICY, *, violation: bool = True) -> None:
        """Send an error and close. ``violation``: the client broke the protocol (not e.g. a bad key)."""
        self.reject_reason = message
        if violation:
            self.violations.append(message)
        try:
            await self.send_json({"type": "error", "message": message})
        except SessionClosed:
            pass
        await self._close(code, message)

    async def _run(self) -> None:
        """The connection handler: config, then the message loop until the socket closes."""
        ws = self._ws
        try:
            first = await asyncio.wait_for(ws.recv(), self._sim.config_timeout_s)
        except TimeoutError:
            await self._reject(f"no config received within {self._sim.config_timeout_s:g} s", violation=False)
            return
        except ConnectionClosed:
            return
        if not await self._handle_config(first):
            return
        if self._sim.bench_echo:
            await self._bench_run()
            return
        log.info("session %d start: %s", self.index, json.dumps(_redacted_config(self.config or {})))
        self._vad = _Vad(self._sim.vad, self.sample_rate)
        self._spawn(self._governance(), "governance")
        self._spawn(self._after_settle(), "settle")
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    if not await self._on_audio(message):
                        return
                else:
                    await self._on_text(message)
        except (ConnectionClosed, SessionClosed):
            pass  # closed by the client, or by one of our tasks while we were answering

    # ---- bench echo mode (opt-in; see the module docstring) ------------------------------------

    async def _bench_run(self) -> None:
        self._bench_hold = False
        self._bench_skip: list[int] = []  # [first seq, count] of frames not echoed during a barge-in
        self._bench_clear_at = 0.0
        self._bench_tool_rtt = 0.0
        sim = self._sim
        if sim.bench_barge_every_s > 0:
            self._spawn(self._bench_barge_loop(sim.bench_barge_every_s), "bench-barge")
        if sim.bench_tool_every_s > 0:
            self._spawn(self._bench_tool_loop(sim.bench_tool_every_s), "bench-tool")
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    self._bench_echo(message)
                else:
                    await self._on_text(message)
        except (ConnectionClosed, SessionClosed):
            pass

    def _bench_echo(self, data: bytes) -> None:
        # The receive time: when the read that brought it reached this process (ArrivalStamped).
        now = getattr(self._ws, "rx_at", 0.0) or time.monotonic()
        self.audio_bytes_total += len(data)
        marked = len(data) >= _BENCH_MARK.size and data.startswith(_BENCH_MAGIC)
        if self._bench_hold:
            if marked:
                seq = _BENCH_U32.unpack_from(data, 12)[0]
                if self._bench_skip:
                    self._bench_skip[1] += 1
                else:
                    self._bench_skip = [seq, 1]
            return
        if marked:
            buf = bytearray(data)
            if self._bench_skip:
                _BENCH_2U32.pack_into(buf, 16, *self._bench_skip)
                self._bench_skip = []
            _BENCH_3F64.pack_into(buf, 48 - 16, now, 0.0, self._bench_clear_at)
            _BENCH_F64.pack_into(buf, 56, self._bench_tool_rtt)
            self._bench_clear_at = self._bench_tool_rtt = 0.0
            _BENCH_F64.pack_into(buf, 40, time.monotonic())
            data = bytes(buf)
        self._bench_send(data)

    def _bench_send(self, data: bytes | bytearray) -> None:
        """Write one binary frame now, without a task switch (ordered with awaited sends, which
        also write synchronously); fall back to an awaited send under back-pressure."""
        ws = self._ws
        transport = ws.transport
        if (ws.protocol.state is State.OPEN and ws.send_in_progress is None
                and transport.get_write_buffer_size() < 256 * 1024):
            ws.protocol.send_binary(data)
            ws.send_data()
            self.sent_audio_bytes += len(data)
        else:
            self._spawn(self._send(bytes(data)), "bench-send")

    async def _bench_barge_loop(self, every: float) -> None:
        import random

        await asyncio.sleep(random.uniform(0.5, every))
        frame = 2 * self.sample_rate * 20 // 1000
        one = bytearray(frame)
        _BENCH_MARK.pack_into(one, 0, _BENCH_MAGIC, 2, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
        burst = bytes(one) * 10  # 200 ms of "AI speech", sent at once like a real gateway
        while True:
            self._bench_hold = True
            self._bench_send(burst)
            await asyncio.sleep(0.1)
            clear_at = time.monotonic()
            self._clear_gen += 1
            await self._send(json.dumps({"type": "playback_clear_buffer"}))
            self._bench_clear_at = clear_at
            self.barge_ins += 1
            self._bench_hold = False
            await asyncio.sleep(every)

    async def _bench_tool_loop(self, every: float) -> None:
        import random

        await asyncio.sleep(random.uniform(0.5, every))
        while True:
            t0 = time.monotonic()
            try:
                await self.call_tool(self._sim.bench_tool, {}, timeout=15)
            except TimeoutError:
                log.warning("session %d: bench tool call got no result within 15 s", self.index)
            else:
                self._bench_tool_rtt = time.monotonic() - t0
            await asyncio.sleep(every)

    async def _handle_config(self, first: str | bytes) -> bool:
        if isinstance(first, bytes):
            await self._reject("binary frame before config: the first message must be a JSON config object")
            return False
        try:
            cfg = json.loads(first)
        except ValueError:
            await self._reject("first message is not valid JSON: it must be a JSON config object")
            return False
        if not isinstance(cfg, dict):
            await self._reject(f"first message must be a JSON object, got {type(cfg).__name__}")
            return False
        self._record(cfg)
        if cfg.get("type") != "config":
            await self._reject(f"first message must have type 'config', got type {cfg.get('type')!r}")
            return False
        self.config = cfg
        self.config_received_at = time.monotonic()
        problems = validate_config(cfg)
        if problems:
            await self._reject("invalid config: " + "; ".join(problems))
            log.info("session %d rejected: invalid config (%s)", self.index, "; ".join(problems))
            return False
        if not self._sim._key_accepted(cfg["apikey"]):
            await self._reject("unauthorized", violation=False)
            log.info("session %d rejected: unauthorized", self.index)
            return False
        self.accepted = True
        self._notify()
        return True

    async def _after_settle(self) -> None:
        assert self.config_received_at is not None
        delay = self.config_received_at + self._sim.settle_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._sim.scenario is not None and self._sim.scenario.steps:
            self._spawn(self._run_scenario(self._sim.scenario), "scenario")
        first_message = (self.config or {}).get("first_message")
        if first_message:
            await self.say(first_message)
        self._emit("greeting_done")

    async def _governance(self) -> None:
        assert self.config is not None and self.config_received_at is not None
        limit = self._sim.max_duration_override_s
        if limit is None:
            limit = float(self.config.get("max_duration", MAX_DURATION_DEFAULT))
        start = self.config_received_at
        farewell = self.config.get("farewell_message")
        if farewell:
            await asyncio.sleep(max(0.0, start + limit - self._sim.farewell_lead_s - time.monotonic()))
            self._spawn(self.say(farewell), "farewell")
        await asyncio.sleep(max(0.0, start + limit - time.monotonic()))
        log.info("session %d: max_duration reached (%g s)", self.index, limit)
        await self.error("max_duration_reached", close=True)

    async def _on_audio(self, data: bytes) -> bool:
        now = time.monotonic()
        if len(data) % 2:
            await self._reject(
                f"binary audio frame has odd length {len(data)}: PCM s16le frames must hold "
                "whole 2-byte samples",
                CLOSE_INVALID_PAYLOAD,
            )
            return False
        if not data:
            return True
        self._keep_audio(data, self._sim.audio_cap_bytes)
        self.audio_chunks.append((now, data))
        self._notify()
        assert self.config_received_at is not None and self._vad is not None
        if now < self.config_received_at + self._sim.settle_ms / 1000:
            return True  # the provider is still settling: it does not hear this
        for event, utterance in self._vad.feed(data):
            if event == "speech_start":
                await self._on_speech_start()
            else:
                await self._on_speech_end(utterance)
        return True

    async def _on_speech_start(self) -> None:
        self._emit("speech_start")
        if self.is_speaking:
            self.barge_ins += 1
            await self.clear()
            self._emit("barge_in")
        await self.transcript("user", "...", final=False)

    async def _on_speech_end(self, utterance: bytes) -> None:
        seconds = _duration_s(len(utterance), self.sample_rate)
        self.utterances.append(seconds)
        self._emit("speech_end")
        await self.transcript("user", f"(speech {seconds:.2f} s)", final=True)
        if self._echo:
            self._spawn(self._echo_back(utterance, seconds), "echo")

    async def _echo_back(self, utterance: bytes, seconds: float) -> None:
        await self.send_audio(utterance, chunk_ms=self._sim.burst_chunk_ms)
        await self.transcript("assistant", f"(echo {seconds:.2f} s)", final=True)

    async def _on_text(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            self._violation("text frame is not valid JSON")
            await self.send_json({"type": "error", "message": "invalid message: text frame is not valid JSON"})
            return
        if not isinstance(msg, dict):
            self._violation(f"message is not a JSON object ({type(msg).__name__})")
            await self.send_json({"type": "error", "message": "invalid message: must be a JSON object"})
            return
        self._record(msg)
        mtype = msg.get("type")
        if mtype == "hangup":
            log.info("session %d: client hangup", self.index)
            await self._close(CLOSE_NORMAL, "client hangup")
        elif mtype == "tool_result":
            self._on_tool_result(msg)
        elif mtype == "config":
            self._violation("config received twice")
            await self.send_json({"type": "error", "message": "invalid message: config already received"})
        elif mtype is None:
            self._violation("message without a 'type' field")
            await self.send_json({"type": "error", "message": "invalid message: missing 'type' field"})
        else:
            self._violation(f"unknown message type {mtype!r}")
            await self.send_json({"type": "error", "message": f"unknown message type {mtype!r}"})

    def _on_tool_result(self, msg: Mapping[str, Any]) -> None:
        call_id = msg.get("call_id")
        result = msg.get("result")
        if not isinstance(call_id, str):
            self._violation(f"tool_result without a string call_id (got {call_id!r})")
            return
        if not isinstance(result, str):
            self._violation(
                f"tool_result for call_id {call_id!r}: result must be a string, got {type(result).__name__}"
            )
            return
        pending = self._take_call(call_id, f"duplicate tool_result for call_id {call_id!r}",
                                  f"tool_result for unknown call_id {call_id!r}")
        if pending is None:
            return
        self._answer_call(call_id, pending, result)
        self._emit("tool_result")

    async def _finish(self) -> None:
        """Called once the handler is done: cancel every task, record how the socket closed."""
        await self._end_connection()
        self._fail_pending_calls("tool_result")
        log.info(
            "session %d end: close %s by %s%s, %.1f s, caller audio %d B, sent audio %d B, violations %d",
            self.index,
            self.close_code,
            self.closed_by or "network",
            f" ({self.close_reason})" if self.close_reason else "",
            time.monotonic() - self.connected_at,
            self.audio_bytes_total,
            self.sent_audio_bytes,
            len(self.violations),
        )
        self._mark_closed()


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class GatewaySim(WsSimServer[SimSession]):
    """The gateway: a WebSocket server on ``/ws`` creating one :class:`SimSession` per connection.

    ``accepted_keys=None`` accepts any non-empty ``apikey``. ``max_duration_override_s`` and
    ``farewell_lead_s`` are test-only knobs for the governance clock.
    """

    def __init__(
        self,
        *,
        accepted_keys: Iterable[str] | None = None,
        settle_ms: int = 0,
        echo: bool = True,
        scenario: Scenario | None = None,
        vad: VadConfig = VadConfig(),
        burst_chunk_ms: int = 200,
        greeting_max_ms: int = 2000,
        audio_cap_bytes: int = 8 * 1024 * 1024,
        max_messages: int = 10_000,
        keep_sessions: int | None = None,
        config_timeout_s: float = 10.0,
        tool_deadline_s: float = 15.0,
        hangup_grace_s: float = 1.0,
        farewell_lead_s: float = 15.0,
        max_duration_override_s: float | None = None,
        bench_echo: bool = False,
        bench_barge_every_s: float = 0.0,
        bench_tool_every_s: float = 0.0,
        bench_tool: str = "bench_noop",
    ) -> None:
        if settle_ms < 0 or burst_chunk_ms <= 0 or audio_cap_bytes < 0 or max_messages <= 0:
            raise ValueError("settle_ms, audio_cap_bytes must be >= 0; burst_chunk_ms, max_messages > 0")
        super().__init__(accepted_keys, keep_sessions)
        self.settle_ms = settle_ms
        self.echo = echo
        self.scenario = scenario
        self.vad = vad
        self.burst_chunk_ms = burst_chunk_ms
        self.greeting_max_ms = greeting_max_ms
        self.audio_cap_bytes = audio_cap_bytes
        self.max_messages = max_messages
        self.config_timeout_s = config_timeout_s
        self.tool_deadline_s = tool_deadline_s
        self.hangup_grace_s = hangup_grace_s
        self.farewell_lead_s = farewell_lead_s
        self.max_duration_override_s = max_duration_override_s
        self.bench_echo = bench_echo
        self.bench_barge_every_s = bench_barge_every_s
        self.bench_tool_every_s = bench_tool_every_s
        self.bench_tool = bench_tool

    _path = PATH

    def _speech_ms(self, text: str) -> int:
        return max(400, min(self.greeting_max_ms, 60 * len(text)))

    @staticmethod
    def _process_request(connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"Not Found: the gateway endpoint is {PATH}\n")
        return None

    def _new_session(self, ws: ServerConnection, index: int) -> SimSession:
        return SimSession(self, ws, index)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for the gateway simulator command (dest: listen, api_keys, scenario, settle_ms)."""
    add_server_arguments(
        parser, listen_help="address to serve ws://HOST:PORT/ws on (default 127.0.0.1:8765)",
        key_help="an accepted apikey (repeatable); without it any non-empty key is accepted",
    )
    parser.add_argument("--scenario", metavar="FILE", help="scenario file (JSON or YAML) run in every session")
    parser.add_argument(
        "--settle-ms", type=int, default=500, metavar="MS",
        help="after the config, caller audio is ignored for this long (default 500, like the real gateway)",
    )
    bench = parser.add_argument_group("bench echo mode (for voxbridge bench; off by default)")
    bench.add_argument("--bench-echo", action="store_true",
                       help="return every audio frame at once, stamping VXBM markers (no VAD, greeting or scenario)")
    bench.add_argument("--bench-barge-every", type=float, default=0.0, metavar="S",
                       help="with --bench-echo: a 200 ms burst then playback_clear_buffer every S seconds per session")
    bench.add_argument("--bench-tool-every", type=float, default=0.0, metavar="S",
                       help="with --bench-echo: a tool_call every S seconds per session")
    bench.add_argument("--bench-tool", default="bench_noop", metavar="NAME", help="the tool --bench-tool-every calls")


async def run_gateway_sim(
    host: str, port: int, *, api_keys: set[str] | None, scenario_path: str | None, settle_ms: int,
    **bench: Any,
) -> None:
    """Serve the simulator until cancelled. ``bench``: the ``bench_*`` options of :class:`GatewaySim`."""
    scenario = load_scenario(scenario_path) if scenario_path else None
    sim = GatewaySim(accepted_keys=api_keys, scenario=scenario, settle_ms=settle_ms, keep_sessions=32, **bench)
    await serve_until_cancelled(
        sim, host, port, log, "gateway sim listening on %s (api keys: %s, scenario: %s, settle %d ms)",
        f"{len(api_keys)} configured" if api_keys else "any non-empty key",
        f"{scenario_path} ({len(scenario.steps)} steps)" if scenario else "none (echo agent)",
        settle_ms, stopped="gateway sim stopped",
    )


async def run_from_args(args: argparse.Namespace) -> None:
    """Run with the options declared by :func:`add_arguments`."""
    host, port = args.listen
    await run_gateway_sim(
        host, port, api_keys=api_keys(args),
        scenario_path=args.scenario, settle_ms=args.settle_ms, **bench_options(args),
    )


def bench_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``bench_*`` keyword arguments of :class:`GatewaySim` from parsed options."""
    return {
        "bench_echo": getattr(args, "bench_echo", False),
        "bench_barge_every_s": getattr(args, "bench_barge_every", 0.0),
        "bench_tool_every_s": getattr(args, "bench_tool_every", 0.0),
        "bench_tool": getattr(args, "bench_tool", "bench_noop"),
    }


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bridge.devtools.gateway_sim",
                                     description="AillomVox gateway simulator")
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.bench_echo else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.bench_echo and os.environ.get("VOXBRIDGE_NO_UVLOOP") is None:
            try:
                import uvloop
            except ImportError:
                pass
            else:
                uvloop.run(run_from_args(args))
                return
        asyncio.run(run_from_args(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    _main()
