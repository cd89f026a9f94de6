"""Many bridge processes as one cluster, sharing through Redis (``cluster.redis_url``).

One process stays the default and never imports ``redis``: this module is imported only when
``cluster.redis_url`` is set (bridge/app.py). The single-process versions of what is shared here
are bridge/calls.py's registry and ``pending`` dict, the local API and the in-process event bus;
:class:`LocalRouter` is the single-process command router (every call is local).

What is shared, and under which Redis keys (``KEY`` = ``voxbridge:``):

=================================  =====================================================================
``KEY node:<id>``                  this node is alive: a heartbeat every ``heartbeat_s``, expiring after
                                   ``node_timeout_s``
``KEY nodes``                      every node that has heartbeated and not been declared dead (set)
``KEY calls``                      live call UUID → owning node (hash); claimed atomically with the
                                   cluster-wide ``max_calls`` (:data:`_CLAIM`)
``KEY node-calls:<id>``            the calls a node owns (set), for the reaper
``KEY pending:<uuid>``             an API-started call's settings (JSON), written before dialing, taken
                                   (GETDEL) by whichever node Asterisk connects the leg to
``KEY cmd:<id>`` (pub/sub)         commands for the calls a node owns; answered on ``KEY reply:<req>``
``KEY events`` (stream)            every node's call events; consumer group ``webhooks`` hands each entry
                                   to one node's webhook dispatcher; every node reads it all for its
                                   live ``/v1/events`` streams
``KEY hooks`` (pub/sub)            webhook subscriptions changed: every node reloads them from the store
``KEY hooks-version``              bumped on every subscription change; a node reloads before handing
                                   on events whenever it has not yet seen the current version
``KEY reaped:<id>``                a reaper declared this node dead a moment ago (the start-up sweep
                                   leaves its calls to that reaper's ``call.failed``)
=================================  =====================================================================

A node that dies (``kill -9``) stops heartbeating; within ``node_timeout_s + heartbeat_s`` a
surviving node's reaper runs :data:`_REAP`, which atomically removes the dead node from ``nodes``
and its calls from ``calls``: one reaper, and only one, gets the list and publishes ``call.failed``
(reason ``node-lost``) for each on its own bus, whence it reaches the shared history, the webhooks
and every live stream. Webhook entries the dead node had read but not acknowledged are claimed by
a survivor (XAUTOCLAIM) after the same timeout.

When the whole cluster went down (no survivor to reap), the shared history still shows those
calls in progress: a node starting sweeps them (:meth:`ClusterNode.sweep`) — the calls of nodes
that no longer heartbeat and are not being reaped, its own previous incarnation's and those with
no node — and marks them failed (``node-lost``; ``bridge-restart`` for its own and unowned ones)
with one ``call.failed`` each, exactly once however many nodes start together.

A subscription created on one node is delivered by whichever node the consumer group hands an
event to: that node reloads the subscriptions before handing on a batch whenever ``hooks-version``
moved (one GET per batch), so an event published after the creation's ``201`` always finds it; the
pub/sub message only makes the reload early.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Protocol

from tools.base import ToolError

from .calls import CallRegistry, CallSettings
from .config import Config
from .events import Event, EventBus
from .supervise import Supervisor

log = logging.getLogger("voxbridge.cluster")

KEY = "voxbridge:"
WEBHOOK_GROUP = "webhooks"
#: The shared event stream keeps about this many entries (XADD MAXLEN ~).
STREAM_MAXLEN = 100_000
#: Events waiting to go to Redis; beyond this the oldest are dropped (counted), never the audio.
OUTBOX_MAX = 10_000
#: How long an API-started call's settings wait for its leg, beyond the ring and answer timeouts.
PENDING_MARGIN_S = 60
#: Deadline on every single Redis round trip that does not block by design.
REDIS_OP_TIMEOUT_S = 5.0
#: How long a blocking stream read waits before looping (and noticing a stop).
BLOCK_MS = 1000

#: Admit a call: refused (0) at the cluster-wide cap, -1 if the UUID is already live somewhere.
_CLAIM = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
local cap = tonumber(ARGV[3])
if cap > 0 and redis.call('HLEN', KEYS[1]) >= cap then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

#: Declare a silent node dead, once: returns its calls to the one caller that removed it, else nil.
_REAP = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return false end
local orphans = {}
for _, call in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('HGET', KEYS[4], call) == ARGV[1] then
    redis.call('HDEL', KEYS[4], call)
    table.insert(orphans, call)
  end
end
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[5], '1', 'EX', ARGV[2])
return orphans
"""

#: A node starting under the id of a previous incarnation (a fixed ``node_id``, restarted before
#: its heartbeat expired): that incarnation's calls died with it. Forget them in the registry
#: (the start-up sweep fails them in the history); returns how many there were.
_FORGET_SELF = """
local n = 0
for _, call in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('HGET', KEYS[2], call) == ARGV[1] then
    redis.call('HDEL', KEYS[2], call)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
return n
"""

#: How long a reaped node's marker lasts: a start-up sweep in that time leaves its calls alone.
REAPED_MARK_S = 300


class CommandUnanswered(Exception):
    """The call's owning node did not answer a routed command in time (the API says 504)."""


class _Unanswered(Exception):
    """A node asked through :meth:`ClusterNode._ask` did not answer (not listening, or too late)."""


class CommandRouter(Protocol):
    """Where a command for a call that is not in this process goes."""

    async def forward(self, call_id: str, method: str, path: str, body: Any) -> tuple[int, Any] | None:
        """The owning node's answer ``(status, body)``, or None if no other node owns the call."""
        ...


class LocalRouter:
    """One process: every live call is local, so there is never anywhere else to send a command."""

    async def forward(self, call_id: str, method: str, path: str, body: Any) -> tuple[int, Any] | None:
        return None


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _event_to_json(event: Event) -> str:
    return json.dumps(event.as_dict(), default=str, separators=(",", ":"))


def _event_from_json(text: str) -> Event:
    d = json.loads(text)
    return Event(d["type"], d["call_id"], d["data"], id=d["id"], ts=d["ts"], seq=d["seq"])


#: Runs a command against this node's own API: ``(method, path, body) → (status, body)``.
Executor = Callable[[str, str, Any], Awaitable[tuple[int, Any]]]


class ClusterNode:
    """This process's membership of the cluster: registry, heartbeats, reaper, commands, events.

    Life cycle: :meth:`connect` (before the store and the API start: a wrong URL fails start-up),
    :meth:`start` (the loops, once the webhook dispatcher exists), :meth:`close`.
    """

    def __init__(self, config: Config, bus: EventBus, supervisor: Supervisor) -> None:
        c = config.cluster
        assert c.redis_url is not None
        self.config = config
        self.node_id = c.node_id or default_node_id()
        self.heartbeat_s = c.heartbeat_s
        self.node_timeout_s = c.node_timeout_s
        self.command_timeout_s = c.command_timeout_s
        self.max_calls = c.max_calls or 0
        self.bus = bus
        self.supervisor = supervisor
        self._url = c.redis_url.get_secret_value()
        self.redis: Any = None
        self._outbox: collections.deque[Event] = collections.deque(maxlen=OUTBOX_MAX)
        self._outbox_ready = asyncio.Event()
        self.events_dropped = 0
        self._releases: collections.deque[str] = collections.deque()
        self._executor: Executor | None = None
        self._webhooks: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        #: Calls this node declared failed after their node died (for logs and tests).
        self.reaped = 0
        #: Calls this node registered as their owner (deregistered when they end here).
        self.claimed: set[str] = set()
        #: This node's live calls as the API shows them: call ids → their live views (app.py).
        self._live_view: Callable[[list[str]], dict[str, Any]] | None = None
        #: The ``hooks-version`` this node's webhook subscriptions are known to include.
        self._hooks_seen = 0

    # ------------------------------------------------------------------ life cycle

    async def connect(self) -> None:
        """Open the client and check Redis answers; raise ConnectionError naming the key if not."""
        import redis.asyncio as aioredis  # the 'cluster' extra: never imported by a single process

        self.redis = aioredis.from_url(self._url, decode_responses=True, socket_connect_timeout=REDIS_OP_TIMEOUT_S,
                                       health_check_interval=30)
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                await self.redis.ping()
                try:
                    await self.redis.xgroup_create(KEY + "events", WEBHOOK_GROUP, id="$", mkstream=True)
                except aioredis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                forgotten = await self.redis.eval(_FORGET_SELF, 2, KEY + f"node-calls:{self.node_id}", KEY + "calls",
                                                  self.node_id)
                self._hooks_seen = int(await self.redis.get(KEY + "hooks-version") or 0)
                await self._heartbeat()
        except (OSError, TimeoutError, aioredis.RedisError) as exc:
            await self.redis.aclose()
            self.redis = None
            raise ConnectionError(f"cluster.redis_url: cannot reach Redis ({type(exc).__name__}: {exc})") from None
        self._claim = self.redis.register_script(_CLAIM)
        self._reap = self.redis.register_script(_REAP)
        if forgotten:
            log.warning("cluster: node %s restarted: its previous incarnation's %d call(s) are over",
                        self.node_id, forgotten)
        log.info("cluster: node %s joined", self.node_id)

    def start(self, *, webhooks: Any, executor: Executor | None,
              live_view: Callable[[list[str]], dict[str, Any]] | None = None) -> None:
        """Start the loops: ``webhooks`` gets this node's share of the events; ``executor`` runs
        commands routed here (None without an API: commands then go unanswered, 504);
        ``live_view`` answers other nodes' ``GET /v1/calls`` for the calls this node owns."""
        self._webhooks = webhooks
        self._executor = executor
        self._live_view = live_view
        s = self.supervisor
        s.start("cluster.heartbeat", self._heartbeat_loop)
        s.start("cluster.outbox", self._outbox_loop)
        s.start("cluster.live", self._live_loop)
        s.start("cluster.webhooks", self._webhook_loop)
        s.start("cluster.commands", self._command_loop)

    async def close(self) -> None:
        """Leave cleanly: flush the outbox, forget this node's heartbeat (its calls are over)."""
        self._closing = True
        if self.redis is None:
            return
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                await self._flush_outbox()
                await self._flush_releases()
                await self.redis.delete(KEY + f"node:{self.node_id}")
                await self.redis.srem(KEY + "nodes", self.node_id)
        except Exception as exc:  # noqa: BLE001 - leaving anyway; the reaper covers what is left
            log.warning("cluster: leaving uncleanly (%s)", exc)
        for task in list(self._tasks):
            task.cancel()
        await self.redis.aclose()
        self.redis = None

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.supervisor.watch(task, name)

    # ------------------------------------------------------------------ registry and heartbeats

    async def _heartbeat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(KEY + f"node:{self.node_id}", f"{time.time():.3f}", px=int(self.node_timeout_s * 1000))
        pipe.sadd(KEY + "nodes", self.node_id)
        await pipe.execute()

    async def _heartbeat_loop(self) -> None:
        while True:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                await self._heartbeat()
                await self._flush_releases()
                await self.reap()
            await asyncio.sleep(self.heartbeat_s)

    async def reap(self) -> list[str]:
        """Declare every silent node dead (once, cluster-wide) and fail its calls. Returns them."""
        failed: list[str] = []
        for node in await self.redis.smembers(KEY + "nodes"):
            if node == self.node_id:
                continue
            orphans = await self._reap(keys=[KEY + "nodes", KEY + f"node:{node}", KEY + f"node-calls:{node}",
                                             KEY + "calls", KEY + f"reaped:{node}"], args=[node, REAPED_MARK_S])
            if orphans is None:
                continue
            log.error("cluster: node %s stopped heartbeating (over %g s): its %d call(s) failed",
                      node, self.node_timeout_s, len(orphans))
            for call_id in orphans:
                self.bus.publish("call.failed", call_id, reason="node-lost", node=node,
                                 message=f"bridge node {node} stopped answering (no heartbeat for "
                                         f"{self.node_timeout_s:g} s)")
            self.reaped += len(orphans)
            failed += orphans
            # Webhook entries the dead node read but never acknowledged: a survivor delivers them.
            await self._claim_stale_webhooks()
        return failed

    async def sweep(self, store: Any) -> list[str]:
        """At start-up, before this node takes calls: fail the calls the shared history still
        shows in progress whose node is gone — not heartbeating and not just reaped (a reaper
        publishes their ``call.failed``), this node's previous incarnation, or none recorded.
        ``store`` is bridge/store_pg.py's; its conditional UPDATE makes each call fail once
        across nodes sweeping together. Returns the calls this node failed."""
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            unfinished = await store.unfinished_calls()
            if not unfinished:
                return []
            members = set(await self.redis.smembers(KEY + "nodes"))
            others = sorted({n for _, n in unfinished if n and n != self.node_id and n not in members})
            marked = await self.redis.mget([KEY + f"reaped:{n}" for n in others]) if others else []
        reaped = {n for n, mark in zip(others, marked, strict=True) if mark is not None}
        reasons: dict[str, str] = {}
        owners: dict[str, str | None] = {}
        for call_id, node in unfinished:
            if node is None or node == self.node_id:
                reasons[call_id] = "bridge-restart"
            elif node not in members and node not in reaped:
                reasons[call_id] = "node-lost"
            owners[call_id] = node
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            failed: list[str] = await store.fail_unfinished(reasons)
        for call_id in failed:
            node = owners[call_id]
            why = (f"bridge node {node} stopped while the call was in progress" if node
                   else "the bridge that had the call stopped while it was in progress")
            self.bus.publish("call.failed", call_id, reason=reasons[call_id], node=node, message=why)
        if failed:
            log.warning("cluster: %d call(s) were in progress on bridges that are gone; marked failed", len(failed))
        return failed

    async def claim_call(self, call_id: str) -> str | None:
        """Register this node as the call's owner; why it cannot be, or None."""
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            got = await self._claim(keys=[KEY + "calls", KEY + f"node-calls:{self.node_id}"],
                                    args=[call_id, self.node_id, self.max_calls])
        if got == -1:
            return "a call with this UUID is already in progress on another bridge of the cluster"
        if got == 0:
            return f"the cluster is at capacity ({self.max_calls} calls, cluster.max_calls)"
        self.claimed.add(call_id)
        return None

    def release_call(self, call_id: str) -> None:
        """The call is over here (sync, from teardown): deregistered at the next heartbeat or sooner."""
        self._releases.append(call_id)
        self._spawn(self._flush_releases(), f"cluster-release-{call_id}")

    async def _flush_releases(self) -> None:
        while self._releases and self.redis is not None:
            call_id = self._releases[0]
            pipe = self.redis.pipeline(transaction=True)
            pipe.hdel(KEY + "calls", call_id)
            pipe.srem(KEY + f"node-calls:{self.node_id}", call_id)
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                await pipe.execute()
            if self._releases and self._releases[0] == call_id:
                self._releases.popleft()

    async def owner(self, call_id: str) -> str | None:
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            result: str | None = await self.redis.hget(KEY + "calls", call_id)
            return result

    async def live_calls(self) -> dict[str, str]:
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            result: dict[str, str] = await self.redis.hgetall(KEY + "calls")
            return result

    # ------------------------------------------------------------------ API-started calls

    async def put_pending(self, call_id: str, settings: CallSettings) -> None:
        """Before dialing: the call's settings, for whichever node Asterisk connects its leg to."""
        o = self.config.outbound
        ttl = int(o.ring_timeout + o.answer_timeout + PENDING_MARGIN_S)
        data = asdict(settings)
        data.pop("channel", None)
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                await self.redis.set(KEY + f"pending:{call_id}", json.dumps(data, default=str), ex=ttl)
        except Exception as exc:  # noqa: BLE001 - any Redis failure: the call is not dialed (503)
            raise ToolError(f"cluster: cannot register the call's settings in Redis ({type(exc).__name__}); "
                            "not dialing") from None

    async def take_pending(self, call_id: str) -> CallSettings | None:
        """The settings an API request registered for this UUID (once, cluster-wide)."""
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            text = await self.redis.getdel(KEY + f"pending:{call_id}")
        if text is None:
            return None
        data = json.loads(text)
        data.pop("refuse", None)
        return CallSettings(**data)

    async def discard_pending(self, call_id: str) -> bool:
        """True if no node took the settings (the leg never arrived anywhere)."""
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            return bool(await self.redis.delete(KEY + f"pending:{call_id}"))

    # ------------------------------------------------------------------ command routing

    async def forward(self, call_id: str, method: str, path: str, body: Any) -> tuple[int, Any] | None:
        """Send the command to the call's owning node and return ITS answer; None if no other node
        owns the call. Raises :class:`CommandUnanswered` if the owner does not answer in time."""
        node = await self.owner(call_id)
        if node is None or node == self.node_id:
            return None
        try:
            answer = await self._ask(node, {"method": method, "path": path, "body": body})
        except _Unanswered as exc:
            raise CommandUnanswered(f"bridge node {node}, which owns call {call_id}, {exc}") from None
        return int(answer["status"]), answer["body"]

    async def live_views(self, call_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The live views of those of ``call_ids`` that other nodes own, as their owners show them
        (one request per owning node, all at once, each bounded by ``command_timeout_s``). A call
        whose owner does not answer is left out: the caller shows its history row instead."""
        if not call_ids:
            return {}
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            owners = await self.redis.hmget(KEY + "calls", call_ids)
        by_node: dict[str, list[str]] = {}
        for call_id, node in zip(call_ids, owners, strict=True):
            if node is not None and node != self.node_id:
                by_node.setdefault(node, []).append(call_id)

        async def ask(node: str, ids: list[str]) -> dict[str, Any]:
            try:
                answer = await self._ask(node, {"live": ids})
            except _Unanswered as exc:
                log.warning("cluster: live view of %d call(s) from node %s: it %s; showing the history", len(ids),
                            node, exc)
                return {}
            views = answer.get("body")
            return views if isinstance(views, dict) else {}

        views: dict[str, dict[str, Any]] = {}
        for got in await asyncio.gather(*(ask(n, ids) for n, ids in by_node.items())):
            views.update(got)
        return views

    async def _ask(self, node: str, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request`` to ``node``'s command channel and return its answer; raise
        :class:`_Unanswered` (saying why) if it is not listening or does not answer in time."""
        request_id = uuid.uuid4().hex
        reply_key = KEY + f"reply:{request_id}"
        message = json.dumps({**request, "id": request_id, "reply": reply_key, "from": self.node_id,
                              "deadline": time.time() + self.command_timeout_s})
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            listeners = await self.redis.publish(KEY + f"cmd:{node}", message)
        if not listeners:
            raise _Unanswered("is not listening for commands")
        try:
            async with asyncio.timeout(self.command_timeout_s + 1):
                got = await self.redis.blpop([reply_key], timeout=self.command_timeout_s)
        except TimeoutError:
            got = None
        if got is None:
            raise _Unanswered(f"did not answer within {self.command_timeout_s:g} s (cluster.command_timeout_s)")
        answer: dict[str, Any] = json.loads(got[1])
        return answer

    async def _command_loop(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(KEY + f"cmd:{self.node_id}", KEY + "hooks")
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=BLOCK_MS / 1000)
                if message is None:
                    continue
                if message["channel"] == KEY + "hooks":
                    if self._webhooks is not None and message["data"] != self.node_id:
                        self._spawn(self._webhooks.sync(), "cluster-webhooks-sync")
                    continue
                self._spawn(self._answer(message["data"]), "cluster-command")
        finally:
            await pubsub.aclose()

    async def _answer(self, text: str) -> None:
        request = json.loads(text)
        if time.time() > float(request["deadline"]):
            return  # the requester has given up (504): running it now would surprise everyone
        if "live" in request:
            ids = [i for i in request["live"] if isinstance(i, str)]
            status, body = 200, self._live_view(ids) if self._live_view is not None else {}
        elif self._executor is None:
            status, body = 503, {"detail": f"bridge node {self.node_id} has no API to run commands"}
        else:
            status, body = await self._executor(request["method"], request["path"], request["body"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(request["reply"], json.dumps({"status": status, "body": body}, default=str))
        pipe.expire(request["reply"], int(self.command_timeout_s) + 5)
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            await pipe.execute()

    async def hooks_changed(self) -> None:
        """A subscription was created or deleted here (and stored): bump ``hooks-version`` before
        the API answers, so every node reloads before handing on any later event; the pub/sub
        message makes the others reload at once."""
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            version = int(await self.redis.incr(KEY + "hooks-version"))
            if version == self._hooks_seen + 1:  # no other change in between: this node has them all
                self._hooks_seen = version
            await self.redis.publish(KEY + "hooks", self.node_id)

    async def hooks_current(self) -> None:
        """Before handing on events, and before the API lists them: reload the subscriptions if one
        changed since the last load (a creation answered before these events were published is then
        included; a node that started while another node created one, and so missed its pub/sub
        message, lists it all the same)."""
        if self._webhooks is None:
            return
        try:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                version = int(await self.redis.get(KEY + "hooks-version") or 0)
                if version > self._hooks_seen:
                    await self._webhooks.sync()
                    self._hooks_seen = max(self._hooks_seen, version)
        except Exception as exc:  # noqa: BLE001 - deliver to the subscriptions known; retried next batch
            log.warning("cluster: cannot reload the webhook subscriptions (%s: %s)", type(exc).__name__, exc)

    # ------------------------------------------------------------------ events

    def offer(self, event: Event) -> None:
        """The bus sink (sync, never blocks): the event goes to the shared stream soon."""
        if self._closing:
            return
        if len(self._outbox) == self._outbox.maxlen:
            self.events_dropped += 1
        self._outbox.append(event)
        self._outbox_ready.set()

    async def _flush_outbox(self) -> None:
        while self._outbox:
            batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), 500))]
            pipe = self.redis.pipeline(transaction=False)
            for event in batch:
                pipe.xadd(KEY + "events", {"node": self.node_id, "event": _event_to_json(event)},
                          maxlen=STREAM_MAXLEN, approximate=True)
            try:
                async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                    await pipe.execute()
            except BaseException:
                self._outbox.extendleft(reversed(batch))  # retried by the next round
                raise

    async def _outbox_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            await self._flush_outbox()

    async def _live_loop(self) -> None:
        """Every other node's events, to this node's live ``/v1/events`` streams (not its sinks:
        the owning node already stored them and counted them)."""
        last = "$"
        while True:
            got = await self.redis.xread({KEY + "events": last}, block=BLOCK_MS, count=500)
            for _stream, entries in got or ():
                for entry_id, fields in entries:
                    last = entry_id
                    if fields.get("node") != self.node_id:
                        self.bus.deliver_remote(_event_from_json(fields["event"]))

    async def _webhook_loop(self) -> None:
        """This node's share of the events (consumer group: each entry to one node), handed to the
        webhook dispatcher's queues and then acknowledged."""
        while True:
            got = await self.redis.xreadgroup(WEBHOOK_GROUP, self.node_id, {KEY + "events": ">"},
                                              count=200, block=BLOCK_MS)
            for _stream, entries in got or ():
                await self._hand_to_webhooks(entries)

    async def _hand_to_webhooks(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        if not entries:
            return
        await self.hooks_current()
        for _entry_id, fields in entries:
            if self._webhooks is not None and fields:
                self._webhooks.offer(_event_from_json(fields["event"]))
        async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
            await self.redis.xack(KEY + "events", WEBHOOK_GROUP, *[e[0] for e in entries])

    async def _claim_stale_webhooks(self) -> None:
        start = "0-0"
        while True:
            async with asyncio.timeout(REDIS_OP_TIMEOUT_S):
                result = await self.redis.xautoclaim(KEY + "events", WEBHOOK_GROUP, self.node_id,
                                                     min_idle_time=int(self.node_timeout_s * 1000),
                                                     start_id=start, count=200)
            start, entries = result[0], result[1]
            await self._hand_to_webhooks(entries)
            if start in ("0-0", b"0-0"):
                return


class ClusterCallRegistry(CallRegistry[Any]):
    """The local registry, which also deregisters each ended call from the cluster's."""

    def __init__(self, max_calls: int, node: ClusterNode) -> None:
        super().__init__(max_calls)
        self.node = node

    def ended(self, call: Any) -> None:
        super().ended(call)
        if call.call_id in self.node.claimed:
            self.node.claimed.discard(call.call_id)
            self.node.release_call(call.call_id)


class ClusterSettings:
    """Per-call settings in a cluster: the API request registered in Redis under the UUID (by
    whichever node started the call) wins; then the local resolver (dialplan, defaults). The call
    is also claimed in the cluster's registry here, under ``cluster.max_calls``."""

    def __init__(self, node: ClusterNode, local: Any) -> None:
        self.node = node
        self.local = local

    def expected_profile(self, call_id: str) -> str | None:
        # A request registered in Redis by another node is only known once read (in resolve_settings).
        profile: str | None = self.local.expected_profile(call_id)
        return profile

    async def resolve_settings(self, call: Any) -> CallSettings:
        try:
            why = await self.node.claim_call(call.call_id)
            shared = None if why is not None else await self.node.take_pending(call.call_id)
        except Exception as exc:  # noqa: BLE001 - Redis down: this node's calls go on, unregistered
            call.log.error("cluster: cannot register the call in Redis (%s): it is not visible to other nodes",
                           exc)
            why, shared = None, None
        if shared is not None:
            self.local.pending[call.call_id] = shared
        settings: CallSettings = await self.local.resolve_settings(call)
        if why is not None:
            settings.refuse = why
        return settings
