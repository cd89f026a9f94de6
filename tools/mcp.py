"""MCP tool sources: the tools of a Model Context Protocol server, discovered rather than declared.

n8n's **MCP Server Trigger** publishes workflows as MCP tools, and many business systems ship an
MCP server. Configured as a tool source::

    tool_sources:
      n8n:
        kind: mcp
        url: http://127.0.0.1:5678/mcp/voxbridge          # the trigger's Production URL
        transport: streamable-http                         # or sse
        headers: {Authorization: "Bearer ${N8N_MCP_TOKEN}"}  # from the environment, like tools' headers
        include: ["*"]                                     # glob patterns of the server's tool names
        exclude: ["admin_*"]
        prefix: ""                                         # put before each name the AI sees
        refresh_s: 300                                     # re-list this often (and on list_changed)
        timeout: 10                                        # per call; the tool deadline caps it
    profiles:
      default:
        tool_sources: [n8n]                                # all of its tools, in addition to `tools`

How a source lives
------------------
:meth:`McpToolSource.run` is a long-lived part (bridge/app.py starts it under the Supervisor): it
connects with the official ``mcp`` client (``streamable_http_client`` or ``sse_client`` and a
``ClientSession``), initialises, lists the tools (every page) and publishes them into the
registry (:meth:`tools.base.ToolRegistry.set_source_tools`). The session stays open: the tools are
listed again every ``refresh_s`` and when the server sends ``notifications/tools/list_changed``;
a ping every :attr:`McpToolSource.keepalive_s` notices a server that went away while idle. When
the connection fails (at start-up or later) the source's tools are withdrawn, the reason is
logged and shown in ``/v1/health`` and ``/metrics``, and it reconnects with back-off
(:attr:`backoff_initial` doubling to :attr:`backoff_max`) until the server is back. A source that
is down never stops the bridge; the calls simply are not offered its tools meanwhile.

The tools
---------
Each listed tool becomes an :class:`McpTool`: the name (``prefix`` + the server's name, with any
character other than letters, digits, ``_`` and ``-`` replaced by ``_``, which is what the AI
gateways accept), the description and the JSON Schema (``inputSchema``) all come from the server.
Its ``run`` sends ``tools/call`` over the source's one session; the router (tools/router.py) gives
it the deadline, validates the arguments against that schema first and cancels it when the call
ends. A cancelled or timed-out request costs only that request: the session goes on serving the
other calls. The answer the AI gets:

- the text content of the result (several parts joined by new lines); a result with only
  structured content → that JSON; non-text parts are summarised (``[image: image/png]``);
- ``isError`` → a tool error carrying the server's text;
- the server gone during the call → one tool error ("… went away during the call"), the source
  reconnects, and the call goes on.

A tool whose name collides with a configured tool or another source's is refused by the registry
(logged with both origins, counted in ``voxbridge_tool_source_refused``); the first registered
keeps the name.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import anyio
import httpx2
import mcp.types as mt
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from bridge import __version__
from bridge.config import ToolSourceConfig
from bridge.retry import Backoff

from .base import CallControl, Tool, ToolError
from .http import expand_headers

log = logging.getLogger("voxbridge.tools.mcp")

#: Connecting, initialising, one listing page and a keepalive ping each get this long.
CONNECT_TIMEOUT_S = 10.0
#: The most tools one source may offer, and the most pages of ``tools/list`` read (bounded everything).
MAX_TOOLS = 256
#: Longest tool name offered (prefix included): the AI services' limit (OpenAI: 64).
MAX_NAME_LENGTH = 64
MAX_PAGES = 32
#: The most characters of one answer handed to the AI (the rest is cut, with a mark).
MAX_RESULT_CHARS = 64 * 1024
#: The most characters of a server's error text passed on.
MAX_ERROR_CHARS = 300

_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")

Publish = Callable[[str, Iterable[Tool]], dict[str, str]]


def _message(exc: BaseException) -> str:
    """One line saying why a connection failed (never a header value: those are not in exceptions)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_message(e) for e in exc.exceptions[:3])
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:MAX_ERROR_CHARS] if text else type(exc).__name__


def _short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def result_text(result: mt.CallToolResult) -> str | None:
    """What the AI is told for a ``tools/call`` result (see the module docstring); None: "ok"."""
    parts: list[str] = []
    for item in result.content:
        if isinstance(item, mt.TextContent):
            parts.append(item.text)
        elif isinstance(item, mt.ImageContent | mt.AudioContent):
            parts.append(f"[{item.type}: {item.mime_type}]")
        elif isinstance(item, mt.ResourceLink):
            parts.append(f"[resource: {item.name or item.uri}]")
        elif isinstance(item, mt.EmbeddedResource):
            res = item.resource
            parts.append(res.text if isinstance(res, mt.TextResourceContents) else f"[resource: {res.uri}]")
        else:
            parts.append(f"[{getattr(item, 'type', 'content')}]")
    text = "\n".join(p for p in parts if p)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content, ensure_ascii=False, default=str)
    if len(text) > MAX_RESULT_CHARS:
        text = text[: MAX_RESULT_CHARS - 1] + "…"
    return text or None


class McpTool(Tool):
    """One tool of an MCP server, called over its source's session."""

    def __init__(self, source: McpToolSource, listed: mt.Tool, name: str) -> None:
        self.name = name
        self.remote_name = listed.name
        self.description = listed.description or listed.title or ""
        schema = dict(listed.input_schema or {})
        schema.setdefault("type", "object")
        self.parameters = schema
        self.timeout = source.cfg.timeout
        self._source = source

    def __repr__(self) -> str:
        return f"McpTool({self.name!r} = {self._source.name}:{self.remote_name})"

    async def run(self, call: CallControl, args: dict[str, Any]) -> Any:
        return await self._source.call_tool(self.remote_name, args, self._source.cfg.timeout)


class McpToolSource:
    """An MCP server whose tools are offered to the profiles that name it (see the module docstring).

    ``publish(source_name, tools) -> refused`` puts the current tools in the registry
    (:meth:`tools.base.ToolRegistry.set_source_tools`).
    """

    #: Seconds between pings while idle (a server that went away is noticed within this plus
    #: :data:`CONNECT_TIMEOUT_S`), and the reconnect back-off: first wait, and its cap.
    keepalive_s = 10.0
    backoff_initial = 0.5
    backoff_max = 30.0

    def __init__(self, name: str, cfg: ToolSourceConfig, publish: Publish) -> None:
        self.name = name
        self.cfg = cfg
        self._publish = publish
        try:
            self._headers = expand_headers(name, cfg.headers)
        except ValueError as exc:
            raise ValueError(f"tool_sources.{name}.headers: {str(exc).removeprefix(f'tool {name!r}: ')}") from None
        self.state = "connecting"  # connecting | up | down
        self.error: str | None = None
        #: The names offered now (after include/exclude, prefix and the registry's refusals).
        self.tools: list[str] = []
        self.refused: dict[str, str] = {}
        self.connects = 0
        self.listings = 0
        self._session: ClientSession | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._list_changed: asyncio.Event = asyncio.Event()
        self._changed: asyncio.Condition | None = None
        self._origin = re.sub(r"^(https?://[^/?#]+).*$", r"\1", cfg.url)

    def __repr__(self) -> str:
        return f"McpToolSource({self.name!r}, {self.cfg.transport} {self._origin}, {self.state})"

    # ------------------------------------------------------------------ what others read

    def health(self) -> dict[str, Any]:
        """For /v1/health and /metrics: never the URL's path or the headers (they may carry secrets)."""
        return {"kind": "mcp", "transport": self.cfg.transport, "state": self.state, "tools": len(self.tools),
                "refused": len(self.refused), "error": self.error}

    async def wait_for(self, predicate: Callable[[McpToolSource], bool], timeout: float) -> None:
        """Until ``predicate(self)`` holds after a change of state or tools (TimeoutError after ``timeout``)."""
        cond = self._condition()
        async with asyncio.timeout(timeout), cond:
            await cond.wait_for(lambda: predicate(self))

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    # ------------------------------------------------------------------ the connection's life

    async def run(self) -> None:
        """Connect, list, keep listing; on failure withdraw the tools and reconnect with back-off.

        Returns only when cancelled. Expected failures (refused, timed out, HTTP errors, the
        server going away) are handled here; anything else is a bug the Supervisor sees.
        """
        backoff = Backoff(self.backoff_initial, self.backoff_max, jitter=0.2)
        attempt = 0
        while True:
            was_up = False
            try:
                was_up = await self._serve_once()
                reason = self.error or "the connection ended"
            except (OSError, TimeoutError, MCPError, httpx2.HTTPError, ValidationError, RuntimeError,
                    anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, ExceptionGroup) as exc:
                reason = _message(exc)
            attempt = 1 if was_up else attempt + 1
            delay = backoff.delay(attempt)
            level = logging.WARNING if was_up or attempt == 1 else logging.DEBUG
            log.log(level, "tool source %s (%s %s) is down: %s; its tools are withdrawn; retrying in %.1f s",
                    self.name, self.cfg.transport, self._origin, reason, delay)
            await self._set_down(reason)
            await asyncio.sleep(delay)

    async def _serve_once(self) -> bool:
        """One connection, until it is lost. Returns whether it got as far as listing the tools."""
        self._lost = asyncio.Event()  # one per connection: calls on it watch this one
        self._list_changed.clear()
        up = False
        async with self._connect() as session:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await session.initialize()
            self.connects += 1
            await self._refresh(session)
            self._session = session
            up = True
            self.state, self.error = "up", None
            log.info("tool source %s (%s %s) is up: %d tool(s): %s", self.name, self.cfg.transport,
                     self._origin, len(self.tools), ", ".join(self.tools) or "none")
            await self._notify()
            loop = asyncio.get_running_loop()
            next_refresh = loop.time() + self.cfg.refresh_s
            while not self._lost.is_set():
                wait = min(self.keepalive_s, max(0.0, next_refresh - loop.time()))
                await self._wait_event(wait)
                if self._lost.is_set():
                    break
                if self._list_changed.is_set() or loop.time() >= next_refresh:
                    self._list_changed.clear()
                    await self._refresh(session)
                    next_refresh = loop.time() + self.cfg.refresh_s
                    await self._notify()
                else:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        await session.send_ping()
            self._session = None
        return up

    async def _wait_event(self, timeout: float) -> None:
        """Until the connection is lost, the server says its list changed, or ``timeout``."""
        lost = asyncio.ensure_future(self._lost.wait())
        changed = asyncio.ensure_future(self._list_changed.wait())
        try:
            await asyncio.wait({lost, changed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            changed.cancel()

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[ClientSession]:
        info = mt.Implementation(name="voxbridge", version=__version__)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.cfg.transport == "sse":
                    read, write = await stack.enter_async_context(sse_client(
                        self.cfg.url, headers=self._headers, timeout=CONNECT_TIMEOUT_S, sse_read_timeout=3600))
                else:
                    client = httpx2.AsyncClient(headers=self._headers,
                                                timeout=httpx2.Timeout(CONNECT_TIMEOUT_S, read=3600))
                    await stack.enter_async_context(client)
                    read, write = await stack.enter_async_context(
                        streamable_http_client(self.cfg.url, http_client=client))
                session = await stack.enter_async_context(
                    ClientSession(read, write, message_handler=self._on_message, client_info=info))
                yield session
        finally:
            self._session = None
            self._lost.set()  # calls still waiting on this connection get their error now

    async def _on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, mt.ToolListChangedNotification):
            log.info("tool source %s: the server's tool list changed; listing again", self.name)
            self._list_changed.set()
        elif isinstance(message, Exception):
            log.debug("tool source %s: transport: %r", self.name, message)

    async def _refresh(self, session: ClientSession) -> None:
        """List every page of tools, keep those configured, publish them."""
        listed: list[mt.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params = mt.PaginatedRequestParams(cursor=cursor) if cursor else None
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                page = await session.list_tools(params=params)
            listed.extend(page.tools)
            cursor = page.next_cursor
            if not cursor or len(listed) >= MAX_TOOLS:
                break
        self.listings += 1
        tools, too_long = self._select(listed)
        self.refused = {**too_long, **self._publish(self.name, tools)}
        self.tools = [t.name for t in tools if t.name not in self.refused]

    def _select(self, listed: list[mt.Tool]) -> tuple[list[McpTool], dict[str, str]]:
        """``include``/``exclude`` (on the server's names), then ``prefix`` and a name the AI accepts;
        and the tools refused for a name too long to offer (name → why)."""
        cfg = self.cfg
        out: list[McpTool] = []
        too_long: dict[str, str] = {}
        for tool in listed:
            remote = tool.name
            if cfg.include and not any(fnmatch.fnmatchcase(remote, p) for p in cfg.include):
                continue
            if any(fnmatch.fnmatchcase(remote, p) for p in cfg.exclude):
                continue
            name = cfg.prefix + _NOT_NAME.sub("_", remote)
            if len(name) > MAX_NAME_LENGTH:
                # The AI services refuse the whole session set-up for one such name (OpenAI:
                # function names of at most 64 characters), which would fail every call.
                why = f"name longer than {MAX_NAME_LENGTH} characters"
                if name not in self.refused:
                    log.warning("tool source %s: tool %r refused: %s (shorten it, or a shorter prefix)",
                                self.name, name, why)
                too_long[name] = why
                continue
            if len(out) >= MAX_TOOLS:
                log.warning("tool source %s offers more than %d tools: the rest are left out (use include)",
                            self.name, MAX_TOOLS)
                break
            out.append(McpTool(self, tool, name))
        return out, too_long

    async def _set_down(self, reason: str) -> None:
        self._session = None
        changed = self.state != "down" or self.error != reason or bool(self.tools)
        self.state, self.error = "down", reason
        if self.tools or self.refused:
            self._publish(self.name, [])
            self.tools, self.refused = [], {}
        if changed:
            await self._notify()

    def _connection_lost(self, session: ClientSession, why: str) -> None:
        """A call found the connection gone: fail the other calls on it, withdraw the tools, reconnect."""
        if self._session is session:
            self._session = None
            self.error = why
            self._lost.set()

    # ------------------------------------------------------------------ calls

    async def call_tool(self, remote_name: str, args: dict[str, Any], timeout: float) -> str | None:
        """``tools/call`` over the open session; the router bounds and may cancel it."""
        session, lost = self._session, self._lost
        if session is None:
            raise ToolError(f"the {self.name} tool server is not reachable right now")
        request = asyncio.ensure_future(session.call_tool(remote_name, args, read_timeout_seconds=timeout))
        watch = asyncio.ensure_future(lost.wait())
        try:
            # The connection found dead by another path (a keepalive, another call) fails this
            # request now, rather than at the deadline.
            await asyncio.wait({request, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not request.done():
                raise ToolError(f"the {self.name} tool server went away during the call")
            result = request.result()
        except MCPError as exc:
            if exc.code == mt.REQUEST_TIMEOUT:
                raise TimeoutError(f"the {self.name} tool server did not answer within {timeout:g} s") from None
            if exc.code == mt.CONNECTION_CLOSED:
                log.warning("tool source %s: the server went away during a call of %s (%s)", self.name,
                            remote_name, _short(exc.message))
                self._connection_lost(session, f"went away during a call: {_short(exc.message)}")
                raise ToolError(f"the {self.name} tool server went away during the call") from None
            raise ToolError(f"the {self.name} tool server refused the call: {_short(exc.message)}") from None
        except (ValidationError, RuntimeError) as exc:  # RuntimeError: a result shape this client refuses
            log.warning("tool source %s: %s answered with a result voxbridge cannot use: %s",
                        self.name, remote_name, _message(exc))
            raise ToolError(f"the {self.name} tool server returned an unreadable answer") from None
        except (OSError, httpx2.HTTPError, anyio.ClosedResourceError, anyio.BrokenResourceError,
                anyio.EndOfStream) as exc:
            # The session's streams are closed, or the transport broke under the request.
            log.warning("tool source %s: call of %s failed: %s", self.name, remote_name, _message(exc))
            self._connection_lost(session, f"failed during a call: {_message(exc)}")
            raise ToolError(f"the {self.name} tool server went away during the call") from None
        finally:
            # Cancelled by the router (deadline, call ended) or settled: the request goes, the
            # session stays (the client tells the server the request was cancelled).
            request.cancel()
            watch.cancel()
        if not isinstance(result, mt.CallToolResult):
            raise ToolError(f"the {self.name} tool server returned an answer voxbridge cannot use")
        text = result_text(result)
        if result.is_error:
            raise ToolError(_short(text or f"the {remote_name} tool failed"))
        return text


def build_mcp_sources(sources: dict[str, ToolSourceConfig], publish: Publish) -> list[McpToolSource]:
    """One :class:`McpToolSource` per ``kind: mcp`` entry. Raises :class:`ValueError` naming the key
    for a header whose environment variable is missing, so configuration fails at start-up."""
    return [McpToolSource(name, cfg, publish) for name, cfg in sources.items() if cfg.kind == "mcp"]


async def first_listing(sources: Iterable[McpToolSource], timeout: float) -> None:
    """Wait until every source has connected or failed once, at most ``timeout`` s (the bridge starts
    either way: a source still connecting offers its tools to the calls that start after)."""
    waits: list[Awaitable[None]] = [s.wait_for(lambda s: s.state != "connecting", timeout) for s in sources]
    if waits:
        await asyncio.gather(*waits, return_exceptions=True)
