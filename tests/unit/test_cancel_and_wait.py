"""bridge/gateway/base.py cancel_and_wait: stopping a helper task without eating the caller's own
cancellation (the bug a review found in the early gateway connection's hand-over)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.gateway.base import cancel_and_wait


async def test_the_callers_own_cancellation_is_not_swallowed():
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # takes a moment to finish cancelling, as a closing socket does

    after = []

    async def caller() -> None:
        helper = asyncio.create_task(slow_to_stop())
        await asyncio.sleep(0)
        await cancel_and_wait(helper)
        after.append("carried on")  # must not happen: the caller was cancelled meanwhile

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after == []


async def test_a_helper_that_failed_has_its_failure_raised_and_a_cancelled_one_is_quiet():
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("broke while stopping") from None

    helper = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broke while stopping"):
        await cancel_and_wait(helper)
    quiet = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait(quiet)
    assert quiet.cancelled()
