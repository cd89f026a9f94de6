"""The states of one call and the transitions allowed between them, in one table.

A call used to be a handful of flags (``answered``, "ending after speech", "an end reason is
set", "ended"), so "may this happen now?" had as many answers as there were flags. It is now one
:class:`CallState`, moved only through :class:`CallStateMachine.to`, which checks the move against
:data:`TRANSITIONS` (the style of h11's connection states: the table is the specification).

Normal path::

    RESOLVING ─▶ CONNECTING ─▶ ACTIVE ─▶ DRAINING ─▶ ENDING ─▶ ENDED
                      │           │          │          ▲
                      └──────▶ FALLING_BACK ◀┘──────────┘

* ``RESOLVING``: the caller's UUID arrived (silence already flows); settings are being read
  (API request, the channel's variables over AMI).
* ``CONNECTING``: the gateway connection is being opened; caller audio is held.
* ``ACTIVE``: audio flows both ways, tools run.
* ``DRAINING``: ending after the AI's current sentence (queued speech plays out first).
* ``FALLING_BACK``: the gateway failed; the caller hears the fallback, then the call ends.
* ``ENDING``: teardown in progress (an end reason is set).
* ``ENDED``: everything the call owned is released.

An invalid transition is a bug in the bridge, never the peer's doing (the peers' protocol errors
are handled by bridge/audiosocket.py and the gateway adapters). h11 raises on every invalid
transition; here it raises only when ``VOXBRIDGE_STRICT_STATE=1`` (the test suite sets it in
tests/conftest.py, for itself and the bridges it starts in child processes). In production it is
logged at error with a stack and the move is made anyway: the moves into ``ENDING`` and
``ENDED`` are what release the caller's leg and the call's slot, and refusing one would leave a
caller in dead air for the sake of a diagnosis.
"""

from __future__ import annotations

import enum
import logging
import os

log = logging.getLogger("voxbridge.call")


class CallState(enum.Enum):
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    ACTIVE = "active"
    DRAINING = "draining"
    FALLING_BACK = "falling-back"
    ENDING = "ending"
    ENDED = "ended"


S = CallState

#: Every allowed move; anything else is an :class:`InvalidTransition`.
TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    S.RESOLVING: frozenset({S.CONNECTING, S.ENDING}),
    # DRAINING before ACTIVE: a DTMF shortcut's tool may end the call while the gateway connects.
    S.CONNECTING: frozenset({S.ACTIVE, S.DRAINING, S.FALLING_BACK, S.ENDING}),
    S.ACTIVE: frozenset({S.DRAINING, S.FALLING_BACK, S.ENDING}),
    # FALLING_BACK from DRAINING: the gateway fails while the AI's goodbye plays out.
    S.DRAINING: frozenset({S.FALLING_BACK, S.ENDING}),
    # DRAINING from FALLING_BACK: a tool still running ends the call after the fallback message.
    S.FALLING_BACK: frozenset({S.DRAINING, S.ENDING}),
    S.ENDING: frozenset({S.ENDED}),
    S.ENDED: frozenset(),
}

#: States in which the call is over or on its way out: nothing new may start.
FINISHING = frozenset({S.ENDING, S.ENDED})


class InvalidTransition(RuntimeError):
    """A move the table does not allow (a bug in the bridge)."""

    def __init__(self, call_id: str, old: CallState, new: CallState) -> None:
        super().__init__(f"call {call_id}: {old.name} → {new.name} is not an allowed transition")
        self.old, self.new = old, new


def strict() -> bool:
    """Raise on an invalid transition (tests) rather than log it (production)."""
    return os.environ.get("VOXBRIDGE_STRICT_STATE", "") not in ("", "0")


class CallStateMachine:
    """The current :class:`CallState` of one call; :meth:`to` is the only way to change it."""

    __slots__ = ("call_id", "state")

    def __init__(self, call_id: str, state: CallState = S.RESOLVING) -> None:
        self.call_id = call_id
        self.state = state

    def can(self, new: CallState) -> bool:
        return new in TRANSITIONS[self.state]

    def to(self, new: CallState) -> None:
        """Move to ``new``; raises :class:`InvalidTransition` if the table forbids it (see module doc)."""
        old = self.state
        if new not in TRANSITIONS[old]:
            exc = InvalidTransition(self.call_id, old, new)
            if strict():
                raise exc
            log.error("%s (moving anyway)", exc, stack_info=True)
        self.state = new

    def __repr__(self) -> str:
        return f"<CallStateMachine {self.call_id} {self.state.name}>"
