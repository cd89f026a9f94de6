"""AMI codec, channel tracking and the telephony allowlists — no network."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.ami import AmiError, AmiMessage, AmiParser, encode_action
from bridge.channels import ChannelTracker, uuid_from_app
from tests.fakes import FakeAsterisk, FakeCall, reply
from tools.ami import Telephony
from tools.base import ChannelInfo, ToolError

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
    for a, b in itertools.pairwise(points):
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


async def test_a_waiter_gets_the_channel_running_audiosocket_even_when_the_other_half_shows_first():
    """The ;2 half's AS_UUID event can come before the ;1 half's Newexten(AudioSocket): the waiter
    must not be handed the ;2 half (transfer and hangup would act on the wrong channel; a CI run on
    the real Asterisk caught it). Known by its variable only, a channel is given after the grace."""
    t = ChannelTracker()
    waiter = asyncio.create_task(t.wait_for(U, 2))
    await asyncio.sleep(0)
    t.on_event(msg(Event="VarSet", Channel="Local/caller@t-1;2", Uniqueid="2", Variable="AS_UUID", Value=U))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    t.on_event(msg(Event="Newexten", Channel="Local/caller@t-1;1", Uniqueid="1", Application="AudioSocket",
                   AppData=f"{U},127.0.0.1:9000"))
    assert (await waiter).name == "Local/caller@t-1;1"
    # Asked after the variable-only event: the same grace, then the channel known.
    t2 = ChannelTracker()
    t2.on_event(msg(Event="VarSet", Channel="PJSIP/100-01", Uniqueid="9", Variable="AS_UUID", Value=U))
    assert (await t2.wait_for(U, 2)).name == "PJSIP/100-01"


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


TELEPHONY_ARGS = {
    "transfer_allow": ["operators,1\\d\\d", "sales,200"], "originate_allow": [r"\+?44\d{10}", "answer"],
    "originate_channel": "Local/{destination}@out", "originate_context": "ctx", "originate_exten": "s",
}


def telephony(**kw) -> Telephony:
    return Telephony(None, **{**TELEPHONY_ARGS, **kw})


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


# ------------------------------------------------------------------------------ the driver, on loopback


@pytest.fixture
async def asterisk():
    async with FakeAsterisk() as a:
        yield a


async def test_driver_logs_in_and_correlates_actions(asterisk):
    asterisk.answers["Getvar"] = lambda m: reply(m.action_id, Response="Success", Variable=m["Variable"],
                                                 Value=m["Variable"].lower())
    client = asterisk.client()
    await client.start()
    try:
        await client.wait_connected(5)
        assert client.banner == "Asterisk Call Manager/11.0.0" and client.connects == 1
        a, b = await asyncio.gather(client.action("Getvar", Channel="PJSIP/1", Variable="AS_PROFILE"),
                                    client.action("Getvar", Channel="PJSIP/1", Variable="AS_VARS"))
        assert (a["Value"], b["Value"]) == ("as_profile", "as_vars")
    finally:
        await client.stop()
    with pytest.raises(AmiError, match="not connected"):
        await client.action("Ping")


async def test_driver_login_refused_says_so_and_keeps_trying(asterisk):
    client = asterisk.client(secret="wrong")
    await client.start()
    try:
        await asterisk.until(lambda: len(asterisk.received("Login")) >= 3)
        assert not client.connected.is_set()
        assert client.last_error == "login as 'vb' refused: Authentication failed"
        asterisk.secret = "wrong"  # the operator fixes the secret: the next attempt logs in
        await client.wait_connected(5)
    finally:
        await client.stop()


async def test_driver_reconnects_and_never_replays_a_pending_action(asterisk):
    # Asterisk dies after reading the Redirect, before answering it.
    asterisk.answers["Redirect"] = lambda m: asterisk.drop()
    client = asterisk.client()
    hooks = []

    async def hook(c):
        hooks.append(c.connects)
        asterisk.changed.set()

    client.on_connect(hook)
    await client.start()
    try:
        await client.wait_connected(5)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(AmiError, match=r"Redirect: AMI connection lost \(connection closed by Asterisk\)"):
            await client.action("Redirect", Channel="PJSIP/1", Exten="100", Context="x", Priority=1, timeout=30)
        assert asyncio.get_running_loop().time() - t0 < 5  # at once, not at the 30 s deadline
        await asterisk.until(lambda: client.connects == 2 and hooks == [1, 2])
        await client.action("Ping")  # the new connection works
        assert len(asterisk.actions) == 2
        assert [m["Action"] for m in asterisk.actions[1]] == ["Login", "Ping"]  # no Redirect again, ever
        assert len(asterisk.received("Redirect")) == 1
    finally:
        await client.stop()


async def test_driver_notices_an_unanswered_ping_and_reconnects(asterisk):
    asterisk.answer_pings = False
    client = asterisk.client(ping_interval=0.1, action_timeout=2)
    await client.start()
    try:
        await client.wait_connected(5)
        await asterisk.until(lambda: len(asterisk.actions) >= 2)  # it gave up on the first connection
        assert client.last_error == "liveness check failed: Ping: no answer from Asterisk within 0.1 s"
        asterisk.answer_pings = True
        await asterisk.until(lambda: client.connected.is_set() and len(asterisk.received("Ping")) >= 4)
        assert client.connected.is_set()  # answered pings keep it up
    finally:
        await client.stop()


async def test_driver_action_deadline(asterisk):
    asterisk.answers["Getvar"] = lambda m: None  # never answered
    client = asterisk.client()
    await client.start()
    try:
        await client.wait_connected(5)
        with pytest.raises(AmiError, match=r"Getvar: no answer from Asterisk within 0.2 s"):
            await client.action("Getvar", Channel="PJSIP/1", Variable="X", timeout=0.2)
        assert client.connected.is_set() and client.connects == 1  # one slow action is not a dead link
    finally:
        await client.stop()


async def test_driver_list_action_and_originate(asterisk):
    def channels(m):
        aid = m.action_id
        return (reply(aid, Response="Success", EventList="start")
                + reply(aid, Event="CoreShowChannel", Channel="PJSIP/1", Application="AudioSocket",
                        ApplicationData=f"{U},127.0.0.1:9000")
                + reply(None, Event="Newexten", Channel="PJSIP/2")
                + reply(aid, Event="CoreShowChannelsComplete", EventList="Complete", ListItems="1"))

    def originate(m):
        aid = m.action_id
        return (reply(aid, Response="Success", Message="Originate successfully queued")
                + reply(aid, Event="OriginateResponse", Response="Success", Reason="4"))

    asterisk.answers.update(CoreShowChannels=channels, Originate=originate)
    client = asterisk.client()
    seen: list[AmiMessage] = []
    client.add_listener(seen.append)
    await client.start()
    try:
        await client.wait_connected(5)
        events = await client.action_list("CoreShowChannels", "CoreShowChannelsComplete")
        assert [e.event for e in events] == ["CoreShowChannel", "CoreShowChannelsComplete"]
        assert [e.event for e in seen] == ["Newexten"]  # the broadcast went to the listeners
        result = await client.originate(timeout=5, Channel="Local/1@x", Variable={"AS_VARS": "a=1,2"})
        assert result["Reason"] == "4"
        [sent] = asterisk.received("Originate")
        assert sent["Async"] == "true" and sent["Variable"] == "AS_VARS=a=1\\,2"
    finally:
        await client.stop()


async def test_a_connect_hook_raising_does_not_stop_the_connection_or_reconnects(asterisk, caplog):
    calls = 0

    async def buggy_hook(c):
        nonlocal calls
        calls += 1
        asterisk.changed.set()
        raise KeyError("bug in a hook")

    faults: list[BaseException] = []
    client = asterisk.client(on_fault=faults.append)
    client.on_connect(buggy_hook)
    await client.start()
    try:
        await client.wait_connected(5)
        await asterisk.until(lambda: calls == 1)
        await client.action("Ping")  # the connection goes on
        asterisk.drop()
        await asterisk.until(lambda: calls == 2 and client.connected.is_set())
        await client.action("Ping")
        assert client.connects == 2 and client.faults == 2
        assert [type(f) for f in faults] == [KeyError, KeyError]
        logged = [r for r in caplog.records if "buggy_hook" in r.getMessage()]
        assert logged and all(r.exc_info and r.exc_info[0] is KeyError for r in logged)  # with the traceback
    finally:
        await client.stop()


async def test_an_unexpected_exception_in_a_connection_is_logged_and_survived(asterisk, caplog):
    client = asterisk.client()
    real = client._proto.receive
    broken = True

    def receive(data, now):
        nonlocal broken
        if broken:
            broken = False
            raise KeyError("bug in the core")
        return real(data, now)

    client._proto.receive = receive
    await client.start()
    try:
        await client.wait_connected(5)  # the first connection died of the bug; the second logs in
        assert client.faults == 1 and len(asterisk.actions) == 2
        assert any("failed unexpectedly" in r.getMessage() and r.exc_info and r.exc_info[0] is KeyError
                   for r in caplog.records)
    finally:
        await client.stop()


async def test_under_the_supervisor_a_crash_of_the_loop_itself_restarts_it(asterisk, caplog):
    from bridge.supervise import Supervisor

    sup = Supervisor(backoff=0.01)
    client = asterisk.client()
    real_run = client.run
    runs = 0

    async def run():
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("bug in the loop")
        await real_run()

    client.run = run
    await client.start(lambda factory: sup.start("ami", factory))
    try:
        await client.wait_connected(5)
        assert runs == 2 and sup.crashes["ami"] == 1 and sup.fatal is None
    finally:
        await client.stop()
        await sup.stop()
    assert client._runner is None


async def test_control_characters_never_reach_the_wire(asterisk):
    client = asterisk.client()
    await client.start()
    try:
        await client.wait_connected(5)
        with pytest.raises(AmiError, match=r"AMI field 'Exten' contains a line break \(CR\)"):
            await client.action("Redirect", Channel="PJSIP/1", Context="x", Exten="100\r\nAction: Originate")
        t = Telephony(client, transfer_allow=[], originate_allow=[".*"], originate_channel="Local/{destination}@out",
                      originate_context="c", originate_exten="s")
        call = FakeCall("c1", channel=ChannelInfo("PJSIP/1-0001"))
        with pytest.raises(ToolError, match=r"^transfer failed: AMI field 'Exten' contains a control character"):
            await t.redirect(call, "x", "100\x00")
        with pytest.raises(ToolError, match=r"^the call could not be placed: AMI field 'CallerID' contains a line"):
            await t.originate("100", channel_template="Local/{destination}@out", context="c", exten="s",
                              variables={}, timeout=1, caller_id="Evil\nAction: Command")
        await client.action("Ping")
        assert [m["Action"] for m in asterisk.actions[0]] == ["Login", "Ping"]
    finally:
        await client.stop()


# ------------------------------------------------------------------------------ small holes


async def test_an_error_answer_to_core_show_channels_keeps_the_channel_map(asterisk):
    asterisk.answers["CoreShowChannels"] = lambda m: reply(m.action_id, Response="Error", Message="Permission denied")
    tracker = ChannelTracker()
    tracker.on_event(msg(Event="Newexten", Channel="PJSIP/200-7", Uniqueid="7", Application="AudioSocket",
                         AppData=f"{U},127.0.0.1:9000"))
    client = asterisk.client()
    await client.start()
    try:
        await client.wait_connected(5)
        with pytest.raises(AmiError, match="CoreShowChannels failed: Permission denied"):
            await tracker.resync(client)
        assert tracker.get(U).name == "PJSIP/200-7" and tracker.resyncs == 0  # not emptied
    finally:
        await client.stop()


class FailingAmi:
    """Stands in for AmiClient in the telephony layer: connected, and every action fails.
    ``seen`` records the call's handoff note at the moment each action was sent."""

    def __init__(self, call: FakeCall) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.call = call
        self.seen: list[tuple[str, str | None]] = []

    async def action(self, action, **fields):
        self.seen.append((action, self.call.handoff))
        raise AmiError(f"{action} failed: No such channel")


async def test_a_failed_ai_hangup_withdraws_the_handoff():
    from tools.ami import HangupTool

    call = FakeCall("c1", channel=ChannelInfo("PJSIP/1-0001"))
    ami = FailingAmi(call)
    with pytest.raises(ToolError, match="hangup failed: Hangup failed: No such channel"):
        await HangupTool(Telephony(ami, **TELEPHONY_ARGS)).run(call, {"after_speech": False})
    assert ami.seen == [("Hangup", "ai-hangup")]  # noted while Asterisk was asked...
    assert call.handoff is None  # ...and withdrawn when it refused: a later caller hang-up is one


async def test_a_failed_transfer_withdraws_the_handoff():
    from tools.ami import TransferTool

    call = FakeCall("c1", channel=ChannelInfo("PJSIP/1-0001"))
    ami = FailingAmi(call)
    with pytest.raises(ToolError, match="transfer failed"):
        await TransferTool(Telephony(ami, **TELEPHONY_ARGS)).run(call, {"extension": "101", "after_speech": False})
    assert ami.seen == [("Redirect", "transferred:operators,101")] and call.handoff is None


async def test_the_handoff_is_withdrawn_on_cancellation_too():
    call = FakeCall("c1")
    # PT012: the point is that the error leaves through handoff()'s exit
    with pytest.raises(asyncio.CancelledError), Telephony.handoff(call, "transferred:x,1"):  # noqa: PT012
        assert call.handoff == "transferred:x,1"
        raise asyncio.CancelledError
    assert call.handoff is None
    with Telephony.handoff(call, "ai-hangup"):
        pass
    assert call.handoff == "ai-hangup"  # success keeps it: the socket closing is the handoff


class FakeSession(FakeCall):
    log = logging.getLogger("test.session")


async def test_api_hangup_and_fallbacks_withdraw_the_handoff_when_asterisk_refuses():
    from bridge.config import Fallback
    from bridge.telephony import Asterisk

    session = FakeSession("c1", channel=ChannelInfo("PJSIP/1-0001"))
    ami = FailingAmi(session)
    bridge = SimpleNamespace(ami=ami, telephony=Telephony(ami, **TELEPHONY_ARGS))
    await Asterisk.hangup_call(bridge, session, "api-hangup")
    assert ami.seen == [("Hangup", "api-hangup")] and session.handoff is None
    assert session.ended == [("api-hangup", True)]  # ended the AudioSocket way instead

    await Asterisk.apply_fallback(bridge, session, Fallback(action="hangup"))
    await Asterisk.apply_fallback(bridge, session, Fallback(action="transfer", context="ops", exten="100"))
    assert ami.seen[1:] == [("Hangup", "fallback:hangup"), ("Redirect", "fallback:transferred:ops,100")]
    assert session.handoff is None


async def test_transfer_and_originate_targets_with_control_characters_are_tool_errors():
    from tools.ami import NotAllowed, SendDtmfTool, TransferTool

    call = FakeCall("c1", channel=ChannelInfo("PJSIP/1-0001"))
    ami = FailingAmi(call)
    t = Telephony(ami, **{**TELEPHONY_ARGS, "transfer_allow": ["ops,.*"], "originate_allow": [".*"]})
    with pytest.raises(ToolError, match=r"the extension '100\\rAction: Originate' contains a line break \(CR\)") as e:
        await TransferTool(t).run(call, {"extension": "100\rAction: Originate", "after_speech": False})
    assert not isinstance(e.value, NotAllowed)
    with pytest.raises(ToolError, match=r"the context 'ops\\n' contains a line break \(LF\)"):
        t.check_transfer(call, "100", "ops\n")
    with pytest.raises(ToolError, match=r"the destination '1\\x00' contains a control character \(U\+0000\)"):
        t.check_originate("c1", "1\x00")
    with pytest.raises(ToolError, match=r"'12\\n' is not DTMF"):
        await SendDtmfTool(t).run(call, {"digits": "12\n"})
    assert ami.seen == [] and call.handoff is None


MANAGER_CONF = Path(__file__).resolve().parents[2] / "examples" / "asterisk" / "manager.conf"
#: The write classes each action the bridge sends is registered with in Asterisk (main/manager.c,
#: apps/app_senddtmf.c); an account may run an action if it has any one of them. () = none needed.
ACTION_CLASSES = {
    "Login": (), "Ping": (), "Redirect": ("call",), "Hangup": ("system", "call"), "PlayDTMF": ("call",),
    "Setvar": ("call",), "Getvar": ("call", "reporting"), "Originate": ("originate",),
    "CoreShowChannels": ("system", "reporting"),
}


def test_example_manager_conf_grants_what_the_bridge_needs_and_not_system():
    text = MANAGER_CONF.read_text()
    [write] = re.findall(r"^write\s*=\s*(.+?)\s*(?:;.*)?$", text, re.M)
    granted = {c.strip() for c in write.split(",")}
    assert "system" not in granted  # shell commands via Originate, reloads, module loading
    for action, classes in ACTION_CLASSES.items():
        assert not classes or granted & set(classes), f"{action} needs one of {classes}"
    assert granted == {"call", "originate", "reporting"}  # and nothing else
