"""The interface every gateway adapter implements, and the events it yields.

A session talks to "a gateway" only through :class:`Gateway`; which protocol is on the wire
(AillomVox today, others through further adapters) is the adapter's business. Events are
plain dataclasses: the adapter parses and validates, the session only dispatches. Which adapter
a call gets is decided in one place, bridge/gateway/factory.py, so a second protocol is a new
adapter there and no change to the session. Adapters never run tools: a :class:`ToolCall` goes
to the session's router, and its answer comes back through :meth:`Gateway.send_tool_result`.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SessionSetup:
    """Everything the gateway needs to start talking to one caller."""

    provider: str
    sample_rate: int
    system_prompt: str
    voice: str | None = None
    language: str | None = None
    first_message: str | None = None
    farewell_message: str | None = None
    max_duration: int = 300
    #: ``{"name", "description", "parameters"}`` (JSON Schema) for each tool the AI may call.
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: The caller's leg rate (Hz). An adapter that picks its own wire format uses it (OpenAI
    #: Realtime speaks G.711 µ-law to an 8 kHz call: no resampling at all).
    caller_rate: int = 8000


@dataclass(frozen=True, slots=True)
class AudioOut:
    """AI speech, s16le mono at the session's gateway sample rate."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class Transcript:
    role: str
    text: str
    final: bool


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    args: dict[str, Any]
    #: Set when the message was a tool_call we could not fully parse; the router still
    #: answers it (exactly once) with this as the error.
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class ClearPlayback:
    """Barge-in: drop everything queued for the caller now."""


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """The AI finished a response (informational: audio may still be playing to the caller)."""


@dataclass(frozen=True, slots=True)
class RemoteHangup:
    """The gateway ended the session."""


@dataclass(frozen=True, slots=True)
class RemoteError:
    message: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is gone. ``clean`` is False for drops and protocol failures."""

    code: int | None
    reason: str
    clean: bool


GatewayEvent = (AudioOut | Transcript | ToolCall | ClearPlayback | ResponseDone | RemoteHangup | RemoteError
                | Closed)


#: What :meth:`Gateway.deliver` hands each event to: it handles the event at once and returns
#: ``None``, or returns an awaitable that must finish before the next event is handed over
#: (e.g. a fallback after an error).
EventHandler = Callable[[GatewayEvent], Awaitable[None] | None]
async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished, re-raising what it failed with (other than
    its cancellation) — without swallowing a cancellation of the caller's own.

    ``task.cancel(); try: await task; except CancelledError: pass`` cannot tell the two apart:
    if the caller is cancelled while it waits, awaiting the task raises the task's cancellation,
    the ``except`` eats it and the caller carries on as if it had never been cancelled.
    """
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc


#: What a session may hand :meth:`Gateway.deliver` for the AI's audio alone (see there).
AudioHandler = Callable[[bytes], None]

#: Longest the downlink hands one gateway's events over without giving the event loop a turn: a
#: gateway that floods (1500 tool calls in one burst) must not hold every call's playout meanwhile.
DOWNLINK_SLICE_S = 0.004


class GatewayError(Exception):
    """The gateway could not be reached or refused the session."""


#: Mid-call commands an adapter may support (declared in :attr:`Gateway.capabilities`):
#: ``context`` — :meth:`Gateway.add_context`, instructions added to the live conversation;
#: ``say`` — :meth:`Gateway.say`, the AI speaks a text now;
#: ``tools`` — :meth:`Gateway.set_tools`, the tools the AI may call are replaced.
GATEWAY_COMMANDS = frozenset({"context", "say", "tools"})
#: Commands the session carries out itself, whatever the protocol: ``mute`` (the caller's audio is
#: replaced by silence towards the AI) and ``tag`` (metadata on every later event of the call).
BRIDGE_COMMANDS = frozenset({"mute", "tag"})
#: Every mid-call command, in the order the API lists them.
COMMANDS = ("context", "say", "tools", "mute", "tag")


class CommandUnsupported(Exception):
    """The gateway's protocol has no way to carry out a mid-call command (the API answers 409)."""

    def __init__(self, protocol: str, command: str) -> None:
        super().__init__(f"the {protocol} AI backend cannot do '{command}' mid-call "
                         "(its protocol has no message for it)")
        self.protocol = protocol
        self.command = command


class CommandUnavailable(Exception):
    """A mid-call command this call cannot take now, whatever its protocol (still connecting, ending)."""


class Gateway(abc.ABC):
    """One AI conversation. Created per call; never reused.

    Life cycle: [``preconnect``] → ``connect`` → (``send_audio`` / ``send_tool_result``)* and
    ``events()`` → ``hangup`` or a :class:`Closed` / :class:`RemoteHangup` event → ``close``.
    ``send_*`` never raise on a dead connection: they drop and the event stream reports
    :class:`Closed`, so the session has one place to learn that the gateway is gone.

    Rates: :meth:`send_audio` takes s16le at :attr:`sample_rate`, :class:`AudioOut` carries
    s16le at :attr:`output_rate` (``None``: the same); both are final once :meth:`connect`
    returned, and the session resamples to and from the caller's rate as needed.

    Voice activity: :attr:`local_vad` is ``None`` when the AI service detects the caller's speech
    itself (and says so with :class:`ClearPlayback`). Otherwise it holds the settings
    (:class:`bridge.vad.VadSettings`) of the detector the session runs on the caller's audio;
    the session then clears the playout itself when the caller starts speaking over the AI and
    tells the adapter through :meth:`caller_speech_started` / :meth:`caller_speech_stopped`.
    """

    sample_rate: int = 8000
    output_rate: int | None = None
    local_vad: Any = None
    #: Seconds of this gateway's audio the caller has heard so far, counting what a barge-in
    #: dropped (a position in the stream of :class:`AudioOut`). Set by the session before
    #: :meth:`connect`; adapters that must tell the service where the caller interrupted
    #: (OpenAI Realtime's ``conversation.item.truncate``) read it.
    playout_position: Callable[[], float] | None = None
    #: The name used in log lines and in the API's 409 for a command this protocol cannot do.
    protocol_name: str = "gateway"
    #: True once :meth:`connect` configured a connection opened by :meth:`preconnect` (its own or
    #: one it took over), rather than opening one itself: the call's ``preconnect_used``.
    used_preconnect: bool = False
    #: The mid-call commands of :data:`GATEWAY_COMMANDS` this protocol can carry out. A command not
    #: in it is refused (:class:`CommandUnsupported`), never silently dropped.
    capabilities: frozenset[str] = frozenset()

    def add_context(self, text: str) -> None:
        """Add instructions or facts to the live conversation (``"context"``), without a spoken
        answer of their own: the AI takes them into account from its next turn. Queued, in order
        with the call's other control messages; never blocks."""
        raise CommandUnsupported(self.protocol_name, "context")

    def say(self, text: str) -> None:
        """Make the AI say ``text`` to the caller now (``"say"``), as its own words."""
        raise CommandUnsupported(self.protocol_name, "say")

    def set_tools(self, tools: list[dict[str, Any]]) -> None:
        """Replace the tools the AI may call (``"tools"``): ``{"name", "description", "parameters"}``
        each, as in :attr:`SessionSetup.tools`. An empty list leaves it none."""
        raise CommandUnsupported(self.protocol_name, "tools")

    def caller_speech_started(self, heard_s: float) -> None:  # noqa: B027 - an optional hook
        """The bridge's own detector heard the caller start speaking. The session has cleared the
        playout already; ``heard_s`` is where the caller was in this gateway's audio just before
        (what :attr:`playout_position` said then). Optional: the default does nothing."""

    def caller_speech_stopped(self) -> None:  # noqa: B027 - an optional hook
        """The bridge's own detector heard the caller stop speaking. Optional: the default does nothing."""

    @property
    def endpoint(self) -> Hashable | None:
        """Where :meth:`preconnect` opens its connection: everything its handshake carries (protocol,
        URI, request headers, connection options), as a value to compare, never to log (it may hold
        a credential). ``None``: this adapter does not preconnect."""
        return None

    async def preconnect(self) -> None:  # noqa: B027 - an optional hook
        """Open the transport now, before the call's settings are known — the handshake only: nothing
        of the call is sent (the settings may still pick another gateway). :meth:`connect` then sends
        the opening messages on it if it is still open, or connects afresh. Under load a call's AMI
        channel can take seconds to arrive; the handshake (100–300 ms to a real service) runs
        meanwhile instead of after. Raises :class:`GatewayError` like :meth:`connect`; the caller
        treats that as "connect normally later". Optional: the default does nothing."""

    def take_preconnected(self, other: Gateway) -> bool:
        """Take over ``other``'s preconnected connection, before :meth:`connect`, if it leads where
        this gateway would connect (equal :attr:`endpoint`) and nothing was sent on it: then
        :meth:`connect` uses it. The settings may have picked another gateway entry with the same
        endpoint (say, other VAD settings), so the connection moves, not the adapter. True if taken;
        ``other`` keeps nothing to close then. Default: never (False)."""
        return False

    @abc.abstractmethod
    async def connect(self, setup: SessionSetup) -> None:
        """Open the connection (or use the preconnected one) and send the session configuration.
        Raises GatewayError."""

    @abc.abstractmethod
    def send_audio(self, pcm: bytes) -> None:
        """Queue caller audio (s16le at ``sample_rate``). Non-blocking, bounded."""

    def send_held_audio(self, frames: list[bytes]) -> None:
        """Caller audio the session held while the call was being set up (settings, correlation,
        connect: up to ``bridge.session.PRECONNECT_HOLD_S`` of it), in order, right after
        :meth:`connect`. Unlike :meth:`send_audio`'s, this backlog is the caller's first words
        and is not trimmed to the adapter's usual bounds. Default: :meth:`send_audio` each frame."""
        for pcm in frames:
            self.send_audio(pcm)

    @abc.abstractmethod
    async def send_tool_result(self, call_id: str, result: str) -> None: ...

    @abc.abstractmethod
    async def hangup(self) -> None:
        """Tell the gateway the call is over and close."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[GatewayEvent]:
        """Events in arrival order; ends after yielding :class:`Closed`."""

    #: :meth:`deliver` takes the ``audio`` handler: an adapter that overrides ``deliver`` with
    #: the older one-argument signature leaves this False and keeps working.
    takes_audio_handler = False

    async def deliver(self, handle: EventHandler, audio: AudioHandler | None = None) -> None:
        """Hand every event to ``handle``, in arrival order, until :class:`Closed` (the last one);
        return then. What the session runs for the life of the gateway.

        ``audio``, if given, is what an :class:`AudioOut` means to the session, as a plain
        function of its PCM: an adapter may call it instead of building the event (50 times a
        second while the AI speaks), in the same order with the other events. This default does
        not: every event goes to ``handle``.

        This default drives :meth:`events`; an adapter whose wire can call ``handle`` straight
        from its connection's callbacks (bridge/gateway/ws.py) overrides it and saves a task
        switch per message.
        """
        loop = asyncio.get_running_loop()
        slice_end = loop.time() + DOWNLINK_SLICE_S
        async for event in self.events():
            if loop.time() >= slice_end:
                await asyncio.sleep(0)
                slice_end = loop.time() + DOWNLINK_SLICE_S
            pending = handle(event)
            if pending is not None:
                await pending
            if isinstance(event, Closed):
                return

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything. Idempotent."""

    @property
    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters: frames/bytes each way, dropped frames."""
