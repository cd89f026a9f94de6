"""Real sockets on loopback: the bridge in-process, the reference gateway, simulated Asterisk callers."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Config
from bridge.devtools.dial import AudioSocketCaller
from bridge.devtools.gateway_sim import GatewaySim

API_KEY = "test-key-0123"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture
async def sim():
    s = GatewaySim(accepted_keys={API_KEY})
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def make_bridge(sim):
    """``await make_bridge(profile={...}, tools=[...], **config)`` → a started Bridge on port 0."""
    bridges: list[Bridge] = []

    async def factory(profile: dict[str, Any] | None = None, tools: list[Any] | None = None,
                      **overrides: Any) -> Bridge:
        data: dict[str, Any] = {
            "audiosocket": {"listen": "127.0.0.1:0"},
            "gateway": {"url": sim.url, "api_key": API_KEY, "settle_ms": 0},
            "api": {"enabled": False},
            "profiles": {"default": profile or {}},
        }
        data = deep_merge(data, overrides)
        bridge = Bridge(Config.model_validate(data), tools=tools)
        await bridge.start()
        bridges.append(bridge)
        return bridge

    yield factory
    for b in bridges:
        await b.stop()
    for b in bridges:
        # Nothing a call owned may outlive it.
        assert b.sessions == {}, f"sessions left behind: {list(b.sessions)}"
        assert len(b.clock) == 0, "playout clock still has sinks"


@pytest.fixture
async def dial():
    """``await dial(bridge, rate=8000)`` → a connected AudioSocketCaller (closed after the test)."""
    callers: list[AudioSocketCaller] = []

    async def factory(bridge: Bridge, rate: int = 8000, **kw: Any) -> AudioSocketCaller:
        c = AudioSocketCaller(**kw)
        host, port = bridge.audiosocket_address
        await c.connect(host, port, sample_rate=rate)
        callers.append(c)
        return c

    yield factory
    for c in callers:
        await c.aclose()


async def accepted(sim: GatewaySim):
    """The next gateway session, once its config has been accepted."""
    session = await sim.next_session()
    await session.wait_accepted()
    return session


@pytest.fixture
async def no_leaked_tasks():
    """Yields a checker: every task started since the fixture began has finished."""
    before = set(asyncio.all_tasks())

    async def check(timeout: float = 3.0) -> None:
        me = asyncio.current_task()
        async with asyncio.timeout(timeout):
            while True:
                left = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
                if not left:
                    return
                await asyncio.wait(left, timeout=0.1)
        # unreachable: asyncio.timeout raises with the tasks still pending

    return check
