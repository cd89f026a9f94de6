"""Unit tests for the pure parts of bridge.devtools.dial: WAV I/O, tones, analysis, parsing, the ticker."""

from __future__ import annotations

import argparse
import asyncio
import math
import wave

import numpy as np
import pytest

from bridge.audiosocket import Kind
from bridge.devtools.dial import (
    Ticker,
    add_arguments,
    analyse,
    default_utterance,
    pacing_stats,
    parse_dtmf_schedule,
    parse_target,
    read_wav,
    tone,
    write_wav,
)

# ------------------------------------------------------------------ tone


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_tone_length_level_and_frequency(rate):
    pcm = tone(440, 1000, rate, amplitude=0.3)
    assert len(pcm) == rate * 2  # 1 s of s16
    x = np.frombuffer(pcm, "<i2")
    assert abs(int(np.abs(x).max()) - round(0.3 * 32767)) <= 2
    a = analyse(pcm, rate)
    assert a["dominant_hz"] == pytest.approx(440, abs=2)


def test_tone_amplitude_bounds():
    assert tone(1000, 20, 8000, amplitude=0.0) == bytes(320)
    with pytest.raises(ValueError):
        tone(1000, 20, 8000, amplitude=1.5)


def test_default_utterance_is_1_5_s_of_sound():
    a = analyse(default_utterance(8000), 8000)
    assert a["duration_s"] == pytest.approx(1.5)
    assert a["non_silent_s"] == pytest.approx(1.5)


# ------------------------------------------------------------------ wav


def test_wav_round_trip(tmp_path):
    pcm = tone(1000, 250, 16000)
    path = tmp_path / "t.wav"
    write_wav(path, pcm, 16000)
    back, rate = read_wav(path)
    assert rate == 16000
    assert back == pcm
    with wave.open(str(path)) as w:  # a real WAV the stdlib reads back
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)


def _raw_wav(path, channels, width, rate=8000, frames=80):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(channels * width * frames))


def test_read_wav_rejects_stereo(tmp_path):
    path = tmp_path / "stereo.wav"
    _raw_wav(path, 2, 2)
    with pytest.raises(ValueError, match=r"2 channel.*mono 16-bit"):
        read_wav(path)


def test_read_wav_rejects_8_bit(tmp_path):
    path = tmp_path / "u8.wav"
    _raw_wav(path, 1, 1)
    with pytest.raises(ValueError, match=r"8-bit.*mono 16-bit"):
        read_wav(path)


def test_read_wav_rejects_non_wav(tmp_path):
    path = tmp_path / "junk.wav"
    path.write_bytes(b"this is not a RIFF file at all")
    with pytest.raises(ValueError, match=r"junk.wav"):
        read_wav(path)


def test_write_wav_rejects_odd_length(tmp_path):
    with pytest.raises(ValueError, match="whole s16 samples"):
        write_wav(tmp_path / "x.wav", b"\x00\x00\x00", 8000)


# ------------------------------------------------------------------ analyse


def test_analyse_silence():
    a = analyse(bytes(16000), 8000)
    assert a["duration_s"] == pytest.approx(1.0)
    assert a["non_silent_s"] == 0
    assert a["rms_dbfs"] == -120.0
    assert a["dominant_hz"] is None


def test_analyse_empty():
    a = analyse(b"", 8000)
    assert a["duration_s"] == 0 and a["non_silent_s"] == 0 and a["dominant_hz"] is None


def test_analyse_tone_then_silence():
    pcm = bytes(8000) + tone(1000, 1000, 8000, amplitude=0.3) + bytes(16000)  # 0.5 s, 1 s, 1 s
    a = analyse(pcm, 8000)
    assert a["duration_s"] == pytest.approx(2.5)
    assert a["non_silent_s"] == pytest.approx(1.0, abs=0.021)
    assert a["dominant_hz"] == pytest.approx(1000, abs=1)
    # a 0.3 sine is -13.5 dBFS RMS; over 2.5 s with 1 s of it: -13.5 + 10*log10(1/2.5)
    expected = 20 * math.log10(0.3 / math.sqrt(2)) + 10 * math.log10(1 / 2.5)
    assert a["rms_dbfs"] == pytest.approx(expected, abs=0.1)
    assert a["peak_dbfs"] == pytest.approx(20 * math.log10(0.3), abs=0.1)


def test_analyse_counts_a_loud_partial_last_frame():
    pcm = tone(500, 30, 8000)  # one whole 20 ms frame and 10 ms
    assert analyse(pcm, 8000)["non_silent_s"] == pytest.approx(0.030)


def test_analyse_threshold_ignores_low_noise():
    rng = np.random.default_rng(1)
    noise = (rng.standard_normal(8000) * 3).astype("<i2").tobytes()  # about -80 dBFS
    assert analyse(noise, 8000)["non_silent_s"] == 0


# ------------------------------------------------------------------ pacing statistics


def test_pacing_stats_even_arrivals():
    frames = [(i * 0.020, Kind.SLIN_8K, 320) for i in range(50)]
    p = pacing_stats(frames)
    assert p["frames"] == 50
    assert p["jitter_ms"]["max"] == pytest.approx(0, abs=1e-6)
    assert p["max_lead_ms"] == pytest.approx(0, abs=1e-6)
    assert p["max_gap_ms"] == pytest.approx(20)


def test_pacing_stats_detects_a_burst():
    # 10 frames arriving together = 180 ms ahead of real time
    frames = [(1.0, Kind.SLIN_16K, 640)] * 10
    p = pacing_stats(frames)
    assert p["max_lead_ms"] == pytest.approx(180)
    assert p["jitter_ms"]["max"] == pytest.approx(20)


def test_pacing_stats_too_few_frames():
    assert pacing_stats([])["jitter_ms"] is None
    assert pacing_stats([(0.0, Kind.DTMF, 1), (0.0, Kind.SLIN_8K, 320)])["jitter_ms"] is None


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("bridge.local:9100", ("bridge.local", 9100)),
        ("localhost", ("localhost", 9000)),
        (":9001", ("127.0.0.1", 9001)),
        ("[::1]:9002", ("::1", 9002)),
        ("[::1]", ("::1", 9000)),
    ],
)
def test_parse_target(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["host:notaport", "host:70000", "[::1", "[::1]x"])
def test_parse_target_rejects(text):
    with pytest.raises(ValueError):
        parse_target(text)


def test_parse_dtmf_schedule():
    assert parse_dtmf_schedule("1@2.5,0@4") == [("1", 2.5), ("0", 4.0)]
    assert parse_dtmf_schedule(" #@1 , *@0.5 ,a@3") == [("*", 0.5), ("#", 1.0), ("A", 3.0)]
    assert parse_dtmf_schedule("") == []
    assert parse_dtmf_schedule(None) == []


@pytest.mark.parametrize("text", ["1", "x@1", "12@1", "1@soon", "1@-1"])
def test_parse_dtmf_schedule_rejects(text):
    with pytest.raises(ValueError):
        parse_dtmf_schedule(text)


def test_cli_arguments_defaults_and_errors(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.to == ("127.0.0.1", 9000)
    assert args.rate == 8000 and args.duration == 8.0 and args.dtmf == []
    assert args.wav is None and args.tone is None and args.uuid is None and not args.quiet
    args = parser.parse_args(["--to", "10.0.0.2:9100", "--rate", "16000", "--dtmf", "5@1", "--tone", "300"])
    assert args.to == ("10.0.0.2", 9100) and args.rate == 16000 and args.dtmf == [("5", 1.0)]
    for bad in (["--rate", "11025"], ["--dtmf", "x@1"], ["--uuid", "nope"], ["--wav", "a.wav", "--tone", "3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# ------------------------------------------------------------------ ticker (fake clock)


class FakeTime:
    """A clock that only moves when the ticker sleeps (or a test stalls it)."""

    def __init__(self):
        self.now = 100.0
        self.stall_at: dict[int, float] = {}  # sleep call number -> extra delay
        self.sleeps = 0

    def clock(self):
        return self.now

    async def sleep(self, delay):
        self.sleeps += 1
        self.now += delay + self.stall_at.get(self.sleeps, 0.0)
        await asyncio.sleep(0)


async def _run_ticks(ticker, fake, count):
    seen = []
    done = asyncio.Event()

    def cb():
        seen.append(fake.now)
        if len(seen) == count:
            ticker.detach(cb)  # from inside a tick: the ticker must stop, not tick again
            done.set()

    ticker.attach(cb)
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.sleep(0)
    assert not ticker.running
    await ticker.aclose()
    return seen


async def test_ticker_absolute_schedule():
    fake = FakeTime()
    ticker = Ticker(0.020, clock=fake.clock, sleep=fake.sleep)
    seen = await _run_ticks(ticker, fake, 10)
    assert seen == pytest.approx([100.0 + 0.020 * (i + 1) for i in range(10)])
    assert ticker.skipped == 0


async def test_ticker_skips_missed_ticks_instead_of_bursting():
    fake = FakeTime()
    fake.stall_at[3] = 0.065  # the third sleep oversleeps by 65 ms: ticks 4, 5, 6 are missed
    ticker = Ticker(0.020, clock=fake.clock, sleep=fake.sleep)
    seen = await _run_ticks(ticker, fake, 6)
    assert ticker.skipped == 3
    # one late tick (5 ms into slot 6), then back on the original 20 ms grid: no catch-up burst
    assert seen == pytest.approx([100.02, 100.04, 100.125, 100.14, 100.16, 100.18])
    assert ticker.max_late == pytest.approx(0.005)


async def test_ticker_stops_when_last_callback_detaches_and_survives_a_failing_callback():
    fake = FakeTime()
    ticker = Ticker(0.020, clock=fake.clock, sleep=fake.sleep)

    def bad():
        raise RuntimeError("boom")

    ticker.attach(bad)
    seen = await _run_ticks(ticker, fake, 3)  # the good callback keeps ticking after bad() is dropped
    assert len(seen) == 3 and len(ticker) == 0 and not ticker.running
