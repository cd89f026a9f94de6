"""AillomVox gateway adapter (the primary protocol).

Wire protocol (the gateway vendor publishes it; bridge/devtools/gateway_sim.py is our strict reference
implementation of it, and the adapter is tested against that):

* WebSocket; the first message is a JSON text frame ``{"type": "config", "apikey": …}``.
  Anything binary before it gets the connection closed with 1008.
* Then raw binary frames of s16le mono PCM at ``sample_rate``, both ways, no wrapper.
* Server → client JSON: ``transcript``, ``tool_call``, ``playback_clear_buffer``, ``hangup``, ``error``.
* Client → server JSON: ``tool_result`` (within 15 s of each ``tool_call``), ``hangup``.

The gateway mentions "~500 ms stabilisation" after config but sends no ready event, so caller
audio is held (bounded) for ``settle_ms`` and then released in order, one message per frame.
Connection, uplink and keepalive are bridge/gateway/ws.py's, shared with the other WebSocket
adapters.

Parsing is split from I/O: :func:`parse_server_message` is pure (text in, event or ``None`` out)
and is what the unit tests exercise.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from .base import (
    AudioOut,
    ClearPlayback,
    GatewayEvent,
    RemoteError,
    RemoteHangup,
    SessionSetup,
    ToolCall,
    Transcript,
)
from .ws import (
    CLOSE_TIMEOUT_S,
    DIRECT_WRITE_LIMIT,
    UPLINK_BUFFER_MS,
    ParseProblem,
    UplinkConnection,
    WebSocketGateway,
    clip,
    load_json_object,
    redact_url,
)

__all__ = ["CLOSE_TIMEOUT_S", "DIRECT_WRITE_LIMIT", "UPLINK_BUFFER_MS", "AillomVoxGateway", "ParseProblem",
           "UplinkConnection", "build_config", "parse_server_message", "redact_url"]

def build_config(setup: SessionSetup, api_key: str) -> dict[str, Any]:
    """The first message. Optional fields are sent only when set."""
    msg: dict[str, Any] = {
        "type": "config",
        "apikey": api_key,
        "provider": setup.provider,
        "sample_rate": setup.sample_rate,
        "system_prompt": setup.system_prompt,
    }
    for key in ("voice", "language", "first_message", "farewell_message"):
        value = getattr(setup, key)
        if value is not None:
            msg[key] = value
    msg["max_duration"] = setup.max_duration
    if setup.tools:
        msg["tools"] = setup.tools
    return msg


def parse_server_message(text: str) -> GatewayEvent:
    """Parse one JSON text frame from the gateway.

    Raises :class:`ParseProblem` for invalid JSON, a missing/unknown ``type`` or malformed
    fields — except for a ``tool_call`` that has a usable ``call_id``: that becomes a
    :class:`ToolCall` with ``problem`` set, because the gateway is waiting for an answer.
    """
    msg = load_json_object(text)
    mtype = msg.get("type")
    if mtype == "playback_clear_buffer":
        return ClearPlayback()
    if mtype == "hangup":
        return RemoteHangup()
    if mtype == "transcript":
        role, text_, final = msg.get("role"), msg.get("text"), msg.get("final", False)
        if not isinstance(role, str) or not isinstance(text_, str) or not isinstance(final, bool):
            raise ParseProblem(f"transcript needs string role/text and boolean final: {clip(text)}")
        return Transcript(role=role, text=text_, final=final)
    if mtype == "error":
        message = msg.get("message")
        return RemoteError(message=str(message) if message is not None else "(no message)")
    if mtype == "tool_call":
        call_id = msg.get("call_id")
        if not isinstance(call_id, (str, int)) or isinstance(call_id, bool) or str(call_id) == "":
            raise ParseProblem(f"tool_call without a usable call_id cannot be answered: {clip(text)}")
        call_id = str(call_id)
        name = msg.get("name")
        args = msg.get("args", {})
        if isinstance(args, str):  # some providers double-encode arguments
            try:
                args = json.loads(args) if args.strip() else {}
            except (json.JSONDecodeError, RecursionError):
                return ToolCall(call_id, str(name or ""), {}, problem="arguments are not valid JSON")
        if args is None:
            args = {}
        if not isinstance(name, str) or not name:
            return ToolCall(call_id, "", {}, problem="tool_call has no tool name")
        if not isinstance(args, dict):
            return ToolCall(call_id, name, {}, problem=f"arguments must be a JSON object, got {type(args).__name__}")
        return ToolCall(call_id, name, args)
    if mtype is None:
        raise ParseProblem(f"message has no 'type': {clip(text)}")
    raise ParseProblem(f"unknown message type {mtype!r}")


class AillomVoxGateway(WebSocketGateway):
    """One AillomVox session over a WebSocket."""

    protocol_name = "aillomvox"
    #: No mid-call commands of its own: the protocol (seed 000) has no client message but config,
    #: tool_result and hangup:
    #: nothing to add context, speak or change tools with once the session is configured.
    capabilities: frozenset[str] = frozenset()
    binary_is_audio = True  # raw PCM both ways: no wrapper to parse

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        api_key_in_query: bool = False,
        connect_timeout: float = 5.0,
        settle_ms: int = 500,
        settle_buffer_ms: int = 2000,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 10.0,
        call_id: str = "",
    ) -> None:
        super().__init__(url, call_id=call_id, connect_timeout=connect_timeout, hold_ms=settle_buffer_ms,
                         keepalive_interval=keepalive_interval, keepalive_timeout=keepalive_timeout)
        self._api_key = api_key
        self._api_key_in_query = api_key_in_query
        self._settle_s = settle_ms / 1000

    def _uri(self) -> str:
        uri = self._url
        if self._api_key_in_query:
            uri += ("&" if "?" in uri else "?") + "apiKey=" + quote(self._api_key, safe="")
        return uri

    def _opening(self, setup: SessionSetup) -> list[str | bytes]:
        return [json.dumps(build_config(setup, self._api_key))]

    def _after_open(self, setup: SessionSetup) -> None:
        # No ready event: hold the caller's audio for the settle time, then release it in order.
        if self._settle_s > 0:
            asyncio.get_running_loop().call_later(self._settle_s, self.release_uplink)
        else:
            self.release_uplink()

    def _on_message(self, message: str | bytes) -> Iterable[GatewayEvent]:
        if isinstance(message, bytes):
            if len(message) % 2:
                self._log.warning("gateway sent odd-length audio (%d bytes); last byte dropped", len(message))
                message = message[:-1]
            if message:
                self._count_down(len(message))
                return (AudioOut(message),)
            return ()
        return (parse_server_message(message),)

    async def send_tool_result(self, call_id: str, result: str) -> None:
        await self.send_json({"type": "tool_result", "call_id": call_id, "result": result})

    async def hangup(self) -> None:
        if self._ws is not None and not self._closed:
            await self.send_json({"type": "hangup"})
        await self.close()
