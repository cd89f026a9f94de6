"""AillomVox gateway adapter (the primary protocol).

Wire protocol (the gateway vendor publishes it; bridge/devtools/gateway_sim.py is our strict reference
implementation of it, and the adapter is tested against that):

* WebSocket; the first message is a JSON text frame ``{"type": "config", "apikey": …}``.
  Anything binary before it gets the connection closed with 1008.
* Then raw binary frames of s16le mono PCM at ``sample_rate``, both ways, no wrapper.
* Server → client JSON: ``transcript``, ``tool_call``, ``playback_clear_buffer``, ``hangup``, ``error``.
* Client → server JSON: ``tool_result`` (within 15 s of each ``tool_call``), ``hangup``.

The gateway mentions "~500 ms stabilisation" after config but sends no ready event, so caller
audio is held (bounded) for ``settle_ms`` and then released in order, one message per frame.

A gateway that stops answering without closing (a half-open TCP connection: a crashed host, a
NAT or firewall that forgot the flow) sends nothing, so nothing fails by itself. The adapter
pings every ``keepalive_interval`` seconds; a ping unanswered for ``keepalive_timeout`` seconds
fails the connection and :meth:`AillomVoxGateway.events` reports an unclean :class:`Closed`,
on which the session plays its fallback. Worst case from the last sign of life to the fallback:
``keepalive_interval + keepalive_timeout + CLOSE_TIMEOUT_S`` (the last is how long websockets
waits for the dead peer to finish the closing handshake before dropping the TCP connection).

Parsing is split from I/O: :func:`parse_server_message` is pure (text in, event or ``None`` out)
and is what the unit tests exercise.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import quote

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.protocol import State

from .base import (
    AudioOut,
    ClearPlayback,
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

log = logging.getLogger("voxbridge.gateway")

#: Most caller audio queued towards a slow gateway before the oldest is dropped.
UPLINK_BUFFER_MS = 2000
#: Largest message we accept from the gateway (a burst of AI audio is ~100 ms–1 s).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Caller frames are written straight to the socket while less than this waits in the transport;
#: above it they go through the queue and the sender task, which waits for the socket to drain.
DIRECT_WRITE_LIMIT = 64 * 1024
#: How long a close waits for the gateway's half of the closing handshake before dropping TCP.
CLOSE_TIMEOUT_S = 2.0


class UplinkConnection(ClientConnection):
    """A websockets client connection that can also write one binary message synchronously.

    The uplink hot path (:meth:`AillomVoxGateway.send_audio`, 50 times a second per call) writes
    each caller frame from the AudioSocket read callback, without a coroutine or a task switch.
    websockets' public API offers that in two documented pieces, joined here:

    - ``connect(create_connection=...)`` is its hook for customising the connection with a
      subclass, whose constructor receives the Sans-I/O ``ClientProtocol`` (``websockets.client``,
      documented: ``send_binary()``, ``data_to_send()``, ``state``);
    - the connection is the asyncio protocol that ``loop.create_connection`` builds (connect()'s
      other keyword arguments go there), so asyncio hands it its transport in
      ``connection_made()``.

    :meth:`write_binary` frames with the former and writes with the latter, exactly as websockets'
    own ``send()`` does before it awaits draining. It is safe to interleave with ``send()``: every
    message this adapter sends is a single frame, framed and written synchronously, so no
    fragmented message is ever in progress.
    """

    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        super().__init__(protocol, **kwargs)
        self.uplink_protocol = protocol
        self.uplink_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A stream transport (not necessarily an asyncio.Transport instance: uvloop has its own).
        self.uplink_transport = cast(asyncio.Transport, transport)

    def write_binary(self, data: bytes, write_limit: int) -> bool:
        """Write ``data`` as one binary message now, if the connection is open and less than
        ``write_limit`` bytes wait in the transport. False (nothing written) otherwise; raises
        if the connection fails underneath (the receive side then reports it)."""
        protocol, transport = self.uplink_protocol, self.uplink_transport
        if (protocol.state is not State.OPEN or transport is None
                or transport.get_write_buffer_size() >= write_limit):
            return False
        protocol.send_binary(data)
        for chunk in protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            # An empty chunk (end of stream) only follows a close, never a data frame sent while
            # OPEN; the closing side is websockets' own.
        return True


def build_config(setup: SessionSetup, api_key: str) -> dict[str, Any]:
    """The first message. Optional fields are sent only when set."""
    msg: dict[str, Any] = {
        "type": "config",
        "apikey": api_key,
        "provider": setup.provider,
        "sample_rate": setup.sample_rate,
        "system_prompt": setup.system_prompt,
    }
    for key in ("voice", "language", "first_message", "farewell_message"):
        value = getattr(setup, key)
        if value is not None:
            msg[key] = value
    msg["max_duration"] = setup.max_duration
    if setup.tools:
        msg["tools"] = setup.tools
    return msg


class ParseProblem(ValueError):
    """A server message we log and ignore (the call goes on)."""


def parse_server_message(text: str) -> GatewayEvent:
    """Parse one JSON text frame from the gateway.

    Raises :class:`ParseProblem` for invalid JSON, a missing/unknown ``type`` or malformed
    fields — except for a ``tool_call`` that has a usable ``call_id``: that becomes a
    :class:`ToolCall` with ``problem`` set, because the gateway is waiting for an answer.
    """
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ParseProblem(f"invalid JSON ({exc}): {_clip(text)}") from None
    if not isinstance(msg, dict):
        raise ParseProblem(f"message is a JSON {type(msg).__name__}, not an object: {_clip(text)}")
    mtype = msg.get("type")
    if mtype == "playback_clear_buffer":
        return ClearPlayback()
    if mtype == "hangup":
        return RemoteHangup()
    if mtype == "transcript":
        role, text_, final = msg.get("role"), msg.get("text"), msg.get("final", False)
        if not isinstance(role, str) or not isinstance(text_, str) or not isinstance(final, bool):
            raise ParseProblem(f"transcript needs string role/text and boolean final: {_clip(text)}")
        return Transcript(role=role, text=text_, final=final)
    if mtype == "error":
        message = msg.get("message")
        return RemoteError(message=str(message) if message is not None else "(no message)")
    if mtype == "tool_call":
        call_id = msg.get("call_id")
        if not isinstance(call_id, (str, int)) or isinstance(call_id, bool) or str(call_id) == "":
            raise ParseProblem(f"tool_call without a usable call_id cannot be answered: {_clip(text)}")
        call_id = str(call_id)
        name = msg.get("name")
        args = msg.get("args", {})
        if isinstance(args, str):  # some providers double-encode arguments
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return ToolCall(call_id, str(name or ""), {}, problem="arguments are not valid JSON")
        if args is None:
            args = {}
        if not isinstance(name, str) or not name:
            return ToolCall(call_id, "", {}, problem="tool_call has no tool name")
        if not isinstance(args, dict):
            return ToolCall(call_id, name, {}, problem=f"arguments must be a JSON object, got {type(args).__name__}")
        return ToolCall(call_id, name, args)
    if mtype is None:
        raise ParseProblem(f"message has no 'type': {_clip(text)}")
    raise ParseProblem(f"unknown message type {mtype!r}")


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + f"… ({len(text)} chars)"


def redact_url(url: str) -> str:
    base, sep, _query = url.partition("?")
    return base + ("?…" if sep else "")


class AillomVoxGateway(Gateway):
    """One AillomVox session over a WebSocket."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        api_key_in_query: bool = False,
        connect_timeout: float = 5.0,
        settle_ms: int = 500,
        settle_buffer_ms: int = 2000,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 10.0,
        call_id: str = "",
    ) -> None:
        for name, value in (("keepalive_interval", keepalive_interval), ("keepalive_timeout", keepalive_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._url = url
        self._api_key = api_key
        self._api_key_in_query = api_key_in_query
        self._connect_timeout = connect_timeout
        self._settle_s = settle_ms / 1000
        self._settle_buffer_ms = settle_buffer_ms
        self._log = logging.LoggerAdapter(log, {"call": call_id})
        self._call = call_id
        self._ws: UplinkConnection | None = None
        self._uplink: collections.deque[bytes] = collections.deque()
        self._uplink_bytes = 0
        self._uplink_limit = 0
        self._uplink_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._direct = False  # settled and the queue drained: write frames from send_audio itself
        self._closed = False
        self.sample_rate = 8000
        self._stats = {"frames_up": 0, "bytes_up": 0, "frames_down": 0, "bytes_down": 0, "dropped_up": 0}

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    async def connect(self, setup: SessionSetup) -> None:
        self.sample_rate = setup.sample_rate
        bytes_per_ms = setup.sample_rate * 2 // 1000
        self._uplink_limit = max(self._settle_buffer_ms, UPLINK_BUFFER_MS) * bytes_per_ms
        self._settle_limit = self._settle_buffer_ms * bytes_per_ms
        uri = self._url
        if self._api_key_in_query:
            uri += ("&" if "?" in uri else "?") + "apiKey=" + quote(self._api_key, safe="")
        try:
            ws = await connect(
                uri,
                open_timeout=self._connect_timeout,
                max_size=MAX_MESSAGE_BYTES,
                compression=None,  # PCM does not compress; deflate would only cost CPU
                ping_interval=self._keepalive_interval,
                ping_timeout=self._keepalive_timeout,
                close_timeout=CLOSE_TIMEOUT_S,
                user_agent_header="voxbridge",
                create_connection=UplinkConnection,
            )
            assert isinstance(ws, UplinkConnection)  # what create_connection makes
            self._ws = ws
        except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as exc:
            raise GatewayError(
                f"cannot connect to gateway {redact_url(self._url)}: {exc or type(exc).__name__}") from None
        try:
            await self._ws.send(json.dumps(build_config(setup, self._api_key)))
        except websockets.exceptions.ConnectionClosed as exc:
            raise GatewayError(f"gateway closed the connection before the config was sent: {exc}") from None
        self._settled_at = asyncio.get_running_loop().time() + self._settle_s
        self._sender = asyncio.create_task(self._send_loop(), name=f"gateway-uplink-{self._call}")
        self._log.info(
            "gateway session open: %s provider=%s rate=%d tools=%d",
            redact_url(self._url), setup.provider, setup.sample_rate, len(setup.tools),
        )

    def send_audio(self, pcm: bytes) -> None:
        if self._closed or not pcm:
            return
        if self._direct and not self._uplink:
            # Hot path (50 times a second per call): frame the message and write it now, from the
            # AudioSocket read callback: no task switch, no per-frame coroutine. The order with
            # queued and JSON messages holds: websockets frames every message synchronously when
            # it is sent, and the queue is empty here.
            ws = self._ws
            assert ws is not None
            try:
                written = ws.write_binary(pcm, DIRECT_WRITE_LIMIT)
            except Exception:  # noqa: BLE001 - closing underneath us: the receive side reports it
                self._direct = False
                return
            if written:
                stats = self._stats
                stats["frames_up"] += 1
                stats["bytes_up"] += len(pcm)
                return
            # Back-pressure (or closing): queue, and let the sender wait for the socket to drain.
        self._uplink.append(pcm)
        self._uplink_bytes += len(pcm)
        settling = self._ws is None or asyncio.get_running_loop().time() < self._settled_at
        limit = self._settle_limit if settling else self._uplink_limit
        while self._uplink_bytes > limit and self._uplink:
            # Oldest first: during settle we keep the most recent speech; later, a gateway that
            # cannot keep up loses stale audio rather than falling ever further behind.
            self._uplink_bytes -= len(self._uplink.popleft())
            self._stats["dropped_up"] += 1
        self._uplink_ready.set()

    async def _send_loop(self) -> None:
        assert self._ws is not None
        ws = self._ws
        delay = self._settled_at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            while True:
                await self._uplink_ready.wait()
                self._uplink_ready.clear()
                while self._uplink:
                    pcm = self._uplink.popleft()
                    self._uplink_bytes -= len(pcm)
                    await ws.send(pcm)  # one message per frame: 20 ms granularity, never batched
                    self._stats["frames_up"] += 1
                    self._stats["bytes_up"] += len(pcm)
                # Settled and caught up: send_audio writes directly again until the next backlog.
                self._direct = True
        except websockets.exceptions.ConnectionClosed:
            pass  # the receive side reports Closed

    async def send_tool_result(self, call_id: str, result: str) -> None:
        await self._send_json({"type": "tool_result", "call_id": call_id, "result": result})

    async def _send_json(self, msg: dict[str, Any]) -> bool:
        if self._ws is None:
            return False
        try:
            await self._ws.send(json.dumps(msg))
            return True
        except websockets.exceptions.ConnectionClosed:
            self._log.warning("gateway connection closed; could not send %s", msg.get("type"))
            return False

    async def hangup(self) -> None:
        if self._ws is not None and not self._closed:
            await self._send_json({"type": "hangup"})
        await self.close()

    async def events(self) -> AsyncIterator[GatewayEvent]:
        ws = self._ws
        if ws is None:
            yield Closed(None, "never connected", clean=False)
            return
        # recv() rather than ``async for``: iteration swallows the ConnectionClosed whose public
        # ``rcvd``/``sent`` close frames say how the connection ended (the asyncio connection
        # itself has no such attributes).
        try:
            while True:
                message = await ws.recv()
                if isinstance(message, bytes):
                    if len(message) % 2:
                        self._log.warning("gateway sent odd-length audio (%d bytes); last byte dropped", len(message))
                        message = message[:-1]
                    if message:
                        self._stats["frames_down"] += 1
                        self._stats["bytes_down"] += len(message)
                        yield AudioOut(message)
                    continue
                try:
                    yield parse_server_message(message)
                except ParseProblem as exc:
                    self._log.warning("ignored gateway message: %s", exc)
        except websockets.exceptions.ConnectionClosed as exc:
            rcvd, sent = exc.rcvd, exc.sent
        code = rcvd.code if rcvd is not None else None
        if rcvd is not None:
            reason = rcvd.reason
        else:
            # Nothing came from the gateway: say what our side saw (e.g. "keepalive ping timeout"
            # when it stopped answering pings), for the operator reading the log.
            reason = f"connection lost ({sent.reason})" if sent is not None and sent.reason else "connection lost"
        yield Closed(code, reason, clean=code in (1000, 1001))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            try:
                await self._sender
            except asyncio.CancelledError:
                pass
        if self._ws is not None:
            try:
                await self._ws.close()
            except Exception:  # noqa: BLE001 - closing a dead socket must not fail teardown
                pass
        self._uplink.clear()
