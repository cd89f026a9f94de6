"""Measure the local VAD engines on a labelled set built here: ``python -m bridge.devtools.vad_eval --out DIR``.

Issue 11 asks for the local detector (bridge/vad.py) to be chosen by measurement. This builds a
small labelled set with espeak-ng (speech) and sox (telephone band-limiting, line noise, music on
hold), runs every engine at several thresholds through :class:`bridge.vad.SpeechDetector` exactly
as a call would (20 ms frames, the same onset/offset state machine), and writes ``DIR/results.md``
(a markdown table) plus the set itself as WAV files under ``DIR/set/`` for listening.

The set, per sample rate (8 kHz, and 16 kHz unless ``--rates 8000``):

* speech: six espeak-ng voices at different rates, each speaking four sentences with commas
  (internal pauses), separated by 0.9-1.6 s gaps, at active levels from -18 to -30 dBFS; heard
  clean (a -70 dBFS noise floor), over pink noise at 15 dB SNR, over white noise at 20 dB SNR and
  over mains hum at 20 dB SNR;
* line noise alone: white, pink and brown noise at telephone levels (-50 to -25 dBFS), 50/60 Hz
  hum with harmonics;
* music on hold alone: sox-synthesised plucked chord progressions, a sine/triangle arpeggio and a
  square-wave pad with tremolo, at -20 and -28 dBFS.

Labels are per 20 ms frame, from the construction: a frame is speech when the TTS signal alone
(before any noise) is within 30 dB of its loudest frame, with gaps up to 100 ms (stop consonants)
bridged. Noise and music sets are all non-speech.

Reported per engine, threshold and rate: per-frame precision and recall of the engine's voiced
decision on the speech sets; onset latency (ms from a sentence's first speech frame to the
detector's ``"start"``; median, p90, max) and the sentences it never started on; false starts
per minute on noise alone and on music alone; and the cost of ``feed`` per 20 ms frame in µs
(mean, median, p99) on this machine (Silero runs a model on ~5 frames in 8, so its mean is the
number that adds up per call). Deterministic: fixed random seeds, sox ``-R``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bridge.vad import FRAME_MS, SpeechDetector, VadSettings, make_detector, webrtc_aggressiveness

SEED = 11

SENTENCES = (
    "Hello, I would like to check the status of my order, please.",
    "Yes, that's right. The number is four, seven, two, nine.",
    "Could you transfer me to someone in billing? Thanks.",
    "No, wait, I'm sorry, I meant the other account.",
)

#: (espeak-ng voice, words per minute, active speech level in dBFS)
VOICES = (
    ("en-us", 165, -20.0),
    ("en-gb", 190, -24.0),
    ("en-gb-scotland", 140, -28.0),
    ("en-us+f3", 175, -22.0),
    ("en-gb-x-rp+f2", 210, -18.0),
    ("en-029+m4", 155, -30.0),
)

#: (engine, threshold, min_level_dbfs gate, min_speech_ms[, tonal]) evaluated; None = the engine's default
#: onset; Silero rows run without the tonal onset unless a fifth element says True ("silero+tonal").
CONFIGS: tuple[tuple[Any, ...], ...] = (
    ("webrtcvad", 0.1, -45.0, None),
    ("webrtcvad", 0.3, -45.0, None),
    ("webrtcvad", 0.6, -45.0, None),
    ("webrtcvad", 0.9, -45.0, None),
    ("webrtcvad", 0.6, -45.0, 40),
    ("webrtcvad", 0.6, None, None),
    ("silero", 0.3, -45.0, None),
    ("silero", 0.5, -45.0, None),
    ("silero", 0.6, -45.0, None),
    ("silero", 0.8, -45.0, None),
    ("silero", 0.6, -45.0, 40),
    ("silero", 0.6, None, None),
    ("silero", 0.6, -45.0, None, True),
    ("silero", 0.3, -45.0, None, True),
)


def _run(cmd: Sequence[str]) -> bytes:
    proc = subprocess.run(list(cmd), check=False, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _band(sr: int) -> list[str]:
    # Telephone band at 8 kHz (G.711 channel), wideband at 16 kHz.
    return ["sinc", "300-3400"] if sr == 8000 else ["sinc", "100-7000"]


def _raw(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float64) / 32768.0


def _sox_synth(sr: int, seconds: float, synth: Sequence[str], channels: int = 1,
               extra: Sequence[str] = ()) -> np.ndarray:
    """sox-generated audio at 48 kHz (pluck needs it), mixed to mono, band-limited, at ``sr``."""
    cmd = ["sox", "-R", "-r", "48000", "-c", str(channels), "-n", "-b", "16", "-e", "signed", "-t", "raw", "-",
           "synth", f"{seconds}", *synth, *extra]
    if channels > 1:
        cmd += ["remix", "-"]
    cmd += ["rate", str(sr), *_band(sr)]
    return _raw(_run(cmd))


def _tts(text: str, voice: str, wpm: int, sr: int, tmp: str) -> np.ndarray:
    wav = os.path.join(tmp, "tts.wav")
    _run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", wav, text])
    return _raw(_run(["sox", "-R", wav, "-r", str(sr), "-c", "1", "-b", "16", "-e", "signed", "-t", "raw", "-",
                      *_band(sr)]))


def _frames_rms(x: np.ndarray, sr: int) -> np.ndarray:
    n = sr * FRAME_MS // 1000
    k = x.size // n
    f = x[: k * n].reshape(k, n)
    rms: np.ndarray = np.sqrt(np.mean(f * f, axis=1))
    return rms


def _label(speech: np.ndarray, sr: int) -> np.ndarray:
    rms = _frames_rms(speech, sr)
    peak = float(rms.max()) if rms.size else 0.0
    lab = rms >= peak * 10 ** (-30 / 20) if peak > 0 else np.zeros(rms.size, dtype=bool)
    # Bridge gaps of up to 100 ms (5 frames): closures inside words are speech.
    idx = np.flatnonzero(lab)
    for a, b in itertools.pairwise(idx):
        if 1 < b - a <= 6:
            lab[a:b] = True
    return lab


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x * x)))
    return x * (10 ** (dbfs / 20) / rms) if rms > 0 else x


@dataclass
class Clip:
    name: str
    kind: str  # speech | noise | music
    pcm: bytes
    labels: np.ndarray
    onsets: list[tuple[int, int]] = field(default_factory=list)  # (first frame, last frame) per sentence


def _to_pcm(x: np.ndarray) -> bytes:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2").tobytes()


def build_set(sr: int, tmp: str) -> list[Clip]:
    rng = np.random.default_rng(SEED)
    n_frame = sr * FRAME_MS // 1000
    clips: list[Clip] = []
    # Speech tracks, one per voice.
    tracks: list[tuple[str, np.ndarray, np.ndarray, list[tuple[int, int]], float]] = []
    for voice, wpm, level in VOICES:
        parts: list[np.ndarray] = [np.zeros(sr)]
        sentences: list[tuple[int, int]] = []
        for text in SENTENCES:
            s = _tts(text, voice, wpm, sr, tmp)
            start = sum(p.size for p in parts)
            parts.append(s)
            gap = float(rng.uniform(0.9, 1.6))
            parts.append(np.zeros(int(gap * sr)))
            sentences.append((start, s.size))
        speech = np.concatenate(parts)
        speech = speech[: speech.size // n_frame * n_frame]
        lab = _label(speech, sr)
        active = float(np.sqrt(np.mean(np.repeat(lab, n_frame) * speech ** 2) / max(lab.mean(), 1e-9)))
        speech *= 10 ** (level / 20) / active
        spans = []
        for start, size in sentences:
            f0, f1 = start // n_frame, (start + size) // n_frame
            on = np.flatnonzero(lab[f0:f1])
            if on.size:
                spans.append((f0 + int(on[0]), f0 + int(on[-1])))
        tracks.append((voice, speech, lab, spans, level))

    def noise(kind: str, seconds: float, dbfs: float) -> np.ndarray:
        if kind == "hum":
            x = _sox_synth(sr, seconds, ["sine", "50", "sine", "150", "sine", "250", "sine", "350"], channels=4)
        elif kind == "hum60":
            x = _sox_synth(sr, seconds, ["sine", "60", "sine", "180", "sine", "300"], channels=3)
        else:
            x = _sox_synth(sr, seconds, [f"{kind}noise"])
        return _level(x, dbfs)

    for voice, speech, lab, spans, level in tracks:
        secs = speech.size / sr + 0.5
        for cond, kind, snr in (("clean", "white", None), ("pink15", "pink", 15.0), ("white20", "white", 20.0),
                                ("hum20", "hum", 20.0)):
            floor = noise("white", secs, -70.0)[: speech.size]
            mix = speech + floor
            if snr is not None:
                mix = mix + noise(kind, secs, level - snr)[: speech.size]
            clips.append(Clip(f"{voice}/{cond}", "speech", _to_pcm(mix), lab, spans))

    for kind, dbfs in (("white", -50.0), ("white", -40.0), ("white", -30.0), ("pink", -40.0), ("pink", -30.0),
                       ("brown", -35.0), ("brown", -25.0), ("hum", -30.0), ("hum60", -25.0)):
        x = noise(kind, 12.0, dbfs)
        n = x.size // n_frame
        clips.append(Clip(f"{kind}{int(dbfs)}", "noise", _to_pcm(x[: n * n_frame]), np.zeros(n, dtype=bool)))

    chords = [("C3", "E3", "G3", "C4"), ("A2", "C3", "E3", "A3"), ("F2", "A2", "C3", "F3"), ("G2", "B2", "D3", "G3")]
    pluck = np.concatenate([_sox_synth(sr, 1.0, [w for n in ch for w in ("pluck", n)], channels=4)
                            for _ in range(4) for ch in chords])
    arp_notes = ["C4", "E4", "G4", "C5", "A3", "C4", "E4", "A4", "F3", "A3", "C4", "F4", "G3", "B3", "D4", "G4"]
    arp = np.concatenate([_sox_synth(sr, 0.25, [w, note], extra=["fade", "q", "0.01", "0.25", "0.05"])
                          for _ in range(4) for note in arp_notes for w in ("triangle",)])
    pad = np.concatenate([_sox_synth(sr, 2.0, [w for n in ch for w in ("square", n)], channels=4,
                                     extra=["tremolo", "5", "40", "lowpass", "1500"])
                          for _ in range(2) for ch in chords])
    for name, x, dbfs in (("pluck-chords", pluck, -20.0), ("arpeggio", arp, -20.0), ("square-pad", pad, -20.0),
                          ("pluck-chords-quiet", pluck, -28.0)):
        x = _level(x, dbfs)
        n = x.size // n_frame
        clips.append(Clip(name, "music", _to_pcm(x[: n * n_frame]), np.zeros(n, dtype=bool)))
    return clips


@dataclass
class Result:
    engine: str
    threshold: float
    gate: float | None
    onset_ms: int
    rate: int
    tp: int = 0
    fp: int = 0
    fn: int = 0
    latencies: list[float] = field(default_factory=list)
    missed: int = 0
    sentences: int = 0
    noise_starts: int = 0
    noise_minutes: float = 0.0
    music_starts: int = 0
    music_minutes: float = 0.0
    cost_ns: list[int] = field(default_factory=list)


def evaluate(det: SpeechDetector, clips: list[Clip], res: Result) -> None:
    fb = det.frame_bytes
    perf = time.perf_counter_ns
    for clip in clips:
        det.reset()
        pcm = clip.pcm
        n = len(pcm) // fb
        voiced = np.zeros(n, dtype=bool)
        starts: list[int] = []
        costs = res.cost_ns
        for i in range(n):
            frame = pcm[i * fb:(i + 1) * fb]
            t0 = perf()
            ev = det.feed(frame)
            costs.append(perf() - t0)
            voiced[i] = det.voiced
            if ev == "start":
                starts.append(i)
        if clip.kind == "speech":
            lab = clip.labels[:n]
            res.tp += int(np.sum(voiced & lab))
            res.fp += int(np.sum(voiced & ~lab))
            res.fn += int(np.sum(~voiced & lab))
            for first, last in clip.onsets:
                res.sentences += 1
                hit = [s for s in starts if first - 5 <= s <= last]
                if hit:
                    # "start" is returned at the end of frame s; speech began at the start of frame `first`.
                    res.latencies.append((hit[0] + 1 - first) * FRAME_MS)
                else:
                    res.missed += 1
        else:
            minutes = n * FRAME_MS / 60000
            if clip.kind == "noise":
                res.noise_starts += len(starts)
                res.noise_minutes += minutes
            else:
                res.music_starts += len(starts)
                res.music_minutes += minutes


def _fmt_row(r: Result) -> str:
    prec = r.tp / (r.tp + r.fp) if r.tp + r.fp else float("nan")
    rec = r.tp / (r.tp + r.fn) if r.tp + r.fn else float("nan")
    lat = np.array(r.latencies) if r.latencies else np.array([np.nan])
    cost = np.array(r.cost_ns) / 1000.0
    thr = f"{r.threshold:g}"
    if r.engine == "webrtcvad":
        thr += f" (mode {webrtc_aggressiveness(r.threshold)})"
    gate = "off" if r.gate is None else f"{r.gate:g}"
    return (f"| {r.engine} | {thr} | {gate} | {r.onset_ms} | {r.rate} | {prec:.3f} | {rec:.3f} | "
            f"{np.median(lat):.0f} / {np.percentile(lat, 90):.0f} / {np.max(lat):.0f} | {r.missed}/{r.sentences} | "
            f"{r.noise_starts / r.noise_minutes:.1f} | {r.music_starts / r.music_minutes:.1f} | "
            f"{np.mean(cost):.1f} / {np.median(cost):.1f} / {np.percentile(cost, 99):.1f} |")


HEADER = ("| engine | threshold | gate dBFS | min_speech_ms | Hz | precision | recall "
          "| onset ms (median / p90 / max) | missed | false starts/min, noise | false starts/min, music "
          "| µs/frame (mean / median / p99) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bridge.devtools.vad_eval", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for results.md and the generated set")
    p.add_argument("--rates", default="8000,16000", help="comma-separated sample rates (default 8000,16000)")
    p.add_argument("--engines", default="webrtcvad,silero", help="engines to evaluate (default both)")
    args = p.parse_args(argv)
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            print(f"vad_eval: {tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    rates = [int(r) for r in args.rates.split(",")]
    engines = set(args.engines.split(","))
    os.makedirs(os.path.join(args.out, "set"), exist_ok=True)
    t_start = time.monotonic()
    rows: list[str] = []
    summary: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for sr in rates:
            clips = build_set(sr, tmp)
            for c in clips:
                path = os.path.join(args.out, "set", f"{sr}-{c.name.replace('/', '-')}.raw")
                with open(path, "wb") as f:
                    f.write(c.pcm)
                _run(["sox", "-t", "raw", "-r", str(sr), "-e", "signed", "-b", "16", "-c", "1", path,
                      path[:-4] + ".wav"])
                os.remove(path)
            kinds = {k: sum(len(c.pcm) for c in clips if c.kind == k) / (2 * sr) for k in ("speech", "noise", "music")}
            summary.append(f"- {sr} Hz: " + ", ".join(f"{k} {v:.0f} s" for k, v in kinds.items())
                           + f"; {sum(len(c.onsets) for c in clips)} sentence onsets")
            for engine, thr, gate, onset, *more in CONFIGS:
                if engine not in engines:
                    continue
                tonal = bool(more and more[0])
                settings = VadSettings(mode="local", engine=engine, threshold=thr, min_level_dbfs=gate,
                                       min_speech_ms=onset, tonal=tonal)
                det = make_detector(settings, sr)
                res = Result(engine + ("+tonal" if tonal else ""), thr, gate, settings.onset_ms, sr)
                evaluate(det, clips, res)
                rows.append(_fmt_row(res))
                print(rows[-1], flush=True)
    elapsed = time.monotonic() - t_start
    text = "\n".join([
        "# Local VAD evaluation",
        "",
        f"`python -m bridge.devtools.vad_eval --out {args.out} --rates {args.rates}`",
        "",
        (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; run took {elapsed:.0f} s."),
        "",
        "Set (espeak-ng + sox, seed fixed):",
        *summary,
        "",
        (f"silence_duration_ms={VadSettings().silence_duration_ms}. Precision/recall: "
        "per 20 ms frame, the engine's voiced decision against the TTS energy labels (speech sets: clean, pink 15 dB, "
        "white 20 dB, hum 20 dB). Onset: from a sentence's first labelled frame to the end of the frame on which "
        "`feed` returned \"start\". False starts: \"start\" events on noise / music alone."),
        "",
        HEADER,
        *rows,
        "",
    ])
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.join(args.out, 'results.md')} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
