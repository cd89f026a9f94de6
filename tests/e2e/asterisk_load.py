"""Load through the real Asterisk: N concurrent calls, every caller talking from its first moment.

``python -m tests.e2e.asterisk_load --calls 20,50,100`` (root: the Asterisk sandbox is a chroot;
``tests/e2e/test_load_asterisk.py`` runs one modest step in CI). Per step N, on loopback only:

* a fresh Asterisk 22 (:class:`~tests.e2e.asterisk.AsteriskSandbox`), a fresh bridge process
  (``python -m bridge serve`` with AMI correlation on, as in production) and the reference
  gateway (:class:`~bridge.devtools.gateway_sim.GatewaySim`, in this process, recording what
  each session hears; its VAD is off so nothing barges in on the burst);
* N calls are originated at ``--rate`` per second: AMI Originate of
  ``Local/caller@voxbridge-load`` into ``voxbridge-ai,ai,1`` (the AudioSocket extension). The
  ``;2`` half answers, starts MixMonitor (what the caller hears) and plays its WAV at once, so
  the caller talks from its first moment until it hangs up at the end of its WAV;
* every gateway session sends ``--burst-ms`` of a 2600 Hz tone at the same moment, after the
  last call has had ``--settle`` seconds to connect (a burst, back to back, like a real gateway).

How the first words are measured (exactly, not guessed): each caller's WAV is band-limited
noise (300-1800 Hz) from a generator seeded with the call's number. It never repeats, so any
300 ms of it has exactly one place in that call's timeline: the first voiced 300 ms the gateway
received is located by cross-correlation with what the caller played, and its position *is*
the caller audio the gateway never got (``lost_ms``). From there, the received audio is compared
with what was played 20 ms frame by frame (normalised correlation >= 0.9): the first frame that
differs is a gap in the middle, and the matched length against what was played says whether the
gateway heard the caller whole. The audio of another call does not correlate, so crossed calls
are caught too. The session is tied to its call by the profile prompt (``load call {load_call}``,
the variable coming from the dialplan's ``AS_VARS``, which the bridge reads through AMI).

The burst is found in each caller's MixMonitor recording (both directions mixed: the caller's
noise stays below 1800 Hz, the burst is alone at 2600 Hz) per 20 ms frame; it was heard whole
when its length is within ``BURST_TOLERANCE_FRAMES`` of what was sent, without holes.

CPU: ``/proc/<pid>/stat`` (utime + stime, all threads) of Asterisk, the bridge and this process
(gateway simulator, originator, AMI observer) over the step, and the machine's busy share
(``/proc/stat``) and load average. Output: ``asterisk-load.json`` and a short table in ``--out``.

Bounds: at most ``MAX_CALLS`` calls per step; a step lasts about ``N / rate + settle + burst +
tail`` seconds plus start-up and a bounded wait for the recordings; every process started here
(Asterisk, the bridge) is stopped by its PID, and the sandbox's directory is removed.

Not part of the bridge: nothing under ``bridge/`` imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bridge.devtools.gateway_sim import GatewaySim, SimSession, VadConfig, tone
from tests.ports import free_port

from .ami_client import AmiClient
from .asterisk import AsteriskSandbox, ensure_proc

RATE = 8000
FRAME = 160  # samples per 20 ms at 8 kHz
KEY = "load-key"
API_TOKEN = "load-api-token"
BURST_HZ = 2600
CALLER_BAND_HZ = (300, 1800)
CALLER_RMS = 3000.0  # about -21 dBFS: clearly speech level, far from clipping
MAX_CALLS = 400
#: The caller's opening the gateway may miss and still have heard the caller "from the first
#: second": Asterisk's own start-up of the two halves (the ``;1`` half reaches AudioSocket() a
#: few frames after the ``;2`` half starts playing). Measured at 1-20 calls: 0 ms.
START_TOLERANCE_MS = 100
#: Frames at the very end may be cut by the hangup itself.
END_TOLERANCE_MS = 200
BURST_TOLERANCE_FRAMES = 3
PROBE_S = 0.3
MAX_LOST_SEARCH_S = 20.0
MATCH = 0.9

REPO = Path(__file__).resolve().parents[2]
SANDBOX_SH = Path(__file__).resolve().parent / "sandbox.sh"

LOAD_DIALPLAN = """
; The load test's caller (asterisk_load.py): talks from its first moment to the end of its WAV,
; then hangs up; MixMonitor records what it hears (both directions mixed).
[voxbridge-load]
exten => caller,1,Answer()
 same => n,MixMonitor(${REC_FILE})
 same => n,Playback(${PLAY_FILE})
 same => n,Hangup()
"""


# ============================================================================ signals


def caller_speech(call: int, seconds: float) -> np.ndarray:
    """Call ``call``'s voice: band-limited noise, seeded by the call's number (int16, 8 kHz).

    Unique per call and per time position (noise never repeats), so where a piece of it sits in
    the call is found by cross-correlation, to the sample.
    """
    n = round(seconds * RATE)
    rng = np.random.default_rng(0x5EED0000 + call)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[(freqs < CALLER_BAND_HZ[0]) | (freqs > CALLER_BAND_HZ[1])] = 0
    x = np.fft.irfft(spectrum, n)
    x *= CALLER_RMS / (np.sqrt(np.mean(x * x)) + 1e-9)
    return np.clip(np.round(x), -32767, 32767).astype(np.int16)


@dataclass
class GatewayHeard:
    """What one gateway session heard of its caller."""

    session: bool = False  # a gateway session carried this call
    lost_ms: float | None = None  # the caller's opening the gateway never received
    match: float = 0.0  # normalised correlation of the first received audio with this caller
    contiguous_ms: float = 0.0  # heard in order, frame for frame, from lost_ms on
    expected_ms: float = 0.0  # what the caller played from lost_ms to its end
    received_ms: float = 0.0
    whole: bool = False


def gateway_heard(received: bytes, sent: np.ndarray) -> GatewayHeard:
    """Locate the first words the gateway received in what the caller played; check the rest."""
    out = GatewayHeard(session=True, expected_ms=len(sent) / RATE * 1000)
    r = np.frombuffer(received[: len(received) // 2 * 2], "<i2").astype(np.float64)
    out.received_ms = len(r) / RATE * 1000
    s_all = sent.astype(np.float64)
    frames = r[: len(r) // FRAME * FRAME].reshape(-1, FRAME)
    voiced = np.nonzero(np.sqrt(np.mean(frames * frames, axis=1)) > CALLER_RMS / 10)[0]
    probe_n = int(PROBE_S * RATE)
    if not len(voiced):
        return out
    start = int(voiced[0]) * FRAME
    probe = r[start : start + probe_n]
    if len(probe) < FRAME * 5:
        return out
    search = s_all[: min(len(s_all), int(MAX_LOST_SEARCH_S * RATE) + len(probe))]
    if len(search) < len(probe):
        return out
    n = 1 << int(np.ceil(np.log2(len(search) + len(probe))))
    corr = np.fft.irfft(np.fft.rfft(search, n) * np.conj(np.fft.rfft(probe, n)), n)[: len(search) - len(probe) + 1]
    energy = np.concatenate(([0.0], np.cumsum(search * search)))
    window = energy[len(probe):] - energy[: len(search) - len(probe) + 1]
    norm = corr / (np.sqrt(window * float(probe @ probe)) + 1e-9)
    pos = int(np.argmax(norm))
    out.match = round(float(norm[pos]), 3)
    if out.match < MATCH:
        return out  # not this caller's audio (or garbled beyond recognition)
    out.lost_ms = round(pos / RATE * 1000, 1)
    out.expected_ms = round((len(s_all) - pos) / RATE * 1000, 1)
    count = min(len(r) - start, len(s_all) - pos) // FRAME
    a = r[start : start + count * FRAME].reshape(-1, FRAME)
    b = s_all[pos : pos + count * FRAME].reshape(-1, FRAME)
    fc = np.sum(a * b, axis=1) / (np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1)) + 1e-9)
    bad = np.nonzero(fc < MATCH)[0]
    matched = int(bad[0]) if len(bad) else count
    out.contiguous_ms = matched * 20.0
    out.whole = out.lost_ms <= START_TOLERANCE_MS and out.expected_ms - out.contiguous_ms <= END_TOLERANCE_MS
    return out


@dataclass
class CallerHeard:
    """What one caller heard of its gateway's burst (from its MixMonitor recording)."""

    recording: bool = False
    burst_frames: int = 0  # 20 ms frames carrying the burst tone
    span_frames: int = 0  # first to last such frame
    whole: bool = False  # all of it heard: its length within BURST_TOLERANCE_FRAMES
    hole_ms: float = 0.0  # frames without it inside the burst: playout late, then caught up


def caller_heard(pcm: bytes, burst_ms: int) -> CallerHeard:
    out = CallerHeard(recording=True)
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2").astype(np.float64)
    frames = x[: len(x) // FRAME * FRAME].reshape(-1, FRAME)
    if not len(frames):
        return out
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(FRAME), axis=1))
    b = round(BURST_HZ / (RATE / FRAME))
    full = 0.3 * 32767 * np.hanning(FRAME).sum() / 2  # the burst's bin magnitude in a full frame
    hit = np.nonzero(spectrum[:, b] > 0.3 * full)[0]
    expected = burst_ms // 20
    out.burst_frames = len(hit)
    out.span_frames = int(hit[-1] - hit[0] + 1) if len(hit) else 0
    out.whole = abs(len(hit) - expected) <= BURST_TOLERANCE_FRAMES
    out.hole_ms = (out.span_frames - len(hit)) * 20.0  # to a frame: partly filled frames may count either way
    return out


# ============================================================================ processes


_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of every thread of ``pid`` so far (``/proc/<pid>/stat``)."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (``/proc/stat``)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class BridgeProcess:
    """``python -m bridge serve -c <config>`` in its own process, stopped by its PID."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config_path = workdir / "bridge.json"  # JSON is YAML
        self.config_path.write_text(json.dumps(config, indent=1))
        self.stdout = workdir / "bridge.out"
        self.log = workdir / "bridge.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBRIDGE_")}
        with open(self.stdout, "wb") as out, open(self.log, "wb") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=str(REPO), env=env,
            )

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = await asyncio.to_thread(self._spawn)
        deadline = time.monotonic() + timeout
        while True:
            text = self.stdout.read_text(errors="replace")
            log = self.log.read_text(errors="replace")
            if " ready:" in text and "AMI connected" in log:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.splitlines()[-20:])
                raise RuntimeError(f"the bridge did not come up (AMI connected) within {timeout:g} s:\n{tail}")
            await asyncio.sleep(0.1)

    async def stop(self, timeout: float = 10.0) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if p.poll() is None:
                p.kill()
                p.wait(5)
        self.proc = None


PLAYOUT_METRICS = {
    "voxbridge_playout_late_ticks_total": "late_ticks",
    "voxbridge_playout_max_lateness_seconds": "max_lateness_s",
    "voxbridge_frames_out_dropped_total": "frames_out_dropped",
}


async def bridge_playout_metrics(api_port: int) -> dict[str, float]:
    """The bridge's playout clock as it reports itself (``/metrics``): a hole in what the callers
    heard with no late tick here came from Asterisk's side."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=5) as client:
            resp = await client.get(f"http://127.0.0.1:{api_port}/metrics",
                                    headers={"Authorization": f"Bearer {API_TOKEN}"})
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        return {"scrape_failed": 1.0} if exc else {}
    out: dict[str, float] = {}
    for line in resp.text.splitlines():
        name, _, value = line.partition(" ")
        if name in PLAYOUT_METRICS:
            out[PLAYOUT_METRICS[name]] = float(value)
    return out


def sandbox_root() -> Path:
    """The Asterisk chroot (``sandbox.sh asterisk`` builds it once, then prints its path)."""
    res = subprocess.run(["bash", str(SANDBOX_SH), "asterisk"], capture_output=True, text=True, timeout=900)
    if res.returncode != 0 or not res.stdout.strip():
        raise RuntimeError(f"sandbox.sh asterisk failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


# ============================================================================ one step


class SlowOpeningGateway(GatewaySim):
    """The reference gateway, answering each WebSocket upgrade only after ``open_delay_s``: a
    gateway (or a network) slow to open, the way a loaded one is. The caller talks meanwhile."""

    def __init__(self, open_delay_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.open_delay_s = open_delay_s

    async def _process_request(self, connection: Any, request: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(self.open_delay_s)
        return GatewaySim._process_request(connection, request)


@dataclass
class StepResult:
    calls: int
    rate: float
    duration_s: float = 0.0
    originated: int = 0
    answered: int = 0
    gateway_sessions: int = 0
    sessions_at_burst: int = 0
    callers_heard_burst_whole: int = 0
    callers_heard_burst_without_hole: int = 0
    burst_hole_ms_max: float = 0.0
    gateways_heard_caller_whole: int = 0
    gateways_lost_start: int = 0  # lost more than START_TOLERANCE_MS of the caller's opening
    lost_ms_max: float | None = None
    lost_ms_p99: float | None = None
    lost_ms_p50: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_per_call_ms_per_s: dict[str, float] = field(default_factory=dict)
    bridge_playout: dict[str, float] = field(default_factory=dict)  # the bridge's own /metrics
    machine_busy_pct: float = 0.0
    loadavg_before: float = 0.0
    loadavg_after: float = 0.0
    problems: list[str] = field(default_factory=list)
    per_call: list[dict[str, Any]] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return (self.callers_heard_burst_whole == self.calls and self.gateways_heard_caller_whole == self.calls)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def run_step(root: Path, workdir: Path, calls: int, *, rate: float = 10.0, settle_s: float = 4.0,
                   burst_ms: int = 2000, tail_s: float = 4.0, gateway_open_delay_s: float = 0.0) -> StepResult:
    """One load step: N calls through a fresh Asterisk and a fresh bridge; see the module doc.

    ``gateway_open_delay_s``: the gateway answers each WebSocket upgrade this late (a slow start,
    measured the same way: the caller talks from its first moment regardless).
    """
    if not 1 <= calls <= MAX_CALLS:
        raise ValueError(f"calls must be 1..{MAX_CALLS}, got {calls}")
    if not 0 < rate <= 50:
        raise ValueError(f"rate must be in (0, 50] calls per second, got {rate}")
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    result = StepResult(calls=calls, rate=rate)
    ramp_s = (calls - 1) / rate
    burst_at = ramp_s + settle_s
    end_at = burst_at + burst_ms / 1000 + tail_s

    asterisk = AsteriskSandbox(root, workdir / "asterisk", free_port(), free_port())
    asterisk.extra_dialplan = LOAD_DIALPLAN
    sim_options: dict[str, Any] = {"accepted_keys": {KEY}, "settle_ms": 500, "echo": False,
                                   "vad": VadConfig(threshold_rms=1e12), "audio_cap_bytes": 64 * 1024 * 1024,
                                   "max_messages": 200}
    sim = (SlowOpeningGateway(gateway_open_delay_s, **sim_options) if gateway_open_delay_s > 0
           else GatewaySim(**sim_options))
    bridge: BridgeProcess | None = None
    ami: AmiClient | None = None
    api_port = free_port()
    try:
        ensure_proc(root)
        await asyncio.to_thread(asterisk.start)
        await sim.start()
        bridge = BridgeProcess({
            # Room for every call of the step: the default max_calls (200) refuses the rest, which
            # is the bridge doing its job, not what this test measures.
            "audiosocket": {"listen": f"127.0.0.1:{asterisk.audiosocket_port}", "max_calls": max(200, calls + 20)},
            "gateway": {"url": sim.url, "api_key": KEY},
            "api": {"listen": f"127.0.0.1:{api_port}", "token": API_TOKEN},
            "ami": {"enabled": True, "port": asterisk.ami_port, "username": asterisk.ami_username,
                    "secret": asterisk.ami_secret},
            "profiles": {"default": {"first_message": None, "farewell_message": None, "tools": [],
                                     "prompt": "load call {load_call}"}},
        }, workdir)
        await bridge.start()
        ami = await AmiClient.connect("127.0.0.1", asterisk.ami_port, asterisk.ami_username, asterisk.ami_secret)

        # What each caller says, written before the clock starts.
        speech: dict[int, np.ndarray] = {}
        plays: dict[int, str] = {}
        recs: dict[int, str] = {}
        for i in range(calls):
            speech[i] = caller_speech(i, end_at - i / rate)
            plays[i] = asterisk.write_wav(f"load-{i:03d}", speech[i].tobytes())
            recs[i] = asterisk.recording_path(f"load-{i:03d}.wav")

        result.loadavg_before = loadavg()
        pids = {"asterisk": asterisk.pid, "bridge": bridge.pid, "load generator": os.getpid()}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        busy0, total0 = machine_jiffies()
        t0 = time.monotonic()

        responses: dict[str, int] = {}
        for i in range(calls):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            resp = await ami.action(
                "Originate", timeout=10,
                Channel="Local/caller@voxbridge-load", Context="voxbridge-ai", Exten="ai", Priority="1",
                Timeout="15000", CallerID=f'"Load {i}" <{7000 + i}>', Async="true",
                Variable=[f"PLAY_FILE={plays[i]}", f"REC_FILE={recs[i]}", f"AS_UUID={uuid.uuid4()}",
                          f"AS_VARS=load_call={i}"],
            )
            if resp.get("Response") == "Success":
                responses[str(resp["ActionID"])] = i
                result.originated += 1
            else:
                result.problems.append(f"call {i}: Originate refused: {resp.get('Message')}")

        delay = t0 + burst_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sessions = [s for s in sim.sessions if s.accepted and not s.closed.is_set()]
        result.sessions_at_burst = len(sessions)
        burst = tone(BURST_HZ, burst_ms, RATE)
        sent = await asyncio.gather(*(s.send_audio(burst, chunk_ms=200) for s in sessions), return_exceptions=True)
        for s, r in zip(sessions, sent, strict=True):
            if isinstance(r, BaseException):
                result.problems.append(f"gateway session {s.index}: burst not sent: {r!r}")

        # Every caller hangs up at the end of its WAV; MixMonitor then closes its recording.
        stems = {recs[i].rsplit(".", 1)[0]: i for i in range(calls)}
        done: set[int] = set()
        deadline = t0 + end_at + 15 + calls / 20
        while len(done) < calls and time.monotonic() < deadline:
            for e in ami.events:
                if e.get("Event") == "TestEvent" and e.get("State") == "MIXMONITOR_END" and e.get("File") in stems:
                    done.add(stems[e["File"]])
            await asyncio.sleep(0.2)
        result.duration_s = round(time.monotonic() - t0, 1)
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        result.bridge_playout = await bridge_playout_metrics(api_port)
        busy1, total1 = machine_jiffies()
        result.loadavg_after = loadavg()
        result.cpu_s = {k: round(cpu1[k] - cpu0[k], 2) for k in pids}
        # CPU per call: ms of CPU per second of one call (call-seconds = the WAVs' lengths).
        call_seconds = sum(len(v) for v in speech.values()) / RATE
        result.cpu_per_call_ms_per_s = {k: round(v * 1000 / call_seconds, 3) for k, v in result.cpu_s.items()}
        result.machine_busy_pct = round(100 * (busy1 - busy0) / max(1, total1 - total0), 1)
        result.answered = sum(
            1 for e in ami.events
            if e.get("Event") == "OriginateResponse" and e.get("ActionID") in responses and e.get("Reason") == "4"
        )
        if len(done) < calls:
            result.problems.append(f"{calls - len(done)} recordings not closed within the deadline")

        # Let the gateway sessions see their hangups (bounded), then analyse.
        deadline = time.monotonic() + 10
        while any(not s.closed.is_set() for s in sim.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if any(not s.closed.is_set() for s in sim.sessions):
            result.problems.append("gateway sessions still open 10 s after the last recording closed")
    except BaseException:
        asterisk.cleanup()
        raise
    finally:
        if ami is not None:
            await ami.close()
        if bridge is not None:
            await bridge.stop()
        await sim.stop()
        await asyncio.to_thread(asterisk.stop)

    by_call: dict[int, SimSession] = {}
    for s in sim.sessions:
        prompt = str((s.config or {}).get("system_prompt", ""))
        if prompt.startswith("load call ") and prompt[10:].isdigit():
            by_call[int(prompt[10:])] = s
        elif s.accepted:
            result.problems.append(f"gateway session {s.index}: prompt {prompt!r} names no call")
    result.gateway_sessions = len(sim.sessions)

    lost: list[float] = []
    for i in range(calls):
        s = by_call.get(i)
        g = gateway_heard(bytes(s.audio), speech[i]) if s is not None else GatewayHeard()
        path = asterisk.host_path(recs[i])
        c = CallerHeard()
        if path.exists():
            try:
                with wave.open(str(path), "rb") as w:
                    c = caller_heard(w.readframes(w.getnframes()), burst_ms)
            except (wave.Error, EOFError) as exc:
                result.problems.append(f"call {i}: recording unreadable: {exc}")
        result.callers_heard_burst_whole += c.whole
        result.callers_heard_burst_without_hole += c.whole and not c.hole_ms
        result.burst_hole_ms_max = max(result.burst_hole_ms_max, c.hole_ms)
        result.gateways_heard_caller_whole += g.whole
        if g.lost_ms is not None:
            lost.append(g.lost_ms)
        if g.lost_ms is None or g.lost_ms > START_TOLERANCE_MS:
            result.gateways_lost_start += 1
        result.per_call.append({"call": i, "gateway": asdict(g), "caller": asdict(c)})
    result.lost_ms_max = round(max(lost), 1) if lost else None
    result.lost_ms_p99 = _pct(lost, 99)
    result.lost_ms_p50 = _pct(lost, 50)
    await asyncio.to_thread(asterisk.cleanup)
    return result


# ============================================================================ sweep and report


def table(results: list[StepResult]) -> str:
    head = (f"{'calls':>5} {'burst whole':>11} {'no hole':>7} {'hole max':>8} {'late ticks':>10} {'caller whole':>12} "
            f"{'lost>' + str(START_TOLERANCE_MS) + 'ms':>10} {'lost max/p99/p50 ms':>20} {'CPU s ast/bridge/gen':>21} "
            f"{'busy %':>6} {'load':>9}")
    lines = [head]
    for r in results:
        lost = "/".join("-" if v is None else f"{v:g}" for v in (r.lost_ms_max, r.lost_ms_p99, r.lost_ms_p50))
        cpu = "/".join(f"{r.cpu_s.get(k, float('nan')):.1f}" for k in ("asterisk", "bridge", "load generator"))
        late = r.bridge_playout.get("late_ticks", float("nan"))
        lines.append(f"{r.calls:>5} {r.callers_heard_burst_whole:>5}/{r.calls:<5} "
                     f"{r.callers_heard_burst_without_hole:>7} {r.burst_hole_ms_max:>6.0f}ms {late:>10.0f} "
                     f"{r.gateways_heard_caller_whole:>6}/"
                     f"{r.calls:<5} {r.gateways_lost_start:>10} {lost:>20} {cpu:>21} {r.machine_busy_pct:>6.1f} "
                     f"{r.loadavg_before:>4.2f}>{r.loadavg_after:<4.2f}")
    return "\n".join(lines)


def step_seconds(calls: int, rate: float, settle_s: float, burst_ms: int, tail_s: float) -> float:
    """An upper bound on one step's wall time (start-up, the calls, the wait for recordings)."""
    return 15 + (calls - 1) / rate + settle_s + burst_ms / 1000 + tail_s + 15 + calls / 20 + 10


async def wait_quiet(max_load: float, max_wait: float) -> float:
    """Wait (bounded) until the 1-minute load average is below ``max_load``; return it."""
    deadline = time.monotonic() + max_wait
    while (load := loadavg()) >= max_load and time.monotonic() < deadline:
        await asyncio.sleep(5)
    return load


async def sweep(steps: list[int], out: Path, *, rate: float, settle_s: float, burst_ms: int, tail_s: float,
                keep_going: bool, max_load: float, quiet_wait: float) -> list[StepResult]:
    root = sandbox_root()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # Asterisk and the bridge inherit it
    results: list[StepResult] = []
    for n in steps:
        load = await wait_quiet(max_load, quiet_wait)
        bound = step_seconds(n, rate, settle_s, burst_ms, tail_s)
        print(f"-- {n} calls (load average {load:.2f}; at most {bound:.0f} s)", flush=True)
        r = await run_step(root, out / f"step-{n}", n, rate=rate, settle_s=settle_s, burst_ms=burst_ms, tail_s=tail_s)
        results.append(r)
        print(table([r]).splitlines()[1], flush=True)
        for p in r.problems[:10]:
            print(f"   ! {p}", flush=True)
        if not r.held and not keep_going:
            break
    return results


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.e2e.asterisk_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", default="20,50,100", help=f"comma-separated concurrent-call steps (each <= {MAX_CALLS})")
    p.add_argument("--rate", type=float, default=10.0, help="calls originated per second (default 10)")
    p.add_argument("--settle", type=float, default=4.0, help="s from the last originate to the burst (default 4)")
    p.add_argument("--burst-ms", type=int, default=2000)
    p.add_argument("--tail", type=float, default=4.0, help="s the callers talk on after the burst (default 4)")
    p.add_argument("--keep-going", action="store_true", help="run every step even after one fails")
    p.add_argument("--max-load", type=float, default=0.7, help="wait for a 1-min load average below this")
    p.add_argument("--quiet-wait", type=float, default=300, help="wait at most this long for it (s)")
    p.add_argument("--out", default="asterisk-load-results")
    args = p.parse_args(argv)
    steps = [int(x) for x in args.calls.split(",") if x.strip()]
    if not steps or any(not 1 <= n <= MAX_CALLS for n in steps):
        p.error(f"--calls: each step must be 1..{MAX_CALLS}, got {args.calls!r}")
    if os.geteuid() != 0:
        p.error("needs root: the Asterisk sandbox is a chroot (tests/e2e/sandbox.sh)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bound = sum(step_seconds(n, args.rate, args.settle, args.burst_ms, args.tail) for n in steps)
    print(f"{len(steps)} steps, at most {bound:.0f} s plus waits for a quiet machine "
          f"(load < {args.max_load}, <= {args.quiet_wait:g} s each)", flush=True)
    results = asyncio.run(sweep(steps, out, rate=args.rate, settle_s=args.settle, burst_ms=args.burst_ms,
                                tail_s=args.tail, keep_going=args.keep_going, max_load=args.max_load,
                                quiet_wait=args.quiet_wait))
    held = [r.calls for r in results if r.held]
    report = {"machine": machine(), "settings": vars(args), "largest_held": max(held) if held else None,
              "steps": [{**asdict(r), "held": r.held} for r in results]}
    (out / "asterisk-load.json").write_text(json.dumps(report, indent=1))
    text = table(results) + f"\nlargest N that held: {report['largest_held']}\n"
    (out / "asterisk-load.txt").write_text(text)
    print(text + f"(details: {out / 'asterisk-load.json'})")
    return 0 if results and all(r.held for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
