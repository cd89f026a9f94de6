"""G.711 µ-law (ITU-T G.711, the North American / Japanese companding law), table-driven.

Used wherever a wire carries 8-bit µ-law (``audio/pcmu``): the generic AI WebSocket of seed 001,
OpenAI Realtime's ``audio/pcmu`` for 8 kHz calls, and RTP (PT 0) for the ARI ingress.

Both directions are one numpy table lookup per buffer: decoding indexes a 256-entry table of
s16 values by the code byte; encoding indexes a 65 536-entry table of codes by the sample
viewed as an unsigned 16-bit number. The tables are computed once, at import, by the classic
Sun/CCITT algorithm that ``audioop.lin2ulaw``/``ulaw2lin`` (and most telephony stacks) use:
14-bit magnitude by arithmetic shift, bias 33, eight segments, clipped at 8159, all bits
inverted on the wire. Decoding is exactly G.711's table. Encoding differs from ITU-T G.191's
reference software on 508 negative inputs, which G.191 rounds to the neighbouring step because
it takes the magnitude before the shift; both are valid G.711 encoders (the decoder cannot tell
them apart beyond that one step). tests/unit/test_g711.py pins the standard's table values, every
input against ``audioop``, and that difference against G.191's own routine.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["decode", "encode", "ulaw_to_linear", "linear_to_ulaw"]

_BIAS = 0x84
_CLIP = 8159
_SEG_END = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)


def linear_to_ulaw(sample: int) -> int:
    """One s16 sample to its µ-law code (the reference algorithm, used to build the table)."""
    value = sample >> 2  # 14-bit, arithmetic shift as in the reference code
    if value < 0:
        value, mask = -value, 0x7F
    else:
        mask = 0xFF
    value = min(value, _CLIP) + (_BIAS >> 2)
    seg = next((i for i, end in enumerate(_SEG_END) if value <= end), 8)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((value >> (seg + 1)) & 0xF)) ^ mask


def ulaw_to_linear(code: int) -> int:
    """One µ-law code to its s16 sample."""
    u = ~code & 0xFF
    t = (((u & 0x0F) << 3) + _BIAS) << ((u & 0x70) >> 4)
    return _BIAS - t if u & 0x80 else t - _BIAS


_DECODE: npt.NDArray[np.int16] = np.array([ulaw_to_linear(c) for c in range(256)], dtype="<i2")
_ENCODE: npt.NDArray[np.uint8] = np.array(
    [linear_to_ulaw(s - 65536 if s >= 32768 else s) for s in range(65536)], dtype=np.uint8)


def decode(ulaw: bytes) -> bytes:
    """µ-law bytes → s16le PCM (twice as long)."""
    return _DECODE[np.frombuffer(ulaw, dtype=np.uint8)].tobytes()


def encode(pcm: bytes) -> bytes:
    """s16le PCM → µ-law bytes (half as long). An odd trailing byte is ignored."""
    if len(pcm) % 2:
        pcm = pcm[:-1]
    codes: bytes = _ENCODE[np.frombuffer(pcm, dtype="<u2")].tobytes()  # typed: frombuffer's dtype is Any
    return codes
