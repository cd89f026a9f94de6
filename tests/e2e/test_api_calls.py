"""AI calls started through the control API, placed by a real Asterisk, answered by the bridge."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.devtools.gateway_sim import GatewaySim

from .asterisk import AsteriskSandbox

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

KEY = "e2e-key"
TOKEN = "e2e-api-token-0123456789"
# A callee that answers and stays on the line (the sandbox's `answer` hangs up after 2 s).
CALLEE = """
[voxbridge-outbound]
exten => patient,1,Answer()
 same => n,Wait(30)
 same => n,Hangup()
"""


@pytest.fixture
def asterisk(make_asterisk):
    return make_asterisk(CALLEE)


@pytest.fixture
async def bridge(asterisk: AsteriskSandbox, tmp_path):
    async with GatewaySim(accepted_keys={KEY}) as sim:
        cfg = Config.model_validate({
            "audiosocket": {"listen": f"127.0.0.1:{asterisk.audiosocket_port}"},
            "gateway": {"url": sim.url, "api_key": KEY, "settle_ms": 0},
            "api": {"enabled": True, "listen": "127.0.0.1:0", "token": TOKEN},
            "store": {"path": str(tmp_path / "calls.db")},
            "ami": {"enabled": True, "port": asterisk.ami_port, "username": asterisk.ami_username,
                    "secret": asterisk.ami_secret},
            "allow": {"calls": ["patient", "busy"]},
            "outbound": {"channel": "Local/{destination}@voxbridge-outbound", "context": "voxbridge-ai",
                         "exten": "ai", "ring_timeout": 5},
            "profiles": {"default": {"first_message": None},
                         "collections": {"first_message": "Hi {name}",
                                         "prompt": "Remind {name} about invoice {invoice}."}},
        })
        b = Bridge(cfg)
        await b.start()
        await b.ami.wait_connected(10)
        b.sim = sim  # type: ignore[attr-defined]
        try:
            yield b
        finally:
            await b.stop()


@pytest.fixture
async def client(bridge):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.api.port}",
                                 headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as c:
        yield c


async def test_api_call_reaches_the_bridge_with_its_profile_and_metadata(bridge, client):
    events = bridge.events.subscribe()
    r = await client.post("/v1/calls", json={
        "destination": "patient", "profile": "collections",
        "variables": {"name": "Ana", "invoice": "F-2291"}, "metadata": {"lead_id": 42, "source": "n8n"},
    })
    assert r.status_code == 202, r.text
    call_id = r.json()["call_id"]
    # Known at once (a local Asterisk may already have answered: the state races ahead).
    assert (await client.get(f"/v1/calls/{call_id}")).json()["state"] in ("dialing", "connecting", "active")

    session = await bridge.sim.next_session(15)
    cfg = await session.wait_accepted()
    assert cfg["system_prompt"] == "Remind Ana about invoice F-2291."
    assert cfg["first_message"] == "Hi {name}"  # first messages are spoken as written
    call = bridge.sessions[call_id]  # the AudioSocket connection carried the UUID the API returned
    assert call.direction == "outbound" and call.profile_name == "collections"
    assert call.channel is not None and call.channel.name.startswith("Local/patient@voxbridge-outbound-")

    info = (await client.get(f"/v1/calls/{call_id}")).json()
    assert info["state"] == "active" and info["metadata"] == {"lead_id": 42, "source": "n8n"}

    r = await client.post(f"/v1/calls/{call_id}/hangup")
    assert r.status_code == 200
    await asyncio.wait_for(call.ended.wait(), 10)
    assert call.end_reason == "api-hangup"
    seen = []
    async with asyncio.timeout(5):
        while not any(e.type == "call.ended" for e in seen):
            seen.append(await events.get())
    for e in seen:
        assert e.data["metadata"] == {"lead_id": 42, "source": "n8n"}, e.type  # on every event
    assert [e.type for e in seen][:2] == ["call.started", "call.answered"]


async def test_api_call_that_is_not_answered_reports_call_failed(bridge, client):
    events = bridge.events.subscribe(filter=lambda e: e.type == "call.failed")
    r = await client.post("/v1/calls", json={"destination": "busy", "metadata": {"lead_id": 7}})
    call_id = r.json()["call_id"]
    event = await asyncio.wait_for(events.get(), 15)
    assert event.call_id == call_id and event.data["reason"] == "busy"
    assert event.data["metadata"] == {"lead_id": 7}
    async with asyncio.timeout(5):
        while (await client.get(f"/v1/calls/{call_id}")).json()["state"] != "failed":
            await asyncio.sleep(0.05)
    assert call_id not in bridge.pending
