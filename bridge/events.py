"""Call events: what happened on a call, for the call history, webhooks and the live stream.

``publish`` is synchronous and never blocks: it is called from the media path (the session),
so delivery happens elsewhere, from bounded per-subscriber queues. A subscriber that falls
behind loses its oldest events (counted), never the caller's audio.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("voxbridge.events")

EVENT_TYPES = (
    "call.started",
    "call.answered",
    "transcript",
    "tool.called",
    "tool.completed",
    "dtmf",
    "barge_in",
    "call.ended",
    "call.failed",
    "hook.completed",
    # mid-call commands (bridge/session.py) and the silence watchdog
    "call.context",
    "call.say",
    "call.tools",
    "call.muted",
    "call.unmuted",
    "call.tagged",
    "silence.detected",
    "silence.hangup",
)


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    call_id: str
    data: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts: float = field(default_factory=time.time)
    seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "call_id": self.call_id, "ts": self.ts, "seq": self.seq,
                "data": self.data}


class Subscription:
    """A bounded queue of events; ``get()`` awaits the next one."""

    def __init__(self, bus: EventBus, maxsize: int, filter: Callable[[Event], bool] | None) -> None:
        self._bus = bus
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.filter = filter
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.filter is not None and not self.filter(event):
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def close(self) -> None:
        self._bus._subs.discard(self)


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._sinks: list[Callable[[Event], None]] = []

    def subscribe(self, maxsize: int = 1000, filter: Callable[[Event], bool] | None = None) -> Subscription:
        sub = Subscription(self, maxsize, filter)
        self._subs.add(sub)
        return sub

    def add_sink(self, sink: Callable[[Event], None]) -> None:
        """A synchronous consumer (must be cheap and must not raise; e.g. the store's queue)."""
        self._sinks.append(sink)

    def publish(self, type: str, call_id: str, **data: Any) -> Event:
        event = Event(type, call_id, data, seq=next(self._seq))
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:  # deliberately broad: a broken consumer must not break the call
                log.exception("event sink failed on %s", type)
        for sub in list(self._subs):
            sub.offer(event)
        return event

    def deliver_remote(self, event: Event) -> None:
        """Another cluster node's event (bridge/cluster.py): to the live subscriptions only; the
        sinks (history, webhooks, metrics) got it on the node that owns the call."""
        for sub in list(self._subs):
            sub.offer(event)
