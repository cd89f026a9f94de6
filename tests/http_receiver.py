"""A real HTTP server on loopback (uvicorn, raw ASGI) that records every request per path: the far
end of webhooks, call hooks and HTTP tools in the integration tests.

How each path answers, in this order: ``handlers[path]`` (a coroutine given the request, returning
``(status, body)``), else ``gate[path]`` is awaited (an asyncio.Event: the request is recorded first,
so a test can await its arrival) and ``script[path]`` gives the status (popped in order; then 200)
with ``default_body``. :meth:`HttpReceiver.stop` opens every gate and sets :attr:`release` (for
handlers that hang until then).
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn

#: Generous: two shared cores, and the whole suite may be running.
WAIT = 10.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


Handler = Callable[[Received], Awaitable[tuple[int, bytes]]]


class HttpReceiver:
    def __init__(self, default_body: bytes = b"ok", content_type: bytes = b"text/plain") -> None:
        self.requests: dict[str, asyncio.Queue[Received]] = collections.defaultdict(asyncio.Queue)
        self.handlers: dict[str, Handler] = {}
        self.script: dict[str, list[int]] = {}
        self.gate: dict[str, asyncio.Event] = {}
        self.count: collections.Counter[str] = collections.Counter()
        self.release = asyncio.Event()
        self.default_body = default_body
        self.content_type = content_type
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        got = Received(path, headers, body, time.monotonic())
        self.count[path] += 1
        self.requests[path].put_nowait(got)
        handler = self.handlers.get(path)
        if handler is not None:
            status, answer = await handler(got)
        else:
            if (gate := self.gate.get(path)) is not None:
                await gate.wait()
            script = self.script.get(path)
            status, answer = (script.pop(0) if script else 200), self.default_body
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", self.content_type)]})
        await send({"type": "http.response.body", "body": answer})

    async def start(self) -> None:
        # Bound and listening before uvicorn runs: clients can connect at once (the kernel queues
        # them), so no waiting for "started".
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, interface="asgi3", lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-receiver")

    async def stop(self) -> None:
        self.release.set()
        for gate in self.gate.values():
            gate.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, WAIT)

    async def next(self, path: str, timeout: float = WAIT) -> Received:
        return await asyncio.wait_for(self.requests[path].get(), timeout)
