"""The recorder's time alignment (bridge/recording.py's CallRecorder), tick by tick: the caller's
audio re-cut into the playout clock's frames, a burst's backlog not left standing, the WAV as long
as the call. Each caller sample carries its own index, so the test can see where every one landed.
"""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

from bridge.recording import DRIFT_WINDOW_FRAMES, Recordings

RATE = 8000
FRAME = RATE // 50  # samples per 20 ms tick


def frame_of(value: int, samples: int = FRAME) -> bytes:
    return np.full(samples, value, "<i2").tobytes()


def read_stereo(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 2 and w.getframerate() == RATE
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return data[0::2], data[1::2], w.getnframes()


@pytest.fixture
async def recordings(tmp_path):
    rec = Recordings(tmp_path, max_total_bytes=10**9, retention_days=None)
    await rec.start()
    yield rec
    await rec.close()


async def test_a_burst_does_not_leave_the_caller_channel_late(recordings):
    """Eight frames at once (a network burst), then one per tick: after a drift window the caller's
    frame k is recorded within one frame of the tick it arrived on, next to the AI's frame of it."""
    rec = recordings.open("burst", RATE)
    for k in range(8):
        rec.caller(frame_of(1 + k))  # the burst: caller frames 1..8
    ticks = 60
    for t in range(ticks):
        rec.caller(frame_of(100 + t))  # arrives on tick t
        rec.tick(frame_of(-100 - t))  # the AI's frame of tick t
    rec.close(ticks * 0.02)
    await rec.done
    left, right, n = read_stereo(rec.path)
    assert n == ticks * FRAME
    lefts = [int(left[t * FRAME]) for t in range(ticks)]
    assert [int(right[t * FRAME]) for t in range(ticks)] == [-100 - t for t in range(ticks)]
    for t in range(2 * DRIFT_WINDOW_FRAMES, ticks):
        arrived = lefts[t] - 100
        assert lefts[t] >= 100 and abs(arrived - t) <= 1, (t, lefts[t - 3:t + 3])
    assert rec.caller_dropped >= 6


@pytest.mark.parametrize("chunk_frames", [2, 3])
async def test_40_and_60_ms_chunks_are_recut_not_truncated(recordings, chunk_frames):
    """A leg sending 40 ms (or 60 ms) once per two (three) ticks: every caller sample is in the
    WAV, in order, none dropped: a chunk is re-cut into frames, not cut to its first 20 ms."""
    rec = recordings.open(f"chunky-{chunk_frames}", RATE)
    size = chunk_frames * FRAME
    ramp = (np.arange(1, 40 * size + 1) % 30000).astype("<i2")
    chunks = [ramp[i * size:(i + 1) * size].tobytes() for i in range(40)]
    ticks = 40 * chunk_frames + 4
    for t in range(ticks):
        if t % chunk_frames == 0 and t // chunk_frames < len(chunks):
            rec.caller(chunks[t // chunk_frames])
        rec.tick(frame_of(0))
    rec.close(ticks * 0.02)
    await rec.done
    left, _right, n = read_stereo(rec.path)
    assert rec.caller_dropped == 0 and n == ticks * FRAME
    sent = np.frombuffer(b"".join(chunks), "<i2")
    assert np.array_equal(left[:sent.size], sent)  # from the first tick on, nothing late or lost
    assert not left[sent.size:].any()


@pytest.mark.parametrize("duration", [0.5, 1.234, 3.0])
async def test_the_wav_is_as_long_as_the_call(recordings, duration):
    """Fewer ticks than the call lasted (a loaded machine skipped some), or more: the file is cut
    or padded to the call's duration as call.ended reports it."""
    rec = recordings.open(f"len-{duration}", RATE)
    for _t in range(100):
        rec.caller(frame_of(5))
        rec.tick(frame_of(7))
    rec.close(duration)
    await rec.done
    _left, _right, n = read_stereo(rec.path)
    assert abs(n - duration * RATE) < FRAME


async def test_the_disk_bound_holds_while_calls_record(tmp_path, caplog):
    """A tiny bound: an older finished recording is deleted first to make room; when the call
    being recorded alone fills the bound, its recording stops, the file completed as it is (a
    valid WAV the call's link still serves), a warning logged, and nothing more is written."""
    import os
    import time

    from bridge.recording import FLUSH_FRAMES

    old = tmp_path / "old-call.wav"
    old.write_bytes(bytes(20_000))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    cap = 100_000  # ~3 s of 8 kHz stereo: less than one flush (5 s)
    recordings = Recordings(tmp_path, max_total_bytes=cap, retention_days=None)
    await recordings.start()
    try:
        assert old.exists()  # it fits on its own
        rec = recordings.open("long", RATE)
        for _ in range(FLUSH_FRAMES * 3):  # 15 s of call: three flushes
            rec.caller(frame_of(3))
            rec.tick(frame_of(4))
        await asyncio.wrap_future(recordings.submit(lambda: None))  # the writer has caught up
        assert not old.exists()  # deleted for room before the call's own recording was cut
        size = rec.path.stat().st_size
        assert rec.stopped_full and size <= cap
        assert recordings.health()["total_bytes"] <= cap and recordings.health()["stopped_full"] == 1
        assert any("max_total_mb" in r.getMessage() and "recording stopped" in r.getMessage()
                   for r in caplog.records)
        rec.close(20.0)
        await rec.done
        await asyncio.wrap_future(recordings.submit(lambda: None))  # and its _enforce pass
        assert rec.path.stat().st_size == size  # not padded past the bound, not reopened
        assert await recordings.file("long") == rec.path  # the call.ended link still serves it
        _left, _right, n = read_stereo(rec.path)
        assert n == (size - 44) // 4 and n > 0
    finally:
        await recordings.close()


async def test_a_finished_recording_is_not_deleted_by_its_own_pass_and_close_does_not_block(tmp_path):
    """The last chunk may take a recording just past a bound (the header, a final pad): the pass
    after it keeps the newest, so call.ended never links to a file already gone. Closing the
    recordings joins the writer in a thread, and a recording finishing after that does not raise."""
    recordings = Recordings(tmp_path, max_total_bytes=10, retention_days=None)  # under one header
    await recordings.start()
    rec = recordings.open("tiny", RATE)
    for _ in range(10):
        rec.caller(frame_of(1))
        rec.tick(frame_of(2))
    rec.close(0.2)
    await rec.done
    await asyncio.wrap_future(recordings.submit(lambda: None))
    assert rec.path.exists() and await recordings.file("tiny") == rec.path
    await recordings.close()


async def test_close_joins_the_writer_off_the_event_loop_and_a_late_finish_does_not_raise(tmp_path, monkeypatch):
    """A slow disk: the writer is busy when the bridge stops. Closing the recordings must leave the
    event loop running meanwhile, and a recording that completes after the writer was shut down
    must not raise in its done callback (it would try to schedule the disk-bound pass)."""
    import threading

    import bridge.recording as recording

    monkeypatch.setattr(recording, "FINISH_WAIT_S", 0.01)
    recordings = Recordings(tmp_path, max_total_bytes=10**9, retention_days=None)
    await recordings.start()
    loop = asyncio.get_running_loop()
    problems: list[dict] = []
    loop.set_exception_handler(lambda _loop, ctx: problems.append(ctx))
    disk = threading.Event()
    recordings.submit(disk.wait, 5)  # the writer is stuck on a slow disk
    rec = recordings.open("late", RATE)
    rec.tick(frame_of(1))
    rec.close(0.02)  # its file is completed only once the disk answers
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(ticker())
    threading.Timer(0.5, disk.set).start()
    try:
        await asyncio.wait_for(recordings.close(), 10)
        await asyncio.wait_for(rec.done, 5)
        await asyncio.sleep(0.05)
    finally:
        beat.cancel()
        loop.set_exception_handler(None)
    assert ticks >= 10, "the event loop stalled while the writer thread was joined"
    assert problems == []
    assert rec.path.exists()
