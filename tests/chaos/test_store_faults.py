"""The call history becomes unwritable mid-run: calls go on; the error is logged and counted.

A full disk, a quota, a file size limit: SQLite's writes start failing under a running bridge.
The history is a side effect of calls (bridge/store.py writes from a bounded queue on its own
thread), so calls must not notice: a call placed after the fault is answered, talks, runs a
tool and returns to the dialplan as usual; the failure is logged and counted in ``/metrics``
(``voxbridge_store_errors_total``).

How the fault is made: the tests run as root, which file permissions do not stop, and SQLite
keeps its files open, so renaming or replacing them changes nothing for it. What does stop root
is a resource limit: ``RLIMIT_FSIZE`` 0 makes every write to a regular file fail with EFBIG
(Python ignores the SIGXFSZ that comes with it). A limit is per process, so the bridge runs
here as ``voxbridge serve`` in a child process, and the test lowers the child's limit with
``prlimit`` once the history has been written to at least once.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from bridge.devtools.dial import AudioSocketCaller, tone
from tests.ports import free_port

from .conftest import API_KEY, accepted, assert_paced, metric_total

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]

TOKEN = "chaos-api-token-0123456789"
REPO = Path(__file__).resolve().parents[2]


async def until(predicate, timeout: float, what: str, every: float = 0.1):
    """Poll ``predicate`` (an async callable; nothing in the child process can be awaited from
    here) until it returns a true value; that value. TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(every)


async def place_call(port: int, sim) -> tuple[AudioSocketCaller, object]:
    caller = AudioSocketCaller()
    await caller.connect("127.0.0.1", port)
    return caller, await accepted(sim)


async def test_unwritable_call_history_calls_go_on_and_the_error_is_logged_and_counted(sim, tmp_path):
    port, api_port = free_port(), free_port()
    db = tmp_path / "history" / "calls.db"
    config = tmp_path / "voxbridge.yaml"
    config.write_text(yaml.safe_dump({
        "audiosocket": {"listen": f"127.0.0.1:{port}"},
        "api": {"listen": f"127.0.0.1:{api_port}", "token": TOKEN},
        "gateway": {"url": sim.url, "api_key": API_KEY, "settle_ms": 0},
        "store": {"path": str(db)},
        "profiles": {"default": {"first_message": "Hello from the chaos tier."}},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBRIDGE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--config", str(config), cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stderr: list[str] = []

    async def drain_stderr() -> None:  # a full pipe would block the child's logging
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            stderr.append(line.decode(errors="replace"))

    drain = asyncio.ensure_future(drain_stderr())
    api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=5)
    callers: list[AudioSocketCaller] = []
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"ready: AudioSocket on" in ready, (ready, "".join(stderr))

        async def store_errors() -> float:
            return metric_total((await api.get("/metrics")).text, "voxbridge_store_errors_total")

        # Before the fault: a call is written to the history.
        caller, _session = await place_call(port, sim)
        callers.append(caller)
        assert await caller.wait_audio(320 * 25, timeout=5)
        await caller.aclose()

        async def in_history():
            calls = (await api.get("/v1/calls", params={"state": "ended"})).json()["calls"]
            return any(c["call_id"] == str(caller.uuid) for c in calls)

        await until(in_history, 10, "the first call in the history")
        assert await store_errors() == 0

        # The fault: from now on every write of the bridge process to a regular file fails.
        _soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, hard))

        # A call placed now goes on as if nothing happened: greeting, caller's speech to the AI,
        # a tool call answered, and 0x00 back to the dialplan.
        caller, session = await place_call(port, sim)
        callers.append(caller)
        assert await caller.wait_audio(320 * 50, timeout=5)
        heard = np.frombuffer(bytes(caller.received_audio), "<i2")
        assert np.abs(heard).max() > 1000, "the greeting was not heard"
        caller.say(tone(700, 600, 8000))
        await session.wait_event("speech_start", timeout=5)  # the AI heard the caller
        result = await session.call_tool("end_call", {"reason": "done"}, timeout=10)
        assert result.startswith("ok"), result
        assert await caller.wait_ended(10) == "hangup-frame"
        assert_paced(caller, caller.connected_at, caller.ended_at - 0.05, what="the call placed after the fault")

        # The failure is counted where an operator looks, and logged.
        errors = await until(store_errors, 10, "voxbridge_store_errors_total > 0")
        assert errors > 0
        async def logged() -> bool:
            return any("call history" in line for line in stderr)

        await until(logged, 5, "a log line about the call history")
        log = "".join(stderr)
        assert "disk I/O error" in log or "database or disk is full" in log, log[-3000:]

        # And the bridge still takes calls.
        caller, _session = await place_call(port, sim)
        callers.append(caller)
        assert await caller.wait_audio(320 * 25, timeout=5)
        assert not caller.ended.is_set()
    finally:
        for c in callers:
            await c.aclose()
        await api.aclose()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await drain
    assert proc.returncode == 0, "".join(stderr)[-3000:]
