"""Webhook delivery against real HTTP servers on loopback (uvicorn), events from a real EventBus;
the egress policy (allow.webhooks, address checks, DNS rebinding) and the subscription cap, also
through the control API of a real Bridge."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import bridge.webhooks
from bridge.egress import EgressPolicy
from bridge.events import EventBus
from bridge.store import CallStore
from bridge.supervise import Supervisor
from bridge.webhooks import WebhookDispatcher, sign, verify_signature
from tests.http_receiver import WAIT, HttpReceiver


class Receiver(HttpReceiver):
    """The subscriber: ``script[path]`` statuses in order (then 200), ``gate[path]`` holds the answer
    (tests/http_receiver.py)."""


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

    for r, e in zip(got, sent, strict=True):
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
    # Any public https host may be subscribed here; a fake resolver answers for example.com.
    d, _ = await make_dispatcher(
        policy=EgressPolicy(["https://"], resolver=FakeDns({"example.com": ["93.184.215.14"]})))
    with pytest.raises(ValueError, match=r"call.finished"):
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


# ------------------------------------------------------------------ where deliveries may go


class FakeDns:
    """A resolver the test controls (a rebinding DNS, say); records every question."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.answers[host])


async def test_a_hostname_is_delivered_to_the_checked_address(receiver, make_dispatcher):
    # hooks.example.test exists only in this resolver: the delivery can reach the receiver only
    # by connecting to the address the policy checked, with the name in the Host header.
    dns = FakeDns({"hooks.example.test": ["127.0.0.1"]})
    d, bus = await make_dispatcher(policy=EgressPolicy([f"http://hooks.example.test:{receiver.port}"], resolver=dns))
    hook = await d.create(f"http://hooks.example.test:{receiver.port}/named?token=t1", None)
    assert dns.asked == ["hooks.example.test"]  # checked at registration
    event = ended(bus, "call-20")
    r = await receiver.next("/named")
    assert r.headers["host"] == f"hooks.example.test:{receiver.port}"
    assert r.headers["x-voxbridge-event-id"] == event.id
    assert dns.asked == ["hooks.example.test"] * 2  # and again at delivery
    await wait_for(lambda: d.stats()[hook["id"]]["delivered"] == 1)


async def test_the_next_checked_address_is_tried_when_one_refuses_connections(receiver, make_dispatcher):
    # The receiver listens on 127.0.0.1 only: 127.0.0.2 refuses the connection (as ::1 does for
    # n8n listening on 127.0.0.1 when "localhost" resolves to ::1 first).
    dns = FakeDns({"n8n.example.test": ["127.0.0.2", "127.0.0.1"]})
    d, bus = await make_dispatcher(policy=EgressPolicy(["http://n8n.example.test"], resolver=dns), max_attempts=1)
    hook = await d.create(f"http://n8n.example.test:{receiver.port}/second", None)
    ended(bus, "call-21")
    assert (await receiver.next("/second")).headers["host"] == f"n8n.example.test:{receiver.port}"
    await wait_for(lambda: d.stats()[hook["id"]]["delivered"] == 1)
    assert d.stats()[hook["id"]]["failed"] == 0


async def test_dns_rebinding_at_delivery_is_refused_and_counted(receiver, make_dispatcher, caplog):
    dns = FakeDns({"rebind.example.test": ["127.0.0.1"]})
    d, bus = await make_dispatcher(policy=EgressPolicy(["http://rebind.example.test"], resolver=dns))
    hook = await d.create(f"http://rebind.example.test:{receiver.port}/rebind/secret-path", None)

    # Between registration and delivery the name starts answering the metadata address.
    dns.answers["rebind.example.test"] = ["169.254.169.254"]
    ended(bus, "call-22")
    await wait_for(lambda: d.stats()[hook["id"]]["failed"] == 1)
    assert d.stats()[hook["id"]] == {"delivered": 0, "failed": 1, "dropped": 0, "pending": 0}
    assert d.totals["refused"] == 1 and d.totals["failed"] == 1
    assert dns.asked == ["rebind.example.test"] * 2  # one attempt: a refusal is not retried
    assert receiver.count["/rebind/secret-path"] == 0
    refusal = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(refusal) == 1
    assert hook["id"] in refusal[0] and "rebind.example.test" in refusal[0] and "169.254.169.254" in refusal[0]
    assert "secret-path" not in caplog.text  # logs name the host, never the full URL

    # Mixed answers are refused too; once the name is honest again, deliveries resume.
    dns.answers["rebind.example.test"] = ["127.0.0.1", "169.254.169.254"]
    ended(bus, "call-22b")
    await wait_for(lambda: d.stats()[hook["id"]]["failed"] == 2)
    dns.answers["rebind.example.test"] = ["127.0.0.1"]
    event = ended(bus, "call-22c")
    assert (await receiver.next("/rebind/secret-path")).headers["x-voxbridge-event-id"] == event.id
    assert receiver.count["/rebind/secret-path"] == 1


async def test_https_is_pinned_with_the_name_as_sni(make_dispatcher):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    dns = FakeDns({"hooks.example.com": ["93.184.215.14"]})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        store = CallStore(None)
        await store.start()
        d = WebhookDispatcher(store, client, policy=EgressPolicy(["https://"], resolver=dns))
        try:
            await d.start()
            await d.create("https://hooks.example.com/in?x=1", None)
            bus = EventBus()
            bus.add_sink(d.offer)
            ended(bus, "call-23")
            await wait_for(lambda: len(seen) == 1)
        finally:
            await d.close()
            await store.close()
    request = seen[0]
    assert str(request.url) == "https://93.184.215.14/in?x=1"  # the checked address, path and query kept
    assert request.headers["host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"  # the certificate is checked for the name
    assert request.headers["connection"] == "close"  # never reused for another name on that address


async def test_private_addresses_need_an_entry_naming_them(make_dispatcher):
    d, _ = await make_dispatcher()  # the default list: this host only
    for url in ("http://10.23.45.67:5678/webhook/x", "http://192.168.1.10/", "http://[fd00::1]/"):
        with pytest.raises(ValueError, match="not allowed"):
            await d.create(url, None)
    d2, _ = await make_dispatcher(policy=EgressPolicy(["http://10.23.45.67:5678"]))
    hook = await d2.create("http://10.23.45.67:5678/webhook/x", None)  # literal: no DNS, nothing sent
    assert hook["url"] == "http://10.23.45.67:5678/webhook/x"
    with pytest.raises(ValueError, match="not allowed"):
        await d2.create("http://10.23.45.67:5679/webhook/x", None)


async def test_default_list_accepts_a_receiver_on_this_host(make_dispatcher):
    d, _ = await make_dispatcher()
    for url in ("http://127.0.0.1:5678/webhook/x", "http://localhost:5678/webhook/x", "http://[::1]:5678/webhook/x"):
        assert (await d.create(url, ["call.ended"]))["url"] == url  # stored exactly as given (n8n compares it)
    d2, _ = await make_dispatcher(policy=EgressPolicy(["http://n8n.example.test"], resolver=FakeDns({})))
    before = await d2.list()  # (the same store: the three above)
    with pytest.raises(ValueError, match=r"cannot resolve n8n.example.test: Name or service not known"):
        await d2.create("http://n8n.example.test:5678/webhook/x", None)
    assert await d2.list() == before


async def test_stored_subscriptions_the_policy_now_refuses_are_kept_but_not_delivered(receiver, store, caplog):
    refused = await store.add_webhook("http://10.23.45.67:5678/webhook/x", [], "s3cret-one", None)
    metadata = await store.add_webhook("http://2852039166/latest/meta-data/", [], "s3cret-two", None)
    fine = await store.add_webhook(receiver.url("/kept"), [], "s3cret-three", None)
    async with httpx.AsyncClient() as client:
        d = WebhookDispatcher(store, client, backoff_base=0.05)
        await d.start()
        try:
            assert [h["id"] for h in await d.list()] == [refused["id"], metadata["id"], fine["id"]]
            warnings = [r.getMessage() for r in caplog.records if "not delivered to" in r.getMessage()]
            assert len(warnings) == 2 and refused["id"] in warnings[0] and metadata["id"] in warnings[1]
            assert "webhook/x" not in caplog.text and "meta-data" not in caplog.text
            bus = EventBus()
            bus.add_sink(d.offer)
            for i in range(3):
                ended(bus, f"call-24-{i}")
            for _ in range(3):
                await receiver.next("/kept")
            assert d.stats()[refused["id"]] == {"delivered": 0, "failed": 0, "dropped": 0, "pending": 0}
            assert d.stats()[metadata["id"]]["pending"] == 0
            assert len([r for r in caplog.records if "not delivered to" in r.getMessage()]) == 2  # once, at start
            assert await d.delete(refused["id"]) is True  # and can be deleted
        finally:
            await d.close()


async def test_the_number_of_subscriptions_is_capped(receiver, make_dispatcher):
    dns = FakeDns({"hooks.example.test": ["127.0.0.1"]})
    d, _ = await make_dispatcher(max_webhooks=3, policy=EgressPolicy(["http://hooks.example.test"], resolver=dns))
    # Concurrent creations (each awaits its DNS check) cannot overshoot the cap.
    results = await asyncio.gather(*(d.create(f"http://hooks.example.test/{i}", None) for i in range(5)),
                                   return_exceptions=True)
    made = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(made) == 3 and len(errors) == 2
    assert all(isinstance(e, ValueError) and str(e) == "too many webhook subscriptions (3): delete one first"
               for e in errors)
    assert len(await d.list()) == 3
    with pytest.raises(ValueError, match=r"too many webhook subscriptions \(3\): delete one first"):
        await d.create("http://hooks.example.test/again", None)
    await d.delete(made[0]["id"])
    # A refused URL does not use up the place that frees.
    with pytest.raises(ValueError, match="metadata"):
        await d.create("http://169.254.169.254/", None)
    dns.answers["hooks.example.test"] = ["169.254.169.254"]
    with pytest.raises(ValueError, match=r"resolves to 169.254.169.254"):
        await d.create("http://hooks.example.test/rebound", None)
    dns.answers["hooks.example.test"] = ["127.0.0.1"]
    await d.create("http://hooks.example.test/again", None)
    assert len(await d.list()) == 3


# ------------------------------------------------------------------ supervision


async def test_a_crashing_worker_is_logged_counted_and_replaced(receiver, make_dispatcher, monkeypatch, caplog):
    supervisor = Supervisor()
    d, bus = await make_dispatcher(supervisor=supervisor)
    hook = await d.create(receiver.url("/after-crash"), None)
    real_sign = bridge.webhooks.sign
    calls = 0

    def sign_once_broken(secret: str, timestamp: str, body: bytes) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug in signing")
        return real_sign(secret, timestamp, body)

    monkeypatch.setattr(bridge.webhooks, "sign", sign_once_broken)
    lost = ended(bus, "call-25a")  # the worker crashes on this one
    queued = [ended(bus, f"call-25-{i}") for i in range(3)]  # already queued behind it
    # No new event arrives: the queued ones go out only because a fresh worker was started.
    got = [(await receiver.next("/after-crash")).headers["x-voxbridge-event-id"] for _ in queued]
    assert got == [e.id for e in queued]
    assert lost.id not in got
    assert supervisor.crashes["webhooks"] == 1
    crash = [r for r in caplog.records if "webhooks crashed" in r.getMessage()]
    assert len(crash) == 1 and crash[0].exc_info is not None and "a bug in signing" in str(crash[0].exc_info[1])
    await wait_for(lambda: d.stats()[hook["id"]]["pending"] == 0)
    assert d.stats()[hook["id"]] == {"delivered": 3, "failed": 1, "dropped": 0, "pending": 0}
    later = ended(bus, "call-25b")  # and it keeps delivering
    assert (await receiver.next("/after-crash")).headers["x-voxbridge-event-id"] == later.id


# ------------------------------------------------------------------ through the control API of a Bridge

API_TOKEN = "webhook-test-token-0123"


@pytest.fixture
async def api(make_bridge):
    """``await api(**config)`` → (bridge, client) with the control API on a loopback port."""
    clients: list[httpx.AsyncClient] = []

    async def factory(**config: Any) -> tuple[Any, httpx.AsyncClient]:
        b = await make_bridge(api={"enabled": True, "listen": "127.0.0.1:0", "token": API_TOKEN,
                                   **config.pop("api", {})}, **config)
        c = httpx.AsyncClient(base_url=f"http://127.0.0.1:{b.api.port}",
                              headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=WAIT)
        clients.append(c)
        return b, c

    yield factory
    for c in clients:
        await c.aclose()


async def test_api_refuses_inside_addresses(api):
    from tests.unit.test_egress import NEVER_URLS

    _, client = await api()
    reasons = {
        "http://169.254.169.254/latest/meta-data/": "cloud metadata",
        "http://10.23.45.67:5678/webhook/x": "not allowed",
        "http://[fe80::1]/hook": "link-local",
        "http://2852039166/": "cloud metadata",
        "http://127.0.0.1.evil.com/": "not allowed",
        "http://127.0.0.1@evil.com/": "user name or password",
        "http://192.168.1.1:5678/": "not allowed",
    }
    for url, why in reasons.items():
        r = await client.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 422 and why in r.text, (url, r.status_code, r.text)
    for url in NEVER_URLS:
        r = await client.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 422, (url, r.status_code, r.text)
    assert (await client.get("/v1/webhooks")).json() == {"webhooks": []}
    # What the n8n trigger registers (n8n on this host) is accepted as it is.
    for url in ("http://127.0.0.1:5678/webhook/3f1c/webhook", "http://localhost:5678/webhook/x"):
        r = await client.post("/v1/webhooks", json={"url": url, "events": ["call.ended"]})
        assert r.status_code == 201 and r.json()["url"] == url, r.text


async def test_api_allow_list_and_cap_come_from_the_config(api):
    _, client = await api(api={"max_webhooks": 2}, allow={"webhooks": ["http://10.23.45.67:5678/webhook"]})
    r = await client.post("/v1/webhooks", json={"url": "http://127.0.0.1:5678/webhook/x"})
    assert r.status_code == 422 and "allow.webhooks permits http://10.23.45.67:5678/webhook" in r.text
    for path in ("a", "b"):
        r = await client.post("/v1/webhooks", json={"url": f"http://10.23.45.67:5678/webhook/{path}"})
        assert r.status_code == 201, r.text
    r = await client.post("/v1/webhooks", json={"url": "http://10.23.45.67:5678/webhook/c"})
    assert r.status_code == 422 and r.json()["detail"] == "too many webhook subscriptions (2): delete one first"


async def test_metrics_count_deliveries_and_failures_across_deletion(api, receiver):
    bridge_, client = await api()
    r = await client.post("/v1/webhooks", json={"url": receiver.url("/metered"), "events": ["call.ended"]})
    hook = r.json()
    event = ended(bridge_.events, "call-26")
    assert (await receiver.next("/metered")).headers["x-voxbridge-event-id"] == event.id
    await wait_for(lambda: bridge_.webhooks.totals["delivered"] == 1)
    assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bridge_.webhooks.max_attempts = 1
    r = await client.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/nobody"})
    assert r.status_code == 201
    ended(bridge_.events, "call-27")
    await wait_for(lambda: bridge_.webhooks.totals["failed"] == 1)
    families = {f.name: f for f in text_string_to_metric_families((await client.get("/metrics")).text)}
    values = {name: families[name].samples[0].value
              for name in ("voxbridge_webhook_deliveries", "voxbridge_webhook_failures", "voxbridge_webhook_refused",
                           "voxbridge_webhook_events_dropped")}
    assert values == {"voxbridge_webhook_deliveries": 1,  # the deleted subscription's delivery still counts
                      "voxbridge_webhook_failures": 1, "voxbridge_webhook_refused": 0,
                      "voxbridge_webhook_events_dropped": 0}
    assert all(families[name].type == "counter" and families[name].documentation for name in values)
