"""AudioSocket framing, sans I/O.

AudioSocket is Asterisk's plain-TCP media protocol. Every message is a TLV::

    kind: u8 | length: u16 big-endian | payload[length]

Audio payloads are signed 16-bit little-endian mono PCM at the rate the kind names.
This module turns bytes into :class:`Frame` objects and back, with no sockets and no
asyncio, so it can be tested exhaustively (and fuzzed) without a network. The I/O
layers (:mod:`bridge.server`, :mod:`bridge.devtools.dial`) wrap it.

Facts checked against Asterisk 22 (res/res_audiosocket.c): the UUID is 16 raw bytes,
DTMF is one ASCII byte, audio must be non-empty and even-length, the maximum payload
is 65535 bytes, and Asterisk never sends a hangup frame (it just closes TCP).
"""

from __future__ import annotations

import enum
import struct
import uuid as _uuid
from dataclasses import dataclass

__all__ = [
    "Kind",
    "Frame",
    "ProtocolError",
    "FrameDecoder",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "DTMF_DIGITS",
    "encode",
    "encode_audio",
    "encode_uuid",
    "encode_dtmf",
    "encode_hangup",
    "encode_error",
    "audio_kind_for_rate",
    "frame_bytes",
    "parse_header",
    "decode_payload",
    "RATE_OF_KIND_BYTE",
]

HEADER_SIZE = 3
MAX_PAYLOAD = 0xFFFF
DTMF_DIGITS = frozenset(b"0123456789*#ABCD")
_HEADER = struct.Struct(">BH")


class Kind(enum.IntEnum):
    """Message kinds. 0x10–0x18 are signed-linear audio at the named rate."""

    HANGUP = 0x00
    UUID = 0x01
    DTMF = 0x03
    SLIN_8K = 0x10
    SLIN_12K = 0x11
    SLIN_16K = 0x12
    SLIN_24K = 0x13
    SLIN_32K = 0x14
    SLIN_44K = 0x15
    SLIN_48K = 0x16
    SLIN_96K = 0x17
    SLIN_192K = 0x18
    ERROR = 0xFF

    @property
    def is_audio(self) -> bool:
        return 0x10 <= self <= 0x18

    @property
    def sample_rate(self) -> int:
        """Sample rate in Hz of an audio kind (ValueError for other kinds)."""
        try:
            return _RATE_OF_KIND[self]
        except KeyError:
            raise ValueError(f"kind 0x{self:02x} ({self.name}) carries no audio") from None


_RATE_OF_KIND = {
    Kind.SLIN_8K: 8000,
    Kind.SLIN_12K: 12000,
    Kind.SLIN_16K: 16000,
    Kind.SLIN_24K: 24000,
    Kind.SLIN_32K: 32000,
    Kind.SLIN_44K: 44100,
    Kind.SLIN_48K: 48000,
    Kind.SLIN_96K: 96000,
    Kind.SLIN_192K: 192000,
}
_KIND_OF_RATE = {rate: kind for kind, rate in _RATE_OF_KIND.items()}
_KNOWN_KINDS = frozenset(int(k) for k in Kind)
_KIND_OF_BYTE = {int(k): k for k in Kind}  # a dict lookup is ~10x cheaper than Kind(byte)
#: Sample rate by audio kind byte (0x10..0x18), for the per-frame fast paths.
RATE_OF_KIND_BYTE = {int(k): r for k, r in _RATE_OF_KIND.items()}


def audio_kind_for_rate(sample_rate: int) -> Kind:
    """The audio kind for ``sample_rate`` Hz (ValueError if AudioSocket has none)."""
    try:
        return _KIND_OF_RATE[sample_rate]
    except KeyError:
        raise ValueError(
            f"AudioSocket has no audio kind for {sample_rate} Hz "
            f"(supported: {', '.join(str(r) for r in sorted(_KIND_OF_RATE))})"
        ) from None


def frame_bytes(sample_rate: int, ms: int = 20) -> int:
    """Bytes of s16le mono audio in ``ms`` milliseconds at ``sample_rate``."""
    return sample_rate * ms // 1000 * 2


class ProtocolError(ValueError):
    """The peer sent bytes that are not valid AudioSocket. The connection must be closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded AudioSocket message."""

    kind: Kind
    payload: bytes = b""

    @property
    def uuid(self) -> _uuid.UUID:
        if self.kind is not Kind.UUID:
            raise ValueError(f"{self.kind.name} frame has no UUID")
        return _uuid.UUID(bytes=self.payload)

    @property
    def digit(self) -> str:
        if self.kind is not Kind.DTMF:
            raise ValueError(f"{self.kind.name} frame has no DTMF digit")
        return chr(self.payload[0])

    @property
    def sample_rate(self) -> int:
        return self.kind.sample_rate


def _validate(kind_byte: int, payload: bytes) -> Frame:
    """Build a Frame from a raw kind byte and payload, or raise ProtocolError."""
    kind = _KIND_OF_BYTE.get(kind_byte)
    if kind is None:
        raise ProtocolError(f"unknown message kind 0x{kind_byte:02x}")
    n = len(payload)
    if kind is Kind.UUID:
        if n != 16:
            raise ProtocolError(f"UUID frame must carry 16 bytes, got {n}")
    elif kind is Kind.DTMF:
        if n != 1:
            raise ProtocolError(f"DTMF frame must carry 1 byte, got {n}")
        if payload[0] not in DTMF_DIGITS:
            raise ProtocolError(f"DTMF frame carries invalid digit 0x{payload[0]:02x}")
    elif kind.is_audio:
        if n == 0:
            raise ProtocolError(f"{kind.name} audio frame is empty")
        if n % 2:
            raise ProtocolError(f"{kind.name} audio frame has odd length {n} (s16le needs whole samples)")
    # HANGUP and ERROR: any payload (ERROR may carry a code byte); nothing to check.
    return Frame(kind, payload)


def encode(kind: Kind | int, payload: bytes = b"") -> bytes:
    """Header and payload as one bytes object, ready for a single write.

    Asterisk waits only 5 ms for a payload after its header, so the two must never be
    split across writes. Raises ValueError for payloads the protocol cannot carry.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the AudioSocket maximum of {MAX_PAYLOAD}")
    frame = _validate(int(kind), bytes(payload))
    return _HEADER.pack(frame.kind, len(payload)) + payload


def encode_audio(pcm: bytes, sample_rate: int = 8000) -> bytes:
    return encode(audio_kind_for_rate(sample_rate), pcm)


def encode_uuid(call_uuid: _uuid.UUID | str) -> bytes:
    if isinstance(call_uuid, str):
        call_uuid = _uuid.UUID(call_uuid)
    return _HEADER.pack(Kind.UUID, 16) + call_uuid.bytes


def encode_dtmf(digit: str) -> bytes:
    return encode(Kind.DTMF, digit.encode("ascii"))


def encode_hangup() -> bytes:
    return b"\x00\x00\x00"


def encode_error(code: int | None = None) -> bytes:
    return encode(Kind.ERROR, b"" if code is None else bytes([code]))


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, iterate complete frames.

    ``feed`` accepts any split of the stream (byte by byte works). A ProtocolError is
    raised from ``__next__`` for the first malformed frame; after that the decoder is
    dead (the connection must be closed) and keeps raising the same error. Callers
    drain the iterator after each feed, so at most one partial frame (< 64 KiB) is held.
    """

    __slots__ = ("_buf", "_pos", "_error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # read offset into _buf: consumed bytes are dropped once per feed, not per frame
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def pending_kind(self) -> int | None:
        """The kind byte of the frame being received, before its payload is complete."""
        return self._buf[self._pos] if len(self._buf) > self._pos else None

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> Frame:
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            if pos and pos == len(buf):
                buf.clear()
                self._pos = 0
            raise StopIteration
        kind_byte, length = _HEADER.unpack_from(buf, pos)
        # Fail on the header: never wait (up to 64 KiB) for a payload we would refuse anyway.
        if not (0x10 <= kind_byte <= 0x18 and length and not length & 1):  # audio is checked inline
            problem = _header_problem(kind_byte, length)
            if problem is not None:
                self._error = ProtocolError(problem)
                raise self._error
        start = pos + HEADER_SIZE
        end = start + length
        if len(buf) < end:
            raise StopIteration
        payload = bytes(buf[start:end])
        self._pos = end
        try:
            return _validate(kind_byte, payload)
        except ProtocolError as exc:
            self._error = exc
            raise


def _header_problem(kind_byte: int, length: int) -> str | None:
    """What is wrong with a header on its own (the length a kind allows), or None."""
    if kind_byte not in _KNOWN_KINDS:
        return f"unknown message kind 0x{kind_byte:02x}"
    if kind_byte == Kind.UUID and length != 16:
        return f"UUID frame must carry 16 bytes, got {length}"
    if kind_byte == Kind.DTMF and length != 1:
        return f"DTMF frame must carry 1 byte, got {length}"
    if 0x10 <= kind_byte <= 0x18:
        if length == 0:
            return f"{Kind(kind_byte).name} audio frame is empty"
        if length % 2:
            return f"{Kind(kind_byte).name} audio frame has odd length {length} (s16le needs whole samples)"
    return None


def parse_header(header: bytes) -> tuple[Kind, int]:
    """Parse a 3-byte header for readers that use ``readexactly`` (header, then payload)."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(header)}")
    kind_byte, length = _HEADER.unpack(header)
    problem = _header_problem(kind_byte, length)
    if problem is not None:
        raise ProtocolError(problem)
    return Kind(kind_byte), length


def decode_payload(kind: Kind, payload: bytes) -> Frame:
    """Validate ``payload`` for ``kind`` (after :func:`parse_header`)."""
    return _validate(int(kind), payload)
