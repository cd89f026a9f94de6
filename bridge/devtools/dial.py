"""A test caller that behaves like Asterisk on an AudioSocket connection.

``voxbridge dial`` (and the test suite, and the load benchmark) place calls into the bridge
without Asterisk. :class:`AudioSocketCaller` does what Asterisk's AudioSocket() application
does on the wire:

* connects over plain TCP with TCP_NODELAY and a 2 s connect timeout;
* sends the 0x01 UUID frame first, once;
* then sends caller audio continuously, one 20 ms frame per 20 ms on an absolute monotonic
  schedule, silence when there is nothing to say (Asterisk never stops sending), header and
  payload in one write;
* sends a 0x03 frame per DTMF digit;
* hangs up by closing TCP (Asterisk never sends 0x00);
* on a 0x00 from the bridge, a 0xFF, a UUID or DTMF frame (fatal in Asterisk) or malformed
  bytes, the call ends and the caller closes the socket.

Everything the bridge sends is decoded and recorded: audio payload, per-frame arrival time,
and how the call ended. Asterisk's 2 s inactivity rule is deliberately not emulated.

Pacing is driven by a :class:`Ticker`: one 20 ms loop can serve hundreds of callers in one
process (pass the same ticker to each); without one, each caller makes its own. Speech is
framed when it is queued (:meth:`AudioSocketCaller.say`), so a tick writes a ready-made bytes
object and allocates nothing for silence.

The wire format comes from :mod:`bridge.audiosocket`; this module only adds I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import math
import socket
import sys
import time
import uuid as _uuid
import wave
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from bridge.audiosocket import (
    DTMF_DIGITS,
    FrameDecoder,
    Kind,
    ProtocolError,
    audio_kind_for_rate,
    encode_audio,
    encode_dtmf,
    encode_uuid,
    frame_bytes,
)

__all__ = [
    "FRAME_MS",
    "Ticker",
    "AudioSocketCaller",
    "read_wav",
    "write_wav",
    "tone",
    "analyse",
    "pacing_stats",
    "summarize",
    "parse_target",
    "parse_dtmf_schedule",
    "default_utterance",
    "add_arguments",
    "run_dial",
]

log = logging.getLogger(__name__)

FRAME_MS = 20
FRAME_S = FRAME_MS / 1000
SILENCE_DBFS = -50.0  # a 20 ms frame quieter than this counts as silence
DBFS_FLOOR = -120.0  # what analyse() reports for digital silence instead of -inf
AUDIOSOCKET_RATES = (8000, 12000, 16000, 24000, 32000, 44100, 48000, 96000, 192000)

Clock = Callable[[], float]


# --------------------------------------------------------------------------- pacing clock


class Ticker:
    """One absolute-monotonic 20 ms clock that calls every attached callback once per tick.

    Tick *n* is due at ``start + n * interval``; lateness never accumulates. If the loop was
    stalled for one or more whole intervals the missed ticks are skipped (counted in
    :attr:`skipped`), never replayed in a burst: like a telephony timer, late is better than
    faster than real time.

    The task starts when the first callback is attached and stops when the last one is
    detached, so a ticker shared by many callers needs no management; :meth:`aclose` stops it
    for certain. Callbacks are plain synchronous functions (no task per caller); one that
    raises is logged and detached. ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        interval: float = FRAME_S,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._clock = clock
        self._sleep = sleep
        self._callbacks: dict[Callable[[], None], None] = {}
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0  # ticks delivered
        self.skipped = 0  # ticks dropped because the loop was late by a whole interval or more
        self.max_late = 0.0  # worst lateness of a delivered tick, seconds

    def __len__(self) -> int:
        return len(self._callbacks)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def attach(self, callback: Callable[[], None]) -> None:
        self._callbacks[callback] = None
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="voxbridge-dial-ticker")

    def detach(self, callback: Callable[[], None]) -> None:
        self._callbacks.pop(callback, None)
        if not self._callbacks and self._task is not None:
            self._task.cancel()
            self._task = None

    async def aclose(self) -> None:
        self._callbacks.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        clock, interval, callbacks = self._clock, self.interval, self._callbacks
        start = clock()
        n = 0
        while callbacks:
            n += 1
            due = start + n * interval
            delay = due - clock()
            if delay > 0:
                await self._sleep(delay)
            late = clock() - due
            if late >= interval:
                missed = int(late // interval)
                n += missed
                self.skipped += missed
                late -= missed * interval
            if late > self.max_late:
                self.max_late = late
            self.ticks += 1
            for callback in tuple(callbacks):
                try:
                    callback()
                except Exception:
                    log.exception("ticker callback %r failed; detaching it", callback)
                    callbacks.pop(callback, None)


# --------------------------------------------------------------------------- the caller


class _CallerProtocol(asyncio.Protocol):
    __slots__ = ("_caller",)

    def __init__(self, caller: AudioSocketCaller) -> None:
        self._caller = caller

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._caller._connection_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._caller._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._caller._connection_lost(exc)


class AudioSocketCaller:
    """An asyncio AudioSocket client that acts like Asterisk. See the module docstring.

    ``ticker``: a shared :class:`Ticker` (or anything with ``attach``/``detach``) to pace many
    callers from one loop; by default the caller owns a private one.
    ``record_received`` / ``record_sent``: keep the audio bytes (turn off for long load runs;
    the byte counters are always kept). ``max_frames``: ``None`` keeps every
    ``(t, kind, nbytes)`` arrival record, ``N`` keeps the last N, ``0`` keeps none.
    ``max_write_buffer``: if the bridge stops reading and this many bytes are queued in the
    kernel-side transport buffer, ticks are skipped (counted in :attr:`send_overruns`)
    instead of growing memory.

    Attributes after/while a call: ``uuid``, ``sample_rate``, ``received_audio``
    (bytearray), ``received_frames``, ``received_audio_bytes``, ``received_audio_frames``,
    ``first_audio_at``, ``sent_audio`` (bytearray, silence included), ``sent_frames``,
    ``sent_speech_frames``, ``sent_dtmf`` [(t, digit)], ``connected_at``, ``ended``
    (asyncio.Event), ``end_reason``, ``ended_at``, ``error_code``. Times are ``clock()`` values.

    ``end_reason`` is one of ``"hangup-frame"`` (bridge sent 0x00), ``"closed"`` (bridge
    closed TCP), ``"error-frame"`` (bridge sent 0xFF), ``"protocol-error: <why>"``, or
    ``"caller-hangup"`` (we hung up first), ``"not-connected"`` (closed before a connection).
    """

    def __init__(
        self,
        *,
        ticker: Ticker | None = None,
        clock: Clock = time.monotonic,
        record_received: bool = True,
        record_sent: bool = True,
        max_frames: int | None = None,
        max_write_buffer: int = 64 * 1024,
    ) -> None:
        self._owns_ticker = ticker is None
        self._ticker = ticker if ticker is not None else Ticker(clock=clock)
        self._clock = clock
        self._record_received = record_received
        self._record_sent = record_sent
        self._max_write_buffer = max_write_buffer
        self._tick = self._on_tick  # one bound method, so attach/detach see the same key

        self.uuid: _uuid.UUID | None = None
        self.sample_rate = 8000
        self.kind = Kind.SLIN_8K
        self.frame_size = frame_bytes(8000)
        self.host: str | None = None
        self.port: int | None = None

        self.received_audio = bytearray()
        self.received_frames: list[tuple[float, Kind, int]] | collections.deque[tuple[float, Kind, int]]
        if max_frames is None:
            self.received_frames = []
        else:
            self.received_frames = collections.deque(maxlen=max_frames)
        self._log_frames = max_frames != 0
        self.received_audio_bytes = 0
        self.received_audio_frames = 0
        self.foreign_rate_frames = 0  # audio frames of a kind other than the call's rate
        self.first_audio_at: float | None = None

        self.sent_audio = bytearray()
        self.sent_frames = 0
        self.sent_speech_frames = 0
        self.sent_dtmf: list[tuple[float, str]] = []
        self.send_overruns = 0

        self.connected_at: float | None = None
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.ended_at: float | None = None
        self.error_code: int | None = None  # payload byte of a 0xFF frame, if any
        self.close_error: str | None = None  # the OS error a closed connection reported, if any

        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self._closed = asyncio.Event()
        self._hung_up = False
        self._silence = b""
        self._silence_pcm = b""
        self._header = b""
        self._speech: collections.deque[bytes] = collections.deque()
        self._tail = bytearray()
        self._spoken = asyncio.Event()
        self._spoken.set()
        self._audio_waiters: list[tuple[int, asyncio.Future[bool]]] = []

    # ------------------------------------------------------------------ public API

    async def connect(
        self,
        host: str,
        port: int,
        call_uuid: _uuid.UUID | str | None = None,
        sample_rate: int = 8000,
        *,
        timeout: float = 2.0,
    ) -> None:
        """Connect like Asterisk: TCP_NODELAY, UUID frame first, then paced audio.

        Raises ConnectionRefusedError / OSError / TimeoutError (after ``timeout``, Asterisk's
        is 2 s) when the bridge cannot be reached, ValueError for a rate AudioSocket lacks.
        """
        if self._transport is not None or self._closed.is_set():
            raise RuntimeError("AudioSocketCaller is single-use: connect() was already called")
        self.kind = audio_kind_for_rate(sample_rate)
        self.sample_rate = sample_rate
        self.frame_size = frame_bytes(sample_rate, FRAME_MS)
        self._silence_pcm = bytes(self.frame_size)
        self._silence = encode_audio(self._silence_pcm, sample_rate)
        self._header = self._silence[:3]
        if call_uuid is None:
            self.uuid = _uuid.uuid4()
        elif isinstance(call_uuid, _uuid.UUID):
            self.uuid = call_uuid
        else:
            self.uuid = _uuid.UUID(call_uuid)
        self.host, self.port = host, port
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: _CallerProtocol(self), host, port)

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._closed.is_set()

    def say(self, pcm: bytes | bytearray | memoryview) -> float:
        """Queue s16le PCM (at the call's rate) to be sent after what is already queued.

        Returns the seconds of speech now queued. A partial last frame waits for more speech
        and is padded with silence if none comes before its tick.
        """
        if self.uuid is None:
            raise RuntimeError("connect() before say(): the frame size depends on the call's rate")
        data = bytes(pcm)
        if len(data) % 2:
            raise ValueError(f"PCM must be whole s16 samples, got {len(data)} bytes")
        if self._tail:
            data = bytes(self._tail) + data
            self._tail.clear()
        fs, header, queue = self.frame_size, self._header, self._speech
        full = len(data) - len(data) % fs
        for i in range(0, full, fs):
            queue.append(header + data[i : i + fs])
        self._tail += data[full:]
        if queue or self._tail:
            self._spoken.clear()
        return self.queued_seconds

    @property
    def queued_seconds(self) -> float:
        return (len(self._speech) * self.frame_size + len(self._tail)) / 2 / self.sample_rate

    def stop_saying(self) -> None:
        """Drop queued speech (the caller falls silent at the next tick)."""
        self._speech.clear()
        self._tail.clear()
        self._spoken.set()

    async def wait_spoken(self, timeout: float | None = None) -> bool:
        """Wait until all queued speech has been sent. False on timeout or if the call ended."""
        return await self._wait_event(self._spoken, timeout) and not self._speech and not self._tail

    def send_dtmf(self, digit: str) -> bool:
        """Send one DTMF digit (0x03), between audio frames. False if the call is over.

        ValueError for anything but one of ``0-9 * # A-D``.
        """
        if len(digit) != 1 or digit.encode("ascii", "replace")[0] not in DTMF_DIGITS:
            raise ValueError(f"invalid DTMF digit {digit!r} (use 0-9, *, #, A-D)")
        if not self._can_send():
            return False
        assert self._transport is not None
        self._transport.write(encode_dtmf(digit))
        self.sent_dtmf.append((self._clock(), digit))
        return True

    def hangup(self) -> None:
        """Hang up the way Asterisk does: close TCP, no 0x00 frame. Idempotent."""
        if self._hung_up:
            return
        self._hung_up = True
        self._ticker.detach(self._tick)
        if self._transport is None:
            self._finish("not-connected")
            return
        self._finish("caller-hangup")
        self._transport.close()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Hang up if needed, wait for the socket to close (abort after ``timeout``), stop timers."""
        self.hangup()
        if (self._transport is not None and not self._closed.is_set()
                and not await self._wait_event(self._closed, timeout)):
            self._transport.abort()
            await self._wait_event(self._closed, 1.0)
        if self._owns_ticker:
            await self._ticker.aclose()

    async def __aenter__(self) -> AudioSocketCaller:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def wait_audio(self, min_bytes: int, timeout: float | None = None) -> bool:
        """Wait until at least ``min_bytes`` of audio came from the bridge.

        False if ``timeout`` passed or the call ended first.
        """
        if self.received_audio_bytes >= min_bytes:
            return True
        if self.ended.is_set():
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiter = (min_bytes, fut)
        self._audio_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return False
        finally:
            if waiter in self._audio_waiters:
                self._audio_waiters.remove(waiter)

    async def wait_ended(self, timeout: float | None = None) -> str | None:
        """Wait for the call to end; its ``end_reason``, or None if ``timeout`` passed first."""
        if await self._wait_event(self.ended, timeout):
            return self.end_reason
        return None

    @property
    def received_seconds(self) -> float:
        return self.received_audio_bytes / 2 / self.sample_rate

    @property
    def sent_seconds(self) -> float:
        return self.sent_frames * FRAME_S

    @property
    def first_audio_latency(self) -> float | None:
        """Seconds from connect to the first audio frame from the bridge."""
        if self.first_audio_at is None or self.connected_at is None:
            return None
        return self.first_audio_at - self.connected_at

    # ------------------------------------------------------------------ internals

    @staticmethod
    async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
        if event.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True

    def _can_send(self) -> bool:
        return self._transport is not None and not self._hung_up and not self.ended.is_set()

    def _finish(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.end_reason = reason
        self.ended_at = self._clock()
        self.ended.set()
        self._spoken.set()
        self._ticker.detach(self._tick)
        for min_bytes, fut in self._audio_waiters:
            if not fut.done():
                fut.set_result(self.received_audio_bytes >= min_bytes)

    def _end_by_bridge(self, reason: str) -> None:
        """The bridge ended the call (0x00, 0xFF, bad bytes): Asterisk closes the socket."""
        self._finish(reason)
        self._hung_up = True
        if self._transport is not None:
            self._transport.close()

    def _connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP (tests may use a socketpair); nothing to do
                pass
        self.connected_at = self._clock()
        assert self.uuid is not None
        transport.write(encode_uuid(self.uuid))  # first, before any audio, like Asterisk
        self._ticker.attach(self._tick)

    def _on_tick(self) -> None:
        transport = self._transport
        if transport is None or self._hung_up or self.ended.is_set():
            return
        if transport.get_write_buffer_size() > self._max_write_buffer:
            self.send_overruns += 1
            return
        queue = self._speech
        if queue:
            frame = queue.popleft()
        elif self._tail:
            frame = self._header + bytes(self._tail) + bytes(self.frame_size - len(self._tail))
            self._tail.clear()
        else:
            frame = self._silence
        transport.write(frame)  # header + payload in one write
        self.sent_frames += 1
        if frame is not self._silence:
            self.sent_speech_frames += 1
            if not queue and not self._tail:
                self._spoken.set()
            if self._record_sent:
                self.sent_audio += memoryview(frame)[3:]
        elif self._record_sent:
            self.sent_audio += self._silence_pcm

    def _data_received(self, data: bytes) -> None:
        if self.ended.is_set():
            return
        now = self._clock()
        decoder = self._decoder
        decoder.feed(data)
        got_audio = False
        try:
            for frame in decoder:
                kind = frame.kind
                if 0x10 <= kind <= 0x18:
                    n = len(frame.payload)
                    if self.first_audio_at is None:
                        self.first_audio_at = now
                    self.received_audio_bytes += n
                    self.received_audio_frames += 1
                    if kind is not self.kind:
                        self.foreign_rate_frames += 1
                    if self._record_received:
                        self.received_audio += frame.payload
                    if self._log_frames:
                        self.received_frames.append((now, kind, n))
                    got_audio = True
                elif kind is Kind.HANGUP:
                    self._end_by_bridge("hangup-frame")
                    break
                elif kind is Kind.ERROR:
                    self.error_code = frame.payload[0] if frame.payload else None
                    self._end_by_bridge("error-frame")
                    break
                else:  # UUID or DTMF towards Asterisk: it tears the call down
                    self._end_by_bridge(
                        f"protocol-error: bridge sent a {kind.name} frame (0x{kind:02x}), "
                        "which Asterisk treats as fatal"
                    )
                    break
        except ProtocolError as exc:
            self._end_by_bridge(f"protocol-error: {exc}")
        if got_audio and self._audio_waiters:
            have = self.received_audio_bytes
            for min_bytes, fut in self._audio_waiters:
                if have >= min_bytes and not fut.done():
                    fut.set_result(True)

    def _connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.close_error = str(exc) or type(exc).__name__
        self._hung_up = True
        self._finish("closed")
        self._closed.set()


# --------------------------------------------------------------------------- audio helpers


def read_wav(path: str | Any) -> tuple[bytes, int]:
    """Read a mono signed-16-bit PCM WAV: ``(pcm s16le bytes, sample rate)``.

    ValueError (naming the file and the problem) for anything else.
    """
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            if w.getcomptype() != "NONE":
                raise ValueError(f"{path}: compressed WAV ({w.getcompname()}); only PCM is supported")
            if channels != 1 or width != 2:
                raise ValueError(
                    f"{path}: {channels} channel(s), {8 * width}-bit; only mono 16-bit PCM WAV is "
                    "supported (convert with: sox IN.wav -c 1 -b 16 OUT.wav)"
                )
            pcm = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file this reader supports ({exc})") from None
    return pcm, rate


def write_wav(path: str | Any, pcm: bytes | bytearray | memoryview, rate: int) -> None:
    """Write s16le mono PCM as a WAV file."""
    data = bytes(pcm)
    if len(data) % 2:
        raise ValueError(f"PCM must be whole s16 samples, got {len(data)} bytes")
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data)


def tone(freq: float, ms: float, rate: int = 8000, amplitude: float = 0.3) -> bytes:
    """A sine of ``freq`` Hz lasting ``ms`` milliseconds, s16le, peak ``amplitude`` of full scale."""
    if not 0 <= amplitude <= 1:
        raise ValueError(f"amplitude must be within 0..1, got {amplitude}")
    n = round(rate * ms / 1000)
    t = np.arange(n) / rate
    samples = np.sin(2 * np.pi * freq * t) * (amplitude * 32767)
    return np.round(samples).astype("<i2").tobytes()


def default_utterance(rate: int = 8000) -> bytes:
    """1.5 s of "speech" (three 500 ms tones) - something an echoing gateway sends back."""
    return b"".join(tone(f, 500, rate) for f in (440.0, 554.37, 659.25))


def _dbfs(rms: float) -> float:
    return max(DBFS_FLOOR, 20 * math.log10(rms / 32768)) if rms > 0 else DBFS_FLOOR


def analyse(pcm: bytes | bytearray | memoryview, rate: int, *, silence_dbfs: float = SILENCE_DBFS) -> dict:
    """Summary of s16le mono PCM.

    ``duration_s``; ``rms_dbfs`` (whole signal, floored at -120); ``peak_dbfs``;
    ``non_silent_s`` (total length of 20 ms frames louder than ``silence_dbfs``);
    ``dominant_hz`` (FFT peak, None for silence).
    """
    x = np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float64)
    n = x.size
    out: dict[str, Any] = {
        "rate": rate,
        "samples": int(n),
        "duration_s": n / rate,
        "rms_dbfs": DBFS_FLOOR,
        "peak_dbfs": DBFS_FLOOR,
        "non_silent_s": 0.0,
        "dominant_hz": None,
    }
    if n == 0:
        return out
    out["rms_dbfs"] = _dbfs(float(np.sqrt(np.mean(x * x))))
    out["peak_dbfs"] = _dbfs(float(np.max(np.abs(x))))
    fs = rate * FRAME_MS // 1000
    full = n - n % fs
    loud = 0
    if full:
        frame_rms = np.sqrt(np.mean(x[:full].reshape(-1, fs) ** 2, axis=1))
        threshold = 32768 * 10 ** (silence_dbfs / 20)
        loud = int(np.count_nonzero(frame_rms > threshold)) * fs
    if n > full:
        tail = x[full:]
        if _dbfs(float(np.sqrt(np.mean(tail * tail)))) > silence_dbfs:
            loud += tail.size
    out["non_silent_s"] = loud / rate
    if np.any(x):
        spectrum = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(n)))
        spectrum[0] = 0.0
        peak = int(np.argmax(spectrum))
        if spectrum[peak] > 0:
            out["dominant_hz"] = peak * rate / n
    return out


def pacing_stats(frames: Iterable[tuple[float, Kind | int, int]]) -> dict:
    """How evenly audio frames arrived: ``(t, kind, nbytes)`` records in arrival order.

    ``jitter_ms`` {p50, p99, max}: |inter-arrival gap - duration of the previous frame|.
    ``max_gap_ms``: the longest wait between two frames. ``max_lead_ms``: how far the
    received audio ran ahead of real time since the first frame (a bridge that bursts has a
    large lead; Asterisk would queue or drop that audio). Non-audio records are ignored.
    """
    rows = [(t, n / 2 / Kind(k).sample_rate) for t, k, n in frames if 0x10 <= k <= 0x18]
    out: dict[str, Any] = {"frames": len(rows), "jitter_ms": None, "max_gap_ms": None, "max_lead_ms": None}
    if len(rows) < 2:
        return out
    t = np.array([r[0] for r in rows])
    dur = np.array([r[1] for r in rows])
    gaps = np.diff(t)
    jitter = np.abs(gaps - dur[:-1]) * 1000
    lead = (np.cumsum(dur)[:-1] - (t[1:] - t[0])) * 1000
    out["jitter_ms"] = {
        "p50": float(np.percentile(jitter, 50)),
        "p99": float(np.percentile(jitter, 99)),
        "max": float(jitter.max()),
    }
    out["max_gap_ms"] = float(gaps.max() * 1000)
    out["max_lead_ms"] = max(0.0, float(lead.max()))
    return out


def summarize(caller: AudioSocketCaller) -> dict:
    """A JSON-able summary of a finished (or running) call, as ``voxbridge dial`` prints it."""
    rate = caller.sample_rate
    received = analyse(caller.received_audio, rate) if caller.received_audio else None
    end_after = None
    if caller.ended_at is not None and caller.connected_at is not None:
        end_after = caller.ended_at - caller.connected_at
    return {
        "target": f"{caller.host}:{caller.port}",
        "connected": caller.connected_at is not None,
        "uuid": str(caller.uuid) if caller.uuid else None,
        "rate": rate,
        "sent_s": caller.sent_seconds,
        "sent_speech_s": caller.sent_speech_frames * FRAME_S,
        "sent_dtmf": [d for _, d in caller.sent_dtmf],
        "send_overruns": caller.send_overruns,
        "received_s": caller.received_seconds,
        "received_frames": caller.received_audio_frames,
        "received_non_silent_s": received["non_silent_s"] if received else 0.0,
        "received_dominant_hz": received["dominant_hz"] if received else None,
        "received_rms_dbfs": received["rms_dbfs"] if received else None,
        "foreign_rate_frames": caller.foreign_rate_frames,
        "first_audio_ms": None if caller.first_audio_latency is None else caller.first_audio_latency * 1000,
        "pacing": pacing_stats(caller.received_frames),
        "end_reason": caller.end_reason,
        "ended_after_s": end_after,
        "error_code": caller.error_code,
    }


# --------------------------------------------------------------------------- CLI


def parse_target(text: str, default_port: int = 9000) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``[v6addr]:PORT`` or ``:PORT`` -> (host, port)."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad address {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p, text)
    host = host or "127.0.0.1"
    return host, port


def _port(p: str, text: str) -> int:
    try:
        port = int(p)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return port


def parse_dtmf_schedule(text: str | None) -> list[tuple[str, float]]:
    """``"1@2.5,0@4"`` -> ``[("1", 2.5), ("0", 4.0)]`` (digit, seconds after connect), sorted."""
    if not text:
        return []
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        digit, sep, at = item.partition("@")
        digit = digit.strip().upper()
        if not sep or len(digit) != 1 or digit.encode()[0] not in DTMF_DIGITS:
            raise ValueError(f"bad DTMF item {item!r}: use DIGIT@SECONDS with a digit in 0-9*#A-D")
        try:
            seconds = float(at)
        except ValueError:
            raise ValueError(f"bad DTMF time in {item!r}") from None
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"bad DTMF time in {item!r}")
        out.append((digit, seconds))
    return sorted(out, key=lambda x: x[1])


def _uuid_arg(text: str) -> _uuid.UUID:
    try:
        return _uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _dtmf_arg(text: str) -> list[tuple[str, float]]:
    try:
        return parse_dtmf_schedule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _target_arg(text: str) -> tuple[str, int]:
    try:
        return parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``voxbridge dial``."""
    parser.add_argument(
        "--to", type=_target_arg, default=("127.0.0.1", 9000), metavar="HOST:PORT",
        help="the bridge's AudioSocket address (default 127.0.0.1:9000)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wav", metavar="FILE", help="say this mono 16-bit WAV (resampled to --rate if needed)")
    source.add_argument("--tone", type=float, metavar="HZ", help="say a 1.5 s tone of this frequency")
    parser.add_argument(
        "--rate", type=int, default=8000, choices=AUDIOSOCKET_RATES, metavar="HZ",
        help="caller audio rate; picks the AudioSocket audio kind (default 8000 = 0x10, "
        "what the AudioSocket() app sends; 16000 = 0x12 as with Dial(...c(slin16)))",
    )
    parser.add_argument("--duration", type=float, default=8.0, metavar="S", help="hang up after S seconds (default 8)")
    parser.add_argument(
        "--dtmf", type=_dtmf_arg, default=[], metavar="D@S,...",
        help='DTMF digits to send, each at seconds after connect, e.g. "1@2.5,0@4"',
    )
    parser.add_argument("--record", metavar="OUT.wav", help="write what the bridge played to the caller")
    parser.add_argument("--uuid", type=_uuid_arg, metavar="UUID", help="call UUID (default: random)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors; the exit code tells")


def _resample(pcm: bytes, src: int, dst: int) -> bytes:
    import soxr

    x = np.frombuffer(pcm, dtype="<i2")
    y = soxr.resample(x, src, dst)
    return np.asarray(y).astype("<i2").tobytes()


def _fmt(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _print_summary(s: dict, out: Any) -> None:
    p = s["pacing"]
    j = p["jitter_ms"] or {}
    dom = s["received_dominant_hz"]
    print(f"connected     {s['target']}  uuid {s['uuid']}  ({s['rate']} Hz)", file=out)
    dtmf = f", DTMF {''.join(s['sent_dtmf'])}" if s["sent_dtmf"] else ""
    print(f"sent          {s['sent_s']:.2f} s ({s['sent_speech_s']:.2f} s speech){dtmf}", file=out)
    print(
        f"received      {s['received_s']:.2f} s audio, {s['received_non_silent_s']:.2f} s non-silent"
        + (f", dominant {dom:.0f} Hz" if dom else ""),
        file=out,
    )
    if s["foreign_rate_frames"]:
        print(f"              {s['foreign_rate_frames']} frames at a rate other than {s['rate']} Hz", file=out)
    print(f"first audio   {_fmt(s['first_audio_ms'], '.0f', ' ms')} after connect", file=out)
    print(
        f"jitter        p50 {_fmt(j.get('p50'), '.1f')}  p99 {_fmt(j.get('p99'), '.1f')}  "
        f"max {_fmt(j.get('max'), '.1f')} ms   (max gap {_fmt(p['max_gap_ms'], '.0f')} ms, "
        f"max lead over real time {_fmt(p['max_lead_ms'], '.0f')} ms)",
        file=out,
    )
    ended = s["end_reason"] or "?"
    if s["error_code"] is not None:
        ended += f" (code {s['error_code']})"
    print(f"ended         {ended} after {_fmt(s['ended_after_s'], '.2f', ' s')}", file=out)


OK_END_REASONS = frozenset({"caller-hangup", "hangup-frame", "closed"})


async def run_dial(args: argparse.Namespace) -> int:
    """``voxbridge dial``: place one call, print a summary.

    Exit 0 if non-silent audio came back and the call ended cleanly, 1 otherwise, 2 if the
    bridge could not be reached.
    """
    out, err = sys.stdout, sys.stderr
    quiet = getattr(args, "quiet", False)
    host, port = args.to if isinstance(args.to, tuple) else parse_target(args.to)
    rate = args.rate
    dtmf = args.dtmf if isinstance(args.dtmf, list) else parse_dtmf_schedule(args.dtmf)
    try:
        if args.wav:
            pcm, wav_rate = read_wav(args.wav)
            if wav_rate != rate:
                pcm = _resample(pcm, wav_rate, rate)
        elif args.tone is not None:
            pcm = tone(args.tone, 1500, rate)
        else:
            pcm = default_utterance(rate)
    except (OSError, ValueError) as exc:
        print(f"voxbridge dial: {exc}", file=err)
        return 1

    caller = AudioSocketCaller()
    try:
        await caller.connect(host, port, call_uuid=args.uuid, sample_rate=rate)
    except ConnectionRefusedError:
        print(f"nothing listening on {host}:{port} — is `voxbridge serve` running?", file=err)
        await caller.aclose()
        return 2
    except (OSError, TimeoutError) as exc:
        print(f"could not connect to {host}:{port}: {exc or 'timed out'}", file=err)
        await caller.aclose()
        return 2

    loop = asyncio.get_running_loop()
    handles: list[asyncio.TimerHandle] = []
    try:
        if not quiet:
            print(f"calling {host}:{port} as {caller.uuid} ...", file=out, flush=True)
        caller.say(pcm)
        for digit, at in dtmf:
            handles.append(loop.call_later(at, caller.send_dtmf, digit))
        await caller.wait_ended(args.duration)
    finally:
        for h in handles:
            h.cancel()
        await caller.aclose()

    summary = summarize(caller)
    if args.record:
        try:
            write_wav(args.record, caller.received_audio, rate)
        except OSError as exc:
            print(f"voxbridge dial: cannot write {args.record}: {exc}", file=err)
            return 1
    if not quiet:
        _print_summary(summary, out)
        if args.record:
            print(f"recorded      {args.record}", file=out)
    ok = summary["received_non_silent_s"] > 0 and summary["end_reason"] in OK_END_REASONS
    if not ok and not quiet:
        why = "no audio came back" if not summary["received_non_silent_s"] else f"call ended: {summary['end_reason']}"
        print(f"FAILED: {why}", file=err)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m bridge.devtools.dial``), the same as ``voxbridge dial``."""
    parser = argparse.ArgumentParser(prog="voxbridge dial",
                                     description="Place a test call into the bridge over AudioSocket.")
    add_arguments(parser)
    return asyncio.run(run_dial(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
