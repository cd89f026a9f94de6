"""bridge/ari.py against a small ARI stand-in (aiohttp on loopback): what real Asterisk cannot be
made to do on demand — send garbage on the event stream, refuse the password, drop the stream at a
chosen moment, answer REST with an error body. The real thing is in tests/e2e/test_ari_asterisk.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from bridge.ari import AriClient, AriError

USER, PASSWORD = "voxbridge", "s3cret-ari-pw"


class FakeAri:
    """Just enough of Asterisk's HTTP server: Basic auth, /ari/events, and scripted REST answers."""

    def __init__(self) -> None:
        self.sockets: list[web.WebSocketResponse] = []
        self.connected = asyncio.Queue[web.WebSocketResponse]()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}
        self.refuse_events = False
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
        self.requests.append((request.method, path, dict(request.query)))
        status, body = self.answers.get((request.method, path), (204, None))
        if body is None:
            return web.Response(status=status)
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

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


@pytest.fixture
async def ari():
    fake = FakeAri()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def client(ari: FakeAri):
    c = AriClient(ari.url, USER, PASSWORD, "voxbridge", action_timeout=2, backoff_min=0.05, backoff_max=0.2)
    yield c
    await c.close()


async def run(client: AriClient) -> asyncio.Task[None]:
    task = asyncio.create_task(client.run())
    await asyncio.wait_for(client.connected.wait(), 5)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_garbage_on_the_event_stream_is_counted_and_the_stream_goes_on(ari, client):
    got: list[dict[str, Any]] = []
    arrived = asyncio.Event()
    client.add_listener(lambda ev: (got.append(ev), arrived.set()))
    task = await run(client)
    ws = await ari.connected.get()
    for bad in ("not json", "[]", '{"no": "type"}', '{"type": 5}', json.dumps("StasisStart")):
        await ws.send_str(bad)
    await ws.send_str(json.dumps({"type": "StasisStart", "channel": {"id": "1.1"}}))
    await asyncio.wait_for(arrived.wait(), 5)
    assert got == [{"type": "StasisStart", "channel": {"id": "1.1"}}]
    assert client.malformed_events == 5
    assert client.connects == 1  # never dropped for it
    await stop(task)


async def test_a_listener_that_raises_does_not_drop_the_stream(ari, client):
    seen: list[str] = []
    done = asyncio.Event()

    def fragile(ev: dict[str, Any]) -> None:
        if ev["type"] == "Bad":
            raise RuntimeError("listener bug")
        seen.append(ev["type"])
        done.set()

    client.add_listener(fragile)
    task = await run(client)
    ws = await ari.connected.get()
    await ws.send_str(json.dumps({"type": "Bad"}))
    await ws.send_str(json.dumps({"type": "Good"}))
    await asyncio.wait_for(done.wait(), 5)
    assert seen == ["Good"] and client.faults == 1 and client.connects == 1
    await stop(task)


async def test_the_stream_reconnects_and_the_resync_hook_runs_before_new_events(ari, client):
    order: list[str] = []
    client.on_connect(lambda: _note(order, "resync"))
    second = asyncio.Event()
    client.add_listener(lambda ev: (order.append(ev["type"]), second.set() if ev["type"] == "After" else None))
    task = await run(client)
    ws = await ari.connected.get()
    await ws.close()  # Asterisk restarted
    ws2 = await asyncio.wait_for(ari.connected.get(), 5)
    await ws2.send_str(json.dumps({"type": "After"}))
    await asyncio.wait_for(second.wait(), 5)
    assert client.connects == 2
    assert order == ["resync", "resync", "After"]
    await stop(task)


async def _note(order: list[str], what: str) -> None:
    order.append(what)


async def test_a_refused_password_is_named_without_showing_it(ari, client, caplog):
    ari.refuse_events = True
    caplog.set_level(logging.WARNING, "voxbridge.ari")
    task = asyncio.create_task(client.run())
    async with asyncio.timeout(5):
        while client.last_error is None:
            await asyncio.sleep(0.01)
    await stop(task)
    assert "401" in client.last_error and "password" in client.last_error
    assert PASSWORD not in caplog.text and PASSWORD not in client.last_error
    assert not client.connected.is_set()


async def test_rest_errors_quote_what_asterisk_said(ari, client):
    ari.answers[("POST", "/channels/1.1/continue")] = (409, {"message": "Channel not in Stasis application"})
    ari.answers[("GET", "/channels/1.1/variable")] = (404, {"message": "Provided variable was not found"})
    ari.answers[("GET", "/asterisk/info")] = (200, "<html>not json</html>")
    with pytest.raises(AriError) as err:
        await client.request("POST", "/channels/1.1/continue")
    assert str(err.value) == "ARI POST /channels/1.1/continue: 409 Channel not in Stasis application"
    assert err.value.status == 409 and err.value.gone
    with pytest.raises(AriError) as err:
        await client.request("GET", "/channels/1.1/variable", params={"variable": "AS_UUID"})
    assert err.value.status == 404 and "Provided variable was not found" in str(err.value)
    with pytest.raises(AriError, match="not JSON"):
        await client.request("GET", "/asterisk/info")
    assert ari.requests[1] == ("GET", "/channels/1.1/variable", {"variable": "AS_UUID"})


async def test_rest_without_an_answer_fails_within_its_deadline():
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = silent.sockets[0].getsockname()[1]
    c = AriClient(f"http://127.0.0.1:{port}", USER, PASSWORD, "voxbridge", action_timeout=0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(AriError, match=r"no answer within 0.3 s") as err:
        await c.request("POST", "/channels/1.1/answer")
    assert loop.time() - t0 < 2 and err.value.status is None
    await c.close()
    silent.close()


async def test_rest_to_nobody_is_an_ari_error_naming_the_request():
    c = AriClient("http://127.0.0.1:9", USER, PASSWORD, "voxbridge", action_timeout=1)
    with pytest.raises(AriError, match=r"^ARI DELETE /bridges/b1: ConnectError") as err:
        await c.request("DELETE", "/bridges/b1")
    assert PASSWORD not in str(err.value)
    await c.close()
