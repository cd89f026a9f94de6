"""The tool router: exactly one result per tool call, within the deadline, whatever happens."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.fakes import FakeCall
from tools.base import Tool, ToolError, ToolRegistry
from tools.router import AnswerState, ToolRouter


class Echo(Tool):
    name = "echo"
    description = "echo"
    parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
                  "additionalProperties": False}

    async def run(self, call, args):
        return {"echo": args["text"]}


class Slow(Tool):
    name = "slow"
    description = "never answers"
    started = None
    cancelled = False

    async def run(self, call, args):
        Slow.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            Slow.cancelled = True
            raise


class Boom(Tool):
    name = "boom"
    description = "raises"

    async def run(self, call, args):
        raise KeyError("secret detail")


class Refuses(Tool):
    name = "refuses"
    description = "refuses politely"

    async def run(self, call, args):
        raise ToolError("the order number was not found")


class Gated(Tool):
    name = "gated"
    description = "waits for a gate"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def run(self, call, args):
        await self.gate.wait()
        return args.get("n")


class Results:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    async def send(self, call_id: str, result: str) -> None:
        self.items.append((call_id, result))
        self.changed.set()

    async def wait_count(self, n: int, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while len(self.items) < n:
                self.changed.clear()
                await self.changed.wait()

    def by_id(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for cid, r in self.items:
            out.setdefault(cid, []).append(r)
        return out


@pytest.fixture
def registry():
    Slow.started = asyncio.Event()
    Slow.cancelled = False
    r = ToolRegistry()
    for t in (Echo(), Slow(), Boom(), Refuses()):
        r.register(t)
    return r


def make_router(registry, results, **kw):
    return ToolRouter(registry, FakeCall(), results.send, **kw)


async def test_success_result_is_json_encoded(registry):
    res = Results()
    router = make_router(registry, res)
    router.dispatch("a", "echo", {"text": "hi"})
    await res.wait_count(1)
    assert res.items == [("a", json.dumps({"echo": "hi"}))]


async def test_unknown_tool_is_answered_at_once_naming_what_exists(registry):
    res = Results()
    router = make_router(registry, res, allowed=["echo"])
    router.dispatch("u1", "transfer_to_mars", {})
    router.dispatch("u2", "slow", {})  # registered but not allowed for this profile
    await res.wait_count(2, timeout=1)
    for _cid, text in res.items:
        body = json.loads(text)
        assert "unknown tool" in body["error"] and "echo" in body["error"]
    assert "slow" not in json.loads(res.items[1][1])["error"].split("available:")[1]


async def test_the_ai_and_dtmf_shortcuts_have_separate_allowances(registry):
    """``set_allowed`` narrows what the AI may call; the bridge's own (DTMF) calls keep theirs, and
    the AI's unknown-tool error names only what the AI may call."""
    res = Results()
    done: list[tuple[str, str, str | None]] = []
    router = make_router(registry, res, allowed=["echo"], local_allowed=["refuses"],
                         on_completed=lambda o: done.append((o.origin, o.name, o.outcome)))
    router.dispatch("g1", "refuses", {})  # a DTMF shortcut's tool: not the AI's to call
    router.set_allowed([])
    router.dispatch("g2", "echo", {"text": "hi"})
    router.run_local("refuses", {})
    router.run_local("echo", {"text": "hi"})  # the AI's tool is not a DTMF shortcut's
    await res.wait_count(2, timeout=1)
    assert json.loads(res.items[0][1])["error"] == "unknown tool 'refuses'; available: echo"
    assert json.loads(res.items[1][1])["error"] == "unknown tool 'echo'; available: none"
    await router.aclose()
    assert ("dtmf", "refuses", "error") in done and ("dtmf", "echo", "unknown_tool") in done
    assert [d for d in done if d[0] == "gateway"] == [("gateway", "refuses", "unknown_tool"),
                                                      ("gateway", "echo", "unknown_tool")]


async def test_invalid_arguments_are_answered_with_the_problem(registry):
    res = Results()
    router = make_router(registry, res)
    router.dispatch("v1", "echo", {"txt": "typo"})
    router.dispatch("v2", "echo", {"text": 5})
    await res.wait_count(2, timeout=1)
    errors = {cid: json.loads(t)["error"] for cid, t in res.items}
    assert "'text' is a required property" in errors["v1"]
    assert "text: 5 is not of type 'string'" in errors["v2"]


async def test_parse_problems_from_the_adapter_are_answered(registry):
    res = Results()
    make_router(registry, res).dispatch("p", "echo", {}, problem="arguments are not valid JSON")
    await res.wait_count(1, timeout=1)
    assert json.loads(res.items[0][1])["error"] == "arguments are not valid JSON"


async def test_exceptions_become_an_error_result_without_internal_details(registry):
    res = Results()
    router = make_router(registry, res)
    router.dispatch("e1", "boom", {})
    router.dispatch("e2", "refuses", {})
    await res.wait_count(2)
    got = {cid: json.loads(t)["error"] for cid, t in res.items}
    assert got["e1"] == "internal error: KeyError" and "secret" not in got["e1"]
    assert got["e2"] == "the order number was not found"


async def test_a_hanging_tool_times_out_with_exactly_one_result(registry):
    res = Results()
    router = make_router(registry, res, deadline=0.3)
    router.dispatch("s", "slow", {})
    await res.wait_count(1, timeout=3)
    assert "did not answer within 0.3 s" in json.loads(res.items[0][1])["error"]
    assert Slow.cancelled
    assert router.outcomes[0].outcome == "timeout"
    await router.aclose()
    assert len(res.items) == 1


async def test_tools_run_concurrently(registry):
    res = Results()
    gated = Gated()
    registry.register(gated)
    router = make_router(registry, res)
    router.dispatch("g1", "gated", {"n": 1})
    router.dispatch("g2", "gated", {"n": 2})
    router.dispatch("e", "echo", {"text": "fast"})
    await res.wait_count(1)
    assert res.items[0][0] == "e"  # not stuck behind the gated ones
    gated.gate.set()
    await res.wait_count(3)
    assert {cid for cid, _ in res.items} == {"g1", "g2", "e"}


async def test_duplicate_call_ids_get_one_answer(registry):
    res = Results()
    router = make_router(registry, res)
    router.dispatch("d", "echo", {"text": "1"})
    router.dispatch("d", "echo", {"text": "2"})
    await res.wait_count(1)
    router.dispatch("d", "echo", {"text": "3"})
    await router.aclose()
    assert res.by_id() == {"d": [json.dumps({"echo": "1"})]}


async def test_closing_cancels_running_tools_and_answers_them_once(registry):
    res = Results()
    router = make_router(registry, res)
    router.dispatch("s", "slow", {})
    await asyncio.wait_for(Slow.started.wait(), 1)
    await router.aclose()
    assert Slow.cancelled
    assert res.by_id() == {"s": [json.dumps({"error": "the call has ended", "tool": "slow"})]}
    assert router.pending == 0
    router.dispatch("late", "echo", {"text": "x"})  # after close: no result is sent to a dead gateway
    await asyncio.sleep(0)
    assert "late" not in res.by_id()


async def test_local_runs_send_nothing_to_the_gateway(registry):
    res = Results()
    completed = []
    router = ToolRouter(registry, FakeCall(), res.send, on_completed=completed.append)
    router.run_local("echo", {"text": "dtmf"})
    async with asyncio.timeout(1):
        while not completed:
            await asyncio.sleep(0)
    assert completed[0].outcome == "ok" and completed[0].origin == "dtmf"
    assert res.items == []


def test_registry_rejects_bad_schemas_and_names():
    r = ToolRegistry()

    class BadSchema(Tool):
        name = "bad"
        description = ""
        parameters = {"type": "objekt"}

        async def run(self, call, args):
            return None

    with pytest.raises(ValueError, match="invalid parameters schema"):
        r.register(BadSchema())

    class BadName(Echo):
        name = "has space"

    with pytest.raises(ValueError, match="must be letters"):
        r.register(BadName())


async def test_end_call_ends_after_speech():
    from tools.builtin import EndCall

    call = FakeCall()
    result = await EndCall().run(call, {"reason": "caller said bye"})
    assert call.ended == [("ai:caller said bye", True)]
    assert "ends after" in result


async def test_close_with_grace_lets_a_finishing_tool_give_its_real_result(registry):
    """A transfer's Redirect ends the call before AMI's Response reaches the tool: the tool's
    own answer must win over 'the call has ended'."""
    res = Results()
    gated = Gated()
    registry.register(gated)
    router = make_router(registry, res)
    router.dispatch("t1", "gated", {"n": "transferred"})
    await asyncio.sleep(0)  # the tool is now waiting for Asterisk
    closing = asyncio.create_task(router.aclose(grace=2.0))
    await asyncio.sleep(0)
    gated.gate.set()  # the Response arrives while the call is being torn down
    await closing
    assert res.by_id() == {"t1": ["transferred"]}


async def test_close_without_grace_answers_at_once(registry):
    res = Results()
    gated = Gated()
    registry.register(gated)
    router = make_router(registry, res)
    router.dispatch("t1", "gated", {"n": "late"})
    await asyncio.sleep(0)
    await asyncio.wait_for(router.aclose(), 0.5)  # a caller hangup must not wait for tools
    assert res.by_id() == {"t1": [json.dumps({"error": "the call has ended", "tool": "gated"})]}


# ---------------------------------------------------------------- exactly once, whatever interleaves


class SuspendingSend:
    """A gateway ``send`` whose first ``suspend`` calls block until the test lets them go, the
    way a WebSocket send blocks while its write buffer is full. Every attempt is recorded."""

    def __init__(self, suspend: int = 1) -> None:
        self.attempts: list[tuple[str, str]] = []
        self.suspend = suspend
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, call_id: str, result: str) -> None:
        self.attempts.append((call_id, result))
        if self.suspend > 0:
            self.suspend -= 1
            self.entered.set()
            await self.release.wait()

    def by_id(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for cid, r in self.attempts:
            out.setdefault(cid, []).append(r)
        return out


async def test_a_tool_finishing_while_teardown_is_stuck_in_a_send_is_answered_once():
    """The teardown bug: aclose() listed the open calls once, then sent 'the call has ended' to
    each; while the first send was stuck, another tool finished and sent its real result, and
    teardown then sent 'the call has ended' to it as well (and reported it twice)."""
    registry = ToolRegistry()
    first, second = Gated(), Gated()
    first.name, second.name = "first", "second"
    registry.register(first)
    registry.register(second)
    gw = SuspendingSend(suspend=1)
    completed: list[tuple[str, str]] = []
    router = ToolRouter(registry, FakeCall(), gw.send,
                        on_completed=lambda o: completed.append((o.call_id, o.outcome)))
    router.dispatch("t1", "first", {"n": "one"})
    router.dispatch("t2", "second", {"n": "two"})
    await asyncio.sleep(0)  # both tools are running, waiting for their gates
    closing = asyncio.create_task(router.aclose())
    await asyncio.wait_for(gw.entered.wait(), 1)  # teardown is stuck in its first send
    second.gate.set()  # ... and a tool finishes meanwhile
    for _ in range(5):
        await asyncio.sleep(0)
    gw.release.set()
    await asyncio.wait_for(closing, 2)

    sent = gw.by_id()
    assert sorted(sent) == ["t1", "t2"]
    assert all(len(texts) == 1 for texts in sent.values()), sent
    assert sorted(completed) == sorted((o.call_id, o.outcome) for o in router.outcomes)
    assert len(completed) == 2, completed  # on_completed exactly once per call
    for o in router.outcomes:  # what is recorded is what was sent
        assert sent[o.call_id] == [o.result]
        assert (o.outcome == "cancelled") == (o.result == json.dumps({"error": "the call has ended", "tool": o.name}))
    assert router.pending == 0


async def test_a_result_stuck_in_its_send_at_teardown_is_still_delivered_once():
    """A real result whose send is suspended when the call ends is neither cancelled mid-send
    nor followed by 'the call has ended'."""
    registry = ToolRegistry()
    gated = Gated()
    registry.register(gated)
    gw = SuspendingSend(suspend=1)
    router = ToolRouter(registry, FakeCall(), gw.send)
    router.dispatch("t1", "gated", {"n": "done"})
    router.dispatch("t2", "gated", {"n": "also"})
    gated.gate.set()
    await asyncio.wait_for(gw.entered.wait(), 1)  # t1's result is stuck in the send
    closing = asyncio.create_task(router.aclose())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done()  # teardown waits for the gateway to take the queued results
    gw.release.set()
    await asyncio.wait_for(closing, 2)
    assert gw.by_id() == {"t1": ["done"], "t2": ["also"]}
    assert [o.outcome for o in router.outcomes] == ["ok", "ok"]


async def test_a_send_that_raises_is_logged_and_never_retried(registry, caplog):
    calls: list[str] = []

    async def send(call_id: str, result: str) -> None:
        calls.append(call_id)
        if call_id == "bad":
            raise RuntimeError("encoder bug")
        if call_id == "gone":
            raise ConnectionResetError("peer went away")

    completed: list[str] = []
    router = ToolRouter(registry, FakeCall(), send, on_completed=lambda o: completed.append(o.call_id))
    with caplog.at_level("INFO", logger="voxbridge.tools"):
        router.dispatch("bad", "echo", {"text": "a"})
        router.dispatch("gone", "echo", {"text": "b"})
        router.dispatch("fine", "echo", {"text": "c"})
        await router.aclose()
        router.dispatch("bad", "echo", {"text": "again"})  # the id stays answered
    assert calls == ["bad", "gone", "fine"]
    assert completed == ["bad", "gone", "fine"]
    assert router.state("bad") is AnswerState.ANSWERED
    assert router.send_failures == 2
    bug = [r for r in caplog.records if "sending the tool result for bad" in r.getMessage()]
    assert bug and bug[0].levelname == "ERROR" and bug[0].exc_info is not None
    gone = [r for r in caplog.records if "gone (peer went away)" in r.getMessage()]
    assert gone and gone[0].levelname == "INFO"


async def test_teardown_gives_up_on_a_gateway_that_never_takes_the_results(registry, caplog):
    gw = SuspendingSend(suspend=10)  # never released
    router = ToolRouter(registry, FakeCall(), gw.send, drain_timeout=0.2)
    router.dispatch("a", "echo", {"text": "1"})
    router.dispatch("b", "echo", {"text": "2"})
    await asyncio.wait_for(gw.entered.wait(), 1)
    with caplog.at_level("WARNING", logger="voxbridge.tools"):
        await asyncio.wait_for(router.aclose(), 2)
    assert gw.attempts == [("a", json.dumps({"echo": "1"}))]
    assert "took more than 0.2 s to accept 2 tool result(s)" in caplog.text
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert [o.outcome for o in router.outcomes] == ["ok", "ok"]


async def test_a_call_arriving_during_the_handoff_grace_is_told_the_call_has_ended(registry):
    res = Results()
    gated = Gated()
    registry.register(gated)
    router = make_router(registry, res)
    router.dispatch("t1", "gated", {"n": "transferred"})
    await asyncio.sleep(0)
    closing = asyncio.create_task(router.aclose(grace=2.0))
    await asyncio.sleep(0)
    router.dispatch("t2", "echo", {"text": "too late"})
    await res.wait_count(1)
    gated.gate.set()
    await closing
    assert res.by_id() == {"t2": [json.dumps({"error": "the call has ended", "tool": "echo"})],
                           "t1": ["transferred"]}


async def test_without_answer_pending_nothing_is_sent_but_everything_is_reported(registry):
    res = Results()
    completed: list[tuple[str, str]] = []
    router = ToolRouter(registry, FakeCall(), res.send,
                        on_completed=lambda o: completed.append((o.call_id, o.outcome)))
    router.dispatch("s", "slow", {})
    await asyncio.wait_for(Slow.started.wait(), 1)
    await router.aclose(answer_pending=False)
    assert res.items == []
    assert completed == [("s", "cancelled")]
    assert Slow.cancelled


async def test_a_hook_that_raises_does_not_cost_the_call_its_answer(registry, caplog):
    res = Results()

    def broken(_o):
        raise ValueError("metrics bug")

    router = ToolRouter(registry, FakeCall(), res.send, on_called=broken, on_completed=broken)
    router.dispatch("a", "echo", {"text": "x"})
    await res.wait_count(1)
    assert res.items == [("a", json.dumps({"echo": "x"}))]
    assert "on_completed hook failed for tool echo (a)" in caplog.text


def test_bad_limits_are_refused_naming_the_problem(registry):
    async def send(_cid, _text):
        return None

    with pytest.raises(ValueError, match="max_concurrent must be an integer >= 1, got 0"):
        ToolRouter(registry, FakeCall(), send, max_concurrent=0)
    with pytest.raises(ValueError, match="max_outcomes must be an integer >= 1, got -1"):
        ToolRouter(registry, FakeCall(), send, max_outcomes=-1)


# ---------------------------------------------------------------- bounded concurrency


async def test_calls_beyond_the_limit_are_answered_busy_at_once(registry):
    res = Results()
    gated = Gated()
    registry.register(gated)
    router = make_router(registry, res, max_concurrent=2)
    router.dispatch("g1", "gated", {"n": 1})
    router.dispatch("g2", "gated", {"n": 2})
    router.dispatch("g3", "gated", {"n": 3})
    await res.wait_count(1)
    assert res.items == [("g3", json.dumps({
        "error": "busy: 2 tool calls are already running on this call; try again when one finishes",
        "tool": "gated"}))]
    assert router.pending == 2
    gated.gate.set()
    await res.wait_count(3)
    router.dispatch("g4", "echo", {"text": "room again"})  # a slot is free: it runs
    await res.wait_count(4)
    assert res.by_id()["g4"] == [json.dumps({"echo": "room again"})]
    assert [o.outcome for o in router.outcomes] == ["ok", "ok", "busy", "ok"]


async def test_refusals_do_not_take_a_slot(registry):
    res = Results()
    router = make_router(registry, res, max_concurrent=1)
    router.dispatch("s", "slow", {})
    router.dispatch("u", "nope", {})
    router.dispatch("v", "echo", {"txt": 1})
    await res.wait_count(2)
    assert {o.call_id: o.outcome for o in router.outcomes} == {"s": "pending", "u": "unknown_tool",
                                                             "v": "invalid_args"}
    await router.aclose()


async def test_a_burst_of_1500_tool_calls_is_answered_exactly_once_each_with_bounded_tasks(registry):
    """A gateway that floods: exactly max_concurrent tools run, the rest are answered 'busy' at
    once, and the burst costs no task per call (one sender drains the answers)."""
    started: list[str] = []

    class Held(Tool):
        name = "held"
        description = "waits for the test"
        gate = asyncio.Event()

        async def run(self, call, args):
            started.append(args["i"])
            await Held.gate.wait()
            return "done"

    registry.register(Held())
    res = Results()
    router = make_router(registry, res, max_concurrent=8)
    baseline = len(asyncio.all_tasks())
    most_tasks = 0
    for i in range(1500):
        router.dispatch(f"c{i}", "held", {"i": str(i)})
        most_tasks = max(most_tasks, len(asyncio.all_tasks()))
    while len(res.items) < 1492:
        await asyncio.sleep(0)
        most_tasks = max(most_tasks, len(asyncio.all_tasks()))
    assert most_tasks - baseline <= 8 + 1  # the 8 tools and the sender
    assert len(started) == 8 and router.pending == 8
    Held.gate.set()
    await res.wait_count(1500)
    assert router.pending == 0 and router.queued == 0
    await router.aclose()
    sent = res.by_id()
    assert len(sent) == 1500 and all(len(v) == 1 for v in sent.values())
    busy = [cid for cid, (text,) in sent.items() if text.startswith('{"error": "busy: 8 tool calls')]
    assert len(busy) == 1492
    assert sorted(cid for cid, (text,) in sent.items() if text == "done") == sorted(f"c{i}" for i in range(8))
    assert router.outcomes_total == 1500
    assert len(router.outcomes) == 1000  # the newest ones are kept
    assert router.outcomes[-1].call_id == "c1499"


async def test_duplicates_of_forgotten_outcomes_are_still_ignored(registry):
    res = Results()
    router = make_router(registry, res, max_outcomes=3)
    for i in range(10):
        router.dispatch(f"n{i}", "nope", {})
    await res.wait_count(10)
    assert [o.call_id for o in router.outcomes] == ["n7", "n8", "n9"]
    router.dispatch("n0", "echo", {"text": "again"})
    await router.aclose()
    assert len(res.items) == 10 and len(res.by_id()["n0"]) == 1
