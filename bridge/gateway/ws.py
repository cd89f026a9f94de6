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

The downlink
------------
Received messages are not assembled into an asyncio queue and awaited one by one (websockets'
``recv()``: a future, a task switch and an async-generator step per 20 ms of AI audio). The
connection is websockets' asyncio protocol, which feeds the Sans-I/O ``ClientProtocol``; its
data frames are handed straight from ``data_received`` to :meth:`WebSocketGateway._on_message`
and the session's handler (:meth:`WebSocketGateway.deliver`), in arrival order. Handshake,
pings, pongs and the closing handshake stay websockets' own. The loop is never held for long:
when one read carries more than ``DOWNLINK_SLICE_S`` of work, or the handler must await
something (a fallback), the rest waits in a backlog, reading from the socket pauses, and the
delivery task goes on after giving the loop a turn.

Preconnect
----------
A new call's settings can take seconds (under load its AMI channel arrives late; an on_call_start
hook answers over HTTP), and only they say which gateway the call uses. :meth:`WebSocketGateway.preconnect`
runs the handshake meanwhile, for the gateway the call would use if they change nothing, and sends
nothing: the connection is nobody's call yet. :meth:`WebSocketGateway.connect` writes the opening
messages on it if it is still open, else connects as always. A gateway entry the settings picked
that leads to the same :attr:`WebSocketGateway.endpoint` takes the connection over
(:meth:`WebSocketGateway.take_preconnected`); any other is closed by the session, cleanly, having
carried nothing.

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
import functools
import json
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any, cast

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from .base import (
    DOWNLINK_SLICE_S,
    AudioHandler,
    AudioOut,
    Closed,
    EventHandler,
    Gateway,
    GatewayError,
    GatewayEvent,
    SessionSetup,
    cancel_and_wait,
)

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
#: Masking keys are drawn from the OS CSPRNG this many bytes (keys × 4) at a time.
MASK_POOL_BYTES = 1024
#: What a preconnected connection may receive before its opening messages are sent (OpenAI
#: Realtime greets with one ``session.created`` of a few kB; AillomVox and generic-ws say nothing):
#: kept for :meth:`WebSocketGateway.connect` to hand over in order. A server that says more than
#: this before it knows the call is not one whose connection we reuse: connect afresh.
PRECONNECT_MAX_MESSAGES = 16
PRECONNECT_MAX_BYTES = 64 * 1024
_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")
_LENGTH64 = struct.Struct("!Q")
#: The receive side's modes (UplinkConnection.data_received): the handshake response is being
#: read; data frames are parsed here; websockets parses everything.
_RX_HANDSHAKE, _RX_FAST, _RX_WEBSOCKETS = 0, 1, 2
#: Frames the fast path hands websockets whole: continuation, close, ping, pong (and data frames
#: of a fragmented message).
_WEBSOCKETS_OPCODES = frozenset((0, 1, 2, 8, 9, 10))
#: A handshake response longer than this is websockets' to refuse.
_MAX_HANDSHAKE_BYTES = 64 * 1024


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

    :meth:`write_message` checks the former's state and writes with the latter what websockets' own
    ``send()`` writes before it awaits draining: one masked, unfragmented frame (framed here, RFC
    6455 §5.2, since the protocol's framing costs a Frame object and a getrandom() call a frame).
    It is safe to interleave with ``send()``: every message an adapter sends is a single frame,
    framed and written synchronously, so no fragmented message is ever in progress.
    """

    def __init__(self, protocol: ClientProtocol, *, on_message: Callable[[str | bytes], None] | None = None,
                 on_binary: Callable[[bytes], None] | None = None, on_lost: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(protocol, **kwargs)
        self.uplink_protocol = protocol
        self.uplink_transport: asyncio.Transport | None = None
        self._mask_pool = b""
        self._mask_at = 0
        #: With a sink, every data message goes to it from ``data_received`` (text as str,
        #: binary as bytes) instead of websockets' assembler and ``recv()``; ``on_lost`` is
        #: called once the connection is closed (``protocol.close_rcvd``/``close_sent`` then
        #: say how).
        self.on_message = on_message
        self.on_lost = on_lost
        #: With ``on_binary`` too, binary messages go there instead (an adapter whose binary
        #: messages are audio skips the event objects: see :meth:`WebSocketGateway._on_ws_audio`).
        self.on_binary = on_binary
        self._fragments: list[bytes] = []
        self._fragment_opcode: Opcode | None = None
        #: loop.time() of the first message handed over in the current read (0.0: none yet):
        #: the sink's time slice (see :meth:`WebSocketGateway._emit`).
        self.read_started = 0.0
        #: The receive side (see :meth:`data_received`): bytes not parsed yet, and the mode.
        self._rx = bytearray()
        self._rx_mode = _RX_HANDSHAKE
        self._rx_need = 0  # bytes the frame at the start of _rx needs in all (0: not known yet)
        # websockets >= 14 keeps max_size here; the adapters always set it (MAX_MESSAGE_BYTES).
        self._max_message: int | None = getattr(protocol, "max_message_size", MAX_MESSAGE_BYTES)

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
            payload, first = data.encode(), 0x81  # FIN + text
        else:
            payload, first = data, 0x82  # FIN + binary
        if protocol.extensions or protocol.expect_continuation_frame:
            # Not the case for our connections (no compression, no fragments): websockets frames it.
            (protocol.send_text if first == 0x81 else protocol.send_binary)(payload)
            for chunk in protocol.data_to_send():
                if chunk:
                    transport.write(chunk)
            return True
        # Hot path: RFC 6455 §5.2 framing of one unfragmented client frame, as Frame.serialize
        # does it, without a Frame object, a writes list and a getrandom() system call per frame.
        n = len(payload)
        if n < 126:
            header = bytes((first, 0x80 | n))
        elif n < 65536:
            header = _HEADER16.pack(first, 0x80 | 126, n)
        else:
            header = _HEADER64.pack(first, 0x80 | 127, n)
        # A fresh masking key (_mask_key, inlined: this runs 50 times a second per call).
        pool, at = self._mask_pool, self._mask_at
        if at >= len(pool):
            pool, at = os.urandom(MASK_POOL_BYTES), 0
            self._mask_pool = pool
        self._mask_at = at + 4
        mask = pool[at:at + 4]
        transport.write(header + mask + apply_mask(payload, mask))
        return True

    def _mask_key(self) -> bytes:
        """A fresh 4-byte masking key (RFC 6455 §5.3: unpredictable; from the OS CSPRNG, 256 at a time)."""
        pool, at = self._mask_pool, self._mask_at
        if at >= len(pool):
            pool, at = os.urandom(MASK_POOL_BYTES), 0
            self._mask_pool = pool
        self._mask_at = at + 4
        return pool[at:at + 4]

    def data_received(self, data: bytes) -> None:
        """The receive path. websockets parses the handshake, control frames and anything unusual;
        the data frames of an open connection — every 20 ms of AI audio — are parsed here.

        websockets' parser is a chain of generators (a ``Frame``, an ``Opcode`` lookup, three
        ``read_exact`` steps and an event list per frame), the largest cost per message on the
        downlink in the load benchmark. An unfragmented, unmasked, unextended data frame of an
        open connection needs none of it: header, length, payload (RFC 6455 §5.2), then the sink.
        websockets is handed *whole* frames only — the handshake response up to its blank line,
        then each control or fragmented frame — so its parser always stands at a frame boundary
        and its state (pings, pongs, the closing handshake, fragmented messages) stays its own.
        A frame it must judge (reserved bits, a masked server frame, an unknown opcode, a frame
        over ``max_size``) hands it the rest of the stream for good: it fails the connection
        with the right close code exactly as before.
        """
        self.read_started = 0.0
        mode = self._rx_mode
        rx = self._rx
        if mode == _RX_FAST and not rx:
            self._receive_frames(data)
        elif mode == _RX_WEBSOCKETS:
            super().data_received(data)
        else:
            rx += data
            if mode == _RX_HANDSHAKE:
                self._receive_handshake(len(data))
            elif len(rx) >= self._rx_need:  # a large frame arriving read by read: parse it once, whole
                self._receive_frames(bytes(rx))

    def eof_received(self) -> None:
        if self._rx:  # the start of a frame (or of the response): websockets judges the truncation
            self._to_websockets()
        super().eof_received()

    def _receive_handshake(self, new: int) -> None:
        rx = self._rx
        end = rx.find(b"\r\n\r\n", max(0, len(rx) - new - 3))  # only where the new bytes can end it
        if end < 0:
            if len(rx) > _MAX_HANDSHAKE_BYTES:  # websockets refuses it with its own error
                self._to_websockets()
            return
        head, rest = bytes(rx[:end + 4]), bytes(rx[end + 4:])
        rx.clear()
        super().data_received(head)
        if self.response is not None and self.protocol.state is State.OPEN and self.on_message is not None:
            self._rx_mode = _RX_FAST
            if rest:
                self._receive_frames(rest)
        else:  # refused (a body may follow), or failed: websockets has the rest
            self._rx_mode = _RX_WEBSOCKETS
            if rest:
                super().data_received(rest)

    def _to_websockets(self, tail: bytes = b"") -> None:
        """From here on websockets parses everything (it is at a frame boundary)."""
        self._rx_mode = _RX_WEBSOCKETS
        data = bytes(self._rx) + tail
        self._rx.clear()
        self._rx_need = 0
        if data:
            super().data_received(data)

    def _receive_frames(self, data: bytes) -> None:
        """Parse ``data`` (whole frames, then maybe the start of one) in fast mode; keep the rest."""
        n = len(data)
        off = 0
        protocol = self.protocol
        self._rx_need = 0
        # The state changes only through websockets (a close frame handed to it below) or a
        # failure of ours, not in a sink: it is checked here and after each frame websockets had.
        is_open = protocol.state is State.OPEN
        while n - off >= 2:
            if not is_open:
                self._rx.clear()
                self._to_websockets(data[off:])
                return
            b0, b1 = data[off], data[off + 1]
            length = b1 & 0x7F
            start = off + 2
            if length == 126:
                if n - off < 4:
                    break
                length = (data[off + 2] << 8) | data[off + 3]
                start = off + 4
            elif length == 127:
                if n - off < 10:
                    break
                length = _LENGTH64.unpack_from(data, off + 2)[0]
                start = off + 10
            if b1 & 0x80 or b0 & 0x70 or (self._max_message is not None and length > self._max_message):
                # A masked frame from the server, reserved bits, or too large: websockets' call.
                self._rx.clear()
                self._to_websockets(data[off:])
                return
            end = start + length
            if end > n:
                self._rx_need = end - off
                break
            opcode = b0 & 0x0F
            if b0 & 0x80 and self._fragment_opcode is None and (opcode == 2 or opcode == 1):
                self._deliver(opcode, data[start:end])
            elif opcode in _WEBSOCKETS_OPCODES:
                # A control frame, or part of a fragmented message: websockets' own, whole.
                super().data_received(data[off:end])
                is_open = protocol.state is State.OPEN
            else:
                self._rx.clear()
                self._to_websockets(data[off:])
                return
            off = end
            if self._rx_mode != _RX_FAST:  # a text frame was not UTF-8: the connection is failing
                return
        rx = self._rx
        if off < n:
            if rx:
                del rx[:off]
            else:
                rx += data[off:] if off else data
        else:
            rx.clear()

    def _deliver(self, opcode: int, payload: bytes) -> None:
        """One whole data message from the fast path: what :meth:`process_event` does with one."""
        if opcode == 2:
            binary = self.on_binary
            if binary is not None:
                binary(payload)
                return
            message: str | bytes = payload
        else:
            try:
                message = payload.decode()
            except UnicodeDecodeError as exc:
                self._invalid_text(exc)
                return
        sink = self.on_message
        assert sink is not None  # without a sink, websockets parses and assembles everything
        sink(message)

    def _invalid_text(self, exc: UnicodeDecodeError) -> None:
        # What websockets' recv() does with invalid UTF-8: fail the connection with 1007.
        self.set_connection_exc(exc)
        self.protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        self.send_data()
        self._rx_mode = _RX_WEBSOCKETS
        self._rx.clear()

    def process_event(self, event: Any) -> None:
        sink = self.on_message
        if sink is None or self.response is None or not isinstance(event, Frame):
            super().process_event(event)  # the handshake response, or no sink: websockets' own path
            return
        opcode = event.opcode
        if opcode is Opcode.BINARY or opcode is Opcode.TEXT:
            if not event.fin:
                self._fragment_opcode, self._fragments = opcode, [bytes(event.data)]
                return
            data = bytes(event.data)
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(event.data))
            if not event.fin:
                return
            opcode, data = self._fragment_opcode or Opcode.BINARY, b"".join(self._fragments)
            self._fragments, self._fragment_opcode = [], None
        else:
            super().process_event(event)  # pongs acknowledge pings; pings and close are the protocol's
            return
        self._deliver(2 if opcode is Opcode.BINARY else 1, data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_lost is not None:
            self.on_lost()

    def pause_delivery(self) -> None:
        """Stop reading from the socket (the sink has a backlog); the kernel buffers, then TCP pushes back."""
        transport = self.uplink_transport
        if transport is not None and not transport.is_closing():
            try:
                transport.pause_reading()
            except RuntimeError:  # already paused (uvloop says so with an error)
                pass

    def resume_delivery(self) -> None:
        transport = self.uplink_transport
        if transport is not None and not transport.is_closing():
            try:
                transport.resume_reading()
            except RuntimeError:  # not paused
                pass

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


async def _close_quietly(ws: ClientConnection) -> None:
    """Close a connection (the closing handshake within ``CLOSE_TIMEOUT_S``), failing never. A
    close that is cancelled — the call's teardown was — drops the TCP connection there and then:
    websockets leaves it open when its wait for the service's answer is cancelled, and a service
    that never answers would then hold it until the peer or the kernel gave up."""
    try:
        await ws.close()
    except asyncio.CancelledError:
        ws.transport.abort()
        raise
    except Exception:  # noqa: BLE001 - closing a dead socket must not fail the set-up or teardown
        pass


async def _raise(exc: Exception) -> None:
    """An awaitable that fails with ``exc``: a handler's error surfaces in :meth:`WebSocketGateway.deliver`
    (the session's task), as if it had been raised there, not in the socket's read callback."""
    raise exc


class WebSocketGateway(Gateway):
    """One AI session over one WebSocket; subclasses speak the protocol (see the module doc)."""

    #: Shown in log lines and errors ("cannot connect to <name> gateway …").
    protocol_name = "websocket"
    #: The protocol's binary messages are the AI's audio, raw PCM at :attr:`output_rate` (AillomVox):
    #: they skip :meth:`_on_message` and go to the session's audio handler (:meth:`_on_ws_audio`).
    binary_is_audio = False
    takes_audio_handler = True

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
        # Frames of the session's set-up backlog (send_held_audio) still queued: never trimmed.
        self._held_allowance = 0
        self._released = False
        self._uplink_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._direct = False  # released and the queues drained: write frames from send_audio itself
        self._closed = False
        self._stats = {"frames_up": 0, "bytes_up": 0, "frames_down": 0, "bytes_down": 0, "dropped_up": 0}
        # The downlink (see the module doc): the session's handler, events it has not had yet,
        # what it asked to be awaited before the next one, and whether Closed was handed over.
        self._handler: EventHandler | None = None
        self._audio_handler: AudioHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog: collections.deque[GatewayEvent] = collections.deque()
        self._pending: Awaitable[None] | None = None
        self._delivery_wake = asyncio.Event()
        self._closed_emitted = False
        # Preconnect (see :meth:`preconnect`): ``_ws`` is open but nothing was sent on it yet, and
        # what the gateway said meanwhile, for connect() to hand to _on_message in order.
        self._unconfigured = False
        self._early: list[str | bytes] = []
        self._early_bytes = 0
        self._early_overflow = False

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

    def _final_events(self, closed: Closed) -> tuple[GatewayEvent, ...]:
        """What the end of the connection means, in order (the last one is ``closed``)."""
        return (closed,)

    # ------------------------------------------------------------------ Gateway

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    @property
    def endpoint(self) -> Hashable:
        # What the handshake carries and how the connection is kept alive. Credentials that travel
        # in the opening messages (AillomVox's config apikey) are not part of it: nothing was sent.
        return (self.protocol_name, self._uri(), tuple(sorted(self._headers.items())),
                self._keepalive_interval, self._keepalive_timeout)

    async def preconnect(self) -> None:
        """Open the WebSocket now (the handshake only): :meth:`connect` sends the opening messages
        on it once the call's settings are known. What the gateway sends meanwhile is kept (within
        ``PRECONNECT_MAX_*``) and handed to :meth:`_on_message` by :meth:`connect`, before the
        opening, as if it had just arrived. Keepalive pings run from the handshake on."""
        if self._ws is not None or self._closed:
            return
        ws = await self._open(self._keep_early, None)
        if self._closed:  # closed while the handshake ran: nothing may stay open
            await _close_quietly(ws)
            return
        self._ws, self._unconfigured = ws, True
        self._log.debug("%s gateway preconnected: %s", self.protocol_name, redact_url(self._url))

    def take_preconnected(self, other: Gateway) -> bool:
        if (not isinstance(other, WebSocketGateway) or other is self or self._ws is not None or self._closed
                or other._closed or other._ws is None or not other._unconfigured
                or other.endpoint != self.endpoint):
            return False
        ws = other._ws
        other._ws, other._unconfigured = None, False
        self._early, other._early = other._early, []
        self._early_bytes, self._early_overflow = other._early_bytes, other._early_overflow
        ws.on_message = self._keep_early
        self._ws, self._unconfigured = ws, True
        return True

    def _keep_early(self, message: str | bytes) -> None:
        """A message on the preconnected connection before its opening: kept, in order, bounded."""
        if self._early_overflow:
            return
        self._early_bytes += len(message)
        if len(self._early) >= PRECONNECT_MAX_MESSAGES or self._early_bytes > PRECONNECT_MAX_BYTES:
            self._early_overflow = True
            self._early.clear()
            return
        self._early.append(message)

    def _preconnection(self) -> UplinkConnection | None:
        """The preconnected connection if it can carry the session now: still open (a service may
        drop a socket that stays unconfigured; a keepalive ping may have failed) and not flooded
        before it knew the call. Checked right before the opening messages are written, with no
        await in between, so a close the loop has processed is never written into."""
        ws = self._ws if self._unconfigured else None
        self._unconfigured = False
        if ws is None:
            return None
        transport = ws.uplink_transport
        if (ws.uplink_protocol.state is State.OPEN and transport is not None and not transport.is_closing()
                and not self._early_overflow):
            return ws
        return None

    async def connect(self, setup: SessionSetup) -> None:
        self._configure(setup)
        # Kept: asyncio.get_running_loop() costs a getpid() system call, and the downlink asks
        # the time for every message.
        self._loop = asyncio.get_running_loop()
        frame_ms = 20
        self._uplink_limit = max(self._hold_ms, UPLINK_BUFFER_MS) // frame_ms
        self._hold_limit = max(self._hold_ms // frame_ms, 1)
        preconnected = self._ws if self._unconfigured else None
        ws = self._preconnection()
        early, self._early = self._early, []
        if ws is None:
            if preconnected is not None:
                self._ws = None
                why = "it received too much before its set-up" if self._early_overflow else "the gateway closed it"
                self._log.debug("%s gateway: preconnected connection unusable (%s); connecting afresh",
                                self.protocol_name, why)
                await _close_quietly(preconnected)
            self._ws = await self._open(self._on_ws_message, self._on_ws_lost, self._binary_sink())
        else:
            # From here the connection is this session's: its messages go to the session, in order.
            self.used_preconnect = True
            ws.on_message, ws.on_lost, ws.on_binary = self._on_ws_message, self._on_ws_lost, self._binary_sink()
        assert self._ws is not None
        # The opening first: it sets what the protocol's handling of the server's first messages
        # reads (generic-ws: the greeting that "ready" releases), whether they came while the
        # settings were resolved (replayed now) or come after the handshake as they always could.
        opening = self._opening(setup)
        if self.used_preconnect:  # what a connection replaced as unusable said stays with it
            for message in early:
                self._on_ws_message(message)
        try:
            for message in opening:
                await self._ws.send(message)
        except websockets.exceptions.ConnectionClosed as exc:
            raise GatewayError(f"{self.protocol_name} gateway closed the connection during set-up: {exc}") from None
        self._sender = asyncio.create_task(self._send_loop(), name=f"gateway-uplink-{self._call}")
        self._after_open(setup)
        self._log.info("%s gateway session open: %s rate=%d/%d tools=%d%s", self.protocol_name,
                       redact_url(self._url), self.sample_rate, self.output_rate or self.sample_rate,
                       len(setup.tools), " (preconnected)" if self.used_preconnect else "")

    async def _open(self, on_message: Callable[[str | bytes], None], on_lost: Callable[[], None] | None,
                    on_binary: Callable[[bytes], None] | None = None) -> UplinkConnection:
        """The WebSocket handshake, within ``connect_timeout``; GatewayError if it fails."""
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
                # A factory, not the class: the sink is in place before the first frame arrives
                # (it may come in the same read as the handshake response).
                create_connection=cast(Any, functools.partial(UplinkConnection, on_message=on_message,
                                                              on_binary=on_binary, on_lost=on_lost)),
            )
            assert isinstance(ws, UplinkConnection)  # what create_connection makes
            return ws
        except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as exc:
            # A header websockets refuses is quoted in its message, and ours carry credentials.
            why = ("a request header websockets refused (not shown: it may hold a credential)"
                   if isinstance(exc, websockets.exceptions.InvalidHeader) else str(exc) or type(exc).__name__)
            raise GatewayError(f"cannot connect to {self.protocol_name} gateway {redact_url(self._url)}: {why}") \
                from None

    def _binary_sink(self) -> Callable[[bytes], None] | None:
        """Where the connection hands binary messages: the audio path if they are audio, else
        nowhere special (they go to ``on_message`` with the text ones)."""
        return self._on_ws_audio if self.binary_is_audio else None

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
        # The session's held backlog (send_held_audio) does not count against the bound: new audio
        # arriving while it is still queued (an AillomVox settle) must not push the first words out.
        limit = (self._uplink_limit if self._released else self._hold_limit) + self._held_allowance
        while len(self._uplink) > limit:
            # Oldest first: while held we keep the most recent speech; later, a gateway that
            # cannot keep up loses stale audio rather than falling ever further behind.
            self._uplink.popleft()
            self._stats["dropped_up"] += 1
        if self._released:
            self._uplink_ready.set()

    def send_held_audio(self, frames: list[bytes]) -> None:
        """The caller's first words, held by the session during set-up: queued whole, in order
        (behind the opening messages), and sent as soon as the uplink is released. Until the
        sender has caught up with them, the queue's bound grows to hold them."""
        if self._closed or not frames:
            return
        encode = self._encode_audio
        self._uplink.extend(encode(pcm) for pcm in frames if pcm)
        self._direct = False
        self._held_allowance = len(self._uplink)
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
                    if self._held_allowance:
                        self._held_allowance -= 1
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

    # ------------------------------------------------------------------ the downlink

    def _on_ws_message(self, message: str | bytes) -> None:
        """A data message, from the connection's ``data_received``."""
        try:
            for event in self._on_message(message):  # may be a generator: it raises as it goes
                self._emit(event)
        except ParseProblem as exc:
            self._log.warning("ignored %s gateway message: %s", self.protocol_name, exc)

    def _on_ws_audio(self, pcm: bytes) -> None:
        """A binary message of a protocol whose binary messages are audio (:attr:`binary_is_audio`),
        from the connection's ``data_received``: straight to the session's audio handler when
        nothing waits before it and the read's time slice is not spent; else as an
        :class:`AudioOut` through :meth:`_emit`, in order behind what waits."""
        if len(pcm) & 1:
            self._log.warning("gateway sent odd-length audio (%d bytes); last byte dropped", len(pcm))
            pcm = pcm[:-1]
            if not pcm:
                return
        elif not pcm:
            return
        stats = self._stats
        stats["frames_down"] += 1
        stats["bytes_down"] += len(pcm)
        audio = self._audio_handler
        ws = self._ws
        if audio is None or self._backlog or self._pending is not None or ws is None:
            self._emit(AudioOut(pcm))
            return
        now = self._loop.time()  # type: ignore[union-attr]  # set by connect(), before any message
        if not ws.read_started:
            ws.read_started = now
        elif now - ws.read_started >= DOWNLINK_SLICE_S:
            self._hold(AudioOut(pcm))
            return
        try:
            audio(pcm)
        except Exception as exc:  # noqa: BLE001 - a bug in the handler: it fails deliver(), not the socket
            self._pending = _raise(exc)
            self._hold(None)

    def _on_ws_lost(self) -> None:
        """The connection is closed: say how, once (websockets' protocol kept both close frames)."""
        if self._closed_emitted:
            return
        ws = self._ws
        protocol = ws.uplink_protocol if ws is not None else None
        rcvd = protocol.close_rcvd if protocol is not None else None
        sent = protocol.close_sent if protocol is not None else None
        code = rcvd.code if rcvd is not None else None
        if rcvd is not None:
            reason = rcvd.reason
        else:
            # Nothing came from the gateway: say what our side saw (e.g. "keepalive ping timeout"
            # when it stopped answering pings), for the operator reading the log.
            reason = f"connection lost ({sent.reason})" if sent is not None and sent.reason else "connection lost"
        for event in self._final_events(Closed(code, reason, clean=code in (1000, 1001))):
            self._emit(event)

    def _emit(self, event: GatewayEvent) -> None:
        """Hand ``event`` to the session now if nothing is waiting before it; else keep it, in order."""
        if type(event) is Closed:
            self._closed_emitted = True
        handler = self._handler
        if handler is None or self._backlog or self._pending is not None:
            self._hold(event)
            return
        ws = self._ws
        if ws is not None:
            # Many messages in one read (a flood): after DOWNLINK_SLICE_S the rest waits for the
            # delivery task, so every other call gets the loop (and its playout tick) meanwhile.
            now = self._loop.time()  # type: ignore[union-attr]  # set by connect(), before any message
            if not ws.read_started:
                ws.read_started = now
            elif now - ws.read_started >= DOWNLINK_SLICE_S:
                self._hold(event)
                return
        try:
            pending = handler(event)
        except Exception as exc:  # noqa: BLE001 - a bug in the handler: it fails deliver(), not the socket
            pending = _raise(exc)
        if pending is not None:
            self._pending = pending
            self._hold(None)
        elif self._closed_emitted:
            self._delivery_wake.set()

    def _hold(self, event: GatewayEvent | None) -> None:
        if event is not None:
            self._backlog.append(event)
        if self._ws is not None:
            self._ws.pause_delivery()
        self._delivery_wake.set()

    async def deliver(self, handle: EventHandler, audio: AudioHandler | None = None) -> None:
        """Hand every event to ``handle`` in arrival order, from the connection's callbacks, until
        :class:`Closed` (see :meth:`Gateway.deliver`); with :attr:`binary_is_audio`, the AI's audio
        to ``audio`` when given."""
        if self._ws is None:
            pending = handle(Closed(None, "never connected", clean=False))
            if pending is not None:
                await pending
            return
        loop = asyncio.get_running_loop()
        self._handler = handle
        self._audio_handler = audio
        backlog, wake = self._backlog, self._delivery_wake
        wake.set()  # what arrived before the handler was set
        try:
            while True:
                await wake.wait()
                wake.clear()
                slice_end = loop.time() + DOWNLINK_SLICE_S
                while True:
                    if self._pending is not None:
                        pending, self._pending = self._pending, None
                        await pending
                        slice_end = loop.time() + DOWNLINK_SLICE_S
                        continue
                    if not backlog:
                        break
                    if loop.time() >= slice_end:
                        await asyncio.sleep(0)
                        slice_end = loop.time() + DOWNLINK_SLICE_S
                    self._pending = handle(backlog.popleft())
                if self._closed_emitted:
                    return
                self._ws.resume_delivery()
        finally:
            self._handler = self._audio_handler = None
            if self._pending is not None:  # cancelled before awaiting it: no "never awaited" warning
                close = getattr(self._pending, "close", None)
                self._pending = None
                if close is not None:
                    close()

    async def events(self) -> AsyncIterator[GatewayEvent]:
        """The events as an async iterator (tests, tools): :meth:`deliver` into a bounded queue."""
        queue: asyncio.Queue[GatewayEvent] = asyncio.Queue(maxsize=256)

        def handle(event: GatewayEvent) -> Awaitable[None] | None:
            if queue.full():
                return queue.put(event)
            queue.put_nowait(event)
            return None

        pump = asyncio.get_running_loop().create_task(self.deliver(handle), name=f"gateway-events-{self._call}")
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, Closed):
                    return
        finally:
            await cancel_and_wait(pump)

    def _count_down(self, nbytes: int) -> None:
        self._stats["frames_down"] += 1
        self._stats["bytes_down"] += nbytes

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            await cancel_and_wait(self._sender)
        if self._ws is not None:
            await _close_quietly(self._ws)
        self._uplink.clear()
        self._control.clear()
        self._early.clear()
