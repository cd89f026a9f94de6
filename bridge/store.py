"""Call history and webhook subscriptions, in SQLite.

Writes come from the media path: :meth:`CallStore.record` is an :class:`~bridge.events.EventBus`
sink, so it only appends to a bounded in-memory queue (O(1), never blocks, never raises). One
writer task (started when the queue fills, gone when it is empty) drains that queue in order and
applies it in batches, one transaction per batch, on the store's own thread: SQLite I/O never runs
on the event loop. When the queue is full, new events are dropped and counted
(:attr:`CallStore.dropped`) rather than delaying a call.

Reads are async and run on the same thread, after the writes that were queued before them
(read-your-writes: ``record_dialing`` then ``get_call`` finds the call).

Only what the history needs is kept: one ``calls`` row per call, its final ``transcripts`` and
its ``tool_calls`` (arguments redacted by name). Calls that were not over when the process
stopped are closed as ``ended`` / ``bridge-restart`` when the store starts again: their sessions
died with the process.

All access goes through one connection on one thread. That serialises reads behind write
batches (each is short), and in exchange there is no locking, no ``SQLITE_BUSY`` handling, and an
in-memory database (``path=None``) behaves exactly like a file.

Retention (``store.retention_days``): ended calls whose ``ended_at`` is older than that are
deleted with their transcript and tool calls, by the writer on the store's thread — when the
store starts, then whenever the writer runs and the last pass is an hour old (no idle task waits
for the hour). Each pass deletes at most ``PRUNE_BATCH`` calls per transaction and lets queued
writes go between its batches, so years of backlog never hold up a call's events.

Failures: a batch SQLite cannot write (disk full, the file removed or made read-only while
running) is logged, counted in :attr:`CallStore.errors` and dropped; calls go on. The writer
itself is watched by the bridge's :class:`~bridge.supervise.Supervisor`: an unexpected exception
(a bug) is logged with its traceback and counted, and a new writer takes over what is still
queued. A writer that keeps crashing is reported to the supervisor as fatal.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .events import Event
from .supervise import Supervisor

log = logging.getLogger("voxbridge.store")

T = TypeVar("T")

SCHEMA_VERSION = 1
#: Events waiting for the writer; beyond this, new ones are dropped (and counted).
QUEUE_MAX = 10_000
#: Events applied per transaction: big enough to amortise the commit, small enough that a read
#: queued behind a batch waits milliseconds, not seconds.
BATCH_MAX = 500
#: How long the writer lets events gather before it writes a batch, unless a read (``flush``) or
#: ``close`` waits for it. Every batch is a hop to the database thread and back (two thread
#: wake-ups, the GIL handed over twice, a commit): one per event cost a busy bridge ~13 % of its
#: CPU in the load benchmark (100 calls, a tool call per call every 10 s), and stalled the event
#: loop while the thread held the GIL. History is read through ``flush``, so nobody reads stale.
WRITE_LINGER_S = 0.25
#: What replaces a redacted tool argument.
REDACTED = "***"
#: Retention: how often a pruning pass runs (seconds, checked when the writer runs) and how
#: many calls one of its transactions deletes at most.
PRUNE_INTERVAL = 3600.0
PRUNE_BATCH = 500
#: While writes keep failing, one log line per this many seconds (the first with its traceback).
FAILURE_LOG_INTERVAL = 60.0
#: Calls in these states are over; every other state counts as "active".
TERMINAL_STATES = ("ended", "failed")
#: The only event types the history needs; the others are not even queued.
STORED_TYPES = frozenset({"call.started", "call.answered", "transcript", "tool.called", "tool.completed",
                          "hook.completed", "call.ended", "call.failed"})
#: The call hooks' outcomes (bridge/hooks.py): added without a schema version bump (see _migrate).
_HOOKS_TABLE = """CREATE TABLE IF NOT EXISTS hooks (
    call_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    hook        TEXT,
    outcome     TEXT,
    status      INTEGER,
    duration_ms REAL,
    changes     TEXT NOT NULL DEFAULT '[]',
    at          REAL,
    PRIMARY KEY (call_id, seq)
)"""

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
    started_at  REAL,
    answered_at REAL,
    ended_at    REAL,
    duration_s  REAL,
    end_reason  TEXT,
    metadata    TEXT NOT NULL DEFAULT '{}',
    variables   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS calls_started_at ON calls (started_at);
CREATE INDEX IF NOT EXISTS calls_state ON calls (state);
CREATE INDEX IF NOT EXISTS calls_ended_at ON calls (ended_at);
CREATE TABLE IF NOT EXISTS transcripts (
    call_id TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    role    TEXT,
    text    TEXT,
    t       REAL,
    PRIMARY KEY (call_id, seq)
);
CREATE TABLE IF NOT EXISTS tool_calls (
    call_id      TEXT NOT NULL,
    tool_call_id TEXT NOT NULL,
    tool         TEXT,
    args         TEXT,
    outcome      TEXT NOT NULL DEFAULT 'pending',
    result       TEXT,
    duration_ms  REAL,
    origin       TEXT,
    started_at   REAL,
    completed_at REAL,
    PRIMARY KEY (call_id, tool_call_id)
);
CREATE TABLE IF NOT EXISTS webhooks (
    id          TEXT PRIMARY KEY,
    url         TEXT NOT NULL,
    events      TEXT NOT NULL DEFAULT '[]',
    secret      TEXT NOT NULL,
    description TEXT,
    created_at  REAL NOT NULL
);
"""

_CALL_COLUMNS = ("call_id, state, direction, profile, caller, called, channel, started_at, ended_at, "
                 "duration_s, end_reason, metadata")


@dataclass(frozen=True, slots=True)
class _Dialing:
    """An API-originated call, queued like an event so that it is applied before its events."""

    call_id: str
    direction: str
    profile: str | None
    destination: str
    metadata: dict[str, Any]
    ts: float


def redact(value: Any, names: frozenset[str]) -> Any:
    """``value`` with every mapping entry whose key is in ``names`` (case-insensitive) replaced
    by ``"***"``, at any depth (inside dicts and lists)."""
    if not names:
        return value
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and k.lower() in names else redact(v, names)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, names) for v in value]
    return value


def parse_time(value: str, name: str) -> float:
    """An ISO-8601 date or time (``2026-11-29``, ``2026-11-29T08:00:00+01:00``; UTC when it names
    no zone) as a Unix timestamp. Raises ValueError naming ``name``."""
    try:
        t = datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an ISO-8601 date or time (e.g. 2026-11-29T08:00:00Z), "
                         f"not {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


def _json(value: Any) -> str:
    # default=str: event data comes from tools and requests; storing "<object …>" beats losing the row.
    return json.dumps(value, ensure_ascii=False, default=str)


def _loads(text: str | None, default: Any) -> Any:
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class CallStore:
    """SQLite call history (calls, transcripts, tool calls) and webhook subscriptions.

    ``path=None`` keeps everything in memory (lost at exit, otherwise identical).
    ``redact_args``: tool argument names stored as ``"***"`` (case-insensitive, at any depth).
    ``retention_days``: ended calls older than this are deleted (None: kept forever).
    ``supervisor``: watches the writer (the bridge passes its own; by default a private one,
    which logs and counts crashes the same way). ``now``: the wall clock, for tests.

    Life cycle: ``await start()`` … ``await close()``. :meth:`record` and :meth:`record_dialing`
    may be called before ``start()`` (they are queued) and must be called from the event loop's
    thread, like every other method.
    """

    def __init__(self, path: Path | str | None, redact_args: Iterable[str] = (), *,
                 queue_max: int = QUEUE_MAX, retention_days: float | None = None,
                 supervisor: Supervisor | None = None, now: Callable[[], float] = time.time,
                 prune_interval: float = PRUNE_INTERVAL, prune_batch: int = PRUNE_BATCH) -> None:
        if retention_days is not None and retention_days <= 0:
            raise ValueError(f"retention_days must be positive or None, got {retention_days!r}")
        self.path = Path(path) if path is not None else None
        self.retention_days = retention_days
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._now = now
        self._prune_interval = prune_interval
        self._prune_batch = prune_batch
        #: When the next pruning pass is due (the ``now`` clock); None: no retention or not started.
        self._next_prune: float | None = None
        self._last_prune: float | None = None
        self._pruned_this_pass = 0
        #: Calls deleted by retention since start.
        self.pruned = 0
        # (dev, inode) of the database file when opened: a file removed or replaced while we run
        # still accepts writes through our open descriptor, into a file nobody will ever read.
        self._file_id: tuple[int, int] | None = None
        self._failing_since: float | None = None  # monotonic; None while writes succeed
        self._failed_events = 0  # lost while failing
        self._failure_logged_at = 0.0
        self._writer_crash_times: collections.deque[float] = collections.deque()
        self._redact = frozenset(n.lower() for n in redact_args)
        self._queue: collections.deque[Event | _Dialing] = collections.deque()
        self._queue_max = queue_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        # Flush bookkeeping: items accepted into the queue vs. items the writer has finished.
        self._enqueued = 0
        self._applied = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._hurry = asyncio.Event()  # set by flush() and close(): write what is queued now
        self._burst_drops = 0
        #: Events refused because the queue was full (or the store closed).
        self.dropped = 0
        # Two counters, because one is bumped on the loop and one on the store's thread.
        self._queue_errors = 0
        self._apply_errors = 0
        #: Writer crashes (unexpected exceptions; each logged with its traceback).
        self.writer_crashes = 0

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Open (or create) the database; anything recorded before this starts going out."""
        if self._closing:
            raise RuntimeError("a closed call store cannot be started again; make a new one")
        if self._executor is not None:
            return
        # One thread owns the connection for its whole life: every statement runs there.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="voxbridge-store")
        try:
            await self._run(self._open)
        except (sqlite3.Error, OSError) as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            # An OSError names the path for the CLI's one-line error, instead of a traceback.
            raise OSError(f"cannot open the call history {self.path}: {exc} (store.path)") from None
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._loop = asyncio.get_running_loop()
        if self.retention_days is not None:
            self._next_prune = self._now()  # a first pass now, on the writer
        if self._queue or self._prune_due():  # recorded before start(), or old calls to delete
            self._spawn_writer()
        log.info("call history: %s%s", self.path or "in memory",
                 f" (calls kept {self.retention_days:g} days)" if self.retention_days is not None else "")

    async def close(self) -> None:
        """Apply every queued write, then close the database. Later records are dropped."""
        if self._closed:
            return
        self._closing = True  # from now on _put drops, so the writer drains and exits
        self._hurry.set()
        while self._writer is not None and not self._writer.done():
            # Not awaited directly: a writer that crashed must not make close() raise. Its done
            # callbacks run before wait() returns, so a writer that took over is waited for too.
            await asyncio.wait([self._writer])
        if self._queue:  # left by a writer that crashed beyond restarting
            self._queue_errors += len(self._queue)
            log.error("call history: %d queued event(s) were never written", len(self._queue))
            self._applied += len(self._queue)
            self._queue.clear()
        self._closed = True
        if self._executor is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._close_conn)
            finally:
                self._executor.shutdown(wait=False)
                self._executor = None

    async def flush(self) -> None:
        """Wait until everything queued so far has been applied (or given up on).

        Waits across a writer crash (the writer started in its place finishes the work)."""
        target = self._enqueued
        if self._applied >= target or self._writer is None or self._writer.done():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, fut))
        self._hurry.set()
        await fut

    @property
    def errors(self) -> int:
        """Events that could not be queued or applied (bad data, SQLite errors, a writer crash) and
        retention passes that failed; each is logged."""
        return self._queue_errors + self._apply_errors

    @property
    def pending(self) -> int:
        """Writes queued and not yet applied."""
        return self._enqueued - self._applied

    # ------------------------------------------------------------------ writes (never block)

    def record(self, event: Event) -> None:
        """EventBus sink: queue ``event`` for the history. O(1); never blocks, never raises."""
        try:
            if event.type in STORED_TYPES:
                self._put(event)
        except Exception:  # deliberately broad: on the media path: losing one record beats losing the call
            self._queue_errors += 1
            log.exception("call history: cannot queue an event")

    def record_dialing(self, call_id: str, direction: str, profile: str | None, destination: str,
                       metadata: dict[str, Any] | None = None) -> None:
        """A call started through the API, before any event exists for it (state ``dialing``).

        Queued with the events, so it is applied before the call's ``call.started``; visible to
        reads at once (they wait for queued writes). Never blocks, never raises.
        """
        try:
            self._put(_Dialing(call_id, direction, profile, destination, dict(metadata or {}), self._now()))
        except Exception:
            self._queue_errors += 1
            log.exception("call history: cannot queue a dialing call")

    def _put(self, item: Event | _Dialing) -> None:
        if self._closing or len(self._queue) >= self._queue_max:
            # Drop the newest: what is queued stays an in-order prefix of what happened.
            self.dropped += 1
            self._burst_drops += 1
            if self._burst_drops == 1:  # once per burst; the writer reports the total when it ends
                log.warning("call history: %s, dropping events", "closed" if self._closing else
                            f"write queue full ({self._queue_max})")
            return
        self._queue.append(item)
        self._enqueued += 1
        if len(self._queue) >= BATCH_MAX:
            self._hurry.set()  # a whole batch is waiting: no reason to linger
        if self._loop is not None and (self._writer is None or self._writer.done()):
            self._spawn_writer()

    def _spawn_writer(self) -> None:
        # The writer runs only while there is something to do: no idle task outlives a call
        # (tests check for leaked tasks), and there is still never more than one, so order holds.
        assert self._loop is not None
        task = self._loop.create_task(self._write_loop(), name="store-writer")
        self._writer = task
        # Registered in this order, so a crash is handled (and a replacement started) first.
        self._supervisor.watch(task, "store-writer", self._writer_crashed)
        task.add_done_callback(self._writer_done)

    def _writer_crashed(self, exc: BaseException) -> None:
        """Supervisor callback: the writer died of an unexpected exception (already logged with
        its traceback). Start a new one for what is still queued, unless crashes keep coming."""
        self.writer_crashes += 1
        now = time.monotonic()
        self._writer_crash_times.append(now)
        while self._writer_crash_times and now - self._writer_crash_times[0] > self._supervisor.window:
            self._writer_crash_times.popleft()
        if len(self._writer_crash_times) > self._supervisor.max_restarts:
            # Raising here makes the supervisor declare the part broken (the bridge then exits).
            raise RuntimeError(f"the call-history writer crashed {len(self._writer_crash_times)} times in "
                               f"{self._supervisor.window:.0f} s") from exc
        if (self._queue or self._prune_due()) and (self._writer is None or self._writer.done()):
            self._spawn_writer()

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        # Whatever happened to the writer, nobody waits for it forever; but if another writer
        # took over (after a crash), the flushers of what is still queued wait for that one.
        self._wake_flushers()
        if self._writer is task:
            for _, fut in self._flush_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._flush_waiters.clear()

    def _prune_due(self) -> bool:
        if self._next_prune is None or self._closing:
            return False  # no retention; or closing: close() drains writes, it does not wait for a purge
        now = self._now()
        # A wall clock set back (by more than a pass) must not postpone retention for that long.
        return now >= self._next_prune or (self._last_prune is not None and now < self._last_prune)

    async def _write_loop(self) -> None:
        while self._queue or self._prune_due():
            if self._queue and len(self._queue) < BATCH_MAX and not self._closing and not self._flush_waiters:
                await self._linger()
            if self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH_MAX))]
                try:
                    await self._run(self._apply_batch, batch)
                except sqlite3.Error as exc:  # disk full, file removed or read-only: lose this batch, go on
                    self._queue_errors += len(batch)
                    self._write_failed(len(batch), exc)
                except asyncio.CancelledError:
                    self._applied += len(batch)  # (the thread may still apply it)
                    raise
                except BaseException:
                    # A bug: the batch is lost. The supervisor logs it and starts a new writer for
                    # the rest; flushers wake once that is done (_writer_done), not before.
                    self._queue_errors += len(batch)
                    self._applied += len(batch)
                    raise
                else:
                    self._write_succeeded()
                self._applied += len(batch)
                self._wake_flushers()
            if self._prune_due():
                await self._prune_step()  # one bounded batch; queued writes go before the next one
        if self._burst_drops:
            log.warning("call history: write queue drained; %d event(s) were dropped", self._burst_drops)
            self._burst_drops = 0

    async def _linger(self) -> None:
        """Let more events join the batch: WRITE_LINGER_S, or until a read or close() hurries it."""
        hurry = self._hurry
        hurry.clear()
        assert self._loop is not None
        timer = self._loop.call_later(WRITE_LINGER_S, hurry.set)
        try:
            await hurry.wait()
        finally:
            timer.cancel()

    def _write_failed(self, events: int, exc: sqlite3.Error) -> None:
        self._failed_events += events
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._failure_logged_at = now
            log.error("call history: cannot write (%s): %d event(s) lost; calls go on, and this is logged once "
                      "a minute while it lasts", exc, events, exc_info=exc)
        elif now - self._failure_logged_at >= FAILURE_LOG_INTERVAL:
            self._failure_logged_at = now
            log.error("call history: still cannot write (%s): %d event(s) lost in %.0f s", exc, self._failed_events,
                      now - self._failing_since)

    def _write_succeeded(self) -> None:
        if self._failing_since is not None:
            log.warning("call history: writing again after %.0f s; %d event(s) were lost",
                        time.monotonic() - self._failing_since, self._failed_events)
            self._failing_since = None
            self._failed_events = 0

    async def _prune_step(self) -> None:
        """One retention batch. The next pass is scheduled before this one runs, so a failing
        (or crashing) pass is not retried at once."""
        assert self.retention_days is not None
        now = self._now()
        self._last_prune = now
        self._next_prune = now + self._prune_interval
        cutoff = now - self.retention_days * 86400.0
        try:
            deleted = await self._run(self._prune_batch_on_thread, cutoff, self._prune_batch)
        except sqlite3.Error as exc:
            self._queue_errors += 1
            log.error("call history: cannot delete calls older than store.retention_days (%s); next try in %.0f s",
                      exc, self._prune_interval)
            self._pruned_this_pass = 0
            return
        self._pruned_this_pass += deleted
        self.pruned += deleted
        if deleted >= self._prune_batch:
            self._next_prune = now  # more to delete: the next batch after the queued writes
            return
        if self._pruned_this_pass:
            log.info("call history: deleted %d call(s) that ended more than %g day(s) ago (store.retention_days)",
                     self._pruned_this_pass, self.retention_days)
        self._pruned_this_pass = 0

    def _wake_flushers(self) -> None:
        keep = []
        for target, fut in self._flush_waiters:
            if self._applied >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._flush_waiters = keep

    # ------------------------------------------------------------------ reads

    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        """The call in the API's ``Call`` shape (with transcript and tools), or None."""
        await self.flush()
        calls = await self._run(self._select_calls, "WHERE call_id = ?", (call_id,), 1, 0)
        return calls[0] if calls else None

    async def list_calls(self, state: str | None = None, limit: int = 50, offset: int = 0, *,
                         caller: str | None = None, profile: str | None = None, end_reason: str | None = None,
                         since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:
        """Calls newest first. ``state``: None (all), ``"active"`` (not over) or ``"ended"``
        (ended or failed). ``caller``, ``profile``, ``end_reason``: exact matches. ``since`` /
        ``until``: ISO-8601 times (a zone, else UTC) bounding ``started_at`` (since inclusive, until
        exclusive). Raises ValueError naming the parameter for any bad value."""
        where, params = self._filters(state, caller, profile, end_reason, since, until)
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        await self.flush()
        return await self._run(self._select_calls, where, params, limit, offset)

    async def count_calls(self, state: str | None = None) -> int:
        """How many calls :meth:`list_calls` would page through for ``state``."""
        where, params = self._state_filter(state)
        await self.flush()
        return await self._run(lambda c: c.execute(f"SELECT COUNT(*) FROM calls {where}", params).fetchone()[0])

    async def get_tool_calls(self, call_id: str) -> list[dict[str, Any]]:
        """Every tool call of a call, in order, in full: (redacted) args, result, timestamps."""
        await self.flush()

        def q(c: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT tool_call_id, tool, args, outcome, result, duration_ms, origin, started_at, completed_at "
                "FROM tool_calls WHERE call_id = ? ORDER BY rowid", (call_id,)).fetchall()
            return [{"tool_call_id": r[0], "tool": r[1], "args": _loads(r[2], None), "outcome": r[3],
                     "result": r[4], "duration_ms": r[5], "origin": r[6], "started_at": r[7],
                     "completed_at": r[8]} for r in rows]

        return await self._run(q)

    @classmethod
    def _filters(cls, state: str | None, caller: str | None, profile: str | None, end_reason: str | None,
                 since: str | None, until: str | None) -> tuple[str, tuple[Any, ...]]:
        """The WHERE clause of :meth:`list_calls`' filters (exact matches, ANDed)."""
        where, params = cls._state_filter(state)
        clauses = [where[len("WHERE "):]] if where else []
        args: list[Any] = list(params)
        for column, value in (("caller", caller), ("profile", profile), ("end_reason", end_reason)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        for name, value, op in (("since", since, ">="), ("until", until, "<")):
            if value is not None:
                clauses.append(f"started_at {op} ?")
                args.append(parse_time(value, name))
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)

    @staticmethod
    def _state_filter(state: str | None) -> tuple[str, tuple[Any, ...]]:
        if state is None:
            return "", ()
        marks = ", ".join("?" * len(TERMINAL_STATES))
        if state == "active":
            return f"WHERE state NOT IN ({marks})", TERMINAL_STATES
        if state == "ended":
            return f"WHERE state IN ({marks})", TERMINAL_STATES
        raise ValueError(f"state must be 'active' or 'ended', not {state!r}")

    # ------------------------------------------------------------------ webhook subscriptions

    async def add_webhook(self, url: str, events: list[str] | None, secret: str,
                          description: str | None = None) -> dict[str, Any]:
        """Persist a subscription (no validation here: see WebhookDispatcher.create). ``events``
        empty or None means every type (stored as ``[]``). Returns it, secret included."""
        events = list(events or [])

        def q(c: sqlite3.Connection) -> dict[str, Any]:
            created = time.time()
            for _ in range(5):  # 48 random bits: a collision is astronomically unlikely, but cheap to handle
                hook_id = secrets.token_hex(6)
                try:
                    with c:
                        c.execute("INSERT INTO webhooks (id, url, events, secret, description, created_at) "
                                  "VALUES (?, ?, ?, ?, ?, ?)", (hook_id, url, _json(events), secret, description,
                                                                created))
                except sqlite3.IntegrityError:
                    continue
                return {"id": hook_id, "url": url, "events": events, "description": description,
                        "created_at": created, "secret": secret}
            raise RuntimeError("could not allocate a webhook id")

        return await self._run(q)

    async def list_webhooks(self) -> list[dict[str, Any]]:
        """Every subscription, oldest first, secrets included (for delivery; never show them)."""
        return await self._run(self._select_webhooks, "", ())

    async def get_webhook(self, hook_id: str) -> dict[str, Any] | None:
        hooks = await self._run(self._select_webhooks, "WHERE id = ?", (hook_id,))
        return hooks[0] if hooks else None

    async def delete_webhook(self, hook_id: str) -> bool:
        """True if it existed."""
        def q(c: sqlite3.Connection) -> bool:
            with c:
                return c.execute("DELETE FROM webhooks WHERE id = ?", (hook_id,)).rowcount > 0

        return await self._run(q)

    @staticmethod
    def _select_webhooks(c: sqlite3.Connection, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        rows = c.execute(f"SELECT id, url, events, description, created_at, secret FROM webhooks {where} "
                         "ORDER BY created_at, rowid", params).fetchall()
        return [{"id": r[0], "url": r[1], "events": _loads(r[2], []), "description": r[3], "created_at": r[4],
                 "secret": r[5]} for r in rows]

    # ------------------------------------------------------------------ on the store's thread

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` on the store's thread."""
        if self._executor is None or self._closed:
            raise RuntimeError("the call store is not running (start() it first)")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._conn, *args))

    def _open(self, _conn: None) -> None:
        target = str(self.path) if self.path is not None else ":memory:"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
        conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # in memory this stays "memory"; harmless
            # NORMAL is safe with WAL (no corruption); a power cut may lose the last batches only.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")  # e.g. an operator's sqlite3 shell holding a lock
            self._migrate(conn)
            if self.path is not None:
                st = os.stat(self.path)
                self._file_id = (st.st_dev, st.st_ino)
            now = self._now()
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(
                "UPDATE calls SET state = 'ended', end_reason = COALESCE(end_reason, 'bridge-restart'), "
                "ended_at = COALESCE(ended_at, ?) WHERE state NOT IN (?, ?)", (now, *TERMINAL_STATES))
            conn.execute("COMMIT")
            if cur.rowcount:
                log.warning("call history: %d call(s) were in progress when voxbridge stopped; marked ended "
                            "(bridge-restart)", cur.rowcount)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] or 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"the call history was written by a newer voxbridge (schema {version}, "
                                   f"this one knows {SCHEMA_VERSION})")
            if version < 1:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            # Not a schema change (older versions read the file as before, so no version bump that
            # would stop a downgrade): the index retention deletes by, for files made before it.
            conn.execute("CREATE INDEX IF NOT EXISTS calls_ended_at ON calls (ended_at)")
            # Likewise additive: the call hooks' outcomes (an older voxbridge ignores the table).
            conn.execute(_HOOKS_TABLE)
            # Future versions: `if version < 2: ALTER TABLE …` here, in order.
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _check_file(self) -> None:
        """Raise if the database file is gone, replaced or read-only since it was opened.

        SQLite would go on writing through its open descriptor (into a removed file, or past a
        ``chmod a-w`` — root ignores permissions), and the history would silently be lost.
        """
        if self._file_id is None or self.path is None:
            return
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise sqlite3.OperationalError(f"the call history {self.path} is gone ({exc.strerror}); "
                                           "restart voxbridge to create it again") from None
        if (st.st_dev, st.st_ino) != self._file_id:
            raise sqlite3.OperationalError(f"the call history {self.path} was replaced by another file; "
                                           "restart voxbridge to use it")
        if not st.st_mode & 0o222:
            raise sqlite3.OperationalError(f"the call history {self.path} was made read-only")

    def _prune_batch_on_thread(self, conn: sqlite3.Connection, cutoff: float, limit: int) -> int:
        """Delete up to ``limit`` calls that ended before ``cutoff``, with their rows; how many."""
        self._check_file()
        conn.execute("BEGIN IMMEDIATE")
        try:
            ids = [r[0] for r in conn.execute(
                f"SELECT call_id FROM calls WHERE ended_at < ? AND state IN ({', '.join('?' * len(TERMINAL_STATES))}) "
                "ORDER BY ended_at LIMIT ?", (cutoff, *TERMINAL_STATES, limit))]
            if ids:
                marks = ", ".join("?" * len(ids))
                for table in ("transcripts", "tool_calls", "hooks", "calls"):
                    conn.execute(f"DELETE FROM {table} WHERE call_id IN ({marks})", ids)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(ids)

    def _apply_batch(self, conn: sqlite3.Connection, batch: list[Event | _Dialing]) -> None:
        self._check_file()
        conn.execute("BEGIN")
        try:
            for item in batch:
                # A savepoint per event: one malformed event is skipped without half-applying it,
                # and without losing the rest of the batch.
                conn.execute("SAVEPOINT ev")
                try:
                    self._apply(conn, item)
                except Exception:
                    conn.execute("ROLLBACK TO ev")
                    self._apply_errors += 1
                    log.exception("call history: cannot apply %s for call %s",
                                  getattr(item, "type", "dialing"), item.call_id)
                conn.execute("RELEASE ev")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _apply(self, c: sqlite3.Connection, item: Event | _Dialing) -> None:
        if isinstance(item, _Dialing):
            c.execute("INSERT OR IGNORE INTO calls (call_id, state, direction, profile, called, started_at, metadata) "
                      "VALUES (?, 'dialing', ?, ?, ?, ?, ?)",
                      (item.call_id, item.direction, item.profile, item.destination, item.ts, _json(item.metadata)))
            return
        d = item.data
        cid = item.call_id
        meta = d.get("metadata")
        meta_json = _json(meta) if isinstance(meta, dict) else "{}"
        profile = _str(d.get("profile"))
        if item.type == "call.started":
            variables = d.get("variables")
            c.execute(
                "INSERT INTO calls (call_id, state, direction, profile, caller, caller_name, called, channel, "
                "started_at, metadata, variables) VALUES (?, 'connecting', ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (call_id) DO UPDATE SET "
                "state = CASE WHEN calls.state = 'dialing' THEN 'connecting' ELSE calls.state END, "
                "direction = COALESCE(excluded.direction, calls.direction), "
                "profile = COALESCE(excluded.profile, calls.profile), "
                "caller = excluded.caller, caller_name = excluded.caller_name, "
                # An outbound call's session may not know the number dialled: keep the destination.
                "called = COALESCE(NULLIF(excluded.called, ''), calls.called), "
                "channel = excluded.channel, "
                # A dialled call started when the API accepted it, not when the callee answered.
                "started_at = COALESCE(calls.started_at, excluded.started_at), "
                "metadata = CASE WHEN excluded.metadata = '{}' THEN calls.metadata ELSE excluded.metadata END, "
                "variables = excluded.variables",
                (cid, _str(d.get("direction")), profile, _str(d.get("caller")), _str(d.get("caller_name")),
                 _str(d.get("called")), _str(d.get("channel")), item.ts, meta_json,
                 _json(variables if isinstance(variables, dict) else {})))
            return
        # Any other event of a call we have no row for (its call.started was dropped, or the call
        # never had a session): make one, so nothing that did get through is lost.
        c.execute("INSERT OR IGNORE INTO calls (call_id, state, direction, profile, called, started_at, metadata) "
                  "VALUES (?, 'connecting', ?, ?, ?, ?, ?)",
                  (cid, _str(d.get("direction")), profile, _str(d.get("called") or d.get("destination")), item.ts,
                   meta_json))
        if item.type == "call.answered":
            c.execute("UPDATE calls SET state = CASE WHEN state IN ('dialing', 'connecting') THEN 'active' "
                      "ELSE state END, answered_at = COALESCE(answered_at, ?), profile = COALESCE(?, profile) "
                      "WHERE call_id = ?", (item.ts, profile, cid))
        elif item.type == "transcript":
            c.execute("INSERT INTO transcripts (call_id, seq, role, text, t) "
                      "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM transcripts WHERE call_id = ?",
                      (cid, _str(d.get("role")), _str(d.get("text")), _num(d.get("t")), cid))
        elif item.type == "tool.called":
            c.execute(
                "INSERT INTO tool_calls (call_id, tool_call_id, tool, args, origin, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (call_id, tool_call_id) DO UPDATE SET "
                "tool = excluded.tool, args = excluded.args, origin = excluded.origin, "
                "started_at = excluded.started_at",
                (cid, self._tool_call_id(item), _str(d.get("tool")), _json(redact(d.get("args"), self._redact)),
                 _str(d.get("origin")), item.ts))
        elif item.type == "tool.completed":
            result = d.get("result")
            c.execute(
                "INSERT INTO tool_calls (call_id, tool_call_id, tool, outcome, result, duration_ms, origin, "
                "completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (call_id, tool_call_id) DO UPDATE SET "
                "tool = COALESCE(excluded.tool, tool_calls.tool), outcome = excluded.outcome, "
                "result = excluded.result, duration_ms = excluded.duration_ms, "
                "origin = COALESCE(excluded.origin, tool_calls.origin), completed_at = excluded.completed_at",
                (cid, self._tool_call_id(item), _str(d.get("tool")), _str(d.get("outcome")) or "unknown",
                 result if isinstance(result, str) or result is None else _json(result),
                 _num(d.get("duration_ms")), _str(d.get("origin")), item.ts))
        elif item.type == "hook.completed":
            changes = d.get("changes")
            status = d.get("status")
            c.execute("INSERT INTO hooks (call_id, seq, hook, outcome, status, duration_ms, changes, at) "
                      "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ?, ?, ? FROM hooks WHERE call_id = ?",
                      (cid, _str(d.get("hook")), _str(d.get("outcome")),
                       status if isinstance(status, int) and not isinstance(status, bool) else None,
                       _num(d.get("duration_ms")), _json(changes if isinstance(changes, list) else []), item.ts,
                       cid))
        elif item.type == "call.failed":
            # Failed stays failed; call.ended (if the call had a session) adds the final reason.
            c.execute("UPDATE calls SET state = 'failed', end_reason = ?, ended_at = COALESCE(ended_at, ?) "
                      "WHERE call_id = ?", (_str(d.get("reason")) or "failed", item.ts, cid))
        elif item.type == "call.ended":
            c.execute("UPDATE calls SET state = CASE WHEN state = 'failed' THEN 'failed' ELSE 'ended' END, "
                      "ended_at = ?, duration_s = ?, end_reason = COALESCE(?, end_reason), "
                      "profile = COALESCE(?, profile), "
                      # the final metadata: tags added mid-call (the API's tags command) are kept
                      "metadata = CASE WHEN ? = '{}' THEN metadata ELSE ? END WHERE call_id = ?",
                      (item.ts, _num(d.get("duration_s")), _str(d.get("reason")), profile, meta_json, meta_json,
                       cid))
            self._reconcile_transcript(c, cid, d.get("transcript"))

    @staticmethod
    def _tool_call_id(event: Event) -> str:
        tcid = event.data.get("tool_call_id")
        return str(tcid) if tcid is not None else f"event-{event.id}"

    @staticmethod
    def _reconcile_transcript(c: sqlite3.Connection, call_id: str, transcript: Any) -> None:
        """call.ended carries the whole transcript: if transcript events were dropped on the way
        (queue full), it is the authoritative copy."""
        if not isinstance(transcript, list):
            return
        have = c.execute("SELECT COUNT(*) FROM transcripts WHERE call_id = ?", (call_id,)).fetchone()[0]
        if have >= len(transcript):
            return
        c.execute("DELETE FROM transcripts WHERE call_id = ?", (call_id,))
        c.executemany("INSERT INTO transcripts (call_id, seq, role, text, t) VALUES (?, ?, ?, ?, ?)",
                      [(call_id, i, _str(x.get("role")), _str(x.get("text")), _num(x.get("t")))
                       for i, x in enumerate((x for x in transcript if isinstance(x, dict)), 1)])

    @staticmethod
    def _select_calls(c: sqlite3.Connection, where: str, params: tuple[Any, ...], limit: int,
                      offset: int) -> list[dict[str, Any]]:
        rows = c.execute(f"SELECT {_CALL_COLUMNS} FROM calls {where} "
                         "ORDER BY started_at DESC, rowid DESC LIMIT ? OFFSET ?", (*params, limit, offset)).fetchall()
        if not rows:
            return []
        ids = [r[0] for r in rows]
        transcripts: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        tools: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        hooks: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        # Chunked: SQLite caps the number of bound parameters per statement.
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            for cid, role, text, t in c.execute(
                    f"SELECT call_id, role, text, t FROM transcripts WHERE call_id IN ({marks}) "
                    "ORDER BY call_id, seq", chunk):
                transcripts[cid].append({"role": role, "text": text, "t": t})
            for cid, tool, outcome, duration_ms in c.execute(
                    f"SELECT call_id, tool, outcome, duration_ms FROM tool_calls WHERE call_id IN ({marks}) "
                    "ORDER BY rowid", chunk):
                tools[cid].append({"tool": tool, "outcome": outcome, "duration_ms": duration_ms})
            for cid, hook, outcome, status, duration_ms, changes in c.execute(
                    f"SELECT call_id, hook, outcome, status, duration_ms, changes FROM hooks "
                    f"WHERE call_id IN ({marks}) ORDER BY call_id, seq", chunk):
                hooks[cid].append({"hook": hook, "outcome": outcome, "status": status, "duration_ms": duration_ms,
                                   "changes": _loads(changes, [])})
        return [{
            "call_id": r[0], "state": r[1], "direction": r[2], "profile": r[3], "caller": r[4], "called": r[5],
            "channel": r[6], "started_at": r[7], "ended_at": r[8], "duration_s": r[9], "end_reason": r[10],
            "metadata": _loads(r[11], {}), "transcript": transcripts[r[0]], "tools": tools[r[0]],
            "hooks": hooks[r[0]],
        } for r in rows]
