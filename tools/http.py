"""HTTP tools: a tool call answered by an HTTP endpoint, typically an n8n workflow.

An n8n tool workflow is a **Webhook** node (HTTP method POST, Respond: "Using 'Respond to
Webhook' node") → your nodes → **Respond to Webhook** (respond with JSON). Configure it as::

    tools:
      lookup_order:
        kind: http
        url: https://n8n.example.com/webhook/lookup-order
        description: Look up an order by its number.
        parameters: {type: object, properties: {order_id: {type: string}}, required: [order_id]}
        headers: {X-N8N-Auth: "${N8N_TOOL_TOKEN}"}   # Webhook node "Header Auth"
        hmac_secret: "…"                              # optional body signature
        timeout: 14                                   # one budget for the whole call, ≤ 15 s
        retries: 2                                    # extra attempts on connection errors and 5xx

The request
-----------
``POST`` (or the configured ``method``; a ``GET`` carries the same body, but n8n reads GET
webhooks from the query string, so use POST) with the JSON body::

    {"tool_call_id": "…", "call_id": "…", "tool": "lookup_order",
     "args": {"order_id": "A-1001"},
     "call": {"caller", "called", "channel", "profile", "direction", "variables", "metadata"}}

The arguments are under ``args``, never ``arguments``: n8n's expression sandbox refuses that
property name (``$json.body.arguments`` fails and the workflow answers HTTP 200 with an empty
body). In n8n, read them as ``{{ $json.body.args.order_id }}``.

Headers: ``Content-Type: application/json``, ``Idempotency-Key: <tool call id>`` (the same on
every retry of one tool call: the workflow keeps running after the bridge gives up, so a
workflow with side effects should dedupe on it), ``User-Agent: voxbridge/<version>``, the
configured ``headers``, and with ``hmac_secret``::

    X-Voxbridge-Timestamp: <unix seconds>
    X-Voxbridge-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>

computed over the exact bytes sent (re-signed with a fresh timestamp on each attempt). A
configured header value may reference environment variables as ``${NAME}``; they are expanded
when the tool is built, and a variable that is unset or empty fails configuration loading (it
would otherwise fail every live call). Header values and secrets are never logged.

The answer
----------
- 2xx with a JSON object that has a ``result`` field → that value (``{"result": null}`` reads
  as "ok").
- 2xx with a JSON object whose ``error`` is set (and no ``result``) → a tool error carrying
  that message, so the AI can tell the caller.
- 2xx with any other JSON (object, array, scalar) → the parsed JSON.
- 2xx with non-JSON text → the text, stripped.
- 2xx with an empty body, or JSON ``null``/``{}``/``[]``/``""`` → the tool error "the <name>
  service returned no answer". Some n8n versions answer 200 with an empty body when the
  workflow failed, so an empty success is never trusted. (``204 No Content`` is the one
  explicit "done, nothing to say" and reads as "ok".)
- Any other status → "the <name> service failed (HTTP <status>)", plus a short excerpt when the
  body is a JSON error message. Redirects are not followed (see :func:`make_client`).
- A body larger than ``max_response_bytes`` (after decompression) → a tool error; reading stops
  there.

Deadline and retries
--------------------
One deadline covers the whole tool call, retries and back-off included: ``timeout`` seconds
from the start of :meth:`HttpTool.run` (the router also enforces its own, never above 15 s).
Each attempt is given only the time that remains, so no attempt outlives the budget. Connection
errors (refused, reset, protocol errors) and 5xx answers are retried up to ``retries`` more
times with exponential back-off (0.2 s, 0.4 s, … capped at 2 s, with a little jitter), and
only while the next attempt could still start before the deadline; 4xx answers are never
retried (the policy is bridge/retry.py's, shared with webhook delivery). A retry can repeat
work the endpoint already did (a reset after the request was received): that is what the
idempotency key is for. When the budget runs out the router answers with a timeout error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import RetryCallState, retry_if_exception_type

from bridge import __version__
from bridge.config import ToolConfig
from bridge.retry import Backoff, retrying
from bridge.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

from .base import TOOL_CALL_ID, CallControl, Tool, ToolError

log = logging.getLogger("voxbridge.tools.http")

USER_AGENT = f"voxbridge/{__version__}"

#: Headers the bridge owns: a configured header may not replace them (that would break the
#: signature, the idempotency contract or the HTTP framing), so configuring one is an error.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in ("Content-Type", "Content-Length", "Transfer-Encoding", "Host", "Connection",
              "Idempotency-Key", TIMESTAMP_HEADER, SIGNATURE_HEADER)
)

#: The context keys the request's ``call`` object always carries (README: HTTP tools).
CALL_CONTEXT_KEYS = ("caller", "called", "channel", "profile", "direction", "variables", "metadata")

#: Back-off between attempts (bridge/retry.py): 0.2 s doubling, capped at 2 s. The jitter (up to
#: half of each wait) spreads the retries of many calls that hit the same restarting workflow.
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 2.0
BACKOFF_JITTER = 0.5

#: An attempt that could only get less than this much time is not started: it could not
#: complete a round trip, and the budget is better spent answering the AI.
MIN_ATTEMPT_S = 0.1

#: How much of a non-2xx body is read (for the error excerpt), and how long the excerpt may be.
ERROR_BODY_BYTES = 4096
ERROR_EXCERPT_CHARS = 200

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RETRYABLE_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)


def expand_headers(tool: str, headers: Mapping[str, str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Configured headers with ``${NAME}`` references replaced from ``env`` (default: the process
    environment).

    Raises :class:`ValueError` naming the tool, the header and the variable when a variable is
    unset or empty, when a header is one the bridge owns, or when a value would break the
    request line (CR/LF). Messages never include a header's value.
    """
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    seen: set[str] = set()
    for header, raw in headers.items():
        lower = header.lower()
        if lower in RESERVED_HEADERS:
            raise ValueError(f"tool {tool!r}: header {header!r} is set by voxbridge and cannot be configured")
        if lower in seen:
            raise ValueError(f"tool {tool!r}: header {header!r} is configured twice")
        seen.add(lower)
        if not header or any(c in header for c in " \t\r\n:"):
            raise ValueError(f"tool {tool!r}: {header!r} is not a valid header name")

        def expand(m: re.Match[str], header: str = header) -> str:
            value = env.get(m.group(1))
            if not value:
                # An empty value is treated as missing: "Header Auth" with an empty token fails
                # every call with a 403 that looks like the workflow's fault.
                raise ValueError(f"tool {tool!r}: header {header!r} uses ${{{m.group(1)}}}, "
                                 "but that environment variable is not set (or empty)")
            return value

        value = _ENV_REF.sub(expand, str(raw))
        if "\r" in value or "\n" in value:
            raise ValueError(f"tool {tool!r}: header {header!r} contains a line break (check its environment variable)")
        out[header] = value
    return out


def _error_excerpt(body: bytes) -> str | None:
    """A short, single-line message from a JSON error body (``{"error": …}``/``{"message": …}``),
    or None. Only a message the endpoint shaped as one is passed on: an arbitrary body (an HTML
    error page, a stack trace) is not something the AI should read out."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    message = _message_of(data.get("error")) or _message_of(data.get("message"))
    if not message:
        return None
    message = " ".join(message.split())  # one line, no control characters
    if len(message) > ERROR_EXCERPT_CHARS:
        message = message[: ERROR_EXCERPT_CHARS - 1] + "…"
    return message


def _message_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, dict):  # {"error": {"message": "…", "code": …}}
        inner = value.get("message")
        return (inner.strip() or None) if isinstance(inner, str) else None
    return None


def interpret_response(name: str, status: int, body: bytes) -> Any:
    """What the AI is told for an HTTP answer (see the module docstring for the rules).

    Returns the result value (the router sends a string as is, anything else as JSON) or
    raises :class:`ToolError` with a sentence the AI can use.
    """
    if not 200 <= status < 300:
        excerpt = _error_excerpt(body)
        failed = f"the {name} service failed (HTTP {status})"
        raise ToolError(f"{failed}: {excerpt}" if excerpt else failed)
    if status == 204:
        return None
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        raise ToolError(f"the {name} service returned no answer")
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        if "result" in data and data["result"] is not None:
            return data["result"]
        if data.get("error"):
            message = _message_of(data["error"])
            raise ToolError(message or json.dumps(data["error"], ensure_ascii=False)[:ERROR_EXCERPT_CHARS])
        if "result" in data:  # an explicit {"result": null}: done, nothing to report
            return None
    if data in (None, {}, [], ""):
        raise ToolError(f"the {name} service returned no answer")
    return data


@dataclass(slots=True)
class _Reply:
    status: int
    body: bytes
    location: str | None = None


class _ServerError(Exception):
    """A 5xx answer, raised inside the retry loop so tenacity retries it."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(f"HTTP {reply.status}")
        self.reply = reply


class _ResponseTooLarge(Exception):
    pass


class HttpTool(Tool):
    """A configured ``kind: http`` tool. Build one per tool; share one client among them."""

    def __init__(self, name: str, cfg: ToolConfig, client: httpx.AsyncClient) -> None:
        if not cfg.url:
            raise ValueError(f"tool {name!r}: an http tool needs 'url'")
        url = httpx.URL(cfg.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"tool {name!r}: url must be an absolute http(s) URL")
        self.name = name
        self.description = cfg.description
        self.parameters = cfg.parameters
        self.timeout = cfg.timeout
        self._cfg = cfg
        self._url = url
        self._method = cfg.method
        self._client = client
        self._headers = expand_headers(name, cfg.headers)
        self._secret = cfg.hmac_secret.get_secret_value().encode() if cfg.hmac_secret else None
        # The URL's path and query may themselves be secret (an n8n webhook path is a bearer
        # token of sorts), so logs name only the origin.
        self._origin = f"{url.scheme}://{url.netloc.decode('ascii', errors='replace')}"

    def __repr__(self) -> str:
        return f"HttpTool({self.name!r}, {self._method} {self._origin})"

    def request_body(self, call: CallControl, args: dict[str, Any], tool_call_id: str) -> bytes:
        """The exact bytes sent (and signed): compact UTF-8 JSON, see the module docstring."""
        ctx = dict(call.context())
        ctx.pop("call_id", None)
        fallback: dict[str, Any] = {"profile": call.profile_name, "variables": dict(call.variables),
                                    "metadata": dict(call.metadata)}
        inner = {key: ctx.pop(key, fallback.get(key)) for key in CALL_CONTEXT_KEYS}
        inner.update(ctx)  # anything else the session adds (caller_name…) rides along
        payload = {"tool_call_id": tool_call_id, "call_id": call.call_id, "tool": self.name,
                   "args": args, "call": inner}
        # default=str: call metadata comes from API users; a stray non-JSON value must not
        # turn into a failed tool call.
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")

    def request_headers(self, body: bytes, tool_call_id: str, now: float | None = None) -> dict[str, str]:
        """The headers of one attempt (signed afresh each time when a secret is set)."""
        headers = {"Content-Type": "application/json", "Idempotency-Key": tool_call_id,
                   "User-Agent": USER_AGENT, "Accept": "application/json, text/plain;q=0.9, */*;q=0.5"}
        headers.update(self._headers)  # may replace User-Agent/Accept, never the reserved ones
        if self._secret is not None:
            timestamp = str(int(time.time() if now is None else now))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        return headers

    async def run(self, call: CallControl, args: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._cfg.timeout
        # Outside the router (a test, a direct call) there is no tool call id; an empty
        # idempotency key would make every such request look like the same one.
        tool_call_id = TOOL_CALL_ID.get() or f"vb-{uuid.uuid4().hex}"
        body = self.request_body(call, args, tool_call_id)

        policy = retrying(
            attempts=self._cfg.retries + 1,
            backoff=Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S, BACKOFF_JITTER),
            retry=retry_if_exception_type((*_RETRYABLE_ERRORS, _ServerError)),
            deadline=deadline,
            min_attempt_s=MIN_ATTEMPT_S,
            before_sleep=self._log_retry,
        )
        try:
            # The hard bound: whatever httpx's per-phase timeouts do (a server trickling one
            # byte at a time resets a read timeout forever), nothing runs past the deadline.
            async with asyncio.timeout_at(deadline):
                async for attempt in policy:
                    with attempt:
                        reply = await self._attempt(body, tool_call_id, deadline)
                        if reply.status >= 500:
                            raise _ServerError(reply)
        except _ServerError as exc:
            reply = exc.reply
        except _ResponseTooLarge:
            raise ToolError(f"the tool's answer is larger than {self._cfg.max_response_bytes} bytes") from None
        except httpx.TimeoutException as exc:
            # The attempt was given all the time that remained, so this is the deadline.
            raise TimeoutError(f"the {self.name} service did not answer within {self._cfg.timeout:g} s") from exc
        except httpx.DecodingError:
            log.warning("tool %s: %s sent a body that could not be decoded", self.name, self._origin)
            raise ToolError(f"the {self.name} service returned an unreadable answer") from None
        except httpx.HTTPError as exc:
            log.warning("tool %s: %s unreachable: %s", self.name, self._origin, type(exc).__name__)
            raise ToolError(f"the {self.name} service could not be reached") from None

        if 300 <= reply.status < 400:
            # Not followed (see make_client); say where it points so the URL can be fixed.
            log.warning("tool %s: %s answered HTTP %d (redirect to %s, not followed): fix the tool's url",
                        self.name, self._origin, reply.status, _origin_of(reply.location))
        elif not 200 <= reply.status < 300:
            log.warning("tool %s: %s answered HTTP %d", self.name, self._origin, reply.status)
        return interpret_response(self.name, reply.status, reply.body)

    async def _attempt(self, body: bytes, tool_call_id: str, deadline: float) -> _Reply:
        """One request, given only the time left until ``deadline``."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        cap = self._cfg.max_response_bytes
        async with self._client.stream(
            self._method, self._url, content=body,
            headers=self.request_headers(body, tool_call_id),
            timeout=httpx.Timeout(remaining),
        ) as response:
            success = 200 <= response.status_code < 300
            limit = cap if success else min(cap, ERROR_BODY_BYTES)
            data = await _read_capped(response, limit, fail=success)
            return _Reply(response.status_code, data, response.headers.get("location"))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        why = str(exc) if isinstance(exc, _ServerError) else type(exc).__name__
        log.warning("tool %s: attempt %d to %s failed (%s); retrying in %.2f s",
                    self.name, state.attempt_number, self._origin, why, state.upcoming_sleep)


async def _read_capped(response: httpx.Response, limit: int, *, fail: bool) -> bytes:
    """The (decoded) body, at most ``limit`` bytes. Past it: raise if ``fail``, else truncate.
    Either way reading stops there; leaving the stream closes the connection instead of
    draining the rest."""
    length = response.headers.get("content-length")
    if fail and length and length.isdigit() and int(length) > limit and "content-encoding" not in response.headers:
        raise _ResponseTooLarge
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) > limit:
            if fail:
                raise _ResponseTooLarge
            return bytes(buf[:limit])
    return bytes(buf)


def _origin_of(location: str | None) -> str:
    if not location:
        return "nowhere"
    try:
        url = httpx.URL(location)
    except httpx.InvalidURL:
        return "an invalid URL"
    return f"{url.scheme}://{url.netloc.decode('ascii', errors='replace')}" if url.host else "the same host"


def build_http_tools(tools: dict[str, ToolConfig], client: httpx.AsyncClient) -> list[HttpTool]:
    """One :class:`HttpTool` per ``kind: http`` entry. Raises :class:`ValueError` (naming the
    tool) for a bad URL, header or missing environment variable, so configuration fails at
    start-up rather than on a live call."""
    return [HttpTool(name, cfg, client) for name, cfg in tools.items() if cfg.kind == "http"]


def make_client() -> httpx.AsyncClient:
    """The shared client for HTTP tools (the caller closes it with ``aclose()``).

    - HTTP/1.1 only (``http2=False``): n8n and most webhook endpoints speak 1.1, and h2 would
      add a dependency for nothing on requests this small.
    - Redirects are **not** followed, to any host: a signed POST carrying call data must not
      be re-sent somewhere the configuration did not name, and a 301/302 would silently turn
      it into a GET. A redirect is a misconfigured URL (http→https, a missing slash); the call
      gets a tool error and the log names where it pointed.
    - A bounded pool (100 connections, 20 kept alive) so a burst of calls cannot open sockets
      without limit. Keep-alive connections are dropped after 4 s idle: Node.js (n8n) closes
      idle connections after 5 s, and reusing one the server is just closing costs a failed
      attempt and a retry.
    - The default timeout is a backstop only; every request gets its own from the deadline.
    - Proxy and CA settings from the environment (``HTTPS_PROXY``, ``NO_PROXY``,
      ``SSL_CERT_FILE``) are honoured, as operators expect.
    """
    return httpx.AsyncClient(
        http2=False,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0),
        timeout=httpx.Timeout(15.0),
        headers={"User-Agent": USER_AGENT},
    )
