"""The call registry: the calls in progress, the capacity, the calls waiting for their leg.

One per bridge. A call is admitted here when its caller's leg delivers the UUID (refused if one
with that UUID is in progress, or at ``audiosocket.max_calls``), and leaves when its teardown is
done. Calls started through the API wait in :attr:`CallRegistry.pending` (their settings, by
UUID) until their leg connects. The registry also remembers the UUIDs of recently ended calls,
so the API can tell "ended" (409) from "never existed" (404).

This is the single-process registry; a cluster would share one behind the same methods
(see the "Where state lives" seam in the design).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from tools.base import ChannelInfo

#: How many ended calls' UUIDs are remembered (oldest forgotten first).
KNOWN_ENDED_MAX = 10000


@dataclass
class CallSettings:
    """Per-call choices, from (in order) the API request, the dialplan, the defaults."""

    profile: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # prompt, first_message, voice, …
    channel: ChannelInfo | None = None
    direction: str = "inbound"
    refuse: str | None = None  # set to refuse the call (unknown UUID under a strict policy)


class EventPublisher(Protocol):
    """Where call events go (bridge/events.py's EventBus: on to the store, webhooks, live streams)."""

    def publish(self, type: str, call_id: str, **data: Any) -> Any: ...


class _Call(Protocol):
    call_id: str


C = TypeVar("C", bound=_Call)


class CallRegistry(Generic[C]):
    """Live calls by UUID, under a capacity."""

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self.live: dict[str, C] = {}
        #: Calls started through the API, waiting for their leg (by UUID).
        self.pending: dict[str, CallSettings] = {}
        self.known_ended: collections.OrderedDict[str, None] = collections.OrderedDict()

    def refusal(self, call_id: str) -> str | None:
        """Why a new call with this UUID cannot be admitted now, or None."""
        if call_id in self.live:
            return "a call with this UUID is already in progress"
        if len(self.live) >= self.max_calls:
            return f"at capacity ({self.max_calls} calls)"
        return None

    def add(self, call: C) -> None:
        self.live[call.call_id] = call

    def ended(self, call: C) -> None:
        """The call's teardown is done: it no longer counts against the capacity."""
        self.live.pop(call.call_id, None)
        self.known_ended[call.call_id] = None
        while len(self.known_ended) > KNOWN_ENDED_MAX:
            self.known_ended.popitem(last=False)

    def take_pending(self, call_id: str) -> CallSettings | None:
        """The API request that started this call, if any (once)."""
        return self.pending.pop(call_id, None)

    def get(self, call_id: str) -> C | None:
        return self.live.get(call_id)

    def __len__(self) -> int:
        return len(self.live)
