"""The sans-I/O AMI core (bridge/ami_protocol.py) with a fake transport and a fake clock.

No sockets, no event loop, no waiting: bytes the client would write are collected, Asterisk's
answers are fed in as bytes, and ``now`` is a number the test moves.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.ami_protocol import (
    ActionCompleted,
    ActionFailed,
    AmiError,
    AmiFieldError,
    AmiMessage,
    AmiParser,
    AmiProtocol,
    ConnectionDead,
    EventReceived,
    LoggedIn,
    encode_action,
    escape_variable_value,
)

BANNER = b"Asterisk Call Manager/11.0.0\r\n"


def block(**fields: str | list[str]) -> bytes:
    lines = []
    for k, v in fields.items():
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"{k}: {item}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Link:
    """A fake transport: what the client wrote (parsed back into actions) and a fake clock."""

    def __init__(self, proto: AmiProtocol) -> None:
        self.proto = proto
        self.now = 100.0
        self.written = b""
        self._parser = AmiParser()
        self._parser.feed(b"client side\r\n")  # no banner in this direction
        self.actions: list[AmiMessage] = []

    def write(self, data: bytes | None) -> None:
        if data:
            self.written += data
            self.actions += self._parser.feed(data)

    def open(self) -> None:
        self.write(self.proto.connection_made(self.now))

    def feed(self, data: bytes) -> list:
        return self.proto.receive(data, self.now)

    def last(self, action: str) -> AmiMessage:
        return [a for a in self.actions if a["Action"] == action][-1]

    def login(self) -> list:
        self.open()
        return self.feed(BANNER + block(Response="Success", ActionID=self.last("Login").action_id,
                                        Message="Authentication accepted"))

    def send(self, action: str, **kw) -> str:
        fields = kw.pop("fields", {})
        aid, data = self.proto.send_action(action, fields, now=self.now, **kw)
        self.write(data)
        return aid


def proto(**kw) -> AmiProtocol:
    kw.setdefault("action_timeout", 5.0)
    kw.setdefault("ping_interval", 10.0)
    return AmiProtocol("vb", "s3cret", id_prefix="t-", **kw)


def up(**kw) -> Link:
    link = Link(proto(**kw))
    assert link.login() == [LoggedIn("Asterisk Call Manager/11.0.0")]
    return link


# ------------------------------------------------------------------------------ login


def test_login_is_the_only_thing_sent_on_connect_and_success_logs_in():
    link = Link(proto())
    link.open()
    assert [a["Action"] for a in link.actions] == ["Login"]
    login = link.actions[0]
    assert (login["Username"], login["Secret"], login["Events"]) == ("vb", "s3cret", "on")
    with pytest.raises(AmiError, match="not logged in"):
        link.send("Ping")
    # The banner alone is not a login.
    assert link.feed(BANNER) == [] and link.proto.state == "login"
    out = link.feed(block(Response="Success", ActionID=login.action_id, Message="Authentication accepted"))
    assert out == [LoggedIn("Asterisk Call Manager/11.0.0")] and link.proto.state == "up"


def test_login_refused_carries_asterisks_message():
    link = Link(proto())
    link.open()
    out = link.feed(BANNER + block(Response="Error", ActionID=link.last("Login").action_id,
                                   Message="Authentication failed"))
    assert out == [ConnectionDead("login as 'vb' refused: Authentication failed")]
    with pytest.raises(AmiError, match="not logged in"):
        link.send("Redirect")
    assert link.feed(block(Event="FullyBooted")) == []  # a dead connection reports nothing more


def test_login_unanswered_until_its_deadline_kills_the_connection():
    link = Link(proto(action_timeout=3))
    link.open()
    assert link.proto.next_wakeup() == pytest.approx(103.0)
    assert link.proto.timeouts(102.99) == []
    assert link.proto.timeouts(103.0) == [ConnectionDead("login as 'vb' failed: no answer from Asterisk within 3 s")]


# ------------------------------------------------------------------------------ correlation


def test_interleaved_responses_unknown_ids_and_broadcasts():
    link = up()
    a = link.send("Getvar", fields={"Variable": "A"})
    b = link.send("Getvar", fields={"Variable": "B"})
    c = link.send("Setvar", fields={"Variable": "C", "Value": "1"})
    assert len({a, b, c}) == 3
    out = link.feed(
        block(Response="Success", ActionID=c)
        + block(Event="Newchannel", Channel="PJSIP/1-1")
        + block(Response="Success", ActionID="somebody-else-1", Value="nope")  # unknown: ignored
        + block(Event="VarSet", ActionID="somebody-else-2", Variable="X")  # an event: still broadcast
        + block(Response="Success", ActionID=a, Value="alpha")
    )
    assert [type(o).__name__ for o in out] == ["ActionCompleted", "EventReceived", "EventReceived", "ActionCompleted"]
    assert (out[0].action_id, out[0].action) == (c, "Setvar")
    assert out[1].message["Channel"] == "PJSIP/1-1" and out[2].message["Variable"] == "X"
    assert out[3].action_id == a and out[3].response["Value"] == "alpha"
    assert b in link.proto.pending  # still waiting, not confused with anybody's answer
    out = link.feed(block(Response="Success", ActionID=b, Value="beta"))
    assert out[0].action_id == b and out[0].response["Value"] == "beta"
    # A second Response for an action already answered is not a new outcome.
    assert link.feed(block(Response="Success", ActionID=a)) == []


def test_error_response_completes_with_the_error():
    link = up()
    a = link.send("Redirect", fields={"Channel": "PJSIP/x", "Exten": "1"})
    [done] = link.feed(block(Response="Error", ActionID=a, Message="Channel specified does not exist"))
    assert isinstance(done, ActionCompleted) and done.response["Message"] == "Channel specified does not exist"


def test_list_action_collects_its_events_until_complete():
    link = up()
    a = link.send("CoreShowChannels", list_complete="CoreShowChannelsComplete")
    out = link.feed(block(Response="Success", ActionID=a, EventList="start", Message="Channels will follow"))
    assert out == []
    out = link.feed(block(Event="CoreShowChannel", ActionID=a, Channel="PJSIP/1")
                    + block(Event="Hangup", Channel="PJSIP/9")  # a broadcast in the middle
                    + block(Event="CoreShowChannel", ActionID=a, Channel="PJSIP/2"))
    assert [type(o) for o in out] == [EventReceived]  # the list's own events are not broadcast
    [done] = link.feed(block(Event="CoreShowChannelsComplete", ActionID=a, EventList="Complete", ListItems="2"))
    assert [e.event for e in done.events] == ["CoreShowChannel", "CoreShowChannel", "CoreShowChannelsComplete"]
    assert done.response["EventList"] == "start"


def test_list_action_answered_error_completes_at_once():
    link = up()
    a = link.send("CoreShowChannels", list_complete="CoreShowChannelsComplete")
    [done] = link.feed(block(Response="Error", ActionID=a, Message="Permission denied"))
    assert done.response.response == "Error" and done.events == ()


def test_async_originate_waits_for_originate_response():
    link = up()
    a = link.send("Originate", fields={"Channel": "Local/1@x", "Async": "true"}, timeout=20,
                  await_event="OriginateResponse")
    assert link.feed(block(Response="Success", ActionID=a, Message="Originate successfully queued")) == []
    [done] = link.feed(block(Event="OriginateResponse", ActionID=a, Response="Success", Reason="4",
                             Channel="Local/1@x-0001;1"))
    assert done.events[-1]["Reason"] == "4" and done.response["Message"] == "Originate successfully queued"
    refused = link.send("Originate", fields={"Channel": "Bogus/1"}, await_event="OriginateResponse")
    [done] = link.feed(block(Response="Error", ActionID=refused, Message="Originate failed"))
    assert done.events == () and done.response.response == "Error"


# ------------------------------------------------------------------------------ time


def test_each_action_has_its_own_deadline_and_a_late_reply_is_ignored():
    link = up()
    a = link.send("Redirect", timeout=2)
    b = link.send("Getvar")  # default action_timeout 5
    assert link.proto.next_wakeup() == pytest.approx(102.0)
    assert link.proto.timeouts(101.99) == []
    [failed] = link.proto.timeouts(102.0)
    assert isinstance(failed, ActionFailed) and failed.action_id == a
    assert str(failed.error) == "Redirect: no answer from Asterisk within 2 s"
    assert link.proto.next_wakeup() == pytest.approx(105.0)
    assert link.feed(block(Response="Success", ActionID=a)) == []  # too late: nobody is told twice
    [failed] = link.proto.timeouts(105.0)
    assert failed.action_id == b


def test_a_forgotten_action_is_not_reported():
    link = up()
    a = link.send("Getvar")
    link.proto.forget(a)
    assert link.feed(block(Response="Success", ActionID=a)) == []
    assert link.proto.timeouts(1e9) == []


def test_ping_answered_keeps_the_connection_and_schedules_the_next():
    link = up(ping_interval=10, action_timeout=5)  # logged in at t=100
    assert link.proto.next_wakeup() == pytest.approx(110.0)
    assert link.proto.ping_due(109.9) is None
    link.write(link.proto.ping_due(110.0))
    ping = link.last("Ping")
    assert link.proto.ping_due(110.5) is None  # one outstanding at a time
    assert link.proto.next_wakeup() == pytest.approx(115.0)  # its deadline: min(action_timeout, interval)
    link.now = 112.0
    assert link.feed(block(Response="Success", ActionID=ping.action_id, Ping="Pong")) == []
    assert link.proto.timeouts(200.0) == []  # answered: no liveness failure, ever
    assert link.proto.next_wakeup() == pytest.approx(122.0)  # interval counted from the answer


def test_ping_unanswered_means_the_connection_is_dead():
    link = up(ping_interval=1, action_timeout=3)
    other = link.send("Getvar", timeout=30)
    link.write(link.proto.ping_due(101.0))
    assert link.proto.timeouts(101.99) == []
    out = link.proto.timeouts(102.0)  # ping timeout = min(action_timeout, ping_interval) = 1 s
    assert out == [ConnectionDead("liveness check failed: Ping: no answer from Asterisk within 1 s")]
    assert link.proto.ping_due(105.0) is None
    # The driver closes the connection; the remaining action fails then.
    [failed] = link.proto.connection_lost("AMI connection lost (liveness check failed)")
    assert failed.action_id == other


def test_drop_fails_every_pending_action_and_nothing_is_replayed():
    link = up()
    redirect = link.send("Redirect", fields={"Channel": "PJSIP/1", "Exten": "100"})
    originate = link.send("Originate", fields={"Channel": "Local/1@x"}, await_event="OriginateResponse")
    out = link.proto.connection_lost("AMI connection lost (connection reset)")
    assert {o.action_id: str(o.error) for o in out} == {
        redirect: "Redirect: AMI connection lost (connection reset)",
        originate: "Originate: AMI connection lost (connection reset)"}
    assert link.proto.timeouts(1e9) == [] and link.proto.next_wakeup() is None
    with pytest.raises(AmiError):
        link.send("Getvar")

    link.written = b""
    link.actions.clear()
    assert link.login() == [LoggedIn("Asterisk Call Manager/11.0.0")]
    assert [a["Action"] for a in link.actions] == ["Login"]  # only the login: nothing re-sent
    assert b"Redirect" not in link.written and b"Originate" not in link.written
    # Answers meant for the old connection's actions are nobody's now.
    assert link.feed(block(Response="Success", ActionID=redirect)) == []
    assert link.send("Getvar") not in (redirect, originate)  # ActionIDs are never reused


def test_stream_errors_surface_as_ami_errors():
    link = up()
    with pytest.raises(AmiError, match="larger than"):
        link.feed(b"Event: X\r\nData: " + b"x" * (AmiParser.MAX_BUFFER + 1))


# ------------------------------------------------------------------------------ encoding


@pytest.mark.parametrize("value, what", [
    ("100\r\nAction: Originate", "a line break (CR)"),
    ("100\nAction: Originate", "a line break (LF)"),
    ("100\x00", "a control character (U+0000)"),
    ("10\t0", "a control character (U+0009)"),
    ("100\x7f", "a control character (U+007F)"),
    ("100\x85", "a control character (U+0085)"),
])
def test_control_characters_are_refused_before_anything_is_registered(value, what):
    link = up()
    with pytest.raises(AmiFieldError, match=re.escape(f"AMI field 'Exten' contains {what}: refused")):
        link.send("Redirect", fields={"Channel": "PJSIP/1", "Exten": value})
    assert link.proto.pending == []
    with pytest.raises(AmiFieldError, match="Variable X"):
        link.send("Originate", fields={"Variable": {"X": value}})
    with pytest.raises(AmiFieldError, match="not a header name"):
        link.send("Redirect", fields={"Exten\r\nAction": "1"})
    with pytest.raises(AmiFieldError, match="must be letters"):
        link.send("Originate", fields={"Variable": {"A,B": "1"}})
    assert link.proto.pending == []
    assert isinstance(AmiFieldError("x"), ValueError)


def asterisk_separate_args(buf: str, delim: str = ",") -> list[str]:
    """A transcription of Asterisk's argument splitter (main/app.c ``__ast_app_separate_args`` with
    ``remove_chars``), which manager.c applies to each Originate ``Variable:`` header."""
    args: list[str] = []
    cur: list[str] = []
    paren = bracket = 0
    quote = False
    i = 0
    ended_on_delim = False
    while i < len(buf):
        ch = buf[i]
        ended_on_delim = False
        if ch == "(":
            paren += 1
        elif ch == ")":
            paren = max(paren - 1, 0)
        elif ch == "[":
            bracket += 1
        elif ch == "]":
            bracket = max(bracket - 1, 0)
        elif ch == '"':
            quote = not quote
            i += 1
            continue  # removed
        elif ch == "\\":
            if i + 1 < len(buf):
                cur.append(buf[i + 1])  # literal, not parsed
            i += 2
            continue
        elif ch == delim and not paren and not quote and not bracket:
            args.append("".join(cur))
            cur = []
            i += 1
            ended_on_delim = True
            continue
        cur.append(ch)
        i += 1
    if cur or ended_on_delim:
        args.append("".join(cur))
    return args


def test_the_transcribed_splitter_shows_the_hole():
    # Unescaped, a comma in a value sets a second variable: the reason for escaping.
    assert asterisk_separate_args("AS_VARS=a,EVIL=1") == ["AS_VARS=a", "EVIL=1"]
    assert asterisk_separate_args('X="q"') == ["X=q"]
    assert asterisk_separate_args("X=f(a,b)") == ["X=f(a,b)"]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab=,"\\()[]% &+é')), max_size=30))
def test_variable_values_reach_the_channel_exactly(value):
    data = encode_action("Originate", "a1", {"Variable": {"AS_VARS": value}})
    # As manager.c reads it: the line after "Variable:", leading blanks skipped, nothing trimmed at the end.
    [line] = [ln for ln in data.decode().split("\r\n") if ln.startswith("Variable:")]
    header = line[len("Variable:"):].lstrip(" \t")
    assert asterisk_separate_args(header) == [f"AS_VARS={value}"]


def test_escaping_is_only_for_what_asterisk_splits_on():
    assert escape_variable_value("name=Jos%C3%A9&x=1+2") == "name=Jos%C3%A9&x=1+2"  # urlencoded AS_VARS untouched
    assert escape_variable_value('a,b"c\\d(e)[f]') == 'a\\,b\\"c\\\\d\\(e\\)\\[f\\]'


# ------------------------------------------------------------------------------ parser


WIRE = BANNER + block(Event="Newchannel", Channel="PJSIP/100-0001", CallerIDName="José Müller",
                      ChanVariable=["AS_UUID=u1", "AS_PROFILE=sales"]) + block(Response="Success", ActionID="t-1")


def test_parser_split_at_every_byte_boundary():
    expected = [(m.fields) for m in AmiParser().feed(WIRE)]
    assert len(expected) == 2
    for i in range(len(WIRE) + 1):
        p = AmiParser()
        got = p.feed(WIRE[:i]) + p.feed(WIRE[i:])
        assert [m.fields for m in got] == expected, i
        assert p.banner == "Asterisk Call Manager/11.0.0"
    p = AmiParser()
    got = [m for i in range(len(WIRE)) for m in p.feed(WIRE[i:i + 1])]
    assert [m.fields for m in got] == expected
    assert got[0]["CallerIDName"] == "José Müller"


def test_parser_reads_a_latin1_caller_name_as_latin1_and_keeps_utf8_lines():
    wire = BANNER + b"Event: Newchannel\r\nCallerIDName: Jos\xe9 M\xfcller\r\nConnectedLineName: Zo\xc3\xab\r\n\r\n"
    [m] = AmiParser().feed(wire)
    assert m["CallerIDName"] == "José Müller"  # not "Jos\ufffd"
    assert m["ConnectedLineName"] == "Zoë"


def test_parser_keeps_lines_without_a_colon_as_output():
    [m] = AmiParser().feed(BANNER + b"Response: Follows\r\nActionID: 1\r\nline one\r\n--END COMMAND--\r\n\r\n")
    assert m.getall("Output") == ["line one", "--END COMMAND--"]
