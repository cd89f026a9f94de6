"""Call hooks: a profile's ``on_call_start`` and ``on_call_end`` HTTP hooks (or n8n workflows).

Configured per profile (bridge/config.py, ``profiles.<name>.hooks``)::

    hooks:
      on_call_start: {url: http://127.0.0.1:5678/webhook/call-start, timeout: 2.0,
                      headers: {X-N8N-Auth: "${N8N_HOOK_TOKEN}"}, hmac_secret: "…"}
      on_call_end:   {url: http://127.0.0.1:5678/webhook/call-end, hmac_secret: "…", retries: 5}

Both URLs are held to the webhooks' egress policy (``allow.webhooks``, bridge/egress.py): checked
when the configuration is loaded, the host resolved and checked again at every request, the
request sent to the checked address, redirects not followed. Both requests go out through the
webhook dispatcher (bridge/webhooks.py), which owns that policy and its HTTP client. Header values
may name environment variables (``${NAME}``), expanded at start-up exactly like an HTTP tool's.

**on_call_start** runs once the call's settings are resolved (API request, dialplan, defaults)
and before the AI is connected: ``POST`` of the call's context, compact JSON::

    {"hook": "on_call_start", "call_id", "profile", "direction", "caller", "caller_name", "called",
     "channel", "variables", "metadata"}

signed like an HTTP tool when ``hmac_secret`` is set (``X-Voxbridge-Timestamp``,
``X-Voxbridge-Signature``: bridge/signing.py), with ``X-Voxbridge-Hook: on_call_start``. The answer,
a JSON object (or an array holding one object, as n8n's *Respond to Webhook* sends "all incoming
items"), may set:

- ``profile``: the profile of the call (one that exists; an unknown one is ignored, with a warning);
- ``variables``: merged over the dialplan's / the API's (values are strings; numbers and booleans
  are taken as text);
- ``metadata``: merged over the API request's;
- ``prompt``, ``first_message``, ``voice``, ``language``: overrides of the profile's (``prompt`` is
  a template: its ``{placeholders}`` are filled from the variables);
- ``refuse``: a reason: the call is refused and the profile's fallback runs (the caller is never
  left in dead air; with ``profile`` set too, that profile's fallback).

A field of the wrong type is ignored (with a warning naming it) and the rest applied; unknown
fields are ignored. ``204`` or ``{}`` changes nothing. Anything else — no answer within
``timeout`` (≤ 5 s, 2 s by default), a connection error, a non-2xx status, an answer that is not
a JSON object — is logged and counted, and the call goes on with its defaults: a hook can delay
a call by at most its ``timeout``, never stop it.

**on_call_end** runs after the call ended, off the teardown (it never delays it): the call's
``call.ended`` event (its ``reason``, ``duration_s``, ``transcript``, ``tools`` with their
outcomes, ``metadata``, ``profile``, ``stats``) is delivered exactly as a webhook delivery —
the Event JSON, ``X-Voxbridge-Event``/``-Event-Id`` (dedupe on it), signed with the hook's
``hmac_secret`` (unsigned without one), retried with the webhooks' back-off (1 + ``retries``
attempts) — with ``X-Voxbridge-Hook: on_call_end`` and the configured headers. At shutdown,
deliveries still retrying get ``CLOSE_GRACE_S`` seconds, then are given up.

Both publish ``hook.completed`` (``hook``, ``outcome``, ``status``, ``duration_ms``, ``profile``,
and ``changes`` for on_call_start): outcomes ``ok``, ``refused`` (the hook refused the call),
``invalid`` (an answer that is not a JSON object), ``error`` (non-2xx, unreachable, refused by
``allow.webhooks``, or every attempt failed), ``timeout``, ``cancelled`` (the call ended first).

Logs name the hook's origin (scheme, host, port), never its path or query, headers, secret or body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from .calls import CallSettings, EventPublisher
from .config import Config, EndHookConfig, StartHookConfig
from .egress import EgressPolicy, EgressRefused, ResolveFailed, Target
from .events import Event
from .signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from .toolset import expand_headers

log = logging.getLogger("voxbridge.hooks")

__all__ = ["CallHooks", "HookAnswer", "InvalidAnswer", "parse_start_answer"]

HOOK_HEADER = "X-Voxbridge-Hook"
#: What an on_call_start answer may override of the profile.
OVERRIDES = ("prompt", "first_message", "voice", "language")
#: Every field an on_call_start answer may carry.
ANSWER_FIELDS = ("profile", "variables", "metadata", *OVERRIDES, "refuse")
#: At shutdown, how long on_call_end deliveries still in progress get before they are given up.
CLOSE_GRACE_S = 2.0
#: The supervisor's name for the hook tasks (bridge/supervise.py).
PART = "hooks"
#: Longest refusal reason kept (it goes into the call's end reason and logs).
MAX_REASON_CHARS = 200

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL_STRICT = re.compile(r"[\x00-\x1f\x7f]")


class InvalidAnswer(ValueError):
    """An on_call_start answer that cannot be used at all (not a JSON object)."""


@dataclass
class HookAnswer:
    """What an on_call_start hook answered, checked (see :func:`parse_start_answer`)."""

    profile: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str | None] = field(default_factory=dict)
    refuse: str | None = None

    @property
    def changes(self) -> list[str]:
        """The fields the answer sets, in a stable order (for the ``hook.completed`` event)."""
        out = [name for name in ("profile", "variables", "metadata") if getattr(self, name)]
        out += [name for name in OVERRIDES if name in self.overrides]
        return out + (["refuse"] if self.refuse is not None else [])

    def apply(self, settings: CallSettings) -> None:
        """Merge into the call's settings (the refusal is the caller's to act on)."""
        if self.profile is not None:
            settings.profile = self.profile
        settings.variables.update(self.variables)
        settings.metadata.update(self.metadata)
        settings.overrides.update(self.overrides)


def _text(value: Any, name: str, *, multiline: bool, nullable: bool = False) -> tuple[bool, str | None]:
    if value is None and nullable:
        return True, None
    if not isinstance(value, str):
        return False, None
    if (_CONTROL if multiline else _CONTROL_STRICT).search(value):
        return False, None
    return True, value


def parse_start_answer(status: int, body: bytes, profiles: Collection[str]) -> tuple[HookAnswer, list[str]]:
    """An on_call_start hook's 2xx answer → (the usable answer, warnings naming what was ignored).

    Raises :class:`InvalidAnswer` (saying why) if the answer is not a JSON object (or a list
    holding exactly one): the call then goes on with its defaults.
    """
    if status == 204:
        return HookAnswer(), []
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        raise InvalidAnswer("an empty answer (expected a JSON object, or 204 for no changes)")
    try:
        data = json.loads(text)
    except ValueError:
        raise InvalidAnswer("not JSON (expected a JSON object)") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # n8n "Respond to Webhook" with all incoming items: one item
    if not isinstance(data, dict):
        raise InvalidAnswer(f"a JSON {type(data).__name__ if data is not None else 'null'}, not an object")
    answer = HookAnswer()
    warnings: list[str] = []
    unknown = sorted(str(k) for k in data if k not in ANSWER_FIELDS)
    if unknown:
        warnings.append(f"unknown field(s) ignored: {', '.join(unknown)}")

    profile = data.get("profile")
    if profile is not None:
        if not isinstance(profile, str) or not profile:
            warnings.append("profile: must be a profile name (a string); ignored")
        elif profile not in profiles:
            warnings.append(f"profile: no profile named {profile!r} ({', '.join(profiles)}); ignored")
        else:
            answer.profile = profile

    variables = data.get("variables")
    if variables is not None:
        if not isinstance(variables, dict):
            warnings.append("variables: must be an object of name → text; ignored")
        else:
            for key, value in variables.items():
                if not isinstance(key, str) or not key.isidentifier():
                    warnings.append(f"variables.{key}: not a placeholder name; ignored")
                elif isinstance(value, bool):
                    answer.variables[key] = "true" if value else "false"
                elif isinstance(value, (str, int, float)) and not _CONTROL.search(str(value)):
                    answer.variables[key] = str(value)
                else:
                    warnings.append(f"variables.{key}: must be text, a number or a boolean; ignored")

    metadata = data.get("metadata")
    if metadata is not None:
        if isinstance(metadata, dict):
            answer.metadata = dict(metadata)
        else:
            warnings.append("metadata: must be an object; ignored")

    for name in OVERRIDES:
        if name in data:
            ok, value = _text(data[name], name, multiline=name in ("prompt", "first_message"),
                              nullable=name == "first_message")
            if ok:
                answer.overrides[name] = value
            else:
                warnings.append(f"{name}: must be text without control characters; ignored")

    refuse = data.get("refuse")
    if refuse is not None and refuse is not False:
        if refuse is True:
            answer.refuse = "refused by the on_call_start hook"
        elif isinstance(refuse, str) and refuse.strip():
            answer.refuse = " ".join(refuse.split())[:MAX_REASON_CHARS]  # one line, bounded
        else:
            warnings.append("refuse: must be a reason (text); ignored")
    return answer, warnings


class HookTransport(Protocol):
    """What the hooks send through (bridge/webhooks.py's WebhookDispatcher)."""

    async def post(self, target: Target, body: bytes, headers: Mapping[str, str], *,
                   timeout: float) -> tuple[int, bytes]: ...

    async def deliver(self, name: str, target: Target, secret: str | None, event: Event, *,
                      headers: Mapping[str, str] | None = None,
                      max_attempts: int | None = None) -> tuple[str, int | None]: ...


class TaskWatcher(Protocol):
    def watch(self, task: asyncio.Task[Any], name: str, on_crash: Callable[[BaseException], None]) -> Any: ...


@dataclass(frozen=True, slots=True)
class _Hook:
    """One configured hook, ready to use: its checked target and expanded headers."""

    target: Target
    headers: dict[str, str]
    secret: str | None


def _build(key: str, cfg: StartHookConfig | EndHookConfig, policy: EgressPolicy) -> _Hook:
    try:
        target = policy.check(cfg.url)
    except ValueError as exc:
        raise ValueError(f"{key}.url: {exc}") from None
    try:
        headers = expand_headers(key, cfg.headers)
    except ValueError as exc:  # "tool '<key>': header …": keep the sentence, name the key
        raise ValueError(f"{key}.headers: {str(exc).split(': ', 1)[-1]}") from None
    if any(h.lower() == HOOK_HEADER.lower() for h in headers):
        raise ValueError(f"{key}.headers: {HOOK_HEADER!r} is set by voxbridge and cannot be configured")
    return _Hook(target, headers, cfg.hmac_secret.get_secret_value() if cfg.hmac_secret else None)


class CallHooks:
    """The profiles' hooks. One per bridge (bridge/app.py); every call shares it.

    ``transport()`` returns the webhook dispatcher (None before the event hub started, or after
    it closed: a hook then fails as unreachable). Raises ValueError naming the key for a URL
    ``allow.webhooks`` refuses or a header whose environment variable is missing.
    """

    def __init__(self, config: Config, transport: Callable[[], HookTransport | None], events: EventPublisher,
                 supervisor: TaskWatcher) -> None:
        self._config = config
        self._transport = transport
        self._events = events
        self._supervisor = supervisor
        self._start: dict[str, tuple[_Hook, StartHookConfig]] = {}
        self._end: dict[str, tuple[_Hook, EndHookConfig]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        policy = EgressPolicy(config.allow.webhooks)
        for pname, p in config.profiles.items():
            if (s := p.hooks.on_call_start) is not None:
                self._start[pname] = (_build(f"profiles.{pname}.hooks.on_call_start", s, policy), s)
            if (e := p.hooks.on_call_end) is not None:
                self._end[pname] = (_build(f"profiles.{pname}.hooks.on_call_end", e, policy), e)

    # ------------------------------------------------------------------ on_call_start

    async def call_starting(self, profile: str, context: Mapping[str, Any], settings: CallSettings,
                            logger: logging.LoggerAdapter[logging.Logger] | None = None) -> str | None:
        """Run ``profile``'s on_call_start hook, if it has one, within its ``timeout``, and merge
        its answer into ``settings``. Returns the refusal reason if the hook refused the call.
        Never raises (but is cancelled with the call)."""
        entry = self._start.get(profile)
        if entry is None:
            return None
        hook, cfg = entry
        clog: logging.LoggerAdapter[logging.Logger] | logging.Logger = logger or log
        call_id = str(context.get("call_id", ""))
        where = hook.target.origin
        t0 = time.monotonic()
        status: int | None = None
        outcome = "error"
        answer: HookAnswer | None = None
        try:
            try:
                async with asyncio.timeout(cfg.timeout):
                    status, body = await self._post(hook, {"hook": "on_call_start", **context}, cfg.timeout)
                if not 200 <= status < 300:
                    clog.warning("on_call_start hook (%s) answered HTTP %d: the call goes on with its defaults",
                                 where, status)
                else:
                    answer, warnings = parse_start_answer(status, body, self._config.profiles)
                    for w in warnings:
                        clog.warning("on_call_start hook (%s): %s", where, w)
                    outcome = "refused" if answer.refuse is not None else "ok"
            except TimeoutError:
                outcome = "timeout"
                clog.warning("on_call_start hook (%s) did not answer within %g s: the call goes on with its "
                             "defaults", where, cfg.timeout)
            except InvalidAnswer as exc:
                outcome = "invalid"
                clog.warning("on_call_start hook (%s) answered %s: ignored, the call goes on with its defaults",
                             where, exc)
            except (EgressRefused, ResolveFailed) as exc:
                clog.warning("on_call_start hook (%s) not called: %s; the call goes on with its defaults", where, exc)
            except (httpx.HTTPError, OSError, RuntimeError) as exc:
                clog.warning("on_call_start hook (%s) unreachable (%s): the call goes on with its defaults",
                             where, type(exc).__name__)
            except Exception:  # noqa: BLE001 - a bug here must not cost the caller the call
                clog.exception("on_call_start hook (%s) failed: the call goes on with its defaults", where)
                answer = None
        except asyncio.CancelledError:
            self._completed(call_id, "on_call_start", "cancelled", status, t0, profile, context.get("metadata"))
            raise
        metadata = dict(context.get("metadata") or {})
        if answer is not None:
            answer.apply(settings)
            metadata.update(answer.metadata)
        self._completed(call_id, "on_call_start", outcome, status, t0, profile, metadata,
                        changes=answer.changes if answer is not None else [])
        return answer.refuse if answer is not None else None

    async def _post(self, hook: _Hook, payload: Mapping[str, Any], timeout: float) -> tuple[int, bytes]:
        transport = self._transport()
        if transport is None:
            raise RuntimeError("the webhook dispatcher is not running")
        # default=str: metadata comes from API users; a stray non-JSON value must not fail the hook.
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")
        headers = {**hook.headers, "Content-Type": "application/json", "Accept": "application/json",
                   HOOK_HEADER: "on_call_start"}
        if hook.secret is not None:
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(hook.secret, timestamp, body)
        return await transport.post(hook.target, body, headers, timeout=timeout)

    # ------------------------------------------------------------------ on_call_end

    def call_ended(self, profile: str, ended: Event) -> None:
        """Deliver ``ended`` (the call's ``call.ended`` event) to ``profile``'s on_call_end hook,
        if it has one, in the background. Never blocks, never raises."""
        entry = self._end.get(profile)
        if entry is None or self._closed:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._deliver(profile, ended, *entry),
                                                          name=f"hook-on_call_end-{ended.call_id}")
        except Exception:  # on the teardown path: a hook must not hurt the call's end
            log.exception("[%s] cannot start the on_call_end hook", ended.call_id)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._supervisor.watch(task, PART, lambda exc: None)

    async def _deliver(self, profile: str, ended: Event, hook: _Hook, cfg: EndHookConfig) -> None:
        t0 = time.monotonic()
        transport = self._transport()
        outcome, status = "failed", None
        try:
            if transport is None:
                log.warning("[%s] on_call_end hook (%s) not called: the webhook dispatcher is not running",
                            ended.call_id, hook.target.origin)
            else:
                outcome, status = await transport.deliver(
                    f"on_call_end:{profile}", hook.target, hook.secret, ended,
                    headers={**hook.headers, HOOK_HEADER: "on_call_end"}, max_attempts=cfg.retries + 1)
        except asyncio.CancelledError:
            self._completed(ended.call_id, "on_call_end", "cancelled", status, t0, profile, ended.data.get("metadata"))
            raise
        self._completed(ended.call_id, "on_call_end", "ok" if outcome == "delivered" else "error", status, t0,
                        profile, ended.data.get("metadata"))

    # ------------------------------------------------------------------ both

    def _completed(self, call_id: str, hook: str, outcome: str, status: int | None, t0: float, profile: str,
                   metadata: Any, **extra: Any) -> None:
        try:
            self._events.publish("hook.completed", call_id, hook=hook, outcome=outcome, status=status,
                                 duration_ms=round((time.monotonic() - t0) * 1000, 1), profile=profile,
                                 metadata=dict(metadata) if isinstance(metadata, Mapping) else {}, **extra)
        except Exception:  # the bus already shields its sinks; this is belt and braces
            log.exception("[%s] cannot publish hook.completed", call_id)

    @property
    def pending(self) -> int:
        """on_call_end deliveries in progress."""
        return len(self._tasks)

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Give on_call_end deliveries in progress ``grace`` seconds, then give them up."""
        self._closed = True
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                log.warning("hooks: closing with %d on_call_end deliver(ies) not done", len(pending))
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
