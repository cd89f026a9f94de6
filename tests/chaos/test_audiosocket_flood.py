"""Hundreds of AudioSocket connections that never identify themselves, and slowloris.

Anyone who can reach port 9000 can open connections and send nothing (or a UUID frame one
byte at a time). ``audiosocket.uuid_timeout`` bounds what each costs: a connection without a
complete UUID frame by then is closed (bridge/server.py). Meanwhile a real call keeps its 20 ms
pacing and a new call is still accepted while the flood is open.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from .conftest import accepted, assert_paced

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]

UUID_TIMEOUT = 1.0
IDLE = 300  # connections that send nothing
SLOW = 10  # slowloris: a UUID frame trickled one byte every 300 ms
TRICKLE_S = 0.3
# Beyond uuid_timeout: the timer fires on a loop that is also accepting 300 connections.
CLOSE_SLACK = 1.5


async def _await_close(reader: asyncio.StreamReader) -> None:
    """Until the bridge closes the connection (EOF or reset); whatever it sent is discarded."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass


async def idle_connection(host: str, port: int, connected: asyncio.Queue[None]) -> float:
    """Connect, send nothing; seconds until the bridge closed it."""
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    connected.put_nowait(None)
    try:
        await _await_close(reader)
        return time.monotonic() - t0
    finally:
        writer.close()


async def slowloris(host: str, port: int, connected: asyncio.Queue[None], header_first: bool) -> float:
    """Trickle a UUID frame (3-byte header first, or every byte alike) one byte per 300 ms;
    seconds until the bridge closed the connection."""
    frame = b"\x01\x00\x10" + uuid.uuid4().bytes
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    connected.put_nowait(None)
    closed = asyncio.ensure_future(_await_close(reader))
    try:
        pos = 0
        if header_first:
            writer.write(frame[:3])
            pos = 3
        while pos < len(frame) and not closed.done():
            writer.write(frame[pos:pos + 1])
            pos += 1
            await asyncio.wait([closed], timeout=TRICKLE_S)
        await closed  # the frame was never meant to complete: 16 bytes take 4.8 s, the timeout is 1 s
        assert pos < len(frame), "the slowloris sent a whole UUID frame before being closed"
        return time.monotonic() - t0
    finally:
        closed.cancel()
        writer.close()


async def test_connections_without_a_uuid_and_slowloris_are_closed_while_calls_carry_on(make_bridge, sim, dial):
    bridge = await make_bridge(audiosocket={"uuid_timeout": UUID_TIMEOUT}, profile={"first_message": None})
    bystander = await dial(bridge)
    await accepted(sim)
    assert await bystander.wait_audio(320 * 10, timeout=5)
    host, port = bridge.audiosocket_address

    connected: asyncio.Queue[None] = asyncio.Queue()
    flood_at = time.monotonic()
    attackers = [asyncio.ensure_future(idle_connection(host, port, connected)) for _ in range(IDLE)]
    attackers += [asyncio.ensure_future(slowloris(host, port, connected, header_first=i % 2 == 0))
                  for i in range(SLOW)]
    async with asyncio.timeout(10):
        for _ in attackers:
            await connected.get()
    all_connected = time.monotonic()

    # While every attacker is still connected, a real call is accepted and flows.
    newcomer = await dial(bridge)
    await accepted(sim)
    assert await newcomer.wait_audio(320 * 10, timeout=3)
    assert time.monotonic() - all_connected < UUID_TIMEOUT, "the new call came only after the flood was gone"
    assert sum(1 for a in attackers if not a.done()) == IDLE + SLOW, "attackers were closed before uuid_timeout"

    async with asyncio.timeout(UUID_TIMEOUT + CLOSE_SLACK + 5):
        lifetimes = await asyncio.gather(*attackers)
    idle, slow = lifetimes[:IDLE], lifetimes[IDLE:]
    for what, times in (("idle", idle), ("slowloris", slow)):
        assert min(times) >= UUID_TIMEOUT * 0.9, f"a {what} connection was closed after {min(times):.2f} s"
        assert max(times) <= UUID_TIMEOUT + CLOSE_SLACK, (
            f"a {what} connection was held {max(times):.2f} s (uuid_timeout {UUID_TIMEOUT:g} s)")

    # Nothing of the flood is left in the bridge: only the two real calls.
    assert len(bridge.connections) == 2 and len(bridge.sessions) == 2
    # The calls did not notice: pacing through the flood (and half a second after), still up.
    for c in (bystander, newcomer):
        assert await c.wait_audio(c.received_audio_bytes + 320 * 25, timeout=3)
        assert not c.ended.is_set()
    assert_paced(bystander, flood_at, what="the call in progress during the flood")
    assert_paced(newcomer, newcomer.connected_at, what="the call placed during the flood")
