"""The caller's leg of a call: the seam between a call and whatever carries the caller's audio.

A :class:`~bridge.session.CallSession` talks to the caller only through a :class:`CallerLeg`:
it sends one frame of playout per clock tick, and it hangs the leg up (or drops it) when the call
ends. What comes the other way (the caller's audio, DTMF digits, the caller going away, the rate
the caller speaks at) the leg delivers to a :class:`LegListener`, which the session implements.

AudioSocket is one implementation (:class:`bridge.server.AudioSocketConnection`: the leg owns the
framing, the session never sees a header); Asterisk ARI with External Media (RTP) would be a
second, with no change to the session. tests/fakes.py has an in-memory one, which runs a whole
call with no socket at all (tests/integration/test_caller_leg.py).

Per frame, this is the hot path: :meth:`CallerLeg.send_frame` is one call per 20 ms per call and
must not allocate beyond the one write it makes; :meth:`LegListener.on_caller_audio` likewise.
"""

from __future__ import annotations

from typing import Protocol


class CallerLeg(Protocol):
    """What a call may do to its caller's leg."""

    @property
    def rate(self) -> int:
        """The caller's sample rate (Hz): frames go out at it, caller audio comes in at it."""

    def send_frame(self, pcm: bytes) -> bool:
        """One 20 ms frame of s16le mono at :attr:`rate`, written whole. False if dropped
        (the leg is closed, or the far end is not reading)."""

    def hangup(self) -> None:
        """End the leg the normal way (AudioSocket: 0x00, and the dialplan continues)."""

    def abort(self) -> None:
        """Drop the leg at once (when even :meth:`hangup` failed)."""


class LegListener(Protocol):
    """What a leg delivers, in arrival order (implemented by the session)."""

    def on_caller_audio(self, pcm: bytes) -> None:
        """One frame of the caller's audio, s16le mono at the leg's current rate."""

    def on_caller_rate(self, rate: int) -> None:
        """The caller's rate changed (AudioSocket learns it from the first audio frame)."""

    def on_dtmf(self, digit: str) -> None: ...

    def on_caller_gone(self, why: str) -> None:
        """The leg is gone: ``caller-hangup``, or why it failed."""
