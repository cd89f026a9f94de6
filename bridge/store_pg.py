"""Call history and webhook subscriptions in PostgreSQL (``store.postgres_url``), shared by the
bridges of a cluster (bridge/cluster.py).

The same contract as bridge/store.py's SQLite :class:`~bridge.store.CallStore` (its docstrings
say what each method means): :meth:`record` is synchronous and never blocks (a bounded queue; a
writer task applies batches, one transaction each, one savepoint per event), reads flush this
node's queue first. Any node may write any call's row: the node that reaps a dead node's calls
marks them failed here. Imported only when configured: asyncpg is the 'cluster' extra.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import secrets
import time
from collections.abc import Iterable
from typing import Any

import asyncpg

from .events import Event
from .store import QUEUE_MAX, STORED_TYPES, TERMINAL_STATES, _Dialing, _json, _loads, _num, _str, redact
from .supervise import Supervisor

log = logging.getLogger("voxbridge.store")

#: Deadline on connecting and on each statement: a database that hangs must not hang the bridge.
PG_TIMEOUT_S = 10.0
#: Most events applied in one transaction.
BATCH_MAX = 500
#: How often retention runs (seconds).
PRUNE_INTERVAL_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    call_id     TEXT PRIMARY KEY,
    direction   TEXT,
    profile     TEXT,
    state       TEXT NOT NULL,
    caller      TEXT,
    caller_name TEXT,
    called      TEXT,
    channel     TEXT,
    started_at  DOUBLE PRECISION,
    answered_at DOUBLE PRECISION,
    ended_at    DOUBLE PRECISION,
    duration_s  DOUBLE PRECISION,
    end_reason  TEXT,
    metadata    TEXT NOT NULL DEFAULT '{}',
    variables   TEXT NOT NULL DEFAULT '{}',
    n           BIGSERIAL
);
CREATE INDEX IF NOT EXISTS calls_started_at ON calls (started_at);
CREATE INDEX IF NOT EXISTS calls_state ON calls (state);
CREATE TABLE IF NOT EXISTS transcripts (
    call_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT, text TEXT, t DOUBLE PRECISION,
    PRIMARY KEY (call_id, seq)
);
CREATE TABLE IF NOT EXISTS tool_calls (
    call_id TEXT NOT NULL, tool_call_id TEXT NOT NULL, tool TEXT, args TEXT,
    outcome TEXT NOT NULL DEFAULT 'pending', result TEXT, duration_ms DOUBLE PRECISION, origin TEXT,
    started_at DOUBLE PRECISION, completed_at DOUBLE PRECISION, n BIGSERIAL,
    PRIMARY KEY (call_id, tool_call_id)
);
CREATE TABLE IF NOT EXISTS hooks (
    call_id TEXT NOT NULL, seq INTEGER NOT NULL, hook TEXT, outcome TEXT, status INTEGER,
    duration_ms DOUBLE PRECISION, changes TEXT NOT NULL DEFAULT '[]', at DOUBLE PRECISION,
    PRIMARY KEY (call_id, seq)
);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, url TEXT NOT NULL, events TEXT NOT NULL DEFAULT '[]', secret TEXT NOT NULL,
    description TEXT, created_at DOUBLE PRECISION NOT NULL, n BIGSERIAL
);
ALTER TABLE calls ADD COLUMN IF NOT EXISTS node TEXT;
"""

_CALL_COLUMNS = ("call_id, state, direction, profile, caller, called, channel, started_at, ended_at, "
                 "duration_s, end_reason, metadata")


def _epoch(value: str | None, name: str) -> float | None:
    """An ISO-8601 time (naive means UTC) as epoch seconds; ValueError naming ``name`` if not one."""
    if value is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an ISO-8601 time (e.g. 2026-01-31T12:00:00Z), not {value!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


class PostgresCallStore:
    """The call history and webhook subscriptions, in PostgreSQL. ``await start()`` … ``close()``."""

    def __init__(self, url: str, redact_args: Iterable[str] = (), *, queue_max: int = QUEUE_MAX,
                 retention_days: float | None = None, supervisor: Supervisor | None = None,
                 node: str | None = None) -> None:
        self._url = url
        #: This bridge's cluster node id, written on the calls it owns (the start-up sweep's key).
        self.node = node
        self._redact = frozenset(n.lower() for n in redact_args)
        self.retention_days = retention_days
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._queue: collections.deque[Event | _Dialing] = collections.deque()
        self._queue_max = queue_max
        self._wake = asyncio.Event()
        self._pool: Any = None
        self._writer: asyncio.Task[None] | None = None
        self._enqueued = 0
        self._applied = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._next_prune = 0.0
        self._write_errors = 0
        #: Events refused because the queue was full (or the store closed).
        self.dropped = 0
        self.writer_crashes = 0
        self.pruned = 0
        self._closed = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(self._url, min_size=1, max_size=4, timeout=PG_TIMEOUT_S,
                                                   command_timeout=PG_TIMEOUT_S)
            async with self._pool.acquire() as c, c.transaction():
                # One node at a time creates the schema (the others wait on the lock, then find it).
                await c.execute("SELECT pg_advisory_xact_lock(7261)")
                await c.execute(_SCHEMA)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            raise ConnectionError(f"store.postgres_url: cannot use PostgreSQL ({type(exc).__name__}: {exc})") from None
        self._writer = self._supervisor.start("store", self._write_loop)

    async def close(self) -> None:
        if self._closed:
            return
        try:
            async with asyncio.timeout(PG_TIMEOUT_S):
                await self.flush()
        except TimeoutError:
            log.warning("call history: closing with %d event(s) not written", len(self._queue))
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def errors(self) -> int:
        return self._write_errors

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ writing

    def record(self, event: Event) -> None:
        if event.type in STORED_TYPES:
            self._put(event)

    def record_dialing(self, call_id: str, direction: str, profile: str | None, destination: str,
                       metadata: dict[str, Any]) -> None:
        self._put(_Dialing(call_id, direction, profile, destination, dict(metadata), time.time()))

    def _put(self, item: Event | _Dialing) -> None:
        if self._closed or len(self._queue) >= self._queue_max:
            self.dropped += 1
            return
        self._queue.append(item)
        self._enqueued += 1
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything recorded so far is written (or given up on)."""
        if self._applied >= self._enqueued or self._pool is None:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((self._enqueued, waiter))
        await waiter

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                try:
                    async with asyncio.timeout(60):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH_MAX))]
            if batch:
                try:
                    await self._apply_batch(batch)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self._write_errors += len(batch)
                    log.error("call history: %d event(s) not written to PostgreSQL: %s", len(batch), exc)
                self._applied += len(batch)
                self._wake_flushers()
            if self.retention_days is not None and time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                await self._prune()

    def _wake_flushers(self) -> None:
        still = []
        for target, fut in self._flush_waiters:
            if self._applied >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._flush_waiters = still

    async def _prune(self) -> None:
        assert self.retention_days is not None
        cutoff = time.time() - self.retention_days * 86400
        try:
            async with self._pool.acquire() as c, c.transaction():
                ids = [r[0] for r in await c.fetch(
                    "DELETE FROM calls WHERE state = ANY($1::text[]) AND ended_at < $2 RETURNING call_id",
                    list(TERMINAL_STATES), cutoff)]
                for table in ("transcripts", "tool_calls", "hooks"):
                    await c.execute(f"DELETE FROM {table} WHERE call_id = ANY($1::text[])", ids)
            self.pruned += len(ids)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("call history: retention pass failed: %s", exc)

    async def _apply_batch(self, batch: list[Event | _Dialing]) -> None:
        async with self._pool.acquire() as c, c.transaction():
            for item in batch:
                try:
                    async with c.transaction():  # a savepoint: one bad event is skipped, not the batch
                        await self._apply(c, item)
                except asyncpg.PostgresError:
                    self._write_errors += 1
                    log.exception("call history: cannot apply %s for call %s",
                                  getattr(item, "type", "dialing"), item.call_id)

    async def _apply(self, c: Any, item: Event | _Dialing) -> None:
        if isinstance(item, _Dialing):
            await c.execute("INSERT INTO calls (call_id, state, direction, profile, called, started_at, metadata, "
                            "node) VALUES ($1, 'dialing', $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                            item.call_id, item.direction, item.profile, item.destination, item.ts,
                            _json(item.metadata), self.node)
            return
        d = item.data
        cid = item.call_id
        meta = d.get("metadata")
        meta_json = _json(meta) if isinstance(meta, dict) else "{}"
        profile = _str(d.get("profile"))
        if item.type == "call.started":
            variables = d.get("variables")
            await c.execute(
                "INSERT INTO calls (call_id, state, direction, profile, caller, caller_name, called, channel, "
                "started_at, metadata, variables, node) "
                "VALUES ($1, 'connecting', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
                "ON CONFLICT (call_id) DO UPDATE SET node = excluded.node, "
                "state = CASE WHEN calls.state = 'dialing' THEN 'connecting' ELSE calls.state END, "
                "direction = COALESCE(excluded.direction, calls.direction), "
                "profile = COALESCE(excluded.profile, calls.profile), "
                "caller = excluded.caller, caller_name = excluded.caller_name, "
                "called = COALESCE(NULLIF(excluded.called, ''), calls.called), "
                "channel = excluded.channel, "
                "started_at = COALESCE(calls.started_at, excluded.started_at), "
                "metadata = CASE WHEN excluded.metadata = '{}' THEN calls.metadata ELSE excluded.metadata END, "
                "variables = excluded.variables",
                cid, _str(d.get("direction")), profile, _str(d.get("caller")), _str(d.get("caller_name")),
                _str(d.get("called")), _str(d.get("channel")), item.ts, meta_json,
                _json(variables if isinstance(variables, dict) else {}), self.node)
            return
        await c.execute("INSERT INTO calls (call_id, state, direction, profile, called, started_at, metadata) "
                        "VALUES ($1, 'connecting', $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                        cid, _str(d.get("direction")), profile, _str(d.get("called") or d.get("destination")),
                        item.ts, meta_json)
        if item.type == "call.answered":
            await c.execute("UPDATE calls SET state = CASE WHEN state IN ('dialing', 'connecting') THEN 'active' "
                            "ELSE state END, answered_at = COALESCE(answered_at, $1), "
                            "profile = COALESCE($2, profile) WHERE call_id = $3", item.ts, profile, cid)
        elif item.type == "transcript":
            await c.execute("INSERT INTO transcripts (call_id, seq, role, text, t) "
                            "SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4 FROM transcripts WHERE call_id = $1",
                            cid, _str(d.get("role")), _str(d.get("text")), _num(d.get("t")))
        elif item.type == "tool.called":
            await c.execute(
                "INSERT INTO tool_calls (call_id, tool_call_id, tool, args, origin, started_at) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (call_id, tool_call_id) DO UPDATE SET "
                "tool = excluded.tool, args = excluded.args, origin = excluded.origin, "
                "started_at = excluded.started_at",
                cid, self._tool_call_id(item), _str(d.get("tool")), _json(redact(d.get("args"), self._redact)),
                _str(d.get("origin")), item.ts)
        elif item.type == "tool.completed":
            result = d.get("result")
            await c.execute(
                "INSERT INTO tool_calls (call_id, tool_call_id, tool, outcome, result, duration_ms, origin, "
                "completed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (call_id, tool_call_id) "
                "DO UPDATE SET tool = COALESCE(excluded.tool, tool_calls.tool), outcome = excluded.outcome, "
                "result = excluded.result, duration_ms = excluded.duration_ms, "
                "origin = COALESCE(excluded.origin, tool_calls.origin), completed_at = excluded.completed_at",
                cid, self._tool_call_id(item), _str(d.get("tool")), _str(d.get("outcome")) or "unknown",
                result if isinstance(result, str) or result is None else _json(result),
                _num(d.get("duration_ms")), _str(d.get("origin")), item.ts)
        elif item.type == "hook.completed":
            changes = d.get("changes")
            status = d.get("status")
            await c.execute(
                "INSERT INTO hooks (call_id, seq, hook, outcome, status, duration_ms, changes, at) "
                "SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5, $6, $7 FROM hooks WHERE call_id = $1",
                cid, _str(d.get("hook")), _str(d.get("outcome")),
                status if isinstance(status, int) and not isinstance(status, bool) else None,
                _num(d.get("duration_ms")), _json(changes if isinstance(changes, list) else []), item.ts)
        elif item.type == "call.failed":
            await c.execute("UPDATE calls SET state = 'failed', end_reason = $1, ended_at = COALESCE(ended_at, $2) "
                            "WHERE call_id = $3", _str(d.get("reason")) or "failed", item.ts, cid)
        elif item.type == "call.ended":
            await c.execute("UPDATE calls SET state = CASE WHEN state = 'failed' THEN 'failed' ELSE 'ended' END, "
                            "ended_at = $1, duration_s = $2, end_reason = COALESCE($3, end_reason), "
                            "profile = COALESCE($4, profile), "
                            # the final metadata: tags added mid-call (the API's tags command) are kept
                            "metadata = CASE WHEN $6 = '{}' THEN metadata ELSE $6 END WHERE call_id = $5",
                            item.ts, _num(d.get("duration_s")), _str(d.get("reason")), profile, cid, meta_json)
            await self._reconcile_transcript(c, cid, d.get("transcript"))

    @staticmethod
    def _tool_call_id(event: Event) -> str:
        tcid = event.data.get("tool_call_id")
        return str(tcid) if tcid is not None else f"event-{event.id}"

    @staticmethod
    async def _reconcile_transcript(c: Any, call_id: str, transcript: Any) -> None:
        if not isinstance(transcript, list):
            return
        have = await c.fetchval("SELECT COUNT(*) FROM transcripts WHERE call_id = $1", call_id)
        if have >= len(transcript):
            return
        await c.execute("DELETE FROM transcripts WHERE call_id = $1", call_id)
        await c.executemany("INSERT INTO transcripts (call_id, seq, role, text, t) VALUES ($1, $2, $3, $4, $5)",
                            [(call_id, i, _str(x.get("role")), _str(x.get("text")), _num(x.get("t")))
                             for i, x in enumerate((x for x in transcript if isinstance(x, dict)), 1)])

    # ------------------------------------------------------------------ reading

    def _require(self) -> Any:
        if self._pool is None or self._closed:
            raise RuntimeError("the call store is not running (start() it first)")
        return self._pool

    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        await self.flush()
        calls = await self._select_calls("WHERE call_id = $1", [call_id], 1, 0)
        return calls[0] if calls else None

    async def list_calls(self, state: str | None = None, limit: int = 50, offset: int = 0, *,
                         caller: str | None = None, profile: str | None = None, end_reason: str | None = None,
                         since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:
        """Calls newest first, every node's. ``state``: None, ``"active"`` or ``"ended"``;
        ``caller``/``profile``/``end_reason``: exact matches; ``since``/``until``: ISO-8601 bounds
        on ``started_at`` (inclusive, exclusive). ValueError names a bad argument."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        where, params = self._filters(state, caller=caller, profile=profile, end_reason=end_reason,
                                      since=since, until=until)
        await self.flush()
        return await self._select_calls(where, params, limit, offset)

    async def count_calls(self, state: str | None = None) -> int:
        where, params = self._filters(state)
        await self.flush()
        async with self._require().acquire() as c:
            return int(await c.fetchval(f"SELECT COUNT(*) FROM calls {where}", *params))

    @staticmethod
    def _filters(state: str | None, **exact_and_times: str | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []

        def add(sql: str, value: Any) -> None:
            params.append(value)
            clauses.append(sql.replace("$?", f"${len(params)}"))

        if state == "active":
            add("NOT (state = ANY($?::text[]))", list(TERMINAL_STATES))
        elif state == "ended":
            add("state = ANY($?::text[])", list(TERMINAL_STATES))
        elif state is not None:
            raise ValueError(f"state must be 'active' or 'ended', not {state!r}")
        for column in ("caller", "profile", "end_reason"):
            value = exact_and_times.get(column)
            if value is not None:
                add(f"{column} = $?", value)
        since = _epoch(exact_and_times.get("since"), "since")
        until = _epoch(exact_and_times.get("until"), "until")
        if since is not None:
            add("started_at >= $?", since)
        if until is not None:
            add("started_at < $?", until)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), params

    async def get_tool_calls(self, call_id: str) -> list[dict[str, Any]]:
        await self.flush()
        async with self._require().acquire() as c:
            rows = await c.fetch(
                "SELECT tool_call_id, tool, args, outcome, result, duration_ms, origin, started_at, completed_at "
                "FROM tool_calls WHERE call_id = $1 ORDER BY n", call_id)
        return [{"tool_call_id": r[0], "tool": r[1], "args": _loads(r[2], None), "outcome": r[3], "result": r[4],
                 "duration_ms": r[5], "origin": r[6], "started_at": r[7], "completed_at": r[8]} for r in rows]

    async def _select_calls(self, where: str, params: list[Any], limit: int, offset: int) -> list[dict[str, Any]]:
        n = len(params)
        async with self._require().acquire() as c:
            rows = await c.fetch(f"SELECT {_CALL_COLUMNS} FROM calls {where} "
                                 f"ORDER BY started_at DESC NULLS LAST, n DESC LIMIT ${n + 1} OFFSET ${n + 2}",
                                 *params, limit, offset)
            if not rows:
                return []
            ids = [r[0] for r in rows]
            transcripts: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            tools: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            hooks: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            for cid, role, text, t in await c.fetch(
                    "SELECT call_id, role, text, t FROM transcripts WHERE call_id = ANY($1::text[]) "
                    "ORDER BY call_id, seq", ids):
                transcripts[cid].append({"role": role, "text": text, "t": t})
            for cid, tool, outcome, duration_ms in await c.fetch(
                    "SELECT call_id, tool, outcome, duration_ms FROM tool_calls WHERE call_id = ANY($1::text[]) "
                    "ORDER BY n", ids):
                tools[cid].append({"tool": tool, "outcome": outcome, "duration_ms": duration_ms})
            for cid, hook, outcome, status, duration_ms, changes in await c.fetch(
                    "SELECT call_id, hook, outcome, status, duration_ms, changes FROM hooks "
                    "WHERE call_id = ANY($1::text[]) ORDER BY call_id, seq", ids):
                hooks[cid].append({"hook": hook, "outcome": outcome, "status": status, "duration_ms": duration_ms,
                                   "changes": _loads(changes, [])})
        return [{
            "call_id": r[0], "state": r[1], "direction": r[2], "profile": r[3], "caller": r[4], "called": r[5],
            "channel": r[6], "started_at": r[7], "ended_at": r[8], "duration_s": r[9], "end_reason": r[10],
            "metadata": _loads(r[11], {}), "transcript": transcripts[r[0]], "tools": tools[r[0]],
            "hooks": hooks[r[0]],
        } for r in rows]

    # ------------------------------------------------------------------ the start-up sweep (bridge/cluster.py)

    async def unfinished_calls(self) -> list[tuple[str, str | None]]:
        """Every call the history still shows in progress, with the node that owned it (None:
        written before nodes were recorded, or by a bridge outside a cluster)."""
        async with self._require().acquire() as c:
            rows = await c.fetch("SELECT call_id, node FROM calls WHERE state NOT IN ($1, $2)", *TERMINAL_STATES)
        return [(r[0], r[1]) for r in rows]

    async def fail_unfinished(self, reasons: dict[str, str]) -> list[str]:
        """Mark each call of ``reasons`` (call id → end reason) failed if it is still in progress;
        return those this call changed. Exactly once across nodes sweeping together: a second
        UPDATE waits for the first one's row lock, then re-reads the state and skips the row."""
        if not reasons:
            return []
        async with self._require().acquire() as c:
            rows = await c.fetch(
                "UPDATE calls SET state = 'failed', end_reason = r.reason, ended_at = COALESCE(ended_at, $3) "
                "FROM unnest($1::text[], $2::text[]) AS r(call_id, reason) "
                "WHERE calls.call_id = r.call_id AND calls.state NOT IN ($4, $5) RETURNING calls.call_id",
                list(reasons), list(reasons.values()), time.time(), *TERMINAL_STATES)
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ webhook subscriptions

    async def add_webhook(self, url: str, events: list[str] | None, secret: str,
                          description: str | None = None) -> dict[str, Any]:
        events = list(events or [])
        created = time.time()
        async with self._require().acquire() as c:
            for _ in range(5):
                hook_id = secrets.token_hex(6)
                done = await c.fetchval(
                    "INSERT INTO webhooks (id, url, events, secret, description, created_at) "
                    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING id",
                    hook_id, url, _json(events), secret, description, created)
                if done is not None:
                    return {"id": hook_id, "url": url, "events": events, "description": description,
                            "created_at": created, "secret": secret}
        raise RuntimeError("could not allocate a webhook id")

    async def list_webhooks(self) -> list[dict[str, Any]]:
        return await self._select_webhooks("", [])

    async def get_webhook(self, hook_id: str) -> dict[str, Any] | None:
        hooks = await self._select_webhooks("WHERE id = $1", [hook_id])
        return hooks[0] if hooks else None

    async def delete_webhook(self, hook_id: str) -> bool:
        async with self._require().acquire() as c:
            return bool(await c.fetchval("DELETE FROM webhooks WHERE id = $1 RETURNING id", hook_id))

    async def _select_webhooks(self, where: str, params: list[Any]) -> list[dict[str, Any]]:
        async with self._require().acquire() as c:
            rows = await c.fetch(f"SELECT id, url, events, description, created_at, secret FROM webhooks {where} "
                                 "ORDER BY created_at, n", *params)
        return [{"id": r[0], "url": r[1], "events": _loads(r[2], []), "description": r[3], "created_at": r[4],
                 "secret": r[5]} for r in rows]
