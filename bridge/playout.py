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
from collections.abc import Callable
from typing import Protocol, TypedDict

log = logging.getLogger("voxbridge.playout")

FRAME_MS = 20
FRAME_S = FRAME_MS / 1000


class PlayoutBuffer:
    """AI audio waiting for the caller, in whole 20 ms frames at ``sample_rate``."""

    __slots__ = ("frame_size", "silence", "_frames", "_partial", "max_frames", "dropped", "_drained", "consumed")

    def __init__(self, sample_rate: int = 8000, max_seconds: float = 120.0) -> None:
        self.frame_size = sample_rate * FRAME_MS // 1000 * 2
        self.silence = bytes(self.frame_size)
        self._frames: collections.deque[bytes] = collections.deque()
        self._partial = bytearray()
        self.max_frames = int(max_seconds * 1000 / FRAME_MS)
        self.dropped = 0
        self._drained: asyncio.Event | None = None
        #: Bytes of queued audio that have left the queue: played to the caller, or cleared.
        #: Its position in the stream of audio pushed (see :attr:`consumed_s`).
        self.consumed = 0

    def __len__(self) -> int:
        """Whole frames queued."""
        return len(self._frames)

    @property
    def pending_ms(self) -> int:
        return len(self._frames) * FRAME_MS + (FRAME_MS if self._partial else 0)

    @property
    def consumed_s(self) -> float:
        """Seconds of pushed audio that have been played or cleared (the caller heard up to here)."""
        return self.consumed / (self.frame_size * 50)

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
            self.consumed += excess * n  # skipped: the stream position moves past them
            log.warning("playout queue full (%d s): dropped %d frames", self.max_frames * FRAME_MS // 1000, excess)

    def pop(self) -> bytes:
        """The next frame to play: audio if any is queued, else silence. Never blocks."""
        if self._frames:
            self.consumed += self.frame_size
            return self._frames.popleft()
        if self._partial:
            # The tail of an utterance: pad it out rather than hold it back.
            self.consumed += len(self._partial)
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
        self.consumed += len(self._frames) * self.frame_size + len(self._partial)
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
    """What the clock serves: one call's output.

    ``on_tick()`` sends exactly one frame. A sink may also define ``on_tick_failed(exc)``:
    if ``on_tick`` raises, the clock removes the sink and calls it, so the call it belongs to
    can end (rather than hold its caller in dead air with no frames going out).
    """

    def on_tick(self) -> None: ...


class ClockStats(TypedDict):
    """:meth:`PlayoutClock.stats`; a percentile is None until a tick has been measured."""

    sinks: int
    phases: int
    ticks: int
    late_ticks: int
    skipped_ticks: int
    tick_errors: int
    max_lateness_ms: float
    lateness_p50_ms: float | None
    lateness_p99_ms: float | None
    tick_cost_p50_ms: float | None
    tick_cost_p99_ms: float | None


class PlayoutClock:
    """The process-wide 20 ms scheduler.

    Every sink gets ``on_tick()`` exactly once per period, on an absolute schedule. Sinks are
    spread over ``phases`` groups served one after another, ``period / phases`` apart (with 4:
    a sub-tick every 5 ms, each serving a quarter of the calls). Each call still hears one frame
    every 20 ms, on its own fixed phase; what changes is that the loop never stops for all
    calls' writes at once, so reading the callers' audio (uplink latency) and the ticks
    themselves are not held up behind one long burst of work. The clock runs only while it
    has sinks.

    Nothing stops the clock while calls are on it (it serves every call in the process): a
    sink that raises is removed, logged and told (``on_tick_failed``), the others carry on;
    an exception in the clock's own bookkeeping is logged and counted (``tick_errors``) and
    the next sub-tick is still scheduled, one step on, so a persistent fault cannot make it
    spin either.
    """

    def __init__(self, period: float = FRAME_S, clock: Callable[[], float] | None = None, phases: int = 4) -> None:
        self.period = period
        self.phases = max(1, int(phases))
        self._step = period / self.phases
        self._groups: list[dict[int, Sink]] = [{} for _ in range(self.phases)]
        self._group_of: dict[int, int] = {}
        self._cur = 0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next = 0.0
        self.ticks = 0  # sub-ticks
        self.late_ticks = 0  # sub-ticks that fired a whole period or more after they were due
        self.skipped_ticks = 0
        self.max_lateness = 0.0
        self.tick_errors = 0  # sub-ticks whose bookkeeping raised (logged; the clock carried on)
        # Per sub-tick, in 0.1 ms buckets (the last one is "100 ms or more"): how late it fired
        # on the monotonic clock, and how long serving its sinks took. One increment per
        # sub-tick, not per call; the load benchmark reads the percentiles from stats().
        self.lateness_hist = [0] * (_HIST_BUCKETS + 1)
        self.cost_hist = [0] * (_HIST_BUCKETS + 1)

    def __len__(self) -> int:
        return len(self._group_of)

    def add(self, sink: Sink) -> None:
        key = id(sink)
        if key in self._group_of:
            return
        group = min(range(self.phases), key=lambda i: len(self._groups[i]))  # keeps groups balanced
        self._groups[group][key] = sink
        self._group_of[key] = group
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._cur = 0
            self._next = self._loop.time() + self._step
            self._handle = self._loop.call_at(self._next, self._tick)

    def phase_of(self, sink: Sink) -> float | None:
        """When ``sink`` is served, as loop time modulo the period (None if not registered)."""
        group = self._group_of.get(id(sink))
        if group is None or self._handle is None:
            return None
        # The sub-tick due at self._next serves group self._cur; the others follow a step apart.
        return (self._next + ((group - self._cur) % self.phases) * self._step) % self.period

    def remove(self, sink: Sink) -> None:
        group = self._group_of.pop(id(sink), None)
        if group is not None:
            self._groups[group].pop(id(sink), None)
        if not self._group_of and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        # The hot path: one call per sub-tick (4 × 50 per second), serving a quarter of the
        # calls. The try/finally costs nothing until something raises; the per-sink try is the
        # only per-call overhead.
        loop = self._loop
        assert loop is not None
        now = loop.time()
        lateness = 0.0
        try:
            lateness = now - self._next
            if lateness > self.max_lateness:
                self.max_lateness = lateness
            self.ticks += 1
            t0 = time.monotonic()
            self.lateness_hist[min(max(int((t0 - self._next) * 10_000), 0), _HIST_BUCKETS)] += 1
            # Serve the group due now and every other group whose sub-tick has passed too (the
            # loop was held up): a stall then delays each call once, rather than once per group
            # still queued behind it. No group is served twice in one pass, so nobody bursts.
            for _ in range(self.phases):
                group = self._groups[self._cur]
                for key, sink in list(group.items()):
                    try:
                        sink.on_tick()
                    except Exception as exc:  # noqa: BLE001 - one broken call must not silence the others
                        group.pop(key, None)
                        self._group_of.pop(key, None)
                        self._sink_failed(sink, exc)
                self._cur = (self._cur + 1) % self.phases
                self._next += self._step
                if self._next > now:
                    break
            self.cost_hist[min(int((time.monotonic() - t0) * 10_000), _HIST_BUCKETS)] += 1
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop every call's audio
            self._tick_failed(exc)
        finally:
            # Always move on and reschedule: a clock that is not rescheduled is silence (and,
            # once the gateway's audio piles up, a dropped call) for every call in the process.
            if lateness >= self.period:
                self.late_ticks += 1
            if self._next <= now:
                # Held up by a whole period or more (or the bookkeeping failed before moving
                # on): skip what was missed, each group keeping its phase; never replay it.
                missed = int((now - self._next) // self._step) + 1
                self.skipped_ticks += missed
                self._next += missed * self._step
                self._cur = (self._cur + missed) % self.phases
            if self._group_of:
                self._handle = loop.call_at(self._next, self._tick)
            else:
                self._handle = None

    @staticmethod
    def _sink_failed(sink: Sink, exc: Exception) -> None:
        """A sink raised in ``on_tick`` (it is already removed): log it and tell its owner."""
        log.error("playout sink %r failed; removing it", sink, exc_info=exc)
        hook = getattr(sink, "on_tick_failed", None)
        if hook is not None:
            try:
                hook(exc)
            except Exception:  # deliberately broad: its call is broken twice over; the clock is not
                log.exception("playout sink %r: on_tick_failed raised too", sink)

    def _tick_failed(self, exc: Exception) -> None:
        # Rate-limited: a fault that repeats would otherwise log 200 tracebacks a second.
        self.tick_errors += 1
        n = self.tick_errors
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th … occurrence
            log.error("playout clock bookkeeping failed (%d time(s) so far); the clock carries on", n,
                      exc_info=exc)

    def stats(self) -> ClockStats:
        return {
            "sinks": len(self._group_of),
            "phases": self.phases,
            "ticks": self.ticks,
            "late_ticks": self.late_ticks,
            "skipped_ticks": self.skipped_ticks,
            "tick_errors": self.tick_errors,
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

