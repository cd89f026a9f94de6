"""MCP tool sources against a real MCP server: the ``mcp`` package's own server side (MCPServer,
FastMCP's successor in mcp 2.x) served by uvicorn on 127.0.0.1 over streamable HTTP and over SSE,
started, killed and restarted by the fixture. The bridge is the real one; the calls come from the
reference gateway (tools/mcp.py, bridge/app.py, bridge/session.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import httpx
import pytest
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError as ServerToolError

from tests.integration.conftest import accepted
from tools.mcp import McpToolSource

TOKEN = "mcp-token-7"


class ShopServer:
    """An MCP server with a few tools, on a fixed loopback port that survives a restart."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.hang_started = asyncio.Event()
        self.release = asyncio.Event()
        self.auth_seen: list[str | None] = []
        self.port = _free_port()
        self.mcp = MCPServer("shop")
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        m = self.mcp

        @m.tool(description="Look up the status of an order by its number.")
        def lookup_order(order_id: str, ctx: Context) -> str:
            self.auth_seen.append((ctx.headers or {}).get("authorization"))
            return f"Order {order_id} shipped yesterday"

        @m.tool(description="Never answers (until the test releases it).")
        async def hang() -> str:
            self.hang_started.set()
            await self.release.wait()
            return "released"

        @m.tool(description="A result with structured content only.")
        def stock(sku: str) -> dict[str, Any]:
            return {"sku": sku, "count": 3}

        @m.tool(description="Fails the way a tool server reports a failure.")
        def cancel_order(order_id: str) -> str:
            raise ServerToolError(f"order {order_id} cannot be cancelled: it has shipped")

        @m.tool(description="Adds a tool and tells the client its list changed.")
        async def open_store(ctx: Context) -> str:
            if "gift_wrap" not in {t.name for t in await m.list_tools()}:
                m.add_tool(lambda note="": f"wrapped {note}".strip(), name="gift_wrap",
                           description="Gift-wrap the order.")
            await ctx.session.send_tool_list_changed()
            return "store opened"

        @m.tool(description="Server-side administration: must never be offered.")
        def admin_reset() -> str:
            return "reset!"

        @m.tool(description="Clashes with the bridge's own end_call.")
        def end_call() -> str:
            return "not the built-in"

    @property
    def url(self) -> str:
        path = "/mcp" if self.transport == "streamable-http" else "/sse"
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        app = self.mcp.streamable_http_app() if self.transport == "streamable-http" else self.mcp.sse_app()
        config = uvicorn.Config(app, log_level="critical", access_log=False, timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(10):
            while not self._server.started:  # the lifespan runs the session manager
                await asyncio.sleep(0.01)

    async def kill(self) -> None:
        """Gone at once: connections dropped, requests in flight never answered."""
        if self._server is None or self._task is None:
            return
        # As a crashed process would: every connection reset (an in-process uvicorn shutting down
        # leaves streaming responses open), then the listener closed.
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        self._server.should_exit = self._server.force_exit = True
        task, self._server, self._task = self._task, None, None
        try:
            async with asyncio.timeout(5):
                await task
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def quick_reconnect(monkeypatch):
    """Reconnect back-off and keepalive short enough for tests (the defaults are 0.5 s → 30 s, 10 s)."""
    monkeypatch.setattr(McpToolSource, "backoff_initial", 0.1)
    monkeypatch.setattr(McpToolSource, "backoff_max", 0.4)
    monkeypatch.setattr(McpToolSource, "keepalive_s", 0.5)


@pytest.fixture(params=["streamable-http", "sse"])
async def shop(request):
    server = ShopServer(request.param)
    await server.start()
    yield server
    server.release.set()
    await server.kill()


def source_config(server: ShopServer, **kw: Any) -> dict[str, Any]:
    return {"shop": {"kind": "mcp", "url": server.url, "transport": server.transport, **kw}}


async def bridge_with(make_bridge, server: ShopServer, profile: dict[str, Any] | None = None, **source: Any):
    profile = {"first_message": None, "tools": ["end_call"], "tool_sources": ["shop"], **(profile or {})}
    return await make_bridge(profile=profile, tool_sources=source_config(server, **source))


def offered(session) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in session.config.get("tools", [])}


def source_of(bridge) -> McpToolSource:
    (source,) = bridge.tool_sources
    return source


async def test_tools_are_discovered_and_called_through_the_router(make_bridge, sim, dial, shop, monkeypatch):
    monkeypatch.setenv("SHOP_MCP_TOKEN", TOKEN)
    bridge = await bridge_with(make_bridge, shop, exclude=["admin_*"],
                               headers={"Authorization": "Bearer ${SHOP_MCP_TOKEN}"})
    assert source_of(bridge).state == "up"
    await dial(bridge)
    session = await accepted(sim)
    tools = offered(session)
    # Discovered without naming one in the YAML; end_call is the bridge's own (the server's is refused).
    assert set(tools) == {"end_call", "lookup_order", "hang", "stock", "cancel_order", "open_store"}
    assert tools["lookup_order"]["description"] == "Look up the status of an order by its number."
    assert tools["lookup_order"]["parameters"]["required"] == ["order_id"]
    assert tools["end_call"]["parameters"] == bridge.tools.get("end_call").parameters

    assert await session.call_tool("lookup_order", {"order_id": "A17"}) == "Order A17 shipped yesterday"
    assert shop.auth_seen[-1] == f"Bearer {TOKEN}"  # the header, read from the environment
    assert json.loads(await session.call_tool("stock", {"sku": "X1"})) == {"sku": "X1", "count": 3}
    failed = json.loads(await session.call_tool("cancel_order", {"order_id": "A17"}))
    assert failed["error"].endswith("order A17 cannot be cancelled: it has shipped")  # the server's text
    # The router validates against the server's schema before anything reaches the server.
    invalid = json.loads(await session.call_tool("lookup_order", {"order": "A17"}))
    assert "invalid arguments" in invalid["error"] and "order_id" in invalid["error"]
    excluded = json.loads(await session.call_tool("admin_reset", {}))
    assert "unknown tool 'admin_reset'" in excluded["error"]
    assert session.violations == []


async def test_include_and_prefix(make_bridge, sim, dial, shop):
    bridge = await bridge_with(make_bridge, shop, include=["lookup_*", "stock"], prefix="shop_")
    await dial(bridge)
    session = await accepted(sim)
    assert set(offered(session)) == {"end_call", "shop_lookup_order", "shop_stock"}
    # The prefixed name is what the AI calls; the server is called by its own name.
    assert await session.call_tool("shop_lookup_order", {"order_id": "B2"}) == "Order B2 shipped yesterday"
    assert bridge.tools.get("shop_stock").remote_name == "stock"


async def test_a_name_collision_is_refused_with_both_origins(make_bridge, sim, dial, shop, caplog):
    caplog.set_level(logging.WARNING, "voxbridge.tools")
    bridge = await bridge_with(make_bridge, shop)
    source = source_of(bridge)
    assert "end_call" in source.refused and "end_call" not in source.tools
    (line,) = [r.getMessage() for r in caplog.records if "end_call" in r.getMessage()]
    assert "tool source 'shop'" in line and "a built-in or configured tool" in line and "first registered" in line
    assert bridge.metrics.registry.get_sample_value("voxbridge_tool_source_refused", {"source": "shop"}) == 1
    # The call's end_call is still the bridge's own.
    await dial(bridge)
    session = await accepted(sim)
    assert await session.call_tool("end_call", {"reason": "done"}) != "not the built-in"


async def test_a_hanging_tool_gets_the_timeout_and_the_source_keeps_working(make_bridge, sim, dial, shop):
    bridge = await bridge_with(make_bridge, shop, timeout=1.0)
    await dial(bridge)
    session = await accepted(sim)
    t0 = time.monotonic()
    hung = json.loads(await session.call_tool("hang", {}))
    elapsed = time.monotonic() - t0
    assert "did not answer within 1 s" in hung["error"]
    assert 0.9 < elapsed < 3.0
    # The cancelled request did not poison the session: the next calls are answered, at once.
    t0 = time.monotonic()
    answers = await asyncio.gather(*(session.call_tool("lookup_order", {"order_id": f"C{i}"}) for i in range(3)))
    assert answers == [f"Order C{i} shipped yesterday" for i in range(3)]
    assert time.monotonic() - t0 < 2.0
    assert source_of(bridge).state == "up" and source_of(bridge).connects == 1


async def test_server_killed_mid_call_one_error_then_back(make_bridge, sim, dial, shop):
    bridge = await bridge_with(make_bridge, shop)
    source = source_of(bridge)
    caller = await dial(bridge)
    session = await accepted(sim)
    pending = asyncio.create_task(session.call_tool("hang", {}, call_id="k1"))
    await asyncio.wait_for(shop.hang_started.wait(), 5)
    await shop.kill()
    t0 = time.monotonic()
    killed = json.loads(await asyncio.wait_for(pending, 10))
    assert "went away" in killed["error"] or "not reachable" in killed["error"]
    assert time.monotonic() - t0 < 8.0
    assert list(session.tool_results) == ["k1"] and session.violations == []  # one result, once
    # The call goes on; the source's tools are answered with an error meanwhile.
    assert bridge.sessions
    await source.wait_for(lambda s: s.state == "down", 10)
    assert source.tools == [] and bridge.tools.source_tools("shop") == []
    down = json.loads(await session.call_tool("lookup_order", {"order_id": "D1"}))
    assert "not reachable" in down["error"]  # offered to this call when it started; the server is gone
    # The server comes back: the source reconnects and its tools return.
    shop.release.set()
    await shop.start()
    await source.wait_for(lambda s: s.state == "up", 10)
    assert source.connects == 2
    assert await session.call_tool("lookup_order", {"order_id": "D2"}) == "Order D2 shipped yesterday"
    await caller.aclose()
    await dial(bridge)
    later = await accepted(sim)
    assert "lookup_order" in offered(later)


async def test_down_at_start_up_then_back(make_bridge, sim, dial, shop):
    await shop.kill()
    bridge = await bridge_with(make_bridge, shop, profile={})
    source = source_of(bridge)
    assert source.state == "down" and source.error
    # Health and metrics say so; the bridge took calls all along.
    assert bridge.metrics.registry.get_sample_value("voxbridge_tool_source_up", {"source": "shop"}) == 0
    await dial(bridge)
    session = await accepted(sim)
    assert set(offered(session)) == {"end_call"}
    await shop.start()
    await source.wait_for(lambda s: s.state == "up", 10)
    assert bridge.metrics.registry.get_sample_value("voxbridge_tool_source_up", {"source": "shop"}) == 1
    assert bridge.metrics.registry.get_sample_value("voxbridge_tool_source_tools", {"source": "shop"}) == 6
    await dial(bridge)
    later = await accepted(sim)
    assert "lookup_order" in offered(later)


async def test_health_lists_the_sources(make_bridge, shop):
    await shop.kill()
    bridge = await make_bridge(profile={"tool_sources": ["shop"]}, tool_sources=source_config(shop),
                               api={"enabled": True, "listen": "127.0.0.1:0"})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.api.port}") as client:
        health = (await client.get("/v1/health")).json()
        assert health["status"] == "ok"
        shop_health = health["tool_sources"]["shop"]
        assert shop_health["state"] == "down" and shop_health["tools"] == 0 and shop_health["error"]
        assert str(shop.port) not in json.dumps(health)  # never the URL (its path may be a secret)
        await shop.start()
        await source_of(bridge).wait_for(lambda s: s.state == "up", 10)
        shop_health = (await client.get("/v1/health")).json()["tool_sources"]["shop"]
        assert shop_health == {"kind": "mcp", "transport": shop.transport, "state": "up", "tools": 6,
                               "refused": 1, "error": None}


async def test_list_changed_offers_the_new_tool_to_the_next_call(make_bridge, sim, dial, shop):
    bridge = await bridge_with(make_bridge, shop)
    source = source_of(bridge)
    caller = await dial(bridge)
    session = await accepted(sim)
    assert "gift_wrap" not in offered(session)
    listings = source.listings
    assert await session.call_tool("open_store", {}) == "store opened"
    await source.wait_for(lambda s: "gift_wrap" in s.tools, 5)
    assert source.listings == listings + 1  # on the notification, not the 300 s refresh
    # This call keeps what it was offered; the next one gets the new tool.
    late = json.loads(await session.call_tool("gift_wrap", {}))
    assert "unknown tool 'gift_wrap'" in late["error"]
    await caller.aclose()
    await dial(bridge)
    later = await accepted(sim)
    assert "gift_wrap" in offered(later)
    assert await later.call_tool("gift_wrap", {"note": "blue"}) == "wrapped blue"
