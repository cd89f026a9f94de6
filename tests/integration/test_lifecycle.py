"""Call lifecycles under faults, on loopback: the real bridge, simulated callers, the reference gateway.

Each test injects one fault the code was not written to expect (a bug in a gateway adapter, a
playout sink that raises, a bug in the clock's own bookkeeping, a gateway that stops answering
without closing) and checks the promises that must hold anyway: the call ends and its caller is
released (0x00, so the dialplan continues), its slot is freed, and every other call keeps its
20 ms pacing.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bridge.devtools.dial import analyse, tone, write_wav
from bridge.gateway.aillomvox import CLOSE_TIMEOUT_S, AillomVoxGateway

from .conftest import API_KEY, accepted

pytestmark = pytest.mark.timeout(60)


async def call_of(bridge, caller, timeout: float = 5):
    async with asyncio.timeout(timeout):
        while str(caller.uuid) not in bridge.sessions:
            await asyncio.sleep(0.01)
    return bridge.sessions[str(caller.uuid)]


def frame_gaps(caller, since: float) -> np.ndarray:
    """Gaps (s) between the audio frames the caller received from ``since`` on."""
    times = [t for t, _kind, _n in caller.received_frames if t >= since]
    return np.diff(times)


def drain(sub) -> list:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


# --------------------------------------------------------------------------- teardown faults


class BrokenGateway(AillomVoxGateway):
    """An adapter with a bug in its teardown: it releases its connection, then raises."""

    async def hangup(self) -> None:
        await super().close()
        raise RuntimeError("injected: gateway hangup failed")

    async def close(self) -> None:
        await super().close()
        raise RuntimeError("injected: gateway close failed")


def _broken_gateway(bridge, sim, session, monkeypatch) -> None:
    pass  # installed before the call (see the test): the session already runs on a BrokenGateway


def _router_close_raises(bridge, sim, session, monkeypatch) -> None:
    async def aclose(**_kw):
        raise RuntimeError("injected: router close failed")

    monkeypatch.setattr(session.router, "aclose", aclose)


def _caller_hangup_raises(bridge, sim, session, monkeypatch) -> None:
    def hangup():
        raise RuntimeError("injected: hangup frame failed")

    monkeypatch.setattr(session.leg, "hangup", hangup)


def _call_ended_publish_raises(bridge, sim, session, monkeypatch) -> None:
    publish = bridge.events.publish

    def failing(type, call_id, **data):
        if type == "call.ended":
            raise RuntimeError("injected: publishing call.ended failed")
        return publish(type, call_id, **data)

    monkeypatch.setattr(bridge.events, "publish", failing)


TEARDOWN_FAULTS = {
    # fault: (injector, the teardown step named in the log, what the caller sees)
    "gateway-hangup-and-close-raise": (_broken_gateway, "hanging up the gateway", "hangup-frame"),
    "router-close-raises": (_router_close_raises, "closing the tool router", "hangup-frame"),
    "caller-hangup-frame-raises": (_caller_hangup_raises, "sending the caller the hangup frame", "closed"),
    "call-ended-publish-raises": (_call_ended_publish_raises, "publishing call.ended", "hangup-frame"),
}


@pytest.mark.parametrize("fault", list(TEARDOWN_FAULTS))
async def test_a_failing_teardown_step_still_releases_the_call_and_its_slot(
        fault, make_bridge, sim, dial, monkeypatch, caplog):
    inject, step, caller_sees = TEARDOWN_FAULTS[fault]
    bridge = await make_bridge(audiosocket={"max_calls": 1}, profile={"first_message": None})
    if fault == "gateway-hangup-and-close-raise":
        bridge._gateway_factory = lambda s: BrokenGateway(sim.url, API_KEY, settle_ms=0, call_id=s.call_id)
    caller = await dial(bridge)
    gw_session = await accepted(sim)
    session = await call_of(bridge, caller)
    await gw_session.wait_audio(1600)  # the call is up and flowing
    inject(bridge, sim, session, monkeypatch)

    await bridge.hangup_call(session, "api-hangup")  # no AMI: ends the AudioSocket session

    async with asyncio.timeout(5):
        await session.ended.wait()  # the old teardown stopped at the fault: never set
    assert session.call_id not in bridge.sessions  # no longer counted against max_calls
    assert await caller.wait_ended(5) == caller_sees  # the caller's leg is released either way
    async with asyncio.timeout(5):
        await gw_session.closed.wait()  # and so is the gateway's connection
    logged = [r for r in caplog.records if f"teardown: {step} failed" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # logged with its traceback, not swallowed
    assert session.stats["teardown_errors"] >= 1

    # The slot is free: at max_calls=1 a new call is accepted and flows (not refused with 0x00).
    monkeypatch.undo()
    bridge._gateway_factory = None
    second = await dial(bridge)
    await accepted(sim)
    assert await second.wait_audio(320 * 10, timeout=5)
    assert not second.ended.is_set() and bridge.metrics["calls_refused"] == 0
    assert str(second.uuid) in bridge.sessions


# --------------------------------------------------------------------------- the playout clock


async def test_a_call_whose_playout_raises_ends_and_the_others_keep_their_pacing(make_bridge, sim, dial):
    bridge = await make_bridge(profile={"first_message": None})
    events = bridge.events.subscribe()
    victim, other = await dial(bridge), await dial(bridge)
    await accepted(sim)
    await accepted(sim)
    session = await call_of(bridge, victim)
    assert await other.wait_audio(320 * 10, timeout=5)

    def broken_write(pcm: bytes) -> bool:
        raise RuntimeError("injected: playout write failed")

    t_fault = time.monotonic()
    session.leg.send_frame = broken_write  # its on_tick now raises on the next tick
    # The call ends (the old clock only dropped it: the caller sat in silence, the call lingered).
    assert await victim.wait_ended(5) == "hangup-frame"  # 0x00: the dialplan continues
    async with asyncio.timeout(5):
        await session.ended.wait()
    assert session.end_reason == "internal-error" and session.call_id not in bridge.sessions
    ended = [e for e in drain(events) if e.type == "call.ended" and e.call_id == session.call_id]
    assert ended and ended[0].data["reason"] == "internal-error"

    # The other call did not notice: one frame per 20 ms throughout, and it is still up.
    assert await other.wait_audio(other.received_audio_bytes + 320 * 25, timeout=5)
    gaps = frame_gaps(other, t_fault - 0.2)
    assert len(gaps) >= 30
    assert abs(float(np.median(gaps)) - 0.020) < 0.003
    assert gaps.max() < 0.1
    assert not other.ended.is_set() and str(other.uuid) in bridge.sessions


class _FailingCounts(list):
    """A histogram whose updates raise ``failures`` times: a bug in the clock's bookkeeping."""

    def __init__(self, like: list[int], failures: int) -> None:
        super().__init__(like)
        self.failures = failures

    def __setitem__(self, i, v) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise IndexError("injected: clock bookkeeping failed")
        super().__setitem__(i, v)


async def test_the_clock_survives_a_fault_in_its_own_bookkeeping(make_bridge, sim, dial):
    bridge = await make_bridge(profile={"first_message": None})
    callers = [await dial(bridge) for _ in range(2)]
    for _ in callers:
        await accepted(sim)
    for c in callers:
        assert await c.wait_audio(320 * 10, timeout=5)
    t_fault = time.monotonic()
    clock = bridge.clock
    clock.cost_hist = _FailingCounts(clock.cost_hist, failures=3)
    # The old clock was never rescheduled after the first fault: every call went silent.
    for c in callers:
        assert await c.wait_audio(c.received_audio_bytes + 320 * 50, timeout=5)
    assert clock.tick_errors == 3
    for c in callers:
        gaps = frame_gaps(c, t_fault - 0.1)
        assert gaps.max() < 0.1  # the faulty sub-ticks cost no frame: the sinks were served first
        assert abs(float(np.median(gaps)) - 0.020) < 0.003
        assert not c.ended.is_set()
    assert len(bridge.sessions) == 2


# --------------------------------------------------------------------------- half-open gateway


class FreezableProxy:
    """A TCP relay in front of the gateway that can go silent without closing anything.

    After :meth:`freeze` it reads and discards whatever either side sends and never closes a
    connection: to the bridge the gateway is now a half-open peer (a crashed host, a NAT that
    forgot the flow), which nothing but an unanswered ping can reveal.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self.frozen = False
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/ws"

    def freeze(self) -> None:
        self.frozen = True

    def drop(self) -> None:
        """The gateway's host dies: every connection is reset, no close frame."""
        for w in self._writers:
            w.transport.abort()

    async def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            up_r, up_w = await asyncio.open_connection(*self._target)
            self._writers += [writer, up_w]
            pumps = [asyncio.create_task(self._pump(reader, up_w)), asyncio.create_task(self._pump(up_r, writer))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
            if not self.frozen:  # a normal close on one side: pass it on
                writer.close()
                up_w.close()
            else:
                await self._closing.wait()  # half-open: never close (until the test ends)
        finally:
            self._tasks.discard(task)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                if self.frozen:
                    continue  # black hole: no forwarding, no answer, no close
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass


@pytest.fixture
async def frozen_proxy(sim):
    proxy = FreezableProxy(sim.host, sim.port)
    await proxy.start()
    yield proxy
    await proxy.close()  # before the sim stops: its half-open connections end here


async def test_a_gateway_that_stops_answering_is_noticed_and_the_caller_hears_the_fallback(
        make_bridge, sim, dial, frozen_proxy, tmp_path, caplog):
    interval, timeout = 0.2, 0.5
    wav = tmp_path / "sorry.wav"
    write_wav(wav, tone(350, 600, 8000), 8000)
    bridge = await make_bridge(
        gateway={"url": frozen_proxy.url, "keepalive_interval": interval, "keepalive_timeout": timeout},
        profile={"first_message": None, "fallback": {"message_wav": str(wav)}},
    )
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    gw_session = await accepted(sim)
    session = await call_of(bridge, caller)
    # A healthy gateway answers its pings: a second and a half of call (several keepalive
    # rounds) and the call is still up.
    await gw_session.wait_audio(16000 * 1.5, timeout=5)
    assert session.end_reason is None and not caller.ended.is_set()

    frozen_proxy.freeze()
    t_freeze = time.monotonic()
    # The old adapter pinged every 20 s with a 20 s timeout: the caller sat in silence for ~40 s.
    assert await caller.wait_ended(10) == "hangup-frame"
    data = bytes(caller.received_audio)
    off, heard = 0, []
    for t, _kind, n in caller.received_frames:
        payload = data[off:off + n]
        off += n
        if t > t_freeze and np.abs(np.frombuffer(payload, "<i2")).max(initial=0) > 500:
            heard.append((t, payload))
    assert len(heard) >= 25  # the fallback message (0.6 s), not dead air
    assert analyse(b"".join(p for _, p in heard), 8000)["dominant_hz"] == pytest.approx(350, abs=10)
    # Noticed within keepalive_interval + keepalive_timeout (+ the closing handshake websockets
    # waits out on a dead peer), with slack for a loaded machine.
    noticed_after = heard[0][0] - t_freeze
    assert noticed_after < interval + timeout + CLOSE_TIMEOUT_S + 1.5, noticed_after
    ended = [e for e in drain(events) if e.type == "call.ended"]
    assert ended and ended[0].data["reason"].startswith("fallback:gateway connection lost")
    assert any("keepalive ping timeout" in r.getMessage() for r in caplog.records)


async def test_a_gateway_that_drops_the_connection_gets_the_caller_the_fallback(
        make_bridge, sim, dial, frozen_proxy, tmp_path):
    wav = tmp_path / "sorry.wav"
    write_wav(wav, tone(350, 600, 8000), 8000)
    bridge = await make_bridge(gateway={"url": frozen_proxy.url},
                               profile={"first_message": None, "fallback": {"message_wav": str(wav)}})
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    gw_session = await accepted(sim)
    await gw_session.wait_audio(1600)
    t_drop = time.monotonic()
    frozen_proxy.drop()
    assert await caller.wait_ended(5) == "hangup-frame"
    data = bytes(caller.received_audio)
    off, heard = 0, []
    for t, _kind, n in caller.received_frames:
        payload = data[off:off + n]
        off += n
        if t > t_drop and np.abs(np.frombuffer(payload, "<i2")).max(initial=0) > 500:
            heard.append(payload)
    # Before, reading how the connection ended raised AttributeError: "internal-error", no message.
    assert len(heard) >= 25 and analyse(b"".join(heard), 8000)["dominant_hz"] == pytest.approx(350, abs=10)
    ended = [e for e in drain(events) if e.type == "call.ended"]
    assert ended and ended[0].data["reason"] == "fallback:gateway connection lost (None)"


async def test_a_gateway_that_closes_cleanly_ends_the_call_as_gateway_closed(make_bridge, sim, dial):
    bridge = await make_bridge(profile={"first_message": None})
    caller = await dial(bridge)
    gw_session = await accepted(sim)
    session = await call_of(bridge, caller)
    await gw_session.wait_audio(1600)
    await gw_session.close(1000, "done")
    assert await caller.wait_ended(5) == "hangup-frame"
    assert session.end_reason == "gateway-closed"  # not "internal-error"


def test_keepalive_settings_must_be_positive():
    with pytest.raises(ValueError, match="keepalive_timeout must be a positive number of seconds, got 0"):
        AillomVoxGateway("ws://127.0.0.1:9/ws", "k", keepalive_timeout=0)


class SurprisingGateway(AillomVoxGateway):
    """An adapter whose set-up fails with something other than GatewayError (a library's own
    exception, a bug): the caller must still get the fallback, and the connection be closed."""

    closed = 0

    async def connect(self, setup) -> None:
        await super().connect(setup)
        raise KeyError("injected: not a GatewayError")

    async def close(self) -> None:
        SurprisingGateway.closed += 1
        await super().close()


async def test_an_unexpected_error_in_gateway_setup_still_gives_the_caller_the_fallback(
        make_bridge, sim, dial, tmp_path, caplog):
    wav = tmp_path / "sorry.wav"
    write_wav(wav, tone(350, 600, 8000), 8000)
    bridge = await make_bridge(profile={"first_message": None, "fallback": {"message_wav": str(wav)}})
    bridge._gateway_factory = lambda s: SurprisingGateway(sim.url, API_KEY, settle_ms=0, call_id=s.call_id)
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    assert await caller.wait_ended(10) == "hangup-frame"  # back to the dialplan, after the message
    data, off, heard = bytes(caller.received_audio), 0, []
    for _t, _kind, n in caller.received_frames:
        payload = data[off:off + n]
        off += n
        if np.abs(np.frombuffer(payload, "<i2")).max(initial=0) > 500:
            heard.append(payload)
    assert len(heard) >= 25  # the fallback message, not a bare hang-up
    ended = [e for e in drain(events) if e.type == "call.ended"]
    assert ended and ended[0].data["reason"] == "fallback:gateway set-up failed (KeyError)"
    assert SurprisingGateway.closed >= 1  # its connection released
    assert "gateway set-up failed unexpectedly" in caplog.text
    bridge._gateway_factory = None
