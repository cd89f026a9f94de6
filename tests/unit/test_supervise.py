"""The supervisor: an unexpected exception restarts a part; one that keeps crashing is fatal."""

import asyncio

from bridge.supervise import Supervisor


async def test_a_crash_is_logged_and_the_part_restarted(caplog):
    runs = 0
    healthy = asyncio.Event()

    async def part():
        nonlocal runs
        runs += 1
        if runs < 3:
            raise KeyError("bug")
        healthy.set()
        await asyncio.Event().wait()

    sup = Supervisor(backoff=0.01)
    sup.start("ami", part)
    await asyncio.wait_for(healthy.wait(), 5)
    assert runs == 3 and sup.restarts["ami"] == 2 and sup.fatal is None
    assert any("ami crashed" in r.getMessage() and r.exc_info for r in caplog.records)
    await sup.stop()


async def test_a_part_that_keeps_crashing_is_fatal_once():
    fatal: list[tuple[str, BaseException]] = []

    async def part():
        raise RuntimeError("always")

    sup = Supervisor(lambda n, e: fatal.append((n, e)), max_restarts=3, backoff=0.001)
    task = sup.start("store-writer", part)
    await asyncio.wait_for(task, 5)
    assert [n for n, _ in fatal] == ["store-writer"]
    assert isinstance(fatal[0][1], RuntimeError)
    assert sup.restarts["store-writer"] == 3


async def test_no_restart_means_the_first_crash_is_fatal():
    fatal = []

    async def part():
        raise ValueError("x")

    sup = Supervisor(lambda n, e: fatal.append(n))
    await asyncio.wait_for(sup.start("clock", part, restart=False), 5)
    assert fatal == ["clock"] and sup.restarts["clock"] == 0


async def test_cancellation_and_normal_return_are_not_crashes():
    fatal = []
    sup = Supervisor(lambda n, e: fatal.append(n))

    async def short():
        return 42

    await sup.start("short", short)
    long = sup.start("long", lambda: asyncio.Event().wait())
    await asyncio.sleep(0)
    await sup.stop()
    assert long.cancelled() and fatal == [] and not sup.crashes


async def test_watch_reports_a_crashed_on_demand_task_and_calls_recovery(caplog):
    recovered = asyncio.Event()
    sup = Supervisor()

    async def worker():
        raise OSError("disk gone")

    task = asyncio.create_task(worker())
    sup.watch(task, "webhook-worker", lambda exc: recovered.set())
    await asyncio.wait_for(recovered.wait(), 5)
    assert sup.crashes["webhook-worker"] == 1
    assert any("webhook-worker crashed" in r.getMessage() for r in caplog.records)


async def test_watch_ignores_clean_ends():
    sup = Supervisor()
    called = []

    async def ok():
        return None

    t = asyncio.create_task(ok())
    sup.watch(t, "w", called.append)
    await t
    await asyncio.sleep(0)
    assert called == [] and not sup.crashes
