"""bridge/g711.py: G.711 µ-law, bit for bit.

Three independent references:

* values written out from the standard's µ-law table (ITU-T G.711 Table 2a): the decoder output of
  the first and last code of each of the eight segments, in the standard's ±8159 scale (×4 on
  the s16 scale), and encoder decisions away from the sign boundary;
* ``audioop.lin2ulaw``/``ulaw2lin`` (CPython's C implementation, deprecated but present in 3.11)
  for every one of the 65 536 inputs and 256 codes;
* ITU-T G.191's Software Tool Library (``ulaw_compress``/``ulaw_expand``), transcribed below. It
  agrees on every code and every non-negative input. For negative inputs it takes the magnitude
  as the one's complement (``~x >> 2``) where audioop (and bridge/g711.py) negate the arithmetic
  shift (``-(x >> 2)``), one more for every negative input; that changes the code (by one step)
  on 508 negative inputs, the four s16 values of each 14-bit value just past a decision level.
  bridge/g711.py follows audioop (symmetric: ``x`` and ``-x`` have the same magnitude code for
  exact 14-bit values); the test pins the difference so a change to either side is noticed.
"""

from __future__ import annotations

import itertools
import struct
import warnings

import numpy as np
import pytest

from bridge import g711

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


# ITU-T G.711 Table 2a: decoder output (±8159 scale) of the first and last code of each segment,
# for the positive sign (codes 0xFF..0x80 on the wire: all bits inverted).
SEGMENTS_14BIT = [(0, 30), (33, 93), (99, 219), (231, 471), (495, 975), (1023, 1983), (2079, 3999), (4191, 8031)]


def stl_compress(x: int) -> int:
    """ITU-T G.191 STL ``ulaw_compress`` for one s16 sample."""
    absno = (((~x) >> 2) + 33) if x < 0 else ((x >> 2) + 33)
    absno = min(absno, 0x1FFF)
    i, segno = absno >> 6, 1
    while i:
        segno += 1
        i >>= 1
    out = ((8 - segno) << 4) | (0xF - ((absno >> segno) & 0xF))
    return out | 0x80 if x >= 0 else out


def stl_expand(code: int) -> int:
    """ITU-T G.191 STL ``ulaw_expand`` for one code."""
    sign = -1 if code < 0x80 else 1
    mantissa = ~code & 0xFF
    exponent = (mantissa >> 4) & 7
    step = 4 << (exponent + 1)
    return sign * ((0x80 << exponent) + step * (mantissa & 0x0F) + step // 2 - 4 * 33)


ALL_S16 = np.arange(-32768, 32768, dtype="<i2").tobytes()
ALL_CODES = bytes(range(256))


def s16(pcm: bytes) -> list[int]:
    return list(np.frombuffer(pcm, dtype="<i2"))


@pytest.mark.parametrize("segment", range(8))
def test_segment_ends_decode_to_the_standards_table(segment):
    first, last = SEGMENTS_14BIT[segment]
    pos_first = 0xFF - 16 * segment  # mantissa 0 of the segment, positive sign
    pos_last = pos_first - 15
    assert g711.ulaw_to_linear(pos_first) == 4 * first
    assert g711.ulaw_to_linear(pos_last) == 4 * last
    # The negative half mirrors it (sign bit 0 on the wire).
    assert g711.ulaw_to_linear(pos_first & 0x7F) == -4 * first
    assert g711.ulaw_to_linear(pos_last & 0x7F) == -4 * last
    # Inside a segment the outputs are evenly spaced by 2 << segment in the 14-bit scale.
    outputs = [g711.ulaw_to_linear(pos_first - m) for m in range(16)]
    assert {b - a for a, b in itertools.pairwise(outputs)} == {4 * (2 << segment)}


@pytest.mark.parametrize("code,linear", [
    (0xFF, 0), (0x7F, 0),            # the two zeros: positive and negative
    (0xFE, 8), (0x7E, -8),           # the smallest non-zero step
    (0x80, 32124), (0x00, -32124),   # the extremes: ±8031 in the standard's scale
    (0xEF, 132), (0x6F, -132),       # first code of segment 1 (33)
    (0x8F, 16764), (0x0F, -16764),   # first code of segment 7 (4191)
    (0x9F, 8316), (0x1F, -8316),     # first code of segment 6 (2079)
    (0x90, 15996), (0x10, -15996),   # last code of segment 6 (3999)
])
def test_known_code_to_linear(code, linear):
    assert g711.ulaw_to_linear(code) == linear
    assert s16(g711.decode(bytes([code]))) == [linear]


@pytest.mark.parametrize("linear,code", [
    (0, 0xFF), (3, 0xFF),                # below the first decision value (14-bit 1): positive zero
    (4, 0xFE), (8, 0xFE),                # 14-bit 1..2: the first step (output 2)
    (12, 0xFD), (16, 0xFD),              # 14-bit 3..4: the next one (output 4)
    (32767, 0x80), (-32768, 0x00),       # full scale: the extreme codes
    (32124, 0x80), (-32124, 0x00),       # the extreme decoder outputs encode to themselves
    (32635, 0x80), (32636, 0x80),        # beyond the last decision value: clipped, not wrapped
    (-32636, 0x00), (-32767, 0x00),
    (132, 0xEF), (-132, 0x6F),           # segment 1's first output
    (16764, 0x8F), (-16764, 0x0F),       # segment 7's first output
])
def test_known_linear_to_code(linear, code):
    assert g711.linear_to_ulaw(linear) == code
    assert g711.encode(struct.pack("<h", linear)) == bytes([code])


def test_sign_bit_only_distinguishes_mirror_images():
    for code in range(128):
        assert g711.ulaw_to_linear(code) == -g711.ulaw_to_linear(code | 0x80)
    for x in range(4, 32768, 4):  # multiples of 4: exact 14-bit values, the same magnitude both ways
        assert g711.linear_to_ulaw(-x) == g711.linear_to_ulaw(x) & 0x7F


def test_decode_is_monotonic_over_the_code_space():
    positive = [g711.ulaw_to_linear(c) for c in range(0xFF, 0x7F, -1)]
    assert positive == sorted(positive) and len(set(positive)) == 128


def test_decode_matches_audioop_for_all_256_codes():
    assert g711.decode(ALL_CODES) == audioop.ulaw2lin(ALL_CODES, 2)


def test_encode_matches_audioop_for_all_65536_inputs():
    assert g711.encode(ALL_S16) == audioop.lin2ulaw(ALL_S16, 2)


def test_scalar_functions_agree_with_the_tables():
    assert bytes(g711.linear_to_ulaw(x) for x in range(-32768, 32768)) == g711.encode(ALL_S16)
    assert struct.pack("<256h", *(g711.ulaw_to_linear(c) for c in range(256))) == g711.decode(ALL_CODES)


def test_decode_matches_itu_g191_for_all_codes():
    assert s16(g711.decode(ALL_CODES)) == [stl_expand(c) for c in range(256)]


def test_encode_matches_itu_g191_except_negative_decision_levels():
    ours = g711.encode(ALL_S16)
    differ = []
    for i, x in enumerate(range(-32768, 32768)):
        ref = stl_compress(x)
        if ours[i] != ref:
            differ.append(x)
            # One code step apart, same sign, and audioop's code is the larger magnitude.
            assert ours[i] == ref - 1, (x, hex(ours[i]), hex(ref))
    assert len(differ) == 508
    # Only negative inputs; in 127 runs of four (the four s16 values of one 14-bit value).
    assert all(x < 0 for x in differ)
    assert len({x >> 2 for x in differ}) == 127
    assert -1 in differ and min(differ) == -31612


def test_round_trip_code_to_linear_to_code():
    # Every code but the negative zero survives decode → encode; 0x7F (−0) decodes to 0 = +0 (0xFF).
    back = g711.encode(g711.decode(ALL_CODES))
    expected = bytes(0xFF if c == 0x7F else c for c in range(256))
    assert back == expected


def test_round_trip_linear_error_is_within_half_a_step():
    pcm = np.frombuffer(ALL_S16, dtype="<i2").astype(np.int64)
    back = np.frombuffer(g711.decode(g711.encode(ALL_S16)), dtype="<i2").astype(np.int64)
    clipped = np.abs(pcm) > 32124 + 4 * 128
    err = np.abs(back - pcm)[~clipped]
    # Segment 7's step is 256 in 14-bit units: 1024 on the s16 scale, so at most half of it (+ the
    # 14-bit truncation).
    assert err.max() <= 512 + 4


def test_odd_length_input_drops_the_trailing_byte():
    pcm = struct.pack("<3h", 1000, -1000, 0) + b"\x7f"
    assert g711.encode(pcm) == g711.encode(pcm[:-1])
    assert len(g711.encode(pcm)) == 3
    assert g711.encode(b"\x01") == b""


def test_empty_buffers():
    assert g711.encode(b"") == b""
    assert g711.decode(b"") == b""


def test_lengths():
    assert len(g711.decode(bytes(160))) == 320  # one 20 ms frame at 8 kHz
    assert len(g711.encode(bytes(320))) == 160
