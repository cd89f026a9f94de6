"""The downlink's own frame parser (bridge/gateway/ws.py, UplinkConnection.data_received) judged
against websockets' parser, which it replaces for the data frames of an open connection.

Differential: the same byte stream — data, control and fragmented frames, protocol violations —
cut at arbitrary points is fed to a connection on the fast path and to one that leaves every byte
to websockets (the path before the fast one existed); both must deliver the same messages in the
same order, write the same bytes back (pongs, close frames) and end in the same state with the
same close code. One difference is deliberate: after a frame that fails the connection (bad UTF-8,
a protocol violation, the gateway's close), websockets' path still handed over frames parsed in the
same read; the fast path hands over nothing more.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri
from websockets.utils import accept_key

from bridge.gateway import ws as wsmod
from bridge.gateway.ws import MAX_MESSAGE_BYTES, UplinkConnection


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_extra_info(self, *args: Any, **kwargs: Any) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.written.append(b"<eof>")

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class _Peer:
    """One client connection, handshake done from the server's side, recording what it delivers."""

    def __init__(self, fast: bool, *, binary_sink: bool = False, max_size: int | None = MAX_MESSAGE_BYTES) -> None:
        self.got: list[tuple[str, str | bytes]] = []
        self.protocol = ClientProtocol(parse_uri("ws://gateway.test/ws"), max_size=max_size)
        self.conn = UplinkConnection(
            self.protocol, on_message=lambda m: self.got.append(("msg", m)),
            on_binary=(lambda b: self.got.append(("bin", b))) if binary_sink else None)
        self.transport = _Transport()
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        request = self.protocol.connect()
        self.protocol.send_request(request)
        self.protocol.data_to_send()
        self.response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(request.headers['Sec-WebSocket-Key'])}\r\n\r\n").encode()
        if not fast:
            self.conn._rx_mode = wsmod._RX_WEBSOCKETS  # every byte to websockets: the reference

    def feed(self, stream: bytes, cuts: list[int]) -> None:
        at = 0
        for cut in [*sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]:
            if self.transport.closed:
                return
            self.conn.data_received(stream[at:cut])
            at = cut

    def outcome(self) -> tuple[Any, ...]:
        rcvd = self.protocol.close_rcvd
        sent = self.protocol.close_sent
        return (self.got, self.protocol.state,
                rcvd.code if rcvd else None, sent.code if sent else None,
                b"".join(w for w in self.transport.written if w != b"<eof>"))


def _frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = None) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    masked = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((first, masked | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, masked | 126, n)
    else:
        head = struct.pack("!BBQ", first, masked | 127, n)
    if mask is not None:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


_payload = st.binary(min_size=0, max_size=400)
_text = st.text(max_size=60).map(str.encode)
_good_frame = st.one_of(
    _payload.map(lambda p: _frame(2, p)),
    _text.map(lambda p: _frame(1, p)),
    st.binary(max_size=125).map(lambda p: _frame(9, p)),   # ping: answered with a pong
    st.binary(max_size=125).map(lambda p: _frame(10, p)),  # unsolicited pong: ignored
    st.tuples(_payload, _payload, _payload).map(            # a fragmented binary message
        lambda ps: _frame(2, ps[0], fin=False) + _frame(0, ps[1], fin=False) + _frame(0, ps[2])),
    st.tuples(_text, _text).map(lambda ps: _frame(1, ps[0], fin=False) + _frame(0, ps[1])),
    st.binary(min_size=126, max_size=3000).map(lambda p: _frame(2, p)),  # 16-bit lengths
)
_bad_frame = st.one_of(
    _payload.map(lambda p: _frame(2, p, mask=b"\x01\x02\x03\x04")),  # masked: servers must not
    _payload.map(lambda p: _frame(2, p, rsv=0x40)),  # a reserved bit without an extension
    _payload.map(lambda p: _frame(3, p)),  # a reserved opcode
    st.just(_frame(1, b"\xff\xfe")),  # text that is not UTF-8
    st.just(_frame(0, b"stray")),  # a continuation with nothing to continue
    st.tuples(_payload, _payload).map(lambda ps: _frame(2, ps[0], fin=False) + _frame(2, ps[1])),  # no CONT
    st.just(_frame(8, struct.pack("!H", 1000) + b"bye")),  # the gateway closes
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_good_frame, max_size=12), tail=st.lists(_bad_frame, max_size=1),
       after=st.lists(_good_frame, max_size=3), cuts=st.lists(st.integers(0, 40_000), max_size=12),
       with_response=st.booleans())
def test_fast_path_delivers_and_answers_exactly_as_websockets(frames, tail, after, cuts, with_response):
    async def run() -> None:
        fast, ref = _Peer(fast=True), _Peer(fast=False)
        stream = b"".join(frames + tail + after)
        for peer in (fast, ref):
            if with_response:  # the handshake response and the first frames, read together
                peer.feed(peer.response + stream, [c + len(peer.response) for c in cuts])
            else:
                peer.feed(peer.response, [])
                peer.feed(stream, cuts)
        if not tail:
            assert fast.outcome()[:4] == ref.outcome()[:4]
        else:
            # After a frame that fails the connection, websockets' path still delivered the frames
            # parsed in the same read; the fast path delivers nothing more. Everything before it
            # is delivered alike, and the connection ends in the same state with the same codes.
            before = _Peer(fast=False)
            before.feed(before.response + b"".join(frames), [])
            assert fast.got == before.got
            assert ref.got[:len(before.got)] == before.got
            assert fast.outcome()[1:4] == ref.outcome()[1:4]
        # Written back: the same frames (pongs, the close) — masked with different keys, so compare
        # what websockets' own server-side parser reads from each.
        fw, rw = _unmask_all(fast.outcome()[4]), _unmask_all(ref.outcome()[4])
        if not tail:
            assert fw == rw
        else:  # the same answers to what came before, and the same close frame
            bw = _unmask_all(before.outcome()[4])
            assert fw[:len(bw)] == bw == rw[:len(bw)]
            assert [f for f in fw if f[0] == 8] == [f for f in rw if f[0] == 8]

    asyncio.run(run())


def _unmask_all(wire: bytes) -> list[tuple[int, bytes]]:
    from websockets.frames import Frame
    from websockets.streams import StreamReader

    reader = StreamReader()
    reader.feed_data(wire)
    out = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=True, max_size=None)
        try:
            next(parser)
        except StopIteration as done:
            out.append((int(done.value.opcode), bytes(done.value.data)))
            continue
        raise AssertionError("incomplete frame written")
    return out


async def test_fast_path_is_taken_after_the_handshake():
    """Not only equivalent: the fast path is what runs once the connection is open (a websockets
    upgrade that changed what it relies on would make this fail, not silently slow down)."""
    peer = _Peer(fast=True)
    audio = bytes(range(256)) + bytes(64)
    peer.feed(peer.response + _frame(2, audio), [])
    assert peer.conn._rx_mode == wsmod._RX_FAST
    assert peer.protocol.state is State.OPEN
    assert peer.got == [("msg", audio)]


async def test_a_large_message_arriving_read_by_read_is_delivered_once_whole():
    peer = _Peer(fast=True)
    peer.feed(peer.response, [])
    big = bytes(range(256)) * 4000  # 1 MB: the 64-bit length encoding
    wire = _frame(2, big) + _frame(2, b"after")
    for i in range(0, len(wire), 65536):
        peer.conn.data_received(wire[i:i + 65536])
    assert peer.got == [("msg", big), ("msg", b"after")]
    assert peer.conn._rx_mode == wsmod._RX_FAST and not peer.conn._rx


async def test_a_frame_over_max_size_fails_the_connection_with_1009_before_it_is_buffered():
    peer = _Peer(fast=True, max_size=1000)
    peer.feed(peer.response, [])
    peer.conn.data_received(_frame(2, bytes(2000))[:100])  # only the start: refused on the header
    assert peer.got == []
    assert peer.protocol.close_sent is not None and peer.protocol.close_sent.code == 1009


async def test_binary_sink_gets_binary_and_the_message_sink_gets_text_in_order():
    peer = _Peer(fast=True, binary_sink=True)
    peer.feed(peer.response, [])
    wire = _frame(2, b"\x01\x02") + _frame(1, b'{"type":"x"}') + _frame(2, b"\x03", fin=False) + _frame(0, b"\x04")
    peer.conn.data_received(wire)
    assert peer.got == [("bin", b"\x01\x02"), ("msg", '{"type":"x"}'), ("bin", b"\x03\x04")]


async def test_eof_inside_a_frame_is_judged_by_websockets():
    fast, ref = _Peer(fast=True), _Peer(fast=False)
    for peer in (fast, ref):
        peer.feed(peer.response + _frame(2, b"whole") + _frame(2, bytes(300))[:50], [])
        peer.conn.eof_received()
    assert fast.outcome()[:4] == ref.outcome()[:4]
    assert fast.got == [("msg", b"whole")]


@pytest.mark.parametrize("refusal", [b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nno way",
                                     b"HTTP/1.1 101 Switching Protocols\r\n\r\n"])  # 101 without the headers
async def test_a_refused_or_broken_handshake_stays_websockets_own(refusal):
    peer = _Peer(fast=True)
    peer.conn.data_received(refusal)
    assert peer.conn._rx_mode == wsmod._RX_WEBSOCKETS
    assert peer.protocol.state is not State.OPEN


async def _aillomvox_on_the_wire() -> tuple[Any, _Peer]:
    from bridge.gateway.aillomvox import AillomVoxGateway

    gw = AillomVoxGateway("ws://gateway.test/ws", "key")
    gw._loop = asyncio.get_running_loop()
    peer = _Peer(fast=True)
    peer.conn.on_message, peer.conn.on_binary = gw._on_ws_message, gw._on_ws_audio
    peer.conn.on_lost = gw._on_ws_lost
    gw._ws = peer.conn
    peer.feed(peer.response, [])
    return gw, peer


async def test_aillomvox_audio_reaches_the_audio_handler_in_order_with_the_events(caplog):
    """Binary messages skip the event objects (AudioOut) but keep their place among the events;
    odd-length audio loses its last byte (logged), empty audio is nothing."""
    from bridge.gateway.base import Closed, Transcript

    gw, peer = await _aillomvox_on_the_wire()
    seen: list[Any] = []
    deliver = asyncio.create_task(gw.deliver(seen.append, lambda pcm: seen.append(pcm)))
    await asyncio.sleep(0)
    peer.conn.data_received(_frame(2, b"\x01\x02") + _frame(1, b'{"type":"transcript","role":"assistant",'
                                                               b'"text":"hi","final":true}')
                            + _frame(2, b"\x03\x04\x05") + _frame(2, b"") + _frame(2, b"\x06\x07"))
    peer.conn.connection_lost(None)
    await asyncio.wait_for(deliver, 5)
    assert seen[:4] == [b"\x01\x02", Transcript("assistant", "hi", True), b"\x03\x04", b"\x06\x07"]
    assert isinstance(seen[4], Closed)
    assert "odd-length audio (3 bytes)" in caplog.text
    assert gw.stats["frames_down"] == 3 and gw.stats["bytes_down"] == 6


async def test_a_failing_audio_handler_fails_deliver_not_the_socket():
    gw, peer = await _aillomvox_on_the_wire()

    def audio(pcm: bytes) -> None:
        raise RuntimeError("handler bug")

    deliver = asyncio.create_task(gw.deliver(lambda event: None, audio))
    await asyncio.sleep(0)
    peer.conn.data_received(_frame(2, b"\x01\x02"))  # raises nothing into the transport's callback
    with pytest.raises(RuntimeError, match="handler bug"):
        await asyncio.wait_for(deliver, 5)
