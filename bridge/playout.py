"""Real-time playout: one clock for every call, one 20 ms frame per call per tick.

Asterisk does no pacing on AudioSocket: whatever the bridge writes is queued on the channel
as it arrives, and a Local channel drops old frames past ~96. Gateways send speech in bursts
far faster than real time. So the bridge owns the clock.

:class:`PlayoutClock` is a single scheduler for the whole process (design: "one clock for
playout"). It fires on an absolute monotonic schedule (``t0 + n × 20 ms``, not "20 ms after
the last tick", so errors never accumulate) and on each tick asks every registered sink for
exactly one frame. When the event loop was held up past a whole period the missed ticks are
skipped, never replayed: bursting to catch up is exactly what garbles audio on the far side.

:class:`PlayoutBuffer` is one call's queue of AI audio, already at the caller's rate, cut in
whole frames. ``clear()`` (barge-in) empties it synchronously: the next tick sends silence.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable, Protocol

log = logging.getLogger("voxbridge.playout")

FRAME_MS = 20
FRAME_S = FRAME_MS / 1000


class PlayoutBuffer:
    """AI audio waiting for the caller, in whole 20 ms frames at ``sample_rate``."""

    __slots__ = ("frame_size", "silence", "_frames", "_partial", "max_frames", "dropped", "_drained")

    def __init__(self, sample_rate: int = 8000, max_seconds: float = 120.0) -> None:
        self.frame_size = sample_rate * FRAME_MS // 1000 * 2
        self.silence = bytes(self.frame_size)
        self._frames: collections.deque[bytes] = collections.deque()
        self._partial = bytearray()
        self.max_frames = int(max_seconds * 1000 / FRAME_MS)
        self.dropped = 0
        self._drained: asyncio.Event | None = None

    def __len__(self) -> int:
        """Whole frames queued."""
        return len(self._frames)

    @property
    def pending_ms(self) -> int:
        return len(self._frames) * FRAME_MS + (FRAME_MS if self._partial else 0)

    @property
    def empty(self) -> bool:
        return not self._frames and not self._partial

    def push(self, pcm: bytes) -> None:
        n = self.frame_size
        frames = self._frames
        if not self._partial and len(pcm) == n and type(pcm) is bytes and len(frames) < self.max_frames:
            frames.append(pcm)  # the common case: one whole frame, immutable, queued as is
            return
        if self._partial:
            need = n - len(self._partial)
            self._partial += pcm[:need]
            pcm = pcm[need:]
            if len(self._partial) < n:
                return
            frames.append(bytes(self._partial))
            self._partial.clear()
        end = len(pcm) - len(pcm) % n
        if end:
            if type(pcm) is not bytes:
                pcm = bytes(pcm)
            frames.extend([pcm[i:i + n] for i in range(0, end, n)])
        if end < len(pcm):
            self._partial += pcm[end:]
        excess = len(frames) - self.max_frames
        if excess > 0:
            # Refuse the newest rather than cut the sentence being spoken: a gateway that is
            # minutes ahead of the caller is misbehaving, and the overflow is counted.
            for _ in range(excess):
                frames.pop()
            self.dropped += excess
            log.warning("playout queue full (%d s): dropped %d frames", self.max_frames * FRAME_MS // 1000, excess)

    def pop(self) -> bytes:
        """The next frame to play: audio if any is queued, else silence. Never blocks."""
        if self._frames:
            return self._frames.popleft()
        if self._partial:
            # The tail of an utterance: pad it out rather than hold it back.
            frame = bytes(self._partial) + self.silence[len(self._partial):]
            self._partial.clear()
            return frame
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        return self.silence

    def clear(self) -> int:
        """Drop everything queued (barge-in). Returns the frames dropped."""
        n = len(self._frames) + (1 if self._partial else 0)
        self._frames.clear()
        self._partial.clear()
        return n

    async def wait_drained(self) -> None:
        """Until everything queued now has been played (or cleared)."""
        if self.empty:
            return
        if self._drained is None:
            self._drained = asyncio.Event()
        await self._drained.wait()


class Sink(Protocol):
    def on_tick(self) -> None: ...


class PlayoutClock:
    """The process-wide 20 ms scheduler.

    Sinks are called in registration order on every tick; a sink that raises is removed
    and logged, the others carry on. The clock runs only while it has sinks.
    """

    def __init__(self, period: float = FRAME_S, clock: Callable[[], float] | None = None) -> None:
        self.period = period
        self._sinks: dict[int, Sink] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next = 0.0
        self.ticks = 0
        self.late_ticks = 0  # ticks that fired more than one period after they were due
        self.skipped_ticks = 0
        self.max_lateness = 0.0
        # Per tick, in 0.1 ms buckets (the last one is "100 ms or more"): how late it fired on
        # the monotonic clock, and how long serving every sink took. One increment per tick,
        # not per call; the load benchmark reads the percentiles from stats().
        self.lateness_hist = [0] * (_HIST_BUCKETS + 1)
        self.cost_hist = [0] * (_HIST_BUCKETS + 1)

    def __len__(self) -> int:
        return len(self._sinks)

    def add(self, sink: Sink) -> None:
        self._sinks[id(sink)] = sink
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._next = self._loop.time() + self.period
            self._handle = self._loop.call_at(self._next, self._tick)

    def remove(self, sink: Sink) -> None:
        self._sinks.pop(id(sink), None)
        if not self._sinks and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        lateness = now - self._next
        if lateness > self.max_lateness:
            self.max_lateness = lateness
        self.ticks += 1
        t0 = time.monotonic()
        self.lateness_hist[min(max(int((t0 - self._next) * 10_000), 0), _HIST_BUCKETS)] += 1
        for key, sink in list(self._sinks.items()):
            try:
                sink.on_tick()
            except Exception:  # noqa: BLE001 - one broken call must not silence the others
                log.exception("playout sink failed; removing it")
                self._sinks.pop(key, None)
        self.cost_hist[min(int((time.monotonic() - t0) * 10_000), _HIST_BUCKETS)] += 1
        self._next += self.period
        if lateness >= self.period:
            # Held up by a whole period or more: skip what was missed, keep the phase.
            self.late_ticks += 1
            missed = int((loop.time() - self._next) // self.period) + 1
            if missed > 0:
                self.skipped_ticks += missed
                self._next += missed * self.period
        if self._sinks:
            self._handle = loop.call_at(self._next, self._tick)
        else:
            self._handle = None

    def stats(self) -> dict[str, float]:
        return {
            "sinks": len(self._sinks),
            "ticks": self.ticks,
            "late_ticks": self.late_ticks,
            "skipped_ticks": self.skipped_ticks,
            "max_lateness_ms": round(self.max_lateness * 1000, 3),
            "lateness_p50_ms": _hist_pct(self.lateness_hist, 50),
            "lateness_p99_ms": _hist_pct(self.lateness_hist, 99),
            "tick_cost_p50_ms": _hist_pct(self.cost_hist, 50),
            "tick_cost_p99_ms": _hist_pct(self.cost_hist, 99),
        }


_HIST_BUCKETS = 1000  # × 0.1 ms


def _hist_pct(hist: list[int], q: float) -> float | None:
    """The q-th percentile (ms, upper bucket edge) of a 0.1 ms histogram."""
    total = sum(hist)
    if not total:
        return None
    rank = total * q / 100
    acc = 0
    for i, n in enumerate(hist):
        acc += n
        if acc >= rank:
            return round((i + 1) / 10, 1)
    return None

