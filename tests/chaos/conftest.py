"""The chaos tier: faults injected around the real bridge, on loopback only.

Each test runs the real :class:`bridge.app.Bridge` in-process (the fixtures of
``tests/integration/conftest.py``: the reference gateway ``bridge.devtools.gateway_sim``, simulated
Asterisk callers) and breaks something the bridge depends on: the gateway dies or goes silent,
webhook subscribers hang or fail, the call history cannot be written, AudioSocket is flooded,
the gateway floods tool calls. What the tests check is what an operator sees: what the caller
hears (and when), whether other calls keep their 20 ms pacing, and what ``/metrics`` says.

The tier is bounded (a handful of tests, each well under a minute) and runs with the rest of
the suite; every test carries the ``chaos`` marker (``-m "not chaos"`` leaves it out).

This module adds the fault injectors:

* :class:`ChaosProxy` — a TCP relay between the bridge and the gateway that can kill every
  connection (RST or FIN, no WebSocket close frame: the gateway process died) or freeze it
  (half-open: nothing is read or forwarded any more, yet no TCP close is ever seen);
* ``gateway_process`` — the reference gateway in a child process (:mod:`tests.chaos.gateway_process`),
  for floods whose sender's cost must not be billed to the bridge's pacing;
* :class:`HangingHttpServer` and :class:`StatusHttpServer` — webhook subscribers that accept
  TCP and never answer, or answer every request with one status;
* helpers that read what a caller heard: per-frame arrival times, the dominant frequency of
  each 20 ms frame, and pacing assertions with generous bounds (tight numbers belong to
  ``voxbridge bench``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import numpy as np
import pytest

from bridge.devtools.dial import AudioSocketCaller

# The integration tier's fixtures (a started Bridge on port 0 with the reference gateway, and
# simulated callers) are the chaos tier's too: imported here, they are registered for tests/chaos.
from tests.integration.conftest import API_KEY, accepted, dial, make_bridge, sim  # noqa: F401

from .gateway_process import GatewayProcess

# --------------------------------------------------------------------------- what the caller heard


def heard_frames(caller: AudioSocketCaller, since: float = 0.0) -> list[tuple[float, bytes]]:
    """(arrival time, payload) of every audio frame the caller received at or after ``since``."""
    out = []
    data = caller.received_audio
    off = 0
    for t, _kind, n in caller.received_frames:
        if t >= since:
            out.append((t, bytes(data[off:off + n])))
        off += n
    return out


def frame_hz(payload: bytes, rate: int = 8000, threshold: int = 500) -> float | None:
    """Dominant frequency of one frame, or None if it is (near) silence."""
    x = np.frombuffer(payload, "<i2").astype(np.float64)
    if x.size == 0 or np.abs(x).max() <= threshold:
        return None
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def tone_frames(caller: AudioSocketCaller, hz: float, since: float = 0.0, tol: float = 60.0) -> list[float]:
    """Arrival times of the frames heard at or after ``since`` whose dominant tone is ``hz``."""
    return [t for t, p in heard_frames(caller, since) if (f := frame_hz(p)) is not None and abs(f - hz) <= tol]


async def wait_tone(caller: AudioSocketCaller, hz: float, *, since: float, frames: int = 1,
                    timeout: float) -> list[float]:
    """Wait until the caller heard ``frames`` frames of ``hz`` after ``since``; their times.

    Raises TimeoutError naming the tone if that did not happen within ``timeout`` (or the call
    ended first)."""
    deadline = time.monotonic() + timeout
    while True:
        found = tone_frames(caller, hz, since)
        if len(found) >= frames:
            return found
        left = deadline - time.monotonic()
        if left <= 0 or caller.ended.is_set():
            raise TimeoutError(f"the caller heard {len(found)} frame(s) of {hz:g} Hz, expected {frames}, "
                               f"within {timeout:g} s (call ended: {caller.end_reason})")
        # Woken by the next frame from the bridge: no polling interval to tune.
        await caller.wait_audio(caller.received_audio_bytes + 1, timeout=left)


def assert_paced(caller: AudioSocketCaller, since: float, until: float | None = None, *, what: str) -> None:
    """The caller got one frame per 20 ms between ``since`` and ``until``: no gap over 150 ms,
    median gap 20 ± 5 ms."""
    times = [t for t, _k, _n in caller.received_frames if t >= since and (until is None or t <= until)]
    assert len(times) >= 10, f"{what}: only {len(times)} frame(s) received in the window"
    gaps = np.diff(times)
    worst, median = float(gaps.max()), float(np.median(gaps))
    # Generous on purpose (a loaded CI machine): pacing that works shows ~30 ms worst gaps here,
    # the failures these tests exist for showed 330-670 ms. Tight numbers belong in the bench.
    assert worst < 0.150, f"{what}: a {worst * 1000:.0f} ms gap in the caller's audio (limit 150 ms)"
    assert 0.015 <= median <= 0.025, f"{what}: median frame gap {median * 1000:.1f} ms, not 20 ± 5 ms"


def metric_total(text: str, name: str) -> float:
    """Sum of every sample of metric ``name`` (all label sets) in a Prometheus text exposition.

    Raises AssertionError if the metric is not exported at all (a missing counter is a failure,
    not a zero)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        if series == name or series.startswith(name + "{"):
            total += float(value)
            seen = True
    assert seen, f"/metrics does not export {name}"
    return total


# --------------------------------------------------------------------------- a gateway that dies


class _Side(asyncio.Protocol):
    """One end of a relayed connection (the bridge's, or the gateway's)."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.link.forward(self, data)

    def eof_received(self) -> bool:
        self.link.eof(self)
        return True  # keep our writing half open until the other side is done too

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost(self, exc)


class _Link:
    """A bridge ⇄ gateway connection through the proxy."""

    def __init__(self) -> None:
        self.client = _Side(self)  # the bridge's end
        self.upstream = _Side(self)  # the gateway's end
        self.early: list[bytes] = []  # from the bridge before the gateway connection is up
        self.frozen = False
        self.dead = False
        self.closed = asyncio.Event()

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def forward(self, src: _Side, data: bytes) -> None:
        if self.frozen or self.dead:
            return
        dst = self.other(src)
        if dst.transport is None:
            self.early.append(data)
        elif not dst.transport.is_closing():
            dst.transport.write(data)

    def eof(self, src: _Side) -> None:
        dst = self.other(src).transport
        if not self.frozen and dst is not None and not dst.is_closing() and dst.can_write_eof():
            dst.write_eof()

    def lost(self, src: _Side, exc: Exception | None) -> None:
        if not self.frozen:
            dst = self.other(src).transport
            if dst is not None and not dst.is_closing():
                if exc is not None:
                    dst.abort()
                else:
                    dst.close()
        if all(s.transport is None or s.transport.is_closing() for s in (self.client, self.upstream)):
            self.closed.set()

    def freeze(self) -> None:
        """Half-open: stop reading both sockets and forward nothing more. No FIN, no RST."""
        self.frozen = True
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.pause_reading()

    def kill(self, how: str) -> None:
        """The gateway's process died: ``"rst"`` resets both connections, ``"fin"`` closes them
        without a WebSocket close frame (what the kernel does for a process that exits)."""
        if how not in ("rst", "fin"):
            raise ValueError(f"kill how must be 'rst' or 'fin', not {how!r}")
        self.dead = True
        for side in (self.client, self.upstream):
            t = side.transport
            if t is None or t.is_closing():
                continue
            if how == "rst":
                sock = t.get_extra_info("socket")
                if sock is not None:  # linger 0: close() sends RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                t.abort()
            else:
                t.close()

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()


class ChaosProxy:
    """A loopback TCP relay in front of the gateway; :meth:`kill` and :meth:`freeze` break it.

    Point the bridge at :attr:`url`; every connection is relayed byte for byte to the gateway
    at ``upstream`` until a fault is injected.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.links: list[_Link] = []
        self._server: asyncio.Server | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self) -> _Side:
        link = _Link()
        self.links.append(link)
        task = asyncio.get_running_loop().create_task(self._connect_upstream(link))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return link.client

    async def _connect_upstream(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: link.upstream, *self.upstream)
        except OSError:
            link.abort()
            return
        assert link.upstream.transport is not None
        for chunk in link.early:
            link.upstream.transport.write(chunk)
        link.early.clear()

    def kill(self, how: str = "rst") -> None:
        for link in self.links:
            link.kill(how)

    def freeze(self) -> None:
        for link in self.links:
            link.freeze()

    async def close(self) -> None:
        for task in list(self._connecting):
            task.cancel()
        for link in self.links:
            link.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(sim):  # noqa: F811 - pytest injects the `sim` fixture imported above
    p = ChaosProxy(sim.host, sim.port)
    await p.start()
    yield p
    await p.close()


# --------------------------------------------------------------------------- a gateway in its own process


@pytest.fixture
async def gateway_process():
    """The reference gateway in a child process (:mod:`tests.chaos.gateway_process`), for the
    floods whose sender's cost must not be billed to the bridge's pacing. Request it before
    ``make_bridge`` so that the bridge stops first (fixtures are torn down in reverse order)."""
    g = GatewayProcess(API_KEY)
    await g.start()
    yield g
    await g.stop()


# --------------------------------------------------------------------------- webhook subscribers that misbehave


class HangingHttpServer:
    """Accepts TCP connections, reads what is sent, never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.bytes_received = 0
        self.reached = asyncio.Event()  # set by the first connection
        self._transports: list[asyncio.Transport] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> HangingHttpServer:
        server = self

        class _Silent(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                server.connections += 1
                server.reached.set()
                server._transports.append(transport)  # type: ignore[arg-type]

            def data_received(self, data: bytes) -> None:
                server.bytes_received += len(data)

        self._server = await asyncio.get_running_loop().create_server(_Silent, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        for t in self._transports:
            t.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class StatusHttpServer:
    """A minimal HTTP/1.1 server that answers every request with ``status`` and an empty body."""

    def __init__(self, status: int, reason: str = "Internal Server Error") -> None:
        self.status, self.reason = status, reason
        self.requests = 0
        self.reached = asyncio.Event()  # set by the first complete request
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> StatusHttpServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                await reader.readexactly(length)
                self.requests += 1
                self.reached.set()
                writer.write(f"HTTP/1.1 {self.status} {self.reason}\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

