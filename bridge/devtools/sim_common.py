"""The plumbing the reference simulators share (gateway_sim, sim_generic_ws, sim_openai, sim_aivoco).

Only what is the same in every protocol lives here: a session's waiting machinery (``_wait_for`` /
``_notify`` and the ``wait_*`` methods of the common scripting interface), its tasks, its recorded
messages and caller audio, the bookkeeping of the tool calls it makes (futures, deadlines, the
violations for unknown or repeated results), the server's session hand-out (``next_session``) and
the CLI's ``--listen`` / ``--api-key`` options. Each simulator module keeps its protocol. Like the
simulators, this module imports nothing from the bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import hmac
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import Protocol as WsProtocol
from websockets.protocol import State

if TYPE_CHECKING:
    from .gateway_sim import Scenario, ScenarioStep

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
MAX_CLOSE_REASON_BYTES = 123
MAX_MESSAGE_TYPES = 64  # distinct client message types kept for wait_message (bounded memory)


class ArrivalStamped(ServerConnection):
    """A server connection that notes when its latest bytes reached this process (``rx_at``,
    ``time.monotonic()``), before websockets' parser and the hop to the session's coroutine: the
    receive time a simulator stamps (bench echo mode), so what it measures of the client is not
    its own event loop's backlog. A message handed over after a later read carries that read's
    time — later than its own arrival, never earlier."""

    rx_at = 0.0

    def data_received(self, data: bytes) -> None:
        self.rx_at = time.monotonic()
        super().data_received(data)


class SessionClosed(Exception):
    """The session's WebSocket is closed (or closing); nothing more can be sent or awaited."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def close_reason(text: str) -> str:
    """``text`` cut to the 123-byte limit RFC 6455 sets on a close reason."""
    raw = text.encode("utf-8")
    if len(raw) <= MAX_CLOSE_REASON_BYTES:
        return text
    return raw[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


def key_accepted(accepted_keys: frozenset[str] | None, key: str) -> bool:
    """``key`` is one of ``accepted_keys`` (None: any non-empty key), compared in constant time per key."""
    if accepted_keys is None:
        return bool(key)
    given = key.encode()
    return any([hmac.compare_digest(given, k.encode()) for k in accepted_keys])  # noqa: C419 - a list, so every key is compared (no early exit)


def chunk_bytes(pcm: bytes, rate: int, chunk_ms: int) -> int:
    """The byte size of a ``chunk_ms`` burst chunk of PCM s16le at ``rate``; checks the arguments."""
    if len(pcm) % 2:
        raise ValueError(f"PCM s16le needs an even number of bytes, got {len(pcm)}")
    if chunk_ms <= 0:
        raise ValueError("chunk_ms must be positive")
    return max(2, 2 * round(rate * chunk_ms / 1000))


def how_closed(proto: WsProtocol) -> tuple[int, str, str | None]:
    """``(close code, reason, closed_by)`` of a finished WebSocket: closed_by is the side that sent
    the first close frame ("client" / "server"), None (code 1006) when the TCP connection dropped."""
    if proto.close_rcvd is None and proto.close_sent is None:
        return 1006, "", None
    if proto.close_rcvd_then_sent or (proto.close_sent is None and proto.close_rcvd is not None):
        frame, by = proto.close_rcvd, "client"
    else:
        frame, by = proto.close_sent, "server"
    return (frame.code, frame.reason, by) if frame else (1006, "", by)


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


@dataclass
class PendingCall:
    """A tool call the simulator made and the client has not answered yet."""

    name: str
    future: asyncio.Future[str]
    deadline: asyncio.Task[None] | None = None
    sent_at: float = field(default_factory=time.monotonic)


class SimSessionBase:
    """What every simulator's session does the same way: waiting, tasks, records, tool calls.

    A subclass sets ``_log`` and ``_task_prefix``, and calls ``_stop_tasks`` then
    ``_fail_pending_calls`` and ``_mark_closed`` when its connection is over.
    """

    _log: ClassVar[logging.Logger]
    _task_prefix: ClassVar[str]
    _accepted_what: ClassVar[str] = "an accepted config"  # for wait_accepted's SessionClosed
    _message_noun: ClassVar[str] = "message"  # for wait_message's SessionClosed
    _no_result: ClassVar[str] = "no tool_result for call_id {call_id!r} ({name}) within {seconds:g} s"

    def __init__(self, index: int, max_messages: int) -> None:
        self.index = index
        self.connected_at = time.monotonic()
        self.accepted = False
        self.messages: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_messages)
        self.audio = bytearray()
        self.audio_bytes_total = 0
        self.tool_results: dict[str, str] = {}
        self.violations: list[str] = []
        self.closed = asyncio.Event()
        self.closed_by: str | None = None
        self._max_messages = max_messages
        self._finished = False
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unconsumed: dict[str, collections.deque[dict[str, Any]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=max_messages))
        self._pending_calls: dict[str, PendingCall] = {}
        self._speak_lock = asyncio.Lock()

    # ---- waiting -------------------------------------------------------------------------------

    async def wait_accepted(self, timeout: float = 5) -> dict[str, Any]:
        """Wait until the client's setup is accepted and return it; :class:`SessionClosed` if the
        session ends first."""
        await self._wait_for(lambda: self.accepted, timeout, self._accepted_what)
        accepted = self._accepted_setup()
        assert accepted is not None
        return accepted

    def _accepted_setup(self) -> dict[str, Any] | None:
        """What :meth:`wait_accepted` returns (the accepted config)."""
        raise NotImplementedError

    async def wait_audio(self, min_bytes: int, timeout: float = 5) -> bytes:
        """Wait until at least ``min_bytes`` of caller audio were received in total; return the
        recorded audio."""
        await self._wait_for(lambda: self.audio_bytes_total >= min_bytes, timeout, f"{min_bytes} audio bytes")
        return bytes(self.audio)

    async def wait_message(self, type: str, timeout: float = 5) -> dict[str, Any]:
        """Return the next received message of ``type`` not returned by an earlier call
        (messages received before the call count)."""
        queue = self._unconsumed[type]
        await self._wait_for(lambda: bool(queue), timeout, f"a {type!r} {self._message_noun}")
        return queue.popleft()

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float | None, what: str) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._finished:
                    raise SessionClosed(f"session {self.index} closed while waiting for {what}")
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- records -------------------------------------------------------------------------------

    def _record(self, msg: dict[str, Any]) -> None:
        """Keep a received message (for ``messages`` and, by its ``type``, :meth:`wait_message`)."""
        self._record_as(msg.get("type"), msg)

    def _record_as(self, mtype: object, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        if isinstance(mtype, str) and (mtype in self._unconsumed or len(self._unconsumed) < MAX_MESSAGE_TYPES):
            self._unconsumed[mtype].append(msg)
        self._notify()

    def _keep_audio(self, pcm: bytes, cap: int) -> None:
        """Count caller audio and keep its last ``cap`` bytes in ``audio``."""
        self.audio_bytes_total += len(pcm)
        self.audio += pcm
        if len(self.audio) > cap:
            del self.audio[: len(self.audio) - cap]

    def _violation(self, text: str) -> None:
        limit = self._max_messages
        if len(self.violations) < limit:
            self.violations.append(text)
        elif len(self.violations) == limit:
            self.violations.append("(further violations not recorded)")
        self._notify()

    # ---- tasks ---------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        """Start a session task; every one is cancelled and awaited when the session ends."""
        if self._finished:
            coro.close()
            return None
        self._tasks.add(task := asyncio.create_task(coro, name=f"{self._task_prefix}-{self.index}-{name}"))
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, (SessionClosed, ConnectionClosed)):
            self._log.error("session %d: task %s failed", self.index, task.get_name(), exc_info=exc)

    async def _stop_tasks(self) -> None:
        """The session is over: nothing new starts, every task is cancelled and awaited."""
        self._finished = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _mark_closed(self) -> None:
        self.closed.set()
        self._notify()

    # ---- tool calls ----------------------------------------------------------------------------

    async def _call(self, name: str, call_id: str | None, send: Callable[[str], Awaitable[None]],
                    timeout: float, deadline_s: float | None, id_hex: int = 12) -> str:
        """Make a tool call: ``send(call_id)`` sends it; the result's text is returned.

        ``TimeoutError`` after ``timeout`` s (the call stays outstanding: a late result is still
        stored), :class:`SessionClosed` if the session ends first. With ``deadline_s``, no result
        by then is a violation."""
        call_id = call_id or f"call_{uuid.uuid4().hex[:id_hex]}"
        if call_id in self._pending_calls or call_id in self.tool_results:
            raise ValueError(f"call_id {call_id!r} was already used in this session")
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending_calls[call_id] = pending = PendingCall(name, fut)
        try:
            await send(call_id)
        except SessionClosed:
            self._pending_calls.pop(call_id, None)
            raise
        if deadline_s is not None:
            pending.deadline = self._spawn(self._tool_deadline(call_id, deadline_s), f"tool-deadline-{call_id}")
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def _tool_deadline(self, call_id: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        pending = self._pending_calls.get(call_id)
        if pending is not None:
            self._violation(self._no_result.format(call_id=call_id, name=pending.name, seconds=seconds))

    def _take_call(self, call_id: str, duplicate: str, unknown: str) -> PendingCall | None:
        """The outstanding call ``call_id`` answers (no longer outstanding); None, with the violation
        ``duplicate`` or ``unknown``, when there is none."""
        pending = self._pending_calls.pop(call_id, None)
        if pending is None:
            self._violation(duplicate if call_id in self.tool_results else unknown)
        return pending

    def _answer_call(self, call_id: str, pending: PendingCall, result: str) -> None:
        self.tool_results[call_id] = result
        if pending.deadline is not None:
            pending.deadline.cancel()
        if not pending.future.done():
            pending.future.set_result(result)

    def _fail_pending_calls(self, answer: str) -> None:
        """The session ended: every unanswered call's waiter gets :class:`SessionClosed`."""
        for call_id, pending in self._pending_calls.items():
            if not pending.future.done():
                pending.future.set_exception(SessionClosed(f"session closed before {answer} {call_id!r}"))
                pending.future.exception()  # mark retrieved: nobody may be awaiting it


class ScriptedWsSession(SimSessionBase):
    """A WebSocket session that speaks in bursts and runs scenario files (gateway_sim's scripting
    interface, shared by sim_generic_ws): events, the scenario runner, sends and closes."""

    def __init__(self, ws: ServerConnection, index: int, max_messages: int) -> None:
        super().__init__(index, max_messages)
        self._ws = ws
        self.sent_messages: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_messages)
        self.sent_audio_bytes = 0
        self.speaking_until = 0.0
        self.barge_ins = 0
        self.utterances: list[float] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._events: collections.Counter[str] = collections.Counter()
        self._clear_gen = 0
        self._server_close: tuple[int, str] | None = None

    @property
    def pending_tool_calls(self) -> dict[str, str]:
        """Outstanding tool calls: call_id -> tool name."""
        return {cid: p.name for cid, p in self._pending_calls.items()}

    @property
    def is_speaking(self) -> bool:
        return time.monotonic() < self.speaking_until

    # ---- the protocol's scripting API (each simulator's own) -----------------------------------

    async def say(self, text: str | None = None, *, tone_hz: float | None = None, ms: int | None = None) -> None:
        raise NotImplementedError

    async def transcript(self, role: str, text: str, final: bool = True) -> None:
        raise NotImplementedError

    async def clear(self) -> None:
        raise NotImplementedError

    async def call_tool(self, name: str, args: Mapping[str, Any], call_id: str | None = None,
                        timeout: float = 20) -> str:
        raise NotImplementedError

    async def hangup(self) -> None:
        raise NotImplementedError

    async def error(self, message: str, close: bool = True, code: int = CLOSE_POLICY) -> None:
        raise NotImplementedError

    # ---- shared scripting API ------------------------------------------------------------------

    async def send_raw_text(self, text: str) -> None:
        """Send a text frame verbatim (e.g. invalid JSON, to test the client's robustness)."""
        await self._send(text)

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the WebSocket without any protocol message."""
        await self._close(code, reason)

    async def wait_event(self, event: str, count: int = 1, timeout: float = 5) -> None:
        """Wait until ``event`` (a scenario event name) happened at least ``count`` times."""
        await self._wait_for(lambda: self._events[event] >= count, timeout, f"event {event!r}")

    # ---- internals -----------------------------------------------------------------------------

    def _event_count_reached(self, event: str, count: int) -> bool:
        return self._events[event] >= count

    def _emit(self, event: str) -> None:
        self._events[event] += 1
        self._notify()

    async def _send(self, data: str | bytes) -> None:
        if self._finished or self._server_close is not None:
            raise SessionClosed(f"session {self.index} is closed")
        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            raise SessionClosed(f"session {self.index} is closed") from exc

    async def _close(self, code: int, reason: str) -> None:
        if self._server_close is None:
            self._server_close = (code, close_reason(reason))
        await self._ws.close(*self._server_close)

    async def _end_connection(self) -> None:
        """After the handler: stop the tasks, wait for the close, record how the socket closed."""
        await self._stop_tasks()
        ws = self._ws
        if ws.state is State.OPEN:  # only on an unexpected exception in the handler
            await self._close(1011, "internal error")
        await ws.wait_closed()  # the handler may return before the closing handshake completes
        self.close_code, self.close_reason, self.closed_by = how_closed(ws.protocol)

    async def _run_scenario(self, scenario: Scenario) -> None:
        consumed: collections.Counter[str] = collections.Counter()
        for i, step in enumerate(scenario.steps):
            if step.on is not None:
                # The n-th step waiting on an event fires on its n-th occurrence in the session:
                # events are consumed in order, so one that happened early is not lost.
                nth = consumed[step.on] = consumed[step.on] + 1
                await self._wait_for(
                    functools.partial(self._event_count_reached, step.on, nth), None, f"event {step.on!r}"
                )
            if step.after_ms:
                await asyncio.sleep(step.after_ms / 1000)
            await self._run_step(i, step)

    async def _run_step(self, i: int, step: ScenarioStep) -> None:
        p = step.params
        if step.do == "say":
            await self.say(p.get("text"), tone_hz=p.get("tone_hz"), ms=p.get("ms"))
        elif step.do == "tool_call":
            coro = self.call_tool(p["name"], p.get("args", {}), p.get("call_id"),
                                  timeout=p.get("timeout_ms", 15_000) / 1000)
            if p.get("wait", True):
                try:
                    await coro
                except TimeoutError:
                    self._log.info("session %d: scenario step %d: tool_call %s got no result",
                                   self.index, i, p["name"])
            else:
                self._spawn(coro, f"scenario-tool-{i}")
        elif step.do == "clear":
            await self.clear()
        elif step.do == "hangup":
            await self.hangup()
        elif step.do == "error":
            await self.error(p["message"], close=p.get("close", True))
        elif step.do == "transcript":
            await self.transcript(p["role"], p["text"], final=p.get("final", True))


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------

S = TypeVar("S")


class SimServerBase(Generic[S]):
    """A simulator's server: its sessions, handed out in connect order by :meth:`next_session`."""

    def __init__(self, accepted_keys: Iterable[str] | None, keep_sessions: int | None) -> None:
        self.accepted_keys: frozenset[str] | None = None if accepted_keys is None else frozenset(accepted_keys)
        self.sessions: collections.deque[S] = collections.deque(maxlen=keep_sessions)
        self.url: str | None = None
        self._counter = itertools.count(1)
        self._connected = 0  # sessions created so far
        self._handed_out = 0  # sessions returned by next_session
        self._changed = asyncio.Event()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def next_session(self, timeout: float = 5) -> S:
        """The next session in connect order not yet returned by this method.

        With ``keep_sessions`` set, sessions already dropped from ``sessions`` are skipped.
        """
        async with asyncio.timeout(timeout):
            while self._handed_out >= self._connected:
                await self._changed.wait()
        oldest_kept = self._connected - len(self.sessions)
        self._handed_out = max(self._handed_out, oldest_kept)
        session = self.sessions[self._handed_out - oldest_kept]
        self._handed_out += 1
        return session

    def _key_accepted(self, key: str) -> bool:
        return key_accepted(self.accepted_keys, key)

    def _add_session(self, session: S) -> None:
        self.sessions.append(session)
        self._connected += 1
        self._changed.set()
        self._changed = asyncio.Event()


class _WsSession(Protocol):
    """What :class:`WsSimServer` needs of a session."""

    async def _run(self) -> None: ...
    async def _finish(self) -> None: ...


W = TypeVar("W", bound=_WsSession)


class WsSimServer(SimServerBase[W]):
    """A simulator served by ``websockets`` on one path: one session per connection."""

    _path: ClassVar[str]
    _max_size: ClassVar[int] = 2**20

    def __init__(self, accepted_keys: Iterable[str] | None, keep_sessions: int | None) -> None:
        super().__init__(accepted_keys, keep_sessions)
        self.host: str | None = None
        self.port: int | None = None
        self._server: Server | None = None

    def _new_session(self, ws: ServerConnection, index: int) -> W:
        raise NotImplementedError

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        raise NotImplementedError

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._server = await serve(self._handler, host, port, process_request=self._process_request,
                                   compression=None, max_size=self._max_size, create_connection=ArrivalStamped)
        sock = next(iter(self._server.sockets))
        self.host, self.port = host, sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"ws://{shown}:{self.port}{self._path}"

    async def stop(self) -> None:
        """Close every connection (1001) and the listener; wait for every session to finish."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close(close_connections=True)
        await server.wait_closed()

    async def _handler(self, ws: ServerConnection) -> None:
        session = self._new_session(ws, next(self._counter))
        self._add_session(session)
        try:
            await session._run()
        finally:
            await session._finish()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) for ``--listen``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def add_server_arguments(parser: argparse.ArgumentParser, *, listen_help: str, key_help: str,
                         key_metavar: str = "KEY", default_port: int = 8765) -> None:
    """``--listen HOST:PORT`` (dest listen) and the repeatable ``--api-key`` (dest api_keys)."""
    parser.add_argument("--listen", type=listen_address, default=("127.0.0.1", default_port), metavar="HOST:PORT",
                        help=listen_help)
    parser.add_argument("--api-key", dest="api_keys", action="append", default=None, metavar=key_metavar,
                        help=key_help)


def api_keys(args: argparse.Namespace) -> set[str] | None:
    """The ``--api-key`` values (None without any)."""
    keys = getattr(args, "api_keys", None)
    return set(keys) if keys else None


async def serve_until_cancelled(sim: SimServerBase[Any], host: str, port: int, log: logging.Logger,
                                started: str, *started_args: object, stopped: str | None = None) -> None:
    """Start ``sim``, log ``started % (sim.url, *started_args)``, serve until cancelled, stop."""
    await sim.start(host, port)
    log.info(started, sim.url, *started_args)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
        if stopped is not None:
            log.info(stopped)


def main(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
         run_from_args: Callable[[argparse.Namespace], Coroutine[Any, Any, None]]) -> None:
    """``python -m`` entry point of a simulator: parse, log at INFO, serve until interrupted."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_from_args(args))
    except KeyboardInterrupt:
        pass
