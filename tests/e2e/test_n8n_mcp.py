"""n8n workflows as the AI's tools, discovered over MCP: the shipped n8n/workflows/mcp-tools.json in a
real n8n 1.123 (the sid chroot of sandbox.sh n8n; see n8n.py and test_n8n.py for the sandbox).

The workflow is one **MCP Server Trigger** (``@n8n/n8n-nodes-langchain.mcpTrigger`` v2, path
``voxbridge``, Bearer auth) with two tools attached through ``ai_tool`` connections:

* ``order_status`` — a Code Tool (``@n8n/n8n-nodes-langchain.toolCode`` v1.3) with a manual JSON
  Schema (``order_id``, required): answers ``order A17 shipped`` (deterministic, from the code);
* ``active_calls`` — an HTTP Request Tool (``n8n-nodes-base.httpRequestTool`` v4.2): ``GET
  /v1/calls?state=active`` on the bridge's control API with the API token (an ``httpBearerAuth``
  credential), answer trimmed by n8n's *Optimize Response* to a JSON list of the live calls.

Facts the bridge relies on, verified against n8n 1.123.81 by these tests:

* **URL**: ``http://<n8n>/mcp/<path>`` (production, workflow active; ``/mcp-test/<path>`` only while
  the editor listens). One URL serves both transports: **streamable HTTP** (POST, the session in
  ``Mcp-Session-Id``) and **SSE** (GET opens the stream; its ``endpoint`` event names the same path
  with ``?sessionId=``). Node versions 1 and 1.1 used ``<path>/sse`` and ``<path>/messages``.
* **Auth**: the trigger's Bearer (or Header) auth: a missing or wrong token gets ``403``
  before any MCP exchange; the client sends ``Authorization: Bearer <token>`` on every request.
* **Tool names** are the tool nodes' names (non ``[A-Za-z0-9_-]`` runs become ``_``); the server
  is named after the trigger node (``voxbridge_tools``) and does not announce ``listChanged``.
* **Schemas**: ``inputSchema`` is draft-07 with ``additionalProperties: true``; a tool without
  ``$fromAI`` parameters has ``{"type": "object", "properties": {}}``.
* **Calls**: n8n refuses a ``tools/call`` without ``arguments`` (JSON-RPC error -32603 "Require a
  name and arguments for the tool call"), so a tool without arguments must be sent ``{}``.
  Arguments that fail the schema come back as ``isError: true`` with n8n's message. A result is
  one text content item (objects JSON-encoded).

The whole path (the bridge's MCP tool source, tools/mcp.py): a bridge configured with only
``tool_sources: {n8n: {kind: mcp, url, headers}}`` and a profile naming the source offers both
tools to the gateway, and the gateway's ``tool_call`` gets n8n's answer as its ``tool_result``.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import time
import uuid
from typing import Any

import httpx
import pytest

from . import test_n8n as base
from .n8n import N8nSandbox

WORKFLOW = base.WORKFLOWS / "mcp-tools.json"
MCP_PATH = "voxbridge"
SHIPPED_API = "http://127.0.0.1:8080"  # the bridge's default API address, as the workflow ships
MCP_TOKEN = "e2e-mcp-token-" + uuid.uuid4().hex
API_TOKEN = base.API_TOKEN
TOOL_NAMES = {"order_status", "active_calls"}

pytestmark = pytest.mark.timeout(1500)  # a cold sandbox build counts (see test_n8n.py)

# The sandbox fixtures of test_n8n.py, shared (n8n_root: the chroot; n8n: one instance; sim: the
# reference gateway).
n8n_root = base.n8n_root
n8n = base.n8n
sim = base.sim


def load_workflow(api_port: int) -> dict[str, Any]:
    """The shipped workflow, its HTTP Request Tool pointed at the test bridge's API port."""
    wf = json.loads(WORKFLOW.read_text())
    nodes = {n["name"]: n for n in wf["nodes"]}
    url = nodes["active_calls"]["parameters"]["url"]
    assert url.startswith(SHIPPED_API + "/"), url
    nodes["active_calls"]["parameters"]["url"] = url.replace(SHIPPED_API, f"http://127.0.0.1:{api_port}")
    return wf


def credentials(wf: dict[str, Any]) -> list[dict[str, Any]]:
    """The two Bearer credentials the workflow names: MCP clients → n8n, n8n → the bridge's API."""
    nodes = {n["name"]: n for n in wf["nodes"]}
    trigger = next(n for n in wf["nodes"] if n["type"] == "@n8n/n8n-nodes-langchain.mcpTrigger")
    inbound = trigger["credentials"]["httpBearerAuth"]
    outbound = nodes["active_calls"]["credentials"]["httpBearerAuth"]
    assert inbound["id"] != outbound["id"]
    return [
        {"id": inbound["id"], "name": inbound["name"], "type": "httpBearerAuth", "data": {"token": MCP_TOKEN}},
        {"id": outbound["id"], "name": outbound["name"], "type": "httpBearerAuth", "data": {"token": API_TOKEN}},
    ]


async def start_n8n(n8n: N8nSandbox, api_port: int) -> str:
    """Import the credentials and the workflow (active), start n8n; return the MCP URL."""
    wf = load_workflow(api_port)
    n8n.import_credentials(credentials(wf))
    n8n.import_workflow(wf)
    await asyncio.to_thread(n8n.start)
    return f"{n8n.url}/mcp/{MCP_PATH}"


def bridge_config(api_port: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "audiosocket": {"listen": "127.0.0.1:0"},
        "api": {"enabled": True, "listen": f"127.0.0.1:{api_port}", "token": API_TOKEN},
        "profiles": {"default": {"first_message": None, "tools": ["end_call"]}},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def text_of(result: Any) -> str:
    assert len(result.content) == 1, result
    assert result.content[0].type == "text", result
    return str(result.content[0].text)


# ------------------------------------------------------------------------------ the workflow, over MCP


async def mcp_exchange(url: str, transport: str) -> dict[str, Any]:
    """Initialise, list, call both tools (and the two refusals) with the official ``mcp`` client."""
    import httpx2
    from mcp import ClientSession
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError

    headers = {"Authorization": f"Bearer {MCP_TOKEN}"}
    out: dict[str, Any] = {}

    async def run(session: ClientSession) -> None:
        init = await session.initialize()
        out["server"] = init.server_info.name
        out["list_changed"] = init.capabilities.tools.list_changed if init.capabilities.tools else None
        out["tools"] = {t.name: t for t in (await session.list_tools()).tools}
        t0 = time.monotonic()
        out["order"] = await session.call_tool("order_status", {"order_id": "a17"})
        out["order_s"] = time.monotonic() - t0
        out["order_c7"] = await session.call_tool("order_status", {"order_id": "C7"})
        out["calls"] = await session.call_tool("active_calls", {})
        out["bad_args"] = await session.call_tool("order_status", {"order": 17})
        try:
            await session.call_tool("active_calls")  # no `arguments` at all
        except MCPError as exc:
            out["no_args"] = exc
        else:
            out["no_args"] = None

    if transport == "streamable-http":
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(10, read=30)) as client,
            streamable_http_client(url, http_client=client) as (read, write),
            ClientSession(read, write) as session,
        ):
            await asyncio.wait_for(run(session), 60)
    else:
        async with (
            sse_client(url, headers=headers, timeout=10, sse_read_timeout=30) as (read, write),
            ClientSession(read, write) as session,
        ):
            await asyncio.wait_for(run(session), 60)
    return out


@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
async def test_mcp_trigger_workflow_serves_both_tools(n8n: N8nSandbox, sim, free_port, transport: str):
    api_port = free_port()
    bridge = await base.start_bridge(sim, bridge_config(api_port))
    caller = None
    try:
        url = await start_n8n(n8n, api_port)

        # Without the trigger's token, n8n refuses before any MCP exchange.
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-03-26", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "0"}}}
        accept = {"Accept": "application/json, text/event-stream"}
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url, json=init, headers=accept)
            assert r.status_code == 403, r.text
            r = await client.post(url, json=init, headers={**accept, "Authorization": "Bearer wrong"})
            assert r.status_code == 403, r.text

        # A live call on the bridge, so active_calls has something to find.
        caller = await base.place_call(bridge)
        call_id = str(caller.uuid)
        await base.accepted(sim)

        out = await mcp_exchange(url, transport)
    finally:
        if caller is not None:
            await caller.aclose()
        await bridge.stop()

    assert out["server"] == "voxbridge_tools"
    assert not out["list_changed"]
    tools = out["tools"]
    assert set(tools) == TOOL_NAMES, sorted(tools)
    order = tools["order_status"]
    assert "order" in order.description.lower() and "status" in order.description.lower()
    assert order.input_schema["type"] == "object"
    assert order.input_schema["required"] == ["order_id"]
    assert order.input_schema["properties"]["order_id"]["type"] == "string"
    assert "e.g. A17" in order.input_schema["properties"]["order_id"]["description"]
    calls_tool = tools["active_calls"]
    assert "no arguments" in calls_tool.description
    assert calls_tool.input_schema["type"] == "object"
    assert calls_tool.input_schema.get("properties") == {}
    assert not calls_tool.input_schema.get("required")

    # The Code tool's answer.
    assert not out["order"].is_error, out["order"]
    assert text_of(out["order"]) == "order A17 shipped"
    assert out["order_s"] < 10
    assert text_of(out["order_c7"]) == "order C7 delivered"

    # The HTTP Request Tool reached the bridge's API with the token (else 401) and found the call,
    # trimmed to the selected fields (no transcript, no metadata).
    assert not out["calls"].is_error, out["calls"]
    listed = json.loads(text_of(out["calls"]))
    assert isinstance(listed, list), listed
    assert [c["call_id"] for c in listed] == [call_id], listed
    assert listed[0]["state"] == "active"
    assert set(listed[0]) <= {"call_id", "state", "direction", "profile", "caller", "called", "started_at"}

    # Arguments against the schema: an error result with n8n's reason, not an answer.
    assert out["bad_args"].is_error, out["bad_args"]
    assert "order_id" in text_of(out["bad_args"])
    # A tools/call without `arguments` is refused outright: the bridge must send {}.
    assert out["no_args"] is not None, "n8n answered a tools/call without arguments"
    assert "arguments" in str(out["no_args"])


# ------------------------------------------------------------------------------ the whole path

HAVE_MCP_SOURCE = importlib.util.find_spec("tools.mcp") is not None


@pytest.mark.skipif(not HAVE_MCP_SOURCE, reason="tools/mcp.py (the bridge's MCP tool source, issue 12 item 1) "
                                                 "does not exist yet")
@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
async def test_bridge_discovers_n8n_tools_and_the_ai_calls_them(n8n: N8nSandbox, sim, free_port,
                                                                monkeypatch, transport: str):
    api_port = free_port()
    monkeypatch.setenv("N8N_MCP_TOKEN", MCP_TOKEN)
    url = await start_n8n(n8n, api_port)
    # The recipe of the README: the source and a profile naming it; no tool of n8n is named here.
    config = bridge_config(api_port, {
        "tool_sources": {"n8n": {"kind": "mcp", "url": url, "transport": transport, "timeout": 10,
                                 "headers": {"Authorization": "Bearer ${N8N_MCP_TOKEN}"}}},
        "profiles": {"default": {"first_message": None, "tools": ["end_call"], "tool_sources": ["n8n"]}},
    })
    assert "order_status" not in json.dumps(config) and "active_calls" not in json.dumps(config)
    bridge = await base.start_bridge(sim, copy.deepcopy(config))
    caller = None
    try:
        # Discovery runs in the background: await the source's first listing (bounded).
        source = next(s for s in bridge.tools.sources if s.name == "n8n")
        try:
            await source.wait_for(lambda _: set(bridge.tools.source_tools("n8n")) == TOOL_NAMES, 30)
        except TimeoutError:
            pytest.fail(f"n8n's tools were not discovered: {source.health()}\n{n8n.log_tail()}")
        events = bridge.events.subscribe(filter=lambda e: e.type in ("tool.completed", "call.ended"))

        caller = await base.place_call(bridge)
        call_id = str(caller.uuid)
        session = await base.accepted(sim)
        advertised = {t["name"]: t for t in session.config.get("tools", [])}
        assert set(advertised) == TOOL_NAMES | {"end_call"}, (sorted(advertised), session.config)
        assert advertised["order_status"]["parameters"]["required"] == ["order_id"]
        assert "order" in advertised["order_status"]["description"].lower()

        t0 = time.monotonic()
        result = await session.call_tool("order_status", {"order_id": "A17"}, call_id="oc-1", timeout=20)
        elapsed = time.monotonic() - t0
        assert "order A17 shipped" in result, result
        assert elapsed < 14, elapsed  # within the tool deadline (15 s budget)

        # The other tool: n8n calls back into this bridge's API and finds this very call.
        result = await session.call_tool("active_calls", {}, call_id="ac-1", timeout=20)
        assert call_id in result, result

        caller.hangup()
        await caller.wait_ended(5)
        # Exactly one result per tool call: one tool.completed each, one tool_result each at the
        # gateway (a second would be a protocol violation there), and the history says the same.
        completed: list[Any] = []
        while True:
            event = await asyncio.wait_for(events.get(), 10)
            if event.call_id != call_id:
                continue
            if event.type == "call.ended":
                break
            completed.append(event.data)
        assert sorted((d["tool"], d["tool_call_id"], d["outcome"]) for d in completed) == [
            ("active_calls", "ac-1", "ok"), ("order_status", "oc-1", "ok")], completed
        assert set(session.tool_results) == {"oc-1", "ac-1"}, session.tool_results
        assert session.violations == [], session.violations
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}",
                                     headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10) as client:
            record = (await client.get(f"/v1/calls/{call_id}")).json()
        used = sorted((t["tool"], t["outcome"]) for t in record["tools"])
        assert used == [("active_calls", "ok"), ("order_status", "ok")], record
    finally:
        if caller is not None:
            await caller.aclose()
        await bridge.stop()
