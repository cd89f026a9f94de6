"""A stand-in for Asterisk's HTTP server and ARI (aiohttp on loopback), for what the real one cannot
be made to do on demand: garbage on the event stream, a refused password, a dropped stream, a
REST answer held back until the test says so. The real thing: tests/e2e/test_ari_asterisk.py."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from aiohttp import WSMsgType, web

USER, PASSWORD = "voxbridge", "s3cret-ari-pw"


class FakeAri:
    """Just enough of Asterisk's HTTP server: Basic auth, /ari/events, and scripted REST answers."""

    def __init__(self) -> None:
        self.sockets: list[web.WebSocketResponse] = []
        self.connected = asyncio.Queue[web.WebSocketResponse]()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        #: (method, path, status) of each answer given, in order.
        self.answered: list[tuple[str, str, int]] = []
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}
        self.refuse_events = False
        #: (method, path) → an event the answer waits for (a request held in flight by the test).
        self.gates: dict[tuple[str, str], asyncio.Event] = {}
        #: Each request as it arrives (awaitable: ``await fake.arrived.get()``).
        self.arrived = asyncio.Queue[tuple[str, str, dict[str, str]]]()
        #: Where the External Media channels it makes "send RTP from".
        self.rtp_address = ("127.0.0.1", 9)
        #: The External Media channels and bridges that exist (made by the bridge, not yet deleted).
        self.alive: set[str] = set()
        #: Channels in the application (a StasisStart sent, no StasisEnd): only these can be bridged.
        self.in_stasis: set[str] = set()
        #: How long after answering POST /channels/externalMedia the new channel's StasisStart comes
        #: (Asterisk answers first; a bridge refuses a channel not yet in Stasis with 422).
        self.media_stasis_delay = 0.0
        self.runner: web.AppRunner | None = None
        self.url = ""

    def _authorised(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return request.headers.get("Authorization") == expected

    async def events(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request) or self.refuse_events:
            return web.json_response({"message": "Authentication required"}, status=401)
        assert request.query.get("app") == "voxbridge"
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        self.connected.put_nowait(ws)
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
        return ws

    async def rest(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response({"message": "Authentication required"}, status=401)
        path = "/" + request.match_info["tail"]
        entry = (request.method, path, dict(request.query))
        self.requests.append(entry)
        self.arrived.put_nowait(entry)
        if (gate := self.gates.get((request.method, path))) is not None:
            await gate.wait()
        default: tuple[int, Any] = (204, None)
        if (request.method, path) == ("POST", "/channels/externalMedia"):
            default = (200, {"id": request.query["channelId"], "name": "UnicastRTP/fake", "state": "Down",
                             "channelvars": {"UNICASTRTP_LOCAL_ADDRESS": self.rtp_address[0],
                                             "UNICASTRTP_LOCAL_PORT": str(self.rtp_address[1])}})
        elif (request.method, path) == ("POST", "/bridges"):
            default = (200, {"id": request.query["bridgeId"], "bridge_type": "mixing"})
        elif request.method == "DELETE" and path.startswith(("/channels/vb-", "/bridges/")):
            # What exists is modelled for what the bridge creates: deleting it before it exists fails.
            name = path.rsplit("/", 1)[1]
            default = (204, None) if name in self.alive else (404, {"message": "Channel not found"})
            self.alive.discard(name)
        elif request.method == "POST" and path.startswith("/bridges/") and path.endswith("/addChannel"):
            missing = [c for c in request.query.get("channel", "").split(",") if c not in self.in_stasis]
            if missing:
                default = (422, {"message": "Channel not in Stasis application"})
        status, body = self.answers.get((request.method, path), default)
        if status == 200 and isinstance(body, dict) and (request.method, path) in (
                ("POST", "/channels/externalMedia"), ("POST", "/bridges")):
            self.alive.add(body["id"])
        if status == 200 and (request.method, path) == ("POST", "/channels/externalMedia"):
            media = {"type": "StasisStart", "args": [], "channel": {"id": body["id"], "name": body["name"],
                                                                       "state": "Up"}}
            asyncio.get_running_loop().call_later(
                self.media_stasis_delay, lambda: asyncio.ensure_future(self.send(media)))
        self.answered.append((request.method, path, status))
        if body is None:
            return web.Response(status=status)
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    async def send(self, event: dict[str, Any]) -> None:
        """Send an event on the newest event stream (and keep track of who is in the application)."""
        import json

        cid = (event.get("channel") or {}).get("id") if isinstance(event.get("channel"), dict) else None
        if event.get("type") == "StasisStart" and isinstance(cid, str):
            self.in_stasis.add(cid)
        elif event.get("type") in ("StasisEnd", "ChannelDestroyed") and isinstance(cid, str):
            self.in_stasis.discard(cid)
        if self.sockets and not self.sockets[-1].closed:
            await self.sockets[-1].send_str(json.dumps(event))

    def made(self, method: str, prefix: str) -> list[tuple[str, str, dict[str, str]]]:
        """The requests so far with this method whose path starts with ``prefix``."""
        return [r for r in self.requests if r[0] == method and r[1].startswith(prefix)]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ari/events", self.events)
        app.router.add_route("*", "/ari/{tail:.*}", self.rest)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for ws in self.sockets:
            await ws.close()
        assert self.runner is not None
        await self.runner.cleanup()
