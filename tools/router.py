"""The tool router: every ``tool_call`` gets exactly one ``tool_result``, within the deadline.

The gateway waits at most 15 s for a result and the AI stalls while it waits, so the router
holds one rule above all others: for each call id, one answer, sent once, before the deadline
— whether the tool is unknown (answered at once), its arguments are invalid (at once), too
many tools are already running (at once, "busy"), it raises, it hangs, or the call ends under it.

Exactly-once by construction
----------------------------
Each tool call id has one small state machine, ``PENDING → ANSWERED``, and one way through
it: :meth:`ToolRouter._claim`. Claiming is synchronous (no ``await`` between the check and the
transition), so whichever path claims first — the tool's own task, an immediate refusal, or
teardown — owns the answer, and every later claim for that id is a no-op. Only the claimer
records the outcome, fires ``on_completed`` and queues the text; nothing else ever sends.

Sending is done by one sender task per router, draining an ordered queue of claimed answers
(so answers go out in the order they were decided, and a burst of immediate answers costs
one task, not one each). A send that suspends (a full WebSocket write buffer) delays the
queue but cannot reopen an id; a send that raises is logged and the id stays answered.

Concurrency
-----------
At most ``max_concurrent`` tools run at once per call (``tool_concurrency`` in the config).
A tool call beyond that is answered at once with a ``busy`` error the AI can act on. So a
gateway that floods tool calls costs at most ``max_concurrent`` tool tasks plus the sender.

Teardown
--------
:meth:`ToolRouter.aclose` optionally lets running tools finish for ``grace`` seconds (a
transfer's real result must win over "the call has ended"), then claims every open call as
``cancelled`` in one synchronous sweep, cancels the tool tasks, and — when the gateway is
still there (``answer_pending``) — waits for the queue to drain, at most ``drain_timeout``.
Tool calls that arrive while it runs are answered "the call has ended"; after it returns the
router is closed and sends nothing more (the session hangs up the gateway next).

One overall deadline covers the whole tool call (``asyncio.timeout``), not each phase of it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .base import TOOL_CALL_ID, CallControl, ToolError, ToolRegistry

log = logging.getLogger("voxbridge.tools")

SendResult = Callable[[str, str], Awaitable[Any]]

#: How many tools may run at once per call unless the caller says otherwise (the config's
#: ``tool_concurrency`` default).
DEFAULT_MAX_CONCURRENT = 8
#: How many :class:`ToolOutcome` records a router keeps (the newest). Only the records are
#: bounded: the ids already seen are kept for the whole call, so a duplicate id is never
#: answered twice however many calls came in between (an id costs a few dozen bytes and a
#: call's length is bounded by its profile's ``max_duration``).
DEFAULT_MAX_OUTCOMES = 1000
#: How long teardown waits for queued answers to reach a gateway that is still connected.
DEFAULT_DRAIN_TIMEOUT = 5.0


class AnswerState(enum.Enum):
    """Where one tool call id is in its life; the only transition is PENDING → ANSWERED."""

    PENDING = "pending"
    ANSWERED = "answered"


@dataclass(slots=True)
class ToolOutcome:
    call_id: str
    name: str
    args: dict[str, Any]
    origin: str  # "gateway" or "dtmf"
    # pending | ok | error | timeout | unknown_tool | invalid_args | busy | cancelled
    outcome: str = "pending"
    result: str = ""  # the one text sent for this id (or that would have been, had the gateway been there)
    started: float = field(default_factory=time.monotonic)
    duration_ms: float = 0.0


def format_result(value: Any) -> str:
    if value is None:
        return "ok"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def format_error(name: str, message: str) -> str:
    return json.dumps({"error": message, "tool": name}, ensure_ascii=False)


class ToolRouter:
    """One per call: runs its tool calls and answers each exactly once."""

    def __init__(
        self,
        registry: ToolRegistry,
        call: CallControl,
        send_result: SendResult,
        *,
        allowed: list[str] | None = None,
        local_allowed: list[str] | None = None,
        deadline: float = 14.0,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_outcomes: int = DEFAULT_MAX_OUTCOMES,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        on_called: Callable[[ToolOutcome], None] | None = None,
        on_completed: Callable[[ToolOutcome], None] | None = None,
    ) -> None:
        if not deadline > 0:
            raise ValueError(f"deadline must be > 0 seconds, got {deadline!r}")
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an integer >= 1, got {max_concurrent!r}")
        if isinstance(max_outcomes, bool) or not isinstance(max_outcomes, int) or max_outcomes < 1:
            raise ValueError(f"max_outcomes must be an integer >= 1, got {max_outcomes!r}")
        if not drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds, got {drain_timeout!r}")
        self._registry = registry
        self._call = call
        self._send = send_result
        # Separate allowances per origin: what the AI was offered (``allowed``, which the mid-call
        # ``tools`` command replaces) and what the bridge itself may run for the caller
        # (``local_allowed``: DTMF shortcuts). The AI must never reach a tool it was not offered
        # just because a key on the phone runs it. ``None``: every registered tool.
        self._allowed = None if allowed is None else set(allowed)
        self._local_allowed = self._allowed if local_allowed is None else set(local_allowed)
        self.deadline = deadline
        self.max_concurrent = max_concurrent
        self.drain_timeout = drain_timeout
        self._on_called = on_called
        self._on_completed = on_completed
        #: Every id ever dispatched → its state. The single owner of "answered".
        self._state: dict[str, AnswerState] = {}
        #: The outcomes still PENDING (at most the running tools): what teardown must answer.
        self._open: dict[str, ToolOutcome] = {}
        #: Running tool tasks, by call id (at most ``max_concurrent``).
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Claimed answers waiting to be sent, in the order they were decided.
        self._queue: deque[tuple[str, str, str]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._sending = True  # False once the gateway is gone or the router is closed
        self._closing = False
        self._closed = asyncio.Event()
        #: The newest ``max_outcomes`` tool calls, oldest first (see DEFAULT_MAX_OUTCOMES).
        self.outcomes: deque[ToolOutcome] = deque(maxlen=max_outcomes)
        self.outcomes_total = 0
        self.send_failures = 0
        self._local_seq = 0

    @property
    def pending(self) -> int:
        """Tools running now."""
        return len(self._tasks)

    @property
    def queued(self) -> int:
        """Answers decided but not yet handed to the gateway."""
        return len(self._queue)

    def state(self, call_id: str) -> AnswerState | None:
        """The state of one tool call id (``None``: never dispatched)."""
        return self._state.get(call_id)

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, call_id: str, name: str, args: dict[str, Any], *, problem: str | None = None,
                 origin: str = "gateway") -> None:
        """Start handling one tool call. Never raises; exactly one answer always follows."""
        if call_id in self._state:
            log.warning("duplicate tool_call %s (%s) ignored: it is already %s", call_id, name,
                        "running" if self._state[call_id] is AnswerState.PENDING else "answered")
            return
        self._state[call_id] = AnswerState.PENDING
        outcome = ToolOutcome(call_id, name, args, origin)
        self._open[call_id] = outcome
        self.outcomes.append(outcome)
        self.outcomes_total += 1
        self._notify(self._on_called, outcome, "on_called")
        if self._closing:
            self._claim(outcome, "cancelled", format_error(name, "the call has ended"))
            return
        tool = self._registry.get(name) if name else None
        allowed = self._allowed if origin == "gateway" else self._local_allowed
        if problem is not None:
            self._claim(outcome, "invalid_args", format_error(name, problem))
        elif tool is None or (allowed is not None and name not in allowed):
            # Only what this caller may call: naming other tools would offer the AI what it was not.
            known = sorted(self._registry.names if allowed is None else
                           (n for n in allowed if self._registry.get(n) is not None))
            self._claim(outcome, "unknown_tool",
                        format_error(name, f"unknown tool {name!r}; available: {', '.join(known) or 'none'}"))
        elif (why := self._registry.validate(name, args)) is not None:
            self._claim(outcome, "invalid_args", format_error(name, why))
        elif len(self._tasks) >= self.max_concurrent:
            n = len(self._tasks)
            self._claim(outcome, "busy", format_error(
                name, f"busy: {n} tool call{'s are' if n != 1 else ' is'} already running on this call; "
                      "try again when one finishes"))
        else:
            budget = min(tool.timeout or self.deadline, self.deadline)
            self._tasks[call_id] = asyncio.create_task(self._run(outcome, tool, budget), name=f"tool-{name}-{call_id}")

    def set_allowed(self, names: list[str]) -> None:
        """Replace the tools the AI may call from now on (the API's mid-call ``tools`` command).
        Calls already running finish; a later call of a removed tool is answered with an error.
        What the bridge runs itself (``local_allowed``: DTMF shortcuts) is not affected."""
        self._allowed = set(names)

    def run_local(self, name: str, args: dict[str, Any], origin: str = "dtmf") -> None:
        """Run a tool the bridge itself decided on (a DTMF shortcut): no result goes to the gateway."""
        self._local_seq += 1
        self.dispatch(f"{origin}-{self._local_seq}", name, args, origin=origin)

    async def _run(self, outcome: ToolOutcome, tool: Any, budget: float) -> None:
        TOOL_CALL_ID.set(outcome.call_id)  # this task's own context: visible to the tool only
        try:
            try:
                async with asyncio.timeout(budget):
                    value = await tool.run(self._call, dict(outcome.args))
                kind, text = "ok", format_result(value)
            except TimeoutError:
                kind, text = "timeout", format_error(tool.name, f"the tool did not answer within {budget:g} s")
                log.warning("tool %s (%s) timed out after %.1f s", tool.name, outcome.call_id, budget)
            except ToolError as exc:
                kind, text = "error", format_error(tool.name, str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # deliberately broad: a tool bug must still produce an answer
                log.exception("tool %s (%s) raised", tool.name, outcome.call_id)
                kind, text = "error", format_error(tool.name, f"internal error: {type(exc).__name__}")
            self._claim(outcome, kind, text)  # a no-op if teardown claimed it first
        finally:
            self._tasks.pop(outcome.call_id, None)
            # Cancelled by someone other than teardown (which claims before it cancels): the
            # call still gets its one answer.
            self._claim(outcome, "cancelled", format_error(tool.name, "the tool was cancelled"))

    # ------------------------------------------------------------------ the one owner of "answered"

    def _claim(self, outcome: ToolOutcome, kind: str, text: str) -> bool:
        """PENDING → ANSWERED for ``outcome``; False (and nothing done) if already answered.

        Synchronous on purpose: no other path can run between the check and the transition,
        so the claimer is the only one that records, reports and queues an answer for this id.
        """
        cid = outcome.call_id
        if self._state.get(cid) is not AnswerState.PENDING:
            return False
        self._state[cid] = AnswerState.ANSWERED
        del self._open[cid]
        outcome.outcome = kind
        outcome.result = text
        outcome.duration_ms = (time.monotonic() - outcome.started) * 1000
        log.info("tool %s (%s) → %s in %.0f ms", outcome.name, cid, kind, outcome.duration_ms)
        if outcome.origin == "gateway" and self._sending:
            self._queue.append((cid, outcome.name, text))
            if self._sender is None or self._sender.done():
                self._sender = asyncio.create_task(self._drain_queue(), name=f"tool-results-{self._call.call_id}")
        self._notify(self._on_completed, outcome, "on_completed")
        return True

    @staticmethod
    def _notify(hook: Callable[[ToolOutcome], None] | None, outcome: ToolOutcome, what: str) -> None:
        if hook is None:
            return
        try:
            hook(outcome)
        except Exception:  # deliberately broad: a reporting bug must not cost the call its answer
            log.exception("%s hook failed for tool %s (%s)", what, outcome.name, outcome.call_id)

    async def _drain_queue(self) -> None:
        """The router's one sender: hands queued answers to the gateway, in order, one at a time."""
        while self._queue:
            cid, name, text = self._queue.popleft()
            try:
                await self._send(cid, text)
            except asyncio.CancelledError:
                # Only teardown cancels the sender, and it logs why (gateway gone, or too slow).
                log.debug("tool result for %s (%s) not delivered: teardown stopped the sender", cid, name)
                raise
            except OSError as exc:  # ConnectionError included: the gateway went away under us
                self.send_failures += 1
                log.info("tool result for %s (%s) not delivered: the gateway connection is gone (%s)",
                         cid, name, exc)
            except Exception:  # deliberately broad: logged with its traceback; the id stays answered
                self.send_failures += 1
                log.exception("sending the tool result for %s (%s) failed", cid, name)

    # ------------------------------------------------------------------ teardown

    async def aclose(self, *, answer_pending: bool = True, grace: float = 0.0) -> None:
        """Cancel running tools; answer open gateway calls with 'the call has ended' if asked.

        ``answer_pending``: the gateway is still connected, so every open call gets its answer
        and queued answers are delivered (waiting at most ``drain_timeout``). Without it the
        gateway is gone: nothing more is sent, but every call is still recorded and reported.

        ``grace``: first let running tools finish for up to this long. The call ended because
        a tool handed it to Asterisk (a transfer's Redirect closes the AudioSocket before AMI's
        Response reaches the tool): that tool's real result must win over "the call has ended".

        Idempotent: a second call waits for the first to finish.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        try:
            if grace > 0 and self._tasks:
                await asyncio.wait(list(self._tasks.values()), timeout=grace)
            if not answer_pending:
                self._stop_sending()
            self._answer_all_open()
            tasks = list(self._tasks.values())
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            # Tool calls may still arrive (and be answered) while this waits: keep waiting
            # until the sender is idle with nothing queued, or the time is up.
            end = loop.time() + self.drain_timeout
            while self._sending and self._sender is not None and not self._sender.done():
                remaining = end - loop.time()
                if remaining <= 0:
                    log.warning("the gateway took more than %g s to accept %d tool result(s); giving up on them",
                                self.drain_timeout, len(self._queue) + 1)
                    break
                await asyncio.wait({self._sender}, timeout=remaining)
        finally:
            # Also reached if aclose itself is cancelled: nothing may stay open or running.
            self._stop_sending()
            self._answer_all_open()
            for t in self._tasks.values():
                t.cancel()
            if self._sender is not None and not self._sender.done():
                await asyncio.wait({self._sender})
            self._closed.set()

    def _answer_all_open(self) -> None:
        """One synchronous sweep: every call still open is answered 'the call has ended' now."""
        for o in list(self._open.values()):
            self._claim(o, "cancelled", format_error(o.name, "the call has ended"))

    def _stop_sending(self) -> None:
        """No more sends: drop what is queued and stop the sender (the ids stay answered)."""
        self._sending = False
        if self._queue:
            log.info("%d queued tool result(s) not sent: the gateway is gone or stopped taking them",
                     len(self._queue))
            self._queue.clear()
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
