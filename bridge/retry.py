"""The one retry policy for what voxbridge sends over HTTP: tool requests and webhook deliveries.

Both retry the same way, built here on tenacity (:func:`retrying`):

- **Exponential back-off**: attempt ``n`` (1-based) that failed waits
  ``min(maximum, initial * 2**(n-1))``, plus up to ``jitter`` (a fraction) of that so many
  callers retrying against the same restarting endpoint do not do it in lockstep, and never
  more than ``maximum``.
- **Retry-After**: when the failed attempt's answer asked for a longer wait (whole seconds, as
  webhook receivers send it), that wait is used, but never more than ``maximum``.
- **Stops** after ``attempts`` attempts, or — with a ``deadline`` (event-loop time) — as soon as
  the next attempt could not start, after its back-off, at least ``min_attempt_s`` before it.
- **What is retried** is the caller's (a tenacity ``retry`` condition): tools/http.py retries
  connection errors and 5xx answers; bridge/webhooks.py every failure but a refusal.

The two users keep their own numbers (README, "HTTP tools": a few quick retries within the
tool's timeout; "Webhook delivery": 6 attempts over about a minute, honouring Retry-After).

Shared on purpose, like bridge/signing.py: pure policy (tenacity and the standard library), so
``tools`` may import it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

__all__ = ["Backoff", "retrying"]


@dataclass(frozen=True, slots=True)
class Backoff(wait_base):
    """Exponential back-off with proportional jitter, capped, honouring a Retry-After.

    ``retry_after`` reads the wait an answer asked for from a failed attempt (None: none asked).
    """

    initial: float
    maximum: float
    jitter: float = 0.1
    retry_after: Callable[[RetryCallState], float | None] | None = None

    def delay(self, attempt: int, asked: float | None = None) -> float:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        delay = min(self.maximum, self.initial * 2.0 ** (attempt - 1))
        delay *= 1 + random.random() * self.jitter
        if asked is not None:
            delay = max(delay, asked)
        return min(delay, self.maximum)

    def __call__(self, retry_state: RetryCallState) -> float:
        asked = self.retry_after(retry_state) if self.retry_after is not None else None
        return self.delay(retry_state.attempt_number, asked)


class StopAtDeadline(stop_base):
    """Stop when the next attempt could not start ``min_attempt_s`` before ``deadline`` (loop
    time), counting its back-off."""

    def __init__(self, deadline: float, min_attempt_s: float = 0.0) -> None:
        self.deadline = deadline
        self.min_attempt_s = min_attempt_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        now = asyncio.get_running_loop().time()
        return now + (retry_state.upcoming_sleep or 0.0) + self.min_attempt_s >= self.deadline


def retrying(*, attempts: int, backoff: Backoff, retry: retry_base, deadline: float | None = None,
             min_attempt_s: float = 0.0,
             before_sleep: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
    """An ``AsyncRetrying`` for one operation (``async for attempt in retrying(...)``).

    The last attempt's exception is re-raised as it is once the policy stops, so callers handle
    their own errors, not tenacity's ``RetryError``.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    stop: stop_base = stop_after_attempt(attempts)
    if deadline is not None:
        stop = stop | StopAtDeadline(deadline, min_attempt_s)
    if before_sleep is None:
        return AsyncRetrying(stop=stop, wait=backoff, retry=retry, reraise=True)
    return AsyncRetrying(stop=stop, wait=backoff, retry=retry, before_sleep=before_sleep, reraise=True)
