"""The ARI ingress's life cycle where the order of events is the test's to choose: a real bridge
(demo gateway, real RTP sockets) against the ARI stand-in of tests/fake_ari.py, which holds any REST
answer until told. A caller hanging up at each step of the set-up, a channel entering the
application again, a set-up that fails, a shutdown mid-set-up: nothing may be left behind (no
call, no RTP port, no External Media channel or bridge in Asterisk), and the caller must never be
left in Stasis in silence. The ordinary flows run against the real Asterisk (tests/e2e/test_ari_asterisk.py).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Config
from tests.fake_ari import PASSWORD, USER, FakeAri

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def ari():
    fake = FakeAri()
    await fake.start()
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # "Asterisk's" end of the media
    rtp.bind(("127.0.0.1", 0))
    fake.rtp_address = rtp.getsockname()
    yield fake
    rtp.close()
    await fake.stop()


def config(fake: FakeAri, **extra: Any) -> Config:
    return Config.model_validate({
        "ingress": "ari", "gateway": {"demo": True}, "api": {"enabled": False}, "store": {"path": None},
        "ari": {"url": fake.url, "username": USER, "password": PASSWORD, "rtp": {"ports": "42000-42009"},
                "action_timeout": 2},
        "profiles": {"default": {"first_message": None}}, **extra,
    })


@pytest.fixture
async def bridge(ari: FakeAri):
    b = Bridge(config(ari))
    await b.start()
    await asyncio.wait_for(b.ari.client.connected.wait(), 5)
    yield b
    await b.stop()


def stasis_start(cid: str, **channel: Any) -> dict[str, Any]:
    return {"type": "StasisStart", "args": [], "channel": {
        "id": cid, "name": f"PJSIP/alice-{cid}", "state": "Up", "caller": {"number": "5551234", "name": "Alice"},
        "dialplan": {"context": "from-pstn", "exten": "100"},
        "channelvars": {"AS_UUID": "", "AS_PROFILE": "", "AS_VARS": ""}, **channel}}


def stasis_end(cid: str) -> dict[str, Any]:
    return {"type": "StasisEnd", "channel": {"id": cid}}


async def request(fake: FakeAri, method: str, prefix: str) -> tuple[str, str, dict[str, str]]:
    """The next request of this kind (others are skipped)."""
    while True:
        entry = await asyncio.wait_for(fake.arrived.get(), 5)
        if entry[0] == method and entry[1].startswith(prefix):
            return entry


async def nothing_left(bridge: Bridge, fake: FakeAri) -> None:
    """No call, no port; every External Media channel and bridge made was deleted again."""
    async with asyncio.timeout(5):
        while bridge.ari.calls or bridge.ari._unreleased or bridge.ari.ports.in_use or bridge.sessions:
            await asyncio.sleep(0.01)
        while fake.alive:  # the last DELETEs may still be on their way
            await asyncio.sleep(0.01)


async def test_a_call_is_set_up_bridged_and_returned_to_the_dialplan(bridge, ari):
    await ari.send(stasis_start("1.1"))
    media = await request(ari, "POST", "/channels/externalMedia")
    assert media[2]["external_host"].startswith("127.0.0.1:42") and media[2]["format"] == "ulaw"
    add = await request(ari, "POST", "/bridges/")
    assert add[2]["channel"] == f"1.1,{media[2]['channelId']}"
    call = bridge.sessions["1.1"]
    assert call.channel.name == "PJSIP/alice-1.1" and call.channel.caller_num == "5551234"
    call.end("ai-hangup")  # the AI is done: the caller goes back to the dialplan, once
    await request(ari, "POST", "/channels/1.1/continue")
    await ari.send(stasis_end("1.1"))
    await nothing_left(bridge, ari)
    assert len(ari.made("POST", "/channels/1.1/continue")) == 1


@pytest.mark.parametrize("step", ["/channels/externalMedia", "/bridges"])
async def test_a_caller_who_hangs_up_during_set_up_leaves_nothing_behind(bridge, ari, step):
    gate = ari.gates[("POST", step)] = asyncio.Event()
    await ari.send(stasis_start("2.1"))
    await request(ari, "POST", step)  # held in flight
    await ari.send(stasis_end("2.1"))
    await asyncio.sleep(0.05)
    gate.set()
    await nothing_left(bridge, ari)
    assert not ari.made("POST", "/channels/2.1/continue")  # the caller had gone: nothing sent after them


async def test_a_channel_that_enters_the_application_again_is_a_new_call(bridge, ari):
    await ari.send(stasis_start("3.1"))
    await request(ari, "POST", "/bridges/")
    first = bridge.sessions["3.1"]
    # A transfer to an extension that runs Stasis() again: StasisEnd, then at once a new StasisStart,
    # while the first call is still being torn down.
    await ari.send(stasis_end("3.1"))
    await ari.send(stasis_start("3.1", channelvars={"AS_UUID": "", "AS_PROFILE": "", "AS_VARS": ""}))
    await asyncio.wait_for(first.ended.wait(), 5)
    async with asyncio.timeout(5):
        while len(ari.made("POST", "/channels/externalMedia")) < 2 or "3.1" not in bridge.sessions:
            await asyncio.sleep(0.01)
    assert bridge.sessions["3.1"] is not first
    await ari.send(stasis_end("3.1"))
    await nothing_left(bridge, ari)


async def test_a_failed_set_up_sends_the_caller_back_to_the_dialplan(bridge, ari):
    ari.answers[("POST", "/channels/externalMedia")] = (500, {"message": "Internal Server Error"})
    await ari.send(stasis_start("4.1"))
    await request(ari, "POST", "/channels/4.1/continue")
    await nothing_left(bridge, ari)
    assert bridge.ari.setup_failures == 1


async def test_a_malformed_event_or_channel_is_survived(bridge, ari):
    await ari.send({"type": "StasisStart", "channel": "not-an-object"})
    await ari.send({"type": "StasisStart", "channel": {"id": 5}})
    await ari.send(stasis_start("5.1", caller="not-an-object"))  # a malformed field inside a real call
    await request(ari, "POST", "/channels/5.1/continue")  # back to the dialplan, not stuck in Stasis
    await nothing_left(bridge, ari)
    await ari.send(stasis_start("5.2"))  # and the next call is fine
    await request(ari, "POST", "/bridges/")
    assert "5.2" in bridge.sessions


async def test_at_capacity_a_caller_is_returned_to_the_dialplan_unanswered(ari):
    b = Bridge(config(ari, audiosocket={"max_calls": 1}))
    await b.start()
    try:
        await asyncio.wait_for(b.ari.client.connected.wait(), 5)
        await ari.send(stasis_start("6.1"))
        await request(ari, "POST", "/bridges/")
        await ari.send(stasis_start("6.2", state="Ring"))
        await request(ari, "POST", "/channels/6.2/continue")
        assert not ari.made("POST", "/channels/6.2/answer") and "6.2" not in b.sessions
    finally:
        await b.stop()


async def test_shutdown_mid_set_up_deletes_what_was_being_made_and_turns_new_callers_away(ari):
    b = Bridge(config(ari))
    await b.start()
    await asyncio.wait_for(b.ari.client.connected.wait(), 5)
    gate = ari.gates[("POST", "/channels/externalMedia")] = asyncio.Event()
    await ari.send(stasis_start("7.1"))
    await request(ari, "POST", "/channels/externalMedia")
    stopping = asyncio.create_task(b.stop())
    await asyncio.sleep(0.05)
    await ari.send(stasis_start("7.2"))  # arrives while the bridge is stopping
    gate.set()  # the External Media channel is created after the shutdown began
    await stopping
    assert len(ari.made("POST", "/channels/externalMedia")) == 1  # none for the caller who came too late
    assert not ari.alive, ari.alive  # the channel made after the shutdown began was deleted again
    assert ari.made("POST", "/channels/7.1/continue")  # the caller went back to the dialplan
    assert ari.made("POST", "/channels/7.2/continue")  # and so did the one turned away
    assert b.sessions == {}


async def test_the_external_media_channel_is_bridged_only_once_it_is_in_the_application(bridge, ari):
    """Asterisk answers POST /channels/externalMedia before the new channel's StasisStart, and a
    bridge refuses a channel not yet in Stasis (422): set-up waits for that StasisStart (a CI run
    on the real Asterisk failed this way once before it did)."""
    ari.media_stasis_delay = 0.5
    await ari.send(stasis_start("7.1"))
    media = await request(ari, "POST", "/channels/externalMedia")
    add = await request(ari, "POST", "/bridges/")
    assert add[1].endswith("/addChannel") and media[2]["channelId"] in ari.in_stasis
    call = bridge.sessions["7.1"]
    async with asyncio.timeout(5):
        while not [a for a in ari.answered if a[1] == add[1]]:
            await asyncio.sleep(0.01)
    assert [a[2] for a in ari.answered if a[1] == add[1]] == [204]  # not 422: it was in the application
    assert not call.ended.is_set() and "7.1" in bridge.ari.calls
    call.end("ai-hangup")
    await request(ari, "POST", "/channels/7.1/continue")
    await ari.send(stasis_end("7.1"))
    await nothing_left(bridge, ari)
