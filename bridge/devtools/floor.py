"""The floor (``voxbridge bench --floor``): the least a Python bridge of this design can cost.

A minimal bridge, for measurement only: AudioSocket callers on one side, an AillomVox gateway
on the other (WebSocket, a JSON config then binary audio both ways), the product's own playout
clock (:class:`bridge.playout.PlayoutClock`: one frame per call per 20 ms tick, four phase
groups) — and nothing else. No sessions, no events, no history, no barge-in detection, no
back-pressure, no resampling, no checks beyond what keeps the bytes in order: each caller frame
becomes one masked WebSocket frame, each binary message from the gateway is cut into whole
frames (a partial tail is dropped) and queued, each tick writes one. ``playback_clear_buffer``
empties the queue and a ``tool_call`` is answered at once, so the bench's gateway simulator
runs as it does against the bridge.

What it is for: the bench runs it in the same step as the bridge and the bare relay, so the
bridge's CPU per call can be read against both — the relay (no protocol work at all) and this
floor (the protocol work and the clock, in Python on the same event loop). The gap between the
floor and the bridge is what the product's features cost; the gap between the relay and the
floor is what Python and the design cost. It is not a product: it handles one well-behaved
gateway on loopback, and a protocol error simply closes the call.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import signal
import struct
import uuid
from typing import Any

from websockets.utils import accept_key

try:  # websockets' C speedup when built, as the bridge uses it (bridge/gateway/ws.py)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from ..gateway.ws import MASK_POOL_BYTES
from ..playout import PlayoutClock

_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")
_TEXT, _BINARY, _CLOSE, _PING = 0x1, 0x2, 0x8, 0x9


class FloorUplink(asyncio.Protocol):
    """The gateway side of one call: a WebSocket client, RFC 6455 framing by hand."""

    def __init__(self, call: FloorCall, config: dict[str, Any]) -> None:
        self.call = call
        self.config = config
        self.transport: Any = None
        self.open = False
        self.buf = b""
        self.key = base64.b64encode(os.urandom(16))
        self.masks, self.mask_at = b"", 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"GET /ws HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: " + self.key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def send(self, payload: bytes, opcode: int = _BINARY) -> None:
        # The framing of UplinkConnection.write_message, inline as it is there on purpose, mask
        # keys from a pool of OS randomness as there: the floor must not pay a call or a system
        # call per frame that the product does not.
        n = len(payload)
        first = 0x80 | opcode
        if n < 126:
            header = bytes((first, 0x80 | n))
        elif n < 65536:
            header = _HEADER16.pack(first, 0x80 | 126, n)
        else:
            header = _HEADER64.pack(first, 0x80 | 127, n)
        masks, at = self.masks, self.mask_at
        if at >= len(masks):
            masks, at = os.urandom(MASK_POOL_BYTES), 0
            self.masks = masks
        self.mask_at = at + 4
        mask = masks[at:at + 4]
        self.transport.write(header + mask + apply_mask(payload, mask))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            accept = accept_key(self.key.decode()).encode()
            head = buf[:end]
            if not head.startswith(b"HTTP/1.1 101") or accept not in head:
                self.transport.close()
                return
            self.open = True
            buf = buf[end + 4:]
            self.send(json.dumps(self.config).encode(), _TEXT)
        off, n = 0, len(buf)
        queue, frame = self.call.queue, self.call.frame_size
        while n - off >= 2:
            length = buf[off + 1] & 0x7F
            if length < 126:
                start = off + 2
            elif length == 126:
                start = off + 4
                if start > n:
                    break
                length = (buf[off + 2] << 8) | buf[off + 3]
            else:
                start = off + 10
                if start > n:
                    break
                length = int.from_bytes(buf[off + 2:start], "big")
            end = start + length
            if end > n:
                break
            opcode = buf[off] & 0x0F
            if opcode == _BINARY:
                if length == frame:
                    queue.append(buf[start:end])
                else:
                    queue.extend(buf[i:i + frame] for i in range(start, end - frame + 1, frame))
            elif opcode == _TEXT:
                self._on_text(buf[start:end])
            elif opcode == _PING:
                self.send(buf[start:end], 0xA)
            elif opcode == _CLOSE:
                self.transport.close()
                self.call.close()
                return
            off = end
        self.buf = buf[off:] if off < n else b""

    def _on_text(self, text: bytes) -> None:
        msg = json.loads(text)
        kind = msg.get("type")
        if kind == "playback_clear_buffer":
            self.call.queue.clear()
        elif kind == "tool_call":
            self.send(json.dumps({"type": "tool_result", "call_id": msg["call_id"], "result": "ok"}).encode(), _TEXT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.call.close()


class FloorCall(asyncio.Protocol):
    """The caller side of one call: AudioSocket frames in, one frame out per clock tick."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.transport: Any = None
        self.uplink: FloorUplink | None = None
        self.buf = b""
        self.call_id: str | None = None
        self.frame_size = floor.rate * 2 // 50
        self.silence = bytes(self.frame_size)
        self.header = bytes((0x10,)) + self.frame_size.to_bytes(2, "big")
        self.queue: collections.deque[bytes] = collections.deque()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        off, n = 0, len(buf)
        while n - off >= 3:
            end = off + 3 + ((buf[off + 1] << 8) | buf[off + 2])
            if end > n:
                break
            kind = buf[off]
            if kind == 0x10:
                up = self.uplink
                if up is not None and up.open:
                    up.send(buf[off + 3:end])
            elif kind == 0x01 and self.call_id is None:
                self.call_id = str(uuid.UUID(bytes=buf[off + 3:end]))
                self.floor.start(self)
            elif kind == 0x00:
                self.close()
                return
            off = end
        self.buf = buf[off:] if off < n else b""

    def on_tick(self) -> None:
        queue = self.queue
        self.transport.write(self.header + (queue.popleft() if queue else self.silence))

    def close(self) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.floor.end(self)
        if self.uplink is not None and self.uplink.transport is not None:
            self.uplink.transport.close()


class Floor:
    """The floor bridge: an AudioSocket listener, one gateway connection per call, one clock."""

    def __init__(self, gateway: tuple[str, int], api_key: str, rate: int = 8000) -> None:
        self.gateway = gateway
        self.rate = rate
        self.config = {"type": "config", "apikey": api_key, "provider": "openai", "sample_rate": rate,
                       "system_prompt": "floor", "max_duration": 3600, "tools": []}
        self.clock = PlayoutClock()
        self.calls: dict[str, FloorCall] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, call: FloorCall) -> None:
        assert call.call_id is not None
        self.calls[call.call_id] = call
        self.clock.add(call)
        task = asyncio.get_running_loop().create_task(self._connect(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, call: FloorCall) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, call.uplink = await loop.create_connection(lambda: FloorUplink(call, self.config), *self.gateway)
        except OSError:
            call.close()

    def end(self, call: FloorCall) -> None:
        self.clock.remove(call)
        if call.call_id is not None:
            self.calls.pop(call.call_id, None)

    def stats(self) -> dict[str, Any]:
        """The figures ``voxbridge bench`` reads from a bridge worker, in the same shape."""
        return {
            "pid": os.getpid(), "node_id": None, "period": self.clock.period,
            "call_phases": {str(int(uuid.UUID(cid)) & 0xFFFFFFFF): self.clock.phase_of(c)
                            for cid, c in self.calls.items()},
            "clock": self.clock.stats(), "sessions": len(self.calls), "frames_out_dropped": 0,
            "calls": [int(uuid.UUID(cid)) & 0xFFFFFFFF for cid in self.calls],
        }


async def floor_main(port: int, gateway_port: int, api_key: str, stats_path: str) -> int:
    """``python -m bridge.devtools.bench _floor``: serve until SIGTERM; SIGUSR1 writes the stats."""
    floor = Floor(("127.0.0.1", gateway_port), api_key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FloorCall(floor), "127.0.0.1", port, backlog=2048,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def dump() -> None:
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(floor.stats(), f)
        os.replace(tmp, stats_path)

    loop.add_signal_handler(signal.SIGUSR1, dump)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    return 0
