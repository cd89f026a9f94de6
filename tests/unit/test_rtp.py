"""bridge/rtp.py: RTP packets, the External Media codecs, the sender and the jitter buffer."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import g711
from bridge.rtp import (
    CODECS,
    JitterBuffer,
    MalformedPacket,
    RtpError,
    RtpPacket,
    RtpReceiver,
    RtpSender,
    build,
    codec_named,
    parse,
)

ULAW = CODECS["ulaw"]
SLIN16 = CODECS["slin16"]


# ---------------------------------------------------------------------------------------------
# Packets


def test_parse_minimal_header_fields() -> None:
    data = bytes([0x80, 0x80 | 118]) + struct.pack("!HII", 0xABCD, 0x01020304, 0xDEADBEEF) + b"\x01\x02"
    p = parse(data)
    assert p == RtpPacket(118, 0xABCD, 0x01020304, 0xDEADBEEF, b"\x01\x02", True, ())


@given(pt=st.integers(0, 127).filter(lambda v: not 72 <= v <= 76), seq=st.integers(0, 0xFFFF),
       ts=st.integers(0, 0xFFFFFFFF), ssrc=st.integers(0, 0xFFFFFFFF), payload=st.binary(max_size=400),
       marker=st.booleans(), csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
       ext=st.none() | st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12).map(lambda b: b[: len(b) // 4 * 4])),
       padding=st.integers(0, 255))
def test_build_parse_round_trip(pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool,
                                csrcs: list[int], ext: tuple[int, bytes] | None, padding: int) -> None:
    data = build(pt, seq, ts, ssrc, payload, marker=marker, csrcs=tuple(csrcs), extension=ext, padding=padding)
    p = parse(data)
    assert (p.payload_type, p.sequence, p.timestamp, p.ssrc, p.payload, p.marker, p.csrcs) == (
        pt, seq, ts, ssrc, payload, marker, tuple(csrcs))


def test_extension_and_padding_are_skipped_not_payload() -> None:
    data = build(0, 1, 2, 3, b"AUDIO", extension=(0xBEDE, b"\xff" * 8), padding=3, csrcs=(7, 8))
    assert parse(data).payload == b"AUDIO"
    assert parse(data).csrcs == (7, 8)


@pytest.mark.parametrize("data, words", [
    (b"", "shorter than the 12-byte"),
    (b"\x80" * 11, "shorter than the 12-byte"),
    (bytes([0x40, 0]) + bytes(10), "version 1"),
    (bytes([0x00, 0]) + bytes(10), "version 0"),
    (bytes([0xC0, 0]) + bytes(10), "version 3"),
    (bytes([0x82, 0]) + bytes(10) + bytes(4), "CSRC count 2"),
    (bytes([0x90, 0]) + bytes(10) + b"\x00\x00", "header extension flag set"),
    (bytes([0x90, 0]) + bytes(10) + b"\xbe\xde\x00\x02" + bytes(4), "header extension of 2 words"),
    (bytes([0xA0, 0]) + bytes(10) + b"ab\x00", "padding count is 0"),
    (bytes([0xA0, 0]) + bytes(10) + b"ab\x04", "padding count 4"),
    (bytes([0xA0, 0]) + bytes(10) + b"\x0f", "padding count 15"),
    (bytes([0x80, 200]) + bytes(10), "RTCP packet type 200"),
])
def test_malformed_packets_named_precisely(data: bytes, words: str) -> None:
    with pytest.raises(MalformedPacket, match=words):
        parse(data)


@given(st.binary(max_size=80))
def test_parse_never_raises_anything_but_malformed(data: bytes) -> None:
    try:
        p = parse(data)
    except MalformedPacket:
        return
    assert len(p.payload) <= len(data) - 12


def test_build_rejects_out_of_range_fields() -> None:
    for kwargs in ({"payload_type": 128}, {"sequence": 65536}, {"timestamp": -1}, {"ssrc": 1 << 32}):
        args = {"payload_type": 0, "sequence": 0, "timestamp": 0, "ssrc": 0, "payload": b""} | kwargs
        with pytest.raises(RtpError):
            build(**args)  # type: ignore[arg-type]
    with pytest.raises(RtpError, match="whole number of 32-bit words"):
        build(0, 0, 0, 0, b"", extension=(1, b"abc"))


# ---------------------------------------------------------------------------------------------
# Codecs


def test_codec_facts_from_asterisk() -> None:
    assert (ULAW.payload_type, ULAW.rate, ULAW.frame_bytes()) == (0, 8000, 320)
    assert (SLIN16.payload_type, SLIN16.rate, SLIN16.frame_bytes()) == (118, 16000, 640)
    assert CODECS["slin"].payload_type == 10 and CODECS["slin"].accepts(11)
    with pytest.raises(RtpError, match="supported: ulaw, slin16, slin"):
        codec_named("opus")


def test_slin16_is_big_endian_on_the_wire() -> None:
    pcm = np.array([1, -2, 0x1234], dtype="<i2").tobytes()
    wire = SLIN16.encode(pcm)
    assert wire == np.array([1, -2, 0x1234], dtype=">i2").tobytes() == b"\x00\x01\xff\xfe\x12\x34"
    assert SLIN16.decode(wire) == pcm


def test_ulaw_uses_g711_and_a_160_byte_payload() -> None:
    pcm = np.arange(-160, 160, 2, dtype="<i2").tobytes()
    assert len(ULAW.encode(pcm)) == 160
    assert ULAW.encode(pcm) == g711.encode(pcm)
    assert ULAW.decode(ULAW.encode(pcm)) == g711.decode(g711.encode(pcm))


# ---------------------------------------------------------------------------------------------
# Sender


def tone(codec_bytes: int, value: int = 1000) -> bytes:
    return np.full(codec_bytes // 2, value, dtype="<i2").tobytes()


def test_sender_sequence_timestamp_and_wrap() -> None:
    s = RtpSender(SLIN16, ssrc=42, sequence=0xFFFE, timestamp=0xFFFFFE00)
    frame = tone(640)
    packets = [parse(s.packet(frame)) for _ in range(4)]
    assert [p.sequence for p in packets] == [0xFFFE, 0xFFFF, 0, 1]
    assert [p.timestamp for p in packets] == [0xFFFFFE00, 0xFFFFFE00 + 320, (0xFFFFFE00 + 640) % 2**32,
                                              (0xFFFFFE00 + 960) % 2**32]
    assert {p.ssrc for p in packets} == {42}
    assert {p.payload_type for p in packets} == {118}
    assert packets[0].payload == SLIN16.encode(frame)


def test_sender_randomises_ssrc_seq_ts() -> None:
    a, b = RtpSender(ULAW), RtpSender(ULAW)
    assert (a.ssrc, a.sequence, a.timestamp) != (b.ssrc, b.sequence, b.timestamp)


def test_marker_on_first_packet_and_each_talkspurt() -> None:
    s = RtpSender(ULAW, rng=random.Random(1))
    silence, voice = bytes(320), tone(320)
    pattern = [silence, silence, voice, voice, silence, voice, voice, silence, silence]
    markers = [parse(s.packet(f)).marker for f in pattern]
    assert markers == [True, False, True, False, False, True, False, False, False]
    s2 = RtpSender(ULAW)
    assert [parse(s2.packet(f)).marker for f in (voice, voice)] == [True, False]


def test_sender_timestamp_follows_frame_length() -> None:
    s = RtpSender(ULAW, timestamp=0)
    s.packet(bytes(320))
    s.packet(bytes(640))  # a 40 ms frame
    assert s.timestamp == 160 + 320
    assert parse(s.packet(tone(320))).timestamp == 480


# ---------------------------------------------------------------------------------------------
# Jitter buffer


def frame_for(seq: int) -> bytes:
    """A distinct µ-law payload per sequence number (decodes to a distinct PCM frame)."""
    return bytes([(seq * 7 + i) & 0x7F for i in range(160)])


def make_jb(**kw: object) -> tuple[JitterBuffer, list[bytes]]:
    out: list[bytes] = []
    jb = JitterBuffer(ULAW, out.append, **kw)  # type: ignore[arg-type]
    return jb, out


def pkt(seq: int, ssrc: int = 1) -> RtpPacket:
    return RtpPacket(0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc, frame_for(seq))


def pcm(seq: int) -> bytes:
    return ULAW.decode(frame_for(seq))


def test_in_order_is_delivered_at_once_across_wrap() -> None:
    jb, out = make_jb()
    for i, seq in enumerate(range(65530, 65545)):
        jb.push(pkt(seq), now=i * 0.02)
        assert out[-1] == pcm(seq) and len(out) == i + 1  # zero added delay
        assert jb.deadline is None
    assert jb.stats.delivered == 15 and jb.stats.concealed == 0


def test_reorder_within_window_is_fixed() -> None:
    jb, out = make_jb()
    for seq in (10, 12, 11, 13):
        jb.push(pkt(seq), 0.0)
    assert out == [pcm(s) for s in (10, 11, 12, 13)]
    assert jb.stats.reordered == 1 and jb.stats.concealed == 0


def test_duplicates_and_late_are_dropped() -> None:
    jb, out = make_jb()
    for seq in (1, 2, 2, 1, 4, 4):
        jb.push(pkt(seq), 0.0)
    assert out == [pcm(1), pcm(2)]
    assert jb.stats.duplicates == 3  # 2 again, 1 again, 4 again (held)
    jb.expire(1.0)  # give up on 3
    assert len(out) == 4 and out[3] == pcm(4)
    jb.push(pkt(3), 1.1)  # its frame was concealed: late, not played
    assert jb.stats.late == 1 and len(out) == 4


def test_loss_concealment_repeat_attenuated_then_silence() -> None:
    jb, out = make_jb(depth=3)
    jb.push(pkt(1), 0.0)
    for seq in (5, 6, 7):  # 2, 3, 4 lost; depth 3 reached on 7
        jb.push(pkt(seq), 0.0)
    last = np.frombuffer(pcm(1), dtype="<i2")
    assert out[1] == (last >> 1).astype("<i2").tobytes()
    assert out[2] == out[3] == bytes(320)
    assert out[4:] == [pcm(5), pcm(6), pcm(7)]
    assert jb.stats.concealed == 3 and jb.stats.delivered == 4


def test_depth_zero_never_waits() -> None:
    jb, out = make_jb(depth=0)
    for seq in (1, 3, 2, 4):
        jb.push(pkt(seq), 0.0)
    assert out[0] == pcm(1) and out[2:] == [pcm(3), pcm(4)] and jb.stats.concealed == 1 and jb.stats.late == 1


def test_time_bound_releases_a_gap() -> None:
    jb, out = make_jb(depth=10, max_wait=0.06)
    jb.push(pkt(1), 0.0)
    jb.push(pkt(3), 0.02)
    assert jb.deadline == pytest.approx(0.08)
    jb.expire(0.079)
    assert len(out) == 1
    jb.expire(0.08)
    assert len(out) == 3 and out[2] == pcm(3) and jb.deadline is None


def test_long_outage_conceals_at_most_max_conceal() -> None:
    jb, out = make_jb(max_conceal=5)
    jb.push(pkt(1), 0.0)
    jb.push(pkt(1000), 0.02)
    jb.expire(1.0)
    assert jb.stats.concealed == 5 and jb.stats.lost == 998-5
    assert out[-1] == pcm(1000)
    jb.push(pkt(1001), 1.0)
    assert out[-1] == pcm(1001)


def test_ssrc_change_resyncs_and_old_ssrc_is_late() -> None:
    jb, out = make_jb()
    for seq in (100, 101, 103):
        jb.push(pkt(seq), 0.0)
    jb.push(pkt(5000, ssrc=2), 0.0)  # new sender: held 103 flushed (102 concealed), then 5000 at once
    assert out[-1] == pcm(5000) and pcm(103) in out
    jb.push(pkt(5001, ssrc=2), 0.0)
    jb.push(pkt(102, ssrc=1), 0.0)
    assert out[-1] == pcm(5001)
    assert jb.stats.restarts == 1 and jb.stats.late == 1


def test_sequence_restart_backwards_resyncs_after_confirmation() -> None:
    jb, out = make_jb()
    for seq in range(30000, 30010):
        jb.push(pkt(seq), 0.0)
    jb.push(pkt(7), 0.0)  # far behind: one stray packet is late
    assert out[-1] == pcm(30009) and jb.stats.late == 1
    jb.push(pkt(8), 0.0)  # the next confirms a restart
    jb.push(pkt(9), 0.0)
    assert out[-2:] == [pcm(8), pcm(9)] and jb.stats.restarts == 1


def test_stray_old_packet_does_not_derail() -> None:
    jb, out = make_jb()
    for seq in range(30000, 30010):
        jb.push(pkt(seq), 0.0)
    jb.push(pkt(7), 0.0)
    jb.push(pkt(30010), 0.0)
    assert out[-1] == pcm(30010) and jb.stats.restarts == 0


def test_jitter_buffer_rejects_bad_settings() -> None:
    with pytest.raises(RtpError, match="depth -1"):
        JitterBuffer(ULAW, print, depth=-1)
    with pytest.raises(RtpError, match="max_wait"):
        JitterBuffer(ULAW, print, max_wait=0)


@settings(max_examples=400, deadline=None)
@given(start=st.integers(0, 0xFFFF), n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1),
       depth=st.integers(0, 5), window=st.integers(1, 4), dup_rate=st.floats(0, 0.5),
       loss_rate=st.floats(0, 0.2))
def test_never_twice_never_out_of_order(start: int, n: int, seed: int, depth: int, window: int,
                                        dup_rate: float, loss_rate: float) -> None:
    """Random local permutations, duplicates and losses: each frame at most once, in order."""
    rng = random.Random(seed)
    seqs = [start + i for i in range(n) if rng.random() >= loss_rate]
    wire: list[int] = []
    for s in seqs:
        wire.append(s)
        if rng.random() < dup_rate:
            wire.append(s)
    for i in range(len(wire)):  # displace each packet by up to `window` places
        j = min(len(wire) - 1, i + rng.randint(0, window))
        wire[i], wire[j] = wire[j], wire[i]
    for _ in range(rng.randint(0, 3)):  # some duplicates arriving much later
        if seqs:
            wire.append(rng.choice(seqs))
    jb, out = make_jb(depth=depth)
    by_frame = {pcm(s): s for s in range(start, start + n)}
    for t, s in enumerate(wire):
        jb.push(pkt(s), t * 0.02)
        jb.expire(t * 0.02)
    jb.flush()
    real = [by_frame[f] for f in out if f in by_frame]
    assert real == sorted(set(real))  # strictly increasing: never twice, never out of order
    assert set(real) <= set(seqs)
    st_ = jb.stats
    assert st_.delivered == len(real)
    assert st_.received == len(wire)
    assert st_.delivered + st_.duplicates + st_.late == st_.received


def test_in_order_input_with_duplicates_delivers_every_frame() -> None:
    jb, out = make_jb()
    for s in range(200):
        jb.push(pkt(s), 0.0)
        if s % 3 == 0:
            jb.push(pkt(s), 0.0)
    assert out == [pcm(s) for s in range(200)]
    assert jb.stats.duplicates == 67


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), start=st.integers(0, 0xFFFF), depth=st.integers(2, 5))
def test_reorder_within_depth_loses_nothing(seed: int, start: int, depth: int) -> None:
    """Any permutation inside blocks shorter than the depth is repaired completely."""
    rng = random.Random(seed)
    seqs = list(range(start, start + 80))
    wire: list[int] = [seqs[0]]  # the first packet syncs the buffer: what comes before it is late
    for i in range(1, len(seqs), depth):
        block = seqs[i:i + depth]
        rng.shuffle(block)
        wire.extend(block)
    jb, out = make_jb(depth=depth)
    for s in wire:
        jb.push(pkt(s), 0.0)
    jb.flush()
    assert out == [pcm(s) for s in seqs]
    assert jb.stats.concealed == 0


# ---------------------------------------------------------------------------------------------
# Receiver


def test_receiver_sorts_by_payload_type_and_counts() -> None:
    out: list[bytes] = []
    rx = RtpReceiver(SLIN16, out.append)
    rx.feed(build(118, 1, 0, 9, SLIN16.encode(tone(640, 300))), 0.0)
    rx.feed(build(101, 2, 0, 9, b"\x01\x80\x00\xa0"), 0.0)  # RFC 4733 DTMF
    rx.feed(build(13, 3, 0, 9, b"\x40"), 0.0)
    rx.feed(build(0, 4, 0, 9, bytes(160)), 0.0)  # µ-law on a slin16 leg
    rx.feed(build(118, 5, 0, 9, b"\x00\x01\x02"), 0.0)  # odd-length L16
    rx.feed(b"\x00garbage", 0.0)
    assert out == [tone(640, 300)]
    s = rx.stats
    assert (s.telephone_events, s.comfort_noise, s.wrong_payload_type, s.malformed, s.received) == (1, 1, 1, 2, 1)
    assert s.as_dict()["delivered"] == 1
