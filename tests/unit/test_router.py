"""The tool router: exactly one result per tool call, within the deadline, whatever happens."""

from __future__ import annotations

import asyncio
import json

import pytest

from tools.base import Tool, ToolError, ToolRegistry
from tools.router import ToolRouter
from tests.fakes import FakeCall


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
