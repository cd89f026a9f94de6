"""Test doubles shared by the unit and integration tests."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.ami import AmiClient, AmiMessage, AmiParser
from tools.base import ChannelInfo

#: What Asterisk says first on an AMI connection.
AMI_BANNER = b"Asterisk Call Manager/11.0.0\r\n"


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


class FakeAsterisk:
    """A tiny AMI server on loopback: banner, Login, Ping, and per-action scripted answers.

    ``answers[action]`` is a function ``(message) -> bytes | None`` (None: no answer). Every action
    received is kept, per connection, in ``actions``; ``changed`` is set on every arrival (and by
    test hooks), so ``until`` re-checks its condition whenever something happened.
    """

    def __init__(self, secret: str = "s3cret") -> None:
        self.secret = secret
        self.answer_pings = True
        self.answers: dict[str, Any] = {}
        self.actions: list[list[AmiMessage]] = []  # per connection
        self.writers: list[asyncio.StreamWriter] = []
        self.changed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeAsterisk:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.drop()
        self.server.close()
        await self.server.wait_closed()

    def client(self, secret: str | None = None, **kw) -> AmiClient:
        kw.setdefault("backoff_min", 0.01)
        kw.setdefault("backoff_max", 0.05)
        return AmiClient("127.0.0.1", self.port, "vb", self.secret if secret is None else secret, **kw)

    def drop(self) -> None:
        """Asterisk goes away (RST): every connection ends at once."""
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    def send_event(self, **fields: str) -> None:
        """Push an event to every connected client, as Asterisk does (``Event`` first)."""
        data = reply(None, **fields)
        for w in self.writers:
            w.write(data)

    def received(self, action: str) -> list[AmiMessage]:
        return [m for conn in self.actions for m in conn if m.get("Action") == action]

    async def until(self, predicate, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        mine: list[AmiMessage] = []
        self.actions.append(mine)
        parser = AmiParser()
        parser.feed(b"client side\r\n")
        writer.write(AMI_BANNER)
        try:
            while data := await reader.read(65536):
                for m in parser.feed(data):
                    mine.append(m)
                    answer = self._answer(m)
                    if answer:
                        writer.write(answer)
                    self.changed.set()
        except ConnectionError:
            pass
        finally:
            self.changed.set()
            writer.close()

    def _answer(self, m: AmiMessage) -> bytes | None:
        action, aid = m["Action"], m.action_id
        if action == "Login":
            ok = m.get("Secret") == self.secret
            return reply(aid, Response="Success" if ok else "Error",
                         Message="Authentication accepted" if ok else "Authentication failed")
        if action == "Ping":
            return reply(aid, Response="Success", Ping="Pong") if self.answer_pings else None
        if action in self.answers:
            return self.answers[action](m)
        return reply(aid, Response="Success")


def reply(action_id: str | None, **fields) -> bytes:
    lines = [f"{k}: {v}" for k, v in fields.items()]
    if action_id is not None:
        lines.insert(1, f"ActionID: {action_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
