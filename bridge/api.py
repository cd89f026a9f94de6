"""The control API (FastAPI): start and follow AI calls, control live ones, subscribe to events.

The contract is in README.md ("Control API, events and webhooks"); the n8n node is built on it.
Every route but ``/v1/health`` needs ``Authorization: Bearer <token>`` (constant-time compare).
The server runs inside the bridge's event loop (uvicorn, no signal handling of its own: the
CLI owns SIGTERM so that calls end gracefully).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from tools.ami import NotAllowed
from tools.base import ToolError

from . import __version__
from .events import EVENT_TYPES

if TYPE_CHECKING:
    from .app import Bridge

log = logging.getLogger("voxbridge.api")

MAX_METADATA_BYTES = 16 * 1024
SSE_HEARTBEAT_S = 15.0


# --------------------------------------------------------------------------- bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartCall(_Body):
    destination: str = Field(..., min_length=1, max_length=64, description="number or extension to call")
    profile: str | None = None
    prompt: str | None = Field(None, max_length=20000)
    first_message: str | None = Field(None, max_length=2000)
    voice: str | None = None
    language: str | None = None
    caller_id: str | None = Field(None, max_length=128)
    variables: dict[str, str] = Field(default_factory=dict, description="values for prompt {placeholders}")
    metadata: dict[str, Any] = Field(default_factory=dict, description="echoed on every event of this call")

    @field_validator("destination", "caller_id")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 for c in v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(v, default=str)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
        return v

    @field_validator("variables")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not k.isidentifier():
                raise ValueError(f"variable name {k!r} must be an identifier (letters, digits, _)")
        return v


class Transfer(_Body):
    extension: str = Field(..., min_length=1, max_length=64)
    context: str | None = Field(None, max_length=80)


class Dtmf(_Body):
    digits: str = Field(..., pattern=r"^[0-9*#A-D]{1,32}$")


class WebhookIn(_Body):
    url: HttpUrl
    events: list[str] | None = None
    secret: str | None = Field(None, min_length=16, max_length=256)
    description: str | None = Field(None, max_length=200)

    @field_validator("events")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        for e in v or []:
            if e not in EVENT_TYPES:
                raise ValueError(f"unknown event type {e!r}; known: {', '.join(EVENT_TYPES)}")
        return v


# --------------------------------------------------------------------------- app


def create_app(bridge: Bridge) -> FastAPI:
    token = bridge.config.api.token.get_secret_value().encode() if bridge.config.api.token else None

    async def auth(request: Request) -> None:
        if token is None:
            return  # loopback without a token: allowed (start-up refuses anything else)
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="voxbridge", version=__version__,
                  description="Start, follow and control AI phone calls; subscribe to call events.")
    guarded = [Depends(auth)]

    def live(call_id: str):
        session = bridge.sessions.get(call_id)
        if session is None:
            raise HTTPException(status.HTTP_409_CONFLICT if call_id in bridge.known_ended else
                                status.HTTP_404_NOT_FOUND,
                                f"call {call_id} is not in progress")
        return session

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "calls_active": len(bridge.sessions),
                "ami_connected": bool(bridge.ami and bridge.ami.connected.is_set())}

    @app.get("/v1/auth", dependencies=guarded)
    async def auth_check() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/v1/profiles", dependencies=guarded)
    async def profiles() -> dict[str, Any]:
        return {"profiles": [
            {"name": name, "provider": p.provider, "voice": p.voice, "language": p.language,
             "sample_rate": p.sample_rate, "tools": list(p.tools), "default": name == bridge.config.default_profile}
            for name, p in bridge.config.profiles.items()
        ]}

    @app.post("/v1/calls", dependencies=guarded, status_code=status.HTTP_202_ACCEPTED)
    async def start_call(body: StartCall) -> dict[str, str]:
        try:
            call_id = await bridge.start_outbound_call(body)
        except NotAllowed as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
        except LookupError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except ToolError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
        return {"call_id": call_id, "state": "dialing"}

    @app.get("/v1/calls", dependencies=guarded)
    async def list_calls(state: Literal["active", "ended"] | None = None,
                         limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        return {"calls": await bridge.list_calls(state, limit, offset)}

    @app.get("/v1/calls/{call_id}", dependencies=guarded)
    async def get_call(call_id: str) -> dict[str, Any]:
        call = await bridge.get_call(call_id)
        if call is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no call {call_id}")
        return call

    @app.post("/v1/calls/{call_id}/hangup", dependencies=guarded)
    async def hangup(call_id: str) -> dict[str, str]:
        session = live(call_id)
        await bridge.hangup_call(session, "api-hangup")
        return {"call_id": call_id, "state": "ending"}

    @app.post("/v1/calls/{call_id}/transfer", dependencies=guarded)
    async def transfer(call_id: str, body: Transfer) -> dict[str, str]:
        session = live(call_id)
        try:
            context, exten = bridge.telephony.check_transfer(session, body.extension, body.context)
            session.note_handoff(f"transferred:{context},{exten}")
            await bridge.telephony.redirect(session, context, exten)
        except NotAllowed as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
        except ToolError as exc:
            session.note_handoff(None)
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return {"status": "transferred", "context": context, "extension": exten}

    @app.post("/v1/calls/{call_id}/dtmf", dependencies=guarded)
    async def dtmf(call_id: str, body: Dtmf) -> dict[str, str]:
        session = live(call_id)
        try:
            await bridge.telephony.play_dtmf(session, body.digits)
        except ToolError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return {"call_id": call_id, "digits": body.digits}

    # -- webhooks (the n8n trigger node's lifecycle)

    def public(hook: dict[str, Any]) -> dict[str, Any]:
        return {k: hook[k] for k in ("id", "url", "events", "description", "created_at") if k in hook}

    @app.post("/v1/webhooks", dependencies=guarded, status_code=status.HTTP_201_CREATED)
    async def create_webhook(body: WebhookIn) -> dict[str, Any]:
        try:
            hook = await bridge.webhooks.create(str(body.url), body.events, body.secret, body.description)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return {**public(hook), "secret": hook["secret"]}

    @app.get("/v1/webhooks", dependencies=guarded)
    async def list_webhooks() -> dict[str, Any]:
        return {"webhooks": [public(h) for h in await bridge.webhooks.list()]}

    @app.get("/v1/webhooks/{hook_id}", dependencies=guarded)
    async def get_webhook(hook_id: str) -> dict[str, Any]:
        hook = await bridge.webhooks.get(hook_id)
        if hook is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {hook_id}")
        return public(hook)

    @app.delete("/v1/webhooks/{hook_id}", dependencies=guarded, status_code=status.HTTP_204_NO_CONTENT)
    async def delete_webhook(hook_id: str) -> Response:
        if not await bridge.webhooks.delete(hook_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {hook_id}")
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    # -- live stream and metrics

    @app.get("/v1/events", dependencies=guarded)
    async def events(request: Request, types: str | None = None) -> StreamingResponse:
        wanted = {t.strip() for t in types.split(",")} if types else None
        if wanted and (unknown := wanted - set(EVENT_TYPES)):
            raise HTTPException(422, f"unknown event types: {', '.join(sorted(unknown))}")
        sub = bridge.events.subscribe(maxsize=1000, filter=(lambda e: e.type in wanted) if wanted else None)

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b": voxbridge event stream\n\n"
                while True:
                    try:
                        async with asyncio.timeout(SSE_HEARTBEAT_S):
                            event = await sub.get()
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    data = json.dumps(event.as_dict(), default=str)
                    yield f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()
            finally:
                sub.close()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/metrics", dependencies=guarded, response_class=PlainTextResponse)
    async def metrics() -> str:
        return bridge.metrics_text()

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our loop: the CLI owns SIGTERM/SIGINT (graceful call shutdown), not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class ApiServer:
    def __init__(self, bridge: Bridge, host: str, port: int) -> None:
        self.host, self.port = host, port
        config = uvicorn.Config(create_app(bridge), host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Bind here, not in uvicorn: its bind failure ends in sys.exit(1), which must not
        # escape from a task; ours raises a plain OSError naming the address.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen for the API on {self.host}:{self.port}: {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api-server")
        while not self._server.started:
            if self._task.done():
                raise OSError(f"the API server on {self.host}:{self.port} did not start: {self._task.exception()}")
            await asyncio.sleep(0.01)
        log.info("control API on http://%s:%d (docs at /docs)", self.host, self.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            async with asyncio.timeout(5):
                await self._task
        except (TimeoutError, Exception):  # noqa: BLE001 - shutting down
            self._task.cancel()
        self._task = None
