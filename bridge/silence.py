"""The silence watchdog's core: when has the caller been silent too long, and what then.

Sans-I/O: times in, decisions out. The session (bridge/session.py) feeds it the caller's speech
edges — from the local VAD (bridge/vad.py) when the call runs one, else from :class:`EnergyGate`
on the same frames — and how long the AI's queued speech will still play, and asks :meth:`poll`
when :meth:`wait_s` says something may be due.

Silence is measured from the later of: the caller's last speech, and the end of the AI's speech
as it reaches the caller. A caller who is listening to a long answer is not silent: nagging them
("are you still there?") mid-answer is the classic watchdog bug.

Stages: ``armed`` → after ``timeout_s`` of silence :meth:`poll` says ``"detected"`` (the session
prompts the AI to check in, or plays a WAV) → ``checked`` → after ``hangup_after_s`` more silence,
counted from the end of that check-in, ``"hangup"``. Any caller speech re-arms it. Without
``hangup_after_s`` the check-in repeats every ``timeout_s`` instead.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = ["EnergyGate", "SilenceWatchdog", "frame_dbfs"]

Decision = Literal["detected", "hangup"]


def frame_dbfs(pcm: bytes) -> float:
    """RMS level of s16le PCM in dBFS (-inf for digital silence or no samples)."""
    n = len(pcm) // 2
    if n == 0:
        return -math.inf
    samples = np.frombuffer(pcm, dtype="<i2", count=n).astype(np.float64)
    mean_square = float(np.dot(samples, samples)) / n
    if mean_square <= 0.0:
        return -math.inf
    return 10.0 * math.log10(mean_square / (32768.0 * 32768.0))


class EnergyGate:
    """A cheap speech detector for calls without a local VAD: level above ``threshold_dbfs``.

    Speech "starts" after ``start_frames`` loud frames in a row (a click or a line pop is one frame)
    and "stops" after ``hangover_frames`` quiet ones (the gaps between words are not silence).
    :meth:`feed` returns the edge, like bridge/vad.py's detectors: ``"start"``, ``"stop"`` or None.
    """

    def __init__(self, threshold_dbfs: float = -40.0, start_frames: int = 3, hangover_frames: int = 15) -> None:
        if not -90.0 <= threshold_dbfs < 0.0:
            raise ValueError(f"threshold_dbfs must be between -90 and 0, got {threshold_dbfs!r}")
        if start_frames < 1 or hangover_frames < 1:
            raise ValueError("start_frames and hangover_frames must be at least 1")
        self.threshold_dbfs = threshold_dbfs
        self._start_frames = start_frames
        self._hangover_frames = hangover_frames
        self.speaking = False
        self._run = 0  # loud frames in a row (not speaking) or quiet frames in a row (speaking)

    def feed(self, pcm: bytes) -> Literal["start", "stop"] | None:
        loud = frame_dbfs(pcm) > self.threshold_dbfs
        if not self.speaking:
            self._run = self._run + 1 if loud else 0
            if self._run >= self._start_frames:
                self.speaking, self._run = True, 0
                return "start"
            return None
        self._run = 0 if loud else self._run + 1
        if self._run >= self._hangover_frames:
            self.speaking, self._run = False, 0
            return "stop"
        return None


class SilenceWatchdog:
    """When the caller has been silent ``timeout_s`` (and then ``hangup_after_s`` more).

    All times are seconds on one monotonic clock, given by the caller of each method.
    """

    def __init__(self, timeout_s: float, hangup_after_s: float | None, now: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        if hangup_after_s is not None and not hangup_after_s > 0:
            raise ValueError(f"hangup_after_s must be positive, got {hangup_after_s!r}")
        self.timeout_s = timeout_s
        self.hangup_after_s = hangup_after_s
        self.checked = False  #: a check-in was made and the caller has not spoken since
        self.done = False  #: "hangup" was returned: nothing more
        self._caller_speaking = False
        self._quiet_since = now  # start of the current silence (both sides quiet from here)

    def caller_speech(self, now: float, started: bool) -> None:
        """The caller started (``started``) or stopped speaking: either way, not silent until now."""
        self._caller_speaking = started
        self._quiet_since = max(self._quiet_since, now)
        self.checked = False

    def caller_active(self, now: float) -> None:
        """Count the caller as present at ``now`` without an edge (e.g. muted by the operator)."""
        self._quiet_since = max(self._quiet_since, now)

    def ai_speaking_until(self, t: float) -> None:
        """The AI's speech queued so far reaches the caller until ``t``: silence counts from then."""
        self._quiet_since = max(self._quiet_since, t)

    @property
    def _limit(self) -> float:
        if self.checked and self.hangup_after_s is not None:
            return self.hangup_after_s
        return self.timeout_s

    def wait_s(self, now: float) -> float:
        """How long until :meth:`poll` may have something to say (never negative)."""
        if self._caller_speaking:
            return self.timeout_s  # a stop edge will move the start of the silence anyway
        return max(0.0, self._quiet_since + self._limit - now)

    def silent_s(self, now: float) -> float:
        """How long both sides have been quiet at ``now``."""
        return 0.0 if self._caller_speaking else max(0.0, now - self._quiet_since)

    def poll(self, now: float) -> Decision | None:
        """``"detected"``: time to check in; ``"hangup"``: time to end the call; else None."""
        if self.done or self._caller_speaking or now < self._quiet_since + self._limit:
            return None
        if self.checked and self.hangup_after_s is not None:
            self.done = True
            return "hangup"
        self.checked = True
        self._quiet_since = now  # the next stage counts from here (and from the check-in's speech)
        return "detected"
