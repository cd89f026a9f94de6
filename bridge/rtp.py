"""RTP media for Asterisk External Media, sans I/O: packets, codecs, the sender, the jitter buffer.

Asterisk's ARI ``externalMedia`` creates a ``UnicastRTP`` channel (channels/chan_rtp.c) that sends
the caller's audio to us as plain RTP over UDP (RFC 3550, no SDP, no RTCP, no SRTP) and plays
what we send back. This module is everything about that media that does not need a socket: bytes
in, typed objects (or PCM frames) out, so it can be tested exhaustively. :mod:`bridge.rtp_leg`
wraps it in an asyncio UDP endpoint.

Facts checked against Asterisk 22's source (branch ``22``):

- Payload types come from the static table in main/rtp_engine.c (``add_static_payload``), since
  there is no SDP to negotiate them: ``ulaw`` is PT 0, ``slin16`` PT 118 ("16 Khz signed
  linear"), ``slin`` (8 kHz) PT 10 (the first of 10 and 11 that ``find_static_payload_type``
  meets; we accept both on receipt).
- Signed linear is big-endian (network order) on the wire: res/res_rtp_asterisk.c swaps received
  slinear frames with ``ast_frame_byteswap_be`` and feeds outgoing ones through a smoother with
  ``AST_SMOOTHER_FLAG_BE``. Our PCM is s16le everywhere, so L16 payloads are byte-swapped both
  ways.
- DTMF reaches ARI as ``ChannelDtmfReceived``; RFC 4733 telephone-events (PT 101) on the media
  stream are counted and ignored, never played as audio.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from bridge import g711

__all__ = [
    "RtpError",
    "MalformedPacket",
    "RtpPacket",
    "parse",
    "build",
    "Codec",
    "CODECS",
    "codec_named",
    "PT_TELEPHONE_EVENT",
    "RtpSender",
    "RtpStats",
    "JitterBuffer",
    "RtpReceiver",
]

RTP_VERSION = 2
HEADER_SIZE = 12
#: RFC 4733 telephone-event, Asterisk's static PT for it (main/rtp_engine.c).
PT_TELEPHONE_EVENT = 101
#: Comfort noise (RFC 3389): PT 13, and 19 which Asterisk maps to it too.
PT_COMFORT_NOISE = frozenset((13, 19))

_HEADER = struct.Struct("!BBHII")
_WORD = struct.Struct("!I")
_EXT = struct.Struct("!HH")
_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32


class RtpError(ValueError):
    """Base of the errors RTP handling raises."""


class MalformedPacket(RtpError):
    """A datagram that is not a valid RTP packet; the message says exactly why."""


# ---------------------------------------------------------------------------------------------
# Packets


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """One parsed RTP packet (RFC 3550 §5.1). ``payload`` excludes the header extension and padding."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrcs: tuple[int, ...] = ()


def parse(data: bytes) -> RtpPacket:
    """Parse one datagram. Raises :class:`MalformedPacket` (never IndexError/struct.error)."""
    n = len(data)
    if n < HEADER_SIZE:
        raise MalformedPacket(f"{n} bytes is shorter than the 12-byte RTP header")
    b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
    version = b0 >> 6
    if version != RTP_VERSION:
        raise MalformedPacket(f"RTP version {version}, expected 2")
    pt = b1 & 0x7F
    if 72 <= pt <= 76:
        # RFC 5761 §4: 200–204 with the marker bit read as PT 72–76 is RTCP, muxed on the RTP port.
        raise MalformedPacket(f"payload type {pt} (RTCP packet type {b1}), not RTP")
    offset = HEADER_SIZE
    cc = b0 & 0x0F
    if cc:
        offset += 4 * cc
        if n < offset:
            raise MalformedPacket(f"CSRC count {cc} needs {offset} bytes, packet has {n}")
        csrcs = tuple(_WORD.unpack_from(data, HEADER_SIZE + 4 * i)[0] for i in range(cc))
    else:
        csrcs = ()
    if b0 & 0x10:
        if n < offset + 4:
            raise MalformedPacket(f"header extension flag set but the packet ends at {n} bytes")
        _profile, words = _EXT.unpack_from(data, offset)
        offset += 4 + 4 * words
        if n < offset:
            raise MalformedPacket(f"header extension of {words} words runs past the end of the {n}-byte packet")
    end = n
    if b0 & 0x20:
        pad = data[-1]
        if pad == 0:
            raise MalformedPacket("padding flag set but the padding count is 0")
        if n - pad < offset:
            raise MalformedPacket(f"padding count {pad} runs into the header ({offset} bytes of {n})")
        end = n - pad
    return RtpPacket(pt, seq, ts, ssrc, bytes(data[offset:end]), bool(b1 & 0x80), csrcs)


def build(payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes, *,
          marker: bool = False, csrcs: tuple[int, ...] = (), extension: tuple[int, bytes] | None = None,
          padding: int = 0) -> bytes:
    """One RTP packet. ``extension`` is (profile, data with a length multiple of 4); ``padding`` 0–255."""
    if not 0 <= payload_type <= 127:
        raise RtpError(f"payload type {payload_type} outside 0–127")
    if not 0 <= sequence < _SEQ_MOD:
        raise RtpError(f"sequence number {sequence} outside 0–65535")
    if not 0 <= timestamp < _TS_MOD or not 0 <= ssrc < _TS_MOD:
        raise RtpError("timestamp and SSRC are 32-bit unsigned")
    if len(csrcs) > 15:
        raise RtpError(f"{len(csrcs)} CSRCs, at most 15")
    if not 0 <= padding <= 255:
        raise RtpError(f"padding {padding} outside 0–255")
    b0 = (RTP_VERSION << 6) | len(csrcs) | (0x20 if padding else 0) | (0x10 if extension is not None else 0)
    parts = [_HEADER.pack(b0, (0x80 if marker else 0) | payload_type, sequence, timestamp, ssrc)]
    parts.extend(_WORD.pack(c) for c in csrcs)
    if extension is not None:
        profile, ext = extension
        if len(ext) % 4:
            raise RtpError(f"header extension of {len(ext)} bytes is not a whole number of 32-bit words")
        parts.append(_EXT.pack(profile, len(ext) // 4) + ext)
    parts.append(payload)
    if padding:
        parts.append(bytes(padding - 1) + bytes((padding,)))
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Codecs


def _swap16(pcm: bytes) -> bytes:
    """s16le ⇄ s16be (the same swap both ways). An odd trailing byte is dropped."""
    if len(pcm) & 1:
        pcm = pcm[:-1]
    swapped: bytes = np.frombuffer(pcm, dtype="<u2").astype(">u2").tobytes()
    return swapped


@dataclass(frozen=True, slots=True)
class Codec:
    """A media format as Asterisk names it (the ``format`` of ARI ``externalMedia``).

    ``rate`` is both the RTP clock and the rate of the s16le PCM this side exchanges; one
    timestamp unit is one sample for all three formats here.
    """

    name: str
    payload_type: int
    rate: int
    #: wire bytes per sample (1 for µ-law, 2 for L16): an L16 payload of odd length is malformed.
    sample_width: int
    encode: Callable[[bytes], bytes] = field(repr=False, compare=False)
    decode: Callable[[bytes], bytes] = field(repr=False, compare=False)
    #: other payload types accepted as this format on receipt.
    also_accepts: frozenset[int] = frozenset()

    def frame_bytes(self, ms: int = 20) -> int:
        """Bytes of s16le PCM in ``ms`` milliseconds (320 for µ-law 20 ms, 640 for slin16)."""
        return self.rate * ms // 1000 * 2

    def accepts(self, payload_type: int) -> bool:
        return payload_type == self.payload_type or payload_type in self.also_accepts


CODECS: dict[str, Codec] = {
    "ulaw": Codec("ulaw", 0, 8000, 1, g711.encode, g711.decode),
    "slin16": Codec("slin16", 118, 16000, 2, _swap16, _swap16),
    "slin": Codec("slin", 10, 8000, 2, _swap16, _swap16, frozenset((11,))),
}


def codec_named(name: str) -> Codec:
    """The codec for an Asterisk format name; a clear error listing the supported ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise RtpError(f"unsupported External Media format {name!r}; supported: {', '.join(CODECS)}") from None


# ---------------------------------------------------------------------------------------------
# Sending


class RtpSender:
    """Packetises our playout: one call of :meth:`packet` per 20 ms frame.

    SSRC, first sequence number and first timestamp are random (RFC 3550 §5.1, so a restarted
    sender is told apart from the old one). The sequence number goes up by one per packet, the
    timestamp by the frame's samples, both wrapping. The session sends a frame on every clock
    tick, an all-zero one when it has nothing to play; the marker bit goes on the first packet and
    on the first non-silent frame after silence, the start of a talkspurt (RFC 3551 §4.1), which
    lets the far end's jitter buffer re-centre where it is inaudible.
    """

    __slots__ = ("codec", "ssrc", "sequence", "timestamp", "_silent", "_zero", "_b1", "packets")

    def __init__(self, codec: Codec, *, ssrc: int | None = None, sequence: int | None = None,
                 timestamp: int | None = None, rng: random.Random | None = None) -> None:
        r = rng if rng is not None else random.SystemRandom()
        self.codec = codec
        self.ssrc = r.getrandbits(32) if ssrc is None else ssrc
        #: the sequence number and timestamp of the NEXT packet.
        self.sequence = r.getrandbits(16) if sequence is None else sequence
        self.timestamp = r.getrandbits(32) if timestamp is None else timestamp
        self._silent = True  # so the first packet carries the marker
        self._zero = bytes(codec.frame_bytes())
        self._b1 = codec.payload_type
        self.packets = 0

    def packet(self, pcm: bytes) -> bytes:
        """The RTP packet for one frame of s16le PCM at ``codec.rate``."""
        zero = self._zero
        if len(zero) != len(pcm):
            zero = self._zero = bytes(len(pcm))
        silent = pcm == zero
        first = self.packets == 0
        marker = first or (self._silent and not silent)
        self._silent = silent
        header = _HEADER.pack(0x80, self._b1 | 0x80 if marker else self._b1, self.sequence, self.timestamp, self.ssrc)
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.timestamp = (self.timestamp + (len(pcm) >> 1)) & 0xFFFFFFFF
        self.packets += 1
        return header + self.codec.encode(pcm)


# ---------------------------------------------------------------------------------------------
# Receiving


@dataclass(slots=True)
class RtpStats:
    """Counters of one receiving leg (packets unless said otherwise)."""

    received: int = 0  # valid RTP packets of our codec handed to the jitter buffer
    delivered: int = 0  # frames of real audio given to the listener
    duplicates: int = 0  # a packet already delivered (or already held)
    late: int = 0  # arrived after its frame was concealed, or from a superseded SSRC
    reordered: int = 0  # arrived after a higher sequence number, still delivered in order
    concealed: int = 0  # frames made up for lost packets
    lost: int = 0  # sequence numbers skipped without a made-up frame (beyond max_conceal)
    restarts: int = 0  # the sender restarted (new SSRC, or a sequence jump confirmed by the next packet)
    wrong_source: int = 0  # from an address other than the one Asterisk announced (counted by the leg)
    malformed: int = 0  # not RTP, or an L16 payload of odd length
    wrong_payload_type: int = 0  # RTP, but neither our codec nor an ignorable one
    telephone_events: int = 0  # RFC 4733 DTMF (PT 101): ARI reports DTMF, so these are ignored
    comfort_noise: int = 0  # RFC 3389 CN (PT 13/19): ignored
    unattached: int = 0  # audio that arrived before a listener was attached (dropped)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class JitterBuffer:
    """Puts a sender's packets back in order, with no delay unless a packet is missing.

    In-order packets are delivered at once (zero added delay). A gap holds the later packets
    until the missing one comes, or until ``depth`` packets are held or the oldest held one has
    waited ``max_wait`` seconds (:attr:`deadline`; the I/O layer calls :meth:`expire` then).
    ``depth`` 0 never waits: a gap is concealed at once and a reordered packet is late.
    Giving up on a gap conceals it: the last frame once more at half amplitude (−6 dB), then
    silence. One attenuated repeat bridges a single lost 20 ms packet (the usual case) without a
    click or a hole that a speech detector would read as a pause; repeating more turns speech into
    a buzz and would make the AI hear syllables nobody said, so longer gaps become silence, and at
    most ``max_conceal`` frames of it: a longer outage has already passed in real time, and filling
    it would only delay everything after it.

    The listener never gets a packet twice or out of order: sequence numbers are extended past the
    16-bit wrap and every delivery is strictly above the last one. Duplicates and late packets
    (already delivered or concealed) are dropped and counted. A sender restart re-syncs instead
    of stalling: a new SSRC at once (packets of the previous SSRC are then late), a jump back by
    more than ``max_misorder`` once the next packet confirms it (RFC 3550 A.1's probation, so one
    stray old packet cannot derail the stream); a jump forward is an ordinary gap.
    """

    def __init__(self, codec: Codec, deliver: Callable[[bytes], None], *, depth: int = 3,
                 max_wait: float = 0.060, max_conceal: int = 5, max_misorder: int = 100,
                 stats: RtpStats | None = None) -> None:
        if depth < 0:
            raise RtpError(f"jitter buffer depth {depth} is negative")
        if max_wait <= 0:
            raise RtpError(f"jitter buffer max_wait {max_wait} must be positive (seconds)")
        self.codec = codec
        self.deliver = deliver
        self.depth = depth
        self.max_wait = max_wait
        self.max_conceal = max_conceal
        self.max_misorder = max_misorder
        self.stats = stats if stats is not None else RtpStats()
        self.ssrc: int | None = None
        self._previous_ssrc: int | None = None
        self._next = 0  # extended sequence number of the next frame to deliver
        self._delivered_mask = 0  # bit i: extended seq (_next - 1 - i) was delivered (last 64)
        self._highest = -1  # highest extended seq seen
        self._held: dict[int, tuple[bytes, float]] = {}  # extended seq -> (payload, arrival)
        self._hold_since: float | None = None
        self._probe: int | None = None  # 16-bit seq that would confirm a backward jump
        self._last_frame = b""
        self._concealed_run = 0

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def deadline(self) -> float | None:
        """When :meth:`expire` must run (None while nothing is held)."""
        return None if self._hold_since is None else self._hold_since + self.max_wait

    def push(self, packet: RtpPacket, now: float) -> None:
        """One packet of our codec (the payload type already checked)."""
        stats = self.stats
        stats.received += 1
        if packet.ssrc != self.ssrc:
            if self.ssrc is not None:
                if packet.ssrc == self._previous_ssrc:
                    stats.late += 1
                    return
                self._restart()
            self._previous_ssrc, self.ssrc = self.ssrc, packet.ssrc
            self._sync(packet.sequence)
        seq = packet.sequence
        delta = (seq - self._next) & 0xFFFF
        if delta >= 0x8000:
            delta -= _SEQ_MOD
        if delta < 0:
            if not self._behind(seq, delta):
                return
            self._restart()
            self._sync(seq)
            delta = 0
        self._probe = None
        ext = self._next + delta
        if delta and ext in self._held:
            stats.duplicates += 1
            return
        if ext < self._highest:
            stats.reordered += 1
        elif ext > self._highest:
            self._highest = ext
        if delta == 0:
            self._emit(packet.payload)
            if self._held:
                self._drain()
            return
        self._held[ext] = (packet.payload, now)
        if self._hold_since is None:
            self._hold_since = now
        if len(self._held) >= self.depth:
            self._skip_gap()

    def expire(self, now: float) -> None:
        """Give up on gaps whose wait is over (the I/O layer calls this at :attr:`deadline`)."""
        while self._hold_since is not None and now >= self._hold_since + self.max_wait:
            self._skip_gap()

    def flush(self) -> None:
        """Deliver whatever is held, in order, concealing the gaps (the stream is ending)."""
        while self._held:
            self._skip_gap()

    # -- internals

    def _sync(self, seq: int) -> None:
        self._next = seq
        self._highest = seq - 1
        self._delivered_mask = 0
        self._probe = None

    def _restart(self) -> None:
        self.stats.restarts += 1
        self.flush()

    def _behind(self, seq: int, delta: int) -> bool:
        """A packet at or before what was already delivered: count it; True if it confirms a restart."""
        stats = self.stats
        if -delta > self.max_misorder:
            if self._probe == seq:
                return True  # two consecutive packets far behind: the sender restarted its sequence
            self._probe = (seq + 1) & 0xFFFF
            stats.late += 1
            return False
        back = -delta - 1
        if back < 64 and (self._delivered_mask >> back) & 1:
            stats.duplicates += 1
        else:
            stats.late += 1
        return False

    def _emit(self, payload: bytes) -> None:
        self._next += 1
        self._delivered_mask = ((self._delivered_mask << 1) | 1) & 0xFFFFFFFFFFFFFFFF
        self._concealed_run = 0
        if not payload:
            return
        pcm = self.codec.decode(payload)
        self._last_frame = pcm
        self.stats.delivered += 1
        self.deliver(pcm)

    def _drain(self) -> None:
        held = self._held
        while True:
            entry = held.pop(self._next, None)
            if entry is None:
                break
            self._emit(entry[0])
        self._hold_since = min(arrival for _, arrival in held.values()) if held else None

    def _skip_gap(self) -> None:
        """Give up on the missing packet(s) before the lowest held one, then deliver what follows."""
        held = self._held
        if not held:
            self._hold_since = None
            return
        missing = min(held) - self._next
        self._conceal(missing)
        self._next += missing
        shift = min(missing, 64)
        self._delivered_mask = (self._delivered_mask << shift) & 0xFFFFFFFFFFFFFFFF
        self._drain()

    def _conceal(self, missing: int) -> None:
        stats = self.stats
        frames = min(missing, self.max_conceal)
        stats.lost += missing - frames
        size = len(self._last_frame) or self.codec.frame_bytes()
        for _ in range(frames):
            if self._concealed_run == 0 and self._last_frame:
                samples = np.frombuffer(self._last_frame, dtype="<i2")
                pcm = (samples >> 1).astype("<i2").tobytes()
            else:
                pcm = bytes(size)
            self._concealed_run += 1
            stats.concealed += 1
            self.deliver(pcm)


class RtpReceiver:
    """Datagram in, frames out: parses, sorts by payload type, and feeds the jitter buffer.

    The source address is the I/O layer's business (it knows the peer); everything about the
    datagram's content is here, and counted in :attr:`stats`.
    """

    def __init__(self, codec: Codec, deliver: Callable[[bytes], None], *, depth: int = 3,
                 max_wait: float = 0.060, max_conceal: int = 5) -> None:
        self.codec = codec
        self.stats = RtpStats()
        self.jitter = JitterBuffer(codec, deliver, depth=depth, max_wait=max_wait, max_conceal=max_conceal,
                                   stats=self.stats)

    def feed(self, data: bytes, now: float) -> None:
        stats = self.stats
        try:
            packet = parse(data)
        except MalformedPacket:
            stats.malformed += 1
            return
        pt = packet.payload_type
        if not self.codec.accepts(pt):
            if pt == PT_TELEPHONE_EVENT:
                stats.telephone_events += 1
            elif pt in PT_COMFORT_NOISE:
                stats.comfort_noise += 1
            else:
                stats.wrong_payload_type += 1
            return
        if self.codec.sample_width == 2 and len(packet.payload) & 1:
            stats.malformed += 1
            return
        self.jitter.push(packet, now)
