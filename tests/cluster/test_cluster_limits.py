"""The rest of the cluster on real parts (see conftest.py): the cluster-wide ``max_calls``, transfer
routed to the owner, live views from the owner, a subscription delivered by whichever node takes
the event, and the start-up sweep after the whole cluster went down.

This module's three nodes use their own Redis database (the other module's nodes are gone by
then, but a Redis shared with them would count their calls) and the shared PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge.devtools.dial import AudioSocketCaller
from tests.cluster.conftest import Node, _stop, node_config, start_node
from tests.cluster.test_cluster import WAIT, active_on, caller, history, live_on, until
from tests.http_receiver import HttpReceiver

#: Across the cluster; each node alone would take 5 (audiosocket.max_calls).
CLUSTER_MAX = 2
#: What each node's command and live-view requests wait for the owner: shorter than the node
#: timeout here, so an owner that is only slow (stopped a moment) is not declared dead meanwhile.
COMMAND_TIMEOUT_S = 1.5
NODE_TIMEOUT_S = 5.0


def _db(redis_url: str, n: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{n}"


@pytest.fixture(scope="module")
def small_cluster(redis_url: str, postgres_url: str, ami_sim: Any,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    """lim-a and lim-c with AMI (and allow.transfer ``sales,2xx``); lim-b without AMI, allowing
    only ``operators,1xx``: an answer about a call on lim-b says by its text which node gave it."""
    work = tmp_path_factory.mktemp("small-cluster")
    url = _db(redis_url, 1)
    nodes: dict[str, Node] = {}
    try:
        for name in ("lim-a", "lim-b", "lim-c"):
            b = name == "lim-b"
            cfg = node_config(name, url, postgres_url, ami_sim.server_address[1],
                              cluster={"max_calls": CLUSTER_MAX, "command_timeout_s": COMMAND_TIMEOUT_S,
                                       "node_timeout_s": NODE_TIMEOUT_S},
                              audiosocket={"max_calls": 5},
                              ami={"enabled": not b},
                              allow={"transfer": [r"operators,1\d\d"] if b else [r"sales,2\d\d"]})
            nodes[name] = start_node(name, cfg, work)
        yield nodes
    finally:
        for node in nodes.values():
            _stop(node.proc)


@pytest.fixture(autouse=True)
async def cluster_idle(redis_url: str) -> None:
    """Each test starts with no call registered in this module's cluster: the previous test's
    calls are deregistered just after they end (asynchronously), and would count against
    ``cluster.max_calls``."""
    r = aioredis.from_url(_db(redis_url, 1))
    try:
        await until(lambda: _no_calls(r), "the previous test's calls are deregistered")
    finally:
        await r.aclose()


async def _no_calls(r: Any) -> bool:
    return int(await r.hlen("voxbridge:calls")) == 0


async def test_the_call_over_cluster_max_calls_is_refused_at_once_and_a_slot_frees_anywhere(
        small_cluster: dict[str, Node]) -> None:
    a, b, c = small_cluster["lim-a"], small_cluster["lim-b"], small_cluster["lim-c"]
    async with caller(a) as first, caller(b) as second:
        await until(lambda: active_on(a, str(first.uuid)), "the first call is active on lim-a")
        await until(lambda: active_on(b, str(second.uuid)), "the second call is active on lim-b")
        # lim-c has none of its 5 calls in use, but the cluster has its 2: refused at once, the
        # leg hung up (the dialplan continues), not left waiting.
        async with caller(c) as third:
            began = time.monotonic()
            await asyncio.wait_for(third.ended.wait(), WAIT)
            refused_in = time.monotonic() - began
            assert third.end_reason in ("hangup-frame", "closed"), third.end_reason
            assert refused_in < 5, f"refused after {refused_in:.1f} s"
        refused = await until(lambda: history(c, str(third.uuid), "ended"), "lim-c's history has the refusal")
        assert "cluster.max_calls" in (refused["end_reason"] or ""), refused
        assert await live_on(a, str(first.uuid)) and await live_on(b, str(second.uuid)), "the others go on"
        # The first call ends on lim-a: a call on lim-c is taken again.
        await first.aclose()
        freed = time.monotonic()

        async def taken() -> dict[str, Any] | None:
            async with caller(c) as leg:
                async def settled() -> Any:  # refused (hung up) or active, whichever comes first
                    return "refused" if leg.ended.is_set() else await active_on(c, str(leg.uuid))
                got = await until(settled, "the call on lim-c is taken or refused")
                return None if got == "refused" else got
        assert await until(taken, "a call on lim-c is taken once the call on lim-a ended", timeout=WAIT)
        print(f"\nslot freed on lim-a -> call taken on lim-c: {time.monotonic() - freed:.2f} s")


async def test_a_transfer_sent_to_any_node_is_answered_by_the_owner(small_cluster: dict[str, Node]) -> None:
    a, b = small_cluster["lim-a"], small_cluster["lim-b"]
    async with caller(b) as leg:
        call_id = str(leg.uuid)
        await until(lambda: active_on(b, call_id), "the call is active on lim-b")
        async with a.client() as api:
            # Allowed by lim-b's list (lim-a's would refuse it, 403): lim-b has no AMI, and says so.
            began = time.monotonic()
            r = await api.post(f"/v1/calls/{call_id}/transfer", json={"extension": "101", "context": "operators"})
            routed_in = time.monotonic() - began
            assert r.status_code == 409, r.text
            assert r.json()["detail"] == "transfer is not available: the bridge has no AMI connection configured"
            # Allowed by lim-a's list, refused by lim-b's: the owner's 403, as on a single node.
            r = await api.post(f"/v1/calls/{call_id}/transfer", json={"extension": "201", "context": "sales"})
            assert r.status_code == 403, r.text
            assert r.json()["detail"] == "transfers to '201' in sales are not allowed"
            r = await api.post(f"/v1/calls/{call_id}/transfer", json={"extension": "201\n"})
            assert r.status_code == 422  # validated at the edge: lim-b is never asked
        assert await live_on(b, call_id), "a refused transfer leaves the call as it was"
        print(f"\nrouted transfer answered by the owner in {routed_in * 1000:.0f} ms")


async def test_a_call_is_shown_live_by_any_node_as_its_owner_sees_it(small_cluster: dict[str, Node]) -> None:
    a, b, c = small_cluster["lim-a"], small_cluster["lim-b"], small_cluster["lim-c"]
    async with caller(b) as on_b, caller(c) as on_c:
        ids = {str(on_b.uuid): b, str(on_c.uuid): c}
        for call_id, node in ids.items():
            await until(lambda call_id=call_id, node=node: active_on(node, call_id), f"active on {node.name}")
        async with b.client() as api:  # a mute is live state only the owner knows (not in history)
            assert (await api.post(f"/v1/calls/{on_b.uuid}/mute")).status_code == 200
        async with a.client() as api:
            r = await api.get(f"/v1/calls/{on_b.uuid}")
            assert r.status_code == 200 and r.json()["state"] == "active", r.text
            owners_view = r.json()
            listed = {x["call_id"]: x for x in (await api.get("/v1/calls", params={"limit": 500})).json()["calls"]}
        async with b.client() as api:
            own = (await api.get(f"/v1/calls/{on_b.uuid}")).json()
        assert owners_view.get("muted") is True and set(owners_view) == set(own), "lim-b's live view, not the row"
        for call_id in ids:
            assert listed[call_id]["state"] == "active" and "tools" in listed[call_id], listed[call_id]
        assert listed[str(on_b.uuid)].get("muted") is True
        # The owner stops answering (SIGSTOP, not dead: its heartbeat key lives on for a moment):
        # lim-a falls back to the shared history after command_timeout_s instead of failing.
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            async with a.client() as api:
                began = time.monotonic()
                r = await api.get(f"/v1/calls/{on_b.uuid}")
                took = time.monotonic() - began
            assert r.status_code == 200, r.text
            assert r.json()["call_id"] == str(on_b.uuid) and "muted" not in r.json(), "the history row"
            assert COMMAND_TIMEOUT_S - 0.2 < took < COMMAND_TIMEOUT_S + 2.5, f"fell back after {took:.1f} s"
            print(f"\nowner silent: history shown after {took:.2f} s (command_timeout_s {COMMAND_TIMEOUT_S:g})")
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        await until(lambda: active_on(a, str(on_b.uuid)), "lim-b answers again")


ROUNDS = 6


async def test_a_subscription_just_created_gets_the_next_event_from_any_node(
        small_cluster: dict[str, Node]) -> None:
    """lim-b is stopped (SIGSTOP) while the subscription is created on lim-a and the event is
    published on lim-c: its pending stream read may be handed the event, and on SIGCONT its socket
    holds both the "subscriptions changed" message and the event. A node that hands the event on
    before it has reloaded loses it (each round ~1/3 to 1/2 likely, so 6 rounds catch it)."""
    a, b, c = small_cluster["lim-a"], small_cluster["lim-b"], small_cluster["lim-c"]
    receiver = HttpReceiver()
    await receiver.start()
    hooks: list[str] = []
    ids: list[str] = []
    seen: list[list[str]] = [[] for _ in range(ROUNDS)]
    try:
        for round_ in range(ROUNDS):
            async with caller(c) as leg:
                call_id = str(leg.uuid)
                await until(lambda call_id=call_id: active_on(c, call_id), "a call active on lim-c")
                os.kill(b.proc.pid, signal.SIGSTOP)
                try:
                    async with a.client() as api:
                        r = await api.post("/v1/webhooks", json={"url": receiver.url(f"/r{round_}"),
                                                                 "events": ["call.ended"]})
                        assert r.status_code == 201, r.text
                        hooks.append(r.json()["id"])
                    async with c.client() as api:  # at once: no waiting for any node to reload
                        assert (await api.post(f"/v1/calls/{call_id}/hangup")).status_code == 200
                    await asyncio.wait_for(leg.ended.wait(), WAIT)
                    await asyncio.sleep(0.3)  # lim-b stays stopped while the event is handed out
                finally:
                    os.kill(b.proc.pid, signal.SIGCONT)
            ids.append(call_id)
            got = await receiver.next(f"/r{round_}", WAIT)
            assert got.event["type"] == "call.ended" and got.event["call_id"] == call_id
            seen[round_].append(call_id)
        await asyncio.sleep(2)  # room for a duplicate
        for round_ in range(ROUNDS):  # each hook also had the later rounds' calls, each once
            queue = receiver.requests[f"/r{round_}"]
            while not queue.empty():
                seen[round_].append(queue.get_nowait().event["call_id"])
            assert seen[round_] == ids[round_:], f"/r{round_}: {seen[round_]} (calls {ids})"
    finally:
        async with a.client() as api:
            for hook_id in hooks:
                await api.delete(f"/v1/webhooks/{hook_id}")
        await receiver.stop()


async def test_after_the_whole_cluster_went_down_a_start_fails_its_calls_once(
        redis_url: str, postgres_url: str, ami_sim: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Its own cluster (Redis database 2): two nodes, both killed with their calls; Redis loses
    everything (FLUSHDB: it restarted too). Two nodes start together, one under a dead node's id."""
    url = _db(redis_url, 2)
    work = tmp_path_factory.mktemp("crash")
    port = ami_sim.server_address[1]
    receiver = HttpReceiver()
    await receiver.start()
    started: list[Node] = []

    def start(name: str, cfg: dict[str, Any] | None = None) -> Node:
        node = start_node(name, cfg or node_config(name, url, postgres_url, port), Path(work))
        started.append(node)
        return node

    try:
        x, y = await asyncio.gather(asyncio.to_thread(start, "crash-x"), asyncio.to_thread(start, "crash-y"))
        async with x.client() as api:
            r = await api.post("/v1/webhooks", json={"url": receiver.url("/failed"), "events": ["call.failed"]})
            hook_id = r.json()["id"]
        legs = {x.name: AudioSocketCaller(), y.name: AudioSocketCaller()}
        for node in (x, y):
            await legs[node.name].connect(*node.audiosocket, call_uuid=str(uuid.uuid4()))
        ids = {name: str(leg.uuid) for name, leg in legs.items()}
        for name, call_id in ids.items():
            await until(lambda call_id=call_id: history(x, call_id, "active"), f"{name}'s call active in history")
        for node in (x, y):
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(10)
        for leg in legs.values():
            await leg.aclose()
        r2 = aioredis.from_url(url)
        await r2.flushdb()
        await r2.aclose()
        # Restart together: crash-x under its own id (bridge-restart), crash-z new (crash-y: node-lost).
        began = time.monotonic()
        x2, z = await asyncio.gather(asyncio.to_thread(start, "crash-x"), asyncio.to_thread(start, "crash-z"))
        up_in = time.monotonic() - began
        x_row = await until(lambda: history(z, ids["crash-x"], "failed"), "crash-x's call failed")
        y_row = await until(lambda: history(x2, ids["crash-y"], "failed"), "crash-y's call failed")
        # crash-x's call: "bridge-restart" if crash-x swept it, "node-lost" if crash-z got there first.
        assert x_row["end_reason"] in ("bridge-restart", "node-lost"), x_row
        assert y_row["end_reason"] == "node-lost", y_row
        got = [(await receiver.next("/failed", WAIT)).event for _ in ids]
        await asyncio.sleep(2)
        assert receiver.requests["/failed"].empty(), "call.failed went out more than once"
        assert sorted(e["call_id"] for e in got) == sorted(ids.values())
        assert {e["call_id"]: e["data"]["reason"] for e in got} == {ids["crash-x"]: x_row["end_reason"],
                                                                     ids["crash-y"]: "node-lost"}
        print(f"\ntwo nodes restarted together in {up_in:.1f} s; orphaned calls failed once")
        async with x2.client() as api:
            await api.delete(f"/v1/webhooks/{hook_id}")
    finally:
        for node in started:
            if node.proc.poll() is None:
                _stop(node.proc)
        await receiver.stop()
