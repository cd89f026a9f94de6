"""The control API over real HTTP on loopback, with real calls through the bridge."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from bridge.app import Bridge
from bridge.config import Config, ConfigError
from bridge.devtools.gateway_sim import tone as sim_tone

from .conftest import accepted

pytestmark = pytest.mark.timeout(60)
TOKEN = "api-token-0123456789"


@pytest.fixture
async def api_bridge(make_bridge, tmp_path):
    bridge = await make_bridge(
        api={"enabled": True, "listen": "127.0.0.1:0", "token": TOKEN},
        store={"path": str(tmp_path / "calls.db")},
        allow={"calls": [r"\+4420\d{8}"]},
        profiles={"default": {"first_message": None}, "sales": {"first_message": None, "voice": "Edward"}},
    )
    return bridge


@pytest.fixture
async def client(api_bridge):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_bridge.api.port}",
                                 headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as c:
        yield c


async def test_auth_is_required_and_compared_exactly(api_bridge, client):
    base = f"http://127.0.0.1:{api_bridge.api.port}"
    async with httpx.AsyncClient(base_url=base) as anon:
        assert (await anon.get("/v1/health")).json()["status"] == "ok"  # health is public
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}):
            for method, path in (("GET", "/v1/auth"), ("GET", "/v1/calls"), ("POST", "/v1/calls"),
                                 ("GET", "/v1/webhooks"), ("GET", "/metrics"), ("GET", "/v1/events")):
                r = await anon.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
    assert (await client.get("/v1/auth")).json() == {"ok": True}


async def test_refuses_to_listen_beyond_loopback_without_a_token(sim):
    cfg = Config.model_validate({"audiosocket": {"listen": "127.0.0.1:0"}, "api": {"listen": "0.0.0.0:0"},
                                 "gateway": {"url": sim.url, "api_key": "k"}})
    bridge = Bridge(cfg)
    with pytest.raises(ConfigError, match=r"not a loopback address: set api.token"):
        await bridge.start()
    await bridge.stop()


async def test_profiles_and_openapi(client):
    profiles = (await client.get("/v1/profiles")).json()["profiles"]
    assert {p["name"] for p in profiles} == {"default", "sales"}
    assert next(p for p in profiles if p["name"] == "sales")["voice"] == "Edward"
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/calls/{call_id}/transfer" in schema["paths"]


async def test_start_call_errors_are_precise(client):
    r = await client.post("/v1/calls", json={"destination": "+19005550100"})
    assert r.status_code == 403 and "not allowed" in r.json()["detail"]
    r = await client.post("/v1/calls", json={"destination": "+442071234567", "profile": "nope"})
    assert r.status_code == 404 and "no profile 'nope'" in r.json()["detail"]
    r = await client.post("/v1/calls", json={"destination": "+442071234567"})
    assert r.status_code == 503 and "needs AMI" in r.json()["detail"]  # this bridge has no AMI
    r = await client.post("/v1/calls", json={"destination": "+442071234567", "variables": {"bad name": "x"}})
    assert r.status_code == 422
    r = await client.post("/v1/calls", json={"destination": "+44\n2071234567"})
    assert r.status_code == 422
    r = await client.post("/v1/calls", json={"destination": "+442071234567", "surprise": 1})
    assert r.status_code == 422  # unknown fields are refused, not ignored


async def test_live_call_get_list_hangup_and_history(api_bridge, client, sim, dial):
    caller = await dial(api_bridge)
    session = await accepted(sim)
    call_id = str(caller.uuid)
    await session.transcript("assistant", "Hello, how can I help?")
    await session.transcript("user", "Where is my order?")
    async with asyncio.timeout(5):
        while len((await client.get(f"/v1/calls/{call_id}")).json()["transcript"]) < 2:
            await asyncio.sleep(0.05)
    live = (await client.get(f"/v1/calls/{call_id}")).json()
    assert live["state"] == "active" and live["direction"] == "inbound" and live["profile"] == "default"
    assert [t["text"] for t in live["transcript"]] == ["Hello, how can I help?", "Where is my order?"]
    active = (await client.get("/v1/calls", params={"state": "active"})).json()["calls"]
    assert call_id in [c["call_id"] for c in active]

    r = await client.post(f"/v1/calls/{call_id}/transfer", json={"extension": "100"})
    assert r.status_code == 403  # nothing is allowlisted for transfer here
    r = await client.post(f"/v1/calls/{call_id}/dtmf", json={"digits": "12"})
    assert r.status_code == 409 and "AMI" in r.json()["detail"]

    r = await client.post(f"/v1/calls/{call_id}/hangup")
    assert r.json() == {"call_id": call_id, "state": "ending"}
    assert await caller.wait_ended(3) == "hangup-frame"
    async with asyncio.timeout(5):
        while call_id in api_bridge.sessions:
            await asyncio.sleep(0.02)
    assert (await client.post(f"/v1/calls/{call_id}/hangup")).status_code == 409
    async with asyncio.timeout(5):
        while (ended := (await client.get(f"/v1/calls/{call_id}")).json())["state"] != "ended":
            await asyncio.sleep(0.05)
    assert ended["end_reason"] == "api-hangup" and len(ended["transcript"]) == 2
    assert (await client.get("/v1/calls/no-such-call")).status_code == 404
    listed = (await client.get("/v1/calls", params={"state": "ended"})).json()["calls"]
    assert call_id in [c["call_id"] for c in listed]


async def test_event_stream_delivers_call_events(api_bridge, client, sim, dial):
    events: list[dict] = []
    got_end = asyncio.Event()

    async def read() -> None:
        async with client.stream("GET", "/v1/events", params={"types": "call.started,call.ended"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["type"] == "call.ended":
                        got_end.set()
                        return

    reader = asyncio.create_task(read())
    async with asyncio.timeout(5):
        while not api_bridge.events._subs:
            await asyncio.sleep(0.01)
    caller = await dial(api_bridge)
    await accepted(sim)
    caller.hangup()
    await asyncio.wait_for(got_end.wait(), 10)
    await reader
    assert [e["type"] for e in events] == ["call.started", "call.ended"]
    assert all(e["call_id"] == str(caller.uuid) for e in events)
    r = await client.get("/v1/events", params={"types": "call.exploded"})
    assert r.status_code == 422


async def test_metrics(api_bridge, client, dial, sim):
    await dial(api_bridge)
    await accepted(sim)
    text = (await client.get("/metrics")).text
    assert "voxbridge_calls_active 1" in text and "voxbridge_calls_total 1" in text
    assert "# TYPE voxbridge_playout_late_ticks_total counter" in text


class Receiver:
    """A real HTTP server that records webhook deliveries (raw body + headers)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.changed = asyncio.Event()
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> dict[str, bool]:
            self.deliveries.append((dict(request.headers), await request.body()))
            self.changed.set()
            return {"ok": True}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))

    async def __aenter__(self) -> Receiver:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.should_exit = True
        await self.task

    async def wait_for(self, event_type: str, timeout: float = 10) -> tuple[dict[str, str], bytes]:
        async with asyncio.timeout(timeout):
            while True:
                for headers, body in self.deliveries:
                    if headers.get("x-voxbridge-event") == event_type:
                        return headers, body
                self.changed.clear()
                await self.changed.wait()


async def test_webhook_subscriber_receives_call_ended_with_transcript(api_bridge, client, sim, dial):
    async with Receiver() as receiver:
        r = await client.post("/v1/webhooks", json={"url": receiver.url, "events": ["call.ended"],
                                                    "description": "test"})
        assert r.status_code == 201
        hook = r.json()
        secret = hook["secret"]
        assert len(secret) >= 32
        listed = (await client.get("/v1/webhooks")).json()["webhooks"]
        assert [h["url"] for h in listed] == [receiver.url] and "secret" not in listed[0]
        assert (await client.get(f"/v1/webhooks/{hook['id']}")).json()["events"] == ["call.ended"]

        caller = await dial(api_bridge)
        session = await accepted(sim)
        await session.transcript("user", "I would like a refund")
        await session.send_audio(sim_tone(440, 200, 8000))
        async with asyncio.timeout(5):
            while not api_bridge.sessions[str(caller.uuid)].transcript:
                await asyncio.sleep(0.02)
        caller.hangup()
        headers, body = await receiver.wait_for("call.ended")
        expected = hmac.new(secret.encode(), f"{headers['x-voxbridge-timestamp']}.".encode() + body,
                            hashlib.sha256).hexdigest()
        assert headers["x-voxbridge-signature"] == f"sha256={expected}"
        event = json.loads(body)
        assert event["type"] == "call.ended" and event["call_id"] == str(caller.uuid)
        assert headers["x-voxbridge-event-id"] == event["id"]
        assert [t["text"] for t in event["data"]["transcript"]] == ["I would like a refund"]
        assert {h.get("x-voxbridge-event") for h, _ in receiver.deliveries} == {"call.ended"}  # filtered

        assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
        assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 404
        bad = await client.post("/v1/webhooks", json={"url": receiver.url, "events": ["call.exploded"]})
        assert bad.status_code == 422 and "call.exploded" in bad.text
