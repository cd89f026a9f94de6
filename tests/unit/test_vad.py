"""Local VAD (bridge/vad.py): onset fast enough for barge-in, no start on line noise or music.

The speech here is gateway_sim.speechlike (harmonic chirps, deterministic, no external tool) and,
when espeak-ng is installed, real synthetic speech; noise and chords are generated with numpy
from fixed seeds. Issue 11's acceptance is "a caller who speaks during AI playout silences it
within 100 ms": the detector gets 80 ms of that, the session's frame the rest.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from bridge import vad
from bridge.devtools.gateway_sim import silence, speechlike, tone
from bridge.vad import (
    FRAME_MS,
    SpeechDetector,
    VadSettings,
    VadUnavailable,
    make_detector,
    silero_model_path,
    webrtc_aggressiveness,
)

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
SILERO = pytest.param("silero", marks=pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed"))
ENGINES = ["webrtcvad", SILERO]
RATES = [8000, 16000]
LEAD_MS = 400


def _detector(engine: str, rate: int, **kw: object) -> SpeechDetector:
    return make_detector(VadSettings(mode="local", engine=engine, **kw), rate)  # type: ignore[arg-type]


def _noise(ms: int, rate: int, dbfs: float, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(rate * ms // 1000)
    return x * (32768.0 * 10 ** (dbfs / 20))


def _pcm(x: np.ndarray) -> bytes:
    return np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()


def _mix(pcm: bytes, floor: np.ndarray) -> bytes:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return _pcm(x + floor[: x.size])


def _run(det: SpeechDetector, pcm: bytes) -> list[tuple[str, int]]:
    """(event, ms at the end of the frame that produced it) for every event."""
    fb = det.frame_bytes
    events: list[tuple[str, int]] = []
    for i in range(len(pcm) // fb):
        ev = det.feed(pcm[i * fb:(i + 1) * fb])
        if ev is not None:
            events.append((ev, (i + 1) * FRAME_MS))
    return events


def _speech_call(rate: int, speech_ms: int = 1600, tail_ms: int = 1200) -> bytes:
    """Line noise at -60 dBFS throughout; speech from LEAD_MS for speech_ms."""
    pcm = silence(LEAD_MS, rate) + speechlike("barge in now", speech_ms, rate) + silence(tail_ms, rate)
    return _mix(pcm, _noise(LEAD_MS + speech_ms + tail_ms, rate, -60.0))


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("engine", ENGINES)
def test_onset_within_80_ms_and_start_position(engine: str, rate: int) -> None:
    det = _detector(engine, rate)
    events = _run(det, _speech_call(rate))
    starts = [t for ev, t in events if ev == "start"]
    assert starts, f"{engine} never started: {events}"
    assert LEAD_MS < starts[0] <= LEAD_MS + 80, events
    assert len(starts) == 1, "the 40 ms gaps between syllables must not end the utterance"
    # prefix_padding_ms (200) moves the reported beginning back from the first voiced frame.
    assert det.speech_start_ms is not None
    assert LEAD_MS - 200 - FRAME_MS <= det.speech_start_ms <= starts[0] - 200 - FRAME_MS


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("engine", ENGINES)
def test_stop_after_silence_duration(engine: str, rate: int) -> None:
    det = _detector(engine, rate, silence_duration_ms=400)
    speech_end = LEAD_MS + 1600 - 40  # the last syllable's 40 ms gap is silence already
    events = _run(det, _speech_call(rate))
    assert [ev for ev, _ in events] == ["start", "stop"], events
    stop = events[1][1]
    assert speech_end + 400 <= stop <= speech_end + 400 + 100, events
    assert not det.speaking


@pytest.mark.parametrize("engine", ENGINES)
def test_speaking_follows_events(engine: str) -> None:
    det = _detector(engine, 8000)
    pcm = _speech_call(8000)
    fb = det.frame_bytes
    seen = []
    for i in range(len(pcm) // fb):
        ev = det.feed(pcm[i * fb:(i + 1) * fb])
        if ev is not None:
            seen.append((ev, det.speaking))
    assert seen == [("start", True), ("stop", False)]


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("engine", [SILERO])
def test_no_start_on_white_noise_at_minus_40_dbfs(engine: str, rate: int) -> None:
    det = _detector(engine, rate)
    assert _run(det, _pcm(_noise(5000, rate, -40.0, seed=7))) == []


def _chord(ms: int, rate: int) -> bytes:
    """Music-on-hold-like: C major / A minor chords (sines and 2 harmonics), plucked envelope, -20 dBFS."""
    out = []
    for i, notes in enumerate([(261.63, 329.63, 392.0), (220.0, 261.63, 329.63)] * (ms // 2000)):
        n = rate
        t = np.arange(n) / rate
        x = sum(np.sin(2 * math.pi * f * t) + 0.3 * np.sin(4 * math.pi * f * t) for f in notes)
        env = np.exp(-t * (1.5 + i % 2))
        out.append(x * env)
    y = np.concatenate(out)
    return _pcm(y * (32768 * 10 ** (-20 / 20) / np.sqrt(np.mean(y * y))))


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("engine", [SILERO])
def test_no_start_on_music_on_hold_chords(engine: str, rate: int) -> None:
    det = _detector(engine, rate)
    assert _run(det, _chord(6000, rate)) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_quiet_line_noise_is_gated(engine: str) -> None:
    """-55 dBFS hiss is below the -45 dBFS gate: nothing starts, whatever the engine thinks of it."""
    det = _detector(engine, 8000)
    assert _run(det, _pcm(_noise(3000, 8000, -55.0, seed=3))) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_reset_forgets_the_utterance(engine: str) -> None:
    det = _detector(engine, 8000)
    first = _run(det, _speech_call(8000))
    # Stop halfway through speech: speaking, with the engine's state full of speech.
    half = _speech_call(8000)[: 2 * 8000 * (LEAD_MS + 800) // 1000]
    _run(det, half)
    assert det.speaking
    det.reset()
    assert not det.speaking
    assert det.position_ms == 0
    assert det.speech_start_ms is None
    # Silence right after a reset is not the end of an utterance, and the same call replays the same.
    assert _run(det, silence(1000, 8000)) == []
    det.reset()
    assert _run(det, _speech_call(8000)) == first


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_sample_rate_is_named(engine: str) -> None:
    with pytest.raises(ValueError, match=r"sample_rate must be 8000 or 16000 Hz, got 44100"):
        _detector(engine, 44100)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_frame_size_is_named(engine: str, rate: int) -> None:
    det = _detector(engine, rate)
    want = 2 * rate // 50
    with pytest.raises(ValueError, match=rf"frame must be {want} bytes \(20 ms of s16le at {rate} Hz\), got 100"):
        det.feed(bytes(100))
    # The detector is still usable after the bad frame.
    assert det.feed(bytes(want)) is None


@pytest.mark.parametrize("chunk_ms", [10, 30, 60])
@pytest.mark.parametrize("engine", ENGINES)
def test_feed_chunk_reframes_other_packet_sizes(engine: str, chunk_ms: int) -> None:
    pcm = _speech_call(8000)
    framed = _run(_detector(engine, 8000), pcm)
    det = _detector(engine, 8000)
    step = 16 * chunk_ms
    events = []
    for i in range(0, len(pcm), step):
        ev = det.feed_chunk(pcm[i:i + step])
        if ev is not None:
            events.append((ev, min(i + step, len(pcm)) // 16))
    # Same events, each reported at the end of the chunk that completed its frame.
    assert [e for e, _ in events] == [e for e, _ in framed] == ["start", "stop"]
    for (_, t), (_, t_framed) in zip(events, framed, strict=True):
        assert t_framed <= t < t_framed + chunk_ms
    with pytest.raises(ValueError, match=r"even number of bytes\), got 3"):
        det.feed_chunk(b"abc")


@pytest.mark.parametrize(("field", "value"), [
    ("threshold", 1.5), ("threshold", -0.1), ("silence_duration_ms", -1), ("prefix_padding_ms", 0.5),
    ("min_speech_ms", -20), ("mode", "auto"), ("engine", "rnnoise"), ("min_level_dbfs", 3.0),
])
def test_settings_name_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"invalid VAD settings: {field} must be"):
        VadSettings(**{field: value})  # type: ignore[arg-type]


def test_defaults_are_the_seeds_and_the_measured_engine() -> None:
    s = VadSettings()
    assert (s.threshold, s.silence_duration_ms, s.prefix_padding_ms) == (0.6, 600, 200)
    assert s.engine == "silero"
    assert s.onset_ms == 20
    assert VadSettings(engine="webrtcvad").onset_ms == 60
    assert VadSettings(engine="webrtcvad", min_speech_ms=40).onset_ms == 40


@pytest.mark.parametrize(("threshold", "mode"), [(0.0, 0), (0.24, 0), (0.25, 1), (0.5, 2), (0.6, 2), (0.75, 3),
                                                 (1.0, 3)])
def test_webrtc_aggressiveness_quarters(threshold: float, mode: int) -> None:
    assert webrtc_aggressiveness(threshold) == mode
    if mode:
        det = _detector("webrtcvad", 8000, threshold=threshold)
        assert det.aggressiveness == mode  # type: ignore[attr-defined]


def test_silero_model_found_without_importing_silero_or_torch() -> None:
    path = silero_model_path()
    assert path.endswith(os.path.join("silero_vad", "data", "silero_vad.onnx")) and os.path.isfile(path)
    if HAVE_ORT:
        _detector("silero", 8000)
    assert "silero_vad" not in sys.modules
    assert "torch" not in sys.modules


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_silero_calls_share_one_session_but_not_state() -> None:
    """One model per process (set-up must not block the loop per call), one state per call."""
    talker, quiet = _detector("silero", 8000), _detector("silero", 8000)
    assert talker._session is quiet._session  # type: ignore[attr-defined]
    speech, hush = _speech_call(8000), _pcm(_noise(4400, 8000, -60.0, seed=5))
    alone = _run(_detector("silero", 8000), speech)
    fb = talker.frame_bytes
    events = []
    for i in range(len(speech) // fb):
        ev = talker.feed(speech[i * fb:(i + 1) * fb])
        assert quiet.feed(hush[i * fb:(i + 1) * fb]) is None
        assert quiet.probability < 0.2  # type: ignore[attr-defined]
        if ev is not None:
            events.append((ev, (i + 1) * FRAME_MS))
    assert events == alone


def test_silero_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vad, "_SILERO_SESSIONS", {})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VadUnavailable, match="silero-vad"):
        _detector("silero", 8000)


def test_onnxruntime_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vad, "_SILERO_SESSIONS", {})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(VadUnavailable, match="pip install onnxruntime"):
        _detector("silero", 8000)


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                    reason="espeak-ng and sox not installed")
@pytest.mark.parametrize("engine", ENGINES)
def test_espeak_speech_onset_within_80_ms(engine: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "s.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", wav, "Hello, can you hear me?"], check=True,
                       capture_output=True)
        raw = subprocess.run(["sox", wav, "-r", "8000", "-c", "1", "-b", "16", "-e", "signed", "-t", "raw", "-"],
                             check=True, capture_output=True).stdout
    x = np.frombuffer(raw, dtype="<i2").astype(np.float64)
    x *= 32768 * 10 ** (-22 / 20) / np.sqrt(np.mean(x * x))  # active level around -22 dBFS
    frames = x[: x.size // 160 * 160].reshape(-1, 160)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    onset = LEAD_MS + int(np.flatnonzero(rms >= rms.max() * 10 ** (-30 / 20))[0]) * FRAME_MS
    pcm = _mix(silence(LEAD_MS, 8000) + _pcm(x) + silence(800, 8000), _noise(LEAD_MS + 5000, 8000, -60.0))
    starts = [t for ev, t in _run(_detector(engine, 8000), pcm) if ev == "start"]
    assert starts and onset < starts[0] <= onset + 80, (onset, starts)


# ---- Silero's tonal onset (bridge/vad.py, "tonal onset") ------------------------------------------


def _tones(rate: int) -> bytes:
    """What the project's own test caller says (bridge/devtools/dial.py): three 500 ms tones."""
    from bridge.devtools.dial import default_utterance

    return silence(LEAD_MS, rate) + default_utterance(rate) + silence(1000, rate)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("engine", [SILERO])
def test_a_tone_starting_over_the_ai_starts_speech_within_60ms(engine: str, rate: int) -> None:
    events = _run(_detector(engine, rate), _tones(rate))
    assert events and events[0][0] == "start"
    assert events[0][1] - LEAD_MS <= 60  # two periodic frames


@pytest.mark.parametrize("engine", [SILERO])
def test_without_the_tonal_onset_silero_ignores_tones(engine: str) -> None:
    assert _run(_detector(engine, 8000, tonal=False), _tones(8000)) == []


@pytest.mark.parametrize("engine", [SILERO])
def test_a_steady_tone_neither_holds_speaking_nor_fires_again(engine: str) -> None:
    """Silero alone sustains speech: 3 s of one tone gives one start and one stop, not a start
    every silence_duration_ms, and the detector is not left "speaking" through it."""
    det = _detector(engine, 8000)
    events = _run(det, silence(LEAD_MS, 8000) + tone(440, 3000, 8000))
    assert [e for e, _ in events] == ["start", "stop"]
    assert not det.speaking


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("engine", [SILERO])
def test_no_tonal_start_on_loud_white_noise_or_mains_hum(engine: str, rate: int) -> None:
    t = np.arange(2 * rate) / rate
    hum = sum(np.sin(2 * math.pi * 50 * k * t) / k for k in range(1, 8)) * 3000
    det = _detector(engine, rate)
    assert _run(det, silence(LEAD_MS, rate) + _pcm(_noise(2000, rate, -30.0, seed=5))) == []
    assert _run(_detector(engine, rate), silence(LEAD_MS, rate) + _pcm(hum)) == []
