"""Configuration: one YAML file plus ``VOXBRIDGE_*`` environment variables, validated by pydantic.

Every field has a default, so ``voxbridge serve`` runs with no file at all (one ``default``
profile, the embedded reference gateway). Validation errors name the key and the problem::

    profiles.sales.sample_rate: Input should be 8000, 16000 or 24000 (got 44100)

Which gateway
-------------
A config file must name its gateway: ``gateway.url`` (or ``VOXBRIDGE_GATEWAY_URL``, or
``serve --gateway-url``), or ``gateway.demo: true`` for the embedded reference gateway, an echo
demo. A file with neither is an error, so a production file that lost its URL cannot quietly
answer callers with the demo. No file at all (``voxbridge serve``) and ``Config()`` in code
still mean the demo.

Environment overrides
---------------------
Read with pydantic-settings, typed by the schema, over the YAML file:
``VOXBRIDGE_<KEY>`` sets a top-level key (``VOXBRIDGE_LOG_LEVEL=DEBUG``) and
``VOXBRIDGE_<SECTION>__<KEY>[__<KEY>…]`` any nested one (``VOXBRIDGE_AMI__PORT=5039``,
``VOXBRIDGE_PROFILES__SALES__VOICE=Eve``: mappings merge with the file's, key by key).
A value is read as the type of the key it sets: numbers and booleans are parsed, strings are
kept exactly as written (``VOXBRIDGE_OUTBOUND__CALLER_ID=+441632960000`` stays a string),
lists and mappings are JSON (``VOXBRIDGE_ALLOW__ORIGINATE='["\\+44\\d{10}"]'``), ``null`` is
None, and an empty variable counts as unset. Variable names are case-insensitive, so mapping
keys set from the environment (profile and tool names) arrive in lower case; a key that
matches one of the file's in another case lands on it. A variable that names no key
(``VOXBRIDGE_AMI__PROT``) is an error, like a typo in the file.
The common secrets and endpoints also have short names:

===============================  ===========================
``VOXBRIDGE_GATEWAY_API_KEY``     ``gateway.api_key``
``VOXBRIDGE_GATEWAY_URL``         ``gateway.url``
``VOXBRIDGE_AMI_SECRET``          ``ami.secret``
``VOXBRIDGE_ARI_PASSWORD``        ``ari.password``
``VOXBRIDGE_API_TOKEN``           ``api.token``
===============================  ===========================

Secrets are :class:`pydantic.SecretStr`: they print as ``**********`` and are never logged,
nor echoed in error messages.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import types
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import EnvSettingsSource, SettingsError

from .audiosocket import DTMF_DIGITS
from .egress import EgressPolicy, WebhookAllowEntry

PROVIDERS = ("aillomvox", "openai", "gemini", "aws", "ultravox", "grok", "qwen")
Provider = Literal["aillomvox", "openai", "gemini", "aws", "ultravox", "grok", "qwen"]
GATEWAY_RATES = (8000, 16000, 24000)
#: The gateway gives a tool 15 s to answer; we answer a little earlier so the result is on
#: the wire (and through any proxy) before the gateway's own timer fires.
TOOL_DEADLINE_MAX = 15.0
DEFAULT_TOOL_DEADLINE = 14.0

AMI_TOOL_NAMES = frozenset({"transfer", "hangup", "originate", "send_dtmf"})

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ConfigError(ValueError):
    """The configuration is invalid. ``str()`` lists every problem, one per line, by key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def _parse_hostport(value: str, *, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:9000), got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(value: str, what: str) -> str:
    _parse_hostport(value, what=what)
    return value


# --------------------------------------------------------------------------- profiles


class DtmfAction(_Model):
    """What a caller's key press does: run a tool with fixed arguments."""

    tool: str
    args: dict[str, Any] = Field(default_factory=dict)


class Fallback(_Model):
    """What the caller gets when the gateway fails, refuses or drops the call.

    ``action``:
      * ``dialplan`` — end the AudioSocket session so Asterisk continues at the next priority
        (the shipped dialplan then routes to a human); the channel variable ``VOXBRIDGE_RESULT``
        is set to ``fallback`` first when AMI is available.
      * ``hangup`` — hang the channel up (over AMI; without AMI, same as ``dialplan``).
      * ``transfer`` — AMI Redirect to ``context``/``exten`` (must be allowlisted).
    ``message_wav`` — a mono 16-bit WAV played to the caller first, so there is never dead air.
    """

    action: Literal["dialplan", "hangup", "transfer"] = "dialplan"
    context: str | None = None
    exten: str | None = None
    message_wav: Path | None = None

    @model_validator(mode="after")
    def _transfer_needs_target(self) -> Fallback:
        if self.action == "transfer" and not (self.context and self.exten):
            raise ValueError("fallback action 'transfer' needs both 'context' and 'exten'")
        return self


def _hook_url(v: str) -> str:
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
    return v


class StartHookConfig(_Model):
    """``on_call_start``: POSTed the call's context before the AI is connected (bridge/hooks.py)."""

    url: str
    timeout: float = Field(2.0, gt=0, le=5, description="seconds; the call goes on with its defaults after it")
    headers: dict[str, str] = Field(default_factory=dict, description="${ENV} expanded, as for http tools")
    hmac_secret: SecretStr | None = None

    _v = field_validator("url")(lambda v: _hook_url(v))


class EndHookConfig(_Model):
    """``on_call_end``: POSTed the call's outcome after it ended, signed and retried like webhooks."""

    url: str
    headers: dict[str, str] = Field(default_factory=dict, description="${ENV} expanded, as for http tools")
    hmac_secret: SecretStr | None = None
    retries: int = Field(5, ge=0, le=10, description="more attempts after a failure (webhook back-off)")

    _v = field_validator("url")(lambda v: _hook_url(v))


class HooksConfig(_Model):
    on_call_start: StartHookConfig | None = None
    on_call_end: EndHookConfig | None = None


#: Gateway protocols that can make the AI speak on request (the ``say`` command): what a silence
#: check-in by ``prompt`` needs. The adapters declare it (``capabilities`` in bridge/gateway/*.py);
#: tests/unit/test_silence.py checks that this list agrees with them.
SAY_PROTOCOLS = ("generic-ws", "openai-realtime")


def _check_wav(path: Path) -> Path:
    """A WAV the bridge can play: readable, mono, 16-bit PCM (resampled to the call's rate)."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, frames = w.getnchannels(), w.getsampwidth(), w.getnframes()
    except FileNotFoundError:
        raise ValueError(f"no such file: {str(path)!r}") from None
    except (OSError, EOFError, wave.Error) as exc:
        raise ValueError(f"{str(path)!r} is not a readable WAV file ({exc})") from None
    if channels != 1 or width != 2:
        raise ValueError(f"{str(path)!r} must be mono 16-bit PCM (it has {channels} channel(s) of "
                         f"{8 * width} bits)")
    if frames == 0:
        raise ValueError(f"{str(path)!r} holds no audio")
    return path


class SilenceConfig(_Model):
    """The silence watchdog (bridge/silence.py): what to do when the caller says nothing.

    After ``timeout_s`` seconds in which neither the caller spoke nor the AI was heard, the bridge
    checks in — ``action: prompt`` makes the AI say ``prompt_text`` (needs a backend that can speak
    on request: generic-ws or openai-realtime), ``action: play`` plays ``wav`` — and publishes
    ``silence.detected``. With ``hangup_after_s``, if the caller still says nothing for that long
    after the check-in, the call ends (``silence.hangup``, end reason ``silence-timeout``); without
    it the check-in repeats every ``timeout_s``. ``energy_threshold_dbfs``: the level above which
    the caller's audio counts as speech, on calls that run no local VAD.
    """

    timeout_s: float = Field(..., ge=2, le=600, description="seconds of silence before the check-in")
    action: Literal["prompt", "play"] = "prompt"
    prompt_text: str = Field("Are you still there?", min_length=1, max_length=500)
    wav: Path | None = Field(None, description="mono 16-bit WAV, for action: play")
    hangup_after_s: float | None = Field(None, ge=1, le=600,
                                         description="seconds of further silence after the check-in before hanging up")
    energy_threshold_dbfs: float = Field(-40.0, ge=-80, le=-10)

    @field_validator("wav")
    @classmethod
    def _playable(cls, v: Path | None) -> Path | None:
        return v if v is None else _check_wav(v)

    @model_validator(mode="after")
    def _action_needs(self) -> SilenceConfig:
        if self.action == "play" and self.wav is None:
            raise ValueError("action 'play' needs 'wav' (a mono 16-bit WAV to play to the caller)")
        return self


class Profile(_Model):
    """An agent: who the AI is on this call and what it may do."""

    gateway: str | None = Field(None, description="a key of ``gateways``; unset = the ``gateway`` section")
    provider: Provider = "aillomvox"
    voice: str | None = None
    language: str | None = "en-US"
    prompt: str = "You are a friendly, concise phone assistant. Keep answers short."
    first_message: str | None = "Hello! How can I help you?"
    farewell_message: str | None = "Thank you for calling. Goodbye!"
    sample_rate: Literal[8000, 16000, 24000] = 8000
    max_duration: int = Field(300, ge=60, le=3600)
    tools: list[str] = Field(default_factory=lambda: ["end_call"])
    tool_sources: list[str] = Field(default_factory=list,
                                    description="keys of ``tool_sources``: all their tools are offered too")
    dtmf: dict[str, DtmfAction] = Field(default_factory=dict)
    variables: dict[str, str] = Field(default_factory=dict, description="defaults for prompt {placeholders}")
    fallback: Fallback = Field(default_factory=Fallback)
    hooks: HooksConfig = Field(default_factory=HooksConfig, description="HTTP hooks at call start and end")
    record: bool = Field(False, description="record each call as a stereo WAV (caller left, AI right) in "
                                            "recordings.path")
    silence: SilenceConfig | None = Field(None, description="the silence watchdog; unset = none")

    @field_validator("dtmf")
    @classmethod
    def _digits(cls, v: dict[str, DtmfAction]) -> dict[str, DtmfAction]:
        for digit in v:
            if len(digit) != 1 or ord(digit) not in DTMF_DIGITS:
                raise ValueError(f"DTMF key {digit!r} is not one of 0-9 * # A-D")
        return v

    def render_prompt(self, variables: Mapping[str, str], template: str | None = None) -> tuple[str, list[str]]:
        """Fill ``{placeholders}`` in ``template`` (default: this profile's prompt) from
        ``variables``, with the profile's default variables underneath.

        Only ``{identifier}`` is a placeholder, so JSON or other braces in a prompt are left
        alone. Returns the prompt and the placeholders that had no value (left as written).
        """
        values = {**self.variables, **variables}
        missing: list[str] = []

        def sub(m: re.Match[str]) -> str:
            key = m.group(1)
            if key in values:
                return str(values[key])
            missing.append(key)
            return m.group(0)

        return _PLACEHOLDER.sub(sub, self.prompt if template is None else template), missing


# --------------------------------------------------------------------------- sections


class _WebSocketTimings(_Model):
    connect_timeout: float = Field(5.0, gt=0, le=60)
    keepalive_interval: float = Field(5.0, gt=0, le=60, description="WebSocket ping every this many seconds")
    keepalive_timeout: float = Field(10.0, gt=0, le=120,
                                     description="a ping unanswered this long means the gateway is gone")
    # On by default: nothing reaches the service before the call's settings are known (the handshake
    # only), a connection the call does not use is closed cleanly at once, and one that failed or
    # went stale is replaced by an ordinary connect. What it costs is one extra handshake for a call
    # whose dialplan or hook picks a profile on another gateway (README, "First words").
    preconnect: bool = Field(True, description="open the WebSocket while the call's settings are resolved "
                                               "(AMI channel, on_call_start hook); the opening messages "
                                               "follow once they are known")


def _ws_url(v: str | None) -> str | None:
    if v is not None and not re.match(r"^wss?://[^/\s]+", v):
        raise ValueError(f"must be a ws:// or wss:// URL, got {v!r}")
    return v


class GatewayConfig(_WebSocketTimings):
    """The default gateway (AillomVox), for profiles that name none: the single section of old."""

    protocol: Literal["aillomvox"] = "aillomvox"
    url: str | None = Field(
        None, description="wss://…/ws of the gateway; unset = the embedded reference gateway (demo)"
    )
    api_key: SecretStr | None = None
    api_key_in_query: bool = Field(False, description="also send ?apiKey= on the URL (the field is always sent)")
    settle_ms: int = Field(500, ge=0, le=5000, description="hold caller audio this long after config")
    settle_buffer_ms: int = Field(2000, ge=0, le=10000, description="most caller audio held while settling")
    demo: bool = Field(False, description="run the embedded reference gateway (no url, no key): demos only")

    _v = field_validator("url")(lambda v: _ws_url(v))

    @model_validator(mode="after")
    def _demo_or_url(self) -> GatewayConfig:
        # Both set is a contradiction nobody should have to resolve by guessing which one wins.
        if self.demo and self.url is not None:
            raise ValueError("gateway.url and gateway.demo: true are both set: remove gateway.demo to use the "
                             "gateway at gateway.url, or remove gateway.url to run the embedded demo gateway")
        return self


class VadConfig(_Model):
    """Who detects the caller's speech, and how (seed 001's settings).

    ``mode``: ``server`` — the AI service does (the settings are sent to it where its protocol
    takes them); ``local`` — the bridge does, on the caller's audio (bridge/vad.py), and flushes
    the AI's playout itself when the caller speaks over it; ``off`` — nobody (no barge-in).
    Unset: the protocol's own default (server for generic-ws and OpenAI Realtime, local for
    aivoco, whose API has no barge-in event).
    """

    mode: Literal["server", "local", "off"] | None = None
    engine: Literal["auto", "silero", "webrtcvad"] = Field(
        "auto", description="the local detector: silero (measured best, README) when installed, else webrtcvad")
    threshold: float = Field(0.6, ge=0, le=1, description="speech probability / sensitivity, 0..1")
    silence_duration_ms: int = Field(600, ge=100, le=5000, description="silence that ends the caller's turn")
    prefix_padding_ms: int = Field(200, ge=0, le=2000, description="audio kept from before the speech onset")
    tonal_onset: bool = Field(True, description="silero: a tone, DTMF or synthetic voice starting over the AI "
                                                "also cuts it (README); false on lines that carry music")


class _NamedGateway(_WebSocketTimings):
    """Fields every entry of ``gateways`` has."""

    api_key: SecretStr | None = Field(None, description="the credential; better: api_key_env")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="name of the environment variable holding the credential")

    @model_validator(mode="after")
    def _one_key_source(self) -> _NamedGateway:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("api_key and api_key_env are both set: keep one")
        return self

    def credential(self, env: Mapping[str, str] | None = None) -> str | None:
        """The credential, from ``api_key`` or the variable ``api_key_env`` names (None if unset or
        unusable). Surrounding whitespace is dropped (a secret mounted from a file ends in a newline);
        one with a control character inside is unusable (:meth:`credential_problem` says so)."""
        value = self._raw_credential(env)
        return None if value is None or _CONTROL.search(value) else value

    def _raw_credential(self, env: Mapping[str, str] | None) -> str | None:
        if self.api_key is not None:
            value: str | None = self.api_key.get_secret_value()
        elif self.api_key_env is not None:
            value = (os.environ if env is None else env).get(self.api_key_env)
        else:
            return None
        return value.strip() or None if value is not None else None

    def credential_problem(self, env: Mapping[str, str] | None = None) -> str | None:
        """Why the credential that is there cannot be used (never its value), or None."""
        value = self._raw_credential(env)
        if value is not None and _CONTROL.search(value):
            return "contains a control character (a line break or tab inside it?)"
        return None


class AillomVoxGatewayConfig(_NamedGateway):
    protocol: Literal["aillomvox"]
    url: str
    api_key_in_query: bool = False
    settle_ms: int = Field(500, ge=0, le=5000)
    settle_buffer_ms: int = Field(2000, ge=0, le=10000)

    _v = field_validator("url")(lambda v: _ws_url(v))


class GenericWsGatewayConfig(_NamedGateway):
    """Seed 001's generic AI WebSocket (bridge/gateway/generic_ws.py); ``api_key`` is its optional bearer token."""

    protocol: Literal["generic-ws"]
    url: str
    audio_format: Literal["g711_ulaw", "pcm16"] = "g711_ulaw"
    sample_rate: Literal[8000, 16000, 24000] = Field(8000, description="the wire's rate (8000 for g711_ulaw)")
    ready_timeout: float = Field(3.0, gt=0, le=30, description="caller audio is held until the server's "
                                                              "session_started/ready, at most this long")
    vad: VadConfig = Field(default_factory=VadConfig)

    _v = field_validator("url")(lambda v: _ws_url(v))

    @model_validator(mode="after")
    def _ulaw_is_8k(self) -> GenericWsGatewayConfig:
        if self.audio_format == "g711_ulaw" and self.sample_rate != 8000:
            raise ValueError(f"audio_format g711_ulaw is 8000 Hz; sample_rate {self.sample_rate} needs pcm16")
        return self


class AivocoGatewayConfig(_NamedGateway):
    """Seed 003's Socket.IO speech-to-speech API (bridge/gateway/aivoco.py); ``api_key`` is its auth_key."""

    protocol: Literal["aivoco"]
    url: str = "wss://sts.aivoco.on.cloud.vispark.in"
    output_rate: Literal[16000, 24000] = Field(24000, description="rate of the PCM the service speaks")
    vad: VadConfig = Field(default_factory=VadConfig)

    _v = field_validator("url")(lambda v: _ws_url(v))

    @model_validator(mode="after")
    def _what_socketio_cannot_do(self) -> AivocoGatewayConfig:
        # Liveness is Engine.IO's own heartbeat, set by the server (README); the API has no barge-in
        # event: a setting that would be silently ignored is refused instead.
        ignored = sorted({"keepalive_interval", "keepalive_timeout"} & self.model_fields_set)
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: not for aivoco (Socket.IO's heartbeat, set by the server, "
                             "detects a dead link)")
        if "preconnect" in self.model_fields_set:
            raise ValueError("preconnect: not for aivoco (its Socket.IO session starts with start_call; there is "
                             "no connection to open before the call's settings are known)")
        if self.vad.mode == "server":
            raise ValueError("vad.mode server: the aivoco API has no barge-in event; use local (the default) or off")
        return self


class OpenAIRealtimeGatewayConfig(_NamedGateway):
    """The OpenAI Realtime API, GA (bridge/gateway/openai_realtime.py)."""

    protocol: Literal["openai-realtime"]
    url: str = "wss://api.openai.com/v1/realtime"
    model: str = "gpt-realtime"
    transcription_model: str | None = Field("gpt-4o-mini-transcribe",
                                            description="transcribes the caller; null turns it off")
    vad: VadConfig = Field(default_factory=VadConfig)

    _v = field_validator("url")(lambda v: _ws_url(v))


NamedGateway = Annotated[
    AillomVoxGatewayConfig | GenericWsGatewayConfig | AivocoGatewayConfig | OpenAIRealtimeGatewayConfig,
    Field(discriminator="protocol"),
]
GATEWAY_PROTOCOLS = ("aillomvox", "generic-ws", "aivoco", "openai-realtime")


class AudioSocketConfig(_Model):
    listen: str = "127.0.0.1:9000"
    max_calls: int = Field(200, ge=1, description="calls over this are refused at once (dialplan continues)")
    uuid_timeout: float = Field(5.0, gt=0, description="close a connection that sends no UUID this long")
    unknown_uuid: Literal["accept", "refuse"] = Field(
        "accept", description="sockets whose UUID no AMI channel claims: accept (with a warning) or refuse"
    )
    playout_max_seconds: float = Field(120.0, gt=1, description="most AI audio queued for one caller")
    reuse_port: bool = False

    _v = field_validator("listen")(lambda v: _listen(v, "audiosocket.listen"))


class AmiConfig(_Model):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(5038, ge=1, le=65535)
    username: str = "voxbridge"
    secret: SecretStr | None = None
    action_timeout: float = Field(5.0, gt=0, le=60)
    ping_interval: float = Field(10.0, gt=0)
    channel_wait: float = Field(2.0, ge=0, description="how long a new call waits for its AMI channel")


def _port_range(value: str) -> str:
    first, sep, last = value.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"must be FIRST-LAST (e.g. 40000-40999), got {value!r}")
    a, b = int(first), int(last)
    if not 1024 <= a <= b <= 65535:
        raise ValueError(f"must be FIRST-LAST within 1024-65535 with FIRST <= LAST, got {value!r}")
    return f"{a}-{b}"


class AriRtpConfig(_Model):
    host: str = Field("127.0.0.1", description="the address the bridge's RTP sockets bind to")
    advertise: str | None = Field(None, description="the address Asterisk sends RTP to (default: host); "
                                                    "set it when the bridge binds 0.0.0.0 or sits behind NAT")
    ports: str = Field("40000-40999", description="UDP ports for the calls' RTP, FIRST-LAST (one per call)")
    jitter_packets: int = Field(3, ge=0, le=50, description="most packets held waiting for a missing one")

    _v = field_validator("ports")(lambda v: _port_range(v))

    @property
    def port_range(self) -> tuple[int, int]:
        a, _, b = self.ports.partition("-")
        return int(a), int(b)


class AriConfig(_Model):
    """Asterisk's REST Interface: calls sent to ``Stasis(<app>[,profile[,vars]])`` reach the bridge,
    their audio over an External Media channel carrying RTP (``ingress: ari``)."""

    url: str = Field("http://127.0.0.1:8088", description="Asterisk's HTTP server (http.conf), without /ari")
    username: str = "voxbridge"
    password: SecretStr | None = Field(None, description="the ari.conf user's password (VOXBRIDGE_ARI_PASSWORD)")
    app: str = Field("voxbridge", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="the Stasis application name")
    format: Literal["ulaw", "slin16"] = Field("ulaw", description="External Media codec: µ-law 8 kHz, or "
                                                                  "the caller at 16 kHz linear (the AI's voice "
                                                                  "goes back as µ-law: bridge/rtp_leg.py)")
    rtp: AriRtpConfig = Field(default_factory=AriRtpConfig)
    action_timeout: float = Field(5.0, gt=0, le=60, description="deadline of one REST request")
    reconnect_max: float = Field(10.0, gt=0, le=300, description="longest wait between reconnection attempts")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.rstrip("/")
        if "@" in v.split("://", 1)[-1].split("/", 1)[0]:  # it is logged and shown, so never echoed here
            raise ValueError("must not carry a user name or password (use ari.username and ari.password)")
        if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", v):
            raise ValueError(f"must be an http(s) URL such as http://127.0.0.1:8088, got {v!r}")
        if v.endswith("/ari"):
            v = v[:-4]
        return v


Ingress = Literal["audiosocket", "ari"]


class Allowlist(_Model):
    """Where the AI may send or place calls. Everything else is refused (toll fraud)."""

    transfer: list[str] = Field(
        default_factory=list, description="'context,exten-regex' entries, e.g. 'operators,1\\d\\d' (full match)"
    )
    originate: list[str] = Field(default_factory=list, description="regexes a destination must fully match")
    calls: list[str] = Field(default_factory=list,
                             description="destinations the API may start AI calls to (regexes, full match)")
    webhooks: list[WebhookAllowEntry] = Field(
        default_factory=lambda: ["http://127.0.0.1", "http://localhost", "http://[::1]"],
        description="URL prefixes webhook subscriptions may point at (scheme, host and optional port/path "
                    "compared after parsing); the default allows a receiver on this host, e.g. n8n",
    )

    @field_validator("transfer")
    @classmethod
    def _transfer_rules(cls, v: list[str]) -> list[str]:
        for spec in v:
            context, sep, exten = spec.partition(",")
            if not sep or not context.strip() or not exten.strip():
                raise ValueError(f"entry {spec!r} must be 'context,extension-pattern'")
            _regex(exten.strip())
        return v

    @field_validator("originate", "calls")
    @classmethod
    def _originate_rules(cls, v: list[str]) -> list[str]:
        for p in v:
            _regex(p)
        return v


def _regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None


class OriginateConfig(_Model):
    """How the ``originate`` tool places calls: the dial string and where an answered call goes."""

    channel: str = Field("PJSIP/{destination}", description="dial string; {destination} is filled in")
    context: str | None = None
    exten: str | None = None
    ring_timeout: float = Field(12.0, gt=0, le=13, description="seconds; must fit the tool deadline")
    caller_id: str | None = None

    @field_validator("channel")
    @classmethod
    def _has_destination(cls, v: str) -> str:
        if "{destination}" not in v:
            raise ValueError("must contain {destination}")
        return v


class OutboundConfig(_Model):
    """AI calls started through the API: how to dial, and where the answered callee goes (the AI)."""

    channel: str = Field("PJSIP/{destination}", description="dial string; {destination} is filled in")
    context: str = "voxbridge-outbound-ai"
    exten: str = "s"
    ring_timeout: float = Field(30.0, gt=0, le=300)
    caller_id: str | None = None
    answer_timeout: float = Field(15.0, gt=0, description="answered, but no AudioSocket this long: failed")

    _v = field_validator("channel")(lambda v: OriginateConfig._has_destination(v))


class ApiConfig(_Model):
    enabled: bool = True
    listen: str = "127.0.0.1:8080"
    token: SecretStr | None = None
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="larger request bodies are refused (413)")
    max_webhooks: int = Field(50, ge=1, le=10000, description="most webhook subscriptions at once")

    _v = field_validator("listen")(lambda v: _listen(v, "api.listen"))


class ToolConfig(_Model):
    """A configured tool. ``kind: builtin`` names a built-in; ``kind: http`` calls a URL."""

    kind: Literal["builtin", "http"] = "http"
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    timeout: float = Field(DEFAULT_TOOL_DEADLINE, gt=0, le=TOOL_DEADLINE_MAX)
    # http
    url: str | None = None
    method: Literal["POST", "PUT", "GET"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    hmac_secret: SecretStr | None = None
    retries: int = Field(2, ge=0, le=5)
    max_response_bytes: int = Field(64 * 1024, ge=1024)
    # builtin
    builtin: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fields(self) -> ToolConfig:
        if self.kind == "http" and not self.url:
            raise ValueError("an http tool needs 'url'")
        return self


class ToolSourceConfig(_Model):
    """A server whose tools are discovered, not declared (tools/mcp.py): ``kind: mcp``, an MCP server
    (n8n's MCP Server Trigger, or any other), over streamable HTTP or SSE."""

    kind: Literal["mcp"] = "mcp"
    url: str
    transport: Literal["streamable-http", "sse"] = "streamable-http"
    headers: dict[str, str] = Field(default_factory=dict,
                                    description='values may be "${ENV_VAR}" (read from the environment)')
    include: list[str] = Field(default_factory=list, description="glob patterns of the server's tool names to "
                                                                 "offer (empty: all)")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of tool names never offered")
    prefix: str = Field("", pattern=r"^[A-Za-z0-9_-]*$", description="put before each tool's name")
    refresh_s: float = Field(300.0, ge=1, le=86400, description="re-list the tools this often (and on the "
                                                                 "server's list_changed)")
    timeout: float = Field(DEFAULT_TOOL_DEADLINE, gt=0, le=TOOL_DEADLINE_MAX,
                           description="seconds for one tool call (the tool deadline caps it)")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+", v):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v


def _url_scheme(value: SecretStr | None, schemes: tuple[str, ...], key: str) -> SecretStr | None:
    """A service URL (it may carry a password, hence SecretStr): only its scheme is checked here;
    the message names the key and the scheme, never the URL."""
    if value is None:
        return None
    scheme, sep, _rest = value.get_secret_value().partition("://")
    if not sep or scheme not in schemes:
        raise ValueError(f"{key} must start with {' or '.join(s + '://' for s in schemes)}, not {scheme + sep!r}")
    return value


class StoreConfig(_Model):
    path: Path | None = Field(None, description="SQLite call history; unset = in memory only")
    postgres_url: SecretStr | None = Field(
        None, description="postgresql://… : the call history and webhook subscriptions in PostgreSQL, shared by "
                          "every bridge of a cluster (needs the 'cluster' extra: asyncpg); unset = SQLite (path)")
    redact_args: list[str] = Field(default_factory=list, description="tool argument names stored as '***'")
    retention_days: float | None = Field(90, gt=0, description="ended calls older than this are deleted; "
                                                               "null keeps them forever")

    _pg = field_validator("postgres_url")(
        lambda v: _url_scheme(v, ("postgresql", "postgres"), "store.postgres_url"))


class ClusterConfig(_Model):
    """Several bridge processes sharing calls, commands and events through Redis (bridge/cluster.py)."""

    redis_url: SecretStr | None = Field(None, description="redis://… or rediss://… ; unset = one process, "
                                                          "no Redis (needs the 'cluster' extra: redis)")
    node_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                                description="this bridge's name in the cluster; default hostname-pid")
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="how often this node says it is alive")
    node_timeout_s: float = Field(5.0, gt=0, le=600, description="a node silent this long is dead: its calls "
                                                                 "are marked failed by a surviving node")
    command_timeout_s: float = Field(5.0, gt=0, le=60, description="how long a command routed to the call's "
                                                                   "owning node waits for its answer (then 504)")
    max_calls: int | None = Field(None, ge=1, description="calls over this across the cluster are refused")

    _url = field_validator("redis_url")(lambda v: _url_scheme(v, ("redis", "rediss", "unix"), "cluster.redis_url"))

    @model_validator(mode="after")
    def _timings(self) -> ClusterConfig:
        if self.node_timeout_s < 2 * self.heartbeat_s:
            raise ValueError(f"cluster.node_timeout_s ({self.node_timeout_s:g}) must be at least twice "
                             f"cluster.heartbeat_s ({self.heartbeat_s:g}): one late heartbeat must not kill a node")
        return self

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None


class RecordingsConfig(_Model):
    path: Path = Field(Path("recordings"), description="directory of the call recordings (profiles' record: true)")
    max_total_mb: float = Field(1024, gt=0, description="most disk the recordings may use; the oldest are "
                                                        "deleted beyond it")


class Config(_Model):
    ingress: list[Ingress] = Field(default_factory=lambda: list[Ingress](["audiosocket"]),
                                   description="how Asterisk hands calls over: audiosocket, ari, or both")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    audiosocket: AudioSocketConfig = Field(default_factory=AudioSocketConfig)
    ari: AriConfig = Field(default_factory=AriConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    gateways: dict[str, NamedGateway] = Field(default_factory=dict,
                                              description="named AI gateways; a profile picks one by name")
    ami: AmiConfig = Field(default_factory=AmiConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    recordings: RecordingsConfig = Field(default_factory=RecordingsConfig)
    allow: Allowlist = Field(default_factory=Allowlist)
    originate: OriginateConfig = Field(default_factory=OriginateConfig)
    outbound: OutboundConfig = Field(default_factory=OutboundConfig)
    tool_deadline: float = Field(DEFAULT_TOOL_DEADLINE, gt=0, le=TOOL_DEADLINE_MAX)
    tool_concurrency: int = Field(8, ge=1, le=256, description="most tool calls running at once per call; "
                                                               "more are answered at once with a 'busy' error")
    tools: dict[str, ToolConfig] = Field(default_factory=dict)
    tool_sources: dict[str, ToolSourceConfig] = Field(default_factory=dict,
                                                      description="servers whose tools are discovered (MCP)")
    default_profile: str = "default"
    profiles: dict[str, Profile] = Field(default_factory=lambda: {"default": Profile()})
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("ingress", mode="before")
    @classmethod
    def _ingress(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list):
            if not v:
                raise ValueError("names no way in: audiosocket, ari, or both")
            if len(set(v)) != len(v):
                raise ValueError(f"names one twice: {v}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if "ari" in self.ingress and self.ari.password is None:
            raise ValueError("ari.password: required with ingress ari (or set VOXBRIDGE_ARI_PASSWORD)")
        if self.default_profile not in self.profiles:
            raise ValueError(
                f"default_profile {self.default_profile!r} is not among profiles ({', '.join(self.profiles)})"
            )
        for pname, p in self.profiles.items():
            if p.gateway is not None and p.gateway not in self.gateways:
                known = ", ".join(self.gateways) or "none are configured"
                raise ValueError(f"profiles.{pname}.gateway: no gateway named {p.gateway!r} in gateways ({known})")
            if p.silence is not None and p.silence.action == "prompt":
                protocol = self.gateways[p.gateway].protocol if p.gateway is not None else self.gateway.protocol
                if protocol not in SAY_PROTOCOLS:
                    where = f"gateway {p.gateway!r}" if p.gateway is not None else "the default gateway"
                    raise ValueError(
                        f"profiles.{pname}.silence.action: 'prompt' needs an AI backend that can speak on request "
                        f"({', '.join(SAY_PROTOCOLS)}); {where} speaks {protocol}: use action 'play' with a wav")
        policy: EgressPolicy | None = None
        for pname, p in self.profiles.items():
            for hook in ("on_call_start", "on_call_end"):
                if (h := getattr(p.hooks, hook)) is not None:
                    policy = policy or EgressPolicy(self.allow.webhooks)
                    try:  # hooks go where webhooks may go (allow.webhooks)
                        policy.check(h.url)
                    except ValueError as exc:
                        raise ValueError(f"profiles.{pname}.hooks.{hook}.url: {exc}") from None
        return self

    def profile(self, name: str | None) -> Profile:
        return self.profiles[name or self.default_profile]

    @property
    def uses_default_gateway(self) -> bool:
        """Whether some profile names no gateway, and so uses the ``gateway`` section."""
        return any(p.gateway is None for p in self.profiles.values())

    def credential_problems(self, env: Mapping[str, str] | None = None) -> list[str]:
        """Gateways a profile uses whose protocol needs a credential that is not there, by key."""
        errors = []
        used = {p.gateway for p in self.profiles.values() if p.gateway is not None}
        for name in sorted(used):
            g = self.gateways[name]
            key = "api_key_env" if g.api_key_env is not None else "api_key"
            if (problem := g.credential_problem(env)) is not None:
                source = f" (from {g.api_key_env})" if g.api_key_env is not None else ""
                errors.append(f"gateways.{name}.{key}: the credential{source} {problem}")
                continue
            if g.protocol == "generic-ws" or g.credential(env) is not None:
                continue  # generic-ws: the bearer token is optional
            if g.api_key_env is not None:
                errors.append(f"gateways.{name}.api_key_env: the environment variable {g.api_key_env} is not set")
            else:
                errors.append(f"gateways.{name}.api_key: required by protocol {g.protocol} (or set api_key_env "
                              "to the environment variable that holds it)")
        return errors

    def problems(self, known_tools: set[str]) -> tuple[list[str], list[str]]:
        """Checks that need the tool registry: (errors, warnings), each naming its key."""
        errors: list[str] = []
        warnings: list[str] = []
        for pname, p in self.profiles.items():
            for i, t in enumerate(p.tools):
                if t not in known_tools:
                    known = ", ".join(sorted(known_tools))
                    errors.append(f"profiles.{pname}.tools.{i}: unknown tool {t!r} (known: {known})")
            for i, source in enumerate(p.tool_sources):
                if source not in self.tool_sources:
                    known = ", ".join(sorted(self.tool_sources)) or "none are configured"
                    errors.append(f"profiles.{pname}.tool_sources.{i}: no tool source named {source!r} "
                                  f"in tool_sources ({known})")
            for digit, action in p.dtmf.items():
                if action.tool not in known_tools:
                    errors.append(f"profiles.{pname}.dtmf.{digit}.tool: unknown tool {action.tool!r}")
            ami_tools = [t for t in p.tools if t in AMI_TOOL_NAMES]
            if ami_tools and not self.ami.enabled and "audiosocket" in self.ingress:
                # ARI calls carry their own way to their channel; AudioSocket calls need AMI.
                also = " for calls over AudioSocket (ARI calls need none)" if "ari" in self.ingress else ""
                warnings.append(f"profiles.{pname}.tools: {', '.join(ami_tools)} need AMI{also} "
                                "(ami.enabled is false)")
            if "transfer" in p.tools and not self.allow.transfer:
                warnings.append(f"profiles.{pname}.tools: 'transfer' is offered but allow.transfer is empty")
            if p.provider == "qwen" and p.tools:
                warnings.append(
                    f"profiles.{pname}: provider 'qwen' does not emit tool calls in realtime mode; "
                    f"its tools ({', '.join(p.tools)}) will never be called"
                )
        named = {s for p in self.profiles.values() for s in p.tool_sources}
        for sname in self.tool_sources:
            if sname not in named:
                warnings.append(f"tool_sources.{sname}: no profile names it in its tool_sources, so its tools "
                                "are never offered")
        if self.gateway.url and not self.gateway.api_key:
            warnings.append("gateway.api_key: not set; `serve` needs it (set VOXBRIDGE_GATEWAY_API_KEY)")
        for gname, g in self.gateways.items():
            if g.protocol != "aillomvox" and g.vad.engine == "silero" and (problem := _silero_missing()):
                errors.append(f"gateways.{gname}.vad.engine: {problem}, or choose engine: webrtcvad")
        return errors, warnings


def _silero_missing() -> str | None:
    """What is missing for the Silero VAD engine, or None (bridge/vad.py loads it)."""
    from importlib.util import find_spec

    if find_spec("onnxruntime") is None or find_spec("silero_vad") is None:
        return ("silero needs onnxruntime and the silero-vad model: pip install 'voxbridge[silero]' && "
                "pip install --no-deps silero-vad")
    return None


# --------------------------------------------------------------------------- loading

ENV_PREFIX = "VOXBRIDGE_"
ENV_DELIMITER = "__"
#: An environment value spelled like this is None (``VOXBRIDGE_STORE__RETENTION_DAYS=null``).
ENV_NONE = "null"

_ENV_ALIASES = {
    "VOXBRIDGE_GATEWAY_API_KEY": ("gateway", "api_key"),
    "VOXBRIDGE_GATEWAY_URL": ("gateway", "url"),
    "VOXBRIDGE_AMI_SECRET": ("ami", "secret"),
    "VOXBRIDGE_ARI_PASSWORD": ("ari", "password"),
    "VOXBRIDGE_API_TOKEN": ("api", "token"),
}
# Keys whose values an error never quotes (URLs may carry a password).
_SECRET_HINTS = ("api_key", "secret", "token", "password", "redis_url", "postgres_url", "ari.url")


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, typed by :class:`Config`, reading a given mapping.

    Each value is read as the type of the field it sets: ints, floats and booleans are parsed
    by pydantic like any other input, strings are kept verbatim (``+441632960000``, ``0123``,
    ``yes``), and lists and mappings are JSON. ``load_config(env=…)`` passes its mapping here
    instead of ``os.environ``, so tests and ``bridge/devtools/bench.py`` control exactly what is read.
    (Empty and ``null`` values are handled by :func:`_env_data`, not here.)
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self._given_env = env  # read by _load_env_vars(), which the base __init__ calls
        # pydantic-settings types settings_cls as a BaseSettings, but it reads only model_fields and
        # model_config, which Config (a plain BaseModel: no implicit environment) has too.
        super().__init__(Config,  # type: ignore[arg-type]
                         case_sensitive=False, env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._given_env.items()}


def _annotation_at(path: tuple[str, ...]) -> Any:
    """The type annotation of the key at ``path`` (lower case) in :class:`Config`, or None."""
    annotation: Any = Config
    for key in path:
        while get_origin(annotation) in (Union, types.UnionType):  # X | None: the X
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return None
            annotation = members[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next((f for n, f in annotation.model_fields.items() if n.lower() == key), None)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    return annotation


def _int_literals(annotation: Any) -> set[int]:
    """The int members of the ``Literal`` types in ``annotation`` (also inside ``X | None``)."""
    if get_origin(annotation) is Literal:
        return {a for a in get_args(annotation) if isinstance(a, int) and not isinstance(a, bool)}
    return set().union(*(_int_literals(a) for a in get_args(annotation))) if get_args(annotation) else set()


def _env_path(name: str) -> tuple[str, ...] | None:
    """Where ``VOXBRIDGE_…`` variable ``name`` points in the config (lower case), or None if it
    is not a config variable (``VOXBRIDGE_NO_UVLOOP``)."""
    upper = name.upper()
    if upper in _ENV_ALIASES:
        return _ENV_ALIASES[upper]
    if not upper.startswith(ENV_PREFIX):
        return None
    rest = name[len(ENV_PREFIX):].lower()
    if ENV_DELIMITER in rest:
        return tuple(rest.split(ENV_DELIMITER))
    return (rest,) if rest in Config.model_fields else None


def _lookup(data: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    """(found, value) at ``path`` in nested dicts, keys compared case-insensitively."""
    node = data
    for key in path:
        if not isinstance(node, dict):
            return False, None
        match = next((k for k in node if isinstance(k, str) and k.lower() == key), None)
        if match is None:
            return False, None
        node = node[match]
    return True, node


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value


def _set_path_ci(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Replace the existing value at ``path``, keys compared case-insensitively."""
    node = data
    for key in path[:-1]:
        node = node[next(k for k in node if isinstance(k, str) and k.lower() == key)]
    node[next(k for k in node if isinstance(k, str) and k.lower() == path[-1])] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` (which is modified): mappings merge key by key, anything
    else replaces. A key of ``over`` that matches one of ``base`` case-insensitively lands on
    it, because environment variable names arrive lower-cased (``VOXBRIDGE_PROFILES__SALES__VOICE``
    sets the voice of a YAML profile written ``Sales``)."""
    for key, value in over.items():
        target = key
        if key not in base and isinstance(key, str):
            target = next((k for k in base if isinstance(k, str) and k.lower() == key.lower()), key)
        if isinstance(value, Mapping) and isinstance(base.get(target), dict):
            _merge(base[target], value)
        else:
            base[target] = dict(value) if isinstance(value, Mapping) else value
    return base


def _env_data(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str], list[str]]:
    """The configuration the environment sets: (nested data, path → variable name, errors).

    Config variables whose path names no field (``VOXBRIDGE_AMI__PROT``, ``VOXBRIDGE_AIM__PORT``)
    are put in the data as they are, so validation reports them as unknown keys, like a typo in
    the YAML. A list or mapping that is not valid JSON is an error naming its variable.
    """
    # An empty variable is unset (as with an empty line in a systemd EnvironmentFile); ``null`` is
    # None, and set below like the short aliases, which pydantic-settings does not know either.
    names = {name: path for name, value in env.items() if value != "" and (path := _env_path(name))}
    settings_env = {n: env[n] for n in names if n.upper() not in _ENV_ALIASES and env[n] != ENV_NONE}
    errors: list[str] = []
    try:
        data = _EnvSource(settings_env)()
    except SettingsError:
        # Find the variable(s) at fault, one at a time, then read the rest.
        bad = []
        for name in settings_env:
            try:
                _EnvSource({name: settings_env[name]})()
            except SettingsError:
                bad.append(name)
        for name in bad:
            errors.append(f"{'.'.join(names[name])}: not valid JSON (from {name}); lists and mappings in the "
                          'environment are written as JSON, e.g. \'["a", "b"]\' or \'{"key": "value"}\'')
            del settings_env[name]
            del names[name]
        try:
            data = _EnvSource(settings_env)()
        except SettingsError as exc:  # not one variable alone: say what pydantic-settings said
            return {}, {}, [*errors, f"environment: {exc}"]
    origins: dict[tuple[str, ...], str] = {}
    for name, path in names.items():
        if env[name] == ENV_NONE:
            _set_path(data, path, None)
        elif name.upper() in _ENV_ALIASES:
            long_name = ENV_PREFIX + ENV_DELIMITER.join(path).upper()
            found, current = _lookup(data, path)
            if found and current != env[name]:
                errors.append(f"{'.'.join(path)}: set by both {name} and {long_name}, to different values; "
                              "keep one")
                continue
            _set_path(data, path, env[name])
        elif not _lookup(data, path)[0]:
            _set_path(data, path, env[name])  # not a config key: validation names it as unknown
        elif re.fullmatch(r"-?\d+", env[name].strip()) and int(env[name]) in _int_literals(_annotation_at(path)):
            # pydantic's lax mode reads "5039" as an int, but not "16000" as Literal[8000, 16000, 24000].
            _set_path_ci(data, path, int(env[name]))
        origins[path] = name
    return data, origins, errors


def _demo_or_url_error(data: Mapping[str, Any]) -> str | None:
    """A config file must say which gateway: ``gateway.url``, or ``gateway.demo: true``.

    Without this rule a production file that lost its ``url`` (or never had one) ran the
    embedded echo demo and answered real callers with their own voice, and nothing said so.
    Only files are held to it: ``voxbridge serve`` with no file is the demo of the README, and
    ``Config()`` in code is the demo too.
    """
    profiles = data.get("profiles")
    if isinstance(profiles, Mapping) and profiles and all(
            isinstance(p, Mapping) and p.get("gateway") for p in profiles.values()):
        return None  # every profile names one of ``gateways``: the default gateway is never used
    gateway = data.get("gateway")
    if gateway is None:
        gateway = {}
    if not isinstance(gateway, Mapping):
        return None  # validation reports the section itself
    if gateway.get("url") not in (None, ""):
        return None
    try:
        demo = TypeAdapter(bool).validate_python(gateway.get("demo", False))
    except ValidationError:
        return None  # validation reports gateway.demo
    if demo:
        return None
    return ("gateway.url: required in a config file: the ws(s)://…/ws address of your AI gateway (or "
            "VOXBRIDGE_GATEWAY_URL, or serve --gateway-url); to run the embedded reference gateway, an echo "
            "demo that never reaches an AI, set gateway.demo: true instead")


def _origin(loc: tuple[int | str, ...], origins: Mapping[tuple[str, ...], str]) -> str:
    """Which variables (or command-line options) set the value at ``loc``, as `` (from …)``."""
    key = tuple(str(p).lower() for p in loc)
    if not key:
        return ""  # a check across the whole config: naming every variable would say nothing
    names = sorted({name for path, name in origins.items()
                    if key[:len(path)] == path or path[:len(key)] == key})
    return f" (from {', '.join(names)})" if names else ""


def _error_lines(exc: ValidationError, origins: Mapping[tuple[str, ...], str] = {}) -> list[str]:
    lines = []
    for err in exc.errors():
        parts = list(err["loc"])
        if len(parts) >= 3 and parts[0] == "gateways" and parts[2] in GATEWAY_PROTOCOLS:
            del parts[2]  # pydantic names the discriminated union's branch: not a key the user wrote
        loc = ".".join(str(p) for p in parts) or "(top level)"
        msg = err["msg"]
        if not parts and (m := re.match(r"Value error, ([A-Za-z_][\w.-]*): (.*)", msg, re.S)):
            loc, msg = m.group(1), m.group(2)  # a check across sections that names its key itself
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = err.get("ctx", {}).get("tag")
            loc += ".protocol"
            msg = (f"unknown protocol {tag!r}" if err["type"] == "union_tag_invalid" else "required") + \
                f" (one of: {', '.join(GATEWAY_PROTOCOLS)})"
            err = {**err, "type": "extra_forbidden"}  # the value is named already
        inp = err.get("input")
        if err["type"] not in ("extra_forbidden", "missing") and not isinstance(inp, (dict, list)):
            # (A validator of ours may have quoted the value already: "…, got 'http://x'".)
            quoted = err["type"] == "value_error" and repr(inp) in msg
            if not any(s in loc for s in _SECRET_HINTS) and not quoted:
                msg += f" (got {inp!r})"
        lines.append(f"  {loc}: {msg}{_origin(tuple(err['loc']), origins)}")
    return lines


def format_validation_error(exc: ValidationError, source: str) -> str:
    return "\n".join([f"invalid configuration in {source}:", *_error_lines(exc)])


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None, *,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate. Raises :class:`ConfigError` with every problem named by key.

    Precedence, lowest first: defaults, the YAML file at ``path``, the environment (``env``,
    default ``os.environ``; only ``VOXBRIDGE_*`` variables are read), then ``overrides``
    (dotted keys, e.g. ``{"gateway.url": …}``: the command line's options).

    A file must name its gateway (``gateway.url``) or ask for the demo (``gateway.demo: true``);
    with no file, an unset ``gateway.url`` means the demo (see :func:`_demo_or_url_error`).
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    env_data, origins, lines = _env_data(env)
    lines = [f"  {line}" for line in lines]
    _merge(data, env_data)
    if origins:
        source += " + environment (" + ", ".join(sorted(set(origins.values()))) + ")"
    if overrides:
        for key, value in overrides.items():
            keypath = tuple(key.split("."))
            _merge(data, functools.reduce(lambda inner, k: {k: inner}, reversed(keypath), value))
            origins[keypath] = "the command line"
        source += " + command line"
    problem = _demo_or_url_error(data) if path is not None else None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines += _error_lines(exc, origins)
    if problem:
        lines.append(f"  {problem}")
    if lines:
        raise ConfigError("\n".join([f"invalid configuration in {source}:", *lines]))
    return config


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    try:
        return _parse_hostport(value, what=what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
