"""The running service: AudioSocket server, sessions, clock, tools, events (and AMI, API).

:class:`Bridge` is what ``voxbridge serve`` runs and what the tests start in-process::

    async with Bridge(load_config(...)) as bridge:
        ...  # bridge.audiosocket_address, bridge.sessions, bridge.events

With no ``gateway.url`` configured it starts the embedded reference gateway on a loopback
port and points every call at it: a demo that needs no API key and no network.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable

from tools.ami import AMI_TOOLS, Telephony
from tools.base import Tool, ToolRegistry
from tools.builtin import BUILTINS

from .ami import AmiClient, AmiError
from .channels import ChannelTracker
from .config import Config, ConfigError, Fallback, parse_hostport
from .events import EventBus
from .gateway.aillomvox import AillomVoxGateway
from .gateway.base import Gateway
from .playout import PlayoutClock
from .server import AudioSocketConnection, start_server
from .session import CallSession, CallSettings

log = logging.getLogger("voxbridge")

#: The key the embedded reference gateway accepts (it is loopback-only and for demos).
DEMO_API_KEY = "demo"


def make_telephony(config: Config, ami: AmiClient | None = None) -> Telephony:
    o = config.originate
    return Telephony(ami, transfer_allow=config.allow.transfer, originate_allow=config.allow.originate,
                     originate_channel=o.channel, originate_context=o.context, originate_exten=o.exten,
                     ring_timeout=o.ring_timeout, caller_id=o.caller_id)


def build_tools(config: Config, extra: list[Tool] | None = None, telephony: Telephony | None = None) -> ToolRegistry:
    """The registry every call draws from: built-ins, telephony tools, configured tools, ``extra``."""
    registry = ToolRegistry()
    for cls in BUILTINS.values():
        registry.register(cls())
    telephony = telephony or make_telephony(config)
    for ami_cls in AMI_TOOLS:
        registry.register(ami_cls(telephony))
    for tool in extra or []:
        registry.register(tool)
    return registry


class Bridge:
    def __init__(
        self,
        config: Config,
        *,
        tools: list[Tool] | None = None,
        gateway_factory: Callable[[CallSession], Gateway] | None = None,
        clock: PlayoutClock | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or PlayoutClock()
        self.events = EventBus()
        self.sessions: dict[str, CallSession] = {}
        self.connections: set[AudioSocketConnection] = set()
        self.metrics: collections.Counter[str] = collections.Counter()
        self._gateway_factory = gateway_factory
        self._server: asyncio.Server | None = None
        self._sim: Any = None
        self.gateway_url: str | None = config.gateway.url
        self.ami: AmiClient | None = None
        self.channels = ChannelTracker()
        if config.ami.enabled:
            a = config.ami
            self.ami = AmiClient(a.host, a.port, a.username, a.secret.get_secret_value() if a.secret else "",
                                 action_timeout=a.action_timeout, ping_interval=a.ping_interval)
            self.channels.attach(self.ami)
        self.telephony = make_telephony(config, self.ami)
        self.tools = build_tools(config, tools, self.telephony)
        errors, warnings = config.problems(self.tools.names)
        if config.gateway.url and not config.gateway.api_key and gateway_factory is None:
            errors.append("gateway.api_key: required when gateway.url is set (or set VOXBRIDGE_GATEWAY_API_KEY)")
        for w in warnings:
            log.warning("config: %s", w)
        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        cfg = self.config
        if self.gateway_url is None and self._gateway_factory is None:
            from .gateway.sim import GatewaySim

            self._sim = GatewaySim(accepted_keys={DEMO_API_KEY})
            await self._sim.start("127.0.0.1", 0)
            self.gateway_url = self._sim.url
            log.warning("no gateway.url configured: using the embedded reference gateway at %s (demo mode)",
                        self.gateway_url)
        if self.ami is not None:
            await self.ami.start()  # connects (and reconnects) in the background
        host, port = parse_hostport(cfg.audiosocket.listen, "audiosocket.listen")
        self._server = await start_server(self, host, port, reuse_port=cfg.audiosocket.reuse_port)
        log.info("AudioSocket listening on %s:%d (max %d calls)", *self.audiosocket_address, cfg.audiosocket.max_calls)

    @property
    def audiosocket_address(self) -> tuple[str, int]:
        assert self._server is not None
        addr = self._server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, end every call (the dialplan continues for each), then close."""
        if self._server is not None:
            self._server.close()
        sessions = list(self.sessions.values())
        if sessions:
            log.info("shutting down: ending %d call(s)", len(sessions))
        for s in sessions:
            s.end("shutdown")
        if sessions:
            done, pending = await asyncio.wait([asyncio.ensure_future(s.ended.wait()) for s in sessions],
                                               timeout=grace)
            for p in pending:
                p.cancel()
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._sim is not None:
            await self._sim.stop()
            self._sim = None
        if self.ami is not None:
            await self.ami.stop()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ calls

    def open_session(self, call_uuid: str, conn: AudioSocketConnection) -> CallSession | None:
        """A connection delivered its UUID. Returns None if the call is refused (and closes it)."""
        cfg = self.config.audiosocket
        if call_uuid in self.sessions:
            log.warning("[%s] refused: a call with this UUID is already in progress", call_uuid)
            conn.hangup()
            return None
        if len(self.sessions) >= cfg.max_calls:
            # Refuse at once: the dialplan continues (to an overflow queue or a human), rather
            # than the caller waiting in silence for capacity that will not come.
            log.warning("[%s] refused: at capacity (%d calls)", call_uuid, cfg.max_calls)
            self.metrics["calls_refused"] += 1
            conn.hangup()
            return None
        session = CallSession(self, call_uuid, conn)
        self.sessions[call_uuid] = session
        self.metrics["calls_total"] += 1
        session.start()
        return session

    def session_ended(self, session: CallSession) -> None:
        self.sessions.pop(session.call_id, None)

    async def resolve_settings(self, session: CallSession) -> CallSettings:
        """Per-call settings: API request, then dialplan (AMI channel variables), then defaults."""
        settings = CallSettings()
        if self.ami is None:
            return settings
        cfg = self.config
        channel = await self.channels.wait_for(session.call_id, cfg.ami.channel_wait)
        if channel is None:
            if cfg.audiosocket.unknown_uuid == "refuse":
                settings.refuse = "no Asterisk channel claims this UUID (audiosocket.unknown_uuid: refuse)"
            else:
                session.log.warning("no Asterisk channel claims this UUID within %.1f s: tools that need the "
                                    "channel (transfer, hangup, DTMF) will not work for this call",
                                    cfg.ami.channel_wait)
            return settings
        settings.channel = channel
        values = dict(channel.variables)
        for name in ("AS_PROFILE", "AS_VARS"):
            if name not in values:  # not in manager.conf channelvars: ask
                try:
                    resp = await self.ami.action("Getvar", Channel=channel.name, Variable=name, timeout=2)
                    values[name] = resp.get("Value") or ""
                except AmiError as exc:
                    session.log.warning("cannot read %s: %s", name, exc)
        if values.get("AS_PROFILE"):
            settings.profile = values["AS_PROFILE"]
        settings.variables.update(parse_vars(values.get("AS_VARS", "")))
        return settings

    def make_gateway(self, session: CallSession) -> Gateway:
        if self._gateway_factory is not None:
            return self._gateway_factory(session)
        g = self.config.gateway
        assert self.gateway_url is not None
        key = g.api_key.get_secret_value() if g.api_key else DEMO_API_KEY
        return AillomVoxGateway(
            self.gateway_url, key, api_key_in_query=g.api_key_in_query, connect_timeout=g.connect_timeout,
            settle_ms=g.settle_ms if self._sim is None else 0, settle_buffer_ms=g.settle_buffer_ms,
            call_id=session.call_id,
        )

    async def apply_fallback(self, session: CallSession, fallback: Fallback) -> None:
        """Telephony side of a fallback. Returning to the dialplan needs nothing but the 0x00 that
        ends every session; the rest needs AMI and the channel."""
        channel = session.channel
        if self.ami is None or channel is None:
            if fallback.action != "dialplan":
                session.log.warning("fallback %r needs AMI and a known channel: returning to the dialplan",
                                    fallback.action)
            return
        try:
            if fallback.action == "dialplan":
                await self.ami.action("Setvar", Channel=channel.name, Variable="VOXBRIDGE_RESULT", Value="fallback")
            elif fallback.action == "hangup":
                session.note_handoff("fallback:hangup")
                await self.ami.action("Hangup", Channel=channel.name, Cause=16)
            elif fallback.action == "transfer":
                session.note_handoff(f"fallback:transferred:{fallback.context},{fallback.exten}")
                await self.ami.action("Redirect", Channel=channel.name, Context=fallback.context,
                                      Exten=fallback.exten, Priority=1)
        except AmiError as exc:
            session.note_handoff(None)
            session.log.error("fallback %s failed: %s (returning to the dialplan)", fallback.action, exc)


def parse_vars(text: str) -> dict[str, str]:
    """``AS_VARS`` from the dialplan: ``name=value&other=value`` (URL-encoded) → prompt variables."""
    from urllib.parse import parse_qsl

    return {k: v for k, v in parse_qsl(text, keep_blank_values=True) if k.isidentifier()}
