"""HTTP tools without sockets: the request (body, headers, signature), configuration errors,
and how answers are read. Real servers on loopback are in tests/integration/test_http_tools.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bridge import __version__
from bridge.config import ToolConfig
from tests.fakes import FakeCall
from tools.base import TOOL_CALL_ID, ToolError
from tools.http import HttpTool, build_http_tools, expand_headers, interpret_response, make_client, sign

SECRET = "hmac-secret-never-logged"


def sales_call() -> FakeCall:
    return FakeCall("call-42", profile="sales", caller="+4930111", caller_name="Ada", called="200",
                    channel_name="PJSIP/trunk-0001", variables={"lang": "de"}, metadata={"crm_id": 7})


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False)


@pytest.fixture
async def client():
    async with make_client() as c:
        yield c


def cfg(**kw: Any) -> ToolConfig:
    return ToolConfig.model_validate({"url": "https://n8n.test/webhook/lookup", **kw})


# --- signature ------------------------------------------------------------------------------

def test_sign_matches_an_independent_hmac() -> None:
    body = '{"tool":"x","args":{"q":"straße"}}'.encode()
    expected = hmac.new(b"k3y", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k3y", "1700000000", body) == f"sha256={expected}"
    assert sign(b"k3y", "1700000000", body) == f"sha256={expected}"
    assert sign("k3y", "1700000001", body) != f"sha256={expected}"


async def test_request_is_signed_over_the_exact_bytes_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("N8N_TOKEN", "tok-123")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"result": "ok"})

    async with mock_client(handler) as client:
        tool = HttpTool("lookup", cfg(hmac_secret=SECRET, headers={"X-N8N-Auth": "Bearer ${N8N_TOKEN}"}), client)
        TOOL_CALL_ID.set("tc-1")
        before = int(time.time())
        assert await tool.run(sales_call(), {"order_id": "A-1"}) == "ok"

    (req,) = seen
    raw = req.content
    ts = req.headers["X-Voxbridge-Timestamp"]
    assert before <= int(ts) <= int(time.time())
    expected = hmac.new(SECRET.encode(), ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
    assert req.headers["X-Voxbridge-Signature"] == f"sha256={expected}"
    assert req.method == "POST"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Idempotency-Key"] == "tc-1"
    assert req.headers["User-Agent"] == f"voxbridge/{__version__}"
    assert req.headers["X-N8N-Auth"] == "Bearer tok-123"

    body = json.loads(raw)
    assert body == {
        "tool_call_id": "tc-1", "call_id": "call-42", "tool": "lookup", "args": {"order_id": "A-1"},
        "call": {"caller": "+4930111", "called": "200", "channel": "PJSIP/trunk-0001", "profile": "sales",
                 "direction": "inbound", "variables": {"lang": "de"}, "metadata": {"crm_id": 7},
                 "caller_name": "Ada"},
    }
    assert b'"arguments"' not in raw


async def test_unsigned_without_a_secret_and_method_is_configurable() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text="done")

    async with mock_client(handler) as client:
        tool = HttpTool("t", cfg(method="PUT"), client)
        assert await tool.run(sales_call(), {}) == "done"
    assert seen[0].method == "PUT"
    assert "X-Voxbridge-Signature" not in seen[0].headers
    assert "X-Voxbridge-Timestamp" not in seen[0].headers
    # Outside the router there is no tool call id: a fresh key, never an empty one.
    assert seen[0].headers["Idempotency-Key"].startswith("vb-")


async def test_call_context_missing_keys_fall_back_to_the_call() -> None:
    bare = sales_call()
    bare.context = lambda: {"call_id": bare.call_id}  # a call that knows nothing more

    async with mock_client(lambda r: httpx.Response(200, json=1)) as client:
        body = json.loads(HttpTool("t", cfg(), client).request_body(bare, {}, "tc"))
    assert body["call"] == {"caller": None, "called": None, "channel": None, "profile": "sales",
                            "direction": None, "variables": {"lang": "de"}, "metadata": {"crm_id": 7}}


# --- configuration errors -------------------------------------------------------------------

def test_env_expansion() -> None:
    env = {"A": "alpha", "B": "beta"}
    assert expand_headers("t", {"X-Key": "${A}:${B}", "X-Plain": "$A literal"}, env) == {
        "X-Key": "alpha:beta", "X-Plain": "$A literal"}


@pytest.mark.parametrize("env", [{}, {"N8N_TOKEN": ""}], ids=["unset", "empty"])
def test_missing_env_variable_names_tool_header_and_variable(env: dict[str, str]) -> None:
    with pytest.raises(ValueError) as info:
        expand_headers("crm_lookup", {"X-N8N-Auth": "Bearer ${N8N_TOKEN}"}, env)
    msg = str(info.value)
    assert "crm_lookup" in msg and "X-N8N-Auth" in msg and "N8N_TOKEN" in msg
    assert "Bearer" not in msg  # never the value


def test_missing_env_variable_fails_when_the_tool_is_built(monkeypatch: pytest.MonkeyPatch, client) -> None:
    monkeypatch.delenv("VOXBRIDGE_TEST_UNSET_VAR", raising=False)
    with pytest.raises(ValueError, match=r"'orders'.*'Authorization'.*VOXBRIDGE_TEST_UNSET_VAR"):
        build_http_tools({"orders": cfg(headers={"Authorization": "${VOXBRIDGE_TEST_UNSET_VAR}"})}, client)


@pytest.mark.parametrize("header", ["Idempotency-Key", "content-type", "X-Voxbridge-Signature", "Host"])
def test_reserved_headers_cannot_be_configured(header: str) -> None:
    with pytest.raises(ValueError, match="set by voxbridge"):
        expand_headers("t", {header: "x"}, {})


def test_header_value_with_a_line_break_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="line break") as info:
        expand_headers("t", {"X-Auth": "${TOKEN}"}, {"TOKEN": "secret\n"})
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("url", ["ftp://n8n.test/x", "/webhook/x", "https:///x"])
def test_bad_url_fails_at_construction(url: str, client) -> None:
    with pytest.raises(ValueError, match="'t'"):
        HttpTool("t", cfg(url=url), client)


def test_build_http_tools_takes_only_http_entries(client) -> None:
    tools = build_http_tools({
        "a": cfg(description="A", timeout=9),
        "b": ToolConfig(kind="builtin", builtin="end_call"),
        "c": cfg(parameters={"type": "object", "properties": {"q": {"type": "string"}}}),
    }, client)
    assert [t.name for t in tools] == ["a", "c"]
    assert tools[0].description == "A" and tools[0].timeout == 9
    assert tools[1].parameters["properties"] == {"q": {"type": "string"}}


# --- reading answers ------------------------------------------------------------------------

PARSE_TABLE: list[tuple[str, int, bytes, Any]] = [
    ("result unwrapped", 200, b'{"result": {"status": "shipped"}}', {"status": "shipped"}),
    ("result scalar", 200, b'{"result": "Tuesday", "extra": 1}', "Tuesday"),
    ("explicit null result", 200, b'{"result": null}', None),
    ("plain object", 200, b'{"status": "shipped"}', {"status": "shipped"}),
    ("array", 200, b'[{"id": 1}]', [{"id": 1}]),
    ("number", 201, b"42", 42),
    ("json string", 200, b'"hello"', "hello"),
    ("text", 200, b"  Your order ships Tuesday.\n", "Your order ships Tuesday."),
    ("204", 204, b"", None),
    ("empty 200", 200, b"", ToolError("the lookup service returned no answer")),
    ("whitespace 200", 200, b" \r\n", ToolError("the lookup service returned no answer")),
    ("empty object", 200, b"{}", ToolError("the lookup service returned no answer")),
    ("empty array", 200, b"[]", ToolError("the lookup service returned no answer")),
    ("json null", 200, b"null", ToolError("the lookup service returned no answer")),
    ("error message", 200, b'{"error": "order not found"}', ToolError("order not found")),
    ("error object", 200, b'{"error": {"message": "quota exceeded", "code": 9}}', ToolError("quota exceeded")),
    ("error with null result", 200, b'{"result": null, "error": "boom"}', ToolError("boom")),
    ("falsy error is data", 200, b'{"error": false, "n": 1}', {"error": False, "n": 1}),
    ("503", 503, b"", ToolError("the lookup service failed (HTTP 503)")),
    ("503 json error", 503, b'{"error": "workflow is not active"}',
     ToolError("the lookup service failed (HTTP 503): workflow is not active")),
    ("404 n8n message", 404, b'{"code": 404, "message": "The requested webhook is not registered."}',
     ToolError("the lookup service failed (HTTP 404): The requested webhook is not registered.")),
    ("500 html is not quoted", 500, b"<html><body>Traceback ...</body></html>",
     ToolError("the lookup service failed (HTTP 500)")),
    ("302", 302, b"", ToolError("the lookup service failed (HTTP 302)")),
]


@pytest.mark.parametrize(("status", "body", "expected"), [row[1:] for row in PARSE_TABLE],
                         ids=[row[0] for row in PARSE_TABLE])
def test_interpret_response(status: int, body: bytes, expected: Any) -> None:
    if isinstance(expected, ToolError):
        with pytest.raises(ToolError) as info:
            interpret_response("lookup", status, body)
        assert str(info.value) == str(expected)
    else:
        assert interpret_response("lookup", status, body) == expected


def test_error_excerpt_is_short_and_single_line() -> None:
    body = json.dumps({"error": "line one\nline\ttwo " + "x" * 500}).encode()
    with pytest.raises(ToolError) as info:
        interpret_response("lookup", 502, body)
    msg = str(info.value)
    assert msg.startswith("the lookup service failed (HTTP 502): line one line two x")
    assert "\n" not in msg and len(msg) < 260


# --- retries, deadline and logging ----------------------------------------------------------

async def test_retries_stop_before_the_deadline_and_never_log_secrets(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("N8N_TOKEN", "tok-very-secret")
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        return httpx.Response(503, json={"error": "busy"})

    caplog.set_level(logging.DEBUG, logger="voxbridge")
    loop = asyncio.get_running_loop()
    async with mock_client(handler) as client:
        tool = HttpTool("busy", cfg(url="https://n8n.test/webhook/secret-path?token=qs-secret", timeout=0.6,
                                    retries=5, hmac_secret=SECRET, headers={"X-N8N-Auth": "${N8N_TOKEN}"}), client)
        t0 = loop.time()
        with pytest.raises(ToolError, match=r"^the busy service failed \(HTTP 503\): busy$"):
            await tool.run(sales_call(), {})
        elapsed = loop.time() - t0
    # 0.2 s + 0.4 s of back-off already reach the 0.6 s budget: the third attempt is never
    # started, and the answer comes before the deadline rather than as a timeout.
    assert attempts == 2
    assert elapsed < 0.6
    assert "retrying" in caplog.text
    for secret in (SECRET, "tok-very-secret", "secret-path", "qs-secret"):
        assert secret not in caplog.text


async def test_4xx_is_not_retried() -> None:
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        return httpx.Response(429, json={"message": "slow down"})

    async with mock_client(handler) as client:
        with pytest.raises(ToolError, match=r"HTTP 429\): slow down"):
            await HttpTool("t", cfg(retries=5), client).run(sales_call(), {})
    assert attempts == 1


async def test_redirects_are_not_followed() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(301, headers={"Location": "https://elsewhere.test/webhook/lookup"})

    async with mock_client(handler) as client:
        with pytest.raises(ToolError, match=r"HTTP 301"):
            await HttpTool("t", cfg(), client).run(sales_call(), {})
    assert seen == ["https://n8n.test/webhook/lookup"]


async def test_make_client_does_not_follow_redirects() -> None:
    async with make_client() as client:
        assert client.follow_redirects is False
