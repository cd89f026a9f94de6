"""Mid-call commands in each adapter, without a network: what goes on the wire, and when."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.gateway.aillomvox import AillomVoxGateway
from bridge.gateway.aivoco import AivocoGateway
from bridge.gateway.base import BRIDGE_COMMANDS, COMMANDS, GATEWAY_COMMANDS, CommandUnsupported, Gateway
from bridge.gateway.generic_ws import GenericWsGateway
from bridge.gateway.openai_realtime import build_context_item, build_say, build_tools_update

from .test_openai_realtime import gateway, sent, valid

CREATED = '{"type":"response.created","event_id":"e","response":{"id":"r"}}'
DONE = '{"type":"response.done","event_id":"e","response":{"id":"r"}}'
TOOL = {"name": "lookup", "description": "finds things", "parameters": {"type": "object", "properties": {}}}


def test_the_command_names_partition() -> None:
    assert set(COMMANDS) == GATEWAY_COMMANDS | BRIDGE_COMMANDS and not GATEWAY_COMMANDS & BRIDGE_COMMANDS


@pytest.mark.parametrize("cls, protocol", [(AillomVoxGateway, "aillomvox"), (AivocoGateway, "aivoco")])
def test_protocols_without_commands_refuse_them_by_name(cls: type[Gateway], protocol: str) -> None:
    gw = cls("ws://127.0.0.1:1/", "key")  # type: ignore[call-arg]
    assert gw.capabilities == frozenset()
    for command, call in (("context", lambda: gw.add_context("x")), ("say", lambda: gw.say("x")),
                          ("tools", lambda: gw.set_tools([]))):
        with pytest.raises(CommandUnsupported) as info:
            call()
        assert info.value.protocol == protocol and info.value.command == command
        assert f"the {protocol} AI backend cannot do '{command}'" in str(info.value)


# --------------------------------------------------------------------------- OpenAI Realtime


def test_builders_are_valid_ga_client_events() -> None:
    item = valid(build_context_item("This caller is a VIP.", "vb_1"))
    assert item["item"] == {"type": "message", "role": "system",
                            "content": [{"type": "input_text", "text": "This caller is a VIP."}]}
    say = valid(build_say("Your order has shipped.", "vb_2"))
    assert say["response"]["instructions"].endswith(": Your order has shipped.")
    update = valid(build_tools_update([TOOL], "vb_3"))
    assert update["session"] == {"type": "realtime", "tool_choice": "auto", "tools": [{"type": "function", **TOOL}]}
    assert valid(build_tools_update([]))["session"] == {"type": "realtime", "tools": [], "tool_choice": "none"}


def test_context_and_tools_go_out_at_once() -> None:
    gw = gateway()
    assert gw.capabilities == frozenset({"context", "say", "tools"})
    gw.add_context("VIP")
    gw.set_tools([TOOL])
    context, tools = sent(gw)
    assert context["type"] == "conversation.item.create" and context["item"]["role"] == "system"
    assert tools["type"] == "session.update" and set(tools["session"]) == {"type", "tools", "tool_choice"}
    assert context["event_id"] != tools["event_id"]


def test_say_waits_for_the_active_response_then_comes_before_a_tool_answer() -> None:
    gw = gateway()
    gw.say("now")
    (first,) = sent(gw)
    assert first["type"] == "response.create" and first["response"]["instructions"].endswith(": now")
    list(gw._on_message(CREATED))
    gw.say("later")
    gw.say("and then")
    assert sent(gw) == []  # the API refuses a second response while one is active
    gw._want_response = True  # a tool result also waits for the floor
    list(gw._on_message(DONE))
    (second,) = sent(gw)
    assert second["response"]["instructions"].endswith(": later")
    list(gw._on_message(CREATED))
    list(gw._on_message(DONE))
    (third,) = sent(gw)
    assert third["response"]["instructions"].endswith(": and then")
    list(gw._on_message(CREATED))
    list(gw._on_message(DONE))
    assert [m.get("response") for m in sent(gw)] == [None]  # then the tool answer's plain response.create


def test_a_say_refused_as_already_active_is_said_after_that_response() -> None:
    gw = gateway()
    gw.say("hello")  # the service started a response of its own the adapter has not heard of yet
    (msg,) = sent(gw)
    refusal = json.dumps({"type": "error", "event_id": "e", "error": {
        "type": "invalid_request_error", "code": "conversation_already_has_active_response", "message": "m",
        "event_id": msg["event_id"]}})
    assert list(gw._on_message(refusal)) == []
    assert sent(gw) == []
    list(gw._on_message(DONE))
    (again,) = sent(gw)
    assert again["response"]["instructions"].endswith(": hello") and again["event_id"] != msg["event_id"]


def test_waiting_says_are_bounded() -> None:
    gw = gateway()
    list(gw._on_message(CREATED))
    for i in range(20):
        gw.say(f"s{i}")
    said: list[str] = []
    for _ in range(20):
        list(gw._on_message(DONE))
        said += [m["response"]["instructions"].rsplit(": ", 1)[1] for m in sent(gw)]
    assert said == [f"s{i}" for i in range(12, 20)]  # the newest 8: oldest dropped


# --------------------------------------------------------------------------- generic-ws (seed 001)


def control(gw: GenericWsGateway) -> list[dict[str, Any]]:
    out = [json.loads(m) for m in gw._control]
    gw._control.clear()
    return out


def test_generic_ws_say_is_a_text_input_held_until_ready() -> None:
    gw = GenericWsGateway("ws://127.0.0.1:1/")
    assert gw.capabilities == frozenset({"say"})
    gw._first_message = "Hello!"
    gw.say("early")
    assert control(gw) == []
    gw._on_ready()
    assert control(gw) == [{"type": "text.input", "text": "Hello!"}, {"type": "text.input", "text": "early"}]
    gw.say("now")
    assert control(gw) == [{"type": "text.input", "text": "now"}]
    with pytest.raises(CommandUnsupported, match="generic-ws AI backend cannot do 'context'"):
        gw.add_context("x")
    with pytest.raises(CommandUnsupported, match="'tools'"):
        gw.set_tools([])
