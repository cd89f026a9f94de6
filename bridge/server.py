"""The AudioSocket server: Asterisk connects here, one TCP connection per call.

An :class:`asyncio.Protocol` rather than streams: frames are decoded straight from
``data_received`` and playout writes are synchronous ``transport.write`` calls from the clock
tick, so the per-frame path has no task switches and no awaits.

Rules enforced per connection (any breach closes *that* connection only, fast):
  * the first frame must be the UUID, within ``audiosocket.uuid_timeout``;
  * frames must be well formed (kind known, lengths right; see :mod:`bridge.audiosocket`);
  * a second UUID is a protocol error.
Every connection sets TCP_NODELAY (Nagle would hold back 320-byte writes) and writes each
frame's header and payload in one call (Asterisk allows 5 ms between them).

A connection is the session's :class:`~bridge.leg.CallerLeg`: it owns the AudioSocket framing
(the header of the frames it sends follows the kind of audio Asterisk sends), and delivers
audio, DTMF and the hang-up to the session as a :class:`~bridge.leg.LegListener`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import audiosocket as asp
from .leg import CallerLeg, LegListener

log = logging.getLogger("voxbridge.audiosocket")

#: If this much is waiting in the kernel-side send buffer Asterisk is not reading: drop frames
#: rather than queue them (a backlog would be played late, or burst).
WRITE_BACKLOG_LIMIT = 16 * 1024

_HANGUP = asp.encode_hangup()
_RATE_OF_KIND_BYTE = asp.RATE_OF_KIND_BYTE


def header_for(rate: int) -> bytes:
    """The 3-byte header of one 20 ms audio frame at ``rate``."""
    kind = asp.audio_kind_for_rate(rate)
    n = asp.frame_bytes(rate)
    return bytes((kind, n >> 8, n & 0xFF))


#: The AudioSocket() dialplan application always speaks 8 kHz; the Dial() variant says otherwise
#: with its first audio frame.
DEFAULT_RATE = 8000


class Call(LegListener, Protocol):
    call_id: str


class ProtocolErrors(Protocol):
    def protocol_error(self) -> None: ...


@dataclass(frozen=True, slots=True)
class AudioSocketIngress:
    """What every connection of one server shares (built by bridge/app.py)."""

    #: A connection delivered its UUID: the call it feeds, or None if refused (the leg is hung up).
    open_call: Callable[[str, CallerLeg], Call | None]
    uuid_timeout: float
    #: Open connections (aborted at shutdown).
    connections: set[Any]
    metrics: ProtocolErrors | None = None


class AudioSocketConnection(asyncio.Protocol):
    """One AudioSocket TCP connection: the caller's leg of one call."""

    def __init__(self, ingress: AudioSocketIngress) -> None:
        self.ingress = ingress
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.session: Call | None = None
        self._decoder = asp.FrameDecoder()
        self._partial = False  # the decoder holds the start of a frame (the fast path must not run)
        self._uuid_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._hung_up = False
        self._rate = DEFAULT_RATE
        self._header = header_for(DEFAULT_RATE)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # pragma: no cover - uvloop already sets it
                log.debug("TCP_NODELAY not set: %s", exc)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.ingress.connections.add(self)
        loop = asyncio.get_running_loop()
        self._uuid_timer = loop.call_later(self.ingress.uuid_timeout, self._no_uuid)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None and not self._partial and len(data) > 3:
            # Fast path, 50 times a second per call: exactly one whole audio frame (what Asterisk
            # writes each 20 ms), nothing pending. No decoder buffer, no Frame object.
            rate = _RATE_OF_KIND_BYTE.get(data[0])
            n = len(data) - 3
            if rate is not None and not n & 1 and ((data[1] << 8) | data[2]) == n:
                if rate != self._rate:
                    self._rate_changed(rate, session)
                session.on_caller_audio(data[3:])
                return
        decoder = self._decoder
        try:
            decoder.feed(data)
            for frame in decoder:
                self._on_frame(frame)
                if self.closed:
                    return
            if self.session is None and decoder.pending_kind() not in (None, asp.Kind.UUID):
                # Judge the header at once: do not wait up to 64 KiB for a frame we must refuse.
                raise asp.ProtocolError(f"first frame must be the UUID (0x01), got kind 0x{decoder.pending_kind():02x}")
            self._partial = decoder.buffered > 0
        except asp.ProtocolError as exc:
            self._protocol_error(str(exc))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ingress.connections.discard(self)
        if self._uuid_timer is not None:
            self._uuid_timer.cancel()
        if self.session is not None:
            # A reset is how a peer that has closed answers a frame still in flight: the caller hung
            # up (Asterisk ends AudioSocket by closing the socket) a moment before our last write.
            hung_up = exc is None or isinstance(exc, ConnectionResetError | BrokenPipeError)
            self.session.on_caller_gone("caller-hangup" if hung_up else f"connection-lost: {exc}")

    # -- frames

    def _on_frame(self, frame: asp.Frame) -> None:
        kind = frame.kind
        session = self.session
        if session is not None and kind.is_audio:
            if kind.sample_rate != self._rate:
                self._rate_changed(kind.sample_rate, session)
            session.on_caller_audio(frame.payload)
        elif kind is asp.Kind.UUID:
            if session is not None:
                raise asp.ProtocolError("second UUID frame on one connection")
            if self._uuid_timer is not None:
                self._uuid_timer.cancel()
                self._uuid_timer = None
            self.session = self.ingress.open_call(str(frame.uuid), self)
        elif session is None:
            raise asp.ProtocolError(f"first frame must be the UUID (0x01), got {kind.name} (0x{kind:02x})")
        elif kind is asp.Kind.DTMF:
            session.on_dtmf(frame.digit)
        elif kind is asp.Kind.HANGUP:
            self._hung_up = True
            session.on_caller_gone("caller-hangup")
        elif kind is asp.Kind.ERROR:
            code = frame.payload[0] if frame.payload else None
            log.warning("[%s] Asterisk sent an error frame (code %s)", session.call_id, code)
            session.on_caller_gone(f"asterisk-error: {code}")

    def _no_uuid(self) -> None:
        self._uuid_timer = None
        if self.session is None and not self.closed:
            self._protocol_error(f"no UUID frame within {self.ingress.uuid_timeout:g} s")

    def _protocol_error(self, why: str) -> None:
        call = self.session.call_id if self.session else "-"
        log.warning("[%s] closing AudioSocket connection from %s: %s", call, self.peer, why)
        if self.ingress.metrics is not None:
            self.ingress.metrics.protocol_error()
        self.abort()
        if self.session is not None:
            self.session.on_caller_gone(f"protocol-error: {why}")

    def _rate_changed(self, rate: int, session: Call) -> None:
        # Answer in the kind Asterisk speaks: frames of another kind would be played at the wrong pitch.
        self._rate = rate
        self._header = header_for(rate)
        session.on_caller_rate(rate)

    # -- the CallerLeg (used by the session)

    @property
    def rate(self) -> int:
        return self._rate

    def send_frame(self, pcm: bytes) -> bool:
        """One whole frame in one write. False if dropped (closed, or Asterisk not reading)."""
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() > WRITE_BACKLOG_LIMIT:
            return False
        t.write(self._header + pcm)
        return True

    def hangup(self) -> None:
        """Send 0x00 (the dialplan continues at the next priority) and close."""
        self.closed = True
        t = self.transport
        if t is not None and not t.is_closing():
            try:
                t.write(_HANGUP)
            finally:
                t.close()  # whatever the write did: the caller's leg must not stay open

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


async def start_server(ingress: AudioSocketIngress, host: str, port: int, *,
                       reuse_port: bool = False) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(lambda: AudioSocketConnection(ingress), host, port,
                                        reuse_address=True, reuse_port=reuse_port or None, backlog=1024)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for AudioSocket on {host}:{port}: {exc.strerror}") from None
