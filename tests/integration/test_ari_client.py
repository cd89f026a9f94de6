"""bridge/ari.py against a small ARI stand-in (aiohttp on loopback): what real Asterisk cannot be
made to do on demand — send garbage on the event stream, refuse the password, drop the stream at a
chosen moment, answer REST with an error body. The real thing is in tests/e2e/test_ari_asterisk.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from bridge.ari import AriClient, AriError
from tests.fake_ari import PASSWORD, USER, FakeAri


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
