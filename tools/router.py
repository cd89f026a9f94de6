"""The tool router: every ``tool_call`` gets exactly one ``tool_result``, within the deadline.

The gateway waits at most 15 s for a result and the AI stalls while it waits, so the router
holds one rule above all others: for each call id, one answer, sent once, before the deadline
— whether the tool is unknown (answered at once), its arguments are invalid (at once), it
raises, it hangs, or the call ends under it. Tools run concurrently as tasks owned by the
call; ``aclose()`` cancels them and answers whatever is still open.

One overall deadline covers the whole tool call (``asyncio.timeout``), not each phase of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .base import TOOL_CALL_ID, CallControl, ToolError, ToolRegistry

log = logging.getLogger("voxbridge.tools")

SendResult = Callable[[str, str], Awaitable[Any]]


@dataclass(slots=True)
class ToolOutcome:
    call_id: str
    name: str
    args: dict[str, Any]
    origin: str  # "gateway" or "dtmf"
    outcome: str = "pending"  # ok | error | timeout | unknown_tool | invalid_args | cancelled
    result: str = ""
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
    """One per call."""

    def __init__(
        self,
        registry: ToolRegistry,
        call: CallControl,
        send_result: SendResult,
        *,
        allowed: list[str] | None = None,
        deadline: float = 14.0,
        on_called: Callable[[ToolOutcome], None] | None = None,
        on_completed: Callable[[ToolOutcome], None] | None = None,
    ) -> None:
        self._registry = registry
        self._call = call
        self._send = send_result
        self._allowed = None if allowed is None else set(allowed)
        self.deadline = deadline
        self._on_called = on_called
        self._on_completed = on_completed
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._answered: set[str] = set()
        self._closed = False
        self.outcomes: list[ToolOutcome] = []
        self._local_seq = 0

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def dispatch(self, call_id: str, name: str, args: dict[str, Any], *, problem: str | None = None,
                 origin: str = "gateway") -> None:
        """Start handling one tool call. Never raises; the answer always follows."""
        if call_id in self._answered or call_id in self._tasks:
            log.warning("duplicate tool_call %s (%s) ignored: it is already %s", call_id, name,
                        "answered" if call_id in self._answered else "running")
            return
        outcome = ToolOutcome(call_id, name, args, origin)
        self.outcomes.append(outcome)
        if self._on_called:
            self._on_called(outcome)
        if self._closed:
            self._finish_sync(outcome, "cancelled", format_error(name, "the call has ended"))
            return
        tool = self._registry.get(name) if name else None
        if problem is not None:
            self._finish_sync(outcome, "invalid_args", format_error(name, problem))
        elif tool is None or (self._allowed is not None and name not in self._allowed):
            known = sorted(self._allowed if self._allowed is not None else self._registry.names)
            self._finish_sync(outcome, "unknown_tool",
                              format_error(name, f"unknown tool {name!r}; available: {', '.join(known) or 'none'}"))
        elif (why := self._registry.validate(name, args)) is not None:
            self._finish_sync(outcome, "invalid_args", format_error(name, why))
        else:
            budget = min(tool.timeout or self.deadline, self.deadline)
            self._tasks[call_id] = asyncio.create_task(self._run(outcome, tool, budget), name=f"tool-{name}-{call_id}")

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
            except Exception as exc:  # noqa: BLE001 - a tool bug must still produce an answer
                log.exception("tool %s (%s) raised", tool.name, outcome.call_id)
                kind, text = "error", format_error(tool.name, f"internal error: {type(exc).__name__}")
            await self._answer(outcome, kind, text)
        finally:
            self._tasks.pop(outcome.call_id, None)

    def _finish_sync(self, outcome: ToolOutcome, kind: str, text: str) -> None:
        task = asyncio.create_task(self._answer(outcome, kind, text), name=f"tool-answer-{outcome.call_id}")
        self._tasks[outcome.call_id] = task
        task.add_done_callback(lambda _t, cid=outcome.call_id: self._tasks.pop(cid, None))

    async def _answer(self, outcome: ToolOutcome, kind: str, text: str) -> None:
        if outcome.call_id in self._answered:
            return
        self._answered.add(outcome.call_id)
        outcome.outcome = kind
        outcome.result = text
        outcome.duration_ms = (time.monotonic() - outcome.started) * 1000
        log.info("tool %s (%s) → %s in %.0f ms", outcome.name, outcome.call_id, kind, outcome.duration_ms)
        if self._on_completed:
            self._on_completed(outcome)
        if outcome.origin == "gateway" and not self._closed:
            await self._send(outcome.call_id, text)

    async def aclose(self, *, answer_pending: bool = True, grace: float = 0.0) -> None:
        """Cancel running tools; answer open gateway calls with 'the call has ended' if asked.

        ``grace``: first let running tools finish for up to this long. The call ended because
        a tool handed it to Asterisk (a transfer's Redirect closes the AudioSocket before AMI's
        Response reaches the tool): that tool's real result must win over "the call has ended".
        """
        if grace > 0 and self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=grace)
        open_outcomes = [o for o in self.outcomes if o.call_id not in self._answered]
        if answer_pending:
            for o in open_outcomes:
                if o.origin == "gateway":
                    self._answered.add(o.call_id)
                    o.outcome, o.result = "cancelled", format_error(o.name, "the call has ended")
                    try:
                        await self._send(o.call_id, o.result)
                    except Exception:  # noqa: BLE001 - the gateway may already be gone
                        pass
        self._closed = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for o in open_outcomes:
            if o.outcome == "pending":
                o.outcome = "cancelled"
            o.duration_ms = o.duration_ms or (time.monotonic() - o.started) * 1000
            if self._on_completed:
                self._on_completed(o)
