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
