"""bridge/rtp_leg.py on real UDP sockets (127.0.0.1): a fake Asterisk External Media peer talks RTP to a leg."""

from __future__ import annotations

import asyncio
import random
import socket

import numpy as np
import pytest

from bridge.rtp import CODECS, Codec, RtpError, RtpPacket, build, parse
from bridge.rtp_leg import RtpLeg, RtpPortPool, RtpPortsExhausted

ULAW = CODECS["ulaw"]
SLIN16 = CODECS["slin16"]
HOST = "127.0.0.1"


class Listener:
    """A LegListener that records frames and wakes the test when enough have come."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.gone: list[str] = []
        self._want = 0
        self._enough = asyncio.Event()

    def on_caller_audio(self, pcm: bytes) -> None:
        self.frames.append(pcm)
        if len(self.frames) >= self._want:
            self._enough.set()

    def on_caller_rate(self, rate: int) -> None:
        raise AssertionError("an RTP leg's rate is fixed at creation")

    def on_dtmf(self, digit: str) -> None:
        raise AssertionError("DTMF comes from ARI, not the media stream")

    def on_caller_gone(self, why: str) -> None:
        self.gone.append(why)

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[bytes]:
        self._want = n
        if len(self.frames) < n:
            self._enough.clear()
            await asyncio.wait_for(self._enough.wait(), timeout)
        return self.frames


class Peer(asyncio.DatagramProtocol):
    """The fake Asterisk side: a UDP socket that sends RTP and collects what the leg sends back."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)


async def open_peer() -> Peer:
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0))
    return peer


def free_range(n: int) -> tuple[int, int]:
    """A range of n UDP ports nobody holds right now (other tests share the machine)."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((HOST, p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return first, first + n - 1
    raise RuntimeError("no free UDP port range on loopback")


@pytest.fixture
def pool() -> RtpPortPool:
    first, last = free_range(8)
    return RtpPortPool(HOST, first, last)


def ulaw_payload(seq: int) -> bytes:
    """A distinct µ-law payload per sequence number."""
    return bytes([(seq * 13 + i) & 0x7F for i in range(160)])


async def connected(pool: RtpPortPool, codec: Codec | str = ULAW) -> tuple[RtpLeg, Peer, Listener, list[str]]:
    hangups: list[str] = []
    leg = await pool.open(codec, on_hangup=hangups.append)
    peer = await open_peer()
    listener = Listener()
    leg.attach(listener)
    leg.set_remote(*peer.address)
    return leg, peer, listener, hangups


async def test_paced_packets_arrive_in_order(pool: RtpPortPool) -> None:
    leg, peer, listener, _ = await connected(pool)
    to = (HOST, leg.local_port)
    for seq in range(65520, 65520 + 40):  # across the 16-bit wrap
        peer.send(build(0, seq & 0xFFFF, seq * 160 & 0xFFFFFFFF, 77, ulaw_payload(seq)), to)
        await asyncio.sleep(0.005)  # pacing of the sender, not synchronisation
    frames = await listener.wait_for(40)
    assert frames == [ULAW.decode(ulaw_payload(s)) for s in range(65520, 65560)]
    assert leg.stats.delivered == 40 and leg.stats.concealed == 0
    leg.hangup()


async def test_other_sources_are_ignored(pool: RtpPortPool) -> None:
    leg, peer, listener, _ = await connected(pool)
    intruder = await open_peer()
    to = (HOST, leg.local_port)
    for seq in range(10):
        intruder.send(build(0, 100 + seq, 0, 5, bytes(160)), to)  # would sync the buffer if let in
    peer.send(build(0, 1, 0, 77, ulaw_payload(1)), to)
    peer.send(build(0, 2, 160, 77, ulaw_payload(2)), to)
    frames = await listener.wait_for(2)
    await asyncio.sleep(0.05)
    assert frames == [ULAW.decode(ulaw_payload(1)), ULAW.decode(ulaw_payload(2))]
    assert leg.stats.wrong_source == 10
    leg.hangup()


async def test_reordered_and_duplicated_on_the_wire_delivered_once_in_order(pool: RtpPortPool) -> None:
    leg, peer, listener, _ = await connected(pool)
    to = (HOST, leg.local_port)
    order = [1, 3, 2, 2, 4, 6, 5, 1, 7, 7, 9, 8, 10, 3]
    for seq in order:
        peer.send(build(0, seq, seq * 160, 77, ulaw_payload(seq)), to)
    frames = await listener.wait_for(10)
    await asyncio.sleep(0.1)  # anything more (a duplicate played twice) would show now
    assert frames == [ULAW.decode(ulaw_payload(s)) for s in range(1, 11)]
    assert leg.stats.duplicates == 4 and leg.stats.reordered == 3
    leg.hangup()


async def test_gap_timer_releases_held_packets(pool: RtpPortPool) -> None:
    leg, peer, listener, _ = await connected(pool)
    to = (HOST, leg.local_port)
    peer.send(build(0, 1, 160, 77, ulaw_payload(1)), to)
    peer.send(build(0, 3, 480, 77, ulaw_payload(3)), to)  # 2 is lost and the stream then pauses
    frames = await listener.wait_for(3, timeout=2.0)
    assert frames[2] == ULAW.decode(ulaw_payload(3))
    assert leg.stats.concealed == 1
    leg.hangup()


async def test_audio_before_attach_is_dropped_and_counted(pool: RtpPortPool) -> None:
    leg = await pool.open(ULAW, on_hangup=lambda why: None)
    peer = await open_peer()
    leg.set_remote(*peer.address)
    peer.send(build(0, 1, 0, 77, ulaw_payload(1)), (HOST, leg.local_port))
    for _ in range(100):
        if leg.stats.unattached:
            break
        await asyncio.sleep(0.01)
    assert leg.stats.unattached == 1
    listener = Listener()
    leg.attach(listener)
    peer.send(build(0, 2, 160, 77, ulaw_payload(2)), (HOST, leg.local_port))
    assert await listener.wait_for(1) == [ULAW.decode(ulaw_payload(2))]
    leg.abort()


async def test_dtmf_events_are_not_audio(pool: RtpPortPool) -> None:
    leg, peer, listener, _ = await connected(pool)
    to = (HOST, leg.local_port)
    peer.send(build(101, 1, 0, 77, b"\x05\x0a\x00\xa0", marker=True), to)
    peer.send(build(0, 2, 160, 77, ulaw_payload(2)), to)
    assert await listener.wait_for(1) == [ULAW.decode(ulaw_payload(2))]
    assert leg.stats.telephone_events == 1
    leg.hangup()


async def test_send_frame_makes_valid_rtp(pool: RtpPortPool) -> None:
    leg, peer, _, _ = await connected(pool)
    voice = np.full(160, 2000, dtype="<i2").tobytes()
    frames = [bytes(320), voice, voice, bytes(320), voice]
    for f in frames:
        assert leg.send_frame(f)
    packets: list[RtpPacket] = []
    for _ in frames:
        data, addr = await asyncio.wait_for(peer.received.get(), 5)
        assert addr == (HOST, leg.local_port)  # symmetric RTP: we send from the port Asterisk sends to
        packets.append(parse(data))
    seqs = [p.sequence for p in packets]
    assert [(s - seqs[0]) & 0xFFFF for s in seqs] == [0, 1, 2, 3, 4]
    assert [(p.timestamp - packets[0].timestamp) & 0xFFFFFFFF for p in packets] == [0, 160, 320, 480, 640]
    assert [p.marker for p in packets] == [True, True, False, False, True]
    assert {p.payload_type for p in packets} == {0} and len({p.ssrc for p in packets}) == 1
    assert packets[1].payload == ULAW.encode(voice) and len(packets[1].payload) == 160
    leg.hangup()


async def test_slin16_is_received_in_network_byte_order_and_answered_in_ulaw(pool: RtpPortPool) -> None:
    leg, peer, listener, _ = await connected(pool, "slin16")  # by its Asterisk name, as the ARI ingress opens it
    assert leg.rate == 16000
    samples = np.arange(-320, 320, 2, dtype="<i2") * 37
    pcm = samples.tobytes()
    peer.send(build(118, 9, 0, 3, samples.astype(">i2").tobytes()), (HOST, leg.local_port))
    assert await listener.wait_for(1) == [pcm]  # network byte order on the wire, ours in memory
    # Asterisk drops a dynamic payload type arriving on External Media (no SDP to map it): what we
    # send is µ-law 8 kHz, PT 0, one 20 ms packet per 16 kHz frame, the same signal at half the rate.
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(320 * 5) / 16000)).astype("<i2")
    for i in range(5):
        assert leg.send_frame(tone[i * 320:(i + 1) * 320].tobytes())
    packets = [parse((await asyncio.wait_for(peer.received.get(), 5))[0]) for _ in range(5)]
    assert {p.payload_type for p in packets} == {0}
    assert [len(p.payload) for p in packets] == [160] * 5
    assert [p.timestamp - packets[0].timestamp for p in packets] == [0, 160, 320, 480, 640]
    heard = np.frombuffer(ULAW.decode(b"".join(p.payload for p in packets[1:])), "<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(heard))
    assert np.argmax(spectrum) * 8000 / len(heard) == pytest.approx(440, abs=15)
    leg.hangup()


async def test_send_frame_false_without_remote_or_after_close(pool: RtpPortPool) -> None:
    hangups: list[str] = []
    leg = await pool.open(ULAW, on_hangup=hangups.append)
    assert leg.send_frame(bytes(320)) is False  # remote not announced yet
    leg.set_remote(HOST, 4000)
    leg.hangup()
    leg.abort()  # a second end is a no-op
    assert leg.send_frame(bytes(320)) is False
    assert hangups == ["hangup"]
    with pytest.raises(ValueError, match="not an IP address"):
        leg.set_remote("asterisk.example", 4000)


async def test_pool_reuse_never_leaks(pool: RtpPortPool) -> None:
    small = RtpPortPool(HOST, pool.first_port, pool.first_port + 2)
    used: set[int] = set()
    for i in range(60):
        leg = await small.open(ULAW, on_hangup=lambda why: None)
        used.add(leg.local_port)
        (leg.hangup if i % 2 else leg.abort)()
        await leg.wait_closed()
    assert small.in_use == set()
    assert used == {small.first_port, small.first_port + 1, small.first_port + 2}  # round-robin


async def test_pool_exhaustion_names_the_range_and_release_frees(pool: RtpPortPool) -> None:
    first = pool.first_port
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind((HOST, first))  # another program holds the first port
    try:
        small = RtpPortPool(HOST, first, first + 2)
        a = await small.open(ULAW, on_hangup=lambda why: None)
        b = await small.open(ULAW, on_hangup=lambda why: None)
        assert {a.local_port, b.local_port} == {first + 1, first + 2}
        with pytest.raises(RtpPortsExhausted, match=rf"127\.0\.0\.1:{first}-{first + 2} \(2 used by calls, 1 by other"):
            await small.open(ULAW, on_hangup=lambda why: None)
        a.abort()
        assert a.local_port in small.in_use  # until the socket is really closed
        await a.wait_closed()
        c = await small.open(ULAW, on_hangup=lambda why: None)
        assert c.local_port == a.local_port
        b.hangup()
        c.hangup()
        await b.wait_closed()
        await c.wait_closed()
        assert small.in_use == set()
    finally:
        squatter.close()


async def test_on_hangup_failure_still_frees_the_port(pool: RtpPortPool) -> None:
    def broken(why: str) -> None:
        raise RuntimeError("ARI down")

    leg = await pool.open(ULAW, on_hangup=broken)
    port = leg.local_port
    leg.hangup()
    await asyncio.wait_for(leg.wait_closed(), 5)
    assert port not in pool.in_use and leg.closed


async def test_pool_open_names_an_unknown_format(pool: RtpPortPool) -> None:
    with pytest.raises(RtpError, match="'g722'"):
        await pool.open("g722", on_hangup=lambda why: None)
    assert pool.in_use == set()


def test_pool_rejects_a_bad_range() -> None:
    with pytest.raises(ValueError, match="70000"):
        RtpPortPool(HOST, 10000, 70000)
    with pytest.raises(ValueError, match="first ≤ last"):
        RtpPortPool(HOST, 10002, 10000)
