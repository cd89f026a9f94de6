"""Asterisk Manager Interface: a thin asyncio driver over the sans-I/O core in ``bridge/ami_protocol.py``.

Why not panoramisk (1.4, the PyPI release)? Read against its source, it costs more than it saves:

* it **re-sends unanswered actions after a reconnect** (``awaiting_actions``, replayed on
  FullyBooted): a Redirect or Originate could run twice, or minutes late after a restart;
* a "successfully queued" reply to an action without an ``Async`` key raises KeyError inside
  the protocol and kills the connection;
* its Ping timer never checks for the reply, so a half-open connection goes unnoticed;
* a failed login only sets a flag; nothing raises;
* it decodes ASCII with ``errors='ignore'``, dropping non-ASCII caller names;
* actions have no deadline, and ``connect()`` needs ``get_event_loop()`` semantics.

What the client promises (ActionID matching, deadlines, Ping liveness, login failure, failing
every pending action when the connection drops and never replaying it) is decided by
:class:`~bridge.ami_protocol.AmiProtocol`. This module only does the I/O: open the connection,
feed it the bytes read, write the bytes it returns, wake it at its next deadline, resolve the
futures of the actions it reports finished, and reconnect with backoff.

The connection loop (:meth:`AmiClient.run`) never ends except by cancellation: each connection
attempt is guarded, an unexpected exception (a bug) is logged with its traceback and counted
(``faults``, and ``on_fault`` for the process's metrics), and the client reconnects. An
``on_connect`` hook that raises is logged the same way and the connection goes on: the channel
tracker failing to resync must not take AMI down. The bridge additionally runs the loop under
its supervisor (bridge/supervise.py), so a bug in the loop's own machinery is still logged,
restarted, and escalated to a process exit if it keeps happening.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .ami_protocol import (
    ActionCompleted,
    ActionFailed,
    AmiError,
    AmiFieldError,
    AmiMessage,
    AmiParser,
    AmiProtocol,
    ConnectionDead,
    EventReceived,
    FieldValue,
    LoggedIn,
    Outcome,
    encode_action,
    escape_variable_value,
    reply_error,
)

__all__ = ["AmiClient", "AmiError", "AmiFieldError", "AmiMessage", "AmiParser", "encode_action",
           "escape_variable_value"]

log = logging.getLogger("voxbridge.ami")

EventListener = Callable[[AmiMessage], None]
ConnectHook = Callable[["AmiClient"], Awaitable[None]]
#: Starts the connection loop as a task (e.g. ``lambda run: supervisor.start("ami", run)``).
Spawner = Callable[[Callable[[], Awaitable[None]]], "asyncio.Task[Any]"]

#: Failures a connection attempt is built to meet: Asterisk down, refused, reset, slow, silent.
EXPECTED = (OSError, AmiError, TimeoutError, asyncio.IncompleteReadError)


class AmiClient:
    """A logged-in AMI connection that keeps itself alive.

    ``await client.start()`` connects in the background (``await client.wait_connected()``
    to block until logged in). ``action()`` raises :class:`AmiError` while disconnected.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        action_timeout: float = 5.0,
        ping_interval: float = 10.0,
        connect_timeout: float = 5.0,
        backoff_min: float = 0.5,
        backoff_max: float = 10.0,
        on_fault: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._proto = AmiProtocol(username, secret, action_timeout=action_timeout, ping_interval=ping_interval,
                                  id_prefix=f"vb-{os.getpid()}-")
        self._on_fault = on_fault
        self._futures: dict[str, asyncio.Future[ActionCompleted]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._closed: asyncio.Future[None] | None = None  # this connection's end (an exception)
        self._login: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()  # a new deadline may be earlier than the timer's
        self._listeners: list[EventListener] = []
        self._hooks: list[ConnectHook] = []
        self._runner: asyncio.Task[Any] | None = None
        self.connected = asyncio.Event()
        self.banner: str | None = None
        self.connects = 0
        self.last_error: str | None = None
        #: Unexpected exceptions (bugs) met and survived: each was logged with its traceback.
        self.faults = 0

    @property
    def action_timeout(self) -> float:
        return self._proto.action_timeout

    @property
    def ping_interval(self) -> float:
        return self._proto.ping_interval

    # ------------------------------------------------------------------ wiring

    def add_listener(self, listener: EventListener) -> None:
        """Called for every event that is not part of an action's own reply."""
        self._listeners.append(listener)

    def on_connect(self, hook: ConnectHook) -> None:
        """Awaited after every successful login (state rebuild goes here)."""
        self._hooks.append(hook)

    async def start(self, spawn: Spawner | None = None) -> None:
        """Start the connection loop: as a plain task, or through ``spawn`` (the bridge's supervisor)."""
        if self._runner is None:
            self._runner = spawn(self.run) if spawn is not None else asyncio.create_task(self.run(),
                                                                                         name="ami-connection")

    async def wait_connected(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self.connected.wait()

    async def stop(self) -> None:
        """End the connection loop; every pending action fails with "AMI client stopped"."""
        self._close(AmiError("AMI client stopped"), pending_reason="AMI client stopped")
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self._fail_all("AMI client stopped")

    # ------------------------------------------------------------------ actions

    async def action(self, action: str, *, timeout: float | None = None, check: bool = True,
                     **fields: FieldValue) -> AmiMessage:
        """Send ``action`` and await its Response. Raises AmiError on Error (if ``check``)."""
        done = await self._send(action, fields, timeout)
        assert done.response is not None
        error = reply_error(action, done.response)
        if check and error is not None:
            raise AmiError(error)
        return done.response

    async def action_list(self, action: str, complete_event: str, *, timeout: float | None = None,
                          **fields: FieldValue) -> list[AmiMessage]:
        """An EventList action (e.g. CoreShowChannels): the events between Response and ``complete_event``.

        Raises AmiError if Asterisk answered Error: an empty list would mean "there is nothing",
        which is not what Asterisk said.
        """
        done = await self._send(action, fields, timeout, list_complete=complete_event)
        error = reply_error(action, done.response)
        if error is not None:
            raise AmiError(error)
        return list(done.events)

    async def originate(self, *, timeout: float, **fields: FieldValue) -> AmiMessage:
        """Async Originate; returns the OriginateResponse event (``Response``, ``Reason``)."""
        fields = {**fields, "Async": "true"}
        done = await self._send("Originate", fields, timeout, await_event="OriginateResponse")
        if not done.events:  # Asterisk refused it outright (bad channel, no permission, ...)
            raise AmiError(reply_error("Originate", done.response) or "Originate failed: no OriginateResponse")
        return done.events[-1]

    async def _send(self, action: str, fields: Mapping[str, FieldValue], timeout: float | None, *,
                    list_complete: str | None = None, await_event: str | None = None) -> ActionCompleted:
        writer = self._writer
        if writer is None or not self.connected.is_set():
            raise AmiError(f"{action}: AMI is not connected ({self.last_error or 'connecting'})")
        loop = asyncio.get_running_loop()
        action_id, data = self._proto.send_action(action, fields, now=loop.time(), timeout=timeout,
                                                  list_complete=list_complete, await_event=await_event)
        fut: asyncio.Future[ActionCompleted] = loop.create_future()
        self._futures[action_id] = fut
        writer.write(data)
        self._wake.set()
        try:
            return await fut
        finally:
            if self._futures.pop(action_id, None) is not None:  # cancelled while waiting
                self._proto.forget(action_id)

    def _fail_all(self, why: str) -> None:
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(AmiError(why))

    # ------------------------------------------------------------------ outcomes of the core

    def _handle(self, outcomes: list[Outcome]) -> None:
        for out in outcomes:
            if isinstance(out, ActionCompleted):
                fut = self._futures.pop(out.action_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(out)
            elif isinstance(out, ActionFailed):
                fut = self._futures.pop(out.action_id, None)
                if fut is not None and not fut.done():
                    fut.set_exception(out.error)
            elif isinstance(out, EventReceived):
                for listener in self._listeners:
                    try:
                        listener(out.message)
                    except Exception as exc:  # noqa: BLE001 - one listener must not break the connection
                        self._fault(exc, f"AMI event listener failed on {out.message.event}")
            elif isinstance(out, LoggedIn):
                self.banner = out.banner
                if self._login is not None and not self._login.done():
                    self._login.set_result(None)
            elif isinstance(out, ConnectionDead):
                self._close(AmiError(out.reason))

    def _fault(self, exc: BaseException, what: str) -> None:
        self.faults += 1
        log.error("%s: %r", what, exc, exc_info=exc)
        if self._on_fault is not None:
            try:
                self._on_fault(exc)
            except Exception:  # deliberately broad: counting must not become a second failure
                log.exception("AMI on_fault callback failed")

    # ------------------------------------------------------------------ connection

    async def run(self) -> None:
        """Connect, stay connected, reconnect with backoff; ends only when cancelled."""
        delay = self.backoff_min
        while True:
            logins = self.connects
            unexpected: Exception | None = None
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except EXPECTED as exc:
                self.last_error = str(exc) or type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - a bug must not end AMI for the life of the process
                self.last_error = f"unexpected error: {exc!r}"
                unexpected = exc
            if self.connects > logins:
                delay = self.backoff_min  # it had logged in: a fresh failure, not a run of them
            if unexpected is None:
                log.warning("AMI %s:%d: %s; reconnecting in %.1f s", self.host, self.port, self.last_error, delay)
            else:
                self._fault(unexpected, f"AMI connection to {self.host}:{self.port} failed unexpectedly; "
                                        f"reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _connect_once(self) -> None:
        """One connection, from open to end. Always raises: the reason the connection ended."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        self._closed = loop.create_future()
        self._login = loop.create_future()
        self._writer = writer
        tasks: list[asyncio.Task[None]] = []
        try:
            writer.write(self._proto.connection_made(loop.time()))
            tasks += [asyncio.create_task(self._read(reader), name="ami-reader"),
                      asyncio.create_task(self._timer(), name="ami-timer")]
            await asyncio.wait([self._login, self._closed], return_when=asyncio.FIRST_COMPLETED)
            if not self._closed.done():
                self.connected.set()
                self.connects += 1
                self.last_error = None
                log.info("AMI connected to %s:%d (%s)", self.host, self.port, self.banner)
                tasks.append(asyncio.create_task(self._run_hooks(), name="ami-on-connect"))
            await self._closed  # raises why the connection ended
            raise AssertionError("unreachable: the connection's end is an exception")  # pragma: no cover
        finally:
            self._close(AmiError("connection closed"))
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            self._writer = None

    def _close(self, exc: BaseException, pending_reason: str | None = None) -> None:
        """End the current connection now (idempotent): not connected, every pending action fails."""
        closed = self._closed
        if closed is None or closed.done():
            return
        closed.set_exception(exc)
        closed.exception()  # retrieved here; _connect_once re-raises it
        self.connected.clear()
        why = pending_reason or f"AMI connection lost ({str(exc) or type(exc).__name__})"
        self._handle(self._proto.connection_lost(why))

    async def _run_hooks(self) -> None:
        for hook in self._hooks:
            try:
                await hook(self)
            except asyncio.CancelledError:
                raise
            except AmiError as exc:
                log.warning("AMI on-connect hook %s failed: %s", getattr(hook, "__qualname__", hook), exc)
            except Exception as exc:  # noqa: BLE001 - a buggy hook must not take the connection down
                self._fault(exc, f"AMI on-connect hook {getattr(hook, '__qualname__', hook)} raised")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise AmiError("connection closed by Asterisk")
                self._handle(self._proto.receive(data, loop.time()))
                self._wake.set()  # a reply may have moved the next deadline or ping
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - run() tells expected from unexpected
            self._close(exc)

    async def _timer(self) -> None:
        """Deadlines and pings: the core says when; this sleeps until then (or until woken)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                now = loop.time()
                self._handle(self._proto.timeouts(now))
                ping = self._proto.ping_due(now)
                if ping is not None and self._writer is not None:
                    self._writer.write(ping)
                self._wake.clear()
                try:
                    async with asyncio.timeout_at(self._proto.next_wakeup()):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - run() tells expected from unexpected
            self._close(exc)
