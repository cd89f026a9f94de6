"""Unit tests for bridge.store: event sequences → call rows, redaction, persistence, shapes, back-pressure."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
from typing import Any

import pytest

from bridge.events import Event, EventBus
from bridge.store import BATCH_MAX, QUEUE_MAX, CallStore
from bridge.supervise import Supervisor

CALL_KEYS = {"call_id", "state", "direction", "profile", "caller", "called", "channel", "started_at", "ended_at",
             "duration_s", "end_reason", "metadata", "transcript", "tools", "hooks"}


@pytest.fixture
async def store():
    s = CallStore(None, ["password", "card"])
    await s.start()
    yield s
    await s.close()


def publish_call(bus: EventBus, call_id: str, *, metadata: dict[str, Any] | None = None, fail: str | None = None,
                 answered: bool = True) -> None:
    """The events a real CallSession publishes for one call, with the same data keys."""
    meta = dict(metadata or {})
    bus.publish("call.started", call_id, profile="sales", direction="inbound", caller="+4930123",
                caller_name="Ada", called="200", channel="PJSIP/ada-00000001", variables={"lang": "de"},
                metadata=meta)
    if answered:
        bus.publish("call.answered", call_id, profile="sales", metadata=meta)
    transcript = [{"role": "assistant", "text": "Hello, how can I help?", "t": 0.8},
                  {"role": "user", "text": "My card number is 4111", "t": 3.2}]
    for item in transcript:
        bus.publish("transcript", call_id, **item, metadata=meta)
    bus.publish("tool.called", call_id, tool="lookup", tool_call_id="tc-1",
                args={"customer": "42", "password": "hunter2", "nested": [{"card": "4111"}, {"x": 1}]},
                origin="gateway", metadata=meta)
    bus.publish("dtmf", call_id, digit="5", metadata=meta)
    bus.publish("tool.completed", call_id, tool="lookup", tool_call_id="tc-1", outcome="ok",
                result='{"name": "Ada"}', duration_ms=12.5, origin="gateway", metadata=meta)
    if fail:
        bus.publish("call.failed", call_id, reason="gateway-error", message=fail, metadata=meta)
    bus.publish("call.ended", call_id, reason="fallback:gateway error" if fail else "caller-hangup",
                duration_s=7.25, transcript=transcript,
                tools=[{"tool": "lookup", "outcome": "ok", "duration_ms": 12.5}], metadata=meta,
                profile="sales", stats={"frames_in": 350})


def bus_for(store: CallStore) -> EventBus:
    bus = EventBus()
    bus.add_sink(store.record)
    return bus


# ------------------------------------------------------------------ event sequences → rows


async def test_a_complete_call_becomes_one_row_in_the_call_shape(store):
    bus = bus_for(store)
    publish_call(bus, "c1", metadata={"crm_id": "abc"})
    call = await store.get_call("c1")
    assert set(call) == CALL_KEYS
    assert call["call_id"] == "c1"
    assert call["state"] == "ended"
    assert call["direction"] == "inbound"
    assert call["profile"] == "sales"
    assert (call["caller"], call["called"], call["channel"]) == ("+4930123", "200", "PJSIP/ada-00000001")
    assert call["end_reason"] == "caller-hangup"
    assert call["duration_s"] == 7.25
    assert call["metadata"] == {"crm_id": "abc"}
    assert call["started_at"] <= call["ended_at"]
    assert call["transcript"] == [{"role": "assistant", "text": "Hello, how can I help?", "t": 0.8},
                                  {"role": "user", "text": "My card number is 4111", "t": 3.2}]
    assert call["tools"] == [{"tool": "lookup", "outcome": "ok", "duration_ms": 12.5}]
    assert await store.get_call("nope") is None


async def test_states_follow_the_call(store):
    bus = bus_for(store)
    bus.publish("call.started", "c2", profile="p", direction="inbound", caller="1", caller_name="",
                called="2", channel=None, variables={}, metadata={})
    assert (await store.get_call("c2"))["state"] == "connecting"
    bus.publish("call.answered", "c2", profile="p", metadata={})
    assert (await store.get_call("c2"))["state"] == "active"
    bus.publish("call.ended", "c2", reason="gateway-hangup", duration_s=1.0, transcript=[], tools=[],
                metadata={}, profile="p", stats={})
    call = await store.get_call("c2")
    assert call["state"] == "ended" and call["end_reason"] == "gateway-hangup"


async def test_failed_stays_failed_after_ended(store):
    publish_call(bus_for(store), "c3", fail="quota exceeded")
    call = await store.get_call("c3")
    assert call["state"] == "failed"
    # call.ended carries how the call was finally torn down: the more informative reason.
    assert call["end_reason"] == "fallback:gateway error"
    assert call["duration_s"] == 7.25


async def test_dialing_then_unanswered(store):
    store.record_dialing("c4", "outbound", "sales", "+4917000", {"campaign": 7})
    call = await store.get_call("c4")  # read-your-writes: queued before the read
    assert call["state"] == "dialing"
    assert (call["direction"], call["profile"], call["called"]) == ("outbound", "sales", "+4917000")
    assert call["metadata"] == {"campaign": 7}
    # What bridge.app publishes when the callee does not answer (no session, no call.ended).
    bus_for(store).publish("call.failed", "c4", reason="no-answer", message="no answer", destination="+4917000",
                           metadata={"campaign": 7}, direction="outbound")
    call = await store.get_call("c4")
    assert call["state"] == "failed" and call["end_reason"] == "no-answer"
    assert call["ended_at"] is not None


async def test_dialing_then_answered_keeps_destination_and_start_time(store):
    store.record_dialing("c5", "outbound", "sales", "+4917000", {"campaign": 7})
    dialled = (await store.get_call("c5"))["started_at"]
    bus = bus_for(store)
    bus.publish("call.started", "c5", profile="sales", direction="outbound", caller="", caller_name="",
                called="", channel=None, variables={}, metadata={"campaign": 7})
    call = await store.get_call("c5")
    assert call["state"] == "connecting"
    assert call["called"] == "+4917000"
    assert call["started_at"] == dialled
    bus.publish("call.answered", "c5", profile="sales", metadata={"campaign": 7})
    assert (await store.get_call("c5"))["state"] == "active"


async def test_events_of_a_call_without_call_started_still_make_a_row(store):
    bus = bus_for(store)
    bus.publish("transcript", "c6", role="user", text="hi", t=0.5, metadata={"m": 1})
    call = await store.get_call("c6")
    assert call["state"] == "connecting"
    assert call["transcript"] == [{"role": "user", "text": "hi", "t": 0.5}]
    assert call["metadata"] == {"m": 1}


async def test_call_ended_restores_transcript_events_that_were_lost(store):
    bus = bus_for(store)
    transcript = [{"role": "user", "text": f"line {i}", "t": float(i)} for i in range(3)]
    bus.publish("call.started", "c7", profile="p", direction="inbound", caller="1", caller_name="", called="2",
                channel=None, variables={}, metadata={})
    bus.publish("transcript", "c7", **transcript[0], metadata={})  # lines 1 and 2 never made it
    bus.publish("call.ended", "c7", reason="caller-hangup", duration_s=3.0, transcript=transcript, tools=[],
                metadata={}, profile="p", stats={})
    assert (await store.get_call("c7"))["transcript"] == transcript


# ------------------------------------------------------------------ redaction


async def test_configured_tool_arguments_are_redacted_at_any_depth(store):
    publish_call(bus_for(store), "r1")
    [tool] = await store.get_tool_calls("r1")
    assert tool["args"] == {"customer": "42", "password": "***", "nested": [{"card": "***"}, {"x": 1}]}
    assert (tool["tool_call_id"], tool["tool"], tool["outcome"], tool["origin"]) == ("tc-1", "lookup", "ok", "gateway")
    assert tool["result"] == '{"name": "Ada"}'
    assert tool["duration_ms"] == 12.5
    assert tool["started_at"] <= tool["completed_at"]


async def test_redaction_ignores_case_and_leaves_others_alone():
    s = CallStore(None, ["API_Key"])
    await s.start()
    try:
        s.record(Event("tool.called", "r2", {"tool": "t", "tool_call_id": "a", "origin": "gateway",
                                             "args": {"api_key": "s3cret", "API_KEY": "s3cret", "q": "api_key"}}))
        [tool] = await s.get_tool_calls("r2")
        assert tool["args"] == {"api_key": "***", "API_KEY": "***", "q": "api_key"}
        assert tool["outcome"] == "pending"  # not completed yet
    finally:
        await s.close()


# ------------------------------------------------------------------ persistence


async def test_survives_a_restart(tmp_path):
    path = tmp_path / "history" / "calls.db"
    s = CallStore(path, ["password"])
    await s.start()
    publish_call(bus_for(s), "p1", metadata={"k": "v"})
    hook = await s.add_webhook("https://example.com/hook", ["call.ended"], "sekret", "n8n")
    await s.close()  # flushes: no read happened before it

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    conn.close()

    s2 = CallStore(path, ["password"])
    await s2.start()
    try:
        call = await s2.get_call("p1")
        assert call["state"] == "ended" and call["metadata"] == {"k": "v"}
        assert [t["text"] for t in call["transcript"]] == ["Hello, how can I help?", "My card number is 4111"]
        assert call["tools"] == [{"tool": "lookup", "outcome": "ok", "duration_ms": 12.5}]
        [tool] = await s2.get_tool_calls("p1")
        assert tool["args"]["password"] == "***"
        assert await s2.list_webhooks() == [hook]
    finally:
        await s2.close()


async def test_calls_in_progress_at_shutdown_are_closed_on_restart(tmp_path):
    path = tmp_path / "calls.db"
    s = CallStore(path)
    await s.start()
    bus = bus_for(s)
    bus.publish("call.started", "live", profile="p", direction="inbound", caller="1", caller_name="", called="2",
                channel=None, variables={}, metadata={})
    bus.publish("call.answered", "live", profile="p", metadata={})
    await s.close()

    s2 = CallStore(path)
    await s2.start()
    try:
        call = await s2.get_call("live")
        assert call["state"] == "ended" and call["end_reason"] == "bridge-restart"
        assert await s2.list_calls("active", 10, 0) == []
    finally:
        await s2.close()


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "calls.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (99)")
    conn.commit()
    conn.close()
    s = CallStore(path)
    with pytest.raises(RuntimeError, match="newer"):
        await s.start()
    await s.close()


# ------------------------------------------------------------------ list / get shapes


async def test_list_is_newest_first_filters_by_state_and_pages(store):
    bus = bus_for(store)
    for i in range(5):
        # Distinct, increasing start times regardless of the clock's resolution.
        store.record(Event("call.started", f"l{i}", {"profile": "p", "direction": "inbound", "caller": str(i),
                                                      "caller_name": "", "called": "2", "channel": None,
                                                      "variables": {}, "metadata": {}}, ts=1000.0 + i))
    for i in (0, 2):
        bus.publish("call.ended", f"l{i}", reason="caller-hangup", duration_s=1.0, transcript=[], tools=[],
                    metadata={}, profile="p", stats={})
    bus.publish("call.failed", "l4", reason="gateway-error", message="x", metadata={})

    calls = await store.list_calls(None, 50, 0)
    assert [c["call_id"] for c in calls] == ["l4", "l3", "l2", "l1", "l0"]
    assert all(set(c) == CALL_KEYS for c in calls)
    assert [c["call_id"] for c in await store.list_calls("active", 50, 0)] == ["l3", "l1"]
    assert [c["call_id"] for c in await store.list_calls("ended", 50, 0)] == ["l4", "l2", "l0"]
    assert [c["call_id"] for c in await store.list_calls(None, 2, 1)] == ["l3", "l2"]
    assert await store.list_calls(None, 2, 10) == []
    assert await store.count_calls() == 5
    assert await store.count_calls("active") == 2
    with pytest.raises(ValueError, match="state"):
        await store.list_calls("ringing", 10, 0)
    with pytest.raises(ValueError):
        await store.list_calls(None, -1, 0)


async def test_list_carries_each_calls_own_transcript_and_tools(store):
    bus = bus_for(store)
    publish_call(bus, "a")
    bus.publish("call.started", "b", profile="p", direction="inbound", caller="1", caller_name="", called="2",
                channel=None, variables={}, metadata={})
    bus.publish("transcript", "b", role="user", text="only b", t=1.0, metadata={})
    by_id = {c["call_id"]: c for c in await store.list_calls(None, 10, 0)}
    assert [t["text"] for t in by_id["b"]["transcript"]] == ["only b"]
    assert by_id["b"]["tools"] == []
    assert len(by_id["a"]["transcript"]) == 2 and len(by_id["a"]["tools"]) == 1


# ------------------------------------------------------------------ webhooks


async def test_webhook_subscriptions_crud(store):
    a = await store.add_webhook("https://a.example/hook", [], "s1", None)
    b = await store.add_webhook("https://b.example/hook", ["transcript", "call.ended"], "s2", "desc")
    assert set(a) == {"id", "url", "events", "description", "created_at", "secret"}
    assert a["id"] != b["id"] and all(c in "0123456789abcdef" for c in a["id"]) and 8 <= len(a["id"]) <= 16
    assert [h["id"] for h in await store.list_webhooks()] == [a["id"], b["id"]]
    assert await store.get_webhook(b["id"]) == b
    assert b["events"] == ["transcript", "call.ended"] and b["secret"] == "s2"
    assert await store.delete_webhook(a["id"]) is True
    assert await store.delete_webhook(a["id"]) is False
    assert await store.get_webhook(a["id"]) is None
    assert await store.list_webhooks() == [b]


# ------------------------------------------------------------------ back-pressure and robustness


async def test_record_never_blocks_and_counts_overflow(store):
    events = [Event("call.started", f"q{i}", {"profile": "p", "direction": "inbound", "caller": "1",
                                               "caller_name": "", "called": "2", "channel": None,
                                               "variables": {}, "metadata": {}}) for i in range(20_000)]
    t0 = time.perf_counter()
    for e in events:
        store.record(e)  # no await in between: the writer cannot run, so the queue must hold or drop
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"record() took {elapsed:.3f} s for 20 000 events"
    assert store.dropped == 20_000 - QUEUE_MAX
    await store.flush()
    assert store.pending == 0
    assert await store.count_calls() == QUEUE_MAX
    # The oldest were kept (the newest dropped): the history stays an in-order prefix.
    assert (await store.get_call("q0")) is not None and (await store.get_call("q19999")) is None


async def test_the_writer_runs_only_while_there_is_work(store):
    def writers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "store-writer" and not t.done()]

    publish_call(bus_for(store), "w1")
    [writer] = writers()  # one writer, however many events
    await asyncio.wait_for(writer, 5)  # it ends by itself once the queue is drained
    assert writers() == [] and store.pending == 0
    publish_call(bus_for(store), "w2")  # and a new one starts with new work
    assert (await store.get_call("w2"))["state"] == "ended"


async def test_writes_happen_off_the_event_loop_thread(store, monkeypatch):
    threads: set[int] = set()
    original = CallStore._apply

    def spy(self, conn, item):
        threads.add(threading.get_ident())
        return original(self, conn, item)

    monkeypatch.setattr(CallStore, "_apply", spy)
    publish_call(bus_for(store), "t1")
    await store.flush()
    assert threads and threading.get_ident() not in threads


async def test_record_never_raises_and_a_bad_event_does_not_stop_the_writer(store):
    store.record(None)  # type: ignore[arg-type]  # not even an Event
    store.record(Event("tool.called", "bad", {"tool": object(), "tool_call_id": "x", "args": {"o": object()},
                                              "origin": "gateway"}))
    store.record(Event("transcript", "bad", {"role": "user", "text": "still here", "t": "not a number"}))
    publish_call(bus_for(store), "good")
    call = await store.get_call("good")
    assert call["state"] == "ended"
    assert (await store.get_call("bad"))["transcript"] == [{"role": "user", "text": "still here", "t": None}]
    assert store.errors == 1  # the None


async def test_close_flushes_and_later_records_are_dropped(tmp_path):
    path = tmp_path / "calls.db"
    s = CallStore(path)
    s.record_dialing("early", "outbound", None, "100", {})  # before start(): queued
    await s.start()
    publish_call(bus_for(s), "x")
    await s.close()
    s.record(Event("call.started", "late", {}))  # after close: dropped, counted, no exception
    assert s.dropped == 1
    with pytest.raises(RuntimeError):
        await s.get_call("x")

    s2 = CallStore(path)
    await s2.start()
    try:
        assert (await s2.get_call("x"))["state"] == "ended"
        assert (await s2.get_call("early"))["state"] == "ended"  # was dialing when the store closed
        assert await s2.get_call("late") is None
    finally:
        await s2.close()


# ------------------------------------------------------------------ retention

DAY = 86400.0
NOW = 1_800_000_000.0  # a fixed "now" for the injected clock


def ended_call(store: CallStore, call_id: str, ended_at: float, *, failed: bool = False) -> None:
    """A call with a transcript line and a tool call, over at ``ended_at`` (event timestamps set)."""
    start = ended_at - 60
    store.record(Event("call.started", call_id, {"profile": "p", "direction": "inbound", "caller": "1",
                                                 "caller_name": "", "called": "2", "channel": None,
                                                 "variables": {}, "metadata": {}}, ts=start))
    store.record(Event("transcript", call_id, {"role": "user", "text": "hello", "t": 1.0}, ts=start + 1))
    store.record(Event("tool.called", call_id, {"tool": "t", "tool_call_id": f"{call_id}-t", "args": {},
                                                "origin": "gateway"}, ts=start + 2))
    store.record(Event("hook.completed", call_id, {"hook": "on_call_start", "outcome": "ok", "status": 200,
                                                   "duration_ms": 12.0, "changes": ["variables"]}, ts=start))
    if failed:
        store.record(Event("call.failed", call_id, {"reason": "gateway-error", "message": "x"}, ts=ended_at))
    else:
        store.record(Event("call.ended", call_id, {"reason": "caller-hangup", "duration_s": 60.0, "transcript": [],
                                                   "tools": []}, ts=ended_at))


def rows(path, call_id: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE call_id = ?", (call_id,)).fetchone()[0]
                for t in ("calls", "transcripts", "tool_calls", "hooks")}
    finally:
        conn.close()


async def writer_idle() -> None:
    """Until no store writer is running (retention runs on the writer, after the writes)."""
    while writers := [t for t in asyncio.all_tasks() if t.get_name() == "store-writer" and not t.done()]:
        await asyncio.wait(writers, timeout=10)


async def history(path, calls: dict[str, tuple[float, bool]]) -> None:
    """Write a history file with ``calls`` (id → (ended_at, failed)), with no retention."""
    s = CallStore(path)
    await s.start()
    for call_id, (ended_at, failed) in calls.items():
        ended_call(s, call_id, ended_at, failed=failed)
    s.record(Event("call.started", "old-live", {"profile": "p"}, ts=NOW - 400 * DAY))  # never ended
    await s.close()


async def test_retention_deletes_old_ended_calls_with_their_rows_when_the_store_starts(tmp_path):
    path = tmp_path / "calls.db"
    await history(path, {"old": (NOW - 40 * DAY, False), "old-failed": (NOW - 31 * DAY, True),
                         "recent": (NOW - 29 * DAY, False)})
    assert rows(path, "old") == {"calls": 1, "transcripts": 1, "tool_calls": 1, "hooks": 1}

    s = CallStore(path, retention_days=30, now=lambda: NOW)
    await s.start()
    try:
        await writer_idle()
        assert rows(path, "old") == rows(path, "old-failed") == {"calls": 0, "transcripts": 0, "tool_calls": 0,
                                                                 "hooks": 0}
        assert rows(path, "recent") == {"calls": 1, "transcripts": 1, "tool_calls": 1, "hooks": 1}
        assert s.pruned == 2
        # A call that never ended is not "older than retention_days", however old it is (a restart
        # closes such calls, with the time of the restart as their end).
        assert await s.get_call("old-live") is not None
        assert [c["call_id"] for c in await s.list_calls(None, 10, 0)] == ["recent", "old-live"]
    finally:
        await s.close()


async def test_no_retention_keeps_every_call(tmp_path):
    path = tmp_path / "calls.db"
    await history(path, {"ancient": (NOW - 4000 * DAY, False)})
    s = CallStore(path, retention_days=None, now=lambda: NOW)
    await s.start()
    try:
        await writer_idle()
        assert await s.get_call("ancient") is not None and s.pruned == 0
    finally:
        await s.close()


async def test_retention_runs_again_when_the_writer_runs_and_an_interval_has_passed():
    clock = [NOW]
    s = CallStore(None, retention_days=30, now=lambda: clock[0], prune_interval=3600)
    await s.start()
    try:
        ended_call(s, "c", NOW - 30 * DAY + 60)  # a minute short of 30 days old
        await writer_idle()
        assert await s.get_call("c") is not None

        clock[0] = NOW + 120  # now older than 30 days, but the last pass was 2 minutes ago
        s.record_dialing("w1", "outbound", None, "100")  # the writer runs…
        await writer_idle()
        assert await s.get_call("c") is not None  # …and does not prune yet

        clock[0] = NOW + 3601  # the hour is up: nothing runs until there is something to write
        await asyncio.sleep(0.05)
        assert await s.get_call("c") is not None and s.pruned == 0
        s.record_dialing("w2", "outbound", None, "100")
        await writer_idle()
        assert await s.get_call("c") is None and s.pruned == 1
        assert await s.get_call("w2") is not None  # the write itself went through
    finally:
        await s.close()


async def test_a_retention_backlog_is_deleted_in_bounded_batches_that_let_writes_through(tmp_path, monkeypatch):
    path = tmp_path / "calls.db"
    await history(path, {f"old{i}": (NOW - (100 + i) * DAY, False) for i in range(35)})
    order: list[tuple[str, int]] = []
    original_prune, original_apply = CallStore._prune_batch_on_thread, CallStore._apply_batch
    loop = asyncio.get_running_loop()
    s = CallStore(path, retention_days=30, now=lambda: NOW, prune_batch=10)

    def prune_spy(self, conn, cutoff, limit):
        deleted = original_prune(self, conn, cutoff, limit)
        order.append(("prune", deleted))
        if len(order) == 1:  # a call's events arrive while the first batch is being deleted
            loop.call_soon_threadsafe(s.record, Event("call.started", "live", {"profile": "p"}))
        return deleted

    def apply_spy(self, conn, batch):
        order.append(("write", len(batch)))
        return original_apply(self, conn, batch)

    monkeypatch.setattr(CallStore, "_prune_batch_on_thread", prune_spy)
    monkeypatch.setattr(CallStore, "_apply_batch", apply_spy)
    await s.start()
    try:
        await writer_idle()
        # The write went in right after the first batch, not after the whole backlog.
        assert order == [("prune", 10), ("write", 1), ("prune", 10), ("prune", 10), ("prune", 5)]
        assert s.pruned == 35 and await s.count_calls() == 2  # "old-live" and "live"
    finally:
        await s.close()


# ------------------------------------------------------------------ writer supervision and failures


async def test_a_crashed_writer_is_logged_counted_and_replaced_while_work_remains(monkeypatch, caplog):
    sup = Supervisor()
    s = CallStore(None, supervisor=sup)
    await s.start()
    original = CallStore._wake_flushers
    crashed = []

    def buggy(self):
        if not crashed:
            crashed.append(1)
            raise KeyError("bug after a batch")
        return original(self)

    monkeypatch.setattr(CallStore, "_wake_flushers", buggy)
    try:
        for i in range(BATCH_MAX + 100):  # two batches; the writer dies after the first
            s.record(Event("call.started", f"k{i}", {"profile": "p"}))
        await asyncio.wait_for(s.flush(), 10)  # waits for the writer that took over, not forever
        assert await s.count_calls() == BATCH_MAX + 100  # nothing lost: the rest was written by the new writer
        assert s.errors == 0 and s.writer_crashes == 1 and sup.crashes["store-writer"] == 1
        assert any("store-writer crashed" in r.getMessage() and r.exc_info for r in caplog.records)
    finally:
        await s.close()


async def test_a_writer_that_keeps_crashing_is_fatal_and_nobody_hangs(monkeypatch):
    fatal: list[str] = []
    sup = Supervisor(lambda name, exc: fatal.append(name), max_restarts=2)
    s = CallStore(None, supervisor=sup)
    await s.start()

    def always(self, conn, batch):
        raise KeyError("bug in every batch")

    monkeypatch.setattr(CallStore, "_apply_batch", always)
    for i in range(5 * BATCH_MAX):
        s.record(Event("call.started", f"x{i}", {"profile": "p"}))
    await asyncio.wait_for(s.flush(), 10)  # released when the supervisor gives up
    assert fatal == ["store-writer"]
    assert s.writer_crashes == 3 and sup.crashes["store-writer"] == 3  # 2 restarts, then no more
    await asyncio.wait_for(s.close(), 10)  # does not raise; what was still queued is counted as lost
    assert s.errors == 5 * BATCH_MAX and s.pending == 0


async def test_history_removed_while_running_calls_go_on_errors_are_logged_and_counted(tmp_path, caplog):
    directory = tmp_path / "history"
    s = CallStore(directory / "calls.db")
    await s.start()
    try:
        bus = bus_for(s)
        publish_call(bus, "before")
        await s.flush()
        assert s.errors == 0
        shutil.rmtree(directory)  # SQLite would go on writing into the removed file, silently
        publish_call(bus, "after")  # never raises
        await s.flush()
        assert s.errors == 7  # every stored event of the call (all but the dtmf), counted
        assert any("call history: cannot write" in r.getMessage() and "is gone" in r.getMessage()
                   for r in caplog.records)
        publish_call(bus, "later")
        await s.flush()
        assert s.errors == 14
        errors_logged = [r for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(errors_logged) == 1  # once, not once per batch
    finally:
        await s.close()


async def test_history_made_read_only_while_running_then_writable_again(tmp_path, caplog):
    path = tmp_path / "calls.db"
    s = CallStore(path)
    await s.start()
    try:
        bus = bus_for(s)
        path.chmod(0o444)  # (root could still write: the store must notice by itself)
        publish_call(bus, "while-read-only")
        await s.flush()
        assert s.errors == 7
        assert any("was made read-only" in r.getMessage() for r in caplog.records)
        path.chmod(0o644)
        publish_call(bus, "after")
        await s.flush()
        assert s.errors == 7
        assert (await s.get_call("after"))["state"] == "ended"
        assert any("writing again" in r.getMessage() for r in caplog.records)
    finally:
        path.chmod(0o644)
        await s.close()


async def test_the_bridge_wires_retention_and_its_supervisor_into_the_store(tmp_path, monkeypatch):
    from bridge.app import Bridge
    from bridge.config import Config

    bridge = Bridge(Config(audiosocket={"listen": "127.0.0.1:0"}, api={"enabled": False},
                           store={"path": str(tmp_path / "history" / "calls.db")}))
    await bridge.start()
    try:
        assert bridge.store.retention_days == 90  # the config default
        original = CallStore._apply_batch
        crashed = []

        def buggy(self, conn, batch):
            if not crashed:
                crashed.append(1)
                raise KeyError("bug")
            return original(self, conn, batch)

        monkeypatch.setattr(CallStore, "_apply_batch", buggy)
        bridge.events.publish("call.started", "b1", profile="default")
        await bridge.store.flush()
        metrics = bridge.metrics_text()
        assert 'voxbridge_part_crashes_total{part="store-writer"} 1' in metrics
        assert "voxbridge_store_errors_total 1" in metrics
        bridge.events.publish("call.started", "b2", profile="default")  # a new writer for new work
        assert await bridge.store.get_call("b2") is not None
        shutil.rmtree(tmp_path / "history")
        bridge.events.publish("call.started", "b3", profile="default")
        await bridge.store.flush()
        assert "voxbridge_store_errors_total 2" in bridge.metrics_text()
    finally:
        await bridge.stop()


async def test_call_hooks_outcomes_are_kept_with_the_call_in_order(store):
    bus = bus_for(store)
    bus.publish("hook.completed", "h1", hook="on_call_start", outcome="timeout", status=None, duration_ms=2001.5,
                profile="sales", changes=[], metadata={})
    publish_call(bus, "h1")
    bus.publish("hook.completed", "h1", hook="on_call_end", outcome="ok", status=204, duration_ms=8.0,
                profile="sales", metadata={})
    call = await store.get_call("h1")
    assert call["hooks"] == [
        {"hook": "on_call_start", "outcome": "timeout", "status": None, "duration_ms": 2001.5, "changes": []},
        {"hook": "on_call_end", "outcome": "ok", "status": 204, "duration_ms": 8.0, "changes": []},
    ]
    assert call["state"] == "ended"  # the first event of the call (a hook) made its row; the rest filled it


async def test_a_history_file_from_before_hooks_gets_the_table_on_start(tmp_path):
    path = tmp_path / "old.db"
    s = CallStore(path)
    await s.start()
    await s.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE hooks")  # as a file written before the table existed
    conn.commit()
    conn.close()
    s = CallStore(path)
    await s.start()
    try:
        s.record(Event("hook.completed", "x", {"hook": "on_call_end", "outcome": "error", "status": 500}))
        await s.flush()
        assert (await s.get_call("x"))["hooks"][0]["status"] == 500
    finally:
        await s.close()
