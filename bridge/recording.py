"""Call recordings: each call of a ``record: true`` profile as a stereo WAV, caller left, AI right.

Built from the audio the bridge already has, so it works however the call came in (AudioSocket
from the dialplan, an API call, ``voxbridge dial``) and needs no AMI ``MixMonitor``:

* the caller's frames, as :meth:`CallRecorder.caller` from ``CallSession.on_caller_audio``;
* the frames the playout clock sends the caller (the AI's speech, silence between), as
  :meth:`CallRecorder.tick` from ``CallSession.on_tick``.

**Time alignment.** The playout clock is the recording's clock: every tick adds exactly one
stereo frame, its right channel the frame the caller was sent, its left the next frame's worth
(20 ms) of the caller's audio, kept as a byte stream (silence if less than a frame is waiting).
A byte stream because legs do not all send 20 ms: a 40 ms chunk is two ticks' worth, not one
frame with its second half cut off. Caller audio arriving in a burst waits, at most
``JITTER_FRAMES`` (beyond, the oldest is dropped and counted: a caller sending faster than real
time is not a telephone). A burst would otherwise leave a standing backlog, and every later
caller frame would be recorded that much late for the rest of the call; so when the backlog has
stayed above one frame for a whole ``DRIFT_WINDOW_FRAMES`` window, the oldest audio is dropped
down to the least the window needed (``caller_dropped`` counts it). Normal jitter (a 40 ms
chunk every other tick) brings the backlog to a frame or less within any window and loses
nothing. At the end the recording is padded or cut to the call's
duration as ``call.ended`` reports it, so a tick the loaded machine skipped does not shorten it:
the WAV is as long as the call, to the sample.

**The hot path stays cheap.** Per frame the session pays one list append (a reference to bytes it
already holds). Every ``FLUSH_FRAMES`` ticks the pending frames go to :class:`Recordings`' single
writer thread, which interleaves them (numpy) and appends them to the file; the WAV header is
written at the start and completed at the end (``wave``). Nothing touches the disk on the event
loop.

**Disk.** :class:`Recordings` owns the directory (``recordings.path``): recordings of calls that
ended more than ``store.retention_days`` ago are deleted (the history's retention), and the total,
recordings being written included, stays within ``recordings.max_total_mb``. Every chunk written
is checked against it: when it would not fit, the oldest finished recordings are deleted until
it does; when even that is not enough (the calls recording now fill the bound), the chunk is cut
to what fits and that call's recording stops there, its file completed as it is (a valid, shorter
WAV that its ``call.ended`` link still serves) and a warning logged. The recording just finished
is never the one deleted to make room, so ``call.ended`` never links to a file its own call
removed. The passes run on the writer thread (after each recording is finished, when the bridge
starts, and when a chunk needs room). The totals are reported in ``/v1/health`` (``recordings``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("voxbridge.recording")

#: Frames (20 ms ticks) held in memory before they are handed to the writer thread: 5 s.
FLUSH_FRAMES = 250
#: Caller frames that may wait for their tick (a burst from the network); beyond, oldest dropped.
JITTER_FRAMES = 10
#: Ticks over which a standing caller backlog is measured before it is dropped (200 ms).
DRIFT_WINDOW_FRAMES = 10
#: A recording's file name: the call's id, as the API names the call (path-safe characters only).
_SAFE_ID = re.compile(r"[0-9A-Za-z_.-]{1,128}")
#: How long ``GET /v1/calls/{id}/recording`` waits for a just-ended call's file to be completed.
FINISH_WAIT_S = 10.0
#: The bytes of a WAV file's header (``wave`` writes the canonical 44-byte RIFF header).
WAV_HEADER_BYTES = 44


def recording_name(call_id: str) -> str | None:
    """The file name of ``call_id``'s recording, or None if the id cannot be a file name."""
    if not _SAFE_ID.fullmatch(call_id) or call_id.startswith("."):
        return None
    return f"{call_id}.wav"


def interleave(left: bytes, right: bytes) -> bytes:
    """Two mono 16-bit PCM buffers of equal length as one stereo buffer (L R L R …)."""
    a = np.frombuffer(left, "<i2")
    b = np.frombuffer(right, "<i2")
    out = np.empty(a.size * 2, "<i2")
    out[0::2] = a
    out[1::2] = b
    return out.tobytes()


class CallRecorder:
    """One call's recording: frames in on the event loop, chunks out to the writer thread."""

    def __init__(self, owner: Recordings, call_id: str, path: Path, rate: int, pad_frames: int = 0) -> None:
        self.call_id = call_id
        self.path = path
        self.rate = rate
        self._owner = owner
        self._frame_bytes = rate // 50 * 2
        self._silence = bytes(self._frame_bytes)
        #: The caller's audio not yet recorded, as one byte stream (re-cut into frames per tick).
        self._caller = bytearray()
        #: The smallest backlog left after a tick in this drift window, and the ticks in it.
        self._backlog_min: int | None = None
        self._window_ticks = 0
        self._left: list[bytes] = []
        self._right: list[bytes] = []
        self._flushed = False
        self._closed = False  # no more frames written (ended, or stopped by a rate change)
        self._finished = False  # close() was called
        #: Frames written (ticks, plus the silence for the ticks before the recording opened).
        self.frames = 0
        #: Caller frames' worth of audio dropped: beyond JITTER_FRAMES, or a standing backlog.
        self.caller_dropped = 0
        self._writer: wave.Wave_write | None = None
        self._samples = 0  # stereo samples in the file (writer thread)
        #: Set (writer thread) when the disk bound stopped this recording: the file is complete.
        self.stopped_full = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pad(pad_frames)

    def _pad(self, frames: int) -> None:
        for _ in range(frames):
            self._left.append(self._silence)
            self._right.append(self._silence)
        self.frames += frames

    # -- the media path (event loop): appends only

    def caller(self, pcm: bytes) -> None:
        """Audio from the caller, any length (a 20 ms frame, a 40 ms chunk…): one append."""
        buf = self._caller
        buf += pcm
        excess = len(buf) - JITTER_FRAMES * self._frame_bytes
        if excess > 0:
            excess += excess & 1  # whole 16-bit samples
            del buf[:excess]
            self.caller_dropped += -(-excess // self._frame_bytes)

    def tick(self, frame: bytes) -> None:
        """The frame the caller was sent on this tick: one stereo frame is recorded."""
        n, buf = self._frame_bytes, self._caller
        self._right.append(frame)
        if len(buf) >= n:
            self._left.append(bytes(buf[:n]))
            del buf[:n]
        else:  # less than a frame waiting: it goes out with the next tick's
            self._left.append(self._silence)
        self._track_backlog(len(buf))
        self.frames += 1
        if len(self._right) >= FLUSH_FRAMES:
            self._flush()

    def _track_backlog(self, backlog: int) -> None:
        """Drop a standing backlog (see the module doc): the least left after any tick of a window
        is audio that was never needed to cover jitter, only to make the caller's channel late."""
        low = self._backlog_min
        self._backlog_min = backlog if low is None or backlog < low else low
        self._window_ticks += 1
        if self._window_ticks < DRIFT_WINDOW_FRAMES:
            return
        standing = self._backlog_min
        self._backlog_min, self._window_ticks = None, 0
        if standing > self._frame_bytes:
            standing -= standing & 1
            del self._caller[:standing]
            self.caller_dropped += standing // self._frame_bytes

    def rate_changed(self, rate: int) -> None:
        """The caller's leg changed rate (AudioSocket: told by its first audio frame). Before
        anything was written, the recording starts again at the new rate with as many frames
        of silence as it had (the call's first moments are silence anyway); later the new
        frames would not fit the file, so recording stops there and says so."""
        if rate == self.rate:
            return
        if self._flushed:
            self._owner.log_problem(self, f"the caller's rate changed to {rate} Hz mid-call: recording stopped")
            self._closed = True
            return
        frames = self.frames
        self.rate, self._frame_bytes = rate, rate // 50 * 2
        self._silence = bytes(self._frame_bytes)
        self._caller.clear()
        self._backlog_min, self._window_ticks = None, 0
        self._left, self._right, self.frames = [], [], 0
        self._pad(frames)

    def _flush(self) -> None:
        if self._closed:
            self._left, self._right = [], []
            return
        left, right = self._left, self._right
        self._left, self._right = [], []
        self._flushed = True
        self._owner.submit(self._write, left, right, False, None)

    def close(self, duration_s: float | None) -> None:
        """The call ended after ``duration_s`` (its ``call.ended`` duration): write what is left,
        pad or cut to exactly that length, complete the header. :attr:`done` resolves when the
        file is complete."""
        if self._finished:
            return
        self._finished = True
        left, right = self._left, self._right
        self._left, self._right = [], []
        stopped = self._closed
        self._closed = True
        target = None if duration_s is None else round(duration_s * self.rate)
        fut = self._owner.submit(self._write, [] if stopped else left, [] if stopped else right, True, target)
        self._owner.track(self, fut)

    # -- the writer thread

    @property
    def bytes_on_disk(self) -> int:
        """The file's size as written so far (writer thread)."""
        return WAV_HEADER_BYTES + self._samples * 4

    def _write(self, left: list[bytes], right: list[bytes], final: bool, total_samples: int | None) -> None:
        if self.stopped_full:  # the disk bound completed the file already: it stays as it is
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            w = wave.open(str(self.path), "wb")  # noqa: SIM115 - open across chunks, closed by the last
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(self.rate)
            self._writer = w
            self._owner.writing(self, True)
        w = self._writer
        data = interleave(self._fit(left), self._fit(right)) if left else b""
        if total_samples is not None:  # the last chunk: exactly the call's length
            data = data[:max(0, total_samples - self._samples) * 4]
            data += bytes(max(0, total_samples - self._samples - len(data) // 4) * 4)
        full = False
        if data and len(data) > (room := self._owner.room(len(data))):
            data, full = data[:max(0, room) // 4 * 4], True
        if data:
            w.writeframesraw(data)
            self._samples += len(data) // 4
        if final or full:
            w.close()  # writes the header's final sizes
            self._writer = None
            self._owner.writing(self, False)
        if full:
            self.stopped_full = True
            self._owner.stopped_full += 1
            self._closed = True  # the event loop's next flush discards its frames
            self._owner.log_problem(self, f"recordings.max_total_mb ({self._owner.max_total_bytes} bytes) reached: "
                                          f"recording stopped after {self._samples / self.rate:.2f} s, "
                                          "the file kept as it is")

    def _fit(self, frames: list[bytes]) -> bytes:
        """Frames joined, each cut or padded to exactly one frame: a short or long frame never
        shifts the rest of the recording out of line. (The caller's are already re-cut from its
        byte stream; this guards the AI's side, which is one playout frame per tick.)"""
        n = self._frame_bytes
        return b"".join(f[:n] if len(f) >= n else f + bytes(n - len(f)) for f in frames)


class Recordings:
    """The recordings directory: opens recorders, writes them on one thread, bounds the disk."""

    def __init__(self, path: Path, max_total_bytes: int, retention_days: float | None, *,
                 now: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.max_total_bytes = max_total_bytes
        self.retention_days = retention_days
        self._now = now
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="voxbridge-recording")
        self._shut = False  # close() has begun shutting the writer thread down
        self._open: dict[str, CallRecorder] = {}
        self._finishing: dict[str, asyncio.Future[None]] = {}
        #: Recordings whose file is open for writing (writer thread only): counted in the total.
        self._writing: dict[str, CallRecorder] = {}
        #: Recordings the disk bound stopped early.
        self.stopped_full = 0
        #: Reported in /v1/health (updated by the writer thread after each pass).
        self.total_bytes = 0
        self.files = 0
        self.removed = 0
        self.errors = 0

    # -- life cycle

    async def start(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the recordings directory {self.path}: {exc.strerror} "
                          "(recordings.path)") from None
        await asyncio.wrap_future(self._executor.submit(self._enforce))

    async def close(self) -> None:
        """Finish every recording still open (a bridge stopping ends its calls first). The writer
        thread is joined in a thread of its own: a slow disk must not stall the event loop."""
        for rec in list(self._open.values()):
            rec.close(None)
        if self._finishing:
            await asyncio.wait(list(self._finishing.values()), timeout=FINISH_WAIT_S)
        self._shut = True
        await asyncio.to_thread(self._executor.shutdown, True)

    def health(self) -> dict[str, Any]:
        writing = sum(r.bytes_on_disk for r in list(self._writing.values()))
        return {"path": str(self.path), "files": self.files, "total_bytes": self.total_bytes + writing,
                "max_total_bytes": self.max_total_bytes, "removed": self.removed, "errors": self.errors,
                "recording": len(self._open), "stopped_full": self.stopped_full}

    # -- recorders

    def open(self, call_id: str, rate: int, pad_frames: int = 0) -> CallRecorder | None:
        """A recorder for ``call_id`` at ``rate`` (None if the id cannot be a file name)."""
        name = recording_name(call_id)
        if name is None:
            log.warning("[%s] not recorded: the call id cannot be a file name", call_id)
            return None
        rec = CallRecorder(self, call_id, self.path / name, rate, pad_frames)
        self._open[call_id] = rec
        return rec

    def submit(self, fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        return self._executor.submit(self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.errors += 1
            log.exception("recording: write failed")

    def track(self, rec: CallRecorder, fut: concurrent.futures.Future[None]) -> None:
        """The recorder closed: when its file is complete, bound the disk and resolve ``done``."""
        self._open.pop(rec.call_id, None)
        afut = asyncio.wrap_future(fut)
        self._finishing[rec.call_id] = afut

        def finished(_: Any) -> None:
            self._finishing.pop(rec.call_id, None)
            if not rec.done.done():
                rec.done.set_result(None)
            if self._shut:  # the bridge is stopping: the next start bounds the directory
                return
            self._executor.submit(self._enforce, rec.path.name)

        afut.add_done_callback(finished)

    def log_problem(self, rec: CallRecorder, message: str) -> None:
        log.warning("[%s] recording: %s", rec.call_id, message)

    async def which_have(self, call_ids: list[str]) -> set[str]:
        """Which of ``call_ids`` have a recording (finished or being completed): one listing of
        the directory, in a thread, rather than a ``stat`` per call on the event loop (a history
        page is up to 500 calls, and the disk may be slow)."""
        names = {n: c for c in call_ids if (n := recording_name(c)) is not None}
        if not names:
            return set()
        have = {c for c in names.values() if c in self._finishing}

        def listing() -> set[str]:
            try:
                with os.scandir(self.path) as it:
                    return {e.name for e in it if e.name in names and e.is_file()}
            except OSError:
                return set()

        return have | {names[n] for n in await asyncio.to_thread(listing)}

    async def file(self, call_id: str) -> Path | None:
        """The finished recording of ``call_id`` (waiting for one being completed), or None."""
        name = recording_name(call_id)
        if name is None:
            return None
        if (pending := self._finishing.get(call_id)) is not None:
            try:
                async with asyncio.timeout(FINISH_WAIT_S):
                    await asyncio.shield(pending)
            except TimeoutError:
                return None
        if call_id in self._open:
            return None  # still recording: the file is not a complete WAV yet
        path = self.path / name
        return path if path.is_file() else None

    # -- disk bounds (writer thread)

    def writing(self, rec: CallRecorder, is_open: bool) -> None:
        """``rec``'s file was opened (True) or completed (False) on the writer thread."""
        if is_open:
            self._writing[rec.call_id] = rec
        else:
            self._writing.pop(rec.call_id, None)

    def room(self, need: int) -> int:
        """Bytes a recording being written may still add: the bound less the finished recordings
        and every file being written. Short of ``need``, the oldest finished recordings are
        deleted first (:meth:`_enforce`)."""
        def free() -> int:
            return self.max_total_bytes - self.total_bytes - sum(r.bytes_on_disk for r in self._writing.values())
        if (left := free()) >= need:
            return left
        self._enforce(need=need)
        return free()

    def _enforce(self, keep: str | None = None, need: int = 0) -> None:
        """Delete recordings past retention, then the oldest finished until the total (files
        being written included, and ``need`` bytes about to be) fits. ``keep``: the recording
        just finished, never deleted for room (its ``call.ended`` links to it)."""
        try:
            busy = {recording_name(c) for c in self._writing} | {recording_name(c) for c in list(self._open)}
            writing = sum(r.bytes_on_disk for r in self._writing.values()) + need
            entries: list[tuple[float, int, Path]] = []
            with os.scandir(self.path) as it:
                for e in it:
                    if e.name.endswith(".wav") and e.is_file() and e.name not in busy:
                        st = e.stat()
                        entries.append((st.st_mtime, st.st_size, Path(e.path)))
            entries.sort()
            cutoff = None if self.retention_days is None else self._now() - self.retention_days * 86400
            total = sum(size for _, size, _ in entries)
            kept = []
            for mtime, size, p in entries:
                expired = cutoff is not None and mtime < cutoff
                if expired or (total + writing > self.max_total_bytes and p.name != keep):
                    p.unlink(missing_ok=True)
                    total -= size
                    self.removed += 1
                else:
                    kept.append(p)
            self.total_bytes, self.files = total, len(kept)
        except OSError:
            self.errors += 1
            log.exception("recording: cannot bound the recordings directory %s", self.path)
