"""A tiny raw-asyncio AMI client for the e2e tests only.

Deliberately independent of the bridge's own AMI client, so tests observe Asterisk through a
second, simple implementation. Not for production: no reconnect, no keepalive.

Wire format: after a one-line banner (``Asterisk Call Manager/11.0.0`` on 22.x), every message is
``Key: Value`` lines ended by a blank line. A key that repeats in one message (``ChanVariable``,
``Variable``, ``Output``) becomes a list of its values in the parsed dict, in order.

Observed on Asterisk 22.10.1 (see test_sandbox.py):

* The response to an action carries its ``ActionID``; so do the events that belong to it
  (``OriginateResponse`` for ``Async: true`` Originate, list events of ``CoreShowChannels``).
  Those events also go to the event history here.
* With ``channelvars = AS_UUID,AS_PROFILE`` every channel event carries one
  ``ChanVariable: NAME=value`` line per configured name (empty value when unset), i.e. a list.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["AmiClient", "AmiError", "Message", "chanvars"]

Message = dict[str, Any]  # str values, or list[str] for repeated keys


class AmiError(RuntimeError):
    pass


def chanvars(msg: Mapping[str, Any], key: str = "ChanVariable") -> dict[str, str]:
    """``ChanVariable: NAME=value`` lines of a channel event as a dict (one or many lines)."""
    raw = msg.get(key)
    if raw is None:
        return {}
    values = raw if isinstance(raw, list) else [raw]
    out: dict[str, str] = {}
    for item in values:
        name, _, value = item.partition("=")
        out[name] = value
    return out


def _values(msg: Mapping[str, Any], key: str) -> list[str]:
    v = msg.get(key)
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


class AmiClient:
    """``client = await AmiClient.connect(host, port, user, secret)``; ``await client.close()``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, banner: str) -> None:
        self._reader = reader
        self._writer = writer
        self.banner = banner
        self.events: list[Message] = []  # every event since connect, in arrival order
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._cond = asyncio.Condition()
        self._closed = False
        self._read_error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name="test-ami-reader")

    @classmethod
    async def connect(
        cls, host: str, port: int, username: str, secret: str, timeout: float = 10.0
    ) -> AmiClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        banner = (await asyncio.wait_for(reader.readline(), timeout)).decode().strip()
        if not banner.startswith("Asterisk Call Manager/"):
            writer.close()
            raise AmiError(f"not an AMI banner: {banner!r}")
        client = cls(reader, writer, banner)
        resp = await client.action("Login", timeout=timeout, Username=username, Secret=secret)
        if resp.get("Response") != "Success":
            await client.close()
            raise AmiError(f"AMI login failed: {resp}")
        return client

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await self._read_message()
                if msg is None:
                    break
                await self._dispatch(msg)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._read_error = exc
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - surfaced to waiters
            self._read_error = exc
        finally:
            self._closed = True
            err = AmiError(f"AMI connection closed ({self._read_error or 'EOF'})")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            async with self._cond:
                self._cond.notify_all()

    async def _read_message(self) -> Message | None:
        msg: Message = {}
        while True:
            line = await self._reader.readline()
            if not line:
                return None
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if text == "":
                if msg:
                    return msg
                continue
            key, sep, value = text.partition(":")
            if not sep:
                # Continuation without a key (old-style command output): keep it.
                key, value = "Output", text
            else:
                value = value[1:] if value.startswith(" ") else value
            if key in msg:
                prev = msg[key]
                if isinstance(prev, list):
                    prev.append(value)
                else:
                    msg[key] = [prev, value]
            else:
                msg[key] = value

    async def _dispatch(self, msg: Message) -> None:
        action_id = msg.get("ActionID")
        # OriginateResponse is an *event* with a Response key: only event-less messages are responses.
        if "Event" not in msg and "Response" in msg and isinstance(action_id, str) and action_id in self._pending:
            fut = self._pending.pop(action_id)
            if not fut.done():
                fut.set_result(msg)
            return
        if "Event" in msg:
            async with self._cond:
                self.events.append(msg)
                self._cond.notify_all()

    # ------------------------------------------------------------------ writing

    async def send(self, name: str, fields: Mapping[str, Any]) -> str:
        """Send an action without waiting; return its ActionID."""
        if self._closed:
            raise AmiError("AMI connection is closed")
        fields = dict(fields)
        action_id = str(fields.pop("ActionID", None) or f"vbtest-{next(self._ids)}")
        lines = [f"Action: {name}", f"ActionID: {action_id}"]
        for key, value in fields.items():
            if value is None:
                continue
            values: Iterable[Any] = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, bool):
                    v = "true" if v else "false"
                s = str(v)
                if "\r" in s or "\n" in s:
                    raise ValueError(f"AMI field {key} contains a line break")
                lines.append(f"{key}: {s}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self._writer.drain()
        return action_id

    async def action(self, name: str, timeout: float = 10.0, **fields: Any) -> Message:
        """Send an action and return its Response (matched by ActionID).

        Field values may be lists/tuples: each element becomes its own ``Key: value`` line
        (e.g. ``Variable=["A=1", "B=2"]``).
        """
        action_id = str(fields.get("ActionID") or f"vbtest-{next(self._ids)}")
        fields["ActionID"] = action_id
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = fut
        try:
            await self.send(name, fields)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AmiError(f"no Response to {name} (ActionID {action_id}) within {timeout}s") from None
        finally:
            self._pending.pop(action_id, None)

    async def action_list(
        self, name: str, timeout: float = 10.0, **fields: Any
    ) -> tuple[Message, list[Message]]:
        """An action answered by a list of events (``EventList: start`` ... ``EventList: Complete``)."""
        since = len(self.events)
        resp = await self.action(name, timeout=timeout, **fields)
        if resp.get("Response") != "Success":
            return resp, []
        action_id = resp["ActionID"]
        await self.wait_event(
            lambda e: e.get("ActionID") == action_id and e.get("EventList", "").lower() == "complete",
            timeout=timeout,
            since=since,
        )
        items = [
            e
            for e in self.events[since:]
            if e.get("ActionID") == action_id and e.get("EventList", "").lower() != "complete"
        ]
        return resp, items

    # ------------------------------------------------------------------ events

    def mark(self) -> int:
        """Index into the event history; pass as ``since`` to ignore older events."""
        return len(self.events)

    async def wait_event(
        self, predicate: Callable[[Message], bool], timeout: float = 10.0, since: int = 0
    ) -> Message:
        """First event (from history index ``since``, then live) for which ``predicate`` is true."""
        idx = since

        def scan() -> Message | None:
            nonlocal idx
            while idx < len(self.events):
                ev = self.events[idx]
                idx += 1
                if predicate(ev):
                    return ev
            return None

        async def waiter() -> Message:
            async with self._cond:
                while True:
                    found = scan()
                    if found is not None:
                        return found
                    if self._closed:
                        raise AmiError(f"AMI connection closed while waiting for an event ({self._read_error})")
                    await self._cond.wait()

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            names = sorted({str(e.get("Event")) for e in self.events[since:]})
            raise AmiError(f"no matching AMI event within {timeout}s (events seen: {', '.join(names)})") from None

    def find_events(self, predicate: Callable[[Message], bool], since: int = 0) -> list[Message]:
        return [e for e in self.events[since:] if predicate(e)]

    # ------------------------------------------------------------------ helpers

    async def originate_caller(
        self,
        play_file: str,
        rec_file: str,
        wait_after: float = 5,
        variables: Mapping[str, str] | None = None,
        *,
        exten: str = "ai",
        context: str = "voxbridge-ai",
        timeout_ms: int = 10000,
        caller_id: str = '"Test Caller" <5551234>',
        caller_context: str = "voxbridge-test",
    ) -> Message:
        """Originate ``Local/caller@<caller_context>`` into ``<context>,<exten>,1`` (Async).

        The ``;2`` half plays ``play_file`` (chroot path without extension) and records what it
        hears into ``rec_file`` (chroot path, ``.wav``), then waits ``wait_after`` seconds.
        ``variables`` (e.g. ``{"AS_UUID": ...}``) become Originate ``Variable`` lines.
        Returns the Response (``Originate successfully queued``); the outcome arrives later as
        an ``OriginateResponse`` event with the same ActionID.
        """
        wait_s = f"{wait_after:g}" if isinstance(wait_after, float) else str(wait_after)
        all_vars = {"PLAY_FILE": play_file, "REC_FILE": rec_file, "WAIT_AFTER": wait_s}
        all_vars.update(variables or {})
        for k, v in all_vars.items():
            if "," in str(v) or "=" in k:
                raise ValueError(f"Originate variable {k}={v!r} cannot contain ',' (or '=' in the name)")
        return await self.action(
            "Originate",
            Channel=f"Local/caller@{caller_context}",
            Context=context,
            Exten=exten,
            Priority="1",
            Timeout=str(timeout_ms),
            CallerID=caller_id,
            Async="true",
            Variable=[f"{k}={v}" for k, v in all_vars.items()],
        )

    async def close(self) -> None:
        if not self._closed:
            try:
                await asyncio.wait_for(self.action("Logoff", timeout=2), 3)
            except (TimeoutError, AmiError, ConnectionError, OSError):
                pass
        self._closed = True
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing: how the reader ended no longer matters
            pass
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> AmiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
