"""Supervision of the bridge's long-lived parts: nothing dies silently.

The parts that live as long as the process — the AMI connection loop, each webhook
subscription's delivery worker, the call-history writer — each handle the failures they were
built for (a dropped connection, a subscriber answering 500, a full disk). A failure nobody
planned for (a bug) used to end such a task quietly and leave a half-dead bridge: AMI never
reconnecting, webhooks never delivered again, while calls kept coming in.

:class:`Supervisor` runs those parts instead. An unexpected exception is logged with its
traceback, counted, and the part is started again after a backoff. If a part keeps crashing
(more than ``max_restarts`` times within ``window`` seconds) restarting it is not helping: the
supervisor declares the process broken, and the CLI stops the bridge and exits non-zero, so a
service manager restarts it whole. Cancellation is never a crash; returning normally ends the
part for good.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("voxbridge.supervise")

FatalHandler = Callable[[str, BaseException], None]


class Supervisor:
    """Starts and watches long-lived tasks; one per :class:`~bridge.app.Bridge`.

    ``on_fatal(name, exc)`` is called once, when a part gives up (see the module docstring).
    ``restarts`` counts restarts per part name (exported as a metric).
    """

    def __init__(self, on_fatal: FatalHandler | None = None, *, max_restarts: int = 5, window: float = 60.0,
                 backoff: float = 0.5, backoff_max: float = 10.0) -> None:
        self._on_fatal = on_fatal
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.restarts: collections.Counter[str] = collections.Counter()
        self.crashes: collections.Counter[str] = collections.Counter()
        self.fatal: tuple[str, BaseException] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, name: str, factory: Callable[[], Awaitable[Any]], *, restart: bool = True) -> asyncio.Task[None]:
        """Run ``factory()`` as the part ``name``; call it again after an unexpected exception.

        With ``restart=False`` the first unexpected exception is fatal (for parts whose state
        cannot be rebuilt by starting over).
        """
        task = asyncio.create_task(self._keep(name, factory, restart), name=f"supervised-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def watch(
        self, task: asyncio.Task[Any], name: str, on_crash: Callable[[BaseException], None] | None = None
    ) -> None:
        """For a task that is started on demand (not restarted from here): an unexpected exception
        is logged with its traceback and counted, then ``on_crash(exc)`` runs (e.g. to start a
        fresh worker if work is still queued)."""

        def done(t: asyncio.Task[Any]) -> None:
            if t.cancelled() or (exc := t.exception()) is None:
                return
            self.crashes[name] += 1
            log.error("%s crashed: %r", name, exc, exc_info=exc)
            if on_crash is not None:
                try:
                    on_crash(exc)
                except Exception as again:  # noqa: BLE001 - the recovery itself failed: the process is broken
                    self._give_up(name, again)

        task.add_done_callback(done)

    async def stop(self) -> None:
        """Cancel every supervised part and wait for them to end."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ internals

    async def _keep(self, name: str, factory: Callable[[], Awaitable[Any]], restart: bool) -> None:
        recent: collections.deque[float] = collections.deque()
        delay = self.backoff
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # deliberately broad: the whole point: no exception ends a part silently
                self.crashes[name] += 1
                now = time.monotonic()
                recent.append(now)
                while recent and now - recent[0] > self.window:
                    recent.popleft()
                if not restart or len(recent) > self.max_restarts:
                    log.critical("%s crashed %d time(s) in %.0f s: giving up", name, len(recent), self.window,
                                 exc_info=exc)
                    self._give_up(name, exc)
                    return
                if now - started > self.window:
                    delay = self.backoff  # it had been healthy for a while: start the backoff afresh
                log.error("%s crashed (%r); restarting in %.1f s", name, exc, delay, exc_info=exc)
                self.restarts[name] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _give_up(self, name: str, exc: BaseException) -> None:
        if self.fatal is not None:
            return
        self.fatal = (name, exc)
        if self._on_fatal is not None:
            self._on_fatal(name, exc)
