"""Call hooks (bridge/hooks.py) without a network: the answer's rules, the configuration's errors
by key, and the hooks' behaviour over a fake transport (timeouts, refusals, events)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bridge.calls import CallSettings
from bridge.config import Config, ConfigError, load_config
from bridge.events import EVENT_TYPES, Event, EventBus
from bridge.hooks import CallHooks, HookAnswer, InvalidAnswer, parse_start_answer
from bridge.signing import verify
from bridge.supervise import Supervisor

PROFILES = ("default", "sales")


def parse(obj: Any, status: int = 200) -> tuple[HookAnswer, list[str]]:
    return parse_start_answer(status, obj if isinstance(obj, bytes) else json.dumps(obj).encode(), PROFILES)


def test_a_full_answer_is_read_field_by_field():
    a, warnings = parse({"profile": "sales", "variables": {"name": "Ana", "n": 3, "vip": True},
                         "metadata": {"crm": {"id": 9}}, "prompt": "Hi {name}\n", "first_message": None,
                         "voice": "Eve", "language": "pt-BR"})
    assert warnings == []
    assert a.profile == "sales" and a.variables == {"name": "Ana", "n": "3", "vip": "true"}
    assert a.metadata == {"crm": {"id": 9}} and a.refuse is None
    assert a.overrides == {"prompt": "Hi {name}\n", "first_message": None, "voice": "Eve", "language": "pt-BR"}
    assert a.changes == ["profile", "variables", "metadata", "prompt", "first_message", "voice", "language"]


@pytest.mark.parametrize("body, why", [
    (b"", "an empty answer"),
    (b"not json", "not JSON"),
    (b"[]", "a JSON list, not an object"),
    (b"[{}, {}]", "a JSON list, not an object"),
    (b"null", "a JSON null, not an object"),
    (b'"sales"', "a JSON str, not an object"),
])
def test_garbage_is_refused_whole_saying_why(body, why):
    with pytest.raises(InvalidAnswer) as exc:
        parse_start_answer(200, body, PROFILES)
    assert str(exc.value).startswith(why)


def test_no_changes_and_n8n_item_lists():
    assert parse(b"", 204) == (HookAnswer(), [])
    assert parse({}) == (HookAnswer(), [])
    a, _ = parse([{"profile": "sales"}])  # n8n: "all incoming items", one item
    assert a.profile == "sales"


def test_bad_fields_are_ignored_one_by_one_each_named():
    a, warnings = parse({"profile": "nope", "variables": {"ok": "1", "bad-name": "x", "nested": {"a": 1},
                                                           "ctl": "a\x07b"},
                         "metadata": [1], "voice": "Eve\n", "prompt": 5, "language": "en", "colour": "red",
                         "refuse": 0})
    assert a.profile is None and a.variables == {"ok": "1"} and a.metadata == {}
    assert a.overrides == {"language": "en"} and a.refuse is None
    text = "\n".join(warnings)
    for needle in ("no profile named 'nope'", "variables.bad-name", "variables.nested", "variables.ctl",
                   "metadata: must be an object", "voice: must be text", "prompt: must be text",
                   "unknown field(s) ignored: colour", "refuse: must be a reason"):
        assert needle in text, needle


def test_a_refusal_is_one_bounded_line():
    a, _ = parse({"refuse": "closed\r\nX-Injected: 1 " + "x" * 500})
    assert a.refuse is not None and "\n" not in a.refuse and len(a.refuse) == 200
    assert parse({"refuse": True})[0].refuse == "refused by the on_call_start hook"
    assert parse({"refuse": False})[0].refuse is None


def test_an_answer_merges_over_the_settings():
    s = CallSettings(profile="default", variables={"caller_id": "100", "tier": "1"}, metadata={"a": 1},
                     overrides={"voice": "Adam"})
    HookAnswer(profile="sales", variables={"tier": "2"}, metadata={"b": 2}, overrides={"prompt": "P"}).apply(s)
    assert s.profile == "sales" and s.variables == {"caller_id": "100", "tier": "2"}
    assert s.metadata == {"a": 1, "b": 2} and s.overrides == {"voice": "Adam", "prompt": "P"}


def test_hook_completed_is_an_event_type():
    assert "hook.completed" in EVENT_TYPES


# ------------------------------------------------------------------ configuration


def _config(hooks: dict[str, Any], **extra: Any) -> Config:
    return Config.model_validate({"profiles": {"default": {"hooks": hooks}}, **extra})


@pytest.mark.parametrize("hooks, key, message", [
    ({"on_call_start": {"url": "http://127.0.0.1/h", "timeout": 9}}, "hooks.on_call_start.timeout",
     "less than or equal to 5"),
    ({"on_call_start": {"url": "ftp://127.0.0.1/h"}}, "hooks.on_call_start.url", "http:// or https://"),
    ({"on_call_end": {"url": "http://127.0.0.1/h", "retries": -1}}, "hooks.on_call_end.retries", "greater than"),
    ({"on_call_end": {"url": "http://127.0.0.1/h", "timeout": 1}}, "hooks.on_call_end.timeout", "unknown key"),
    ({"on_call_start": {"url": "http://169.254.169.254/latest"}}, "hooks.on_call_start.url", "cloud metadata"),
    ({"on_call_end": {"url": "http://10.0.0.5:5678/webhook/x"}}, "hooks.on_call_end.url", "allow.webhooks permits"),
])
def test_configuration_mistakes_are_named_by_key(tmp_path, hooks, key, message):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"gateway": {"demo": True}, "profiles": {"default": {"hooks": hooks}}}))
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    line = next(line for line in str(exc.value).splitlines() if key in line)
    assert f"profiles.default.{key}:" in line and message in line


def test_a_hook_url_named_in_allow_webhooks_is_accepted():
    cfg = _config({"on_call_end": {"url": "http://10.0.0.5:5678/webhook/x"}},
                  allow={"webhooks": ["http://10.0.0.5:5678"]})
    assert cfg.profiles["default"].hooks.on_call_end is not None


def test_a_hook_header_without_its_environment_variable_is_named(monkeypatch):
    monkeypatch.delenv("VB_HOOK_TOKEN_UNSET", raising=False)
    cfg = _config({"on_call_start": {"url": "http://127.0.0.1/h", "headers": {"X-Auth": "${VB_HOOK_TOKEN_UNSET}"},
                                     "hmac_secret": "s3cret-value"}})
    with pytest.raises(ValueError) as exc:
        CallHooks(cfg, lambda: None, EventBus(), Supervisor())
    assert str(exc.value).startswith("profiles.default.hooks.on_call_start.headers: header 'X-Auth' uses "
                                     "${VB_HOOK_TOKEN_UNSET}")
    assert "s3cret" not in str(exc.value)
    bad = _config({"on_call_end": {"url": "http://127.0.0.1/h", "headers": {"X-Voxbridge-Hook": "x"}}})
    with pytest.raises(ValueError, match=r"on_call_end.headers: 'X-Voxbridge-Hook' is set by voxbridge"):
        CallHooks(bad, lambda: None, EventBus(), Supervisor())


# ------------------------------------------------------------------ behaviour over a fake transport


class FakeTransport:
    def __init__(self, status: int = 200, body: bytes = b"{}", hang: bool = False) -> None:
        self.status, self.body, self.hang = status, body, hang
        self.posts: list[tuple[Any, bytes, dict[str, str], float]] = []
        self.deliveries: list[tuple[str, Event, dict[str, str], int | None, str | None]] = []
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()  # set when a request came in

    async def post(self, target: Any, body: bytes, headers: Any, *, timeout: float) -> tuple[int, bytes]:
        self.posts.append((target, body, dict(headers), timeout))
        self.arrived.set()
        if self.hang:
            await self.release.wait()
        return self.status, self.body

    async def deliver(self, name: str, target: Any, secret: str | None, event: Event, *, headers: Any = None,
                      max_attempts: int | None = None) -> tuple[str, int | None]:
        self.deliveries.append((name, event, dict(headers or {}), max_attempts, secret))
        self.arrived.set()
        if self.hang:
            await self.release.wait()
        return "delivered", 200


CONTEXT = {"call_id": "c-1", "profile": "default", "direction": "inbound", "caller": "100", "caller_name": "",
           "called": "200", "channel": None, "variables": {"caller_id": "100"}, "metadata": {"lead": 1}}


def make_hooks(transport: FakeTransport | None, **hooks: Any) -> tuple[CallHooks, Any]:
    cfg = Config.model_validate({"profiles": {"default": {"hooks": hooks}, "sales": {}}})
    bus = EventBus()
    return CallHooks(cfg, lambda: transport, bus, Supervisor()), bus.subscribe()


def events_of(sub: Any) -> list[Event]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


async def test_the_start_hook_posts_the_context_signed_and_applies_the_answer():
    t = FakeTransport(body=json.dumps({"profile": "sales", "metadata": {"x": 1}}).encode())
    hooks, sub = make_hooks(t, on_call_start={"url": "http://127.0.0.1:5678/h", "hmac_secret": "k", "timeout": 1.5})
    settings = CallSettings()
    assert await hooks.call_starting("default", CONTEXT, settings) is None
    assert settings.profile == "sales" and settings.metadata == {"x": 1}
    _target, body, headers, timeout = t.posts[0]
    assert json.loads(body) == {"hook": "on_call_start", **CONTEXT} and timeout == 1.5
    assert verify("k", headers["X-Voxbridge-Timestamp"], body, headers["X-Voxbridge-Signature"])
    [done] = events_of(sub)
    assert done.type == "hook.completed" and done.call_id == "c-1"
    assert done.data["outcome"] == "ok" and done.data["metadata"] == {"lead": 1, "x": 1}
    # A profile without hooks: nothing sent, nothing published.
    assert await hooks.call_starting("sales", CONTEXT, CallSettings()) is None
    assert len(t.posts) == 1 and events_of(sub) == []


async def test_a_hanging_start_hook_gives_up_at_its_timeout_and_changes_nothing():
    t = FakeTransport(hang=True)
    hooks, sub = make_hooks(t, on_call_start={"url": "http://127.0.0.1/h", "timeout": 0.2})
    settings = CallSettings(profile="default")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await hooks.call_starting("default", CONTEXT, settings) is None
    assert 0.18 <= loop.time() - t0 < 1.5
    assert settings == CallSettings(profile="default")
    [done] = events_of(sub)
    assert done.data["outcome"] == "timeout" and done.data["status"] is None


async def test_a_refusal_is_returned_and_no_transport_is_an_error_not_a_crash():
    t = FakeTransport(body=b'{"refuse": "closed", "profile": "sales"}')
    hooks, sub = make_hooks(t, on_call_start={"url": "http://127.0.0.1/h"})
    settings = CallSettings()
    assert await hooks.call_starting("default", CONTEXT, settings) == "closed"
    assert settings.profile == "sales"  # that profile's fallback runs
    assert events_of(sub)[0].data["outcome"] == "refused"
    hooks, sub = make_hooks(None, on_call_start={"url": "http://127.0.0.1/h"})
    assert await hooks.call_starting("default", CONTEXT, CallSettings()) is None
    assert events_of(sub)[0].data["outcome"] == "error"


async def test_a_start_hook_cancelled_with_its_call_says_so():
    t = FakeTransport(hang=True)
    hooks, sub = make_hooks(t, on_call_start={"url": "http://127.0.0.1/h", "timeout": 5})
    task = asyncio.ensure_future(hooks.call_starting("default", CONTEXT, CallSettings()))
    await asyncio.wait_for(t.arrived.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events_of(sub)[0].data["outcome"] == "cancelled"


async def test_the_end_hook_delivers_in_the_background_and_close_gives_up_late_ones():
    t = FakeTransport(hang=True)
    hooks, sub = make_hooks(t, on_call_end={"url": "http://127.0.0.1/h", "retries": 2, "hmac_secret": "k",
                                            "headers": {"X-Tenant": "acme"}})
    ended = Event("call.ended", "c-1", {"reason": "caller-hangup", "metadata": {"lead": 1}})
    hooks.call_ended("default", ended)  # returns at once
    hooks.call_ended("sales", ended)  # no hook: nothing
    assert hooks.pending == 1
    await asyncio.wait_for(t.arrived.wait(), 5)
    name, event, headers, attempts, secret = t.deliveries[0]
    assert name == "on_call_end:default" and event is ended and attempts == 3 and secret == "k"
    assert headers == {"X-Tenant": "acme", "X-Voxbridge-Hook": "on_call_end"}
    await hooks.close(grace=0.1)
    assert hooks.pending == 0
    [done] = events_of(sub)
    assert done.data["hook"] == "on_call_end" and done.data["outcome"] == "cancelled"
    hooks.call_ended("default", ended)  # after close: nothing starts
    assert hooks.pending == 0
