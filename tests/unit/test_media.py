"""Resampler and playout buffer/clock: pure media code, no sockets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bridge.playout import PlayoutBuffer, PlayoutClock
from bridge.resample import Resampler


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.3) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def spectrum_peak(pcm: bytes, rate: int) -> tuple[float, float]:
    """(dominant frequency Hz, RMS dBFS)."""
    x = np.frombuffer(pcm, "<i2").astype(float)
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    rms = np.sqrt(np.mean(x**2)) / 32768
    return float(np.argmax(mag) * rate / len(x)), float(20 * np.log10(rms + 1e-12))


def stream(r: Resampler, pcm: bytes, rate: int) -> bytes:
    n = rate // 50 * 2
    return b"".join(r.process(pcm[i:i + n]) for i in range(0, len(pcm), n))


@pytest.mark.parametrize("src,dst", [(8000, 16000), (16000, 8000), (24000, 8000), (8000, 24000), (16000, 24000),
                                     (24000, 16000), (48000, 8000)])
def test_resampled_tone_keeps_its_pitch_length_and_level(src, dst):
    pcm = tone(1000, src)
    out = stream(Resampler(src, dst), pcm, src)
    assert len(out) // 2 == len(pcm) // 2 * dst // src
    freq, level = spectrum_peak(out, dst)
    assert abs(freq - 1000) <= 2
    assert abs(level - spectrum_peak(pcm, src)[1]) < 0.5


@pytest.mark.parametrize("src,dst", [(8000, 16000), (24000, 8000), (16000, 24000)])
def test_streaming_in_20ms_chunks_equals_resampling_the_whole_signal(src, dst):
    """State carries across chunks: no clicks at chunk edges (peer complaint #1)."""
    pcm = tone(700, src, 0.5) + tone(1900, src, 0.5)
    assert stream(Resampler(src, dst), pcm, src) == Resampler(src, dst).process(pcm)


def test_every_20ms_in_gives_20ms_out_no_lumps():
    r = Resampler(8000, 16000)
    sizes = {len(r.process(b"\x00\x01" * 160)) for _ in range(50)}
    assert sizes == {640}


@pytest.mark.parametrize("src,dst,freq", [(24000, 8000, 10000), (16000, 8000, 5000), (24000, 16000, 11000)])
def test_downsampling_filters_what_would_alias(src, dst, freq):
    level_in = spectrum_peak(tone(freq, src), src)[1]
    level_out = spectrum_peak(stream(Resampler(src, dst), tone(freq, src), src), dst)[1]
    assert level_out < level_in - 45  # a stateless/unfiltered resampler folds this into the band


def test_reset_forgets_the_previous_signal():
    r = Resampler(24000, 8000)
    r.process(tone(1000, 24000, 0.1))
    r.reset()
    out = r.process(bytes(960))
    assert not any(out)


def test_playout_buffer_cuts_whole_frames_and_pads_the_tail():
    b = PlayoutBuffer(8000)
    b.push(b"\x01" * 700)  # 2 frames + 60 bytes
    assert len(b) == 2 and b.pending_ms == 60
    assert b.pop() == b"\x01" * 320
    assert b.pop() == b"\x01" * 320
    assert b.pop() == b"\x01" * 60 + bytes(260)
    assert b.pop() == bytes(320) and b.empty


def test_playout_buffer_joins_partial_pushes():
    b = PlayoutBuffer(16000)
    for _ in range(10):
        b.push(b"\x02" * 64)  # 640 bytes in ten pieces
    assert len(b) == 1 and b.pop() == b"\x02" * 640


def test_clear_drops_everything_at_once():
    b = PlayoutBuffer(8000)
    b.push(b"\x03" * 3200 + b"\x03" * 10)
    assert b.clear() == 11
    assert b.pop() == bytes(320)


def test_overflow_keeps_the_oldest_and_counts():
    b = PlayoutBuffer(8000, max_seconds=2)
    b.push(b"\x04" * 320 * 150)
    assert len(b) == 100 and b.dropped == 50


async def test_wait_drained_wakes_when_the_queue_is_played_out():
    b = PlayoutBuffer(8000)
    b.push(bytes(640))
    waiter = asyncio.create_task(b.wait_drained())
    await asyncio.sleep(0)  # let the waiter register
    b.pop()
    b.pop()
    await asyncio.sleep(0)
    assert not waiter.done()  # both frames played, but the drain is only seen on the next tick
    b.pop()  # silence: drained
    await asyncio.wait_for(waiter, 1)


async def test_clock_ticks_every_period_on_an_absolute_schedule():
    loop = asyncio.get_running_loop()
    times: list[float] = []
    done = asyncio.Event()

    class Sink:
        def on_tick(self) -> None:
            times.append(loop.time())
            if len(times) == 50:
                done.set()

    clock = PlayoutClock()
    sink = Sink()
    clock.add(sink)
    await asyncio.wait_for(done.wait(), 5)
    clock.remove(sink)
    gaps = np.diff(times)
    assert abs((times[-1] - times[0]) - 49 * 0.02) < 0.05  # no drift over a second
    assert gaps.min() > 0.005  # never two frames back to back (no bursts)


async def test_clock_skips_missed_ticks_instead_of_bursting():
    loop = asyncio.get_running_loop()
    times: list[float] = []
    done = asyncio.Event()

    class Sink:
        def on_tick(self) -> None:
            times.append(loop.time())
            if len(times) == 3:
                import time
                time.sleep(0.1)  # the loop is held up for 5 periods
            if len(times) == 8:
                done.set()

    clock = PlayoutClock()
    s = Sink()
    clock.add(s)
    await asyncio.wait_for(done.wait(), 5)
    clock.remove(s)
    assert clock.skipped_ticks >= 3
    assert min(np.diff(times[3:])) > 0.005  # after the stall: paced, not a catch-up burst


async def test_a_failing_sink_is_removed_and_the_others_keep_ticking():
    clock = PlayoutClock()
    got = asyncio.Event()

    class Bad:
        def on_tick(self) -> None:
            raise RuntimeError("boom")

    class Good:
        n = 0

        def on_tick(self) -> None:
            self.n += 1
            if self.n == 3:
                got.set()

    good = Good()
    clock.add(Bad())
    clock.add(good)
    await asyncio.wait_for(got.wait(), 2)
    assert len(clock) == 1
    clock.remove(good)


async def test_calls_are_spread_over_phases_each_still_once_per_period():
    loop = asyncio.get_running_loop()
    clock = PlayoutClock(phases=4)
    times: dict[int, list[float]] = {i: [] for i in range(8)}
    done = asyncio.Event()

    class Sink:
        def __init__(self, i: int) -> None:
            self.i = i

        def on_tick(self) -> None:
            times[self.i].append(loop.time())
            if all(len(t) >= 20 for t in times.values()):
                done.set()

    sinks = [Sink(i) for i in range(8)]
    for s in sinks:
        clock.add(s)
    assert sorted(len(g) for g in clock._groups) == [2, 2, 2, 2]  # balanced: 2 calls per phase
    await asyncio.wait_for(done.wait(), 5)
    for s in sinks:
        clock.remove(s)
    for t in times.values():
        gaps = np.diff(t[:20])
        assert abs(float(np.median(gaps)) - 0.020) < 0.002  # each call: one frame per 20 ms
        assert gaps.min() > 0.010  # never two in a burst
    firsts = sorted({round((times[i][5] - times[0][5]) % 0.020 * 1000) % 20 for i in range(8)})
    assert len(firsts) == 4  # four distinct phases, a quarter period apart


async def test_a_failing_sink_is_told_so_its_call_can_end():
    """The clock removes a sink that raises and calls its ``on_tick_failed`` with the exception."""
    clock = PlayoutClock()
    told: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    class Bad:
        def on_tick(self) -> None:
            raise RuntimeError("write failed")

        def on_tick_failed(self, exc: BaseException) -> None:
            told.set_result(exc)

    clock.add(Bad())
    exc = await asyncio.wait_for(told, 2)
    assert isinstance(exc, RuntimeError) and str(exc) == "write failed"
    assert len(clock) == 0 and clock._handle is None  # removed; nothing left to serve


async def test_a_failing_hook_does_not_stop_the_clock():
    clock = PlayoutClock()
    got = asyncio.Event()

    class Worse:
        def on_tick(self) -> None:
            raise RuntimeError("boom")

        def on_tick_failed(self, exc: BaseException) -> None:
            raise RuntimeError("and again")

    class Good:
        n = 0

        def on_tick(self) -> None:
            self.n += 1
            if self.n == 5:
                got.set()

    good = Good()
    clock.add(Worse())
    clock.add(good)
    await asyncio.wait_for(got.wait(), 2)
    assert len(clock) == 1
    clock.remove(good)


class _FailingCounts(list):
    """A histogram whose updates raise ``failures`` times: a bug in the clock's own bookkeeping."""

    def __init__(self, size: int, failures: int) -> None:
        super().__init__([0] * size)
        self.failures = failures

    def __setitem__(self, i, v) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise IndexError("injected bookkeeping fault")
        super().__setitem__(i, v)


async def test_the_clock_survives_a_fault_in_its_own_bookkeeping():
    loop = asyncio.get_running_loop()
    clock = PlayoutClock()
    times: list[float] = []
    done = asyncio.Event()

    class Sink:
        def on_tick(self) -> None:
            times.append(loop.time())
            if len(times) == 20:
                done.set()

    sink = Sink()
    clock.add(sink)
    clock.lateness_hist = _FailingCounts(len(clock.lateness_hist), failures=3)
    await asyncio.wait_for(done.wait(), 3)  # the old clock stopped for good at the first fault
    clock.remove(sink)
    assert clock.tick_errors == 3 and clock.stats()["tick_errors"] == 3
    # The faulty sub-ticks were the sink's: those frames were lost, the schedule was not.
    assert abs((times[-1] - times[0]) - 19 * 0.02) < 0.05
    assert min(np.diff(times)) > 0.005


async def test_a_persistent_bookkeeping_fault_neither_stops_nor_spins_the_clock():
    """Every sub-tick fails: the clock still fires on schedule (not in a tight loop), and logs
    a bounded number of tracebacks."""
    import logging

    clock = PlayoutClock()

    class Sink:
        def on_tick(self) -> None:
            pass

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("voxbridge.playout")
    logger.addHandler(handler)
    try:
        sink = Sink()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        clock.add(sink)
        clock.cost_hist = _FailingCounts(len(clock.cost_hist), failures=10**9)
        await asyncio.sleep(0.5)  # a measuring window, not synchronisation
        clock.remove(sink)
        scheduled = (loop.time() - t0) / clock._step  # sub-ticks due in the window (4 per 20 ms)
    finally:
        logger.removeHandler(handler)
    # On schedule: about one per 5 ms. A clock rescheduled "now" would do thousands.
    assert scheduled * 0.5 <= clock.tick_errors <= scheduled + 2
    assert clock.ticks == clock.tick_errors
    tracebacks = [r for r in records if r.exc_info]
    assert 1 <= len(tracebacks) <= 8  # 1st, 2nd, 4th, 8th …, not one per sub-tick
