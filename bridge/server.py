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
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from . import audiosocket as asp

if TYPE_CHECKING:
    from .app import Bridge
    from .session import CallSession

log = logging.getLogger("voxbridge.audiosocket")

#: If this much is waiting in the kernel-side send buffer Asterisk is not reading: drop frames
#: rather than queue them (a backlog would be played late, or burst).
WRITE_BACKLOG_LIMIT = 16 * 1024

_HANGUP = asp.encode_hangup()
_RATE_OF_KIND_BYTE = asp.RATE_OF_KIND_BYTE


class AudioSocketConnection(asyncio.Protocol):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.session: CallSession | None = None
        self._decoder = asp.FrameDecoder()
        self._uuid_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._hung_up = False

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
        self.bridge.connections.add(self)
        loop = asyncio.get_running_loop()
        self._uuid_timer = loop.call_later(self.bridge.config.audiosocket.uuid_timeout, self._no_uuid)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None and len(data) > 3 and not self._decoder.buffered:
            # Fast path, 50 times a second per call: exactly one whole audio frame (what Asterisk
            # writes each 20 ms), nothing pending. No decoder buffer, no Frame object.
            rate = _RATE_OF_KIND_BYTE.get(data[0])
            n = len(data) - 3
            if rate is not None and not n & 1 and ((data[1] << 8) | data[2]) == n:
                session.on_caller_audio(rate, data[3:])
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
        except asp.ProtocolError as exc:
            self._protocol_error(str(exc))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.bridge.connections.discard(self)
        if self._uuid_timer is not None:
            self._uuid_timer.cancel()
        if self.session is not None:
            self.session.on_caller_gone("caller-hangup" if exc is None else f"connection-lost: {exc}")

    # -- frames

    def _on_frame(self, frame: asp.Frame) -> None:
        kind = frame.kind
        session = self.session
        if session is not None and kind.is_audio:
            session.on_caller_audio(kind.sample_rate, frame.payload)
        elif kind is asp.Kind.UUID:
            if session is not None:
                raise asp.ProtocolError("second UUID frame on one connection")
            if self._uuid_timer is not None:
                self._uuid_timer.cancel()
                self._uuid_timer = None
            self.session = self.bridge.open_session(str(frame.uuid), self)
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
            self._protocol_error(f"no UUID frame within {self.bridge.config.audiosocket.uuid_timeout:g} s")

    def _protocol_error(self, why: str) -> None:
        call = self.session.call_id if self.session else "-"
        log.warning("[%s] closing AudioSocket connection from %s: %s", call, self.peer, why)
        if self.bridge.metrics is not None:
            self.bridge.metrics["protocol_errors"] += 1
        self.abort()
        if self.session is not None:
            self.session.on_caller_gone(f"protocol-error: {why}")

    # -- output (used by the session)

    @staticmethod
    def header_for(rate: int) -> bytes:
        kind = asp.audio_kind_for_rate(rate)
        n = asp.frame_bytes(rate)
        return bytes((kind, n >> 8, n & 0xFF))

    def write_frame(self, header: bytes, payload: bytes) -> bool:
        """One whole frame in one write. False if dropped (closed, or Asterisk not reading)."""
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() > WRITE_BACKLOG_LIMIT:
            return False
        t.write(header + payload)
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


async def start_server(bridge: Bridge, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(lambda: AudioSocketConnection(bridge), host, port,
                                        reuse_address=True, reuse_port=reuse_port or None, backlog=1024)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for AudioSocket on {host}:{port}: {exc.strerror}") from None
