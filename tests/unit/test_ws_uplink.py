"""The uplink's own framing (bridge/gateway/ws.py, UplinkConnection.write_message): what websockets'
server-side parser reads back, for every length encoding, masked with a fresh key each time."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from bridge.gateway.ws import UplinkConnection


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


class _Protocol:
    from websockets.protocol import State

    state = State.OPEN
    extensions: list = []
    expect_continuation_frame = False


def _parse(wire: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(wire)
    parser = Frame.parse(reader.read_exact, mask=True, max_size=None)
    try:
        next(parser)
    except StopIteration as done:
        return done.value
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 320, 65535, 65536, 70000])
@pytest.mark.parametrize("kind", [bytes, str])
def test_every_length_encoding_parses_back_masked(size, kind):
    conn = UplinkConnection.__new__(UplinkConnection)
    conn.uplink_protocol, conn.uplink_transport = _Protocol(), _Transport()  # type: ignore[assignment]
    conn._mask_pool, conn._mask_at = b"", 0
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    data = payload.decode("latin-1") if kind is str else payload
    assert conn.write_message(data, 1 << 20)
    (wire,) = conn.uplink_transport.written
    assert wire[1] & 0x80, "client frames must be masked (RFC 6455 §5.3)"
    frame = _parse(wire)
    assert frame.fin and frame.opcode is (Opcode.TEXT if kind is str else Opcode.BINARY)
    assert frame.data == (data.encode() if kind is str else payload)


def test_each_frame_gets_a_fresh_masking_key():
    conn = UplinkConnection.__new__(UplinkConnection)
    conn.uplink_protocol, conn.uplink_transport = _Protocol(), _Transport()  # type: ignore[assignment]
    conn._mask_pool, conn._mask_at = b"", 0
    for _ in range(3000):  # past the pool's refill
        conn.write_message(b"\0" * 320, 1 << 20)
    keys = [w[4:8] for w in conn.uplink_transport.written]
    assert len(set(keys)) > 2990  # 4 random bytes: collisions are rare, a constant key is not
