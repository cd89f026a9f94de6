"""Test doubles shared by the unit and integration tests."""

from __future__ import annotations

from typing import Any

from tools.base import ChannelInfo


class FakeCall:
    """A ``tools.base.CallControl`` double: what a tool sees of its call, and what it did to it.

    ``context()`` is derived from the fields, the way the session derives it, so a test sets a
    value once and asserts on it wherever it travels (HTTP tool bodies, events).
    """

    def __init__(self, call_id: str = "call-1", *, profile: str = "default", direction: str = "inbound",
                 caller: str = "", caller_name: str = "", called: str = "", channel_name: str | None = None,
                 channel: ChannelInfo | None = None, variables: dict[str, str] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self.call_id = call_id
        self.profile_name = profile
        self.direction = direction
        self.caller, self.caller_name, self.called = caller, caller_name, called
        self.channel_name = channel_name
        self.channel = channel
        self.variables = dict(variables or {})
        self.metadata = dict(metadata or {})
        self.playout_pending_ms = 0
        self.ended: list[tuple[str, bool]] = []
        self.handoff: str | None = None

    async def wait_playout(self, max_wait: float) -> None:
        return None

    def end(self, reason: str, *, after_speech: bool = True) -> None:
        self.ended.append((reason, after_speech))

    def note_handoff(self, reason: str | None) -> None:
        self.handoff = reason

    def context(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "profile": self.profile_name, "direction": self.direction,
                "caller": self.caller, "caller_name": self.caller_name, "called": self.called,
                "channel": self.channel_name, "variables": dict(self.variables), "metadata": dict(self.metadata)}


class MemoryLeg:
    """A ``bridge.leg.CallerLeg`` in memory: a caller with no socket at all.

    The test feeds the caller's side with :meth:`say`, :meth:`press` and :meth:`hang_up`, and
    reads what the call played in :attr:`frames`. It proves a second ingress is a second
    implementation of the leg, not a fork of the session (tests/integration/test_caller_leg.py).
    """

    def __init__(self, rate: int = 8000) -> None:
        self.rate = rate
        self.listener: Any = None  # the session, once the call is open
        self.frames: list[bytes] = []
        self.hung_up = False
        self.aborted = False

    # -- the CallerLeg

    def send_frame(self, pcm: bytes) -> bool:
        if self.hung_up or self.aborted:
            return False
        self.frames.append(pcm)
        return True

    def hangup(self) -> None:
        self.hung_up = True

    def abort(self) -> None:
        self.aborted = True

    # -- the caller's side

    def say(self, pcm: bytes) -> None:
        """Deliver ``pcm`` (s16le at :attr:`rate`) in 20 ms frames, as a leg does."""
        n = self.rate * 2 // 50
        for i in range(0, len(pcm) - n + 1, n):
            self.listener.on_caller_audio(pcm[i:i + n])

    def press(self, digit: str) -> None:
        self.listener.on_dtmf(digit)

    def hang_up(self) -> None:
        self.listener.on_caller_gone("caller-hangup")
