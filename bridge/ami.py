"""Asterisk Manager Interface: a small asyncio client, with a sans-I/O message codec.

Why not panoramisk (1.4, the PyPI release)? Read against its source, it costs more than it saves:

* it **re-sends unanswered actions after a reconnect** (``awaiting_actions``, replayed on
  FullyBooted): a Redirect or Originate could run twice, or minutes late after a restart;
* a "successfully queued" reply to an action without an ``Async`` key raises KeyError inside
  the protocol and kills the connection;
* its Ping timer never checks for the reply, so a half-open connection goes unnoticed;
* a failed login only sets a flag; nothing raises;
* it decodes ASCII with ``errors='ignore'``, dropping non-ASCII caller names;
* actions have no deadline, and ``connect()`` needs ``get_event_loop()`` semantics.

This client does what the bridge needs and nothing more: every action awaits its Response by
ActionID with a deadline and fails honestly (never replayed); list actions collect their
events; a liveness Ping must be answered; on connection loss every pending action fails at
once and the client reconnects with backoff, then calls ``on_connect`` hooks (the channel
tracker resyncs with CoreShowChannels there).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping

log = logging.getLogger("voxbridge.ami")

EOL = b"\r\n"


class AmiError(Exception):
    """An action failed: Asterisk answered Error, the deadline passed, or AMI is not connected."""


class AmiMessage:
    """One AMI message: ordered ``Key: Value`` fields; keys are case-insensitive; repeats kept."""

    __slots__ = ("fields", "_index")

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        self._index: dict[str, list[str]] = {}
        for k, v in fields:
            self._index.setdefault(k.lower(), []).append(v)

    def get(self, key: str, default: str | None = None) -> str | None:
        values = self._index.get(key.lower())
        return values[0] if values else default

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._index

    def getall(self, key: str) -> list[str]:
        return list(self._index.get(key.lower(), ()))

    @property
    def event(self) -> str | None:
        return self.get("Event")

    @property
    def response(self) -> str | None:
        return self.get("Response")

    @property
    def action_id(self) -> str | None:
        return self.get("ActionID")

    def chan_variables(self) -> dict[str, str]:
        """``ChanVariable: NAME=value`` fields (from manager.conf ``channelvars``) as a dict."""
        out: dict[str, str] = {}
        for item in self.getall("ChanVariable"):
            name, _, value = item.partition("=")
            out[name] = value
        return out

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.fields}

    def __repr__(self) -> str:
        return f"AmiMessage({self.fields!r})"


class AmiParser:
    """Bytes in, :class:`AmiMessage` out. Handles the banner line and any split of the stream."""

    MAX_BUFFER = 1 << 20

    def __init__(self) -> None:
        self._buf = bytearray()
        self.banner: str | None = None

    def feed(self, data: bytes) -> list[AmiMessage]:
        self._buf += data
        out: list[AmiMessage] = []
        if self.banner is None:
            end = self._buf.find(EOL)
            if end < 0:
                return out
            self.banner = self._buf[:end].decode("utf-8", "replace")
            del self._buf[: end + 2]
        while True:
            end = self._buf.find(EOL + EOL)
            if end < 0:
                if len(self._buf) > self.MAX_BUFFER:
                    raise AmiError(f"AMI message larger than {self.MAX_BUFFER} bytes")
                return out
            block = bytes(self._buf[:end])
            del self._buf[: end + 4]
            fields: list[tuple[str, str]] = []
            for line in block.decode("utf-8", "replace").split("\r\n"):
                if not line:
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields.append((key.strip(), value.strip()))
                else:  # "Output" of old-style Command responses, etc.
                    fields.append(("Output", line))
            if fields:
                out.append(AmiMessage(fields))


FieldValue = str | int | bool | Iterable[str] | Mapping[str, Any] | None


def encode_action(action: str, action_id: str, fields: Mapping[str, FieldValue]) -> bytes:
    """Serialise one action. Lists repeat the key; a dict becomes repeated ``k=v`` (Variable).

    Values containing CR or LF are refused: they would let a caller-influenced value (a tool
    argument) inject further AMI actions.
    """
    lines = [f"Action: {action}", f"ActionID: {action_id}"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            values = ["true" if value else "false"]
        elif isinstance(value, (str, int)):
            values = [str(value)]
        elif isinstance(value, Mapping):
            values = [f"{k}={v}" for k, v in value.items()]
        else:
            values = [str(v) for v in value]
        for v in values:
            if "\r" in v or "\n" in v or "\r" in key or "\n" in key:
                raise ValueError(f"AMI field {key!r} contains a line break")
            lines.append(f"{key}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@dataclass
class _Pending:
    future: asyncio.Future[Any]
    list_complete: str | None = None  # event name that ends an EventList
    events: list[AmiMessage] = field(default_factory=list)
    response: AmiMessage | None = None
    await_event: str | None = None  # e.g. OriginateResponse for async Originate


EventListener = Callable[[AmiMessage], None]
ConnectHook = Callable[["AmiClient"], Awaitable[None]]


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
        backoff_max: float = 10.0,
    ) -> None:
        self.host, self.port = host, port
        self._username, self._secret = username, secret
        self.action_timeout = action_timeout
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self._ids = itertools.count(1)
        self._prefix = f"vb-{os.getpid()}-"
        self._pending: dict[str, _Pending] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._listeners: list[EventListener] = []
        self._hooks: list[ConnectHook] = []
        self._runner: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.banner: str | None = None
        self.connects = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ wiring

    def add_listener(self, listener: EventListener) -> None:
        """Called for every event that is not part of an action's own reply."""
        self._listeners.append(listener)

    def on_connect(self, hook: ConnectHook) -> None:
        """Awaited after every successful login (state rebuild goes here)."""
        self._hooks.append(hook)

    async def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="ami-connection")

    async def wait_connected(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self.connected.wait()

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
            self._runner = None
        await self._drop("AMI client stopped")

    # ------------------------------------------------------------------ actions

    async def action(self, action: str, *, timeout: float | None = None, check: bool = True,
                     **fields: FieldValue) -> AmiMessage:
        """Send ``action`` and await its Response. Raises AmiError on Error (if ``check``)."""
        p = await self._send(action, fields, timeout)
        resp = p.response
        assert resp is not None
        if check and (resp.response or "").lower() not in ("success", "follows", "goodbye"):
            raise AmiError(f"{action} failed: {resp.get('Message') or resp.response}")
        return resp

    async def action_list(self, action: str, complete_event: str, *, timeout: float | None = None,
                          **fields: FieldValue) -> list[AmiMessage]:
        """An EventList action (e.g. CoreShowChannels): the events between Response and ``complete_event``."""
        p = await self._send(action, fields, timeout, list_complete=complete_event)
        return p.events

    async def originate(self, *, timeout: float, **fields: FieldValue) -> AmiMessage:
        """Async Originate; returns the OriginateResponse event (``Response``, ``Reason``)."""
        fields = {**fields, "Async": "true"}
        p = await self._send("Originate", fields, timeout, await_event="OriginateResponse")
        if not p.events:  # Asterisk refused it outright (bad channel, no permission, ...)
            assert p.response is not None
            raise AmiError(f"Originate failed: {p.response.get('Message') or p.response.response}")
        return p.events[-1]

    async def _send(self, action: str, fields: Mapping[str, FieldValue], timeout: float | None, *,
                    list_complete: str | None = None, await_event: str | None = None) -> _Pending:
        writer = self._writer
        if writer is None or not (self.connected.is_set() or action == "Login"):
            raise AmiError(f"{action}: AMI is not connected ({self.last_error or 'connecting'})")
        action_id = f"{self._prefix}{next(self._ids)}"
        data = encode_action(action, action_id, fields)
        pending = _Pending(asyncio.get_running_loop().create_future(), list_complete=list_complete,
                           await_event=await_event)
        self._pending[action_id] = pending
        try:
            writer.write(data)
            async with asyncio.timeout(timeout if timeout is not None else self.action_timeout):
                await pending.future
        except TimeoutError:
            raise AmiError(f"{action}: no answer from Asterisk within "
                           f"{timeout if timeout is not None else self.action_timeout:g} s") from None
        finally:
            self._pending.pop(action_id, None)
        return pending

    # ------------------------------------------------------------------ connection

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._connect_once()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except (OSError, AmiError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("AMI %s:%d: %s; reconnecting in %.1f s", self.host, self.port, self.last_error, delay)
            await self._drop(f"AMI connection lost ({self.last_error})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _connect_once(self) -> None:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        self._writer = writer
        parser = AmiParser()
        reader_task = asyncio.create_task(self._read(reader, parser), name="ami-reader")
        try:
            # Login is an ordinary action, so it gets a deadline and an honest error.
            try:
                await self.action("Login", Username=self._username, Secret=self._secret, Events="on")
            except AmiError as exc:
                raise AmiError(f"login as {self._username!r} refused: {exc}") from None
            self.connected.set()
            self.banner = parser.banner
            self.connects += 1
            self.last_error = None
            log.info("AMI connected to %s:%d (%s)", self.host, self.port, self.banner)
            for hook in self._hooks:
                try:
                    await hook(self)
                except AmiError as exc:
                    log.warning("AMI on-connect hook failed: %s", exc)
            pinger = asyncio.create_task(self._ping(), name="ami-ping")
            try:
                done, _ = await asyncio.wait({reader_task, pinger}, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                raise AmiError("connection closed by Asterisk")
            finally:
                pinger.cancel()
        finally:
            self.connected.clear()
            reader_task.cancel()
            writer.close()
            self._writer = None

    async def _ping(self) -> None:
        """Liveness: a Ping that goes unanswered means a half-open connection."""
        while True:
            await asyncio.sleep(self.ping_interval)
            try:
                await self.action("Ping", timeout=min(self.action_timeout, self.ping_interval))
            except AmiError as exc:
                raise AmiError(f"liveness check failed: {exc}") from None

    async def _read(self, reader: asyncio.StreamReader, parser: AmiParser) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                raise AmiError("connection closed by Asterisk")
            for msg in parser.feed(data):
                self._dispatch(msg)

    def _dispatch(self, msg: AmiMessage) -> None:
        aid = msg.action_id
        pending = self._pending.get(aid) if aid else None
        if pending is not None and not pending.future.done():
            # OriginateResponse carries a Response: key too; only event-less messages are replies.
            if msg.event is None and msg.response is not None and pending.response is None:
                pending.response = msg
                failed = msg.response.lower() == "error"
                if failed or (pending.list_complete is None and pending.await_event is None):
                    pending.future.set_result(None)
                return
            if msg.event is not None:
                # An event carrying our ActionID is part of this action's reply, not a broadcast.
                pending.events.append(msg)
                if msg.event in (pending.list_complete, pending.await_event):
                    pending.future.set_result(None)
                return
        if msg.event is not None:
            for listener in self._listeners:
                try:
                    listener(msg)
                except Exception:  # noqa: BLE001 - one listener must not break the connection
                    log.exception("AMI event listener failed on %s", msg.event)

    async def _drop(self, why: str) -> None:
        """Fail every pending action now: nothing is ever replayed after a reconnect."""
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(AmiError(why))
                p.future.exception()  # mark retrieved: the awaiting action re-raises it
