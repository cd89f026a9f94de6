"""HTTP tools against real HTTP servers on loopback (uvicorn + Starlette), run through the real
ToolRouter: the deadline, retries, the request contract and how answers are read."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from bridge.config import ToolConfig
from tests.fakes import FakeCall
from tools.base import ToolRegistry
from tools.http import HttpTool, make_client
from tools.router import ToolOutcome, ToolRouter

SECRET = "n8n-shared-secret"
TOKEN = "header-auth-token-1"
HUGE_TOTAL = 64 * 1024 * 1024
HUGE_CHUNK = 16 * 1024


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes


class ToolServer:
    """A stand-in for n8n webhooks: one route per behaviour, every request recorded."""

    def __init__(self) -> None:
        self.requests: dict[str, list[Seen]] = defaultdict(list)
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()  # lets the slow handler finish at teardown
        self.huge_sent = 0
        self.app = Starlette(routes=[Route("/webhook/{name}", self.handle, methods=["POST", "PUT", "GET"])])
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/webhook/{name}"

    async def start(self) -> None:
        # Bound and listening before uvicorn runs: connections queue in the backlog, so tests
        # need no "is it up yet" polling.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))

    async def stop(self) -> None:
        self.release.set()
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await self._task

    async def handle(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        self.requests[name].append(Seen({k.lower(): v for k, v in request.headers.items()}, body))
        count = len(self.requests[name])

        if name == "slow":  # a workflow that takes 20 s
            self.slow_started.set()
            try:
                await asyncio.wait_for(self.release.wait(), 20)
            except TimeoutError:
                pass
            return JSONResponse({"result": "too late"})
        if name == "flaky":
            if count == 1:
                return JSONResponse({"error": "temporarily unavailable"}, status_code=500)
            return JSONResponse({"result": "booked for Tuesday"})
        if name == "down":
            return JSONResponse({"error": "n8n is restarting"}, status_code=503)
        if name == "missing":  # n8n's answer for an unregistered production webhook
            return JSONResponse({"code": 404, "message": 'The requested webhook "missing" is not registered.'},
                                status_code=404)
        if name == "empty":  # what n8n answers when the workflow failed before Respond to Webhook
            return Response(b"", status_code=200, media_type="application/json")
        if name == "text":
            return PlainTextResponse("  Your order ships on Tuesday.\n")
        if name == "wrapped":
            return JSONResponse({"result": {"status": "shipped", "eta": "Tuesday"}})
        if name == "big":  # declared length over the cap
            return JSONResponse({"result": "x" * 8000})
        if name == "huge":  # chunked, no length: only reading tells how big it is
            return StreamingResponse(self._huge(), media_type="application/json")
        if name == "signed":
            ts = request.headers.get("x-voxbridge-timestamp", "")
            given = request.headers.get("x-voxbridge-signature", "")
            expected = "sha256=" + hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
            if not ts.isdigit() or abs(time.time() - int(ts)) > 300 or not hmac.compare_digest(given, expected):
                return JSONResponse({"error": "bad signature"}, status_code=401)
            return JSONResponse({"result": "verified"})
        if name == "auth":  # n8n Webhook node with Header Auth
            if request.headers.get("x-n8n-auth") != f"Bearer {TOKEN}":
                return JSONResponse({"message": "Authorization data is wrong!"}, status_code=403)
            return JSONResponse({"result": "authorized"})
        if name == "echo":
            return JSONResponse({"result": json.loads(body)})
        return JSONResponse({"message": "no such route"}, status_code=404)

    async def _huge(self):
        yield b'{"result": "'
        chunk = b"x" * HUGE_CHUNK
        while self.huge_sent < HUGE_TOTAL:
            self.huge_sent += len(chunk)
            yield chunk
        yield b'"}'


@pytest.fixture
async def server():
    s = ToolServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def client():
    async with make_client() as c:
        yield c


def http_tool(name: str, url: str, client, **kw: Any) -> HttpTool:
    return HttpTool(name, ToolConfig.model_validate({"url": url, "description": name, **kw}), client)


async def call_tool(tool: HttpTool, args: dict[str, Any], *, tool_call_id: str = "tc-1",
                    deadline: float = 14.0) -> tuple[ToolOutcome, str, float]:
    """Dispatch through a real ToolRouter; (outcome, the text sent to the gateway, seconds)."""
    registry = ToolRegistry()
    registry.register(tool)
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[tuple[str, str, float]] = loop.create_future()

    async def send(call_id: str, text: str) -> None:
        assert not answered.done(), "a second result was sent"
        answered.set_result((call_id, text, loop.time()))

    call = FakeCall("call-7", profile="support", caller="+15550100", called="100", channel_name="PJSIP/trunk-0007",
                    variables={"lang": "en"}, metadata={"ticket": "T-9"})
    router = ToolRouter(registry, call, send, deadline=deadline)
    t0 = loop.time()
    router.dispatch(tool_call_id, tool.name, args)
    call_id, text, t1 = await answered
    await router.aclose()
    assert call_id == tool_call_id
    (outcome,) = router.outcomes
    return outcome, text, t1 - t0


def error_of(text: str) -> str:
    return json.loads(text)["error"]


async def test_a_20_s_workflow_is_answered_with_a_timeout_by_15_s(server: ToolServer, client) -> None:
    tool = http_tool("slow", server.url("slow"), client)
    assert tool.timeout == 14  # the real default
    outcome, text, elapsed = await call_tool(tool, {})
    assert server.slow_started.is_set()
    assert outcome.outcome == "timeout"
    assert "did not answer" in error_of(text)
    assert 13.5 <= elapsed <= 15.0, elapsed
    assert len(server.requests["slow"]) == 1  # the deadline is spent: no retry


async def test_500_then_200_is_retried_with_the_same_idempotency_key(server: ToolServer, client) -> None:
    tool = http_tool("flaky", server.url("flaky"), client, hmac_secret=SECRET)
    outcome, text, elapsed = await call_tool(tool, {"slot": "tue"}, tool_call_id="tc-flaky")
    assert (outcome.outcome, text) == ("ok", "booked for Tuesday")
    first, second = server.requests["flaky"]
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == "tc-flaky"
    assert first.body == second.body
    assert elapsed < 5


async def test_503_is_retried_then_reported_with_its_message(server: ToolServer, client) -> None:
    tool = http_tool("down", server.url("down"), client, retries=2)
    outcome, text, _ = await call_tool(tool, {})
    assert outcome.outcome == "error"
    assert error_of(text) == "the down service failed (HTTP 503): n8n is restarting"
    assert len(server.requests["down"]) == 3


async def test_404_is_not_retried(server: ToolServer, client) -> None:
    tool = http_tool("missing", server.url("missing"), client, retries=5)
    outcome, text, _ = await call_tool(tool, {})
    assert outcome.outcome == "error"
    assert error_of(text).startswith("the missing service failed (HTTP 404): The requested webhook")
    assert len(server.requests["missing"]) == 1


async def test_empty_200_is_an_error(server: ToolServer, client) -> None:
    outcome, text, _ = await call_tool(http_tool("empty", server.url("empty"), client), {})
    assert outcome.outcome == "error"
    assert error_of(text) == "the empty service returned no answer"
    assert len(server.requests["empty"]) == 1  # a 2xx is an answer: not retried


async def test_text_body_is_the_result(server: ToolServer, client) -> None:
    outcome, text, _ = await call_tool(http_tool("text", server.url("text"), client), {})
    assert (outcome.outcome, text) == ("ok", "Your order ships on Tuesday.")


async def test_result_field_is_unwrapped(server: ToolServer, client) -> None:
    outcome, text, _ = await call_tool(http_tool("wrapped", server.url("wrapped"), client), {})
    assert outcome.outcome == "ok"
    assert json.loads(text) == {"status": "shipped", "eta": "Tuesday"}


@pytest.mark.parametrize("route", ["big", "huge"])
async def test_oversized_body_is_an_error(server: ToolServer, client, route: str) -> None:
    tool = http_tool(route, server.url(route), client, max_response_bytes=4096)
    outcome, text, elapsed = await call_tool(tool, {})
    assert outcome.outcome == "error"
    assert error_of(text) == "the tool's answer is larger than 4096 bytes"
    assert elapsed < 5
    if route == "huge":  # reading stopped: the server never got to send it all
        assert server.huge_sent < HUGE_TOTAL


async def test_signature_verifies_on_the_server(server: ToolServer, client) -> None:
    good = http_tool("signed", server.url("signed"), client, hmac_secret=SECRET)
    outcome, text, _ = await call_tool(good, {"amount": 12.5, "note": "naïve café"})
    assert (outcome.outcome, text) == ("ok", "verified")
    (seen,) = server.requests["signed"]
    assert seen.headers["x-voxbridge-signature"].startswith("sha256=")

    wrong = http_tool("signed", server.url("signed"), client, hmac_secret="not-the-secret")
    outcome, text, _ = await call_tool(wrong, {"amount": 12.5})
    assert error_of(text) == "the signed service failed (HTTP 401): bad signature"


async def test_configured_header_from_the_environment(server: ToolServer, client,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VB_TEST_N8N_TOKEN", TOKEN)
    tool = http_tool("auth", server.url("auth"), client, headers={"X-N8N-Auth": "Bearer ${VB_TEST_N8N_TOKEN}"})
    outcome, text, _ = await call_tool(tool, {})
    assert (outcome.outcome, text) == ("ok", "authorized")
    assert server.requests["auth"][0].headers["x-n8n-auth"] == f"Bearer {TOKEN}"


async def test_connection_refused_fails_fast_after_retries(client) -> None:
    with socket.socket() as s:  # a port that was just free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tool = http_tool("gone", f"http://127.0.0.1:{port}/webhook/gone", client, retries=2)
    outcome, text, elapsed = await call_tool(tool, {})
    assert outcome.outcome == "error"
    assert error_of(text) == "the gone service could not be reached"
    # Three attempts with 0.2 s + 0.4 s (+ jitter) of back-off between them: well under the budget.
    assert 0.55 <= elapsed < 4.0, elapsed


async def test_request_body_uses_args_never_arguments(server: ToolServer, client) -> None:
    tool = http_tool("echo", server.url("echo"), client)
    outcome, text, _ = await call_tool(tool, {"order_id": "A-1001"}, tool_call_id="tc-echo")
    assert outcome.outcome == "ok"
    (seen,) = server.requests["echo"]
    assert b'"arguments"' not in seen.body
    body = json.loads(seen.body)
    assert body == json.loads(text)
    assert body["args"] == {"order_id": "A-1001"}
    assert body["tool_call_id"] == "tc-echo" and body["call_id"] == "call-7" and body["tool"] == "echo"
    assert body["call"]["caller"] == "+15550100" and body["call"]["profile"] == "support"
    assert "call_id" not in body["call"]
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["user-agent"].startswith("voxbridge/")
