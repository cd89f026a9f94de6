"""An opt-in event-loop stall sampler: what runs when the loop is late (``voxbridge bench --stalls``).

A playout tick fires late when something else holds the loop at the moment it is due. This
finds out what, at little cost to the process it measures:

* a **heartbeat** on the loop (one timer callback every ``HEARTBEAT_S``) stamps the time; a
  watchdog **thread** wakes every millisecond and, while the heartbeat is overdue by more than
  ``threshold_ms``, samples the loop thread's Python stack (innermost frames first) and counts
  it. A stack that shows up is what held the loop (a slow callback, a flood of reads, a tick
  serving every call…). The thread gets the GIL only when the loop releases it (a system call,
  or the interpreter's switch interval), so the samples say *where* the loop was, not exactly
  for how long; the heartbeat's own lateness histogram says how long.
* **garbage collection**: every collection's pause (``gc.callbacks``), per generation.

:func:`install` returns a :class:`StallSampler`; :meth:`StallSampler.report` is JSON-able.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import sys
import threading
import time
from typing import Any

HEARTBEAT_S = 0.005
POLL_S = 0.001
_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100)


def _bucket(ms: float) -> str:
    for b in _BUCKETS_MS:
        if ms < b:
            return f"<{b}ms"
    return f">={_BUCKETS_MS[-1]}ms"


class StallSampler:
    """See the module doc. Start with :func:`install`; :meth:`stop` ends the thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold_ms: float = 2.0, depth: int = 6) -> None:
        self._loop = loop
        self._threshold = threshold_ms / 1000
        self._depth = depth
        self._beat = time.monotonic()
        self._due = self._beat + HEARTBEAT_S
        self._loop_thread = threading.get_ident()
        self.heartbeat_late: collections.Counter[str] = collections.Counter()
        self.stacks: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.gc_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-sampler", daemon=True)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._handle = self._loop.call_later(HEARTBEAT_S, self._heartbeat)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        self.heartbeat_late[_bucket((now - self._due) * 1000)] += 1
        self._beat = now
        self._due = now + HEARTBEAT_S
        self._handle = self._loop.call_later(HEARTBEAT_S, self._heartbeat)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_pauses[info["generation"]].append(time.perf_counter() - self._gc_t0)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            if time.monotonic() - self._due <= self._threshold:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            names: list[str] = []
            while frame is not None and len(names) < self._depth:
                code = frame.f_code
                names.append(f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})")
                frame = frame.f_back
            self.stacks[" < ".join(names) or "(no Python frame: in the loop's C code)"] += 1
            self.samples += 1

    def report(self, top: int = 15) -> dict[str, Any]:
        def pauses(xs: list[float]) -> dict[str, Any]:
            ms = sorted(x * 1000 for x in xs)
            return {"n": len(ms), "max_ms": round(ms[-1], 3) if ms else None,
                    "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 3) if ms else None,
                    "total_ms": round(sum(ms), 1), "over_1ms": sum(1 for x in ms if x >= 1)}

        return {
            "threshold_ms": self._threshold * 1000,
            "heartbeat_lateness": dict(self.heartbeat_late),
            "overdue_samples": self.samples,
            "overdue_stacks": [{"n": n, "stack": s} for s, n in self.stacks.most_common(top)],
            "gc": {f"gen{g}": pauses(xs) for g, xs in self.gc_pauses.items()},
        }


def install(threshold_ms: float = 2.0) -> StallSampler:
    """Start sampling the running loop (call from a coroutine on it)."""
    sampler = StallSampler(asyncio.get_running_loop(), threshold_ms)
    sampler.start()
    return sampler
