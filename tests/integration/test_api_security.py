"""The control API under attack, over real HTTP on loopback (bridge/api.py, ``ApiGuard``).

A web page the operator visits can make the browser send requests to 127.0.0.1:8080, and after
rebinding its own DNS name to 127.0.0.1 even read the answers; without a token only the Host
and Origin headers tell such a request apart, so they are sent here byte for byte on a raw
socket (an HTTP client library would set Host itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest

from bridge import api as api_module
from bridge.api import ApiGuard, RefusalLog, loopback_host

from .conftest import accepted

pytestmark = pytest.mark.timeout(90)
TOKEN = "api-token-0123456789"
HOOK_URL = "http://127.0.0.1:9/hook"  # allowed by the default allow.webhooks; nothing is delivered
MIB = 1024 * 1024


# --------------------------------------------------------------------------- raw HTTP


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


def request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"", *,
            version: str = "1.1", length: bool = True) -> bytes:
    """One request exactly as written: only the headers given (Host included), in this order."""
    lines = [f"{method} {path} HTTP/{version}", *(f"{k}: {v}" for k, v in headers)]
    if length and body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"])) if "content-length" in headers else b""
    return Answer(int(status_line.split()[1]), headers, body)


async def raw(port: int, data: bytes, timeout: float = 10) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await read_answer(reader)
    finally:
        writer.close()


def detail(answer: Answer) -> str:
    return answer.json()["detail"]


# --------------------------------------------------------------------------- bridges


@pytest.fixture
async def open_bridge(make_bridge):
    """The default: no token, loopback only."""
    return await make_bridge(api={"enabled": True, "listen": "127.0.0.1:0"})


@pytest.fixture
async def token_bridge(make_bridge):
    return await make_bridge(api={"enabled": True, "listen": "127.0.0.1:0", "token": TOKEN})


# --------------------------------------------------------------------------- without a token


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:{port}", "127.0.0.1.evil.com",
                                  "127.0.0.1.evil.com:{port}", "localhost.evil.com", "[::1].evil.com",
                                  "127.0.0.1:{port}@evil.com", "0.0.0.0:{port}", "10.0.0.1:{port}",
                                  "[::]:{port}", "2130706433:{port}", ""])
async def test_tokenless_api_refuses_a_foreign_host(open_bridge, host):
    port = open_bridge.api.port
    host = host.format(port=port)
    for method, path in (("GET", "/v1/calls"), ("GET", "/v1/health"), ("GET", "/v1/webhooks"),
                         ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/metrics"), ("GET", "/no/such/path")):
        r = await raw(port, request(method, path, [("Host", host)]))
        assert r.status == 421, (path, host, r)
        assert f"Host {host!r} is not a loopback name or address" in detail(r), r
    body = json.dumps({"url": HOOK_URL}).encode()
    r = await raw(port, request("POST", "/v1/webhooks", [("Host", host), ("Content-Type", "application/json")], body))
    assert r.status == 421, r
    assert await open_bridge.webhooks.list() == []


async def test_tokenless_api_refuses_a_request_without_host(open_bridge):
    # HTTP/1.0 lets a client leave Host out; nobody can say where such a request was meant to go.
    r = await raw(open_bridge.api.port, request("GET", "/v1/calls", [], version="1.0"))
    assert r.status == 421 and detail(r).startswith("no Host header"), r


@pytest.mark.parametrize("origin", ["http://evil.example.com", "https://evil.example.com", "null",
                                    "http://127.0.0.1.evil.com", "http://localhost.evil.com:{port}",
                                    "http://evil.example.com:{port}", "ftp://127.0.0.1", "file://",
                                    "http://127.0.0.1:{port}/", "chrome-extension://abcdef"])
async def test_tokenless_api_refuses_a_cross_site_origin(open_bridge, origin):
    port = open_bridge.api.port
    origin = origin.format(port=port)
    body = json.dumps({"url": HOOK_URL}).encode()
    r = await raw(port, request("POST", "/v1/webhooks", [("Host", f"127.0.0.1:{port}"), ("Origin", origin),
                                                         ("Content-Type", "application/json")], body))
    assert r.status == 403, r
    assert f"Origin {origin!r} is not a loopback http(s) origin" in detail(r), r
    r = await raw(port, request("GET", "/v1/calls", [("Host", f"127.0.0.1:{port}"), ("Origin", origin)]))
    assert r.status == 403, r
    assert await open_bridge.webhooks.list() == []  # nothing was registered


async def test_tokenless_api_refuses_sec_fetch_site_cross_site(open_bridge):
    # A browser that marks the request cross-site, whatever Origin it did or did not send.
    port = open_bridge.api.port
    r = await raw(port, request("GET", "/v1/calls", [("Host", f"127.0.0.1:{port}"), ("Sec-Fetch-Site", "cross-site")]))
    assert r.status == 403 and "Sec-Fetch-Site: cross-site" in detail(r), r
    r = await raw(port, request("GET", "/v1/calls", [("Host", f"127.0.0.1:{port}"), ("Sec-Fetch-Site", "same-origin")]))
    assert r.status == 200, r


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LocalHost", "127.9.8.7:{port}",
                                  "[::1]:{port}", "[::1]"])
async def test_tokenless_api_serves_loopback_hosts(open_bridge, host):
    port = open_bridge.api.port
    r = await raw(port, request("GET", "/v1/calls", [("Host", host.format(port=port))]))
    assert r.status == 200 and r.json() == {"calls": []}, r


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "http://localhost:{port}", "http://localhost:5678",
                                    "https://[::1]:{port}", "HTTP://127.0.0.1:{port}"])
async def test_tokenless_api_serves_same_machine_origins(open_bridge, origin):
    # The API's own /docs page (a browser sends Origin on POST even to the same origin), or a
    # tool running on this machine such as n8n's editor.
    port = open_bridge.api.port
    body = json.dumps({"url": HOOK_URL}).encode()
    r = await raw(port, request("POST", "/v1/webhooks", [("Host", f"127.0.0.1:{port}"),
                                                         ("Origin", origin.format(port=port)),
                                                         ("Sec-Fetch-Site", "same-origin"),
                                                         ("Content-Type", "application/json")], body))
    assert r.status == 201, r
    assert r.json()["url"] == HOOK_URL


async def test_tokenless_api_serves_plain_clients(open_bridge):
    # curl, n8n's HTTP requests, scripts: Host is what they connected to, and no Origin.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{open_bridge.api.port}") as client:
        assert (await client.get("/v1/health")).json()["status"] == "ok"
        assert (await client.get("/v1/calls")).json() == {"calls": []}
        r = await client.post("/v1/webhooks", json={"url": HOOK_URL})
        assert r.status_code == 201, r.text
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/docs")).status_code == 200


async def test_refusals_are_logged_once_per_cause(open_bridge, caplog):
    port = open_bridge.api.port
    caplog.set_level(logging.DEBUG, logger="voxbridge.api")
    for i in range(5):
        await raw(port, request("GET", "/v1/calls", [("Host", f"evil{i}.example.com")]))
        await raw(port, request("GET", "/v1/calls", [("Host", f"127.0.0.1:{port}"), ("Origin", f"http://evil{i}.com")]))
    warnings = [r.getMessage() for r in caplog.records if r.name == "voxbridge.api" and r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "'evil0.example.com' is not a loopback" in warnings[0] and "(421)" in warnings[0]
    assert "Origin 'http://evil0.com'" in warnings[1] and "(403)" in warnings[1]
    debug = [r for r in caplog.records if r.name == "voxbridge.api" and r.levelno == logging.DEBUG]
    assert len(debug) == 8  # the rest are still there, at debug level
    metrics = (await raw(port, request("GET", "/metrics", [("Host", "127.0.0.1")]))).body.decode()
    assert 'voxbridge_api_refused_total{cause="host"} 5.0\n' in metrics
    assert 'voxbridge_api_refused_total{cause="origin"} 5.0\n' in metrics
    assert 'voxbridge_api_refused_total{cause="body"} 0.0\n' in metrics


# --------------------------------------------------------------------------- with a token


def _example_path(path: str) -> str:
    return path.replace("{call_id}", "some-call").replace("{hook_id}", "some-hook")


async def test_every_route_but_health_needs_the_token(token_bridge):
    """Iterates the app's routes, so a route added later (or one FastAPI adds) cannot slip by."""
    port = token_bridge.api.port
    routes = [(m, r.path) for r in token_bridge.api.app.routes for m in sorted(getattr(r, "methods", None) or ())]
    paths = {p for _, p in routes}
    # /redoc is not offered: it would load ReDoc from a CDN (an air-gapped PBX has none).
    assert {"/docs", "/openapi.json", "/v1/events", "/metrics", "/v1/webhooks/{hook_id}"} <= paths
    assert "/redoc" not in paths
    routes.append(("GET", "/no/such/path"))  # no route: still 401, not a 404 that maps the API
    bad = [[], [("Authorization", "Bearer wrong")], [("Authorization", TOKEN)], [("Authorization", f"Basic {TOKEN}")],
           [("Authorization", f"Bearer {TOKEN}x")], [("Authorization", f"Bearer {TOKEN[:-1]}")],
           [("Authorization", "Bearer")]]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for method, path in routes:
            url = _example_path(path)
            if path in ("/console", "/console/{name}", "/docs-assets/{name}", "/docs", "/openapi.json",
                        "/docs/openapi.json"):
                # Static files without data (the console's page and script, /docs, its schema and
                # Swagger UI's assets): a browser loads them before it can send a header.
                r = await client.request(method, url)
                assert r.status_code in (200, 404), (method, path, r.status_code)
                continue
            if path == "/v1/health":
                for headers in bad:
                    r = await client.request(method, url, headers=dict(headers))
                    assert r.status_code == 200, (method, path, headers)
                continue
            for headers in bad:
                r = await client.request(method, url, headers=dict(headers))
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    assert "bearer token" in r.json()["detail"] or "Bearer <api.token>" in r.json()["detail"]
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/docs", headers=good)).status_code == 200
        assert "/v1/calls" in (await client.get("/openapi.json", headers=good)).json()["paths"]
        assert (await client.get("/no/such/path", headers=good)).status_code == 404


async def test_docs_load_without_the_token_and_authorize_with_it(token_bridge):
    """A browser opening /docs cannot send a bearer header: the page and its schema are served
    without one (they hold no data), and the schema declares the bearer scheme, so Swagger UI's
    "Authorize" takes the token and sends it on the calls it makes."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{token_bridge.api.port}", timeout=10) as client:
        page = await client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/docs/openapi.json" in page.text and "/docs-assets/swagger-ui-bundle.js" in page.text
        schema = (await client.get("/openapi.json")).json()
        assert schema["components"]["securitySchemes"]["bearer"] == {
            "type": "http", "scheme": "bearer", "description": "api.token"}
        assert schema["security"] == [{"bearer": []}]
        assert schema["paths"]["/v1/health"]["get"]["security"] == []
        # What Swagger UI itself reads: the same, as OpenAPI 3.0 (it renders nothing for 3.1).
        docs_schema = (await client.get("/docs/openapi.json")).json()
        assert docs_schema["openapi"].startswith("3.0.") and schema["openapi"].startswith("3.1.")
        assert docs_schema["security"] == schema["security"] and docs_schema["paths"].keys() == schema["paths"].keys()
        assert "security" not in schema["paths"]["/v1/calls"]["get"]  # the global one applies
        assert TOKEN not in page.text and TOKEN not in json.dumps(schema)
        # What Swagger UI sends once authorized, and what it gets without.
        assert (await client.get("/v1/calls")).status_code == 401
        assert (await client.get("/v1/calls", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200


async def test_without_a_token_the_schema_declares_no_scheme(open_bridge):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{open_bridge.api.port}", timeout=10) as client:
        schema = (await client.get("/openapi.json")).json()
    assert "security" not in schema and "securitySchemes" not in schema.get("components", {})


async def test_with_a_token_the_host_is_not_restricted(token_bridge):
    # Behind a reverse proxy the Host is the proxy's name; the token is what protects the API.
    port = token_bridge.api.port
    r = await raw(port, request("GET", "/v1/calls", [("Host", "voxbridge.internal.example"),
                                                     ("Authorization", f"Bearer {TOKEN}")]))
    assert r.status == 200, r
    r = await raw(port, request("GET", "/v1/calls", [("Host", "voxbridge.internal.example")]))
    assert r.status == 401, r


@pytest.mark.parametrize("headers, status", [
    ([(b"host", b"127.0.0.1"), (b"host", b"evil.example.com")], 421),
    ([(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1"), (b"origin", b"http://evil.example.com")], 403),
])
async def test_guard_refuses_repeated_headers(headers, status):
    # h11 already refuses a repeated Host; other servers (httptools) pass both on to the app.
    reached: list[Any] = []

    async def app(scope, receive, send):
        reached.append(scope)

    guard = ApiGuard(app, token=None, max_body_bytes=1024, refusals=RefusalLog())
    sent: list[dict[str, Any]] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    await guard({"type": "http", "path": "/v1/calls", "headers": headers}, receive, send)
    assert not reached and sent[0]["status"] == status
    assert "more than one" in json.loads(sent[1]["body"])["detail"]


async def test_guard_refuses_two_authorization_headers():
    async def app(scope, receive, send):
        raise AssertionError("must not be reached")

    guard = ApiGuard(app, token=b"t" * 20, max_body_bytes=1024, refusals=RefusalLog())
    sent: list[dict[str, Any]] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"authorization", b"Bearer " + b"t" * 20), (b"authorization", b"Bearer x")]
    await guard({"type": "http", "path": "/v1/calls", "headers": headers}, receive, send)
    assert sent[0]["status"] == 401


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1", True), ("127.0.0.1:8080", True), ("127.255.0.9:1", True), ("localhost", True),
    ("LOCALHOST:80", True), ("[::1]", True), ("[::1]:8080", True), ("[0:0:0:0:0:0:0:1]:8080", True),
    ("", False), ("::1", False), ("[::1", False), ("localhost.", False), ("localhost.evil.com", False),
    ("127.0.0.1.evil.com", False), ("evil.com:127", False), ("127.1", False), ("2130706433", False),
    ("0x7f.0.0.1", False), ("127.0.0.1:8080:80", False), ("127.0.0.1:", False), ("127.0.0.1 ", False),
    ("127.0.0.1@evil.com", False), ("user@127.0.0.1", False), ("[::]", False),
    ("0.0.0.0", False), ("[127.0.0.1]", False),
])
def test_loopback_host(value, expected):
    assert loopback_host(value) is expected


# --------------------------------------------------------------------------- body size


async def test_oversize_content_length_is_refused_before_reading(open_bridge):
    port = open_bridge.api.port
    headers = [("Host", f"127.0.0.1:{port}"), ("Content-Type", "application/json"), ("Content-Length", str(16 * MIB))]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # Only the headers and a few bytes: a server that waits for the body never answers.
        writer.write(request("POST", "/v1/webhooks", headers, length=False) + b'{"url": ')
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(5):
            r = await read_answer(reader)
        elapsed = time.monotonic() - started
    finally:
        writer.close()
    assert r.status == 413, r
    assert detail(r) == f"request body of {16 * MIB} bytes is larger than the limit of {MIB} bytes (api.max_body_bytes)"
    assert r.headers["connection"] == "close"
    assert elapsed < 2, elapsed


async def test_oversize_chunked_body_is_refused_as_it_arrives(open_bridge):
    port = open_bridge.api.port
    headers = [("Host", f"127.0.0.1:{port}"), ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("POST", "/v1/webhooks", headers, length=False))
        chunk = b"x" * 65536
        for _ in range(MIB // len(chunk) + 1):  # just past the cap, and the body is never finished
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        async with asyncio.timeout(5):
            r = await read_answer(reader)
    finally:
        writer.close()
    assert r.status == 413, r
    assert detail(r) == f"request body is larger than the limit of {MIB} bytes (api.max_body_bytes)"


async def test_bodies_up_to_the_cap_reach_the_api_whole(open_bridge):
    port = open_bridge.api.port
    host = ("Host", f"127.0.0.1:{port}")
    # Exactly max_body_bytes of valid JSON: parsed (the metadata is then too big for a call).
    skeleton = {"destination": "+442071234567", "metadata": {"pad": ""}}
    pad = MIB - len(json.dumps(skeleton).encode())
    body = json.dumps({"destination": "+442071234567", "metadata": {"pad": "x" * pad}}).encode()
    assert len(body) == MIB
    r = await raw(port, request("POST", "/v1/calls", [host, ("Content-Type", "application/json")], body))
    assert r.status == 422 and "metadata larger than" in r.body.decode(), r
    # A chunked body under the cap, in several pieces, is served normally.
    body = json.dumps({"url": HOOK_URL, "description": "chunked"}).encode()
    pieces = [body[:10], body[10:25], body[25:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    r = await raw(port, request("POST", "/v1/webhooks", [host, ("Content-Type", "application/json"),
                                                         ("Transfer-Encoding", "chunked")], length=False) + chunked)
    assert r.status == 201 and r.json()["description"] == "chunked", r


async def test_body_cap_follows_the_config(make_bridge):
    bridge = await make_bridge(api={"enabled": True, "listen": "127.0.0.1:0", "max_body_bytes": 2048})
    port = bridge.api.port
    body = json.dumps({"url": HOOK_URL, "description": "x" * 2100}).encode()
    r = await raw(port, request("POST", "/v1/webhooks", [("Host", "127.0.0.1"), ("Content-Type", "application/json")],
                                body))
    assert r.status == 413 and "limit of 2048 bytes" in detail(r), r


# --------------------------------------------------------------------------- string fields

BAD = ["\r", "\n", "\x00", "\t", "\x1b", "\x7f", "\x85", "\ud800"]
CALL = {"destination": "+442071234567"}
# (method, path, body builder for a bad value, loc of the error)
FIELDS: dict[str, tuple[str, str, Any, tuple[str, ...]]] = {
    "destination": ("POST", "/v1/calls", lambda s: {"destination": f"+44{s}2071234567"}, ("body", "destination")),
    "profile": ("POST", "/v1/calls", lambda s: {**CALL, "profile": f"sales{s}"}, ("body", "profile")),
    "voice": ("POST", "/v1/calls", lambda s: {**CALL, "voice": f"Ed{s}ward"}, ("body", "voice")),
    "language": ("POST", "/v1/calls", lambda s: {**CALL, "language": f"en{s}"}, ("body", "language")),
    "caller_id": ("POST", "/v1/calls", lambda s: {**CALL, "caller_id": f"Shop{s}"}, ("body", "caller_id")),
    "variables value": ("POST", "/v1/calls", lambda s: {**CALL, "variables": {"name": f"Ann{s}"}},
                        ("body", "variables", "name")),
    "variables key": ("POST", "/v1/calls", lambda s: {**CALL, "variables": {f"na{s}me": "Ann"}},
                      ("body", "variables")),
    "metadata key": ("POST", "/v1/calls", lambda s: {**CALL, "metadata": {f"lead{s}": 1}}, ("body", "metadata")),
    "extension": ("POST", "/v1/calls/some-call/transfer", lambda s: {"extension": f"100{s}"}, ("body", "extension")),
    "context": ("POST", "/v1/calls/some-call/transfer", lambda s: {"extension": "100", "context": f"ops{s}"},
                ("body", "context")),
    "digits": ("POST", "/v1/calls/some-call/dtmf", lambda s: {"digits": f"12{s}"}, ("body", "digits")),
    "url": ("POST", "/v1/webhooks", lambda s: {"url": f"http://127.0.0.1:9/ho{s}ok"}, ("body", "url")),
    "description": ("POST", "/v1/webhooks", lambda s: {"url": HOOK_URL, "description": f"n8n{s}"},
                    ("body", "description")),
    "secret": ("POST", "/v1/webhooks", lambda s: {"url": HOOK_URL, "secret": f"0123456789abcdef{s}"},
               ("body", "secret")),
}


def _encoded(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: an unpaired surrogate travels as "\ud800"


def _names_field(r: httpx.Response, loc: tuple[str, ...], char: str) -> bool:
    """The 422 names the field (its ``loc``) and the character. An unpaired surrogate may be
    refused by pydantic's own string check first ("unable to parse raw data as a unicode
    string"), which names the field too."""
    def precise(msg: str) -> bool:
        if 0xD800 <= ord(char) <= 0xDFFF:
            return f"an unpaired surrogate (U+{ord(char):04X})" in msg or "as a unicode string" in msg
        return f"a control character (U+{ord(char):04X})" in msg

    return any(tuple(e["loc"][:len(loc)]) == loc and precise(e["msg"]) for e in r.json()["detail"])


@pytest.mark.parametrize("field", list(FIELDS))
async def test_control_characters_in_string_fields_are_422_naming_the_field(open_bridge, field):
    method, path, build, loc = FIELDS[field]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{open_bridge.api.port}") as client:
        for char in BAD:
            r = await client.request(method, path, content=_encoded(build(char)),
                                     headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (field, char, r.status_code, r.text)
            assert _names_field(r, loc, char), (field, char, r.text)
    assert await open_bridge.webhooks.list() == []


async def test_prompt_and_first_message_may_hold_newlines_and_tabs_only(open_bridge):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{open_bridge.api.port}") as client:
        for field in ("prompt", "first_message"):
            ok = await client.post("/v1/calls", content=_encoded({**CALL, field: "Line one.\n\tLine two."}),
                                   headers={"Content-Type": "application/json"})
            assert ok.status_code == 403, ok.text  # valid: refused only by allow.calls (empty here)
            for char in ("\r", "\x00", "\x0b", "\x1b", "\x7f", "\x9b", "\udc00"):
                r = await client.post("/v1/calls", content=_encoded({**CALL, field: f"Hello{char} there"}),
                                      headers={"Content-Type": "application/json"})
                assert r.status_code == 422, (field, char, r.text)
                assert _names_field(r, ("body", field), char), r.text
                if char != "\udc00":
                    assert "only newline and tab are allowed" in r.text


async def test_metadata_values_must_be_encodable_and_shallow(open_bridge):
    # Metadata values are free JSON (newlines are fine) but must be storable and deliverable.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{open_bridge.api.port}") as client:
        ok = await client.post("/v1/calls", content=_encoded({**CALL, "metadata": {"note": "a\nb"}}),
                               headers={"Content-Type": "application/json"})
        assert ok.status_code == 403, ok.text
        r = await client.post("/v1/calls", content=_encoded({**CALL, "metadata": {"lead": {"n": ["x\ud800"]}}}),
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "metadata must be valid Unicode" in r.text, r.text
        # Nesting is bounded: the metadata is serialised again for the store, webhooks and streams.
        nested: Any = "deep"
        for _ in range(31):
            nested = [nested]
        ok = await client.post("/v1/calls", json={**CALL, "metadata": {"n": nested}})
        assert ok.status_code == 403, ok.text
        r = await client.post("/v1/calls", json={**CALL, "metadata": {"n": [nested]}})
        assert r.status_code == 422 and "metadata is nested deeper than 32 levels" in r.text, r.text


async def test_query_and_path_strings_are_validated(open_bridge):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{open_bridge.api.port}", timeout=5) as client:
        # "call.ended\n" must not be read as "call.ended" (and the stream must not open).
        r = await client.get("/v1/events", params={"types": "call.ended\n"})
        assert r.status_code == 422 and "types must not contain control characters" in r.json()["detail"], r.text
        r = await client.get("/v1/calls/abc%0d%0adef")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "call_id"], r.text
        r = await client.delete("/v1/webhooks/abc%00")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "hook_id"], r.text


@pytest.mark.parametrize("exten, context", [("1 00", None), ("100,2", None), ("100/555", None), ("1;2", None),
                                            ("100", "ops center"), ("100", "ops,1"), ("100", "")])
async def test_transfer_target_must_be_an_asterisk_extension(open_bridge, exten, context):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{open_bridge.api.port}") as client:
        body = {"extension": exten} if context is None else {"extension": exten, "context": context}
        r = await client.post("/v1/calls/some-call/transfer", json=body)
        assert r.status_code == 422, r.text
        field = "extension" if context is None else "context"
        assert r.json()["detail"][0]["loc"] == ["body", field], r.text


async def test_cr_in_transfer_extension_on_a_live_call_is_422(make_bridge, sim, dial):
    # An allowlist that would match it: the value must be refused before it is looked at, and
    # long before it could reach AMI (where a line break is a protocol error).
    bridge = await make_bridge(api={"enabled": True, "listen": "127.0.0.1:0"}, allow={"transfer": ["ops,.+"]})
    caller = await dial(bridge)
    await accepted(sim)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.api.port}") as client:
        r = await client.post(f"/v1/calls/{caller.uuid}/transfer", json={"extension": "100\r\nAction: Originate",
                                                                          "context": "ops"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "extension"]
        r = await client.post(f"/v1/calls/{caller.uuid}/dtmf", json={"digits": "12\n"})
        assert r.status_code == 422, r.text
        assert str(caller.uuid) in bridge.sessions  # the call is unharmed


# --------------------------------------------------------------------------- event streams, headers


async def _open_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Answer | None]:
    """GET /v1/events; returns the open connection once the stream's first bytes arrived (None),
    or the refusal."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n")[0]:
            writer.close()
            headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if line)
            body = await reader.readexactly(int(headers["content-length"]))
            return reader, writer, Answer(int(head.split()[1]), headers, body)
        assert b"cache-control: no-store" in head.lower() and b"text/event-stream" in head
        await reader.readuntil(b"voxbridge event stream")
    return reader, writer, None


async def test_event_streams_are_capped(open_bridge):
    port = open_bridge.api.port
    limit = api_module.MAX_EVENT_STREAMS
    assert limit == 100
    streams = []
    try:
        for _ in range(limit):
            _reader, writer, refused = await _open_stream(port)
            assert refused is None, refused
            streams.append(writer)
        assert len(open_bridge.events._subs) == limit
        _, _, refused = await _open_stream(port)
        assert refused is not None and refused.status == 429, refused
        assert detail(refused) == f"too many event streams open (the limit is {limit}): close one first"
        assert len(open_bridge.events._subs) == limit  # the refused one holds nothing
        # Closing a stream gives its slot back.
        streams.pop().close()
        async with asyncio.timeout(10):
            while len(open_bridge.events._subs) == limit:
                await asyncio.sleep(0.01)
        _, writer, refused = await _open_stream(port)
        assert refused is None, refused
        streams.append(writer)
    finally:
        for w in streams:
            w.close()
    async with asyncio.timeout(10):
        while open_bridge.events._subs:
            await asyncio.sleep(0.01)


async def test_every_answer_is_no_store_and_nosniff(open_bridge, make_bridge):
    port = open_bridge.api.port
    answers = {
        "ok": await raw(port, request("GET", "/v1/health", [("Host", "127.0.0.1")])),
        "docs": await raw(port, request("GET", "/docs", [("Host", "127.0.0.1")])),
        "404": await raw(port, request("GET", "/v1/calls/nope", [("Host", "127.0.0.1")])),
        "422": await raw(port, request("POST", "/v1/webhooks", [("Host", "127.0.0.1"),
                                                                 ("Content-Type", "application/json")], b"{}")),
        "421": await raw(port, request("GET", "/v1/calls", [("Host", "evil.example.com")])),
        "413": await raw(port, request("POST", "/v1/calls", [("Host", "127.0.0.1"), ("Content-Length", str(2 * MIB))],
                                       length=False)),
    }
    token_bridge = await make_bridge(api={"enabled": True, "listen": "127.0.0.1:0", "token": TOKEN})
    answers["401"] = await raw(token_bridge.api.port, request("GET", "/v1/calls", [("Host", "127.0.0.1")]))
    for name, r in answers.items():
        assert r.headers.get("cache-control") == "no-store", (name, r.headers)
        assert r.headers.get("x-content-type-options") == "nosniff", (name, r.headers)
    # ... and the event stream (checked inside _open_stream), which used to say no-cache.
    _, writer, refused = await _open_stream(port)
    assert refused is None
    writer.close()
