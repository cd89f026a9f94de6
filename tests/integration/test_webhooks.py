"""Webhook delivery against real HTTP servers on loopback (uvicorn), events from a real EventBus."""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from bridge.events import EventBus
from bridge.store import CallStore
from bridge.webhooks import WebhookDispatcher, sign, verify_signature

#: Generous: two shared cores, and the whole suite may be running.
WAIT = 10.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A real HTTP server (uvicorn, raw ASGI) that records every request per path.

    ``script[path]``: statuses to answer, in order (then 200). ``gate[path]``: an asyncio.Event
    the answer waits for (the request is recorded first, so a test can await its arrival).
    """

    def __init__(self) -> None:
        self.requests: dict[str, asyncio.Queue[Received]] = collections.defaultdict(asyncio.Queue)
        self.script: dict[str, list[int]] = {}
        self.gate: dict[str, asyncio.Event] = {}
        self.count: collections.Counter[str] = collections.Counter()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.count[path] += 1
        self.requests[path].put_nowait(Received(path, headers, body, time.monotonic()))
        if (gate := self.gate.get(path)) is not None:
            await gate.wait()
        script = self.script.get(path)
        status = script.pop(0) if script else 200
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def start(self) -> None:
        # Bound and listening before uvicorn runs: clients can connect at once (the kernel queues
        # them), so no waiting for "started".
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, interface="asgi3", lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="webhook-receiver")

    async def stop(self) -> None:
        for gate in self.gate.values():
            gate.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, WAIT)

    async def next(self, path: str, timeout: float = WAIT) -> Received:
        return await asyncio.wait_for(self.requests[path].get(), timeout)


class BlackHole:
    """Accepts connections and reads requests, but never answers: the worst subscriber."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connected.set()
        while await reader.read(65536):
            pass

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


@pytest.fixture
async def receiver():
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def store():
    s = CallStore(None)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def make_dispatcher(store):
    """``make_dispatcher(**kw)`` → a started dispatcher wired to a fresh EventBus (closed after)."""
    made: list[tuple[WebhookDispatcher, httpx.AsyncClient]] = []

    async def factory(**kw: Any) -> tuple[WebhookDispatcher, EventBus]:
        client = httpx.AsyncClient()
        kw = {"backoff_base": 0.05, "backoff_max": 0.2, "timeout": 5.0, **kw}
        d = WebhookDispatcher(store, client, **kw)
        await d.start()
        made.append((d, client))
        bus = EventBus()
        bus.add_sink(d.offer)
        return d, bus

    yield factory
    for d, client in made:
        await d.close()
        await client.aclose()


TRANSCRIPT = [{"role": "assistant", "text": "Guten Tag!", "t": 0.6},
              {"role": "user", "text": "Ich möchte meinen Termin verschieben.", "t": 2.4}]


def publish_call(bus: EventBus, call_id: str, metadata: dict[str, Any] | None = None) -> list[Any]:
    """The events a real CallSession publishes for one call, with the same data keys."""
    meta = dict(metadata or {})
    events = [bus.publish("call.started", call_id, profile="default", direction="inbound", caller="+4930123",
                          caller_name="Ada", called="200", channel="PJSIP/ada-00000001", variables={},
                          metadata=meta),
              bus.publish("call.answered", call_id, profile="default", metadata=meta)]
    for item in TRANSCRIPT:
        events.append(bus.publish("transcript", call_id, **item, metadata=meta))
    events.append(bus.publish("tool.called", call_id, tool="reschedule", tool_call_id="tc-1",
                              args={"day": "friday"}, origin="gateway", metadata=meta))
    events.append(bus.publish("dtmf", call_id, digit="1", metadata=meta))
    events.append(bus.publish("tool.completed", call_id, tool="reschedule", tool_call_id="tc-1", outcome="ok",
                              result="ok", duration_ms=31.0, origin="gateway", metadata=meta))
    events.append(bus.publish("call.ended", call_id, reason="caller-hangup", duration_s=12.5,
                              transcript=list(TRANSCRIPT),
                              tools=[{"tool": "reschedule", "outcome": "ok", "duration_ms": 31.0}],
                              metadata=meta, profile="default", stats={"frames_in": 625}))
    return events


def ended(bus: EventBus, call_id: str) -> Any:
    return bus.publish("call.ended", call_id, reason="caller-hangup", duration_s=1.0, transcript=[], tools=[],
                       metadata={}, profile="default", stats={})


# ------------------------------------------------------------------ delivery and signature


async def test_subscriber_receives_every_event_signed_in_order(receiver, make_dispatcher):
    d, bus = await make_dispatcher()
    hook = await d.create(receiver.url("/all"), None, description="n8n trigger")
    assert set(hook) == {"id", "url", "events", "description", "created_at", "secret"}
    assert hook["events"] == [] and len(hook["secret"]) >= 32

    sent = publish_call(bus, "call-1", metadata={"ticket": "T-9"})
    got = [await receiver.next("/all") for _ in sent]
    assert [r.event["id"] for r in got] == [e.id for e in sent]

    for r, e in zip(got, sent):
        h = r.headers
        assert h["content-type"] == "application/json"
        assert h["user-agent"] == "voxbridge"
        assert h["x-voxbridge-event"] == e.type
        assert h["x-voxbridge-event-id"] == e.id
        assert abs(int(h["x-voxbridge-timestamp"]) - time.time()) < 60
        # Verified exactly as a receiver would: over the raw bytes received.
        assert verify_signature(hook["secret"], h["x-voxbridge-timestamp"], r.body, h["x-voxbridge-signature"])
        assert not verify_signature("wrong-secret", h["x-voxbridge-timestamp"], r.body, h["x-voxbridge-signature"])
        assert r.event == json.loads(json.dumps(e.as_dict()))

    last = got[-1].event
    assert last["type"] == "call.ended" and last["call_id"] == "call-1"
    assert last["data"]["transcript"] == TRANSCRIPT
    assert last["data"]["metadata"] == {"ticket": "T-9"}
    await wait_for(lambda: d.stats()[hook["id"]]["pending"] == 0)
    assert d.stats()[hook["id"]] == {"delivered": len(sent), "failed": 0, "dropped": 0, "pending": 0}


async def test_filter_by_event_type(receiver, make_dispatcher):
    d, bus = await make_dispatcher()
    only_end = await d.create(receiver.url("/end"), ["call.ended"])
    talk = await d.create(receiver.url("/talk"), ["transcript", "call.ended", "transcript"])
    assert talk["events"] == ["transcript", "call.ended"]  # de-duplicated, order kept

    publish_call(bus, "call-2")
    r = await receiver.next("/end")
    assert r.headers["x-voxbridge-event"] == "call.ended"
    types = [(await receiver.next("/talk")).headers["x-voxbridge-event"] for _ in range(3)]
    assert types == ["transcript", "transcript", "call.ended"]
    # Delivery is in order, so once call.ended (the last event) has arrived nothing else can follow.
    assert receiver.requests["/end"].empty() and receiver.requests["/talk"].empty()
    await wait_for(lambda: d.stats()[only_end["id"]]["delivered"] == 1)


async def test_server_errors_are_retried_with_the_same_event_id(receiver, make_dispatcher):
    d, bus = await make_dispatcher()
    hook = await d.create(receiver.url("/flaky"), ["call.ended"])
    receiver.script["/flaky"] = [500, 500]

    event = ended(bus, "call-3")
    attempts = [await receiver.next("/flaky") for _ in range(3)]
    assert [a.headers["x-voxbridge-event-id"] for a in attempts] == [event.id] * 3
    assert all(a.body == attempts[0].body for a in attempts)  # the same bytes every time
    for a in attempts:  # each attempt signed with its own timestamp
        assert verify_signature(hook["secret"], a.headers["x-voxbridge-timestamp"], a.body,
                                a.headers["x-voxbridge-signature"])
    assert attempts[1].at > attempts[0].at  # backoff happened between them
    await wait_for(lambda: d.stats()[hook["id"]]["pending"] == 0)
    assert d.stats()[hook["id"]] == {"delivered": 1, "failed": 0, "dropped": 0, "pending": 0}
    assert receiver.count["/flaky"] == 3


async def test_gives_up_after_max_attempts_and_carries_on(receiver, make_dispatcher):
    d, bus = await make_dispatcher(max_attempts=3)
    hook = await d.create(receiver.url("/down"), ["call.ended"])
    receiver.script["/down"] = [503, 503, 503]
    first = ended(bus, "call-4a")
    second = ended(bus, "call-4b")
    ids = [(await receiver.next("/down")).headers["x-voxbridge-event-id"] for _ in range(4)]
    assert ids == [first.id] * 3 + [second.id]
    await wait_for(lambda: d.stats()[hook["id"]]["pending"] == 0)
    assert d.stats()[hook["id"]] == {"delivered": 1, "failed": 1, "dropped": 0, "pending": 0}


async def test_connection_refused_is_retried(make_dispatcher):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d, bus = await make_dispatcher(max_attempts=2)
    hook = await d.create(f"http://127.0.0.1:{port}/nobody", None)
    ended(bus, "call-5")
    await wait_for(lambda: d.stats()[hook["id"]]["failed"] == 1)
    assert d.stats()[hook["id"]]["delivered"] == 0


# ------------------------------------------------------------------ isolation and bounds


async def test_a_dead_subscriber_does_not_delay_another(receiver, make_dispatcher):
    hole = BlackHole()
    dead_url = await hole.start()
    try:
        d, bus = await make_dispatcher(timeout=30.0, queue_size=50, close_timeout=0.5)
        dead = await d.create(dead_url, None)
        live = await d.create(receiver.url("/live"), None)
        t0 = time.monotonic()
        sent = [ended(bus, f"call-6-{i}") for i in range(20)]
        got = [await receiver.next("/live") for _ in sent]
        elapsed = time.monotonic() - t0
        assert [r.headers["x-voxbridge-event-id"] for r in got] == [e.id for e in sent]
        # Well inside the dead subscriber's 30 s timeout: nothing waited for it.
        assert elapsed < 10.0
        await asyncio.wait_for(hole.connected.wait(), WAIT)
        assert d.stats()[dead["id"]] == {"delivered": 0, "failed": 0, "dropped": 0, "pending": 20}
        await wait_for(lambda: d.stats()[live["id"]]["delivered"] == 20)
        t0 = time.monotonic()
        await d.close()  # bounded: does not wait 30 s for the black hole
        assert time.monotonic() - t0 < 5.0
    finally:
        await hole.stop()


async def test_queue_overflow_drops_the_oldest_and_counts(receiver, make_dispatcher):
    d, bus = await make_dispatcher(queue_size=5)
    hook = await d.create(receiver.url("/slow"), None)
    receiver.gate["/slow"] = gate = asyncio.Event()

    first = ended(bus, "call-7-0")
    assert (await receiver.next("/slow")).headers["x-voxbridge-event-id"] == first.id  # now held in flight
    rest = [ended(bus, f"call-7-{i}") for i in range(1, 11)]  # 10 more into a queue of 5
    assert d.stats()[hook["id"]] == {"delivered": 0, "failed": 0, "dropped": 5, "pending": 6}

    gate.set()
    got = [(await receiver.next("/slow")).headers["x-voxbridge-event-id"] for _ in range(5)]
    assert got == [e.id for e in rest[-5:]]  # the newest five survived, in order
    await wait_for(lambda: d.stats()[hook["id"]]["pending"] == 0)
    assert d.stats()[hook["id"]] == {"delivered": 6, "failed": 0, "dropped": 5, "pending": 0}


async def test_offer_never_blocks_the_publisher(receiver, make_dispatcher):
    d, bus = await make_dispatcher(queue_size=100, close_timeout=0.2)
    receiver.gate["/held"] = asyncio.Event()
    hook = await d.create(receiver.url("/held"), None)
    t0 = time.perf_counter()
    for i in range(5000):
        ended(bus, f"call-8-{i}")
    assert time.perf_counter() - t0 < 2.0
    assert d.stats()[hook["id"]]["pending"] <= 101


async def test_no_delivery_task_outlives_its_work(receiver, make_dispatcher, no_leaked_tasks):
    d, bus = await make_dispatcher()
    hook = await d.create(receiver.url("/idle"), None)
    sent = publish_call(bus, "call-13")
    for _ in sent:
        await receiver.next("/idle")
    await no_leaked_tasks()  # the subscription stays; its delivery task does not
    assert d.stats()[hook["id"]] == {"delivered": len(sent), "failed": 0, "dropped": 0, "pending": 0}
    ended(bus, "call-13b")  # and it comes back for the next event
    await receiver.next("/idle")


async def test_close_lets_queued_events_go_out(receiver, make_dispatcher):
    d, bus = await make_dispatcher()
    hook = await d.create(receiver.url("/last"), None)
    sent = [ended(bus, f"call-12-{i}") for i in range(3)]
    await d.close()  # at shutdown, right after the last calls' call.ended
    assert receiver.count["/last"] == 3
    assert [(await receiver.next("/last")).headers["x-voxbridge-event-id"] for _ in sent] == [e.id for e in sent]
    assert d.stats()[hook["id"]]["delivered"] == 3
    ended(bus, "after-close")  # ignored, no error


# ------------------------------------------------------------------ subscription life cycle


async def test_delete_stops_delivery(receiver, make_dispatcher, store):
    d, bus = await make_dispatcher()
    gone = await d.create(receiver.url("/gone"), None)
    control = await d.create(receiver.url("/control"), None)
    ended(bus, "call-9a")
    await receiver.next("/gone")
    await receiver.next("/control")

    # Delete while a delivery is in flight and more are queued: all abandoned.
    receiver.gate["/gone"] = asyncio.Event()
    ended(bus, "call-9b")
    ended(bus, "call-9c")
    await receiver.next("/gone")  # held by the gate
    assert await d.delete(gone["id"]) is True
    assert await d.delete(gone["id"]) is False
    assert await d.get(gone["id"]) is None
    assert gone["id"] not in d.stats()
    assert await store.get_webhook(gone["id"]) is None
    receiver.gate["/gone"].set()

    last = ended(bus, "call-9d")
    ids = [(await receiver.next("/control")).headers["x-voxbridge-event-id"] for _ in range(3)]
    assert ids[-1] == last.id
    assert receiver.requests["/gone"].empty()  # nothing after the deletion (call-9c never went out)
    assert [h["id"] for h in await d.list()] == [control["id"]]


async def test_410_gone_removes_the_subscription(receiver, make_dispatcher, store):
    d, bus = await make_dispatcher()
    hook = await d.create(receiver.url("/unsubscribed"), None)
    receiver.script["/unsubscribed"] = [410]
    ended(bus, "call-10")
    await receiver.next("/unsubscribed")
    await wait_for(lambda: hook["id"] not in d.stats())
    assert await d.get(hook["id"]) is None
    assert await store.get_webhook(hook["id"]) is None
    assert receiver.count["/unsubscribed"] == 1  # not retried


async def test_subscriptions_are_loaded_from_the_store_on_start(receiver, store):
    hook = await store.add_webhook(receiver.url("/persisted"), ["call.ended"], "persisted-secret", None)
    async with httpx.AsyncClient() as client:
        d = WebhookDispatcher(store, client, backoff_base=0.05)
        await d.start()
        try:
            assert [h["id"] for h in await d.list()] == [hook["id"]]
            assert "secret" not in (await d.get(hook["id"]))
            bus = EventBus()
            bus.add_sink(d.offer)
            ended(bus, "call-11")
            r = await receiver.next("/persisted")
            assert verify_signature("persisted-secret", r.headers["x-voxbridge-timestamp"], r.body,
                                    r.headers["x-voxbridge-signature"])
        finally:
            await d.close()


async def test_create_validates(make_dispatcher):
    d, _ = await make_dispatcher()
    with pytest.raises(ValueError, match="call.finished"):
        await d.create("https://example.com/hook", ["call.ended", "call.finished"])
    for bad in ("ftp://example.com/hook", "/relative", "not a url", "https://"):
        with pytest.raises(ValueError):
            await d.create(bad, None)
    with pytest.raises(ValueError, match="secret"):
        await d.create("https://example.com/hook", None, secret="")
    assert await d.list() == []
    hook = await d.create("https://example.com/hook", None, secret="mine")
    assert hook["secret"] == "mine"


# ------------------------------------------------------------------ the receiver's helper


def test_verify_signature():
    body = b'{"id":"e1","type":"call.ended"}'
    sig = sign("s3cret", "1700000000", body)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify_signature("s3cret", "1700000000", body, sig, now=1700000100)
    assert verify_signature("s3cret", "1700000000", body, sig, tolerance_s=None)
    assert not verify_signature("s3cret", "1700000000", body, sig, now=1700000301)  # too old: a replay
    assert not verify_signature("s3cret", "1700000000", body, sig, now=1699999699)  # from the future
    assert not verify_signature("s3cret", "1700000000", body + b" ", sig, now=1700000000)
    assert not verify_signature("s3cret", "1700000001", body, sig, now=1700000000)
    assert not verify_signature("other", "1700000000", body, sig, now=1700000000)
    assert not verify_signature("s3cret", "1700000000", body, sig[7:], now=1700000000)  # prefix required
    assert not verify_signature("s3cret", "soon", body, sig, tolerance_s=None)
    assert not verify_signature("s3cret", "1700000000", body, "sha256=ü", now=1700000000)


async def wait_for(predicate: Any, timeout: float = WAIT) -> None:
    """Counters change without an event to await: poll them, bounded."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
