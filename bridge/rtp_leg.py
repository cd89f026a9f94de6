"""The caller's leg over RTP: one UDP socket per External Media channel, and the pool of ports.

ARI's ``externalMedia`` makes Asterisk send the caller's audio as RTP to an address we give it,
and play what comes back from that socket. :class:`RtpLeg` is that socket as a
:class:`~bridge.leg.CallerLeg`: the session's playout goes out through an
:class:`~bridge.rtp.RtpSender`, the caller's audio comes in through the jitter buffer of
:class:`~bridge.rtp.RtpReceiver` (both sans-I/O, in :mod:`bridge.rtp`). The leg only adds what
needs a socket and a clock:

- the source check: Asterisk announces the address its channel sends from
  (``UNICASTRTP_LOCAL_ADDRESS``/``UNICASTRTP_LOCAL_PORT``; :meth:`RtpLeg.set_remote`). Datagrams
  from anywhere else are dropped and counted, and we send to exactly that address: on a UDP port
  anyone can write to, this is what keeps a stray or hostile sender out of the AI's ears;
- the jitter buffer's time bound: a timer armed only while packets are held for a gap
  (``loop.call_at``), never one per packet;
- ending: RTP has no hangup. :meth:`RtpLeg.hangup`/:meth:`RtpLeg.abort` close the socket, free its
  port and call ``on_hangup(reason)``, with which the ARI ingress hangs the channel up (or
  continues it in the dialplan). The caller hanging up reaches the session from ARI, not from here.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from bridge.leg import LegListener
from bridge.resample import Resampler
from bridge.rtp import CODECS, Codec, RtpReceiver, RtpSender, RtpStats, codec_named

__all__ = ["RtpLeg", "RtpPortPool", "RtpPortsExhausted"]

log = logging.getLogger(__name__)


#: RFC 3551's static payload types end at 34; 35–95 are unassigned, 96–127 dynamic.
STATIC_PAYLOAD_TYPES_MAX = 34


class RtpPortsExhausted(RuntimeError):
    """Every port of the configured RTP range is taken."""


class RtpLeg(asyncio.DatagramProtocol):
    """One External Media channel's media: a bound UDP socket speaking RTP with one Asterisk address.

    Created bound by :meth:`RtpPortPool.open`. Audio that arrives before :meth:`attach` is
    dropped and counted (``stats.unattached``): a call not yet set up must not queue without bound.
    """

    def __init__(self, codec: Codec, *, on_hangup: Callable[[str], None], depth: int = 3,
                 max_wait: float = 0.060, max_conceal: int = 5) -> None:
        self.codec = codec
        self.on_hangup = on_hangup
        self.listener: LegListener | None = None
        self.remote: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.closed = False
        self.close_reason: str | None = None
        #: What we send. Asterisk plays back only RTP of a *static* payload type arriving on an
        #: External Media channel: it has no SDP, so a dynamic one (slin16 is 118) is dropped without
        #: a word (asterisk/documentation#142; seen on 22.10.1: the packets arrive, nothing is
        #: heard). A 16 kHz channel is therefore answered in µ-law 8 kHz (PT 0), which Asterisk
        #: translates like any other frame: the caller's audio still reaches the AI at 16 kHz.
        self.send_codec = codec if codec.payload_type <= STATIC_PAYLOAD_TYPES_MAX else CODECS["ulaw"]
        self.sender = RtpSender(self.send_codec)
        self._down = Resampler(codec.rate, self.send_codec.rate) if self.send_codec.rate != codec.rate else None
        self.receiver = RtpReceiver(codec, self._deliver, depth=depth, max_wait=max_wait, max_conceal=max_conceal)
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._release: Callable[[], None] | None = None
        self._lost = asyncio.Event()

    # -- set-up

    @property
    def stats(self) -> RtpStats:
        return self.receiver.stats

    @property
    def local_port(self) -> int:
        """The local UDP port (what the ARI ``external_host`` names)."""
        if self.local is None:
            raise RuntimeError("RTP leg is not bound")
        return self.local[1]

    def attach(self, listener: LegListener) -> None:
        """Start delivering the caller's audio to ``listener`` (the session)."""
        self.listener = listener

    def set_remote(self, host: str, port: int) -> None:
        """The address Asterisk's External Media channel sends from and listens on (an IP literal)."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"RTP remote host {host!r} is not an IP address") from None
        if not 0 < port < 65536:
            raise ValueError(f"RTP remote port {port} outside 1–65535")
        self.remote = (address.compressed, port)

    # -- asyncio.DatagramProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio subclasses
        self._loop = asyncio.get_running_loop()
        sockname = transport.get_extra_info("sockname")
        self.local = (sockname[0], sockname[1])

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        remote = self.remote
        if remote is None or addr[1] != remote[1] or addr[0] != remote[0]:
            stats = self.receiver.stats
            stats.wrong_source += 1
            if stats.wrong_source == 1 and remote is not None:
                # Once per leg: NAT or a dual-stack bind (::ffff:a.b.c.d) would otherwise silence a
                # call with nothing but a counter to show for it.
                log.warning("RTP leg %s: ignoring packets from %s:%s (Asterisk announced %s:%s)",
                            self.local, addr[0], addr[1], remote[0], remote[1])
            return
        if self.listener is None:
            self.receiver.stats.unattached += 1
            return
        loop = self._loop
        assert loop is not None
        self.receiver.feed(data, loop.time())
        if self._timer is None and not self.closed:
            self._arm()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable for a packet we sent: Asterisk's side is not (yet) listening.
        # Not fatal: the channel's end comes through ARI.
        log.debug("RTP leg %s: %s", self.local, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._close("connection-lost" if exc is None else f"connection-lost: {exc}")
        self._closed_for_good()

    # -- the jitter buffer's time bound

    def _arm(self) -> None:
        deadline = self.receiver.jitter.deadline
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._gap_timer)

    def _gap_timer(self) -> None:
        self._timer = None
        if self.closed or self._loop is None:
            return
        self.receiver.jitter.expire(self._loop.time())
        self._arm()

    def _deliver(self, pcm: bytes) -> None:
        listener = self.listener
        if listener is not None and not self.closed:
            listener.on_caller_audio(pcm)

    # -- the CallerLeg

    @property
    def rate(self) -> int:
        return self.codec.rate

    def send_frame(self, pcm: bytes) -> bool:
        transport = self._transport
        remote = self.remote
        if self.closed or transport is None or remote is None:
            return False
        if self._down is not None:
            pcm = self._down.process(pcm)
        transport.sendto(self.sender.packet(pcm), remote)
        return True

    def hangup(self) -> None:
        self._close("hangup")

    def abort(self) -> None:
        self._close("abort")

    async def wait_closed(self) -> None:
        """Until the socket is closed and its port back in the pool (one loop turn after an end)."""
        await self._lost.wait()

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()  # the socket closes on the next loop turn: connection_lost
        else:
            self._closed_for_good()
        try:
            self.on_hangup(reason)
        except Exception:  # the leg is closed and its port free whatever the callback does
            log.exception("RTP leg %s: on_hangup(%r) failed", self.local, reason)


    def _closed_for_good(self) -> None:
        # The port goes back only once the socket is really closed: released earlier, the next
        # open() could pick it while the kernel still holds it.
        release, self._release = self._release, None
        if release is not None:
            release()
        self._lost.set()


class RtpPortPool:
    """UDP ports for RTP legs from a configured range, each released when its leg closes.

    Ports are handed out round-robin from after the last one given, not lowest-first, so a port
    just freed is the last to be reused: late packets of an ended call cannot land in the next
    one (they would also fail its source check). Ports some other program holds are skipped.
    """

    def __init__(self, host: str, first_port: int, last_port: int, *, jitter_packets: int = 3,
                 jitter_wait: float = 0.060, max_conceal: int = 5) -> None:
        if not 0 < first_port <= last_port < 65536:
            raise ValueError(f"RTP port range {first_port}-{last_port} is not within 1–65535, first ≤ last")
        self.host = host
        #: each leg's jitter buffer: packets and seconds held for a missing one, frames made up for a gap
        self.jitter_packets = jitter_packets
        self.jitter_wait = jitter_wait
        self.max_conceal = max_conceal
        self.first_port = first_port
        self.last_port = last_port
        self.in_use: set[int] = set()
        self._next = first_port

    @property
    def size(self) -> int:
        return self.last_port - self.first_port + 1

    async def open(self, codec: Codec | str, *, on_hangup: Callable[[str], None]) -> RtpLeg:
        """A leg bound to a free port of the range, for a :class:`Codec` or its Asterisk name
        (``ulaw``, ``slin16``, ``slin``). Raises :class:`RtpPortsExhausted` naming the range."""
        if isinstance(codec, str):
            codec = codec_named(codec)
        loop = asyncio.get_running_loop()
        busy_elsewhere = 0
        for _ in range(self.size):
            port = self._next
            self._next = port + 1 if port < self.last_port else self.first_port
            if port in self.in_use:
                continue
            leg = RtpLeg(codec, on_hangup=on_hangup, depth=self.jitter_packets, max_wait=self.jitter_wait,
                         max_conceal=self.max_conceal)
            try:
                await loop.create_datagram_endpoint(lambda leg=leg: leg, local_addr=(self.host, port))  # type: ignore[misc]
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    busy_elsewhere += 1
                    continue
                raise
            self.in_use.add(port)
            leg._release = lambda port=port: self.in_use.discard(port)
            return leg
        raise RtpPortsExhausted(
            f"no free UDP port for RTP in {self.host}:{self.first_port}-{self.last_port} "
            f"({len(self.in_use)} used by calls, {busy_elsewhere} by other programs)")
