"""The Asterisk Manager Interface as a sans-I/O protocol: bytes and a clock in, outcomes out.

Nothing here touches a socket, a task or the event loop. The asyncio driver in
``bridge/ami.py`` opens the connection, writes the bytes this module returns, feeds it what
it reads, and calls :meth:`AmiProtocol.timeouts` / :meth:`AmiProtocol.ping_due` when
:meth:`AmiProtocol.next_wakeup` says so. Everything the client promises is decided here, so
it is tested without Asterisk, without root and without waiting (tests/unit/test_ami_protocol.py
drives it with a fake clock):

* every action is matched to its Response by ActionID, and has a deadline;
* list actions (``CoreShowChannels``) collect the events carrying their ActionID until the
  ``…Complete`` event; an async ``Originate`` waits for its ``OriginateResponse`` event;
* the login is an action like any other, and a refusal ends the connection with Asterisk's
  own message;
* a Ping goes out every ``ping_interval``; one that is not answered in time means the
  connection is half-open, and the connection is declared dead;
* when the connection is lost, every pending action fails at once and nothing is ever sent
  again on its behalf: after a reconnect a Redirect or Originate must not run twice, or minutes
  late. Only a fresh Login goes out on a new connection.

Every value written to the wire is checked: a CR or LF would let a value coming from a caller or
the AI (a transfer extension, a caller ID) inject further AMI actions, so any control character
is refused with :class:`AmiFieldError`.
"""

from __future__ import annotations

import itertools
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("voxbridge.ami")

EOL = b"\r\n"


class AmiError(Exception):
    """An action failed: Asterisk answered Error, the deadline passed, or AMI is not connected."""


class AmiFieldError(AmiError, ValueError):
    """A value cannot be written to AMI as given (a control character, a bad variable name).

    Also a ValueError: the value is bad whatever the state of the connection.
    """


# ---------------------------------------------------------------------------------- messages


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
        return dict(self.fields)

    def __repr__(self) -> str:
        return f"AmiMessage({self.fields!r})"


def _decode(line: bytes) -> str:
    """UTF-8 (what Asterisk sends for UTF-8 dialplans and SIP peers); a line that is not valid
    UTF-8 is read as latin-1, so a caller name from an old latin-1 system keeps its letters
    instead of turning into replacement characters."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1")


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
                if len(self._buf) > self.MAX_BUFFER:
                    raise AmiError(f"AMI banner longer than {self.MAX_BUFFER} bytes")
                return out
            self.banner = _decode(bytes(self._buf[:end]))
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
            for raw in block.split(EOL):
                if not raw:
                    continue
                line = _decode(raw)
                key, sep, value = line.partition(":")
                if sep:
                    fields.append((key.strip(), value.strip()))
                else:  # "Output" of old-style Command responses, etc.
                    fields.append(("Output", line))
            if fields:
                out.append(AmiMessage(fields))


# ---------------------------------------------------------------------------------- encoding

FieldValue = str | int | bool | Iterable[str] | Mapping[str, Any] | None

_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
#: Asterisk variable names (``__`` prefixes for inheritance included).
_VARIABLE_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
#: What Asterisk's argument splitter (main/app.c ``__ast_app_separate_args``, which
#: manager.c ``man_do_variable_value`` applies to every ``Variable:`` header) treats specially:
#: ``,`` separates variables, ``"`` toggles quoting and is removed, ``\`` escapes the next
#: character and is removed, and ``()`` / ``[]`` nest (a ``,`` inside them does not split).
_VARIABLE_SPECIALS = re.compile(r'([\\,"()\[\]])')


def control_character(text: str) -> str | None:
    """The first control character in ``text`` (C0, DEL or C1), described, or None."""
    for ch in text:
        if unicodedata.category(ch) == "Cc":
            if ch in "\r\n":
                return f"a line break ({'CR' if ch == chr(13) else 'LF'})"
            return f"a control character (U+{ord(ch):04X})"
    return None


def _check(key: str, value: str) -> None:
    bad = control_character(value)
    if bad is not None:
        raise AmiFieldError(f"AMI field {key!r} contains {bad}: refused (it could inject AMI commands)")


def escape_variable_value(value: str) -> str:
    """Escape a channel variable value for an Originate ``Variable:`` header.

    Asterisk splits each ``Variable:`` header on commas (so ``a,B=1`` would set a second
    variable ``B``), strips double quotes and backslashes, and does not split inside ``()`` or
    ``[]``. A backslash makes the next character literal, so each of those characters gets one:
    the channel then sees exactly ``value``.
    """
    return _VARIABLE_SPECIALS.sub(r"\\\1", value)


def encode_action(action: str, action_id: str, fields: Mapping[str, FieldValue]) -> bytes:
    """Serialise one action. Lists repeat the key; a dict becomes repeated ``name=value`` lines
    (Originate's ``Variable``), with each value escaped by :func:`escape_variable_value`.

    Raises :class:`AmiFieldError` (a ValueError) for a control character in any key or value,
    a key that is not a plain header name, or a variable name Asterisk would misread.
    """
    for key, text in (("Action", action), ("ActionID", action_id)):
        _check(key, text)
        if not text:
            raise AmiFieldError(f"AMI field {key!r} is empty")
    lines = [f"Action: {action}", f"ActionID: {action_id}"]
    for key, value in fields.items():
        if not _KEY_RE.fullmatch(key):
            raise AmiFieldError(f"AMI field name {key!r} is not a header name (letters, digits, '_', '-')")
        if value is None:
            continue
        if isinstance(value, bool):
            values = ["true" if value else "false"]
        elif isinstance(value, (str, int)):
            values = [str(value)]
        elif isinstance(value, Mapping):
            values = []
            for name, v in value.items():
                name = str(name)
                if not _VARIABLE_NAME_RE.fullmatch(name):
                    raise AmiFieldError(f"AMI {key} name {name!r} must be letters, digits and '_'")
                _check(f"{key} {name}", str(v))
                values.append(f"{name}={escape_variable_value(str(v))}")
        else:
            values = [str(v) for v in value]
        for v in values:
            _check(key, v)
            lines.append(f"{key}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def reply_error(action: str, response: AmiMessage | None) -> str | None:
    """Why ``response`` is a failure of ``action`` (None if Asterisk accepted it)."""
    if response is None:
        return None
    if (response.response or "").lower() in ("success", "follows", "goodbye"):
        return None
    return f"{action} failed: {response.get('Message') or response.response or 'no Response field'}"


# ---------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class ActionCompleted:
    """Asterisk answered the action. ``response`` may say Error: see :func:`reply_error`."""

    action_id: str
    action: str
    response: AmiMessage | None
    events: tuple[AmiMessage, ...] = ()


@dataclass(frozen=True)
class ActionFailed:
    """The action has no answer and never will: deadline passed, or the connection was lost."""

    action_id: str
    action: str
    error: AmiError


@dataclass(frozen=True)
class EventReceived:
    """An event that is not part of one of our actions' replies (for the listeners)."""

    message: AmiMessage


@dataclass(frozen=True)
class LoggedIn:
    banner: str | None


@dataclass(frozen=True)
class ConnectionDead:
    """The connection must be closed: login refused or unanswered, or a Ping went unanswered."""

    reason: str


Outcome = ActionCompleted | ActionFailed | EventReceived | LoggedIn | ConnectionDead

_USER, _LOGIN, _PING = "action", "login", "ping"


@dataclass
class _Pending:
    action_id: str
    action: str
    kind: str
    deadline: float
    timeout: float
    list_complete: str | None = None  # event name that ends an EventList (lower case)
    await_event: str | None = None  # e.g. OriginateResponse for async Originate (lower case)
    response: AmiMessage | None = None
    events: list[AmiMessage] = field(default_factory=list)


class AmiProtocol:
    """One AMI client connection's state, across reconnects.

    Call :meth:`connection_made` for each new connection (write what it returns), :meth:`receive`
    with what was read, :meth:`timeouts` and :meth:`ping_due` at :meth:`next_wakeup`, and
    :meth:`connection_lost` when the connection ends for any reason. ``now`` is any monotonic
    clock in seconds, the same for every call.
    """

    def __init__(self, username: str, secret: str, *, action_timeout: float = 5.0, ping_interval: float = 10.0,
                 ping_timeout: float | None = None, id_prefix: str = "vb-") -> None:
        if action_timeout <= 0 or ping_interval <= 0:
            raise ValueError("action_timeout and ping_interval must be positive")
        self.username = username
        self._secret = secret
        self.action_timeout = action_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout if ping_timeout is not None else min(action_timeout, ping_interval)
        self._prefix = id_prefix
        # ActionIDs are never reused, not even across connections: a late reply from an old
        # connection cannot be taken for the answer to a new action.
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._parser = AmiParser()
        self._next_ping: float | None = None
        self._ping_id: str | None = None
        self.state = "closed"  # closed → login → up → closed …
        self.banner: str | None = None

    # -------------------------------------------------------------- connection life cycle

    def connection_made(self, now: float) -> bytes:
        """A new connection is open: returns the Login to write. Nothing else is (re)sent."""
        self._parser = AmiParser()
        self._pending = {}
        self._next_ping = None
        self._ping_id = None
        self.banner = None
        self.state = "login"
        _, data = self._register("Login", {"Username": self.username, "Secret": self._secret, "Events": "on"},
                                 now, self.action_timeout, kind=_LOGIN)
        return data

    def connection_lost(self, reason: str) -> list[Outcome]:
        """The connection ended: every pending action fails now with ``reason``; none is kept."""
        pending, self._pending = self._pending, {}
        self.state = "closed"
        self._next_ping = None
        self._ping_id = None
        return [ActionFailed(p.action_id, p.action, AmiError(f"{p.action}: {reason}"))
                for p in pending.values() if p.kind == _USER]

    # -------------------------------------------------------------- actions

    def send_action(self, action: str, fields: Mapping[str, FieldValue], *, now: float,
                    timeout: float | None = None, list_complete: str | None = None,
                    await_event: str | None = None) -> tuple[str, bytes]:
        """Register ``action`` (deadline ``now + timeout``); return its ActionID and the bytes to write.

        ``list_complete``: collect the events carrying the ActionID until this one. ``await_event``:
        after a Success response, wait for this event (``OriginateResponse``). Raises AmiError if
        not logged in, AmiFieldError if a value cannot be sent.
        """
        if self.state != "up":
            raise AmiError(f"{action}: AMI is not logged in")
        if action.lower() in ("login", "logoff"):
            raise AmiError(f"{action}: the connection's login is managed by the client")
        t = self.action_timeout if timeout is None else timeout
        if t <= 0:
            raise ValueError(f"{action}: timeout must be positive, got {t}")
        return self._register(action, fields, now, t, kind=_USER, list_complete=list_complete,
                              await_event=await_event)

    def forget(self, action_id: str) -> None:
        """Nobody awaits ``action_id`` any more: a late reply is treated as unknown."""
        p = self._pending.get(action_id)
        if p is not None and p.kind == _USER:
            del self._pending[action_id]

    @property
    def pending(self) -> list[str]:
        """ActionIDs awaiting an answer (internal Login/Ping included)."""
        return list(self._pending)

    def _register(self, action: str, fields: Mapping[str, FieldValue], now: float, timeout: float, *,
                  kind: str, list_complete: str | None = None, await_event: str | None = None) -> tuple[str, bytes]:
        action_id = f"{self._prefix}{next(self._ids)}"
        data = encode_action(action, action_id, fields)  # raises before anything is registered
        self._pending[action_id] = _Pending(
            action_id, action, kind, now + timeout, timeout,
            list_complete=list_complete.lower() if list_complete else None,
            await_event=await_event.lower() if await_event else None)
        return action_id, data

    # -------------------------------------------------------------- input

    def receive(self, data: bytes, now: float) -> list[Outcome]:
        """Bytes read from the connection → outcomes. Raises AmiError on a malformed stream."""
        if self.state == "closed":
            return []
        out: list[Outcome] = []
        messages = self._parser.feed(data)
        self.banner = self._parser.banner
        for msg in messages:
            self._dispatch(msg, now, out)
            if self.state == "closed":
                break
        return out

    def _dispatch(self, msg: AmiMessage, now: float, out: list[Outcome]) -> None:
        aid = msg.action_id
        p = self._pending.get(aid) if aid else None
        if p is not None:
            # OriginateResponse carries a Response: key too; only event-less messages are replies.
            if msg.event is None and msg.response is not None and p.response is None:
                p.response = msg
                failed = msg.response.lower() == "error"
                if failed or (p.list_complete is None and p.await_event is None):
                    self._complete(p, now, out)
                return
            if msg.event is not None:
                # An event carrying our ActionID is part of this action's reply, not a broadcast.
                p.events.append(msg)
                if msg.event.lower() in (p.list_complete, p.await_event):
                    self._complete(p, now, out)
                return
        if msg.event is not None:
            out.append(EventReceived(msg))
        elif aid:
            log.debug("AMI reply for unknown or expired ActionID %s ignored", aid)

    def _complete(self, p: _Pending, now: float, out: list[Outcome]) -> None:
        del self._pending[p.action_id]
        if p.kind == _LOGIN:
            accepted = p.response is not None and (p.response.response or "").lower() == "success"
            if accepted:
                self.state = "up"
                self._next_ping = now + self.ping_interval
                out.append(LoggedIn(self.banner))
            else:
                why = (p.response.get("Message") or p.response.response) if p.response else "no response"
                self.state = "closed"
                out.append(ConnectionDead(f"login as {self.username!r} refused: {why}"))
        elif p.kind == _PING:
            # Any answer proves the other end is alive.
            self._ping_id = None
            self._next_ping = now + self.ping_interval
        else:
            out.append(ActionCompleted(p.action_id, p.action, p.response, tuple(p.events)))

    # -------------------------------------------------------------- time

    def timeouts(self, now: float) -> list[Outcome]:
        """Actions whose deadline has passed fail (removed: a late reply is ignored). An expired
        Login or Ping means the connection is dead."""
        out: list[Outcome] = []
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            del self._pending[p.action_id]
            no_answer = f"no answer from Asterisk within {p.timeout:g} s"
            if p.kind == _USER:
                out.append(ActionFailed(p.action_id, p.action, AmiError(f"{p.action}: {no_answer}")))
            elif p.kind == _LOGIN:
                self.state = "closed"
                out.append(ConnectionDead(f"login as {self.username!r} failed: {no_answer}"))
            else:
                self._ping_id = None
                self.state = "closed"
                out.append(ConnectionDead(f"liveness check failed: Ping: {no_answer}"))
        return out

    def ping_due(self, now: float) -> bytes | None:
        """The Ping to write if one is due (logged in, none outstanding, interval elapsed)."""
        if self.state != "up" or self._ping_id is not None or self._next_ping is None or now < self._next_ping:
            return None
        self._ping_id, data = self._register("Ping", {}, now, self.ping_timeout, kind=_PING)
        return data

    def next_wakeup(self) -> float | None:
        """When :meth:`timeouts` or :meth:`ping_due` next has something to do (None: nothing)."""
        times = [p.deadline for p in self._pending.values()]
        if self.state == "up" and self._ping_id is None and self._next_ping is not None:
            times.append(self._next_ping)
        return min(times) if times else None
