"""The control API (FastAPI): start and follow AI calls, control live ones, subscribe to events.

The contract is in README.md ("Control API, events and webhooks"); the n8n node is built on it.
The server runs inside the bridge's event loop (uvicorn, no signal handling of its own: the
CLI owns SIGTERM so that calls end gracefully).

Who may use it is decided once, in :class:`ApiGuard`, a pure ASGI layer outside every route
(including the ``/docs``, ``/redoc`` and ``/openapi.json`` routes FastAPI adds itself):

* **with** ``api.token``: every path but ``/v1/health`` and the static pages that hold no data
  (the console's files, ``/docs`` and its schema ``/openapi.json``) needs
  ``Authorization: Bearer <token>`` (constant-time compare), else 401;
* **without** a token (the default, loopback only — ``bridge/app.py`` refuses a non-loopback
  ``api.listen`` without one), a request is served only if it is addressed to this machine
  (``Host`` is 127.0.0.0/8, ``[::1]`` or ``localhost``, else 421) and does not come from another
  site's page (an ``Origin`` must itself be a loopback http(s) origin, and
  ``Sec-Fetch-Site: cross-site`` is refused, 403). A web page the operator visits can make the
  browser send requests here, even read the answers after rebinding its own DNS name to
  127.0.0.1; it cannot make the browser send a loopback ``Host`` or drop its ``Origin``.

The same layer caps request bodies (``api.max_body_bytes``, 413 before the body is read when
``Content-Length`` says so, else as soon as the count passes the cap) and stamps
``Cache-Control: no-store`` and ``X-Content-Type-Options: nosniff`` on every answer. It is not
Starlette's ``BaseHTTPMiddleware``, which buffers and breaks the streaming ``/v1/events``.

Every string a client sends is validated by the models below: control characters (and
unpaired UTF-16 surrogates, which cannot be encoded for AMI, SQLite or a webhook body) are a
422 naming the field, never a 500 deeper down. Only ``prompt`` and ``first_message`` may hold
newlines and tabs: they are prose.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable, Container, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, cast

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Path, Query, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from tools.ami import NotAllowed
from tools.base import ToolError

from . import __version__
from .cluster import CommandRouter, CommandUnanswered
from .events import EVENT_TYPES
from .gateway.base import CommandUnavailable, CommandUnsupported
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render as render_metrics
from .openapi30 import openapi_30
from .store import parse_time

if TYPE_CHECKING:
    from tools.ami import Telephony

    from .config import Config
    from .events import EventBus

log = logging.getLogger("voxbridge.api")


class Bridge(Protocol):
    """What the API reaches of the running bridge (bridge/app.py's ``Bridge`` provides it)."""

    config: Config
    events: EventBus

    @property
    def sessions(self) -> Mapping[str, Any]: ...  # the calls in progress (bridge/session.py)

    @property
    def known_ended(self) -> Container[str]: ...  # recently ended calls' UUIDs (409, not 404)

    @property
    def ami(self) -> Any: ...  # bridge/ami.py's AmiClient, or None

    @property
    def telephony(self) -> Telephony: ...  # the allowlist-checked AMI actions

    @property
    def webhooks(self) -> Any: ...  # bridge/webhooks.py's WebhookDispatcher

    @property
    def store(self) -> Any: ...  # bridge/store.py's CallStore (the history)

    async def start_outbound_call(self, req: StartCall) -> str: ...

    router: CommandRouter  # where commands for calls owned by another cluster node go (bridge/cluster.py)

    async def hangup_call(self, session: Any, reason: str) -> None: ...

    async def get_call(self, call_id: str) -> dict[str, Any] | None: ...

    async def list_calls(self, state: str | None, limit: int, offset: int,
                         **filters: str | None) -> list[dict[str, Any]]: ...

    def metrics_text(self) -> str: ...

MAX_METADATA_BYTES = 16 * 1024
SSE_HEARTBEAT_S = 15.0
#: Most ``/v1/events`` streams open at once: each holds a subscription (a queue of up to 1000
#: events) and a connection, so a hostile or buggy client must not be able to open them
#: without bound.
MAX_EVENT_STREAMS = 100
#: Paths served without a token: ``/v1/health`` (load balancers and health checks have none),
#: and ``/docs`` with its schema (``/openapi.json``; ``/docs/openapi.json``, the same as OpenAPI
#: 3.0 for the bundled Swagger UI: bridge/openapi30.py). A browser opening /docs cannot send a bearer
#: header, so with a token they would be a blank page; they hold no data (the routes and models
#: the code declares, the same for every bridge of this version, no call, webhook or setting),
#: and every call Swagger UI makes from them carries the token its "Authorize" dialog holds.
OPEN_PATHS = frozenset({"/v1/health", "/docs", "/openapi.json", "/docs/openapi.json"})
#: Static files served without a token: the console's page and script (a browser loads a page
#: before it can send a header; they hold no data — every call they make carries the token) and
#: the Swagger UI assets of /docs.
OPEN_PREFIXES = ("/console/", "/docs-assets/")
CONSOLE_PATH = "/console"


# --------------------------------------------------------------------------- string validation

#: C0 controls, DEL, C1 controls, and UTF-16 surrogates (JSON can carry an unpaired one as
#: "\ud800"; it cannot be encoded as UTF-8, so it would fail later, far from the request).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: The same, but newline and tab allowed (prose: a prompt, a first message).
_CONTROL_IN_PROSE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
#: What a literal Asterisk extension can be: digits, letters, and * # + _ . - (no spaces, no
#: commas or slashes, which the dialplan treats as separators).
_EXTEN = re.compile(r"[0-9A-Za-z*#+_.-]{1,64}")
#: An Asterisk context name (AST_MAX_CONTEXT is 80 bytes with its terminator).
_CONTEXT = re.compile(r"[0-9A-Za-z_.-]{1,79}")
_DTMF = re.compile(r"[0-9*#A-D]{1,32}")


def _bad_char(value: str, pattern: re.Pattern[str] = _CONTROL) -> str | None:
    """Describe the first forbidden character in ``value`` (None if there is none)."""
    m = pattern.search(value)
    if m is None:
        return None
    code = ord(m.group())
    kind = "an unpaired surrogate" if 0xD800 <= code <= 0xDFFF else "a control character"
    return f"{kind} (U+{code:04X}) at position {m.start()}"


def _no_controls(value: str, name: str, *, prose: bool = False) -> str:
    bad = _bad_char(value, _CONTROL_IN_PROSE if prose else _CONTROL)
    if bad is not None:
        allowed = " (only newline and tab are allowed)" if prose else ""
        raise ValueError(f"{name} must not contain control characters{allowed}: found {bad}")
    return value


def _plain_field(value: str, info: ValidationInfo) -> str:
    return _no_controls(value, info.field_name or "value")


#: A single-line string: no control characters at all (tab included).
Plain = Annotated[str, AfterValidator(_plain_field)]


MAX_METADATA_DEPTH = 32


def _check_json(value: Any, name: str) -> None:
    """Every string in a JSON value (keys too) must be encodable as UTF-8, and the nesting must
    be shallow: the value is serialised again for the store, each webhook and each event
    stream, where a recursion error would be far from the request that caused it."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if (bad := _bad_char(item, _SURROGATE)) is not None:
                raise ValueError(f"{name} must be valid Unicode: found {bad}")
        elif isinstance(item, (dict, list)):
            if depth >= MAX_METADATA_DEPTH:
                raise ValueError(f"{name} is nested deeper than {MAX_METADATA_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _printable(name: str) -> Callable[[str], str]:
    return lambda v: _no_controls(v, name)


#: Path parameters (call and webhook ids): printable, bounded.
CallId = Annotated[str, Path(max_length=128), AfterValidator(_printable("call_id"))]
HookId = Annotated[str, Path(max_length=128), AfterValidator(_printable("hook_id"))]


#: A history filter's value: one line, bounded.
FilterText = Annotated[Plain | None, Query(max_length=200)]


# --------------------------------------------------------------------------- bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartCall(_Body):
    destination: Plain = Field(..., min_length=1, max_length=64, description="number or extension to call")
    profile: Plain | None = Field(None, max_length=100)
    prompt: str | None = Field(None, max_length=20000, description="may contain newlines and tabs")
    first_message: str | None = Field(None, max_length=2000, description="may contain newlines and tabs")
    voice: Plain | None = Field(None, max_length=100)
    language: Plain | None = Field(None, max_length=35)
    caller_id: Plain | None = Field(None, max_length=128)
    variables: dict[Plain, Plain] = Field(default_factory=dict, description="values for prompt {placeholders}")
    metadata: dict[Plain, Any] = Field(default_factory=dict, description="echoed on every event of this call")

    @field_validator("prompt", "first_message")
    @classmethod
    def _prose(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else _no_controls(v, info.field_name or "value", prose=True)

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_json(v, "metadata")
        if len(json.dumps(v, default=str)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
        return v

    @field_validator("variables")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not k.isidentifier():
                raise ValueError(f"variable name {k!r} must be an identifier (letters, digits, _)")
        return v


class Transfer(_Body):
    extension: Plain = Field(..., min_length=1, max_length=64)
    context: Plain | None = Field(None, min_length=1, max_length=79)

    @field_validator("extension")
    @classmethod
    def _exten(cls, v: str) -> str:
        if not _EXTEN.fullmatch(v):
            raise ValueError(f"extension {v!r} is not an Asterisk extension: use 0-9, A-Z, a-z and * # + _ . -")
        return v

    @field_validator("context")
    @classmethod
    def _context(cls, v: str | None) -> str | None:
        if v is not None and not _CONTEXT.fullmatch(v):
            raise ValueError(f"context {v!r} is not an Asterisk context name: use 0-9, A-Z, a-z and _ . -")
        return v


class Dtmf(_Body):
    digits: Plain = Field(..., description="1 to 32 of 0-9 * # A-D")

    @field_validator("digits")
    @classmethod
    def _keys(cls, v: str) -> str:
        if not _DTMF.fullmatch(v):  # a full match: "12\n" is not "12"
            raise ValueError(f"digits {v!r} must be 1 to 32 of 0-9 * # A-D")
        return v


#: Longest text of a mid-call ``context`` or ``say`` command (characters).
MAX_COMMAND_TEXT = 4000
MAX_TOOLS = 128
MAX_TAGS = 32


class CommandText(_Body):
    text: str = Field(..., min_length=1, max_length=MAX_COMMAND_TEXT, description="may contain newlines and tabs")

    @field_validator("text")
    @classmethod
    def _prose(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text must not be blank")
        return _no_controls(v, "text", prose=True)


class ToolsIn(_Body):
    tools: list[Annotated[Plain, Field(min_length=1, max_length=128)]] = Field(
        ..., max_length=MAX_TOOLS, description="names of tools the profile offers; [] for none")


class TagsIn(_Body):
    tags: dict[Annotated[Plain, Field(min_length=1, max_length=64)], Annotated[Plain, Field(max_length=512)]] = \
        Field(..., min_length=1, max_length=MAX_TAGS, description="merged into the call's metadata")


class WebhookIn(_Body):
    url: HttpUrl
    events: list[str] | None = None
    secret: Plain | None = Field(None, min_length=16, max_length=256)
    description: Plain | None = Field(None, max_length=200)

    @field_validator("url", mode="before")
    @classmethod
    def _raw_url(cls, v: Any) -> Any:
        # Before parsing: URL parsing silently drops tabs and newlines, so the URL stored
        # would not be the one sent.
        return _no_controls(v, "url") if isinstance(v, str) else v

    @field_validator("events")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        for e in v or []:
            if e not in EVENT_TYPES:
                raise ValueError(f"unknown event type {e!r}; known: {', '.join(EVENT_TYPES)}")
        return v


# --------------------------------------------------------------------------- access, limits, headers

# Starlette's own ASGI types, so the guard and the routes' responses agree on them.
from starlette.types import ASGIApp, Message, Receive, Scope, Send  # noqa: E402

#: Stamped on every answer: API data must not be cached by a browser or proxy, nor sniffed
#: into something executable.
SECURITY_HEADERS = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))
_SECURITY_HEADER_NAMES = frozenset(name for name, _ in SECURITY_HEADERS)

#: ``host[:port]`` or ``[ipv6][:port]``, as in a Host header or an origin.
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]/@?#\s]+))(?::(?P<port>[0-9]{1,5}))?")
_ORIGIN = re.compile(r"(?i:https?)://(?P<host>.+)")
_WWW_AUTHENTICATE = ((b"www-authenticate", b"Bearer"),)
_LOCAL_ONLY = "without api.token the API answers only requests addressed to 127.0.0.1, [::1] or localhost"
_SAME_MACHINE = "without api.token only this machine's own pages and non-browser clients may call the API"


def loopback_host(value: str) -> bool:
    """True if ``value`` (``host[:port]``, IPv6 in brackets) names this machine's loopback:
    127.0.0.0/8, ::1 or ``localhost`` — written exactly so, not as a prefix of a longer name."""
    m = _HOST.fullmatch(value)
    if m is None:
        return False
    try:
        if m["v6"] is not None:
            return ipaddress.IPv6Address(m["v6"]).is_loopback
        name = m["name"].lower()
        return name == "localhost" or ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def _shown(value: bytes | str, limit: int = 100) -> str:
    """A client-supplied value, quoted and cut short, safe to put in an answer or a log line."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


@dataclass(frozen=True)
class Refusal:
    status: int
    cause: str  #: one of REFUSAL_CAUSES: refusals are logged once per cause, and counted by it
    detail: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


REFUSAL_CAUSES = ("host", "origin", "sec-fetch-site", "token-missing", "token-wrong", "content-length", "body",
                  "event-streams")


class RefusalLog:
    """Logs the first refusal of each cause at warning level and the rest at debug, with counts.

    A hostile page can send thousands of requests a second; one warning per cause tells the
    operator what is happening without letting it fill the disk.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def collect(self) -> Iterator[Metric]:
        """prometheus_client collector: one series per cause, present from the start (zero until it
        happens), read from :attr:`counts` when ``/metrics`` is scraped."""
        family = CounterMetricFamily("voxbridge_api_refused",
                                     "API requests refused by the access, size and stream limits.", labels=["cause"])
        for cause in REFUSAL_CAUSES:
            family.add_metric([cause], self.counts[cause])
        yield family

    def metrics(self) -> str:
        """Prometheus text of :meth:`collect` (bridge/metrics.py renders it)."""
        registry = CollectorRegistry()
        registry.register(self)
        return render_metrics(registry)

    def note(self, refusal: Refusal, path: str) -> None:
        self.counts[refusal.cause] += 1
        if self.counts[refusal.cause] == 1:
            log.warning("API request to %s refused (%d): %s [further refusals of this kind are logged at debug level]",
                        _shown(path), refusal.status, refusal.detail)
        else:
            log.debug("API request to %s refused (%d, %d so far): %s", _shown(path), refusal.status,
                      self.counts[refusal.cause], refusal.detail)


class ApiGuard:
    """Pure ASGI: who may use the API, how big a request may be, and the headers on every answer.

    It wraps the whole application, so no route (FastAPI's own ``/docs`` and ``/openapi.json``,
    a 404 for a path that does not exist) is served before it has decided. See the module
    docstring for the rules.
    """

    def __init__(self, app: ASGIApp, *, token: bytes | None, max_body_bytes: int, refusals: RefusalLog) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, list[bytes]] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.lower(), []).append(value)
        refusal = self.check_access(scope["path"], headers)
        if refusal is None and scope["type"] == "http":
            refusal = self._check_length(headers)
        if refusal is not None:
            await self._refuse(scope, send, refusal)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        body = await self._read_body(receive)
        if body is None:
            return  # the client went away before its request was complete: nobody to answer
        if isinstance(body, Refusal):
            await self._refuse(scope, send, body)
            return
        replayed = False

        async def receive_body() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then only http.disconnect (which /v1/events waits for)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in _SECURITY_HEADER_NAMES]
                message = {**message, "headers": [*kept, *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive_body, send_with_headers)

    # -- access

    def check_access(self, path: str, headers: dict[bytes, list[bytes]]) -> Refusal | None:
        if self.token is None:
            return self._check_local(headers)
        if path in OPEN_PATHS or path == CONSOLE_PATH or path.startswith(OPEN_PREFIXES):
            return None
        return self._check_token(headers.get(b"authorization", []))

    def _check_token(self, values: list[bytes]) -> Refusal | None:
        assert self.token is not None
        if not values:
            return Refusal(401, "token-missing", "missing bearer token: send Authorization: Bearer <api.token>",
                           _WWW_AUTHENTICATE)
        if len(values) > 1:
            return Refusal(401, "token-wrong", "more than one Authorization header", _WWW_AUTHENTICATE)
        scheme, _, given = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return Refusal(401, "token-wrong", "the Authorization header must be 'Bearer <api.token>'",
                           _WWW_AUTHENTICATE)
        if not hmac.compare_digest(given.strip(), self.token):
            return Refusal(401, "token-wrong", "wrong bearer token", _WWW_AUTHENTICATE)
        return None

    @staticmethod
    def _check_local(headers: dict[bytes, list[bytes]]) -> Refusal | None:
        hosts = headers.get(b"host", [])
        if len(hosts) != 1 or not loopback_host(hosts[0].decode("latin-1")):
            what = ("no Host header" if not hosts else "more than one Host header" if len(hosts) > 1
                    else f"Host {_shown(hosts[0])} is not a loopback name or address")
            return Refusal(421, "host", f"{what}: {_LOCAL_ONLY} (this refuses DNS rebinding); "
                                        "set api.token to serve other names")
        origins = headers.get(b"origin", [])
        if len(origins) > 1:
            return Refusal(403, "origin", f"more than one Origin header: {_SAME_MACHINE}")
        if origins:
            m = _ORIGIN.fullmatch(origins[0].decode("latin-1"))
            if m is None or not loopback_host(m["host"]):
                return Refusal(403, "origin", f"cross-site request refused: Origin {_shown(origins[0])} is not "
                                              f"a loopback http(s) origin; {_SAME_MACHINE}")
        if any(v.strip().lower() == b"cross-site" for v in headers.get(b"sec-fetch-site", [])):
            return Refusal(403, "sec-fetch-site", f"cross-site request refused (Sec-Fetch-Site: cross-site); "
                                                  f"{_SAME_MACHINE}")
        return None

    # -- body size

    def _too_large(self, size: str) -> Refusal:
        return Refusal(413, "body", f"request body {size}larger than the limit of {self.max_body_bytes} bytes "
                                    "(api.max_body_bytes)")

    def _check_length(self, headers: dict[bytes, list[bytes]]) -> Refusal | None:
        """Refuse on ``Content-Length`` alone, before a byte of the body is read."""
        for raw in headers.get(b"content-length", []):
            if not raw.isdigit():
                return Refusal(400, "content-length", f"invalid Content-Length header {_shown(raw)}")
            if int(raw) > self.max_body_bytes:
                return self._too_large(f"of {int(raw)} bytes is ")
        return None

    async def _read_body(self, receive: Receive) -> bytes | Refusal | None:
        """The whole body, counted as it arrives: refused as soon as it passes the cap (a chunked
        body has no Content-Length to check first). None if the client disconnected."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self._too_large("is ")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        self.refusals.note(refusal, scope["path"])
        if scope["type"] == "websocket":  # before accept: the server answers the handshake with 403
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.detail[:120]})
            return
        body = json.dumps({"detail": refusal.detail}).encode()
        # Connection: close — the client may still be sending a body nobody will read.
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *refusal.headers, *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})


class _GuardedApp(FastAPI):
    """FastAPI with an :class:`ApiGuard` as its outermost layer — outside even Starlette's error
    handler, so that every answer, a 500 included, goes through it."""

    def __init__(self, guard: Callable[[ASGIApp], ASGIApp], **kwargs: Any) -> None:
        self._guard = guard
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> Any:
        return self._guard(super().build_middleware_stack())

    #: Set when the API has a token: the schema then declares the bearer scheme, so /docs's
    #: "Authorize" dialog takes the token and Swagger UI sends it on every call it makes.
    bearer = False

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None and self.bearer:
            schema = super().openapi()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "api.token"}
            schema["security"] = [{"bearer": []}]
            for path in OPEN_PATHS:  # these need no token
                for operation in schema.get("paths", {}).get(path, {}).values():
                    operation["security"] = []
            self.openapi_schema = schema
        return super().openapi()


class _EscapedJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped. A 422 echoes the client's input, which may
    hold an unpaired surrogate (``"\\ud800"`` in JSON): UTF-8 cannot encode it, so the default
    renderer would turn a validation error into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _invalid_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return _EscapedJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return _EscapedJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


class _StreamSlots:
    """Counts open ``/v1/events`` streams against :data:`MAX_EVENT_STREAMS`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give_back(self) -> None:
        self.used -= 1


class _EventStream(StreamingResponse):
    """An SSE response that runs ``on_close`` however it ends — client gone, server stopping, or
    never iterated at all (a generator's ``finally`` does not run if it never started)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# --------------------------------------------------------------------------- console and docs files

#: The console's files (bridge/console/), served from memory: name → media type.
CONSOLE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                 "app.css": "text/css; charset=utf-8"}
#: The console runs only its own script and style (no inline code, nothing from elsewhere); it talks
#: only to this API, plays recordings from blob: URLs it made itself, and may not be framed.
CONSOLE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
               "media-src blob:; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CONSOLE_HEADERS = {"Content-Security-Policy": CONSOLE_CSP, "Referrer-Policy": "no-referrer",
                   "X-Frame-Options": "DENY"}
#: The Swagger UI files /docs uses (the swagger-ui-bundle package's copy): name → media type.
SWAGGER_ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
                  "favicon-32x32.png": "image/png"}


def _console_files() -> dict[str, tuple[bytes, str]]:
    """The console's files, read once from the package (declared as package data)."""
    root = importlib.resources.files("bridge") / "console"
    return {name: (root.joinpath(name).read_bytes(), media_type) for name, media_type in CONSOLE_FILES.items()}


# --------------------------------------------------------------------------- app


def create_app(bridge: Bridge) -> FastAPI:
    cfg = bridge.config.api
    token = cfg.token.get_secret_value().encode() if cfg.token else None
    refusals = RefusalLog()

    def guard(inner: ASGIApp) -> ASGIApp:
        return ApiGuard(inner, token=token, max_body_bytes=cfg.max_body_bytes, refusals=refusals)

    # /docs is served below from the bridge's own copy of Swagger UI (an air-gapped PBX has no
    # CDN); ReDoc has no such copy, so it is not offered rather than served blank.
    app = _GuardedApp(guard, title="voxbridge", version=__version__, docs_url=None, redoc_url=None,
                      description="Start, follow and control AI phone calls; subscribe to call events.")
    app.bearer = token is not None
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    streams = _StreamSlots(MAX_EVENT_STREAMS)

    async def on_owner(call_id: str, path: str, body: Any = None, method: str = "POST") -> dict[str, Any] | None:
        """In a cluster, a call another node owns: that node runs the command and this returns
        ITS answer (or raises its error); None when the call is not elsewhere."""
        if call_id in bridge.sessions:
            return None
        try:
            answer = await bridge.router.forward(call_id, method, path, body)
        except CommandUnanswered as exc:
            raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, str(exc)) from None
        if answer is None:
            return None
        code, payload = answer
        if code >= 400:
            detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
            raise HTTPException(code, detail)
        return cast(dict[str, Any], payload)

    def live(call_id: str):
        session = bridge.sessions.get(call_id)
        if session is None:
            raise HTTPException(status.HTTP_409_CONFLICT if call_id in bridge.known_ended else
                                status.HTTP_404_NOT_FOUND,
                                f"call {call_id} is not in progress")
        return session

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        cluster = getattr(bridge, "cluster", None)
        recordings = getattr(bridge, "recordings", None)
        return {"status": "ok", "version": __version__, "calls_active": len(bridge.sessions),
                "node": cluster.node_id if cluster is not None else None,
                "ami_connected": bool(bridge.ami and bridge.ami.connected.is_set()),
                # MCP tool sources (tools/mcp.py): a source that is down leaves the bridge "ok"
                "tool_sources": {s.name: s.health() for s in getattr(bridge, "tool_sources", ())},
                # Disk used by call recordings (bridge/recording.py); null when no profile records
                "recordings": recordings.health() if recordings is not None else None}

    # -- the operator console and /docs, from files inside the package (no CDN)

    console_files = _console_files()

    @app.get(CONSOLE_PATH, include_in_schema=False)
    async def console_page() -> Response:
        body, media_type = console_files["index.html"]
        return Response(body, media_type=media_type, headers=CONSOLE_HEADERS)

    @app.get(CONSOLE_PATH + "/{name}", include_in_schema=False)
    async def console_file(name: Annotated[str, Path(max_length=64)]) -> Response:
        if name not in console_files:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such console file")
        body, media_type = console_files[name]
        return Response(body, media_type=media_type, headers=CONSOLE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        # The bundled Swagger UI (4.x) reads only OpenAPI 3.0: given FastAPI's 3.1 it renders
        # nothing but "Unable to render this definition". It gets the 3.0 rendering.
        return get_swagger_ui_html(openapi_url="/docs/openapi.json", title="voxbridge API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/docs/openapi.json", include_in_schema=False)
    async def docs_schema() -> Response:
        return JSONResponse(openapi_30(app.openapi()))

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: Annotated[str, Path(max_length=64)]) -> Response:
        media_type = SWAGGER_ASSETS.get(name)
        if media_type is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such asset")
        return FileResponse(swagger_ui_path / name, media_type=media_type)

    @app.get("/v1/auth")
    async def auth_check() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/v1/profiles")
    async def profiles() -> dict[str, Any]:
        return {"profiles": [
            {"name": name, "provider": p.provider, "voice": p.voice, "language": p.language,
             "sample_rate": p.sample_rate, "tools": list(p.tools), "default": name == bridge.config.default_profile}
            for name, p in bridge.config.profiles.items()
        ]}

    @app.post("/v1/calls", status_code=status.HTTP_202_ACCEPTED)
    async def start_call(body: StartCall) -> dict[str, str]:
        try:
            call_id = await bridge.start_outbound_call(body)
        except NotAllowed as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
        except LookupError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except ToolError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
        return {"call_id": call_id, "state": "dialing"}

    @app.get("/v1/calls")
    async def list_calls(state: Literal["active", "ended"] | None = None,
                         limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                         caller: FilterText = None, profile: FilterText = None, end_reason: FilterText = None,
                         since: FilterText = None, until: FilterText = None) -> dict[str, Any]:
        """The history, newest first; caller, profile and end_reason match exactly, since/until
        (ISO-8601; UTC unless a zone is given) bound the start time."""
        for name, value in (("since", since), ("until", until)):
            if value is not None:
                try:
                    parse_time(value, name)
                except ValueError as exc:
                    raise HTTPException(422, str(exc)) from None
        return {"calls": await bridge.list_calls(state, limit, offset, caller=caller, profile=profile,
                                                 end_reason=end_reason, since=since, until=until)}

    @app.get("/v1/calls/{call_id}/tools")
    async def call_tools(call_id: CallId) -> dict[str, Any]:
        """Every tool call of a call from the history, in full: arguments (names in
        store.redact_args stay redacted), result, outcome, timings."""
        if await bridge.get_call(call_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no call {call_id}")
        return {"tools": await bridge.store.get_tool_calls(call_id)}

    @app.get("/v1/calls/{call_id}/recording", response_class=FileResponse,
             responses={200: {"content": {"audio/wav": {}}, "description": "stereo WAV: caller left, AI right"}})
    async def recording(call_id: CallId) -> Response:
        recordings = getattr(bridge, "recordings", None)
        if call_id in bridge.sessions and bridge.sessions[call_id].recorder is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, f"call {call_id} is still being recorded: "
                                                          "its recording is ready when it ends")
        path = await recordings.file(call_id) if recordings is not None else None
        if path is None:
            why = ("no profile records calls (profiles.<name>.record)" if recordings is None
                   else "it was not recorded, or its recording was removed (retention, recordings.max_total_mb)")
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no recording of call {call_id}: {why}")
        return FileResponse(path, media_type="audio/wav", filename=path.name)

    @app.get("/v1/calls/{call_id}")
    async def get_call(call_id: CallId) -> dict[str, Any]:
        call = await bridge.get_call(call_id)
        if call is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no call {call_id}")
        return call

    @app.post("/v1/calls/{call_id}/hangup")
    async def hangup(call_id: CallId) -> dict[str, str]:
        if (remote := await on_owner(call_id, f"/v1/calls/{call_id}/hangup")) is not None:
            return remote
        session = live(call_id)
        await bridge.hangup_call(session, "api-hangup")
        return {"call_id": call_id, "state": "ending"}

    @app.post("/v1/calls/{call_id}/transfer")
    async def transfer(call_id: CallId, body: Transfer) -> dict[str, str]:
        if (remote := await on_owner(call_id, f"/v1/calls/{call_id}/transfer", body.model_dump())) is not None:
            return remote
        session = live(call_id)
        try:
            context, exten = bridge.telephony.check_transfer(session, body.extension, body.context)
            with bridge.telephony.handoff(session, f"transferred:{context},{exten}"):
                await bridge.telephony.redirect(session, context, exten)
        except NotAllowed as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
        except ToolError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return {"status": "transferred", "context": context, "extension": exten}

    @app.post("/v1/calls/{call_id}/dtmf")
    async def dtmf(call_id: CallId, body: Dtmf) -> dict[str, str]:
        if (remote := await on_owner(call_id, f"/v1/calls/{call_id}/dtmf", body.model_dump())) is not None:
            return remote
        session = live(call_id)
        try:
            await bridge.telephony.play_dtmf(session, body.digits)
        except ToolError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return {"call_id": call_id, "digits": body.digits}

    # -- mid-call commands (bridge/session.py carries them out; the adapters declare what they can)

    def commandable(call_id: str) -> Any:
        """The live call, or 404: an ended call takes no command (409 means "cannot do that")."""
        session = bridge.sessions.get(call_id)
        if session is None:
            gone = "has ended" if call_id in bridge.known_ended else "is not in progress"
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"call {call_id} {gone}")
        return session

    async def command(call_id: str, name: str, run: Callable[[Any], dict[str, Any] | None], *,
                      path: str, body: Any = None, method: str = "POST") -> dict[str, Any]:
        # In a cluster, the node that owns the call carries the command out and answers.
        if (remote := await on_owner(call_id, f"/v1/calls/{call_id}/{path}", body, method)) is not None:
            return remote
        session = commandable(call_id)
        try:
            extra = run(session) or {}
        except (CommandUnsupported, CommandUnavailable) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"call_id": call_id, "command": name, "ok": True, **extra}

    @app.post("/v1/calls/{call_id}/context")
    async def add_context(call_id: CallId, body: CommandText) -> dict[str, Any]:
        """Add instructions or facts to the live conversation (capability ``context``)."""
        return await command(call_id, "context", lambda s: s.add_context(body.text), path="context",
                             body=body.model_dump())

    @app.post("/v1/calls/{call_id}/say")
    async def say(call_id: CallId, body: CommandText) -> dict[str, Any]:
        """Make the AI say ``text`` now (capability ``say``)."""
        return await command(call_id, "say", lambda s: s.say(body.text), path="say", body=body.model_dump())

    @app.put("/v1/calls/{call_id}/tools")
    async def set_tools(call_id: CallId, body: ToolsIn) -> dict[str, Any]:
        """Replace the tools the AI may call, among those its profile offered (capability ``tools``)."""
        return await command(call_id, "tools", lambda s: {"tools": s.set_tools(list(body.tools))}, path="tools",
                             body=body.model_dump(), method="PUT")

    @app.post("/v1/calls/{call_id}/mute")
    async def mute(call_id: CallId) -> dict[str, Any]:
        """Send silence to the AI instead of the caller's audio (every call)."""
        return await command(call_id, "mute", lambda s: {"muted": True, "changed": s.mute()}, path="mute")

    @app.post("/v1/calls/{call_id}/unmute")
    async def unmute(call_id: CallId) -> dict[str, Any]:
        """Send the caller's audio to the AI again (every call)."""
        return await command(call_id, "unmute", lambda s: {"muted": False, "changed": s.unmute()}, path="unmute")

    @app.post("/v1/calls/{call_id}/tags")
    async def tag(call_id: CallId, body: TagsIn) -> dict[str, Any]:
        """Merge ``tags`` into the call's metadata, carried on every later event (every call)."""
        return await command(call_id, "tag", lambda s: {"metadata": s.add_tags(dict(body.tags))}, path="tags",
                             body=body.model_dump())

    # -- webhooks (the n8n trigger node's lifecycle)

    def public(hook: dict[str, Any]) -> dict[str, Any]:
        return {k: hook[k] for k in ("id", "url", "events", "description", "created_at") if k in hook}

    @app.post("/v1/webhooks", status_code=status.HTTP_201_CREATED)
    async def create_webhook(body: WebhookIn) -> dict[str, Any]:
        try:
            hook = await bridge.webhooks.create(str(body.url), body.events, body.secret, body.description)
        except ValueError as exc:  # a URL the webhook policy refuses, or too many subscriptions
            raise HTTPException(422, str(exc)) from None
        return {**public(hook), "secret": hook["secret"]}

    async def hooks_current() -> None:
        """In a cluster, another node may have changed the subscriptions: reload them if so."""
        if (cluster := getattr(bridge, "cluster", None)) is not None:
            await cluster.hooks_current()

    @app.get("/v1/webhooks")
    async def list_webhooks() -> dict[str, Any]:
        await hooks_current()
        return {"webhooks": [public(h) for h in await bridge.webhooks.list()]}

    @app.get("/v1/webhooks/{hook_id}")
    async def get_webhook(hook_id: HookId) -> dict[str, Any]:
        await hooks_current()
        hook = await bridge.webhooks.get(hook_id)
        if hook is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {hook_id}")
        return public(hook)

    @app.delete("/v1/webhooks/{hook_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_webhook(hook_id: HookId) -> Response:
        if not await bridge.webhooks.delete(hook_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {hook_id}")
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    # -- live stream and metrics

    @app.get("/v1/events")
    async def events(types: Annotated[str | None, Query(max_length=2000)] = None) -> StreamingResponse:
        if types is not None and (bad := _bad_char(types)) is not None:
            raise HTTPException(422, f"types must not contain control characters: found {bad}")
        wanted = {t.strip() for t in types.split(",")} if types else None
        if wanted and (unknown := wanted - set(EVENT_TYPES)):
            raise HTTPException(422, f"unknown event types: {', '.join(sorted(unknown))}")
        if not streams.take():
            refusals.note(Refusal(429, "event-streams", f"too many event streams open (the limit is "
                                                        f"{streams.limit})"), "/v1/events")
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                                f"too many event streams open (the limit is {streams.limit}): close one first")
        sub = bridge.events.subscribe(maxsize=1000, filter=(lambda e: e.type in wanted) if wanted else None)

        def closed() -> None:
            sub.close()
            streams.give_back()

        async def stream() -> AsyncIterator[bytes]:
            yield b": voxbridge event stream\n\n"
            while True:
                try:
                    async with asyncio.timeout(SSE_HEARTBEAT_S):
                        event = await sub.get()
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                data = json.dumps(event.as_dict(), default=str)
                yield f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()

        return _EventStream(stream(), closed, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(bridge.metrics_text() + refusals.metrics(), media_type=METRICS_CONTENT_TYPE)

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our loop: the CLI owns SIGTERM/SIGINT (graceful call shutdown), not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiServer:
    def __init__(self, bridge: Bridge, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.app = create_app(bridge)
        token = bridge.config.api.token
        self._token = token.get_secret_value() if token is not None else None
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Bind here, not in uvicorn: its bind failure ends in sys.exit(1), which must not
        # escape from a task; ours raises a plain OSError naming the address.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen for the API on {self.host}:{self.port}: {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api-server")
        while not self._server.started:
            if self._task.done():
                raise OSError(f"the API server on {self.host}:{self.port} did not start: {self._task.exception()}")
            await asyncio.sleep(0.01)
        log.info("control API on http://%s:%d (docs at /docs)", self.host, self.port)

    async def replay(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Run a command another cluster node routed here through this API, exactly as if it had
        been sent here (same validation, same answers), and return ``(status, body)``."""
        token = self._token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 0))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            r = await client.request(method, path, json=body, headers=headers)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"detail": r.text}

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            async with asyncio.timeout(5):
                await self._task
        except (TimeoutError, Exception):  # noqa: BLE001 - shutting down
            self._task.cancel()
        self._task = None
