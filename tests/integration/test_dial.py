"""AudioSocketCaller against a tiny in-test AudioSocket server on loopback.

The server side is built on bridge.audiosocket only, so these tests check the caller's wire
behaviour (what Asterisk would do) independently of the real bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import time
import uuid

import pytest

from bridge.audiosocket import (
    Frame,
    FrameDecoder,
    Kind,
    ProtocolError,
    audio_kind_for_rate,
    encode_audio,
    encode_dtmf,
    encode_error,
    encode_hangup,
    encode_uuid,
    frame_bytes,
)
from bridge.devtools.dial import (
    AudioSocketCaller,
    Ticker,
    add_arguments,
    analyse,
    pacing_stats,
    read_wav,
    run_dial,
    tone,
)

TIMEOUT = 5.0


class Conn:
    """One accepted AudioSocket connection, seen from the bridge side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames: asyncio.Queue[tuple[float, Frame]] = asyncio.Queue()
        self.log: list[tuple[float, Frame]] = []
        self.eof = asyncio.Event()
        self.error: ProtocolError | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        decoder = FrameDecoder()
        try:
            while data := await self.reader.read(65536):
                now = time.monotonic()
                decoder.feed(data)
                for frame in decoder:
                    self.log.append((now, frame))
                    self.frames.put_nowait((now, frame))
        except ProtocolError as exc:
            self.error = exc
        except ConnectionError:
            pass
        finally:
            self.eof.set()

    async def frame(self, timeout: float = TIMEOUT) -> tuple[float, Frame]:
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def audio_frame(self, timeout: float = TIMEOUT) -> tuple[float, Frame]:
        while True:
            t, f = await self.frame(timeout)
            if f.kind.is_audio:
                return t, f

    async def until(self, done, timeout: float = TIMEOUT) -> None:
        """Consume frames until ``done(self.log)`` is true (TimeoutError after ``timeout`` in all)."""
        async with asyncio.timeout(timeout):
            while not done(self.log):
                await self.frames.get()

    async def wait_eof(self, timeout: float = TIMEOUT) -> bool:
        try:
            await asyncio.wait_for(self.eof.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass

    def kinds(self) -> list[Kind]:
        return [f.kind for _, f in self.log]


class FakeBridge:
    """asyncio.start_server on a free loopback port; hands each connection to the test."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[Conn] = asyncio.Queue()
        self.all: list[Conn] = []

    async def __aenter__(self) -> FakeBridge:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.host, self.port = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for c in self.all:
            c.writer.close()
        for c in self.all:
            c.task.cancel()
        await asyncio.gather(*(c.task for c in self.all), return_exceptions=True)
        await self.server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        self.all.append(conn)
        self.conns.put_nowait(conn)

    async def accept(self, timeout: float = TIMEOUT) -> Conn:
        return await asyncio.wait_for(self.conns.get(), timeout)


async def call_fake(fb: FakeBridge, **kw) -> tuple[AudioSocketCaller, Conn]:
    rate = kw.pop("sample_rate", 8000)
    caller = AudioSocketCaller(**kw)
    await caller.connect(fb.host, fb.port, sample_rate=rate)
    conn = await fb.accept()
    return caller, conn


async def play_paced(conn: Conn, pcm: bytes, rate: int = 8000) -> None:
    """What a correct bridge does: one 20 ms frame per 20 ms on an absolute schedule."""
    loop = asyncio.get_running_loop()
    n = frame_bytes(rate)
    start = loop.time()
    for i, off in enumerate(range(0, len(pcm), n)):
        delay = start + i * 0.020 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not synchronisation
        conn.write(encode_audio(pcm[off : off + n], rate))


# ------------------------------------------------------------------ what the caller sends


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_uuid_first_then_audio_paced_at_20ms(rate):
    async with FakeBridge() as fb:
        call_uuid = uuid.uuid4()
        caller = AudioSocketCaller()
        await caller.connect(fb.host, fb.port, call_uuid=str(call_uuid), sample_rate=rate)
        conn = await fb.accept()
        t_uuid, first = await conn.frame()
        assert first.kind is Kind.UUID
        assert first.uuid == call_uuid == caller.uuid

        times = []
        while True:
            t, f = await conn.frame()
            assert f.kind is audio_kind_for_rate(rate)
            assert len(f.payload) == frame_bytes(rate)
            times.append(t)
            if t - times[0] >= 1.0:
                break
        # Audio starts right after the UUID (Asterisk bug #2089: never stay silent) ...
        assert times[0] - t_uuid < 0.1
        # ... and keeps coming at 50 frames per second: no bursts, no gaps.
        in_first_second = sum(1 for t in times if t - times[0] < 1.0)
        assert 42 <= in_first_second <= 58, in_first_second
        assert max(b - a for a, b in itertools.pairwise(times)) < 0.2
        await caller.aclose()
        assert await conn.wait_eof()
        assert Kind.HANGUP not in conn.kinds()  # Asterisk hangs up by closing, never with 0x00
        assert caller.sent_frames >= len(times)
        assert caller.sent_audio == bytes(caller.sent_frames * frame_bytes(rate))  # all silence


async def test_said_audio_is_sent_exactly_and_paced():
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb)
        speech = tone(1000, 300, 8000)  # exactly 15 frames
        assert caller.say(speech) == pytest.approx(0.3)
        assert (await conn.frame())[1].kind is Kind.UUID
        frames = [await conn.audio_frame() for _ in range(20)]
        got = b"".join(f.payload for _, f in frames)
        start = got.index(speech[:320])
        assert got[start : start + len(speech)] == speech
        assert not any(got[start + len(speech) :])  # silence after the speech
        span = frames[start // 320 + 14][0] - frames[start // 320][0]
        assert 0.2 <= span <= 0.5, span  # 15 frames over ~280 ms, not in a burst
        assert await caller.wait_spoken(TIMEOUT)
        assert caller.sent_speech_frames == 15
        assert speech in caller.sent_audio
        await caller.aclose()


async def test_partial_frame_is_padded_and_consecutive_says_join():
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb)
        caller.say(b"\x01\x00" * 100)  # 12.5 ms
        caller.say(b"\x02\x00" * 100)  # together 25 ms: one full frame plus 60 samples
        assert await caller.wait_spoken(TIMEOUT)
        audio = [await conn.audio_frame() for _ in range(3)]
        payload = b"".join(f.payload for _, f in audio)
        assert payload.startswith(b"\x01\x00" * 100 + b"\x02\x00" * 100 + bytes(200))
        assert caller.sent_speech_frames == 2
        await caller.aclose()


async def test_dtmf_frames_between_audio_then_bridge_closes():
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb)
        with pytest.raises(ValueError):
            caller.send_dtmf("x")
        await conn.audio_frame()
        assert caller.send_dtmf("5")
        await conn.audio_frame()
        assert caller.send_dtmf("#")

        def dtmf(log):
            return [f.digit for _, f in log if f.kind is Kind.DTMF]

        await conn.until(lambda log: len(dtmf(log)) == 2)
        assert dtmf(conn.log) == ["5", "#"]
        # audio frames before, between and after the digits: the framing stayed intact
        kinds = conn.kinds()
        i5, ihash = (i for i, k in enumerate(kinds) if k is Kind.DTMF)
        assert Kind.SLIN_8K in kinds[1:i5] and Kind.SLIN_8K in kinds[i5 + 1 : ihash]
        await conn.audio_frame()
        assert conn.error is None
        assert [d for _, d in caller.sent_dtmf] == ["5", "#"]

        await conn.close()  # bridge closes TCP without a 0x00
        assert await caller.wait_ended(TIMEOUT) == "closed"
        assert not caller.send_dtmf("1")  # the call is over
        await caller.aclose()


async def test_caller_hangup_closes_tcp_without_hangup_frame():
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb)
        await conn.audio_frame()
        caller.hangup()
        assert caller.ended.is_set() and caller.end_reason == "caller-hangup"
        assert await conn.wait_eof()
        assert conn.kinds()[0] is Kind.UUID
        assert Kind.HANGUP not in conn.kinds()
        await caller.aclose()


# ------------------------------------------------------------------ what the caller receives


async def test_records_paced_playback_then_hangup_frame():
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb)
        played = tone(440, 1000, 8000)

        async def bridge_side():
            await play_paced(conn, played)
            conn.write(encode_hangup())

        task = asyncio.create_task(bridge_side())
        assert await caller.wait_audio(8000, TIMEOUT)  # half a second arrived
        assert await caller.wait_ended(TIMEOUT) == "hangup-frame"
        await task

        assert bytes(caller.received_audio) == played
        assert caller.received_audio_frames == 50 == len(caller.received_frames)
        assert {k for _, k, _ in caller.received_frames} == {Kind.SLIN_8K}
        a = analyse(caller.received_audio, 8000)
        assert a["dominant_hz"] == pytest.approx(440, abs=2)
        assert a["non_silent_s"] == pytest.approx(1.0, abs=0.03)
        assert caller.first_audio_latency is not None and 0 <= caller.first_audio_latency < 1.0
        p = pacing_stats(caller.received_frames)
        assert p["max_lead_ms"] < 100 and p["max_gap_ms"] < 200
        # like Asterisk, the caller closes the socket after a 0x00
        assert await conn.wait_eof()
        await caller.aclose()


async def test_bursting_bridge_shows_up_as_lead_over_real_time():
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb, record_received=False, max_frames=10)
        conn.write(b"".join(encode_audio(bytes(320), 8000) for _ in range(50)))  # 1 s at once
        assert await caller.wait_audio(50 * 320, TIMEOUT)
        assert caller.received_audio == bytearray()  # not recorded ...
        assert caller.received_audio_bytes == 16000  # ... but counted
        assert len(caller.received_frames) == 10  # bounded log
        await caller.aclose()

        caller, conn = await call_fake(fb)
        conn.write(b"".join(encode_audio(bytes(320), 8000) for _ in range(50)))
        assert await caller.wait_audio(50 * 320, TIMEOUT)
        assert pacing_stats(caller.received_frames)["max_lead_ms"] > 500
        await caller.aclose()


async def test_error_frame_ends_the_call():
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb)
        conn.write(encode_audio(tone(300, 20, 8000)) + encode_error(7))
        assert await caller.wait_ended(TIMEOUT) == "error-frame"
        assert caller.error_code == 7
        assert caller.received_audio_bytes == 320
        assert await conn.wait_eof()
        await caller.aclose()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x42\x00\x01x", id="unknown-kind"),
        pytest.param(b"\x10\x00\x03abc", id="odd-audio"),
        pytest.param(b"\x10\x00\x00", id="empty-audio"),
        pytest.param(encode_uuid(uuid.uuid4()), id="uuid-towards-asterisk"),
        pytest.param(encode_dtmf("1"), id="dtmf-towards-asterisk"),
    ],
)
async def test_garbage_from_bridge_is_a_protocol_error(garbage):
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb)
        conn.write(encode_audio(bytes(320)) + garbage)
        reason = await caller.wait_ended(TIMEOUT)
        assert reason is not None and reason.startswith("protocol-error: "), reason
        assert caller.received_audio_bytes == 320  # audio before the garbage was kept
        assert await conn.wait_eof()  # the caller dropped the connection
        await caller.aclose()
        assert caller.end_reason == reason  # closing afterwards does not rewrite history


async def test_wait_audio_times_out_or_fails_when_the_call_ends():
    async with FakeBridge() as fb:
        caller, conn = await call_fake(fb)
        assert not await caller.wait_audio(320, timeout=0.2)  # silent bridge
        waiter = asyncio.create_task(caller.wait_audio(10**6, timeout=TIMEOUT))
        await conn.audio_frame()
        await conn.close()
        assert await asyncio.wait_for(waiter, TIMEOUT) is False
        assert caller.end_reason == "closed"
        await caller.aclose()


# ------------------------------------------------------------------ resources


async def test_aclose_leaves_no_tasks_behind():
    before = asyncio.all_tasks()
    async with FakeBridge() as fb:
        async with AudioSocketCaller() as caller:
            await caller.connect(fb.host, fb.port)
            conn = await fb.accept()
            await conn.audio_frame()
            assert any(t.get_name() == "voxbridge-dial-ticker" for t in asyncio.all_tasks())
        assert caller.end_reason == "caller-hangup"
        assert await conn.wait_eof()
    assert asyncio.all_tasks() == before


async def test_connect_refused_raises_and_leaks_nothing():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = asyncio.all_tasks()
    caller = AudioSocketCaller()
    with pytest.raises(ConnectionRefusedError):
        await caller.connect("127.0.0.1", port)
    await caller.aclose()
    assert caller.end_reason == "not-connected"
    assert asyncio.all_tasks() == before


async def test_one_ticker_paces_many_callers():
    ticker = Ticker()
    async with FakeBridge() as fb:
        pairs = [await call_fake(fb, ticker=ticker) for _ in range(20)]
        assert len(ticker) == 20
        assert sum(t.get_name() == "voxbridge-dial-ticker" for t in asyncio.all_tasks()) == 1
        for _, conn in pairs:  # every caller gets going
            for _ in range(10):
                await conn.audio_frame()
        for caller, _ in pairs:
            caller.hangup()
        counts = [caller.sent_frames for caller, _ in pairs]
        assert max(counts) - min(counts) <= 5, counts  # same clock, started a few ms apart
        for caller, conn in pairs:
            await caller.aclose()
            assert await conn.wait_eof()
        assert len(ticker) == 0 and not ticker.running
    await ticker.aclose()


# ------------------------------------------------------------------ the CLI command


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


async def test_run_dial_against_an_echoing_bridge(tmp_path, capsys):
    async with FakeBridge() as fb:
        got_dtmf: list[str] = []

        async def echo():
            conn = await fb.accept()
            while True:
                try:
                    _, f = await conn.frame()
                except TimeoutError:
                    return
                if f.kind.is_audio:
                    conn.write(encode_audio(f.payload, f.sample_rate))  # paced by the caller
                elif f.kind is Kind.DTMF:
                    got_dtmf.append(f.digit)
                elif f.kind is Kind.UUID:
                    assert f.uuid == call_uuid

        call_uuid = uuid.uuid4()
        server = asyncio.create_task(echo())
        out = tmp_path / "heard.wav"
        rc = await run_dial(
            _args(
                "--to", f"{fb.host}:{fb.port}", "--tone", "600", "--rate", "16000", "--duration", "1.0",
                "--dtmf", "5@0.3", "--record", str(out), "--uuid", str(call_uuid),
            )
        )
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)

    printed = capsys.readouterr()
    assert rc == 0, printed
    assert got_dtmf == ["5"]
    pcm, rate = read_wav(out)
    assert rate == 16000
    a = analyse(pcm, rate)
    assert a["dominant_hz"] == pytest.approx(600, abs=5)
    assert a["non_silent_s"] > 0.5
    assert str(call_uuid) in printed.out
    assert "caller-hangup" in printed.out and "jitter" in printed.out


async def test_run_dial_fails_when_no_audio_comes_back(capsys):
    async with FakeBridge() as fb:
        rc = await run_dial(_args("--to", f"{fb.host}:{fb.port}", "--duration", "0.3", "--quiet"))
    assert rc == 1
    assert "no audio came back" not in capsys.readouterr().out  # --quiet


async def test_run_dial_connection_refused_exits_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = await run_dial(_args("--to", f"127.0.0.1:{port}"))
    assert rc == 2
    assert f"nothing listening on 127.0.0.1:{port} — is `voxbridge serve` running?" in capsys.readouterr().err
