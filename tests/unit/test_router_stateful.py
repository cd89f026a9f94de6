"""The router's exactly-once promise under any interleaving (hypothesis stateful testing).

Hypothesis drives one router through random sequences of tool calls (fast, slow, failing,
refused, duplicated, from the gateway or from DTMF), tool completions, gateway sends that
suspend, resume or raise, the passing of time (tool deadlines, the handoff grace), and
teardown with and without ``answer_pending`` and ``grace``. After every step:

- no tool call id has ever been handed to the gateway twice, and only gateway calls are;
- ``on_completed`` fired at most once per id, and what was sent is what was recorded;
- at most ``max_concurrent`` tools run.

After teardown (started by a rule, or at the end of the example): every id was reported exactly once;
with ``answer_pending`` every gateway call dispatched before teardown finished was sent exactly one
result; no task is left.

asyncio runs deterministically: each example gets its own event loop with a virtual clock
(time moves only when a rule says so), and each rule runs the loop for a bounded number of
iterations with ``run_until_complete``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.fakes import FakeCall
from tools.base import TOOL_CALL_ID, Tool, ToolError, ToolRegistry
from tools.router import ToolOutcome, ToolRouter

MAX_CONCURRENT = 3
DEADLINE = 10.0
GRACE = 2.0
ENDED = "the call has ended"


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it.

    Safe here because every ``run_until_complete`` runs a coroutine that always has work
    ready (``sleep(0)`` steps), so the loop never blocks waiting for a timer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


class Fast(Tool):
    name = "fast"
    description = "answers at once"
    parameters = {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False}

    async def run(self, call, args):
        return {"n": args.get("n", 0)}


class Boom(Tool):
    name = "boom"
    description = "a tool bug"

    async def run(self, call, args):
        raise KeyError("bug")


class Slow(Tool):
    """Waits until the test decides how it ends: a result, a ToolError or a crash."""

    name = "slow"
    description = "waits for the test"

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Future[str]] = {}

    async def run(self, call, args):
        gate = self.gates[TOOL_CALL_ID.get()] = asyncio.get_running_loop().create_future()
        how = await gate
        if how == "error":
            raise ToolError("the order was not found")
        if how == "crash":
            raise RuntimeError("bug")
        return how

    def running(self) -> list[str]:
        return sorted(cid for cid, gate in self.gates.items() if not gate.done())


class Gateway:
    """The gateway's side of ``send_tool_result``: every attempt recorded; each send finishes
    at once, suspends until released, or raises (connection gone, or a bug)."""

    def __init__(self) -> None:
        self.mode = "instant"
        self.attempts: list[tuple[str, str]] = []
        self.suspended: list[asyncio.Future[None]] = []

    async def send(self, call_id: str, text: str) -> None:
        self.attempts.append((call_id, text))
        if self.mode == "suspend":
            fut = asyncio.get_running_loop().create_future()
            self.suspended.append(fut)
            await fut
        elif self.mode == "gone":
            raise ConnectionResetError("gateway gone")
        elif self.mode == "bug":
            raise RuntimeError("send bug")

    def release(self, n: int) -> None:
        for fut in self.suspended[:n]:
            if not fut.done():
                fut.set_result(None)
        self.suspended = self.suspended[n:]


#: Slow tools and suspending sends are where interleavings happen: drawn more often.
KINDS = ["fast", "slow", "slow", "slow", "boom", "unknown", "invalid", "problem"]
SEND_MODES = ["instant", "suspend", "suspend", "suspend", "gone", "bug"]


class RouterMachine(RuleBasedStateMachine):
    """One router, one virtual-time loop, per example; rules are the things that interleave."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualTimeLoop()
        self.gw = Gateway()
        self.slow = Slow()
        registry = ToolRegistry()
        for tool in (Fast(), Boom(), self.slow):
            registry.register(tool)
        self.called: dict[str, ToolOutcome] = {}
        self.completed: Counter[str] = Counter()
        self.router = ToolRouter(registry, FakeCall(), self.gw.send, deadline=DEADLINE,
                                 max_concurrent=MAX_CONCURRENT, drain_timeout=1e6,
                                 on_called=self._on_called, on_completed=self._on_completed)
        self.gateway_ids: list[str] = []
        self.late_ids: list[str] = []
        self.seq = 0
        self.closing: asyncio.Task[None] | None = None
        self.answer_pending = True
        self.closed = False

    # ---------------------------------------------------------------- plumbing

    def _on_called(self, o: ToolOutcome) -> None:
        assert o.call_id not in self.called, f"on_called twice for {o.call_id}"
        self.called[o.call_id] = o

    def _on_completed(self, o: ToolOutcome) -> None:
        assert o.outcome != "pending"
        self.completed[o.call_id] += 1

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` inside the loop (dispatch needs a running loop); the loop also runs one
        more iteration, as it would after a gateway message."""
        async def call() -> Any:
            return fn()
        return self.loop.run_until_complete(call())

    def spin(self, n: int) -> None:
        async def iterations() -> None:
            for _ in range(n):
                await asyncio.sleep(0)
        self.loop.run_until_complete(iterations())

    # ---------------------------------------------------------------- rules

    @initialize(slow=st.integers(min_value=0, max_value=MAX_CONCURRENT), mode=st.sampled_from(SEND_MODES))
    def opening(self, slow: int, mode: str) -> None:
        """Start most examples with tools running and a gateway that may be slow to take results."""
        for _ in range(slow):
            self.dispatch("slow", False)
        self.gw.mode = mode

    @precondition(lambda self: not self.closed)
    @rule(kind=st.sampled_from(KINDS), from_dtmf=st.sampled_from([False, False, False, True]))
    def dispatch(self, kind: str, from_dtmf: bool) -> None:
        name, args, problem = {
            "fast": ("fast", {"n": 1}, None),
            "slow": ("slow", {}, None),
            "boom": ("boom", {}, None),
            "unknown": ("no_such_tool", {}, None),
            "invalid": ("fast", {"n": "one"}, None),
            "problem": ("fast", {}, "arguments are not valid JSON"),
        }[kind]
        if from_dtmf and problem is not None:
            return  # the bridge's own DTMF shortcuts never carry a parse problem

        def go() -> tuple[int, str, str, str]:
            """Dispatch, and read what was decided before the loop runs anything else."""
            running = self.router.pending
            if from_dtmf:
                before = set(self.called)
                self.router.run_local(name, args)
                (cid,) = set(self.called) - before
            else:
                self.seq += 1
                cid = f"c{self.seq}"
                self.router.dispatch(cid, name, args, problem=problem)
                if self.closing is None or not self.closing.done():
                    self.gateway_ids.append(cid)  # the gateway is owed a result
                else:
                    self.late_ids.append(cid)  # after aclose() returned: the session has hung up
            return running, cid, self.called[cid].outcome, self.called[cid].result

        running_before, _cid, decided, text = self.run(go)
        # What the router decided, synchronously, at dispatch:
        if self.closing is not None:
            expected = "cancelled"
        elif kind == "problem" or kind == "invalid":
            expected = "invalid_args"
        elif kind == "unknown":
            expected = "unknown_tool"
        elif running_before >= MAX_CONCURRENT:
            expected = "busy"
        else:
            expected = "pending"  # running
        assert decided == expected, (kind, decided, expected, running_before)
        if expected == "busy":
            assert json.loads(text)["error"].startswith(f"busy: {MAX_CONCURRENT} tool calls are already running")

    @precondition(lambda self: not self.closed and self.gateway_ids)
    @rule(i=st.integers(min_value=0, max_value=1000))
    def duplicate(self, i: int) -> None:
        cid = self.gateway_ids[i % len(self.gateway_ids)]
        called = len(self.called)
        self.run(lambda: self.router.dispatch(cid, "fast", {"n": 2}))
        self.spin(3)
        assert len(self.called) == called  # ignored: nothing new was started

    @precondition(lambda self: bool(self.slow.running()))
    @rule(i=st.integers(min_value=0, max_value=1000), how=st.sampled_from(["done", "error", "crash"]))
    def finish_slow_tool(self, i: int, how: str) -> None:
        running = self.slow.running()
        self.slow.gates[running[i % len(running)]].set_result(how)

    @rule(mode=st.sampled_from(SEND_MODES))
    def gateway_send_mode(self, mode: str) -> None:
        self.gw.mode = mode

    @precondition(lambda self: bool(self.gw.suspended))
    @rule(n=st.integers(min_value=1, max_value=5))
    def release_sends(self, n: int) -> None:
        self.gw.release(n)

    @rule(n=st.integers(min_value=1, max_value=6))
    def step(self, n: int) -> None:
        self.spin(n)

    @rule(dt=st.sampled_from([0.5, 1.5, 3.0, 11.0]))
    def time_passes(self, dt: float) -> None:
        self.loop.now += dt
        self.spin(2)

    # Only once there is something to tear down (else most examples would end the call first).
    @precondition(lambda self: self.closing is None and self.slow.running())
    @rule(answer_pending=st.booleans(), grace=st.booleans())
    def start_teardown(self, answer_pending: bool, grace: bool) -> None:
        self.answer_pending = answer_pending
        event(f"teardown: answer_pending={answer_pending}, grace={grace}, "
              f"sends suspended={bool(self.gw.suspended)}, tools running={len(self.slow.running())}")
        self.closing = self.run(lambda: asyncio.ensure_future(
            self.router.aclose(answer_pending=answer_pending, grace=GRACE if grace else 0.0)))
        self.spin(1)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def no_id_is_answered_twice(self) -> None:
        counts = Counter(cid for cid, _ in self.gw.attempts)
        twice = [cid for cid, n in counts.items() if n > 1]
        assert not twice, f"sent more than one result: {twice} {self.gw.attempts}"
        for cid, text in self.gw.attempts:
            o = self.called[cid]
            assert o.origin == "gateway", f"a {o.origin} call was sent to the gateway"
            assert o.result == text, f"{cid}: recorded {o.outcome} {o.result!r} but sent {text!r}"
            assert cid not in self.late_ids, f"{cid} arrived after aclose() returned, yet was sent"

    @invariant()
    def reported_at_most_once(self) -> None:
        assert all(n == 1 for n in self.completed.values()), self.completed
        for cid, o in self.called.items():
            assert (o.outcome != "pending") == (self.completed[cid] == 1), (cid, o.outcome)

    @invariant()
    def concurrency_is_bounded(self) -> None:
        assert self.router.pending <= MAX_CONCURRENT

    # ---------------------------------------------------------------- the end

    def _finish(self) -> None:
        if self.closing is None:
            self.closing = self.run(lambda: asyncio.ensure_future(self.router.aclose()))
        for _ in range(200):
            if self.closing.done():
                break
            self.gw.mode = "instant"
            self.gw.release(len(self.gw.suspended))
            self.loop.now += 1.0  # lets a grace period run out
            self.spin(3)
        assert self.closing.done(), "aclose() did not finish"
        self.closing.result()
        self.closed = True

        event(f"outcomes seen: {sorted({o.outcome for o in self.called.values()})}")
        for cid in self.called:
            assert self.completed[cid] == 1, f"{cid} reported {self.completed[cid]} times"
        sent = Counter(cid for cid, _ in self.gw.attempts)
        if self.answer_pending:
            missing = [cid for cid in self.gateway_ids if sent[cid] != 1]
            assert not missing, f"gateway calls without exactly one result: {missing}"
        for o in self.called.values():  # (and what was sent is what was recorded: see the invariant)
            if o.outcome == "cancelled":
                assert json.loads(o.result)["error"] == ENDED, o

        async def leftovers() -> set[asyncio.Task[Any]]:
            return asyncio.all_tasks() - {asyncio.current_task()}
        assert self.loop.run_until_complete(leftovers()) == set(), "tasks left running after aclose()"

        # Closed: a late call is reported, but nothing more reaches the gateway.
        attempts = len(self.gw.attempts)
        self.run(lambda: self.router.dispatch("late", "fast", {}))
        self.spin(3)
        assert self.called["late"].outcome == "cancelled" and self.completed["late"] == 1
        assert len(self.gw.attempts) == attempts

    def teardown(self) -> None:
        # Hypothesis calls this in a ``finally``: when a step already failed, only clean up,
        # so the failure reported is that step's (and replays the same way).
        failed = sys.exc_info()[0] is not None
        try:
            if not self.closed and not failed:
                self._finish()
        finally:
            async def cancel_all() -> None:
                # Repeated: a tool cancelled here still answers, which may start a sender.
                for _ in range(10):
                    rest = asyncio.all_tasks() - {asyncio.current_task()}
                    if not rest:
                        return
                    for t in rest:
                        t.cancel()
                    await asyncio.gather(*rest, return_exceptions=True)
            self.loop.run_until_complete(cancel_all())
            self.loop.close()


RouterMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRouterInterleavings = RouterMachine.TestCase
