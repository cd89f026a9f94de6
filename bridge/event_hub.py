"""Call events: one bus, feeding the call history, the webhooks and the API's live stream.

Sessions and the outbound dialer publish on the :class:`~bridge.events.EventBus`; this part
owns what the bus feeds: the call-history store (bridge/store.py), the webhook dispatcher
(bridge/webhooks.py, with its own HTTP client: the tools' client carries tool-specific defaults),
and, through :meth:`EventBus.subscribe`, the API's ``/v1/events`` stream. It starts them in
order (the dispatcher reads its subscriptions from the store) and closes them in reverse, after
the calls, so every call's ``call.ended`` gets a chance to go out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httpx

from .config import Config
from .egress import EgressPolicy
from .events import EventBus
from .store import CallStore
from .supervise import Supervisor

if TYPE_CHECKING:
    from .store_pg import PostgresCallStore
from .webhooks import WebhookDispatcher

#: 6 attempts, waits of 2+4+8+16+30 s: a subscriber down for about a minute misses nothing.
WEBHOOK_ATTEMPTS = 6
WEBHOOK_BACKOFF_BASE_S = 2.0


class EventHub:
    def __init__(self, config: Config, supervisor: Supervisor, bus: EventBus | None = None, *,
                 webhooks_from_bus: bool = True, node: str | None = None) -> None:
        self.config = config
        #: This bridge's cluster node id (stamped on its calls in a shared history), or None.
        self.node = node
        #: False in a cluster: the webhooks are fed from the shared stream (bridge/cluster.py), so
        #: each event goes out once across the nodes.
        self.webhooks_from_bus = webhooks_from_bus
        self.supervisor = supervisor
        self.bus = bus or EventBus()
        self.store: CallStore | PostgresCallStore | None = None
        self.webhooks: WebhookDispatcher | None = None
        self._http: httpx.AsyncClient | None = None
        #: What close() must close, in that order; each part is added as soon as it is started,
        #: so a start() that fails half-way is closed as far as it got.
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        cfg = self.config
        if cfg.store.postgres_url is not None:
            from .store_pg import PostgresCallStore  # asyncpg: the 'cluster' extra, imported only when used

            self.store = PostgresCallStore(cfg.store.postgres_url.get_secret_value(), cfg.store.redact_args,
                                           retention_days=cfg.store.retention_days, supervisor=self.supervisor,
                                           node=self.node)
        else:
            self.store = CallStore(cfg.store.path, cfg.store.redact_args, retention_days=cfg.store.retention_days,
                                   supervisor=self.supervisor)
        await self.store.start()
        self._closers.append(self.store.close)
        self.bus.add_sink(self.store.record)
        self._http = httpx.AsyncClient(follow_redirects=False, timeout=10.0)
        self._closers.append(self._http.aclose)
        self.webhooks = WebhookDispatcher(self.store, self._http, max_attempts=WEBHOOK_ATTEMPTS,
                                          backoff_base=WEBHOOK_BACKOFF_BASE_S,
                                          policy=EgressPolicy(cfg.allow.webhooks), max_webhooks=cfg.api.max_webhooks,
                                          supervisor=self.supervisor)
        await self.webhooks.start()
        self._closers.insert(0, self.webhooks.close)  # first: delivery may still read the store
        if self.webhooks_from_bus:
            self.bus.add_sink(self.webhooks.offer)

    async def close(self) -> None:
        """Webhooks first (they may still read the store), then the store, then the client.
        Each is taken off the hub before it is awaited: a concurrent close() closes nothing twice."""
        closers, self._closers = self._closers, []
        self.webhooks = self.store = self._http = None
        for close in closers:
            await close()
