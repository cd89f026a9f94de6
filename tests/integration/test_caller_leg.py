"""A whole call over a caller leg that is not AudioSocket (bridge/leg.py).

The in-memory leg (tests/fakes.py) stands where an ARI/RTP ingress would: the session, the
reference gateway behind the normal adapter, the playout clock, tools and events all run as for
an AudioSocket call, and no socket carries the caller.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from bridge.devtools.dial import tone
from bridge.state import CallState
from tests.fakes import MemoryLeg

from .conftest import accepted


async def test_a_whole_call_runs_over_an_in_memory_leg(make_bridge, sim):
    bridge = await make_bridge(profile={"first_message": "Hello there."})
    events = bridge.events.subscribe()
    leg = MemoryLeg(rate=8000)
    call_id = str(uuid.uuid4())
    session = bridge.open_session(call_id, leg)
    assert session is not None and bridge.sessions[call_id] is session
    leg.listener = session

    gw = await accepted(sim)  # the gateway adapter connected to the reference gateway
    assert session.state is CallState.ACTIVE and session.info()["state"] == "active"
    async with asyncio.timeout(5):  # the greeting is played out, frame by frame, to the leg
        while sum(1 for f in leg.frames if np.abs(np.frombuffer(f, "<i2")).max() > 500) < 10:
            await asyncio.sleep(0.05)
    assert all(len(f) == 320 for f in leg.frames)  # 20 ms at 8 kHz, paced by the clock

    speech = tone(700, 600, 8000)
    leg.say(speech)  # the caller speaks: it reaches the gateway byte for byte
    async with asyncio.timeout(5):
        while speech not in bytes(gw.audio):
            await asyncio.sleep(0.05)

    leg.press("5")
    leg.hang_up()
    async with asyncio.timeout(5):
        await session.ended.wait()
    assert session.state is CallState.ENDED and session.end_reason == "caller-hangup"
    assert leg.hung_up and call_id not in bridge.sessions
    async with asyncio.timeout(5):
        await gw.closed.wait()
    seen = []
    while not events.queue.empty():
        seen.append(events.queue.get_nowait())
    types = [e.type for e in seen if e.call_id == call_id]
    assert types[:2] == ["call.started", "call.answered"] and "dtmf" in types and types[-1] == "call.ended"
