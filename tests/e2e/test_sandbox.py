"""The sandbox itself, proven with NO bridge: a raw AudioSocket peer against a real Asterisk 22.

A tiny asyncio TCP server (:class:`Peer`) plays the bridge's part using only the framing in
``bridge.audiosocket``. What these tests established on Asterisk 22.10.1 (Debian sid):

Local channel halves
    Originate ``Channel: Local/caller@voxbridge-test`` into ``voxbridge-ai,ai,1``: the ``;2`` half
    runs ``caller@voxbridge-test`` (the caller: MixMonitor + Playback + Wait) and the ``;1`` half,
    once ``;2`` answers, runs ``voxbridge-ai,ai,1`` (Answer, Set, AudioSocket). Originate
    Variables are set on ``;1`` and inherited by ``;2``.

Audio from Asterisk
    Only while the caller produces audio: when the caller's Playback ends and it sits in Wait(),
    no frames reach the peer at all (a Local channel has no comfort noise). The last frame of a
    Playback can be shorter than 20 ms (e.g. 276 bytes of 0x10, 552 bytes of 0x12): a peer must
    accept any even-length audio payload, not only 320/640.

AMI event shapes carrying AS_UUID (test_as_uuid_in_ami_events)
    * ``VarSet`` with ``Variable: AS_UUID`` / ``Value: <uuid>`` on ``Local/...;1`` (from the
      Originate Variable *and* again from the dialplan ``Set``), and on ``;2`` (inherited).
    * Every channel event of both halves (Newexten, Newstate, Hangup, UserEvent, MixMonitorStart,
      ...) carries ``ChanVariable: AS_UUID=<uuid>`` and ``ChanVariable: AS_PROFILE=<p>``: one
      line per ``channelvars`` name, always both (value empty while unset), so a list.
    * The ``Newexten`` with ``Application: AudioSocket`` has ``AppData: <uuid>,127.0.0.1:<port>``.
    * ``OriginateResponse`` names the key ``ChanVariable(Local/...;1)`` (channel in the key!).
    * ``DialBegin``/``DialEnd``/``LocalBridge`` use prefixed keys: ``DestChanVariable``,
      ``LocalOneChanVariable``, ``LocalTwoChanVariable``.
    * ``CoreShowChannel`` (list event) has ``Application: AudioSocket`` and
      ``ApplicationData: <uuid>,127.0.0.1:<port>`` and the ChanVariable lines.
    * In Dial mode the ``AudioSocket/127.0.0.1:<port>-<uuid>`` channel does NOT carry AS_UUID
      (it is a new channel); it sets ``AUDIOSOCKET_UUID`` and ``AUDIOSOCKET_SERVICE`` instead.

UserEvent
    ``UserEvent(VoxbridgeReturned,UUID: x,Status: y)`` arrives as ``Event: UserEvent``,
    ``UserEvent: VoxbridgeReturned``, ``UUID: x``, ``Status: y``, plus the channel snapshot; it
    needs the ``user`` read class. ``AUDIOSOCKETSTATUS`` does not exist in 22.10.1
    (app_audiosocket sets no variable), so ``Status`` is empty after ``AudioSocket()``; after
    ``Dial(...,g)`` it is DIALSTATUS (``ANSWER``).

MixMonitor
    ``MixMonitor(/path/x.wav)`` writes 8 kHz s16 mono RIFF WAV, both directions mixed, closed
    when the channel hangs up. Debian builds with TEST_FRAMEWORK, so a ``TestEvent`` with
    ``State: MIXMONITOR_END`` and ``File: /path/x`` (no extension) marks the file complete.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import wave
from dataclasses import dataclass, field

import numpy as np
import pytest
from ami_client import AmiClient, AmiError, chanvars
from asterisk import AsteriskSandbox

from bridge.audiosocket import FrameDecoder, Kind, encode_audio, encode_hangup, frame_bytes

pytestmark = pytest.mark.e2e

SILENCE_RMS = 200.0  # s16 RMS below this counts as silence


# ---------------------------------------------------------------------------------- signals


def tone(freq: float, seconds: float, rate: int = 8000, amplitude: float = 8000.0) -> bytes:
    n = round(seconds * rate)
    t = np.arange(n) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def silence(seconds: float, rate: int = 8000) -> bytes:
    return b"\x00\x00" * round(seconds * rate)


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def rms(pcm: bytes) -> float:
    x = samples(pcm)
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def dominant_frequency(pcm: bytes, rate: int) -> float:
    x = samples(pcm)
    x = x - x.mean()
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1.0 / rate)
    spec[freqs < 50] = 0
    return float(freqs[int(np.argmax(spec))])


def loud_seconds(pcm: bytes, rate: int, window_ms: int = 20) -> float:
    """Total duration of the 20 ms windows whose RMS is above the silence threshold."""
    step = rate * window_ms // 1000 * 2
    windows = [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]
    return sum(1 for w in windows if rms(w) > SILENCE_RMS) * window_ms / 1000


def loud_part(pcm: bytes, rate: int, window_ms: int = 20) -> bytes:
    step = rate * window_ms // 1000 * 2
    windows = (pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step))
    return b"".join(w for w in windows if rms(w) > SILENCE_RMS)


# ---------------------------------------------------------------------------------- the peer


@dataclass
class Session:
    """One AudioSocket connection as the peer saw it."""

    uuid: uuid.UUID | None = None
    frames: list[tuple[float, Kind, bytes]] = field(default_factory=list)  # (monotonic, kind, payload)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    got_uuid: asyncio.Event = field(default_factory=asyncio.Event)
    send_done: asyncio.Event = field(default_factory=asyncio.Event)
    sent_frames: int = 0
    send_times: list[float] = field(default_factory=list)
    hangup_now: asyncio.Event = field(default_factory=asyncio.Event)

    def audio(self, kind: Kind | None = None) -> list[bytes]:
        return [p for _, k, p in self.frames if k.is_audio and (kind is None or k == kind)]


class Peer:
    """A minimal AudioSocket server standing in for the bridge.

    After the UUID frame it sends ``outgoing`` (PCM at ``rate``) paced one 20 ms frame per
    20 ms on an absolute monotonic schedule, then silence (keeps the call alive, works around
    asterisk/asterisk#2089). It sends 0x00 hangup after ``outgoing`` if ``hangup_after_send``,
    or when ``session.hangup_now`` is set.
    """

    def __init__(self, port: int, outgoing: bytes = b"", rate: int = 8000, hangup_after_send: bool = False):
        self.port = port
        self.outgoing = outgoing
        self.rate = rate
        self.hangup_after_send = hangup_after_send
        self.sessions: list[Session] = []
        self.new_session = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> Peer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def session(self, timeout: float = 10.0) -> Session:
        await asyncio.wait_for(self.new_session.wait(), timeout)
        return self.sessions[0]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket as _s

            sock.setsockopt(_s.IPPROTO_TCP, _s.TCP_NODELAY, 1)
        s = Session()
        self.sessions.append(s)
        self.new_session.set()
        decoder = FrameDecoder()
        sender: asyncio.Task | None = None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                now = time.monotonic()
                decoder.feed(data)
                for frame in decoder:
                    s.frames.append((now, frame.kind, frame.payload))
                    if frame.kind is Kind.UUID and s.uuid is None:
                        s.uuid = frame.uuid
                        s.got_uuid.set()
                        sender = asyncio.create_task(self._send(s, writer))
                        self._tasks.add(sender)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            s.closed.set()
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            writer.close()

    async def _send(self, s: Session, writer: asyncio.StreamWriter) -> None:
        step = frame_bytes(self.rate)
        pcm = self.outgoing
        t0 = time.monotonic()
        i = 0
        try:
            while not s.closed.is_set():
                off = i * step
                if off < len(pcm):
                    chunk = pcm[off : off + step].ljust(step, b"\x00")
                else:
                    if not s.send_done.is_set():
                        s.send_done.set()
                        if self.hangup_after_send:
                            break
                    chunk = b"\x00" * step
                if s.hangup_now.is_set():
                    break
                # absolute schedule: frame i goes out at t0 + i * 20 ms, never bursting to catch up
                delay = t0 + i * 0.020 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(encode_audio(chunk, self.rate))
                s.send_times.append(time.monotonic())
                s.sent_frames += 1
                i += 1
            writer.write(encode_hangup())
            await writer.drain()
        except (ConnectionError, OSError):
            pass


# ---------------------------------------------------------------------------------- helpers


def local_half(ev: dict, half: int) -> bool:
    ch = ev.get("Channel", "")
    return ch.startswith("Local/caller@voxbridge-test-") and ch.endswith(f";{half}")


def is_user_event(name: str, as_uuid: str):
    return lambda e: e.get("Event") == "UserEvent" and e.get("UserEvent") == name and e.get("UUID") == as_uuid


async def wait_recording(ami: AmiClient, asterisk: AsteriskSandbox, rec_file: str, timeout: float = 15.0) -> bytes:
    """Wait until MixMonitor has closed ``rec_file`` and return its PCM (8 kHz s16 mono)."""
    stem = rec_file.rsplit(".", 1)[0]
    await ami.wait_event(
        lambda e: e.get("Event") == "TestEvent" and e.get("State") == "MIXMONITOR_END" and e.get("File") == stem,
        timeout=timeout,
    )
    with wave.open(str(asterisk.host_path(rec_file)), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000), w.getparams()
        return w.readframes(w.getnframes())


async def originate(ami: AmiClient, asterisk: AsteriskSandbox, play_pcm: bytes, wait_after: int, exten: str = "ai"):
    as_uuid = str(uuid.uuid4())
    play = asterisk.write_wav(f"play-{as_uuid[:8]}", play_pcm)
    rec = asterisk.recording_path(f"rec-{as_uuid[:8]}.wav")
    resp = await ami.originate_caller(play, rec, wait_after, {"AS_UUID": as_uuid}, exten=exten)
    assert resp["Response"] == "Success", resp
    ev = await ami.wait_event(
        lambda e: e.get("Event") == "OriginateResponse" and e.get("ActionID") == resp["ActionID"], timeout=15
    )
    assert ev["Response"] == "Success" and ev["Reason"] == "4", ev  # 4 = answered
    return as_uuid, rec


# ---------------------------------------------------------------------------------- tests


def test_harness_basics(asterisk: AsteriskSandbox) -> None:
    assert asterisk.running
    assert asterisk.ami_banner and asterisk.ami_banner.startswith("Asterisk Call Manager/")
    assert asterisk.version and asterisk.version.startswith("Asterisk 22."), asterisk.version
    loaded = asterisk.cli("module show like audiosocket")
    for mod in ("app_audiosocket.so", "chan_audiosocket.so", "res_audiosocket.so"):
        assert mod in loaded
    dialplan = asterisk.cli("dialplan show")
    for ctx in ("voxbridge-ai", "voxbridge-test", "voxbridge-transfer", "voxbridge-forbidden", "voxbridge-outbound"):
        assert f"'{ctx}'" in dialplan
    path = asterisk.write_wav("probe", silence(0.1))
    assert asterisk.host_path(path + ".wav").is_file()
    pid = asterisk.pid
    asterisk.restart()
    assert asterisk.running and asterisk.pid != pid
    asterisk.stop()
    asterisk.stop()  # idempotent
    assert not asterisk.running
    assert asterisk.messages_log.is_file()


async def test_caller_audio_reaches_peer(asterisk: AsteriskSandbox, ami: AmiClient) -> None:
    """(a) UUID frame == AS_UUID, then 0x10/320-byte frames carrying the caller's 1 kHz tone."""
    async with Peer(asterisk.audiosocket_port) as peer:
        as_uuid, _ = await originate(ami, asterisk, tone(1000, 1.0), wait_after=10)
        s = await peer.session()
        await asyncio.wait_for(s.got_uuid.wait(), 5)
        assert s.frames[0][1] is Kind.UUID, "the first frame must be the UUID"
        assert str(s.uuid) == as_uuid
        # The caller's Playback is over once its ;2 half moves on to Wait().
        await ami.wait_event(
            lambda e: e.get("Event") == "Newexten" and local_half(e, 2) and e.get("Application") == "Wait", 10)
        s.hangup_now.set()
        await ami.wait_event(is_user_event("VoxbridgeReturned", as_uuid), 10)
        await asyncio.wait_for(s.closed.wait(), 5)

    audio_kinds = {k for _, k, _ in s.frames[1:]}
    assert audio_kinds == {Kind.SLIN_8K}, audio_kinds
    payloads = s.audio(Kind.SLIN_8K)
    assert len(payloads) >= 35
    assert all(len(p) == 320 for p in payloads[:-1]), sorted({len(p) for p in payloads})
    assert 0 < len(payloads[-1]) <= 320 and len(payloads[-1]) % 2 == 0
    pcm = b"".join(payloads)
    loud = loud_seconds(pcm, 8000)
    assert 0.7 <= loud <= 1.3, f"heard {loud:.2f}s of tone, expected 1.0 s"
    assert abs(dominant_frequency(loud_part(pcm, 8000), 8000) - 1000) < 15


async def test_peer_audio_reaches_caller_and_dialplan_continues(asterisk: AsteriskSandbox, ami: AmiClient) -> None:
    """(b) a paced 1.0 s 440 Hz tone, then 0x00: the caller's recording holds the tone, and the
    dialplan continues after AudioSocket() (VoxbridgeReturned)."""
    out = silence(0.2) + tone(440, 1.0)
    async with Peer(asterisk.audiosocket_port, outgoing=out, hangup_after_send=True) as peer:
        as_uuid, rec = await originate(ami, asterisk, silence(0.2), wait_after=8)
        s = await peer.session()
        returned = await ami.wait_event(is_user_event("VoxbridgeReturned", as_uuid), 10)
        await asyncio.wait_for(s.closed.wait(), 5)
        pcm = await wait_recording(ami, asterisk, rec)

    assert local_half(returned, 1) and returned["Context"] == "voxbridge-ai"
    assert returned["Status"] == ""  # AUDIOSOCKETSTATUS does not exist in Asterisk 22.10
    # Pacing of the peer itself: 60 frames over ~1.2 s, never ahead of real time. (A frame
    # that woke late is followed by a short gap as the schedule catches up: that is pacing
    # working, so the check is against each frame's own slot, not the smallest gap.)
    sent = np.array(s.send_times) - s.send_times[0]
    assert s.sent_frames == len(out) // 320
    assert np.all(sent >= np.arange(len(sent)) * 0.020 - 0.002)
    assert abs(sent[-1] - 0.020 * (len(sent) - 1)) < 0.1
    loud = loud_seconds(pcm, 8000)
    assert 0.7 <= loud <= 1.3, f"caller heard {loud:.2f}s of tone, expected 1.0 s"
    assert abs(dominant_frequency(loud_part(pcm, 8000), 8000) - 440) < 10


async def test_as_uuid_in_ami_events(asterisk: AsteriskSandbox, ami: AmiClient) -> None:
    """(c) AS_UUID travels in VarSet events and in every channel event's ChanVariable lines."""
    async with Peer(asterisk.audiosocket_port) as peer:
        as_uuid, _ = await originate(ami, asterisk, tone(1000, 0.4), wait_after=10)
        s = await peer.session()
        await asyncio.wait_for(s.got_uuid.wait(), 5)
        # While the call sits in AudioSocket(): the resync view after an AMI reconnect.
        _, channels = await ami.action_list("CoreShowChannels")
        in_app = [c for c in channels if c.get("Application") == "AudioSocket"]
        assert len(in_app) == 1, channels
        assert in_app[0]["ApplicationData"] == f"{as_uuid},127.0.0.1:{asterisk.audiosocket_port}"
        assert chanvars(in_app[0]).get("AS_UUID") == as_uuid
        ai_channel = in_app[0]["Channel"]
        assert ai_channel.endswith(";1")
        got = await ami.action("Getvar", Channel=ai_channel, Variable="AS_PROFILE")
        assert got["Response"] == "Success" and got["Value"] == "default", got
        s.hangup_now.set()
        await ami.wait_event(is_user_event("VoxbridgeReturned", as_uuid), 10)

    varsets = ami.find_events(lambda e: e.get("Event") == "VarSet" and e.get("Variable") == "AS_UUID")
    assert any(e["Channel"] == ai_channel and e["Value"] == as_uuid for e in varsets), varsets
    audiosocket_exten = await ami.wait_event(
        lambda e: e.get("Event") == "Newexten" and e.get("Application") == "AudioSocket", 1
    )
    assert audiosocket_exten["Channel"] == ai_channel
    assert audiosocket_exten["AppData"].startswith(as_uuid + ",")
    assert isinstance(audiosocket_exten["ChanVariable"], list)  # one line per channelvars name
    assert chanvars(audiosocket_exten) == {"AS_UUID": as_uuid, "AS_PROFILE": "default"}
    hangup = await ami.wait_event(lambda e: e.get("Event") == "Hangup" and e.get("Channel") == ai_channel, 5)
    assert chanvars(hangup)["AS_UUID"] == as_uuid
    # The caller half inherits the Originate variable.
    assert any(local_half(e, 2) and e["Value"] == as_uuid for e in varsets)


async def test_dial_slin16_delivers_16k_frames(asterisk: AsteriskSandbox, ami: AmiClient) -> None:
    """(d) Dial(AudioSocket/.../c(slin16)) sends 0x12 frames of 640 bytes; 0x00 hands back."""
    async with Peer(asterisk.audiosocket_port, rate=16000) as peer:
        as_uuid, _ = await originate(ami, asterisk, tone(1000, 1.0), wait_after=10, exten="ai16")
        s = await peer.session()
        await asyncio.wait_for(s.got_uuid.wait(), 5)
        assert str(s.uuid) == as_uuid
        await ami.wait_event(
            lambda e: e.get("Event") == "Newexten" and local_half(e, 2) and e.get("Application") == "Wait", 10)
        s.hangup_now.set()
        returned = await ami.wait_event(is_user_event("VoxbridgeReturned", as_uuid), 10)
        await asyncio.wait_for(s.closed.wait(), 5)

    assert returned["Status"] == "ANSWER"
    kinds = {k for _, k, _ in s.frames[1:]}
    assert kinds == {Kind.SLIN_16K}, kinds
    payloads = s.audio(Kind.SLIN_16K)
    assert len(payloads) >= 35
    assert all(len(p) == 640 for p in payloads[:-1]), sorted({len(p) for p in payloads})
    pcm = b"".join(payloads)
    assert 0.7 <= loud_seconds(pcm, 16000) <= 1.3
    assert abs(dominant_frequency(loud_part(pcm, 16000), 16000) - 1000) < 15
    chan = ami.find_events(lambda e: e.get("Event") == "Newchannel" and e.get("Channel", "").startswith("AudioSocket/"))
    assert chan and chan[0]["Channel"] == f"AudioSocket/127.0.0.1:{asterisk.audiosocket_port}-{as_uuid}"


async def test_redirect_closes_socket_without_hangup_frame(asterisk: AsteriskSandbox, ami: AmiClient) -> None:
    """AMI Redirect of the ;1 half out of AudioSocket() to voxbridge-transfer,100,1: the socket is
    closed by Asterisk (no 0x00 frame) and the transfer target runs."""
    async with Peer(asterisk.audiosocket_port) as peer:
        as_uuid, _ = await originate(ami, asterisk, tone(1000, 0.4), wait_after=10)
        s = await peer.session()
        await asyncio.wait_for(s.got_uuid.wait(), 5)
        ex = await ami.wait_event(lambda e: e.get("Event") == "Newexten" and e.get("Application") == "AudioSocket", 5)
        resp = await ami.action(
            "Redirect", Channel=ex["Channel"], Context="voxbridge-transfer", Exten="100", Priority="1"
        )
        assert resp["Response"] == "Success", resp
        ev = await ami.wait_event(
            lambda e: e.get("Event") == "UserEvent" and e.get("UserEvent") == "VoxbridgeTransferred", 10
        )
        await asyncio.wait_for(s.closed.wait(), 5)
    assert ev["Channel"] == ex["Channel"] and chanvars(ev)["AS_UUID"] == as_uuid
    assert Kind.HANGUP not in {k for _, k, _ in s.frames}
    assert not ami.find_events(is_user_event("VoxbridgeReturned", as_uuid))


@pytest.mark.parametrize(
    ("exten", "reason"),
    [("answer", "4"), ("busy", "5"), ("noanswer", "3")],
)
async def test_outbound_targets(asterisk: AsteriskSandbox, ami: AmiClient, exten: str, reason: str) -> None:
    """voxbridge-outbound: OriginateResponse Reason 4 answered / 5 busy / 3 no answer."""
    resp = await ami.action(
        "Originate",
        Channel=f"Local/{exten}@voxbridge-outbound",
        Application="Wait",
        Data="1",
        Timeout="2000",
        Async="true",
    )
    assert resp["Response"] == "Success", resp
    ev = await ami.wait_event(
        lambda e: e.get("Event") == "OriginateResponse" and e.get("ActionID") == resp["ActionID"], 15
    )
    assert ev["Reason"] == reason, ev
    assert ev["Response"] == ("Success" if reason == "4" else "Failure")


async def test_wait_event_times_out(ami: AmiClient) -> None:
    with pytest.raises(AmiError):
        await ami.wait_event(lambda e: e.get("Event") == "NoSuchEvent", timeout=0.3)
