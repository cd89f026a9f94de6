"""A gateway that floods tool calls: 1500 in one burst, on one call.

The promise (README, "Tool calls") is one ``tool_result`` per ``tool_call``, and the issue adds
a bound: at most ``tool_concurrency`` tools run at once per call, and every call beyond it is
answered at once with an error saying the bridge is busy — never queued where the gateway's
15 s deadline would expire, never run unbounded where one call could take the process down.
Meanwhile the flooded call and its neighbour keep their 20 ms pacing.

What is counted is what crossed the wire: every ``tool_result`` message the gateway received,
per ``call_id`` (the reference gateway also flags duplicates and unknown ids as violations).
The gateway runs in its own process (:mod:`tests.chaos.gateway_process`), so the cost of
sending the flood is not billed to the bridge's pacing.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tools.base import Tool

from .conftest import assert_paced, metric_total

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]

BURST = 1500
LIMIT = 8
DONE = "held, then done"


class HoldTool(Tool):
    """Runs until released; records how many of its runs overlapped."""

    name = "hold"
    description = "waits until the test releases it"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.started = 0
        self.running = 0
        self.max_running = 0
        self.release = asyncio.Event()
        self.over_limit = asyncio.Event()  # set at once if the bound is broken: fail fast, not by timeout

    async def run(self, call, args):
        self.started += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        if self.running > self.limit:
            self.over_limit.set()
        try:
            await self.release.wait()
            return DONE
        finally:
            self.running -= 1


async def test_a_burst_of_1500_tool_calls_is_answered_exactly_once_each_with_bounded_concurrency(
        gateway_process, make_bridge, dial):
    gw = gateway_process
    hold = HoldTool(LIMIT)
    bridge = await make_bridge(tools=[hold], tool_concurrency=LIMIT, gateway={"url": gw.url},
                               profile={"first_message": None, "tools": ["end_call", "hold"]})
    caller = await dial(bridge)
    session = await gw.request("accepted")
    neighbour = await dial(bridge)
    await gw.request("accepted")
    assert await caller.wait_audio(320 * 10, timeout=5) and await neighbour.wait_audio(320 * 10, timeout=5)

    ids = [f"burst-{i}" for i in range(BURST)]
    burst_at = time.monotonic()
    await gw.request("burst", session=session, tool="hold", ids=ids)

    # Every call is now either running or already answered: none waits in a queue.
    busy_answers = asyncio.ensure_future(gw.request("results", session=session, n=BURST - LIMIT, timeout=15))
    over = asyncio.ensure_future(hold.over_limit.wait())
    done, _ = await asyncio.wait([busy_answers, over], timeout=16, return_when=asyncio.FIRST_COMPLETED)
    over.cancel()
    assert hold.max_running <= LIMIT, (
        f"{hold.max_running} tool calls ran at once on one call (tool_concurrency {LIMIT})")
    if busy_answers not in done or busy_answers.exception() is not None:
        busy_answers.cancel()
        pytest.fail(f"{hold.running} tool calls running and the others not answered within 15 s: calls beyond "
                    f"tool_concurrency ({LIMIT}) must be answered at once")
    results = busy_answers.result()
    assert hold.started == LIMIT, f"{hold.started} ran; the first {LIMIT} should have taken every slot"
    assert len(results) == BURST - LIMIT  # answered while the first LIMIT were still running
    for cid, r in results.items():
        assert r is not None and "busy" in json.loads(r)["error"], f"{cid} answered {r!r} instead of a 'busy' error"

    hold.release.set()
    results = await gw.request("results", session=session, n=BURST, timeout=10)
    assert sum(r == DONE for r in results.values()) == LIMIT

    # Exactly one tool_result per call id reached the gateway, and nothing else.
    wire = await gw.request("wire", session=session)
    counts = wire["counts"]
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}, {cid: n for cid, n in counts.items() if n != 1}
    assert wire["violations"] == []

    # The slots are free again: the next call runs.
    assert await gw.request("call_tool", session=session, tool="hold", call_id="after-the-burst") == DONE

    assert metric_total(bridge.metrics_text(), 'voxbridge_tool_calls_total{outcome="busy"}') == BURST - LIMIT

    # Both calls kept their pacing while the bridge took the burst (and half a second after it).
    for c in (caller, neighbour):
        assert await c.wait_audio(c.received_audio_bytes + 320 * 25, timeout=3)
    assert_paced(caller, burst_at, what="the flooded call")
    assert_paced(neighbour, burst_at, what="the neighbouring call")
    assert not caller.ended.is_set() and not neighbour.ended.is_set()
