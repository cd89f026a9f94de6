"""AMI codec, channel tracking and the telephony allowlists — no network."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.ami import AmiMessage, AmiParser, encode_action
from bridge.channels import ChannelTracker, uuid_from_app
from tools.ami import Telephony
from tools.base import ToolError
from tests.fakes import FakeCall

U = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
BANNER = b"Asterisk Call Manager/11.0.0\r\n"


def msg(**fields) -> AmiMessage:
    items: list[tuple[str, str]] = []
    for k, v in fields.items():
        for item in v if isinstance(v, list) else [v]:
            items.append((k, item))
    return AmiMessage(items)


def test_parser_reads_banner_then_messages_with_repeated_keys():
    p = AmiParser()
    wire = BANNER + (b"Event: Newchannel\r\nChannel: Local/a@b-0001;1\r\nChanVariable: AS_UUID=" + U.encode()
                     + b"\r\nChanVariable: AS_PROFILE=sales\r\n\r\nResponse: Success\r\nActionID: x1\r\n\r\n")
    out = p.feed(wire)
    assert p.banner == "Asterisk Call Manager/11.0.0"
    assert [m.event or m.response for m in out] == ["Newchannel", "Success"]
    assert out[0].chan_variables() == {"AS_UUID": U, "AS_PROFILE": "sales"}
    assert out[0].get("channel") == "Local/a@b-0001;1"  # case-insensitive keys
    assert out[1].action_id == "x1"


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=20))
def test_parser_handles_any_split(cuts):
    wire = BANNER + b"".join(
        f"Event: E{i}\r\nCallerIDName: Jos\xc3\xa9 {i}\r\n\r\n".encode("latin-1", "ignore") if False else
        f"Event: E{i}\r\nCallerIDName: José {i}\r\n\r\n".encode() for i in range(5))
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    p = AmiParser()
    out = []
    for a, b in zip(points, points[1:]):
        out += p.feed(wire[a:b])
    assert [m.event for m in out] == [f"E{i}" for i in range(5)]
    assert out[2].get("CallerIDName") == "José 2"  # UTF-8 names survive (panoramisk drops them)


def test_encode_action_with_lists_variables_and_no_injection():
    data = encode_action("Originate", "a1", {"Channel": "Local/1@x", "Variable": {"AS_UUID": U, "P": "s"},
                                             "Async": True, "Skip": None, "Timeout": 5000})
    assert data == (b"Action: Originate\r\nActionID: a1\r\nChannel: Local/1@x\r\nVariable: AS_UUID=" + U.encode()
                    + b"\r\nVariable: P=s\r\nAsync: true\r\nTimeout: 5000\r\n\r\n")
    with pytest.raises(ValueError, match="line break"):
        encode_action("Redirect", "a2", {"Exten": "100\r\nAction: Originate"})


def test_uuid_from_app():
    assert uuid_from_app("AudioSocket", f"{U},127.0.0.1:9000") == U
    assert uuid_from_app("Dial", f"AudioSocket/127.0.0.1:9000/{U.upper()}/c(slin16)") == U
    assert uuid_from_app("Dial", "PJSIP/100") is None
    assert uuid_from_app("Playback", U) is None


async def test_tracker_prefers_the_channel_running_audiosocket():
    t = ChannelTracker()
    # An Originate put AS_UUID on both halves of a Local pair; the ;2 half's events come too.
    t.on_event(msg(Event="VarSet", Channel="Local/caller@t-1;2", Uniqueid="2", Variable="AS_UUID", Value=U))
    assert t.get(U).name == "Local/caller@t-1;2"  # a candidate only
    t.on_event(msg(Event="Newexten", Channel="Local/caller@t-1;1", Uniqueid="1", Application="AudioSocket",
                   AppData=f"{U},127.0.0.1:9000", CallerIDNum="555", ChanVariable=[f"AS_UUID={U}", "AS_PROFILE=x"]))
    assert t.get(U).name == "Local/caller@t-1;1" and t.get(U).caller_num == "555"
    t.on_event(msg(Event="Newstate", Channel="Local/caller@t-1;2", Uniqueid="2", ChanVariable=[f"AS_UUID={U}"]))
    assert t.get(U).name == "Local/caller@t-1;1"  # the other half does not take over
    assert t.get(U).variables["AS_PROFILE"] == "x"
    t.on_event(msg(Event="Hangup", Channel="Local/caller@t-1;1", Uniqueid="1"))
    assert t.get(U) is None


async def test_tracker_waiters_get_a_late_channel():
    t = ChannelTracker()
    waiter = asyncio.create_task(t.wait_for(U, 2))
    await asyncio.sleep(0)
    t.on_event(msg(Event="VarSet", Channel="PJSIP/100-01", Uniqueid="9", Variable="AS_UUID", Value=U))
    assert (await waiter).name == "PJSIP/100-01"
    assert await t.wait_for("11111111-2222-3333-4444-555555555555", 0.05) is None


class FakeAmi:
    def __init__(self, events):
        self.events = events

    async def action_list(self, action, complete, timeout=None):
        assert action == "CoreShowChannels"
        return self.events


async def test_resync_rebuilds_from_core_show_channels():
    t = ChannelTracker()
    t.on_event(msg(Event="VarSet", Channel="PJSIP/gone-1", Uniqueid="1", Variable="AS_UUID",
                   Value="11111111-2222-3333-4444-555555555555"))
    await t.resync(FakeAmi([
        msg(Event="CoreShowChannel", Channel="PJSIP/200-7", Uniqueid="7", Application="AudioSocket",
            ApplicationData=f"{U},127.0.0.1:9000"),
        msg(Event="CoreShowChannel", Channel="PJSIP/300-8", Uniqueid="8", Application="Playback",
            ApplicationData="hello"),
        msg(Event="CoreShowChannelsComplete"),
    ]))
    assert len(t) == 1 and t.get(U).name == "PJSIP/200-7"


def telephony(**kw) -> Telephony:
    args = dict(transfer_allow=["operators,1\\d\\d", "sales,200"], originate_allow=[r"\+?44\d{10}", "answer"],
                originate_channel="Local/{destination}@out", originate_context="ctx", originate_exten="s")
    args.update(kw)
    return Telephony(None, **args)


def test_transfer_allowlist(caplog):
    t = telephony()
    assert t.check_transfer(FakeCall("c1"), "101", None) == ("operators", "101")
    assert t.check_transfer(FakeCall("c1"), "200", "sales") == ("sales", "200")
    for exten, ctx in [("1000", None), ("200", "operators"), ("666", None), ("10", None), ("101;2", None)]:
        with pytest.raises(ToolError, match="not allowed"):
            t.check_transfer(FakeCall("c1"), exten, ctx)
    assert "SECURITY refused transfer of call c1" in caplog.text


def test_originate_allowlist_is_a_full_match(caplog):
    t = telephony()
    t.check_originate("c1", "+441234567890")
    for dest in ["+4412345678901", "900123", "answer2", "answer&PJSIP/evil"]:
        with pytest.raises(ToolError, match="not allowed"):
            t.check_originate("c1", dest)
    assert "SECURITY refused originate" in caplog.text


async def test_tools_refuse_clearly_without_ami():
    from tools.ami import TransferTool

    with pytest.raises(ToolError, match="no AMI connection configured"):
        await TransferTool(telephony()).run(FakeCall("c1"), {"extension": "101"})
