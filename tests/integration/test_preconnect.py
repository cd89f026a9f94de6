"""The gateway's connection is opened while the call's settings are resolved (Gateway.preconnect).

Real parts on loopback: the bridge in-process, the strict reference gateways (bridge/devtools/),
simulated AudioSocket callers and a scripted AMI server (tests/fakes.py's FakeAsterisk) whose
channel for the call arrives when the test says — late, as under load. The gateway's handshake
must run before the channel arrives, nothing may be sent on it before the settings are known, a
connection the call does not use must be closed having carried nothing, and the caller's first
words must reach the AI whole and in order whatever happened to the early connection.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from http import HTTPStatus
from typing import Any

import numpy as np
import pytest

from bridge.calls import CallSettings
from bridge.devtools.dial import AudioSocketCaller
from bridge.devtools.gateway_sim import GatewaySim
from bridge.devtools.sim_generic_ws import GenericWsSim
from bridge.devtools.sim_openai import OpenAIRealtimeSim
from bridge.gateway.base import SessionSetup
from bridge.gateway.generic_ws import GenericWsGateway
from bridge.gateway.openai_realtime import OpenAIRealtimeGateway
from bridge.gateway.ws import CLOSE_TIMEOUT_S
from tests.fakes import FakeAsterisk, reply
from tests.integration.conftest import API_KEY

WAIT = 10.0
CHANNEL = "PJSIP/100-00000001"


def speech(seconds: float, seed: int) -> bytes:
    """Noise at speech level, every 20 ms frame distinct: a lost or reordered frame shows."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(8000 * seconds)) * 3000).astype("<i2").tobytes()


class Ami(FakeAsterisk):
    """Asterisk's AMI as the bridge uses it at call set-up: the channel list on connect (empty),
    the call's channel pushed when the test says, ``AS_PROFILE`` / ``AS_VARS`` through Getvar."""

    def __init__(self) -> None:
        super().__init__()
        self.variables: dict[str, str] = {}
        self.answers["CoreShowChannels"] = lambda m: (
            reply(m.action_id, Response="Success", EventList="start")
            + reply(m.action_id, Event="CoreShowChannelsComplete", EventList="Complete", ListItems="0"))
        self.answers["Getvar"] = lambda m: reply(m.action_id, Response="Success", Variable=m["Variable"],
                                                 Value=self.variables.get(m["Variable"], ""))

    def channel_arrives(self, call_uuid: Any) -> float:
        """The AudioSocket channel of ``call_uuid`` shows up (Newexten); returns when (monotonic)."""
        at = time.monotonic()
        self.send_event(Event="Newexten", Channel=CHANNEL, Uniqueid="1700000000.1",
                        Application="AudioSocket", AppData=f"{call_uuid},127.0.0.1:9000")
        return at


@pytest.fixture
async def ami():
    async with Ami() as a:
        yield a


@pytest.fixture
async def ami_bridge(make_bridge, ami):
    """``await ami_bridge(**config)``: a bridge with AMI correlation on (FakeAsterisk), logged in."""

    async def start(**overrides: Any):
        ami_cfg = {"enabled": True, "port": ami.port, "username": "vb", "secret": ami.secret, "channel_wait": 5.0,
                   **overrides.pop("ami", {})}
        overrides.setdefault("profiles", {"default": {"first_message": None}})
        bridge = await make_bridge(ami=ami_cfg, **overrides)
        assert bridge.ami is not None
        await asyncio.wait_for(bridge.ami.connected.wait(), WAIT)
        return bridge

    return start


async def first_session(sim: Any, timeout: float = WAIT) -> Any:
    async with asyncio.timeout(timeout):
        while not sim.sessions:
            await asyncio.sleep(0.01)
    return sim.sessions[0]


async def configured_session(sim: Any, timeout: float = WAIT) -> Any:
    """The session whose config the gateway accepted (an unused early connection is skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            for s in list(sim.sessions):
                if s.accepted:
                    return s
            await asyncio.sleep(0.01)


async def call_of(bridge: Any, caller: AudioSocketCaller, timeout: float = WAIT) -> Any:
    async with asyncio.timeout(timeout):
        while str(caller.uuid) not in bridge.sessions:
            await asyncio.sleep(0.01)
    return bridge.sessions[str(caller.uuid)]


async def answered(events: Any, call_id: str, timeout: float = WAIT) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            e = await events.get()
            if e.type == "call.answered" and e.call_id == call_id:
                return e


async def no_call_tasks(call_id: str, timeout: float = WAIT) -> None:
    """Every task the call started (named after it: its own, its gateway's) has finished."""
    async with asyncio.timeout(timeout):
        while left := [t for t in asyncio.all_tasks() if call_id in t.get_name() and not t.done()]:
            await asyncio.wait(left, timeout=0.1)


async def closed_unused(session: Any) -> None:
    """The early connection ended without the call: closed by the bridge, cleanly, nothing sent."""
    await asyncio.wait_for(session.closed.wait(), WAIT)
    assert session.config is None and not session.messages and session.audio_bytes_total == 0
    assert session.closed_by == "client" and session.close_code == 1000


# ---------------------------------------------------------------------------------------- the overlap


async def test_the_handshake_runs_before_the_late_channel_and_the_first_words_arrive_whole(
        ami_bridge, ami, sim, dial):
    bridge = await ami_bridge()
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    words = speech(2.5, seed=1)
    caller.say(words)  # the caller talks from the first moment
    early = await first_session(sim)
    await asyncio.sleep(1.5)  # under load the AMI channel arrives late
    assert early.config is None, "the gateway was configured before the call's settings were known"
    channel_at = ami.channel_arrives(caller.uuid)
    session = await configured_session(sim)
    assert session is early and len(sim.sessions) == 1  # the early connection is the call's
    assert session.connected_at < channel_at - 1.0  # the handshake ran while correlation waited
    assert session.config_received_at >= channel_at  # the config only once the settings were known
    await session.wait_audio(len(words), timeout=WAIT)
    assert words in bytes(session.audio), "caller audio lost or reordered while the call was set up"
    call = await call_of(bridge, caller)
    assert call.channel is not None and call.channel.name == CHANNEL  # correlated by the late channel
    assert call.stats["preconnect_dropped"] == 0
    e = await answered(events, str(caller.uuid))
    assert e.data["preconnect_used"] == 1 and call.stats["preconnect_used"] == 1
    # The timeline: the settings took the channel's wait; the gateway then only needed the config.
    assert e.data["settings_ms"] >= 1400 and e.data["setup_ms"] == call.stats["setup_ms"]
    assert e.data["connect_ms"] < e.data["settings_ms"]
    assert not session.violations
    await caller.aclose()


def sales_on(other: Any) -> dict[str, Any]:
    """Bridge config: the profile "sales" on the gateway entry "other" (``other``, a GatewaySim
    accepting "other-key"); the default profile on the default gateway."""
    return {"gateways": {"other": {"protocol": "aillomvox", "url": other.url, "api_key": "other-key",
                                   "settle_ms": 0}},
            "profiles": {"default": {"first_message": None},
                         "sales": {"gateway": "other", "prompt": "Sales.", "first_message": None}}}


async def test_a_profile_on_another_gateway_closes_the_early_connection_unused(ami_bridge, ami, sim, dial):
    async with GatewaySim(accepted_keys={"other-key"}) as other:
        bridge = await ami_bridge(**sales_on(other))
        ami.variables["AS_PROFILE"] = "sales"
        events = bridge.events.subscribe()
        caller = await dial(bridge)
        words = speech(1.0, seed=2)
        caller.say(words)
        early = await first_session(sim)  # the default profile's gateway, opened speculatively
        ami.channel_arrives(caller.uuid)
        session = await configured_session(other)
        assert session.config["system_prompt"] == "Sales."
        await closed_unused(early)
        assert len(sim.sessions) == 1 and len(other.sessions) == 1
        await session.wait_audio(len(words), timeout=WAIT)
        assert words in bytes(session.audio)
        e = await answered(events, str(caller.uuid))
        assert e.data["profile"] == "sales" and e.data["preconnect_used"] == 0
        await caller.aclose()


async def test_another_gateway_entry_with_the_same_endpoint_takes_the_connection_over(ami_bridge, ami, sim, dial):
    """``gateways.slow`` is the default gateway (same URL, same handshake) with other settings: the
    early connection carries the call, configured with the entry the profile names."""
    bridge = await ami_bridge(
        gateways={"slow": {"protocol": "aillomvox", "url": sim.url, "api_key": API_KEY, "settle_ms": 300}},
        profiles={"default": {"first_message": None}, "sales": {"gateway": "slow", "prompt": "Sales."}})
    ami.variables["AS_PROFILE"] = "sales"
    caller = await dial(bridge)
    early = await first_session(sim)
    ami.channel_arrives(caller.uuid)
    session = await configured_session(sim)
    assert session is early and len(sim.sessions) == 1
    assert session.config["system_prompt"] == "Sales."
    call = await call_of(bridge, caller)
    async with asyncio.timeout(WAIT):
        while call.gateway is None:
            await asyncio.sleep(0.01)
    assert call.gateway.used_preconnect and call.gateway._settle_s == 0.3  # the entry's own adapter
    await caller.aclose()


async def test_an_api_started_call_preconnects_to_its_own_profiles_gateway(ami_bridge, ami, sim, dial):
    async with GatewaySim(accepted_keys={"other-key"}) as other:
        bridge = await ami_bridge(
            gateways={"other": {"protocol": "aillomvox", "url": other.url, "api_key": "other-key", "settle_ms": 0}},
            profiles={"default": {"first_message": None}, "sales": {"gateway": "other", "first_message": None}})
        call_uuid = uuid.uuid4()
        bridge.pending[str(call_uuid)] = CallSettings(profile="sales", direction="outbound")
        caller = AudioSocketCaller()
        host, port = bridge.audiosocket_address
        await caller.connect(host, port, call_uuid=call_uuid)
        try:
            early = await first_session(other)  # known before the channel: no guess at the default
            await asyncio.sleep(0.3)
            assert early.config is None and not sim.sessions
            ami.channel_arrives(call_uuid)
            assert await configured_session(other) is early and not sim.sessions
        finally:
            await caller.aclose()


# ---------------------------------------------------------------------------------------- ends and failures


class SlowHandshakeSim(GatewaySim):
    """The reference gateway answering each WebSocket upgrade only after ``delay_s``, and counting them."""

    def __init__(self, delay_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay_s = delay_s
        self.requests = 0
        self.answered = 0

    async def _process_request(self, connection: Any, request: Any) -> Any:  # type: ignore[override]
        self.requests += 1
        await asyncio.sleep(self.delay_s)
        self.answered += 1
        return GatewaySim._process_request(connection, request)


@pytest.mark.parametrize("when", ["handshake in flight", "connection open"])
async def test_a_caller_hanging_up_during_set_up_leaves_no_gateway_connection(ami_bridge, ami, dial, when):
    async with SlowHandshakeSim(0.5 if when == "handshake in flight" else 0.0, accepted_keys={API_KEY}) as slow:
        bridge = await ami_bridge(gateway={"url": slow.url, "api_key": API_KEY, "settle_ms": 0})
        caller = await dial(bridge)
        call = await call_of(bridge, caller)
        if when == "handshake in flight":
            async with asyncio.timeout(WAIT):
                while slow.requests == 0:
                    await asyncio.sleep(0.01)
            assert not slow.sessions
        else:
            await first_session(slow)
        await caller.aclose()  # hangs up while the call waits for its AMI channel
        await asyncio.wait_for(call.ended.wait(), WAIT)
        assert call.end_reason == "caller-hangup" and bridge.sessions == {}
        # At once, not after the early connection's idle bound (8 s here): nothing of the call runs.
        await no_call_tasks(str(caller.uuid), timeout=1.0)
        await asyncio.sleep(0.7)  # past the slow handshake: had it gone on, its session would exist now
        if when == "handshake in flight":
            assert not slow.sessions  # the handshake was abandoned: never became a connection
        else:
            async with asyncio.timeout(1.0):
                await closed_unused(slow.sessions[0])
            assert len(slow.sessions) == 1


async def test_a_refused_call_closes_its_early_connection(ami_bridge, ami, sim, dial):
    bridge = await ami_bridge(ami={"channel_wait": 0.5}, audiosocket={"unknown_uuid": "refuse"})
    caller = await dial(bridge)
    early = await first_session(sim)
    assert await caller.wait_ended(WAIT) == "hangup-frame"  # no channel claims the UUID: refused
    await closed_unused(early)
    assert len(sim.sessions) == 1 and bridge.metrics["calls_refused"] == 1
    await no_call_tasks(str(caller.uuid))


async def test_an_early_connection_the_gateway_closed_unconfigured_is_replaced(ami_bridge, ami, dial):
    async with GatewaySim(accepted_keys={API_KEY}, config_timeout_s=0.3) as strict:
        bridge = await ami_bridge(gateway={"url": strict.url, "api_key": API_KEY, "settle_ms": 0})
        events = bridge.events.subscribe()
        caller = await dial(bridge)
        words = speech(1.5, seed=4)
        caller.say(words)
        early = await first_session(strict)
        await asyncio.wait_for(early.closed.wait(), WAIT)  # the service dropped the idle socket
        assert early.closed_by == "server" and early.config is None
        ami.channel_arrives(caller.uuid)
        session = await configured_session(strict)
        assert session is not early and len(strict.sessions) == 2
        await session.wait_audio(len(words), timeout=WAIT)
        assert words in bytes(session.audio)
        e = await answered(events, str(caller.uuid))
        assert e.data["preconnect_used"] == 0
        call = await call_of(bridge, caller)
        assert call.state.name == "ACTIVE"  # connected normally: no fallback, no failure
        await caller.aclose()


async def test_an_early_connection_left_unused_is_closed_after_its_idle_bound(
        ami_bridge, ami, sim, dial, monkeypatch):
    import bridge.session as session_module

    monkeypatch.setattr(session_module, "PRECONNECT_IDLE_MARGIN_S", 0.3)
    bridge = await ami_bridge(ami={"channel_wait": 0.2})  # idle bound 0.5 s; the channel comes at 1.2 s
    # ...but resolution takes longer than any real one would (an unanswered Getvar): 2 s.
    ami.answers["Getvar"] = lambda m: None
    caller = await dial(bridge)
    early = await first_session(sim)
    await asyncio.sleep(0.1)
    ami.channel_arrives(caller.uuid)
    await closed_unused(early)
    session = await configured_session(sim)  # Getvar timed out (2 s x 2): connected afresh
    assert session is not early
    await caller.aclose()


class RefusingFirstSim(GatewaySim):
    """Answers the first ``refuse`` WebSocket upgrades with HTTP 503 (after ``delay_s``), later ones normally."""

    def __init__(self, refuse: int, delay_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refuse = refuse
        self.delay_s = delay_s
        self.requests = 0

    async def _process_request(self, connection: Any, request: Any) -> Any:  # type: ignore[override]
        self.requests += 1
        if self.requests <= self.refuse:
            await asyncio.sleep(self.delay_s)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "busy\n")
        return GatewaySim._process_request(connection, request)


async def test_a_failed_preconnect_is_not_the_calls_failure(ami_bridge, ami, dial):
    async with RefusingFirstSim(1, accepted_keys={API_KEY}) as flaky:
        bridge = await ami_bridge(gateway={"url": flaky.url, "api_key": API_KEY, "settle_ms": 0})
        caller = await dial(bridge)
        async with asyncio.timeout(WAIT):
            while flaky.requests == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        ami.channel_arrives(caller.uuid)
        session = await configured_session(flaky)  # the call connected normally after the channel
        assert flaky.requests == 2 and len(flaky.sessions) == 1 and session.accepted
        call = await call_of(bridge, caller)
        assert call.state.name == "ACTIVE"
        await caller.aclose()


async def test_a_call_that_waited_for_a_failing_handshake_falls_back_once(make_bridge, dial):
    """No correlation to overlap (AMI off): the call's settings are known at once, and the call
    waits for the early handshake still under way — it is the call's connect. When that fails
    (slowly: a loaded or unreachable service) the fallback follows, with no second attempt
    doubling the caller's wait. (A handshake that failed while the settings were still being
    resolved is retried by the ordinary connect: test_a_failed_preconnect_is_not_the_calls_failure.)"""
    async with RefusingFirstSim(10, delay_s=1.0, accepted_keys={API_KEY}) as down:
        bridge = await make_bridge(gateway={"url": down.url, "api_key": API_KEY, "settle_ms": 0})
        events = bridge.events.subscribe()
        t0 = time.monotonic()
        caller = await dial(bridge)
        assert await caller.wait_ended(WAIT) == "hangup-frame"  # the fallback: back to the dialplan
        assert down.requests == 1 and time.monotonic() - t0 < 1.9
        async with asyncio.timeout(WAIT):
            while True:
                e = await events.get()
                if e.type == "call.ended":
                    break
        assert e.data["reason"].startswith("fallback") and "503" in e.data["reason"], e.data["reason"]


async def test_preconnect_off_dials_only_once_the_settings_are_known(ami_bridge, ami, sim, dial):
    bridge = await ami_bridge(gateway={"url": sim.url, "api_key": API_KEY, "settle_ms": 0, "preconnect": False})
    caller = await dial(bridge)
    await asyncio.sleep(0.5)
    assert not sim.sessions
    channel_at = ami.channel_arrives(caller.uuid)
    session = await configured_session(sim)
    assert session.connected_at >= channel_at
    await caller.aclose()


# ---------------------------------------------------------------------------------------- the adapters


async def test_openai_realtime_early_events_are_handed_over_in_order():
    """OpenAI Realtime greets a connection with session.created: kept while the connection waits,
    handed to the adapter before its session.update, and the session works as on a fresh connect."""
    async with OpenAIRealtimeSim(accepted_keys={"sk-test"}) as sim:
        spec = OpenAIRealtimeGateway(sim.url, "sk-test", call_id="c1")
        gw = OpenAIRealtimeGateway(sim.url, "sk-test", call_id="c1", transcription_model=None)
        try:
            await spec.preconnect()
            session = await sim.next_session()
            async with asyncio.timeout(WAIT):
                while not spec._early:
                    await asyncio.sleep(0.01)
            assert [m for m in spec._early if "session.created" in m]
            assert gw.take_preconnected(spec) and spec._ws is None
            await gw.connect(SessionSetup(provider="openai", sample_rate=8000, system_prompt="Hi.", caller_rate=8000))
            assert gw.used_preconnect and gw._early == []
            await session.wait_message("session.update")
            assert len(sim.sessions) == 1 and not session.violations
        finally:
            await gw.close()
            await spec.close()


async def test_an_endpoint_is_what_the_handshake_carries():
    """A different token is a different handshake (Authorization): never handed over. Another
    ready_timeout or VAD is not: the connection moves to the adapter the settings picked."""
    async with GenericWsSim() as sim:
        spec = GenericWsGateway(sim.url, token="t1", call_id="c1")
        try:
            await spec.preconnect()
            other_token = GenericWsGateway(sim.url, token="t2", call_id="c1")
            other_options = GenericWsGateway(sim.url, token="t1", ready_timeout=1.0, call_id="c1")
            assert other_token.endpoint != spec.endpoint and not other_token.take_preconnected(spec)
            assert other_options.endpoint == spec.endpoint and other_options.take_preconnected(spec)
            assert not other_options.take_preconnected(spec) and spec._ws is None  # moved, not shared
            await other_options.close()
            session = await sim.next_session()
            await asyncio.wait_for(session.closed.wait(), WAIT)
            assert session.closed_by == "client"
        finally:
            await spec.close()


async def test_a_ready_that_came_while_the_settings_were_resolved_still_releases_the_greeting():
    """A generic-ws service that says "ready" as soon as it accepts: the message waits with the
    early connection, and is handed over after the opening is built, so the greeting it releases
    (text.input) goes out — the order a fresh connect has always had (found in review)."""
    from websockets.asyncio.server import serve

    got: list[str] = []
    done = asyncio.Event()

    async def service(ws: Any) -> None:
        await ws.send('{"type": "ready"}')
        async for message in ws:
            if isinstance(message, str):
                got.append(__import__("json").loads(message)["type"])
                if got[-1] == "text.input":
                    done.set()

    async with serve(service, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gw = GenericWsGateway(f"ws://127.0.0.1:{port}/", audio_format="pcm16", sample_rate=16000)
        try:
            await gw.preconnect()
            async with asyncio.timeout(WAIT):
                while not gw._early:  # "ready" arrived before the settings
                    await asyncio.sleep(0.01)
            await gw.connect(SessionSetup(provider="x", sample_rate=16000, system_prompt="p",
                                          first_message="Hello there"))
            assert gw.used_preconnect
            async with asyncio.timeout(WAIT):
                await done.wait()
            assert got[:2] == ["session.init", "text.input"]
        finally:
            await gw.close()



class SilentService:
    """A WebSocket service that completes the handshake and then answers nothing, a close frame
    included (as a service that has hung would): records when a close frame came, and when the
    bridge's end of the TCP connection went away."""

    def __init__(self) -> None:
        self.connected, self.got_close, self.eof = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> SilentService:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from websockets.utils import accept_key

        self.connected.set()
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n\r\n")
        while True:
            try:
                data = await reader.read(4096)
            except ConnectionError:
                data = b""
            if not data:
                self.eof.set()
                writer.close()
                return
            if data[0] == 0x88:  # FIN + close: the client's closing handshake began
                self.got_close.set()


async def test_a_cancelled_close_drops_the_socket_at_once():
    """A close cancelled during its closing handshake (the call's teardown was cancelled, the
    service never answers the close frame) drops the TCP connection there and then, rather than
    leave it open until the service closes it (found in review)."""
    async with SilentService() as service:
        gw = GenericWsGateway(service.url, audio_format="pcm16", sample_rate=16000)
        await gw.preconnect()
        closing = asyncio.ensure_future(gw.close())
        await asyncio.wait_for(service.got_close.wait(), WAIT)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        # Well before the closing handshake's own timeout (CLOSE_TIMEOUT_S) would have ended it.
        await asyncio.wait_for(service.eof.wait(), CLOSE_TIMEOUT_S / 2)


async def test_the_calls_connect_does_not_wait_for_the_unused_connection_to_close(ami_bridge, ami, dial):
    """The early connection went to a service that never answers a close frame; the call's profile
    is on another gateway. The call connects there at once, while the unused connection's closing
    handshake runs out its own time beside it (found in review: it used to go first)."""
    async with SilentService() as silent, GatewaySim(accepted_keys={"other-key"}) as other:
        bridge = await ami_bridge(gateway={"url": silent.url}, **sales_on(other))
        ami.variables["AS_PROFILE"] = "sales"
        events = bridge.events.subscribe()
        caller = await dial(bridge)
        await asyncio.wait_for(silent.connected.wait(), WAIT)  # the default profile's gateway, opened early
        ami.channel_arrives(caller.uuid)
        e = await answered(events, str(caller.uuid))
        assert e.data["profile"] == "sales" and e.data["preconnect_used"] == 0
        assert e.data["connect_ms"] < CLOSE_TIMEOUT_S * 1000 / 2, e.data
        await asyncio.wait_for(silent.got_close.wait(), WAIT)  # it was closed, properly begun
        await asyncio.wait_for(silent.eof.wait(), CLOSE_TIMEOUT_S + 3)  # and is gone
        await caller.aclose()
        await no_call_tasks(str(caller.uuid))
