"""Three bridge processes as one cluster on a real Redis and a real PostgreSQL (see conftest.py).

Each test says what a single process, or a broken cluster, would get wrong: a command sent to the
wrong node answers 404; settings kept in the dialing node's memory never reach the node Asterisk
connects the leg to; a dead node's calls stay "active" forever; a webhook fed by every node's bus
gets each event three times; per-node history lists one node's calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from bridge.devtools.dial import AudioSocketCaller
from bridge.store_pg import PostgresCallStore
from tests.cluster.conftest import HEARTBEAT_S, NODE_TIMEOUT_S, Node, node_config, start_node
from tests.http_receiver import HttpReceiver

#: Generous: two shared cores and five servers.
WAIT = 15.0


@asynccontextmanager
async def caller(node: Node, call_uuid: str | None = None) -> AsyncIterator[AudioSocketCaller]:
    c = AudioSocketCaller()
    await c.connect(*node.audiosocket, call_uuid=call_uuid or str(uuid.uuid4()))
    try:
        yield c
    finally:
        await c.aclose()


async def until(check: Any, what: str, timeout: float = WAIT) -> Any:
    """Poll ``check()`` (async) until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")


async def live_on(node: Node, call_id: str) -> dict[str, Any] | None:
    async with node.client() as c:
        r = await c.get(f"/v1/calls/{call_id}")
    body = r.json() if r.status_code == 200 else None
    return body if body is not None and body.get("state") in ("connecting", "active") else None


async def active_on(node: Node, call_id: str) -> dict[str, Any] | None:
    """The call's live view once its settings are resolved and its gateway answered."""
    info = await live_on(node, call_id)
    return info if info is not None and info["state"] == "active" else None


async def history(node: Node, call_id: str, state: str) -> dict[str, Any] | None:
    async with node.client() as c:
        r = await c.get(f"/v1/calls/{call_id}")
    return r.json() if r.status_code == 200 and r.json()["state"] == state else None


async def test_a_command_sent_to_any_node_runs_on_the_node_that_owns_the_call(cluster: dict[str, Node]) -> None:
    a, b, c = cluster["node-a"], cluster["node-b"], cluster["node-c"]
    async with caller(b) as leg:
        call_id = str(leg.uuid)
        await until(lambda: live_on(b, call_id), "the call is live on node B")
        async with a.client() as api:
            # B's answer, not A's: B knows the call but has no Asterisk channel for it (409 there);
            # A, on its own, would say 404 (no such call).
            r = await api.post(f"/v1/calls/{call_id}/dtmf", json={"digits": "12"})
            assert r.status_code == 409, r.text
            assert "channel" in r.json()["detail"]
            # Validation still happens at the edge: B is never asked.
            r = await api.post(f"/v1/calls/{call_id}/dtmf", json={"digits": "x"})
            assert r.status_code == 422
            # Mid-call commands too: B mutes and tags its call; B's backend (AillomVox) cannot "say",
            # and B's 409 names it.
            await until(lambda: active_on(b, call_id), "the call is answered on node B")
            r = await api.post(f"/v1/calls/{call_id}/mute")
            assert r.status_code == 200 and r.json()["muted"] is True, r.text
            r = await api.post(f"/v1/calls/{call_id}/tags", json={"tags": {"tier": "vip"}})
            assert r.status_code == 200 and r.json()["metadata"]["tier"] == "vip", r.text
            r = await api.post(f"/v1/calls/{call_id}/say", json={"text": "hello"})
            assert r.status_code == 409 and "aillomvox" in r.json()["detail"], r.text
            r = await api.put(f"/v1/calls/{call_id}/tools", json={"tools": ["no-such-tool"]})
            assert r.status_code in (409, 422), r.text  # B's answer (its backend, or the unknown name)
            info = await live_on(b, call_id)
            assert info is not None and info["muted"] is True  # it happened on B
            r = await api.post(f"/v1/calls/{call_id}/hangup")
            assert r.status_code == 200, r.text
            assert r.json() == {"call_id": call_id, "state": "ending"}
        await asyncio.wait_for(leg.ended.wait(), WAIT)
    ended = await until(lambda: history(c, call_id, "ended"), "node C's history shows the call ended")
    assert ended["end_reason"] == "api-hangup"
    assert ended["metadata"].get("tier") == "vip"  # the tag added mid-call, kept in the shared history
    async with a.client() as api:  # a call no node owns: A's own answer
        r = await api.post(f"/v1/calls/{uuid.uuid4()}/hangup")
        assert r.status_code == 404


async def test_an_api_started_call_gets_its_settings_on_whichever_node_asterisk_connects_it_to(
        cluster: dict[str, Node], ami_sim: Any) -> None:
    a, b, c = cluster["node-a"], cluster["node-b"], cluster["node-c"]
    async with a.client() as api:
        r = await api.post("/v1/calls", json={"destination": "+442071234567", "profile": "sales",
                                              "variables": {"product": "boats"}, "metadata": {"crm": "42"}})
        assert r.status_code == 202, r.text
        call_id = r.json()["call_id"]

    async def dialed() -> bool:
        return any(o.get("variable") == f"AS_UUID={call_id}" for o in ami_sim.originated)

    await until(dialed, "node A dialed the call through AMI with its UUID")
    # Asterisk connects the answered callee's leg to node C (any node, as its dialplan spreads calls).
    async with caller(c, call_id) as leg:
        info = await until(lambda: active_on(c, call_id), "the API-started call is active on node C")
        assert info["profile"] == "sales"
        assert info["metadata"] == {"crm": "42"}
        assert info["variables"] == {"product": "boats"}
        assert info["direction"] == "outbound"
        async with b.client() as api:
            r = await api.post(f"/v1/calls/{call_id}/hangup")
            assert r.status_code == 200, r.text
        await asyncio.wait_for(leg.ended.wait(), WAIT)
    # The shared history, read on the node that dialed, has the call as the node that took it saw it.
    ended = await until(lambda: history(a, call_id, "ended"), "node A's history shows the call ended")
    assert ended["profile"] == "sales" and ended["metadata"] == {"crm": "42"} and ended["direction"] == "outbound"


async def test_each_event_reaches_a_webhook_subscriber_once_and_every_live_stream(
        cluster: dict[str, Node]) -> None:
    a, b, c = cluster["node-a"], cluster["node-b"], cluster["node-c"]
    receiver = HttpReceiver()
    await receiver.start()
    seen_on_c: list[dict[str, Any]] = []
    stream_open = asyncio.Event()

    async def follow_c() -> None:
        async with httpx.AsyncClient(base_url=c.api, timeout=None) as client, \
                client.stream("GET", "/v1/events", params={"types": "call.started,call.ended"}) as r:
            stream_open.set()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen_on_c.append(json.loads(line[6:]))

    follower = asyncio.create_task(follow_c())
    try:
        async with a.client() as api:
            r = await api.post("/v1/webhooks", json={"url": receiver.url("/hook"),
                                                     "events": ["call.started", "call.ended"]})
            assert r.status_code == 201, r.text
            hook_id = r.json()["id"]
        for node in (b, c):  # shared: every node delivers to it
            async def listed(node: Node = node) -> bool:
                async with node.client() as api:
                    return hook_id in [h["id"] for h in (await api.get("/v1/webhooks")).json()["webhooks"]]
            await until(listed, f"{node.name} lists the webhook created on node A")
        await asyncio.wait_for(stream_open.wait(), WAIT)
        call_ids = []
        for node in (a, b, c):
            async with caller(node) as leg:
                call_ids.append(str(leg.uuid))
                await until(lambda node=node, leg=leg: active_on(node, str(leg.uuid)), f"a call on {node.name}")
                async with node.client() as api:
                    assert (await api.post(f"/v1/calls/{leg.uuid}/hangup")).status_code == 200
                await asyncio.wait_for(leg.ended.wait(), WAIT)
        wanted = {(t, cid) for cid in call_ids for t in ("call.started", "call.ended")}
        got: list[dict[str, Any]] = []

        async def all_delivered() -> bool:
            while not receiver.requests["/hook"].empty():
                got.append(receiver.requests["/hook"].get_nowait().event)
            return wanted <= {(e["type"], e["call_id"]) for e in got}

        await until(all_delivered, "every node's call.started and call.ended reached the subscriber")
        await asyncio.sleep(2 * HEARTBEAT_S + 1)  # room for a duplicate to show up
        await all_delivered()
        mine = [(e["type"], e["call_id"]) for e in got if e["call_id"] in call_ids]
        assert sorted(mine) == sorted(wanted), "each event exactly once across the cluster"
        # The live stream on node C showed the calls of A and B too (and C's own).
        streamed = {(e["type"], e["call_id"]) for e in seen_on_c}
        assert wanted <= streamed
        assert len([e for e in seen_on_c if e["call_id"] in call_ids]) == len(wanted), "no duplicates live"
        async with b.client() as api:  # deleted anywhere, gone everywhere
            assert (await api.delete(f"/v1/webhooks/{hook_id}")).status_code == 204

        async def gone_on_a() -> bool:
            async with a.client() as api:
                return hook_id not in [h["id"] for h in (await api.get("/v1/webhooks")).json()["webhooks"]]
        await until(gone_on_a, "node A forgot the webhook deleted on node B")
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await receiver.stop()


async def test_history_from_every_node_is_listed_by_any_node(cluster: dict[str, Node], postgres_url: str) -> None:
    ids: dict[str, str] = {}
    for node in cluster.values():
        async with caller(node) as leg:
            ids[node.name] = str(leg.uuid)
            await until(lambda node=node, leg=leg: active_on(node, str(leg.uuid)), f"a call on {node.name}")
    for node in cluster.values():
        async def listed(node: Node = node) -> bool:
            async with node.client() as api:
                calls = (await api.get("/v1/calls", params={"limit": 500})).json()["calls"]
            return set(ids.values()) <= {c["call_id"] for c in calls}
        await until(listed, f"{node.name} lists the calls of every node")
    # The PostgreSQL store's filters (the same keywords as the SQLite store's list_calls).
    store = PostgresCallStore(postgres_url)
    await store.start()
    try:
        ended = await store.list_calls("ended", 500, end_reason="caller-hangup")
        assert set(ids.values()) <= {c["call_id"] for c in ended}
        assert all(c["end_reason"] == "caller-hangup" for c in ended)
        assert await store.list_calls(since="2999-01-01T00:00:00Z") == []
        recent = await store.list_calls(since="2000-01-01", until="2999-01-01T00:00:00+00:00", limit=500)
        assert set(ids.values()) <= {c["call_id"] for c in recent}
        assert await store.list_calls(profile="no-such-profile") == []
        with pytest.raises(ValueError, match="since must be an ISO-8601 time"):
            await store.list_calls(since="yesterday")
    finally:
        await store.close()


async def test_kill_9_of_a_node_marks_its_calls_failed_within_seconds_once(
        cluster: dict[str, Node], redis_url: str, postgres_url: str, ami_sim: Any,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    a, b = cluster["node-a"], cluster["node-b"]
    cfg = node_config("node-d", redis_url, postgres_url, ami_sim.server_address[1])
    d = await asyncio.to_thread(start_node, "node-d", cfg, tmp_path_factory.mktemp("node-d"))
    receiver = HttpReceiver()
    await receiver.start()
    try:
        async with a.client() as api:
            r = await api.post("/v1/webhooks", json={"url": receiver.url("/hook"), "events": ["call.failed"]})
            hook_id = r.json()["id"]
        async def listed() -> bool:
            async with d.client() as api:
                return hook_id in [h["id"] for h in (await api.get("/v1/webhooks")).json()["webhooks"]]
        await until(listed, "node D has the webhook")
        legs = [AudioSocketCaller() for _ in range(2)]
        for leg in legs:
            await leg.connect(*d.audiosocket, call_uuid=str(uuid.uuid4()))
        ids = [str(leg.uuid) for leg in legs]
        for call_id in ids:
            await until(lambda call_id=call_id: history(b, call_id, "active"), "node D's call is active in history")
        os.kill(d.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        d.proc.wait(10)
        # Until the reaper has run (its heartbeat key lives on for up to node_timeout_s), D still
        # owns the calls: a command for one fails at once and says why, instead of hanging.
        async with a.client() as api:
            r = await api.post(f"/v1/calls/{ids[0]}/hangup")
        assert r.status_code == 504, r.text
        assert "node-d" in r.json()["detail"] and "not listening" in r.json()["detail"]
        for call_id in ids:
            failed = await until(lambda call_id=call_id: history(b, call_id, "failed"),
                                 "the dead node's call is marked failed", timeout=NODE_TIMEOUT_S + 10)
            assert failed["end_reason"] == "node-lost"
        took = time.monotonic() - killed
        assert took < NODE_TIMEOUT_S + 4 * HEARTBEAT_S + 3, f"marked failed after {took:.1f} s"
        print(f"\nkill -9 -> its calls failed in the shared history after {took:.2f} s "
              f"(node_timeout_s {NODE_TIMEOUT_S:g}, heartbeat_s {HEARTBEAT_S:g})")
        got: list[dict[str, Any]] = []
        for _ in ids:
            got.append((await receiver.next("/hook", WAIT)).event)
        await asyncio.sleep(2 * HEARTBEAT_S + 1)  # every surviving node has run its reaper since
        assert receiver.requests["/hook"].empty(), "call.failed went out more than once"
        assert sorted(e["call_id"] for e in got) == sorted(ids)
        assert {e["data"]["reason"] for e in got} == {"node-lost"}
        for leg in legs:
            await leg.aclose()
        async with a.client() as api:
            await api.delete(f"/v1/webhooks/{hook_id}")
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
        await receiver.stop()
