"""A profile's on_call_start and on_call_end hooks, end to end on loopback: a simulated caller, the
bridge, the reference gateway (what it received is what the AI was told), and real HTTP receivers
(uvicorn) playing the hooks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np
import pytest

from bridge.devtools.dial import tone, write_wav
from bridge.signing import verify
from tests.http_receiver import WAIT, Handler, HttpReceiver, Received

from .conftest import accepted

pytestmark = pytest.mark.timeout(60)

SECRET = "hook-secret-0123"


class HookReceiver(HttpReceiver):
    """The hooks' far end: ``handlers[path]`` answer (default: 200 ``{}``) (tests/http_receiver.py)."""

    def __init__(self) -> None:
        super().__init__(default_body=b"{}", content_type=b"application/json")


@pytest.fixture
async def hooks():
    r = HookReceiver()
    await r.start()
    yield r
    await r.stop()


def answer(obj: Any, status: int = 200) -> Handler:
    async def handler(_got: Received) -> tuple[int, bytes]:
        return status, obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return handler


async def next_event(sub: Any, type_: str, timeout: float = WAIT, **match: Any) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            e = await sub.get()
            if e.type == type_ and all(e.data.get(k) == v for k, v in match.items()):
                return e


SALES = {"prompt": "You sell to {customer}, tier {tier}, for call {call_id}.", "voice": "Eve",
         "first_message": "Sales here!", "variables": {"tier": "basic"}}


async def test_a_start_hook_choosing_profile_and_variables_changes_the_ai_config(make_bridge, sim, dial, hooks):
    hooks.handlers["/start"] = answer({"profile": "sales", "variables": {"customer": "Ana", "tier": 2},
                                       "metadata": {"crm_id": "C-9"}, "language": "pt-BR"})
    bridge = await make_bridge(
        profile={"prompt": "Default prompt.", "voice": "Adam",
                 "hooks": {"on_call_start": {"url": hooks.url("/start"), "hmac_secret": SECRET}}},
        profiles={"sales": SALES},
    )
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    got = await hooks.next("/start")
    session = await accepted(sim)
    cfg = session.config
    call_id = str(caller.uuid)
    # What the AI was told: the hook's profile, its prompt rendered with the hook's variables.
    assert cfg["system_prompt"] == f"You sell to Ana, tier 2, for call {call_id}."
    assert cfg["voice"] == "Eve" and cfg["first_message"] == "Sales here!" and cfg["language"] == "pt-BR"
    # The hook got the call's context, signed like an HTTP tool request.
    body = got.json
    assert body["hook"] == "on_call_start" and body["call_id"] == call_id and body["profile"] == "default"
    assert body["direction"] == "inbound" and isinstance(body["variables"], dict) and body["metadata"] == {}
    assert got.headers["x-voxbridge-hook"] == "on_call_start"
    assert verify(SECRET, got.headers["x-voxbridge-timestamp"], got.body, got.headers["x-voxbridge-signature"])
    assert not verify("wrong", got.headers["x-voxbridge-timestamp"], got.body, got.headers["x-voxbridge-signature"])
    done = await next_event(events, "hook.completed", hook="on_call_start")
    assert done.data["outcome"] == "ok" and done.data["status"] == 200 and done.data["profile"] == "default"
    assert done.data["changes"] == ["profile", "variables", "metadata", "language"]
    started = await next_event(events, "call.started")
    assert started.data["profile"] == "sales" and started.data["variables"]["customer"] == "Ana"
    assert started.data["metadata"] == {"crm_id": "C-9"}
    assert bridge.sessions[call_id].profile_name == "sales"
    await caller.aclose()
    ended = await next_event(events, "call.ended")
    assert ended.data["profile"] == "sales" and ended.data["metadata"] == {"crm_id": "C-9"}
    assert bridge.metrics.registry.get_sample_value(
        "voxbridge_hook_calls_total", {"hook": "on_call_start", "outcome": "ok"}) == 1


async def test_a_start_hook_that_hangs_delays_the_call_by_its_timeout_and_no_more(make_bridge, sim, dial, hooks):
    async def hang(_got: Received) -> tuple[int, bytes]:
        await hooks.release.wait()
        return 200, json.dumps({"profile": "sales"}).encode()

    hooks.handlers["/start"] = hang
    bridge = await make_bridge(
        profile={"prompt": "Default prompt.", "hooks": {"on_call_start": {"url": hooks.url("/start"), "timeout": 0.8}}},
        profiles={"sales": SALES},
    )
    events = bridge.events.subscribe()
    t0 = time.monotonic()
    caller = await dial(bridge)
    await hooks.next("/start")
    session = await accepted(sim)
    waited = session.config_received_at - t0
    assert 0.7 <= waited <= 0.8 + 1.5, waited  # the hook's timeout, plus set-up; not the hook's hang
    assert session.config["system_prompt"] == "Default prompt."  # the defaults
    done = await next_event(events, "hook.completed", hook="on_call_start")
    assert done.data["outcome"] == "timeout" and done.data["status"] is None
    assert 700 <= done.data["duration_ms"] <= 2300
    assert (await next_event(events, "call.started")).data["profile"] == "default"
    # The call is a normal call: it flows (the caller hears the AI's greeting).
    assert await caller.wait_audio(8000, timeout=WAIT)
    await caller.aclose()


async def test_a_start_hook_that_refuses_runs_the_profiles_fallback(make_bridge, sim, dial, hooks, tmp_path):
    wav = tmp_path / "closed.wav"
    write_wav(wav, tone(440, 600, 8000), 8000)
    hooks.handlers["/start"] = answer({"refuse": "outside office hours"})
    bridge = await make_bridge(profile={
        "hooks": {"on_call_start": {"url": hooks.url("/start")}},
        "fallback": {"message_wav": str(wav)},
    })
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    assert await caller.wait_ended(WAIT) == "hangup-frame"  # back to the dialplan, after the message
    pcm = np.frombuffer(bytes(caller.received_audio), "<i2")
    assert (np.abs(pcm) > 500).sum() >= 0.4 * 8000  # the fallback message was heard: no dead air
    # The AI was never told of the call: the connection opened while the hook ran (preconnect)
    # carried nothing and was closed by the bridge.
    for s in sim.sessions:
        await asyncio.wait_for(s.closed.wait(), WAIT)
        assert s.config is None and not s.messages and s.closed_by == "client"
    done = await next_event(events, "hook.completed", hook="on_call_start")
    assert done.data["outcome"] == "refused" and done.data["changes"] == ["refuse"]
    ended = await next_event(events, "call.ended")
    assert ended.data["reason"] == "fallback:refused by the on_call_start hook: outside office hours"


@pytest.mark.parametrize("body, status, outcome, logged", [
    (b"<html>oops</html>", 200, "invalid", "answered not JSON"),
    (b"[1, 2]", 200, "invalid", "answered a JSON list, not an object"),
    (b"", 200, "invalid", "answered an empty answer"),
    (b'{"error": "boom"}', 500, "error", "answered HTTP 500"),
])
async def test_a_start_hook_that_fails_or_answers_garbage_is_ignored_with_a_clear_log(
        make_bridge, sim, dial, hooks, caplog, body, status, outcome, logged):
    hooks.handlers["/start"] = answer(body, status)
    bridge = await make_bridge(profile={"prompt": "Default prompt.",
                                        "hooks": {"on_call_start": {"url": hooks.url("/start")}}})
    events = bridge.events.subscribe()
    with caplog.at_level(logging.WARNING, logger="voxbridge"):
        caller = await dial(bridge)
        session = await accepted(sim)
    assert session.config["system_prompt"] == "Default prompt."
    done = await next_event(events, "hook.completed", hook="on_call_start")
    assert done.data["outcome"] == outcome and done.data["status"] == status
    lines = [r.getMessage() for r in caplog.records if "on_call_start hook" in r.getMessage()]
    assert any(logged in line and "goes on with its defaults" in line for line in lines), lines
    assert all("/start" not in line for line in lines)  # the origin only, never the path
    await caller.aclose()


async def test_fields_of_the_wrong_type_are_ignored_and_the_rest_applied(make_bridge, sim, dial, hooks, caplog):
    hooks.handlers["/start"] = answer({"profile": "nope", "voice": 7, "variables": {"tier": "gold"},
                                       "prompt": "Tier {tier}."})
    bridge = await make_bridge(profile={"hooks": {"on_call_start": {"url": hooks.url("/start")}}})
    with caplog.at_level(logging.WARNING, logger="voxbridge"):
        caller = await dial(bridge)
        session = await accepted(sim)
    assert session.config["system_prompt"] == "Tier gold."
    text = caplog.text
    assert "no profile named 'nope'" in text and "voice: must be text" in text
    await caller.aclose()


async def test_the_end_hook_gets_the_outcome_signed_and_is_retried_after_a_500(make_bridge, sim, dial, hooks):
    statuses = [500, 200]

    async def flaky(_got: Received) -> tuple[int, bytes]:
        return statuses.pop(0), b"{}"

    hooks.handlers["/end"] = flaky
    bridge = await make_bridge(profile={"hooks": {"on_call_end": {
        "url": hooks.url("/end"), "hmac_secret": SECRET, "headers": {"X-Tenant": "acme"}}}})
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    session = await accepted(sim)
    await session.transcript("user", "where is my order")
    await next_event(events, "transcript")
    await caller.aclose()
    first = await hooks.next("/end")
    second = await hooks.next("/end", timeout=15)  # the webhooks' back-off: about 2 s
    for got in (first, second):
        assert verify(SECRET, got.headers["x-voxbridge-timestamp"], got.body, got.headers["x-voxbridge-signature"])
        assert got.headers["x-voxbridge-hook"] == "on_call_end" and got.headers["x-tenant"] == "acme"
        assert got.headers["x-voxbridge-event"] == "call.ended"
    assert first.json["id"] == second.json["id"] == first.headers["x-voxbridge-event-id"]  # dedupe on it
    outcome = second.json
    assert outcome["type"] == "call.ended" and outcome["call_id"] == str(caller.uuid)
    data = outcome["data"]
    assert data["reason"] == "caller-hangup" and data["profile"] == "default" and data["duration_s"] > 0
    assert [t["text"] for t in data["transcript"] if t["role"] == "user"] == ["where is my order"]
    assert data["tools"] == [] and data["metadata"] == {}
    done = await next_event(events, "hook.completed", timeout=15, hook="on_call_end")
    assert done.data["outcome"] == "ok" and done.data["status"] == 200 and done.data["duration_ms"] >= 1500
    assert hooks.count["/end"] == 2


async def test_the_end_hook_reports_the_tools_used_with_their_outcomes(make_bridge, sim, dial, hooks):
    bridge = await make_bridge(profile={"tools": ["end_call"], "hooks": {"on_call_end": {"url": hooks.url("/end")}}})
    caller = await dial(bridge)
    session = await accepted(sim)
    await session.call_tool("end_call", {})
    assert await caller.wait_ended(WAIT)
    got = await hooks.next("/end")
    data = got.json["data"]
    assert data["reason"] == "ai:end_call"
    assert [(t["tool"], t["outcome"]) for t in data["tools"]] == [("end_call", "ok")]
    assert "x-voxbridge-signature" not in got.headers  # no hmac_secret: unsigned


async def test_neither_hook_delays_the_teardown(make_bridge, sim, dial, hooks):
    async def hang(_got: Received) -> tuple[int, bytes]:
        await hooks.release.wait()
        return 200, b"{}"

    hooks.handlers["/end"] = hang
    bridge = await make_bridge(profile={"hooks": {"on_call_start": {"url": hooks.url("/start")},
                                                  "on_call_end": {"url": hooks.url("/end")}}})
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    await accepted(sim)
    call = bridge.sessions[str(caller.uuid)]
    t0 = time.monotonic()
    await caller.aclose()
    await asyncio.wait_for(call.ended.wait(), WAIT)
    await hooks.next("/end")  # the end hook is in flight, and hangs …
    assert time.monotonic() - t0 < 2.0  # … but the call was torn down at once
    assert str(caller.uuid) not in bridge.sessions and bridge.hooks.pending == 1
    assert (await next_event(events, "call.ended")).data["reason"] == "caller-hangup"
    hooks.release.set()
    done = await next_event(events, "hook.completed", hook="on_call_end")
    assert done.data["outcome"] == "ok"


async def test_a_hook_end_delivery_still_hanging_at_shutdown_is_given_up(make_bridge, sim, dial, hooks):
    async def hang(_got: Received) -> tuple[int, bytes]:
        await hooks.release.wait()
        return 200, b"{}"

    hooks.handlers["/end"] = hang
    bridge = await make_bridge(profile={"hooks": {"on_call_end": {"url": hooks.url("/end")}}})
    events = bridge.events.subscribe()
    caller = await dial(bridge)
    await accepted(sim)
    await caller.aclose()
    await hooks.next("/end")
    t0 = time.monotonic()
    await bridge.stop()
    assert time.monotonic() - t0 < 6.0
    assert bridge.hooks.pending == 0
    done = await next_event(events, "hook.completed", hook="on_call_end")
    assert done.data["outcome"] == "cancelled"
