"""The AudioSocket codec: every kind, every malformation, any byte split (hypothesis)."""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import audiosocket as asp
from bridge.audiosocket import Frame, FrameDecoder, Kind, ProtocolError

AUDIO_KINDS = [k for k in Kind if k.is_audio]
U = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


def decode_all(data: bytes) -> list[Frame]:
    d = FrameDecoder()
    d.feed(data)
    return list(d)


def test_wire_examples_from_the_reference():
    assert asp.encode_uuid(U) == b"\x01\x00\x10" + U.bytes
    assert asp.encode_audio(b"\x00" * 320, 8000)[:3] == b"\x10\x01\x40"
    assert asp.encode_dtmf("5") == b"\x03\x00\x01\x35"
    assert asp.encode_hangup() == b"\x00\x00\x00"


@pytest.mark.parametrize(
    "rate,kind,nbytes",
    [(8000, 0x10, 320), (12000, 0x11, 480), (16000, 0x12, 640), (24000, 0x13, 960), (32000, 0x14, 1280),
     (44100, 0x15, 1764), (48000, 0x16, 1920), (96000, 0x17, 3840), (192000, 0x18, 7680)],
)
def test_audio_kinds_and_rates(rate, kind, nbytes):
    assert asp.audio_kind_for_rate(rate) == kind
    assert Kind(kind).sample_rate == rate
    assert asp.frame_bytes(rate) == nbytes
    (frame,) = decode_all(asp.encode_audio(b"\x01\x02" * (nbytes // 2), rate))
    assert frame.kind == kind and frame.sample_rate == rate and len(frame.payload) == nbytes


def test_every_kind_round_trips():
    frames = [
        Frame(Kind.UUID, U.bytes),
        Frame(Kind.DTMF, b"#"),
        *(Frame(k, b"\x00\x01" * 10) for k in AUDIO_KINDS),
        Frame(Kind.ERROR, b"\x02"),
        Frame(Kind.ERROR, b""),
        Frame(Kind.HANGUP, b""),
    ]
    wire = b"".join(asp.encode(f.kind, f.payload) for f in frames)
    assert decode_all(wire) == frames
    assert decode_all(wire)[0].uuid == U
    assert decode_all(wire)[1].digit == "#"


@pytest.mark.parametrize(
    "wire,message",
    [
        (b"\x02\x00\x00", "unknown message kind 0x02"),
        (b"\x20\x00\x02ab", "unknown message kind 0x20"),
        (b"\x01\x00\x0f" + b"x" * 15, "UUID frame must carry 16 bytes, got 15"),
        (b"\x01\x00\x11" + b"x" * 17, "UUID frame must carry 16 bytes, got 17"),
        (b"\x03\x00\x02" + b"12", "DTMF frame must carry 1 byte, got 2"),
        (b"\x03\x00\x01" + b"x", "DTMF frame carries invalid digit 0x78"),
        (b"\x10\x00\x00", "SLIN_8K audio frame is empty"),
        (b"\x10\x01\x3f" + b"\x00" * 319, "odd length 319"),
        (b"\x12\x00\x03" + b"\x00" * 3, "SLIN_16K audio frame has odd length 3"),
    ],
)
def test_malformed_frames_are_rejected_with_precise_errors(wire, message):
    d = FrameDecoder()
    d.feed(wire)
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(")):
        next(d)
    # A dead decoder stays dead: the connection must be closed.
    with pytest.raises(ProtocolError):
        next(d)
    with pytest.raises(ProtocolError):
        d.feed(b"\x10\x00\x02\x00\x00")


def test_unknown_kind_fails_on_the_header_without_waiting_for_the_payload():
    d = FrameDecoder()
    d.feed(b"\x42\xff\xff")  # claims 64 KiB; we must not wait for it
    with pytest.raises(ProtocolError, match="0x42"):
        next(d)


@pytest.mark.parametrize("header,message", [
    (b"\x01\xff\xff", "UUID frame must carry 16 bytes, got 65535"),
    (b"\x03\x10\x00", "DTMF frame must carry 1 byte"),
    (b"\x10\xff\xff", "odd length 65535"),
])
def test_impossible_lengths_fail_on_the_header_alone(header, message):
    d = FrameDecoder()
    d.feed(header)  # no payload yet: a decoder that waits for it would return nothing here
    with pytest.raises(ProtocolError, match=message):
        next(d)


def test_partial_frames_wait_for_more_bytes():
    wire = asp.encode_audio(b"\x05\x00" * 160)
    d = FrameDecoder()
    d.feed(wire[:2])
    assert list(d) == []
    d.feed(wire[2:100])
    assert list(d) == [] and d.buffered == 100
    d.feed(wire[100:])
    assert [f.payload for f in d] == [b"\x05\x00" * 160]
    assert d.buffered == 0


def test_encoder_refuses_what_the_protocol_cannot_carry():
    with pytest.raises(ValueError, match="exceeds the AudioSocket maximum"):
        asp.encode(Kind.SLIN_8K, b"\x00" * 65536)
    with pytest.raises(ValueError, match="odd length"):
        asp.encode_audio(b"\x00" * 3)
    with pytest.raises(ValueError, match="no audio kind for 11025"):
        asp.encode_audio(b"\x00\x00", 11025)
    with pytest.raises(ValueError, match="invalid digit"):
        asp.encode_dtmf("x")
    assert len(asp.encode(Kind.SLIN_8K, b"\x00" * 65534)) == 65537


def test_header_parsing_for_readexactly_readers():
    kind, length = asp.parse_header(b"\x12\x02\x80")
    assert kind is Kind.SLIN_16K and length == 640
    with pytest.raises(ProtocolError, match="header must be 3 bytes"):
        asp.parse_header(b"\x12")
    assert asp.decode_payload(Kind.DTMF, b"7").digit == "7"


# ---------------------------------------------------------------- property-based

valid_frames = st.one_of(
    st.uuids().map(lambda u: Frame(Kind.UUID, u.bytes)),
    st.sampled_from(sorted(asp.DTMF_DIGITS)).map(lambda d: Frame(Kind.DTMF, bytes([d]))),
    st.tuples(st.sampled_from(AUDIO_KINDS), st.integers(1, 400)).flatmap(
        lambda kn: st.binary(min_size=2 * kn[1], max_size=2 * kn[1]).map(lambda b, k=kn[0]: Frame(k, b))
    ),
    st.just(Frame(Kind.HANGUP, b"")),
    st.binary(max_size=2).map(lambda b: Frame(Kind.ERROR, b)),
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(valid_frames, max_size=20), cuts=st.lists(st.integers(0, 20000), max_size=30))
def test_any_split_of_a_valid_stream_decodes_to_the_same_frames(frames, cuts):
    wire = b"".join(asp.encode(f.kind, f.payload) for f in frames)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    d = FrameDecoder()
    out: list[Frame] = []
    for a, b in itertools.pairwise(points):
        d.feed(wire[a:b])
        out.extend(d)
    assert out == frames
    assert d.buffered == 0


@settings(max_examples=500, deadline=None)
@given(garbage=st.binary(max_size=300))
def test_garbage_either_decodes_or_raises_protocol_error_never_anything_else(garbage):
    d = FrameDecoder()
    d.feed(garbage)
    try:
        for frame in d:
            # Whatever was accepted re-encodes to the same bytes.
            assert isinstance(frame, Frame)
            asp.encode(frame.kind, frame.payload)
    except ProtocolError as exc:
        assert str(exc)  # noqa: PT017 - either outcome is allowed; pytest.raises would demand one
    assert d.buffered <= len(garbage)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(valid_frames, min_size=1, max_size=5), junk_kind=st.integers(0, 255).filter(
    lambda k: k not in {int(x) for x in Kind}))
def test_a_bad_frame_after_good_ones_yields_the_good_ones_first(frames, junk_kind):
    wire = b"".join(asp.encode(f.kind, f.payload) for f in frames) + bytes([junk_kind, 0, 0])
    d = FrameDecoder()
    d.feed(wire)
    got = []
    with pytest.raises(ProtocolError, match=f"0x{junk_kind:02x}"):  # noqa: PT012 - the good frames come out first
        for f in d:
            got.append(f)
    assert got == frames
