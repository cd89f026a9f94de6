"""MCP tool sources without a network: the config keys, the registry's changing sets of tools and
snapshots, how a listing is filtered and named, how a result is read, and how a call ends when
its connection is lost (tools/mcp.py, tools/base.py). The real server is in
tests/integration/test_mcp_tools.py."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import mcp.types as mt
import pytest

from bridge.config import Config, ConfigError, ToolSourceConfig, load_config
from bridge.toolset import build_tools
from tests.fakes import FakeCall
from tools.base import Tool, ToolRegistry
from tools.mcp import McpToolSource, result_text
from tools.router import ToolRouter


class Named(Tool):
    def __init__(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self.name = name
        self.description = name
        if parameters is not None:
            self.parameters = parameters

    async def run(self, call: Any, args: dict[str, Any]) -> Any:
        return self.name


def listed(name: str, **schema: Any) -> mt.Tool:
    return mt.Tool(name=name, description=f"the {name} tool",
                   input_schema={"type": "object", "properties": {}, **schema})


def source(**cfg: Any) -> tuple[McpToolSource, ToolRegistry]:
    registry = ToolRegistry()
    registry.register(Named("end_call"))
    src = McpToolSource("shop", ToolSourceConfig.model_validate({"url": "http://127.0.0.1:1/mcp", **cfg}),
                        registry.set_source_tools)
    registry.add_source(src)
    return src, registry


def write_config(tmp_path, text: str):
    path = tmp_path / "voxbridge.yaml"
    path.write_text("gateway: {demo: true}\n" + text)
    return path


# --------------------------------------------------------------------------- configuration


def test_config_mistakes_are_named_by_key(tmp_path) -> None:
    path = write_config(tmp_path, """
tool_sources:
  shop:
    kind: mcpp
    url: ftp://example.com/mcp
    transport: websocket
    prefix: "shop."
    timeout: 30
    refresh_s: 0
    headerz: {}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = str(err.value)
    for key in ("tool_sources.shop.kind", "tool_sources.shop.url", "tool_sources.shop.transport",
                "tool_sources.shop.prefix", "tool_sources.shop.timeout", "tool_sources.shop.refresh_s"):
        assert f"  {key}: " in text, (key, text)
    assert "tool_sources.shop.headerz: unknown key" in text
    assert "must be an http:// or https:// URL" in text


def test_a_missing_url_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"tool_sources\.shop\.url: Field required"):
        load_config(write_config(tmp_path, "tool_sources: {shop: {kind: mcp}}\n"), env={})


def test_a_profile_naming_an_unknown_source_and_an_unused_source(tmp_path) -> None:
    cfg = load_config(write_config(tmp_path, """
tool_sources: {shop: {url: "http://127.0.0.1:5678/mcp/shop"}}
profiles: {default: {tool_sources: [shop, crm]}, sales: {}}
"""), env={})
    errors, warnings = cfg.problems(build_tools(cfg).names)
    assert errors == ["profiles.default.tool_sources.1: no tool source named 'crm' in tool_sources (shop)"]
    cfg2 = Config.model_validate({"tool_sources": {"shop": {"url": "http://x/mcp"}}})
    _, warnings = cfg2.problems(build_tools(cfg2).names)
    assert any(w.startswith("tool_sources.shop: no profile names it") for w in warnings)


def test_defaults() -> None:
    cfg = ToolSourceConfig.model_validate({"url": "https://n8n.example.com/mcp/abc"})
    assert (cfg.kind, cfg.transport, cfg.prefix, cfg.refresh_s, cfg.timeout) == (
        "mcp", "streamable-http", "", 300.0, 14.0)
    assert cfg.include == [] and cfg.exclude == [] and cfg.headers == {}


def test_header_from_a_missing_environment_variable_fails_at_build_naming_the_key(monkeypatch) -> None:
    monkeypatch.delenv("N8N_MCP_TOKEN", raising=False)
    cfg = Config.model_validate({"tool_sources": {"n8n": {
        "url": "http://127.0.0.1:5678/mcp/x", "headers": {"Authorization": "Bearer ${N8N_MCP_TOKEN}"}}}})
    with pytest.raises(ValueError, match=r"^tool_sources\.n8n\.headers: header 'Authorization' uses "
                                         r"\$\{N8N_MCP_TOKEN\}, but that environment variable is not set"):
        build_tools(cfg)
    monkeypatch.setenv("N8N_MCP_TOKEN", "s3cret")
    registry = build_tools(cfg)
    (src,) = registry.sources
    assert src.name == "n8n" and "s3cret" not in repr(src) and "s3cret" not in json.dumps(src.health())


# --------------------------------------------------------------------------- the registry


def test_a_source_cannot_take_a_name_already_held(caplog) -> None:
    caplog.set_level(logging.WARNING, "voxbridge.tools")
    registry = ToolRegistry()
    registry.register(Named("transfer"))
    refused = registry.set_source_tools("a", [Named("lookup"), Named("transfer")])
    assert list(refused) == ["transfer"] and registry.source_tools("a") == ["lookup"]
    refused_b = registry.set_source_tools("b", [Named("lookup"), Named("stock")])
    assert list(refused_b) == ["lookup"]
    assert "tool source 'a'" in refused_b["lookup"] and "tool source 'b'" in refused_b["lookup"]
    assert registry.get("transfer").__class__ is Named and registry.source_tools("b") == ["stock"]
    # Logged once per refusal, not at every re-listing.
    registry.set_source_tools("b", [Named("lookup"), Named("stock")])
    assert sum("'lookup' of tool source 'b'" in r.getMessage() for r in caplog.records) == 1
    # The holder lets go: the name is free for the next listing of the other source.
    registry.set_source_tools("a", [])
    assert registry.set_source_tools("b", [Named("lookup"), Named("stock")]) == {}
    assert registry.source_tools("b") == ["lookup", "stock"]


def test_a_bad_name_or_schema_or_a_duplicate_is_refused_not_raised() -> None:
    registry = ToolRegistry()
    refused = registry.set_source_tools("a", [Named("ok"), Named("ok"), Named("bad name"),
                                              Named("bad_schema", {"type": "objekt"})])
    assert set(refused) == {"ok", "bad name", "bad_schema"} and registry.source_tools("a") == ["ok"]
    assert "twice" in refused["ok"] and "invalid parameters schema" in refused["bad_schema"]


def test_a_snapshot_is_what_the_call_was_offered() -> None:
    registry = ToolRegistry()
    registry.register(Named("end_call"))
    registry.set_source_tools("shop", [Named("lookup"), Named("stock")])
    offered = registry.offered(["end_call", "stock"], ["shop"])
    assert offered == ["end_call", "stock", "lookup"]
    snap = registry.snapshot(offered)
    registry.set_source_tools("shop", [Named("gift_wrap")])  # re-listed during the call
    assert snap.names == {"end_call", "stock", "lookup"} and "gift_wrap" not in snap
    assert snap.validate("lookup", {}) is None
    assert registry.offered(["end_call"], ["shop"]) == ["end_call", "gift_wrap"]
    assert registry.offered(["end_call"], ["unknown"]) == ["end_call"]


def _select_tools(src: McpToolSource, listed_tools: list[mt.Tool]) -> list[Any]:
    """The tools part of ``McpToolSource._select`` (the rest: names refused as too long)."""
    return src._select(listed_tools)[0]


# --------------------------------------------------------------------------- listing


def test_include_exclude_prefix_and_names_the_ai_accepts() -> None:
    src, registry = source(include=["order*", "stock", "get.*"], exclude=["*_admin"], prefix="shop_")
    src.refused = registry.set_source_tools("shop", _select_tools(src, [
        listed("order_status", required=["order_id"]), listed("order_admin"), listed("stock"),
        listed("get.weather"), listed("refund")]))
    names = registry.source_tools("shop")
    assert names == ["shop_order_status", "shop_stock", "shop_get_weather"]
    tool = registry.get("shop_get_weather")
    assert tool.remote_name == "get.weather" and tool.description == "the get.weather tool"
    assert tool.spec()["parameters"]["type"] == "object"
    assert registry.get("shop_order_status").parameters["required"] == ["order_id"]


def test_a_schema_without_type_is_an_object() -> None:
    src, _ = source()
    (tool,) = _select_tools(src, [mt.Tool(name="t", input_schema={"properties": {"a": {"type": "string"}}})])
    assert tool.parameters == {"properties": {"a": {"type": "string"}}, "type": "object"}
    assert tool.description == ""


# --------------------------------------------------------------------------- results


def test_result_text() -> None:
    text = mt.TextContent(type="text", text="Order A17 shipped")
    image = mt.ImageContent(type="image", data="aGk=", mime_type="image/png")
    assert result_text(mt.CallToolResult(content=[text, image])) == "Order A17 shipped\n[image: image/png]"
    structured = mt.CallToolResult(content=[], structured_content={"count": 3})
    assert json.loads(result_text(structured) or "") == {"count": 3}
    assert result_text(mt.CallToolResult(content=[])) is None  # the router says "ok"
    huge = mt.CallToolResult(content=[mt.TextContent(type="text", text="x" * 200_000)])
    assert len(result_text(huge) or "") == 64 * 1024


class FakeSession:
    """What McpToolSource uses of a ClientSession: call_tool, scripted."""

    def __init__(self, answer: Any = None, *, hang: bool = False) -> None:
        self.answer = answer
        self.hang = hang
        self.started = asyncio.Event()
        self.cancelled = 0

    async def call_tool(self, name: str, args: dict[str, Any], read_timeout_seconds: float | None = None) -> Any:
        self.started.set()
        try:
            if self.hang:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


async def run_tool(src: McpToolSource, registry: ToolRegistry, name: str, *, deadline: float = 14.0,
                   during: Any = None) -> tuple[str, str]:
    """Through a real router: (outcome, the text the gateway got)."""
    answers: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def send(call_id: str, text: str) -> None:
        answers.append((call_id, text))
        done.set()

    router = ToolRouter(registry, FakeCall(), send, deadline=deadline)
    router.dispatch("tc-1", name, {})
    if during is not None:
        await during()
    await asyncio.wait_for(done.wait(), deadline + 2)
    await router.aclose()
    assert len(answers) == 1
    (outcome,) = router.outcomes
    return outcome.outcome, answers[0][1]


async def test_is_error_becomes_the_servers_text() -> None:
    src, registry = source()
    registry.set_source_tools("shop", _select_tools(src, [listed("cancel")]))
    src._session = FakeSession(mt.CallToolResult(  # type: ignore[assignment]
        content=[mt.TextContent(type="text", text="order A17 has shipped")], is_error=True))
    outcome, text = await run_tool(src, registry, "cancel")
    assert outcome == "error" and json.loads(text)["error"] == "order A17 has shipped"


async def test_a_protocol_error_is_a_tool_error_and_keeps_the_session() -> None:
    from mcp.shared.exceptions import MCPError

    src, registry = source()
    registry.set_source_tools("shop", _select_tools(src, [listed("stock")]))
    session = FakeSession(MCPError(mt.INVALID_PARAMS, "sku is required"))
    src._session = session  # type: ignore[assignment]
    outcome, text = await run_tool(src, registry, "stock")
    assert outcome == "error" and "refused the call: sku is required" in json.loads(text)["error"]
    assert src._session is session and not src._lost.is_set()


async def test_a_timed_out_request_is_cancelled_and_the_session_stays() -> None:
    src, registry = source(timeout=0.3)
    registry.set_source_tools("shop", _select_tools(src, [listed("hang")]))
    session = FakeSession(hang=True)
    src._session = session  # type: ignore[assignment]
    outcome, text = await run_tool(src, registry, "hang")
    assert outcome == "timeout" and "within 0.3 s" in json.loads(text)["error"]
    assert session.cancelled == 1 and src._session is session


async def test_connection_lost_elsewhere_fails_the_waiting_call_at_once() -> None:
    src, registry = source()
    registry.set_source_tools("shop", _select_tools(src, [listed("hang")]))
    session = FakeSession(hang=True)
    src._session = session  # type: ignore[assignment]

    async def lose() -> None:
        await session.started.wait()
        src._connection_lost(session, "keepalive failed")  # what a failed ping or another call does

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    outcome, text = await run_tool(src, registry, "hang", during=lose)
    assert outcome == "error" and "went away during the call" in json.loads(text)["error"]
    assert loop.time() - t0 < 1.0 and session.cancelled == 1
    # Until it reconnects, a call is answered at once.
    outcome, text = await run_tool(src, registry, "hang")
    assert outcome == "error" and "not reachable right now" in json.loads(text)["error"]


async def test_a_closed_stream_is_a_lost_connection() -> None:
    import anyio

    src, registry = source()
    registry.set_source_tools("shop", _select_tools(src, [listed("stock")]))
    session = FakeSession(anyio.ClosedResourceError())
    src._session = session  # type: ignore[assignment]
    outcome, text = await run_tool(src, registry, "stock")
    assert outcome == "error" and "went away" in json.loads(text)["error"]
    assert src._session is None and src._lost.is_set()


async def test_down_withdraws_the_tools_and_says_why() -> None:
    src, registry = source()
    src.refused = registry.set_source_tools("shop", _select_tools(src, [listed("stock"), listed("end_call")]))
    src.tools = registry.source_tools("shop")
    assert src.tools == ["stock"] and list(src.refused) == ["end_call"]
    await src._set_down("ConnectError: refused")
    assert registry.source_tools("shop") == [] and "stock" not in registry
    assert src.health() == {"kind": "mcp", "transport": "streamable-http", "state": "down", "tools": 0,
                            "refused": 0, "error": "ConnectError: refused"}


async def test_run_survives_a_server_that_is_not_there() -> None:
    src, registry = source()
    src.backoff_initial = 0.05
    task = asyncio.create_task(src.run())
    try:
        await src.wait_for(lambda s: s.state == "down", 10)
        assert src.error and registry.source_tools("shop") == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()



def test_a_name_too_long_for_the_ai_services_is_refused_not_offered(caplog) -> None:
    """One over-long function name makes OpenAI refuse the whole session.update, failing every
    call: it is refused at listing time instead, and the others are offered."""
    src, _registry = source(prefix="acme_crm_")
    long_remote = "look_up_the_customer_record_by_phone_number_and_account_id_v2"  # 62 + prefix > 64
    tools, too_long = src._select([listed(long_remote), listed("stock")])
    assert [t.name for t in tools] == ["acme_crm_stock"]
    assert too_long == {f"acme_crm_{long_remote}": "name longer than 64 characters"}
    assert f"acme_crm_{long_remote}" in caplog.text
