"""Local voice activity detection: the caller's barge-in for AI services that do not detect speech.

Some AI protocols (the generic AI WebSocket of issue 11, seed 001) leave voice activity detection to
the bridge: their config carries ``enabled`` / ``threshold`` / ``silence_duration_ms`` /
``prefix_padding_ms`` and the bridge must notice the caller talking over the AI, drop what is
queued for playout (barge-in) and tell the service. The session runs one :class:`SpeechDetector`
per such call on the caller leg's audio, one 20 ms frame at a time (50 calls a second per call), so
:meth:`SpeechDetector.feed` is kept to a handful of operations plus the engine's own work.

Two engines, measured against each other (``python -m bridge.devtools.vad_eval``; the numbers are
in the README). Both sit behind a cheap RMS gate: a frame quieter than ``min_level_dbfs`` is never
voiced, which keeps quiet line noise out whatever the engine thinks of it.

``silero`` (the default)
    Chosen because it is the one that does not fire on line noise or music on hold (none on the
    measured set, where webrtcvad fired at the onset of every noise and music clip and stayed
    "speaking" through pink noise, so that 1 sentence in 10 never produced a barge-in), at the
    price of ~0.1 ms of CPU per frame and onnxruntime on disk. The Silero VAD network runs through
    ``onnxruntime`` (its ONNX file is shipped in the ``silero-vad`` package's data directory; the
    package itself is never imported, since it imports torch). It takes 256-sample windows at
    8 kHz and 512 at 16 kHz with 32/64 samples of context, so 20 ms frames are buffered into
    windows and every frame inherits the probability of the latest complete window.
    ``threshold`` is the speech probability; a frame stays voiced down to ``threshold - 0.15``
    once speech has started (the hysteresis Silero's own iterator uses).

    *Tonal onset* (``tonal``, on by default): Silero was trained on human speech and gives test
    tones, DTMF and synthetic "voices" (this project's own test caller speaks in tones and harmonic
    chirps) a low or erratic probability, so they would never, or only after a syllable or two,
    cut the AI off. A frame is therefore also voiced when the last 40 ms are periodic like one
    voice: normalised autocorrelation at some lag in the pitch range 80–400 Hz of at least
    :data:`TONAL_PERIODICITY` (a tone or a harmonic series ~1.0; measured on the test signals:
    a music-on-hold chord 0.45–0.57, mains hum with harmonics 0.15–0.34, white noise 0.1–0.2),
    for two frames running, within 200 ms of that sound's start (:data:`TONAL_FRESH_FRAMES`). It
    only ever *starts* speech: Silero alone keeps it going, so a steady hum or tone neither holds
    the detector in "speaking" (which would hide the caller's real onsets) nor fires again and
    again. Measured with the rest (README).
``webrtcvad``
    The WebRTC GMM detector (``webrtcvad-wheels``, a few hundred kB of C, ~4 µs a frame): for
    deployments that cannot carry onnxruntime, on quiet lines. Its only knob is an
    "aggressiveness" 0..3; :func:`webrtc_aggressiveness` maps the 0..1 ``threshold`` onto it.

The state machine on top is the same for both: ``"start"`` after ``min_speech_ms`` of consecutive
voiced frames (the onset must be quick: the caller should not hear more than ~100 ms of AI speech
over their own, so detection gets at most 60-80 ms), ``"stop"`` after ``silence_duration_ms`` of
unvoiced frames.

``prefix_padding_ms``: in the seed it is the audio kept from before the detected start, so the
recogniser hears the first syllable. The bridge streams every caller frame to the service
continuously, whether or not anyone is speaking, so nothing is held back and nothing needs
replaying; what the padding still means is *where* the utterance began. On ``"start"`` the
detector records :attr:`SpeechDetector.speech_start_ms`: the position (ms of caller audio fed
since the last :meth:`~SpeechDetector.reset`) of the first voiced frame of the onset, moved back
by ``prefix_padding_ms`` (never below 0). An adapter that must tell its service where speech began
reads it; the session's barge-in does not wait for it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

__all__ = [
    "VadSettings",
    "SpeechDetector",
    "WebRtcDetector",
    "SileroDetector",
    "make_detector",
    "webrtc_aggressiveness",
    "silero_model_path",
    "silero_session",
    "VadUnavailable",
    "FRAME_MS",
    "SAMPLE_RATES",
    "MIN_SPEECH_MS",
]

VadMode = Literal["server", "local", "off"]
VadEngine = Literal["webrtcvad", "silero"]
VadEvent = Literal["start", "stop"]

#: The detector takes exactly one frame of this length per call to ``feed``.
FRAME_MS: Final = 20
#: Caller leg rates the detector accepts (both engines support exactly these).
SAMPLE_RATES: Final = (8000, 16000)

_MODES: Final = ("server", "local", "off")
_ENGINES: Final = ("webrtcvad", "silero")
#: Consecutive voiced audio before "start", per engine, when VadSettings.min_speech_ms is None.
#: Measured (bridge/devtools/vad_eval.py): Silero's recurrent state already integrates the past, so
#: one frame suffices (no false start on noise or music at 20 ms; each extra frame only added 20 ms
#: of onset); webrtcvad judges each 20 ms frame alone, and three frames keep single-frame clicks
#: from cutting the AI off while its onset stays at a 60 ms median.
MIN_SPEECH_MS: Final[dict[str, int]] = {"silero": 20, "webrtcvad": 60}
#: Silero: once speech has started, a frame stays voiced down to threshold - this.
_SILERO_HYSTERESIS: Final = 0.15
#: Tonal onset (module doc): the last 40 ms are one periodic source if their normalised
#: autocorrelation reaches this at a lag in the voice's pitch range (80-400 Hz)...
TONAL_PERIODICITY: Final = 0.8
#: ... and only within this many frames of the tonal sound's start (a fresh onset, not steady hum).
TONAL_FRESH_FRAMES: Final = 10


class VadUnavailable(RuntimeError):
    """The chosen engine's package is not installed (the message names what to install)."""


@dataclass(frozen=True, slots=True)
class VadSettings:
    """What a gateway's config says about voice activity detection.

    ``mode``: ``"server"`` (the AI service detects speech itself; the bridge runs nothing),
    ``"local"`` (the bridge runs a :class:`SpeechDetector` on the caller's audio) or ``"off"``
    (nobody does: no barge-in). The seed's ``enabled``/``threshold``/``silence_duration_ms``/
    ``prefix_padding_ms`` are the fields of the same names (``enabled: false`` is ``mode="off"``).

    ``threshold`` (0..1, higher = needs clearer speech): Silero's speech probability; for webrtcvad
    it picks the aggressiveness (:func:`webrtc_aggressiveness`). ``min_speech_ms``: consecutive
    voiced audio before ``"start"`` (onset latency vs. false starts on clicks). ``min_level_dbfs``:
    frames quieter than this RMS level are never voiced, whatever the engine says (line noise on a
    quiet line sits well below speech; ``None`` disables the gate).
    """

    mode: VadMode = "server"
    engine: VadEngine = "silero"
    threshold: float = 0.6
    silence_duration_ms: int = 600
    prefix_padding_ms: int = 200
    #: None: the engine's measured default (:data:`MIN_SPEECH_MS`).
    min_speech_ms: int | None = None
    min_level_dbfs: float | None = -45.0
    #: Silero only: a steady harmonic sound (a test tone, DTMF, a synthetic voice) above the level
    #: gate for two frames also counts as speech (see the module doc, "tonal onset").
    tonal: bool = True

    @property
    def onset_ms(self) -> int:
        """``min_speech_ms``, or the engine's default when it is None."""
        return MIN_SPEECH_MS[self.engine] if self.min_speech_ms is None else self.min_speech_ms

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in _MODES:
            problems.append(f"mode must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if self.engine not in _ENGINES:
            problems.append(f"engine must be one of {', '.join(_ENGINES)}, got {self.engine!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) \
                or not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold must be a number within 0..1, got {self.threshold!r}")
        for name in ("silence_duration_ms", "prefix_padding_ms", "min_speech_ms"):
            value = getattr(self, name)
            if value is None and name == "min_speech_ms":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 60_000:
                problems.append(f"{name} must be an integer number of ms within 0..60000, got {value!r}")
        level = self.min_level_dbfs
        if level is not None and (isinstance(level, bool) or not isinstance(level, int | float)
                                  or not -96.0 <= level <= 0.0):
            problems.append(f"min_level_dbfs must be None or a dBFS level within -96..0, got {level!r}")
        if problems:
            raise ValueError("invalid VAD settings: " + "; ".join(problems))


def webrtc_aggressiveness(threshold: float) -> int:
    """webrtcvad's mode 0..3 for a 0..1 threshold: quarters, ``min(3, int(threshold * 4))``.

    0..0.25 → 0 (least aggressive: most frames called speech), 0.25..0.5 → 1, 0.5..0.75 → 2
    (the seed's default 0.6), 0.75..1 → 3.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within 0..1, got {threshold!r}")
    return min(3, int(threshold * 4))


def _check_rate(sample_rate: int) -> None:
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"VAD sample_rate must be 8000 or 16000 Hz, got {sample_rate!r}")


class SpeechDetector:
    """Onset/offset state machine over one engine's per-frame voiced decision.

    ``feed(pcm)`` takes one 20 ms frame of s16le mono and returns ``"start"`` when the caller has
    begun speaking, ``"stop"`` when they have been silent for ``silence_duration_ms``, else None.
    Subclasses supply :meth:`_voiced`.
    """

    __slots__ = ("settings", "sample_rate", "frame_bytes", "_onset_frames", "_offset_frames",
                 "_padding_ms", "_gate_ms", "_run", "_quiet", "_speaking", "_frames",
                 "_start_ms", "voiced", "_pending")

    def __init__(self, settings: VadSettings, sample_rate: int) -> None:
        _check_rate(sample_rate)
        self.settings = settings
        self.sample_rate = sample_rate
        #: Bytes in one frame: 320 at 8 kHz, 640 at 16 kHz.
        self.frame_bytes = 2 * sample_rate * FRAME_MS // 1000
        self._onset_frames = max(1, math.ceil(settings.onset_ms / FRAME_MS))
        self._offset_frames = max(1, math.ceil(settings.silence_duration_ms / FRAME_MS))
        self._padding_ms = settings.prefix_padding_ms
        # Mean square (of int16 samples) below which a frame is never voiced.
        level = settings.min_level_dbfs
        self._gate_ms = 0.0 if level is None else (32768.0 * 10.0 ** (level / 20.0)) ** 2
        self._run = 0
        self._quiet = 0
        self._speaking = False
        self._frames = 0
        self._start_ms: int | None = None
        #: The engine's decision for the last frame fed (before the onset/offset smoothing).
        self.voiced = False
        self._pending = bytearray()  # feed_chunk's partial frame

    @property
    def speaking(self) -> bool:
        """True between a ``"start"`` and the following ``"stop"``."""
        return self._speaking

    @property
    def speech_start_ms(self) -> int | None:
        """Where the current (or last) utterance began, prefix padding included (see module doc)."""
        return self._start_ms

    @property
    def position_ms(self) -> int:
        """Caller audio fed since creation or the last :meth:`reset`, in ms."""
        return self._frames * FRAME_MS

    def reset(self) -> None:
        """Forget everything (a new utterance context, e.g. after the gateway reconnected)."""
        self._run = 0
        self._quiet = 0
        self._speaking = False
        self._frames = 0
        self._start_ms = None
        self.voiced = False
        self._pending.clear()
        self._reset_engine()

    def feed(self, pcm: bytes) -> VadEvent | None:
        if len(pcm) != self.frame_bytes:
            raise ValueError(f"VAD frame must be {self.frame_bytes} bytes (20 ms of s16le at "
                             f"{self.sample_rate} Hz), got {len(pcm)}")
        voiced = self.voiced = self._voiced(pcm)
        self._frames += 1
        if not self._speaking:
            if not voiced:
                self._run = 0
                return None
            self._run += 1
            if self._run < self._onset_frames:
                return None
            self._speaking = True
            self._quiet = 0
            first = (self._frames - self._run) * FRAME_MS
            self._start_ms = max(0, first - self._padding_ms)
            return "start"
        if voiced:
            self._quiet = 0
            return None
        self._quiet += 1
        if self._quiet < self._offset_frames:
            return None
        self._speaking = False
        self._run = 0
        return "stop"

    def feed_chunk(self, pcm: bytes) -> VadEvent | None:
        """Like :meth:`feed` for a chunk of any whole number of samples (a leg whose packets are
        not 20 ms): re-framed here, the remainder kept for the next chunk. When one chunk holds
        more than one event (it would have to span ``silence_duration_ms``), the last is returned.
        A chunk that is exactly one frame, with nothing pending, costs what :meth:`feed` costs.
        """
        fb = self.frame_bytes
        if len(pcm) == fb and not self._pending:
            return self.feed(pcm)
        if len(pcm) % 2:
            raise ValueError(f"VAD audio must be whole s16le samples (an even number of bytes), got {len(pcm)}")
        pending = self._pending
        pending += pcm
        event: VadEvent | None = None
        while len(pending) >= fb:
            got = self.feed(bytes(pending[:fb]))
            del pending[:fb]
            if got is not None:
                event = got
        return event

    def _loud_enough(self, pcm: bytes) -> bool:
        if not self._gate_ms:
            return True
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        return float(np.dot(x, x)) >= self._gate_ms * x.size

    def _voiced(self, pcm: bytes) -> bool:
        raise NotImplementedError

    def _reset_engine(self) -> None:
        pass


class WebRtcDetector(SpeechDetector):
    """webrtcvad behind the RMS gate (see the module doc)."""

    __slots__ = ("_vad", "aggressiveness")

    def __init__(self, settings: VadSettings, sample_rate: int) -> None:
        super().__init__(settings, sample_rate)
        try:
            import webrtcvad  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise VadUnavailable("VAD engine 'webrtcvad' needs the package webrtcvad-wheels "
                                 "(pip install webrtcvad-wheels)") from exc
        self.aggressiveness = webrtc_aggressiveness(settings.threshold)
        self._vad: Any = webrtcvad.Vad(self.aggressiveness)

    def _voiced(self, pcm: bytes) -> bool:
        # The engine first: the gate's RMS only costs anything on frames the engine calls speech.
        return bool(self._vad.is_speech(pcm, self.sample_rate)) and self._loud_enough(pcm)

    def _reset_engine(self) -> None:
        # webrtcvad keeps adaptive noise statistics: a reset starts them afresh.
        self._vad.set_mode(self.aggressiveness)


def silero_model_path() -> str:
    """Path of ``silero_vad.onnx`` in the installed silero-vad package, without importing it.

    ``silero_vad/__init__.py`` imports torch (hundreds of MB, seconds of start-up); only the ONNX
    file is wanted, so the package is located with ``find_spec`` and never executed.
    """
    spec = importlib.util.find_spec("silero_vad")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for base in locations:
        path = os.path.join(base, "data", "silero_vad.onnx")
        if os.path.isfile(path):
            return path
    raise VadUnavailable("VAD engine 'silero' needs the package silero-vad (its ONNX model; "
                         "pip install --no-deps silero-vad): silero_vad/data/silero_vad.onnx not found")


_SILERO_SESSIONS: dict[str, Any] = {}


def silero_session(model_path: str | None = None) -> Any:
    """The process's one onnxruntime session for the Silero model (created on first use).

    A session costs ~45 ms to build and ~10 MB; the model's recurrent state is an input and an
    output of every run, not part of the session, so all calls share one (``run`` is thread-safe)
    and each detector keeps only its own state. Building it blocks for ~0.1 s: the wiring may call
    this at start-up, when a gateway uses local Silero VAD, so that no call's set-up waits for it.
    Raises :class:`VadUnavailable` naming the package when onnxruntime or the model is missing.
    """
    path = model_path or silero_model_path()
    session = _SILERO_SESSIONS.get(path)
    if session is not None:
        return session
    try:
        import onnxruntime
    except ImportError as exc:
        raise VadUnavailable("VAD engine 'silero' needs the package onnxruntime "
                             "(pip install onnxruntime)") from exc
    opts = onnxruntime.SessionOptions()
    # Many calls share 2 cores: each inference on the calling thread, no thread pool per session.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    _SILERO_SESSIONS[path] = session
    return session


class SileroDetector(SpeechDetector):
    """Silero VAD through onnxruntime, 20 ms frames buffered into 32 ms windows (module doc)."""

    __slots__ = ("_session", "_window", "_context", "_buf", "_fill", "_x", "_state", "_sr",
                 "_prob", "_on", "_off", "_scale_buf", "probability", "_tonal", "_tonal_run", "_pair",
                 "_lags", "_nfft")

    def __init__(self, settings: VadSettings, sample_rate: int, *, model_path: str | None = None) -> None:
        super().__init__(settings, sample_rate)
        self._session = silero_session(model_path)
        self._window = 256 if sample_rate == 8000 else 512
        self._context = 32 if sample_rate == 8000 else 64
        frame = sample_rate * FRAME_MS // 1000
        # Samples waiting for a full window; room for one window plus one frame.
        self._buf = np.zeros(self._window + frame, dtype=np.float32)
        self._fill = 0
        # The model input: context + window, reused for every inference.
        self._x = np.zeros((1, self._context + self._window), dtype=np.float32)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._sr = np.array(sample_rate, dtype=np.int64)
        self._scale_buf = np.zeros(frame, dtype=np.float32)
        self._on = float(settings.threshold)
        self._off = max(0.0, self._on - _SILERO_HYSTERESIS)
        #: The latest window's speech probability (0..1).
        self.probability = 0.0
        self._tonal = settings.tonal
        self._tonal_run = 0
        self._pair = np.zeros(2 * frame, dtype=np.float64)  # the previous frame and this one
        self._lags = np.arange(sample_rate // 400, sample_rate // 80 + 1)
        self._nfft = 1 << (4 * frame - 1).bit_length()  # no circular wrap for lags up to 2 frames

    def _voiced(self, pcm: bytes) -> bool:
        frame = self._scale_buf
        np.multiply(np.frombuffer(pcm, dtype="<i2"), 1.0 / 32768.0, out=frame, casting="unsafe")
        n = frame.size
        self._buf[self._fill:self._fill + n] = frame
        self._fill += n
        if self._fill >= self._window:
            w, c = self._window, self._context
            x = self._x
            x[0, :c] = x[0, w:]  # the last `c` samples of the previous input are the new context
            x[0, c:] = self._buf[:w]
            rest = self._fill - w
            self._buf[:rest] = self._buf[w:self._fill]
            self._fill = rest
            out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
            self.probability = float(out[0, 0])
        pair = self._pair
        pair[:n] = pair[n:]
        pair[n:] = frame
        if not self._loud_enough(pcm):
            self._tonal_run = 0
            return False
        if self._speaking:
            # Silero alone sustains speech, so a steady hum or tone cannot hold "speaking"; and a
            # sound that was already there is not a fresh onset once speech ends.
            self._tonal_run = TONAL_FRESH_FRAMES + 1
            return self.probability >= self._off
        if self.probability >= self._on:
            return True
        if not self._tonal:
            return False
        # The tonal path only starts speech, for a sound that has just begun (see the module doc).
        self._tonal_run = self._tonal_run + 1 if self._is_tonal(pair) else 0
        return 2 <= self._tonal_run <= TONAL_FRESH_FRAMES

    def _is_tonal(self, x: np.ndarray[Any, np.dtype[np.float64]]) -> bool:
        """The last 40 ms (``x``) are periodic like one voice (module doc, "tonal onset")."""
        x = x - x.mean()
        n = x.size
        spectrum = np.fft.rfft(x, self._nfft)
        r = np.fft.irfft(spectrum * np.conj(spectrum), self._nfft)
        lags = self._lags
        energy = np.concatenate(([0.0], np.cumsum(x * x)))
        # r[lag] against the energies of the two overlapping parts, x[:n-lag] and x[lag:].
        norm = np.sqrt(energy[n - lags] * (energy[n] - energy[lags])) + 1e-9
        return float(np.max(r[lags] / norm)) >= TONAL_PERIODICITY

    def _reset_engine(self) -> None:
        self._buf[:] = 0.0
        self._fill = 0
        self._x[:] = 0.0
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self.probability = 0.0
        self._tonal_run = 0
        self._pair[:] = 0.0


def make_detector(settings: VadSettings, sample_rate: int) -> SpeechDetector:
    """The detector ``settings.engine`` names, for a caller leg at ``sample_rate`` (8000/16000).

    Raises ValueError for a bad rate, :class:`VadUnavailable` (naming the package) when the
    engine is not installed. ``settings.mode`` is the caller's business: this builds a detector
    whatever it says.
    """
    _check_rate(sample_rate)
    if settings.engine == "silero":
        return SileroDetector(settings, sample_rate)
    return WebRtcDetector(settings, sample_rate)
