"""What every adapter whose wire is one WebSocket shares: connect, the uplink, the receive loop.

An adapter (AillomVox, generic-ws, OpenAI Realtime) subclasses :class:`WebSocketGateway` and
says only what is its protocol's:

* :meth:`WebSocketGateway._opening` — the messages sent right after the handshake (config,
  ``session.init``, ``session.update``…);
* :meth:`WebSocketGateway._encode_audio` — one 20 ms frame of caller PCM as one message
  (raw binary, or base64 in JSON);
* :meth:`WebSocketGateway._on_message` — one received message as zero or more
  :class:`~bridge.gateway.base.GatewayEvent`; it may queue replies with :meth:`send_soon`;
* when the caller's audio may start flowing: :meth:`release_uplink` (at once, after a settle
  time, or on the server's "ready").

The uplink
----------
Caller audio is *held* from connect until :meth:`release_uplink` (bounded by ``hold_ms``, oldest
dropped: the most recent speech is what matters), then sent in order. Once the backlog is gone,
each frame is framed and written straight from :meth:`send_audio` — from the caller leg's read
callback, 50 times a second per call, with no task switch and no coroutine
(:class:`UplinkConnection`). A slow gateway makes the transport's buffer grow past
``DIRECT_WRITE_LIMIT``: frames go back through the queue, whose sender waits for the socket to
drain, and past ``uplink_buffer_ms`` the oldest audio is dropped (counted in ``dropped_up``) so
the caller never falls ever further behind. Control messages (:meth:`send_soon`, tool results)
are never dropped, and always go out before queued audio, in the order they were queued.

Liveness
--------
A gateway that stops answering without closing (a half-open TCP connection: a crashed host, a
NAT or firewall that forgot the flow) sends nothing, so nothing fails by itself. The adapter
pings every ``keepalive_interval`` seconds; a ping unanswered for ``keepalive_timeout`` seconds
fails the connection and :meth:`events` reports an unclean :class:`~bridge.gateway.base.Closed`,
on which the session plays its fallback. Worst case from the last sign of life to the fallback:
``keepalive_interval + keepalive_timeout + CLOSE_TIMEOUT_S`` (the last is how long websockets
waits for the dead peer to finish the closing handshake before dropping the TCP connection).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, cast

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.protocol import State

from .base import Closed, Gateway, GatewayError, GatewayEvent, SessionSetup

log = logging.getLogger("voxbridge.gateway")

#: Most caller audio queued towards a slow gateway before the oldest is dropped.
UPLINK_BUFFER_MS = 2000
#: Largest message we accept from the gateway (a burst of AI audio is ~100 ms–1 s; base64 adds a third).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Caller frames are written straight to the socket while less than this waits in the transport;
#: above it they go through the queue and the sender task, which waits for the socket to drain.
DIRECT_WRITE_LIMIT = 64 * 1024
#: How long a close waits for the gateway's half of the closing handshake before dropping TCP.
CLOSE_TIMEOUT_S = 2.0


class UplinkConnection(ClientConnection):
    """A websockets client connection that can also write one message synchronously.

    The uplink hot path (:meth:`WebSocketGateway.send_audio`, 50 times a second per call) writes
    each caller frame from the leg's read callback, without a coroutine or a task switch.
    websockets' public API offers that in two documented pieces, joined here:

    - ``connect(create_connection=...)`` is its hook for customising the connection with a
      subclass, whose constructor receives the Sans-I/O ``ClientProtocol`` (``websockets.client``,
      documented: ``send_binary()``, ``send_text()``, ``data_to_send()``, ``state``);
    - the connection is the asyncio protocol that ``loop.create_connection`` builds (connect()'s
      other keyword arguments go there), so asyncio hands it its transport in
      ``connection_made()``.

    :meth:`write_message` frames with the former and writes with the latter, exactly as websockets'
    own ``send()`` does before it awaits draining. It is safe to interleave with ``send()``: every
    message an adapter sends is a single frame, framed and written synchronously, so no
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

    def write_message(self, data: bytes | str, write_limit: int) -> bool:
        """Write ``data`` as one message now (binary for bytes, text for str), if the connection
        is open and less than ``write_limit`` bytes wait in the transport. False (nothing
        written) otherwise; raises if the connection fails underneath (the receive side then
        reports it)."""
        protocol, transport = self.uplink_protocol, self.uplink_transport
        if (protocol.state is not State.OPEN or transport is None
                or transport.get_write_buffer_size() >= write_limit):
            return False
        if isinstance(data, str):
            protocol.send_text(data.encode())
        else:
            protocol.send_binary(data)
        for chunk in protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            # An empty chunk (end of stream) only follows a close, never a data frame sent while
            # OPEN; the closing side is websockets' own.
        return True

    # The name the AillomVox adapter's tests and subclasses know.
    def write_binary(self, data: bytes, write_limit: int) -> bool:
        return self.write_message(data, write_limit)


def redact_url(url: str) -> str:
    """A URL fit for a log line: the query (which may carry a key) replaced by ``…``."""
    base, sep, _query = url.partition("?")
    return base + ("?…" if sep else "")


def clip(text: str, n: int = 120) -> str:
    """A received message fit for a log line."""
    return text if len(text) <= n else text[:n] + f"… ({len(text)} chars)"


class ParseProblem(ValueError):
    """A server message we log and ignore (the call goes on)."""


def load_json_object(text: str) -> dict[str, Any]:
    """A received text frame as a JSON object, or :class:`ParseProblem` saying why not."""
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ParseProblem(f"invalid JSON ({exc}): {clip(text)}") from None
    if not isinstance(msg, dict):
        raise ParseProblem(f"message is a JSON {type(msg).__name__}, not an object: {clip(text)}")
    return msg


class WebSocketGateway(Gateway):
    """One AI session over one WebSocket; subclasses speak the protocol (see the module doc)."""

    #: Shown in log lines and errors ("cannot connect to <name> gateway …").
    protocol_name = "websocket"

    def __init__(
        self,
        url: str,
        *,
        call_id: str = "",
        connect_timeout: float = 5.0,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 10.0,
        hold_ms: int = 2000,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        for name, value in (("keepalive_interval", keepalive_interval), ("keepalive_timeout", keepalive_timeout),
                            ("connect_timeout", connect_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self._url = url
        self._headers = dict(headers or {})
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._hold_ms = hold_ms
        self._call = call_id
        self._log = logging.LoggerAdapter(log, {"call": call_id})
        self._ws: UplinkConnection | None = None
        self._control: collections.deque[str | bytes] = collections.deque()
        self._uplink: collections.deque[str | bytes] = collections.deque()
        self._uplink_frames = 0  # audio messages queued (each one 20 ms frame, or what the leg gave)
        self._uplink_limit = 0
        self._hold_limit = 0
        self._released = False
        self._uplink_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._direct = False  # released and the queues drained: write frames from send_audio itself
        self._closed = False
        self._stats = {"frames_up": 0, "bytes_up": 0, "frames_down": 0, "bytes_down": 0, "dropped_up": 0}

    # ------------------------------------------------------------------ what a protocol says

    def _uri(self) -> str:
        """The URI to open (a subclass may add a query)."""
        return self._url

    def _opening(self, setup: SessionSetup) -> list[str | bytes]:
        """The messages sent right after the handshake, in order."""
        return []

    def _encode_audio(self, pcm: bytes) -> str | bytes:
        """One frame of caller PCM (s16le at :attr:`sample_rate`) as one message."""
        return pcm

    def _on_message(self, message: str | bytes) -> Iterable[GatewayEvent]:
        """One received message as events; raise :class:`ParseProblem` to log and ignore it."""
        raise NotImplementedError

    def _after_open(self, setup: SessionSetup) -> None:
        """Called once the opening messages are queued (e.g. to release the uplink at once)."""
        self.release_uplink()

    # ------------------------------------------------------------------ Gateway

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    async def connect(self, setup: SessionSetup) -> None:
        self._configure(setup)
        frame_ms = 20
        self._uplink_limit = max(self._hold_ms, UPLINK_BUFFER_MS) // frame_ms
        self._hold_limit = max(self._hold_ms // frame_ms, 1)
        try:
            ws = await connect(
                self._uri(),
                open_timeout=self._connect_timeout,
                max_size=MAX_MESSAGE_BYTES,
                compression=None,  # PCM does not compress; deflate would only cost CPU
                ping_interval=self._keepalive_interval,
                ping_timeout=self._keepalive_timeout,
                close_timeout=CLOSE_TIMEOUT_S,
                user_agent_header="voxbridge",
                additional_headers=self._headers or None,
                create_connection=UplinkConnection,
            )
            assert isinstance(ws, UplinkConnection)  # what create_connection makes
            self._ws = ws
        except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as exc:
            # A header websockets refuses is quoted in its message, and ours carry credentials.
            why = ("a request header websockets refused (not shown: it may hold a credential)"
                   if isinstance(exc, websockets.exceptions.InvalidHeader) else str(exc) or type(exc).__name__)
            raise GatewayError(f"cannot connect to {self.protocol_name} gateway {redact_url(self._url)}: {why}") \
                from None
        try:
            for message in self._opening(setup):
                await self._ws.send(message)
        except websockets.exceptions.ConnectionClosed as exc:
            raise GatewayError(f"{self.protocol_name} gateway closed the connection during set-up: {exc}") from None
        self._sender = asyncio.create_task(self._send_loop(), name=f"gateway-uplink-{self._call}")
        self._after_open(setup)
        self._log.info("%s gateway session open: %s rate=%d/%d tools=%d", self.protocol_name,
                       redact_url(self._url), self.sample_rate, self.output_rate or self.sample_rate,
                       len(setup.tools))

    def _configure(self, setup: SessionSetup) -> None:
        """Choose the rates from the set-up (before connecting). Default: the profile's rate."""
        self.sample_rate = setup.sample_rate

    def release_uplink(self) -> None:
        """The gateway is ready for caller audio: what was held goes out, in order."""
        if not self._released:
            self._released = True
            self._uplink_ready.set()

    def send_soon(self, msg: Mapping[str, Any] | str) -> None:
        """Queue a control message (a dict is sent as JSON): in order, before queued audio, never dropped."""
        if self._closed:
            return
        self._control.append(msg if isinstance(msg, str) else json.dumps(msg, separators=(",", ":")))
        self._direct = False  # keep the order: audio behind it waits for the sender
        self._uplink_ready.set()

    def send_audio(self, pcm: bytes) -> None:
        if self._closed or not pcm:
            return
        message = self._encode_audio(pcm)
        if self._direct and not self._uplink:
            # Hot path (50 times a second per call): frame the message and write it now, from the
            # leg's read callback: no task switch, no per-frame coroutine. The order with queued
            # and control messages holds: websockets frames every message synchronously when it
            # is sent, and both queues are empty here.
            ws = self._ws
            assert ws is not None
            try:
                written = ws.write_message(message, DIRECT_WRITE_LIMIT)
            except Exception:  # noqa: BLE001 - closing underneath us: the receive side reports it
                self._direct = False
                return
            if written:
                stats = self._stats
                stats["frames_up"] += 1
                stats["bytes_up"] += len(pcm)
                return
            # Back-pressure (or closing): queue, and let the sender wait for the socket to drain.
        self._uplink.append(message)
        limit = self._uplink_limit if self._released else self._hold_limit
        while len(self._uplink) > limit:
            # Oldest first: while held we keep the most recent speech; later, a gateway that
            # cannot keep up loses stale audio rather than falling ever further behind.
            self._uplink.popleft()
            self._stats["dropped_up"] += 1
        if self._released:
            self._uplink_ready.set()

    async def _send_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        control, uplink, stats = self._control, self._uplink, self._stats
        try:
            while True:
                await self._uplink_ready.wait()
                self._uplink_ready.clear()
                while control or (self._released and uplink):
                    if control:
                        await ws.send(control.popleft())
                        continue
                    message = uplink.popleft()
                    await ws.send(message)  # one message per frame: 20 ms granularity, never batched
                    stats["frames_up"] += 1
                    stats["bytes_up"] += self._pcm_len(message)
                if self._released:
                    # Released and caught up: send_audio writes directly again until the next backlog.
                    self._direct = True
        except websockets.exceptions.ConnectionClosed:
            pass  # the receive side reports Closed

    def _pcm_len(self, message: str | bytes) -> int:
        """How many bytes of PCM a queued audio message carries (for the counters)."""
        return len(message) if isinstance(message, bytes) else len(message) * 3 // 4

    async def send_json(self, msg: Mapping[str, Any]) -> bool:
        """Send a control message now, in order with :meth:`send_soon`'s; False if the connection is gone."""
        if self._ws is None or self._closed:
            return False
        if self._control:
            self.send_soon(msg)  # behind what is already queued
            return True
        try:
            await self._ws.send(json.dumps(msg, separators=(",", ":")))
            return True
        except websockets.exceptions.ConnectionClosed:
            self._log.warning("%s gateway connection closed; could not send %s", self.protocol_name,
                              msg.get("type", "a message"))
            return False

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
                try:
                    for event in self._on_message(message):
                        yield event
                except ParseProblem as exc:
                    self._log.warning("ignored %s gateway message: %s", self.protocol_name, exc)
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

    def _count_down(self, nbytes: int) -> None:
        self._stats["frames_down"] += 1
        self._stats["bytes_down"] += nbytes

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
        self._control.clear()
