"""Webhook delivery: call events POSTed to subscribers, signed, retried, never on the media path.

:meth:`WebhookDispatcher.offer` is an :class:`~bridge.events.EventBus` sink: it only appends the
event to each matching subscription's bounded queue (the oldest is dropped and counted when it is
full). Each subscription has its own delivery task, which sends its events one at a time, in
order, so a slow or dead subscriber delays nobody but itself. That task exists only while the
subscription has something to deliver: idle subscriptions cost no tasks, and nothing lingers
once a call's events have gone out.

The wire format (README, "Webhook delivery")::

    POST <url>
    Content-Type: application/json
    User-Agent: voxbridge
    X-Voxbridge-Event: call.ended
    X-Voxbridge-Event-Id: <event id>           same on every attempt: receivers dedupe on it
    X-Voxbridge-Timestamp: <unix seconds>      of this attempt
    X-Voxbridge-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>

    <Event JSON: {"id", "type", "call_id", "ts", "seq", "data"}>

A 2xx answer is a delivery. Anything else — another status, a connection error, a timeout — is
retried with exponential backoff (honouring ``Retry-After`` up to ``backoff_max``; the policy is
bridge/retry.py's, shared with HTTP tools) until ``max_attempts``; then the event is given up on,
counted and logged. Redirects are not followed (the signature is for the URL the subscriber
registered).

**410 Gone** removes the subscription (from the store too), as in the REST Hooks convention: the
receiver is saying, permanently, that nobody is listening there any more. Its queued events are
counted as dropped. Every other status is treated as temporary, as the README promises.

**Where deliveries may go** is decided by an :class:`~bridge.egress.EgressPolicy` (``allow.webhooks``;
see bridge/egress.py): at registration the URL is checked and its host resolved, every address
checked; at every delivery attempt the host is resolved and checked again and the request is
sent to one of exactly those addresses (the URL's host goes in the ``Host`` header, and for https
in the TLS SNI, so certificates are still verified against the name). A DNS answer that changes
after the check cannot redirect a delivery. A delivery to a refused address is given up at once
(counted as failed and as refused), never retried. Subscriptions loaded from the store that the
policy now refuses are kept (they can be listed and deleted) but nothing is delivered to them.
At most ``max_webhooks`` subscriptions exist at once.

**Delivery workers are supervised** (:meth:`bridge.supervise.Supervisor.watch`): a bug that
escapes a worker is logged with its traceback and counted as a crash of the part ``webhooks``;
the event in flight is counted as failed, and a fresh worker is started if events are queued.

Logs name the subscription and the host it points at, never the full URL (its path or query may
carry a token), the secret or a body.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import json
import logging
import secrets as _secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import httpx
from tenacity import RetryCallState, retry_if_exception_type

from .egress import EgressPolicy, EgressRefused, IPAddress, ResolveFailed, Target
from .events import EVENT_TYPES, Event
from .retry import Backoff, retrying
from .signing import DEFAULT_TOLERANCE_S, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from .supervise import Supervisor

log = logging.getLogger("voxbridge.webhooks")

USER_AGENT = "voxbridge"
#: How much of a subscriber's answer is read (so the connection can be reused), at most.
MAX_RESPONSE_BYTES = 64 * 1024
#: The README's 201 / GET shape; the secret is added only by :meth:`WebhookDispatcher.create`.
PUBLIC_FIELDS = ("id", "url", "events", "description", "created_at")
#: The supervisor's name for the delivery workers (one label for all: subscription ids are unbounded).
PART = "webhooks"
#: Back-off jitter: up to 10 % on top of each wait, so subscribers sharing a receiver do not
#: retry in lockstep.
BACKOFF_JITTER = 0.1

__all__ = ["WebhookDispatcher", "event_types", "sign", "verify_signature", "PUBLIC_FIELDS"]


class _AttemptFailed(Exception):
    """One delivery attempt failed in a way worth retrying (any status but 2xx/410, a transport
    error, a timeout, a failed resolution). ``retry_after``: the seconds the answer asked for."""

    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


def _asked_wait(state: RetryCallState) -> float | None:
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc.retry_after if isinstance(exc, _AttemptFailed) else None


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in whole seconds (the HTTP-date form is not honoured)."""
    if value is not None and value.strip().isdigit():
        return float(value.strip())
    return None


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str, *,
                     tolerance_s: int | None = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """For receivers: is ``signature`` (the ``X-Voxbridge-Signature`` header) valid for ``body``
    (the raw request body, exactly as received) and ``timestamp`` (``X-Voxbridge-Timestamp``)?

    With ``tolerance_s`` (default 5 minutes), a timestamp further than that from ``now``
    (default: the current time) is refused, so a captured request cannot be replayed later;
    ``None`` skips that check. The comparison is in constant time. Never raises on bad input.
    (:func:`bridge.signing.verify`, kept under this name for receivers written against it.)
    """
    return verify(secret, timestamp, body, signature, tolerance_s=tolerance_s, now=now)


def _host(url: str) -> str:
    """scheme://host[:port] — enough to tell subscribers apart in logs, without path or query."""
    try:
        u = httpx.URL(url)
        return f"{u.scheme}://{u.host}" + (f":{u.port}" if u.port else "")
    except Exception:  # noqa: BLE001
        return "<invalid url>"


def event_types(events: list[str] | None) -> list[str]:
    """A subscription's event types, de-duplicated in order (``[]`` = all). Raises ValueError."""
    types: list[str] = []
    for t in events or []:
        if t not in EVENT_TYPES:
            raise ValueError(f"unknown event type {t!r} (known: {', '.join(EVENT_TYPES)})")
        if t not in types:
            types.append(t)
    return types


class _Subscription:
    """One subscriber: its settings, bounded queue, delivery task and counters."""

    def __init__(self, info: dict[str, Any], queue_size: int, target: Target | None,
                 blocked: str | None = None) -> None:
        self.info = info  # as stored: secret included
        self.id: str = info["id"]
        self.url: str = info["url"]
        self.secret: str = info["secret"]
        self.target = target
        #: Why the egress policy refuses this (stored) subscription; None if it is delivered to.
        self.blocked = blocked
        self.host = target.origin if target is not None else _host(self.url)
        self.types = frozenset(info.get("events") or ()) or None  # None: every type
        self.queue: collections.deque[Event] = collections.deque()
        self.queue_size = queue_size
        self.inflight = False
        self.task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.burst_drops = 0
        #: Extra request headers (a call hook's configured ones; subscriptions have none).
        self.headers: Mapping[str, str] = {}
        #: The status of the last answer (None: no answer yet, or the last attempt got none).
        self.last_status: int | None = None

    def push(self, event: Event, totals: collections.Counter[str]) -> bool:
        """Queue ``event`` if this subscriber wants it; True if it was queued."""
        if self.blocked is not None or (self.types is not None and event.type not in self.types):
            return False
        if len(self.queue) >= self.queue_size:
            # Drop the oldest: a lagging subscriber is better served by the latest state of a call.
            self.queue.popleft()
            self.dropped += 1
            totals["dropped"] += 1
            self.burst_drops += 1
            if self.burst_drops == 1:  # once per burst; the delivery task reports the total
                log.warning("webhook %s (%s): queue full (%d), dropping the oldest events",
                            self.id, self.host, self.queue_size)
        self.queue.append(event)
        return True

    @property
    def pending(self) -> int:
        return len(self.queue) + (1 if self.inflight else 0)

    def public(self) -> dict[str, Any]:
        return {k: self.info.get(k) for k in PUBLIC_FIELDS}


class SubscriptionStore(Protocol):
    """Where subscriptions persist: bridge/store.py's CallStore, or bridge/store_pg.py's (shared)."""

    async def list_webhooks(self) -> builtins.list[dict[str, Any]]: ...

    async def add_webhook(self, url: str, events: builtins.list[str] | None, secret: str,
                          description: str | None = None) -> dict[str, Any]: ...

    async def delete_webhook(self, hook_id: str) -> bool: ...


class WebhookDispatcher:
    """Delivers events to the webhook subscriptions kept in ``store``.

    ``client`` is used for every delivery and is not closed here; it should be dedicated to
    outgoing requests of this kind (its default headers and cookies go to every subscriber).
    Timing: attempt ``n`` (1-based) that fails waits ``min(backoff_max, backoff_base * 2**(n-1))``
    (plus up to 10 % jitter) before the next one; each attempt is bounded by ``timeout`` seconds
    overall (DNS included). ``queue_size`` events wait per subscription, at most. :meth:`close`
    waits up to ``close_timeout`` seconds for queued events to go out.

    ``policy`` decides where deliveries may go (default: ``allow.webhooks``' default, a receiver
    on this host); ``max_webhooks`` caps the number of subscriptions; ``supervisor`` watches the
    delivery workers (default: a private one, so a dispatcher on its own is supervised too).

    ``totals`` counts, over the dispatcher's life (deleted subscriptions included): ``delivered``,
    ``failed`` (given up, refused included), ``refused`` (by the egress policy) and ``dropped``
    (queue overflow, or queued when the subscriber answered 410).
    """

    def __init__(self, store: SubscriptionStore, client: httpx.AsyncClient, *, max_attempts: int = 6,
                 backoff_base: float = 0.5, backoff_max: float = 30.0, queue_size: int = 1000,
                 timeout: float = 10.0, close_timeout: float = 2.0, policy: EgressPolicy | None = None,
                 max_webhooks: int = 50, supervisor: Supervisor | None = None,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        if max_attempts < 1 or queue_size < 1 or max_webhooks < 1:
            raise ValueError("max_attempts, queue_size and max_webhooks must be at least 1")
        self._store = store
        self._client = client
        #: Awaited after a subscription is created or deleted (a cluster tells its other nodes).
        self.on_change = on_change
        self.policy = policy if policy is not None else EgressPolicy()
        self.max_webhooks = max_webhooks
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        self.totals: collections.Counter[str] = collections.Counter()
        self._reserved = 0  # creations between the cap check and the subscription being added
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.queue_size = queue_size
        self.timeout = timeout
        self.close_timeout = close_timeout
        self._subs: dict[str, _Subscription] = {}
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Load the stored subscriptions and start delivering to them."""
        if self._started:
            return
        self._started = True
        for info in await self._store.list_webhooks():
            self._load(info)
        if self._subs:
            log.info("webhooks: %d subscription(s)", len(self._subs))

    async def sync(self) -> None:
        """Reload the subscriptions from the store: another bridge of a cluster, sharing the store,
        created or deleted one (bridge/cluster.py)."""
        if self._closed:
            return
        stored = {info["id"]: info for info in await self._store.list_webhooks()}
        gone = [sub for hook_id, sub in self._subs.items() if hook_id not in stored]
        for sub in gone:
            self._subs.pop(sub.id, None)
        if gone:
            await self._stop(gone)
        for hook_id, info in stored.items():
            if hook_id not in self._subs:
                self._load(info)

    def _load(self, info: dict[str, Any]) -> None:
        """A stored subscription, checked against this bridge's webhook policy."""
        try:
            target, blocked = self.policy.check(info["url"]), None
        except ValueError as exc:  # stored under another policy (or before there was one)
            target, blocked = None, str(exc)
            log.warning("webhook %s (%s): not delivered to: %s (allow.webhooks); delete it or change the "
                        "allowlist", info["id"], _host(info["url"]), exc)
        self._add(info, target, blocked)

    async def close(self) -> None:
        """Give queued deliveries up to ``close_timeout`` seconds, then stop every delivery task."""
        if self._closed:
            return
        self._closed = True
        subs = list(self._subs.values())
        running = [s.task for s in subs if s.task is not None and not s.task.done()]
        if running:
            await asyncio.wait(running, timeout=self.close_timeout)
        lost = sum(s.pending for s in subs)
        if lost:
            log.warning("webhooks: closing with %d event(s) not delivered", lost)
        await self._stop(subs)

    @staticmethod
    async def _stop(subs: builtins.list[_Subscription]) -> None:
        tasks = [s.task for s in subs if s.task is not None and s.task is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ the sink

    def offer(self, event: Event) -> None:
        """EventBus sink: queue ``event`` for every subscription that wants it. Never blocks or raises."""
        if self._closed:
            return
        try:
            for sub in self._subs.values():
                if sub.push(event, self.totals) and (sub.task is None or sub.task.done()):
                    self._spawn(sub)
        except Exception:  # on the media path: a webhook bug must not hurt the call
            log.exception("webhooks: cannot queue %s", getattr(event, "type", event))

    # ------------------------------------------------------------------ subscriptions

    async def create(self, url: str, events: list[str] | None = None, secret: str | None = None,
                     description: str | None = None) -> dict[str, Any]:
        """Validate, persist and start a subscription.

        ``events``: the types to deliver; None or empty means all (stored and returned as
        ``[]``). ``secret``: generated (``secrets.token_urlsafe(32)``) if not given. Raises
        ValueError, with a message saying what is wrong, for: a URL that is not absolute http(s)
        or that the egress policy refuses (its host is resolved here, every address checked),
        an unknown event type, an empty secret, or ``max_webhooks`` subscriptions existing
        already. Returns ``{"id", "url", "events", "description", "created_at", "secret"}`` —
        the only time the secret is handed out.
        """
        if self._closed:
            raise RuntimeError("the webhook dispatcher is closed")
        types = event_types(events)
        if secret is None:
            secret = _secrets.token_urlsafe(32)
        elif not isinstance(secret, str) or not secret:
            raise ValueError("webhook secret must be a non-empty string")
        if len(self._subs) + self._reserved >= self.max_webhooks:
            raise ValueError(f"too many webhook subscriptions ({self.max_webhooks}): delete one first")
        self._reserved += 1  # held across the awaits below, so concurrent creations cannot overshoot
        try:
            target = self.policy.check(url)
            await self.policy.resolve(target)
            info = await self._store.add_webhook(url, types, secret, description)
            self._add(info, target)
        finally:
            self._reserved -= 1
        log.info("webhook %s created for %s (%s)", info["id"], target.origin, ", ".join(types) or "all events")
        await self._changed()
        return {**{k: info[k] for k in PUBLIC_FIELDS}, "secret": secret}

    async def list(self) -> builtins.list[dict[str, Any]]:  # builtins: this class defines list()
        """Every subscription, oldest first: ``{"id", "url", "events", "description", "created_at"}``
        (never the secret)."""
        return [s.public() for s in self._subs.values()]

    async def get(self, hook_id: str) -> dict[str, Any] | None:
        """One subscription (without its secret), or None."""
        sub = self._subs.get(hook_id)
        return sub.public() if sub is not None else None

    async def delete(self, hook_id: str) -> bool:
        """Stop delivering (in-flight and queued events are abandoned) and forget it. True if it existed."""
        sub = self._subs.pop(hook_id, None)
        if sub is not None:
            await self._stop([sub])
        stored = await self._store.delete_webhook(hook_id)
        if sub is not None or stored:
            log.info("webhook %s deleted", hook_id)
            await self._changed()
        return sub is not None or stored

    async def _changed(self) -> None:
        """Tell the other bridges of a cluster (``on_change``), which then :meth:`sync`."""
        if self.on_change is not None:
            try:
                await self.on_change()
            except Exception as exc:  # noqa: BLE001 - the change is stored; the others sync on restart
                log.warning("webhooks: cannot tell the cluster about a changed subscription: %s", exc)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per subscription id: ``delivered``, ``failed`` (given up after every attempt, or
        refused by the egress policy), ``dropped`` (queue overflow) and ``pending`` (queued or in
        flight)."""
        return {s.id: {"delivered": s.delivered, "failed": s.failed, "dropped": s.dropped, "pending": s.pending}
                for s in self._subs.values()}

    def _add(self, info: dict[str, Any], target: Target | None, blocked: str | None = None) -> None:
        sub = _Subscription(info, self.queue_size, target, blocked)
        self._subs[sub.id] = sub

    def _spawn(self, sub: _Subscription) -> None:
        # At most one task per subscription (ordered delivery), and only while it has work.
        task = asyncio.get_running_loop().create_task(self._deliver_loop(sub), name=f"webhook-{sub.id}")
        sub.task = task
        self.supervisor.watch(task, PART, lambda exc: self._respawn(sub, task))

    def _respawn(self, sub: _Subscription, crashed: asyncio.Task[None]) -> None:
        """A worker crashed (the supervisor has logged and counted it): start a fresh one if this
        subscription still exists and has events queued, and no newer worker has been started."""
        if self._closed or sub.task is not crashed or self._subs.get(sub.id) is not sub or not sub.queue:
            return
        log.info("webhook %s (%s): restarting delivery (%d event(s) queued)", sub.id, sub.host, len(sub.queue))
        self._spawn(sub)

    # ------------------------------------------------------------------ delivery

    async def _deliver_loop(self, sub: _Subscription) -> None:
        while sub.queue:
            event = sub.queue.popleft()
            sub.inflight = True
            try:
                gone = await self._deliver(sub, event)
            except asyncio.CancelledError:
                raise
            except BaseException:
                # A bug: the worker ends and the supervisor logs it, counts it and starts a
                # fresh one for the queued events (see _respawn). This event is lost with it.
                self._failed(sub)
                raise
            finally:
                sub.inflight = False
            if gone:
                await self._gone(sub)
                return
        if sub.burst_drops:
            log.warning("webhook %s (%s): caught up; %d event(s) were dropped", sub.id, sub.host, sub.burst_drops)
            sub.burst_drops = 0

    async def deliver(self, name: str, target: Target, secret: str | None, event: Event, *,
                      headers: Mapping[str, str] | None = None,
                      max_attempts: int | None = None) -> tuple[str, int | None]:
        """Deliver one event to ``target`` (checked by :attr:`policy`), outside the subscriptions:
        a profile's ``on_call_end`` hook (bridge/hooks.py). The same wire format, signature (none
        without a ``secret``), egress checks at every attempt, pinning and retries as a
        subscription's delivery, with ``headers`` added (the bridge's own win) and
        ``max_attempts`` (default: the dispatcher's). Not counted in :attr:`totals`; logs name it
        ``name``. Returns (``delivered`` | ``failed`` | ``refused`` | ``gone``, the last HTTP status)."""
        sub = _Subscription({"id": name, "url": target.origin, "secret": secret or "", "events": []}, 1, target)
        sub.headers = dict(headers or {})
        totals: collections.Counter[str] = collections.Counter()
        gone = await self._deliver(sub, event, totals=totals, attempts=max_attempts)
        outcome = "gone" if gone else "refused" if totals["refused"] else "failed" if totals["failed"] else "delivered"
        return outcome, sub.last_status

    async def post(self, target: Target, body: bytes, headers: Mapping[str, str], *,
                   timeout: float) -> tuple[int, bytes]:
        """One POST of ``body`` to ``target`` (checked by :attr:`policy`) under the delivery rules:
        the host resolved and checked now, the request sent to a checked address, no redirects,
        the whole exchange within ``timeout`` seconds, the answer read up to 64 KiB. For a
        profile's ``on_call_start`` hook (bridge/hooks.py), which needs the answer. Returns
        (status, body); raises EgressRefused, ResolveFailed, TimeoutError or an httpx/OS error."""
        # identity: the answer is read raw (aiter_raw), so it must not come compressed.
        status, _retry_after, answer = await self._post(
            target, body, {**headers, "User-Agent": USER_AGENT, "Accept-Encoding": "identity"}, timeout=timeout)
        return status, answer

    async def _deliver(self, sub: _Subscription, event: Event, *, totals: collections.Counter[str] | None = None,
                       attempts: int | None = None) -> bool:
        """Deliver one event with retries (bridge/retry.py). Returns True if the subscriber
        answered 410 Gone. ``totals``/``attempts``: for :meth:`deliver` (default: the dispatcher's)."""
        totals = self.totals if totals is None else totals
        attempts = self.max_attempts if attempts is None else attempts
        # Serialised once: every attempt sends (and signs) exactly the same bytes.
        body = json.dumps(event.as_dict(), ensure_ascii=False, separators=(",", ":"), default=str).encode()

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.info("webhook %s (%s): event %s attempt %d/%d failed (%s); retrying in %.1f s", sub.id,
                     sub.host, event.id, state.attempt_number, attempts, exc, state.upcoming_sleep)

        policy = retrying(
            attempts=attempts,
            backoff=Backoff(self.backoff_base, self.backoff_max, BACKOFF_JITTER, retry_after=_asked_wait),
            retry=retry_if_exception_type(_AttemptFailed),
            before_sleep=log_retry,
        )
        gone = False
        try:
            async for attempt in policy:
                with attempt:
                    gone = await self._attempt(sub, event, body)
        except EgressRefused as exc:
            # Permanent: the host now resolves somewhere deliveries may not go. Retrying
            # would only knock on that door again.
            self._failed(sub, totals)
            totals["refused"] += 1
            log.warning("webhook %s (%s): event %s (%s) not delivered: %s", sub.id, sub.host, event.id,
                        event.type, exc)
            return False
        except _AttemptFailed as exc:
            self._failed(sub, totals)
            log.warning("webhook %s (%s): gave up on event %s (%s) after %d attempt(s); last: %s", sub.id,
                        sub.host, event.id, event.type, attempts, exc)
            return False
        if not gone:
            sub.delivered += 1
            totals["delivered"] += 1
        return gone

    async def _attempt(self, sub: _Subscription, event: Event, body: bytes) -> bool:
        """One attempt. True if the subscriber answered 410 Gone, False if 2xx; raises
        :class:`_AttemptFailed` for anything worth retrying and EgressRefused for a refusal."""
        timestamp = str(int(time.time()))  # per attempt: receivers' replay windows see a fresh one
        headers = {
            **sub.headers,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Voxbridge-Event": event.type,
            "X-Voxbridge-Event-Id": event.id,
        }
        if sub.secret:  # always, for subscriptions; a call hook may have no secret
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(sub.secret, timestamp, body)
        sub.last_status = None
        try:
            assert sub.target is not None  # blocked subscriptions are never queued to
            status, retry_after, _answer = await self._post(sub.target, body, headers)
        except ResolveFailed as exc:
            raise _AttemptFailed(str(exc)) from None
        except EgressRefused:
            raise
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            raise _AttemptFailed(type(exc).__name__) from None
        sub.last_status = status
        if 200 <= status < 300:
            return False
        if status == 410:
            return True
        raise _AttemptFailed(f"HTTP {status}", _retry_after(retry_after))

    def _failed(self, sub: _Subscription, totals: collections.Counter[str] | None = None) -> None:
        sub.failed += 1
        (self.totals if totals is None else totals)["failed"] += 1

    async def _post(self, target: Target, body: bytes, headers: Mapping[str, str],
                    timeout: float | None = None) -> tuple[int, str | None, bytes]:
        """One attempt: resolve and check the host, then POST to the first checked address that
        accepts a connection. Raises EgressRefused, ResolveFailed or a transport error."""
        timeout = self.timeout if timeout is None else timeout
        # asyncio.timeout bounds the whole exchange, DNS included; httpx's timeout alone is per
        # read, so a subscriber trickling bytes could otherwise hold its queue for ever.
        async with asyncio.timeout(timeout):
            addrs = await self.policy.resolve(target)
            for i, addr in enumerate(addrs):
                try:
                    return await self._post_to(target, addr, body, headers, timeout)
                except httpx.ConnectError:  # nothing sent yet: the next address (localhost: ::1, then 127.0.0.1)
                    if i == len(addrs) - 1:
                        raise
        raise AssertionError("unreachable: resolve() returns at least one address")

    async def _post_to(self, target: Target, addr: IPAddress, body: bytes, headers: Mapping[str, str],
                       timeout: float) -> tuple[int, str | None, bytes]:
        # Pinned: connect to the address that was just checked, never to whatever the name
        # resolves to a moment later (DNS rebinding). The name still goes in Host and, for https,
        # in the SNI, against which httpx verifies the certificate.
        headers = {**headers, "Host": target.authority}
        extensions: dict[str, Any] = {}
        if target.scheme == "https" and target.ip is None:
            extensions["sni_hostname"] = target.host
            # The connection pool knows connections by address only: without this, a connection
            # verified for one name could carry a request meant for another name on that address.
            headers["Connection"] = "close"
        async with self._client.stream("POST", target.pinned_url(addr), content=body, headers=headers,
                                       timeout=timeout, follow_redirects=False, extensions=extensions) as resp:
            answer = bytearray()
            async for chunk in resp.aiter_raw():
                answer += chunk
                if len(answer) > MAX_RESPONSE_BYTES:  # nobody needs more; stop (the connection is discarded)
                    del answer[MAX_RESPONSE_BYTES:]
                    break
            return resp.status_code, resp.headers.get("retry-after"), bytes(answer)

    async def _gone(self, sub: _Subscription) -> None:
        """410 Gone: the subscriber asked to be unsubscribed."""
        if self._subs.get(sub.id) is sub:
            del self._subs[sub.id]
        sub.dropped += len(sub.queue)
        self.totals["dropped"] += len(sub.queue)
        sub.queue.clear()
        log.warning("webhook %s (%s) answered 410 Gone: subscription removed", sub.id, sub.host)
        try:
            await self._store.delete_webhook(sub.id)
        except Exception:  # e.g. the store is closing; it is gone from memory already
            log.exception("webhook %s: cannot remove it from the store", sub.id)
