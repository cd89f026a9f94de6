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
import re
import uuid
from typing import Any, Callable
from urllib.parse import urlencode

import httpx

from tools.ami import AMI_TOOLS, NotAllowed, Telephony
from tools.base import Tool, ToolError, ToolRegistry
from tools.builtin import BUILTINS
from tools.http import build_http_tools, make_client

from .ami import AmiClient, AmiError
from .channels import ChannelTracker
from .config import Config, ConfigError, Fallback, is_loopback, parse_hostport
from .egress import EgressPolicy
from .events import EventBus
from .gateway.aillomvox import AillomVoxGateway
from .gateway.base import Gateway
from .playout import PlayoutClock
from .server import AudioSocketConnection, start_server
from .session import CallSession, CallSettings
from .store import CallStore
from .supervise import Supervisor
from .webhooks import WebhookDispatcher

log = logging.getLogger("voxbridge")

#: The key the embedded reference gateway accepts (it is loopback-only and for demos).
DEMO_API_KEY = "demo"


def make_telephony(config: Config, ami: AmiClient | None = None) -> Telephony:
    o = config.originate
    return Telephony(ami, transfer_allow=config.allow.transfer, originate_allow=config.allow.originate,
                     originate_channel=o.channel, originate_context=o.context, originate_exten=o.exten,
                     ring_timeout=o.ring_timeout, caller_id=o.caller_id)


def build_tools(config: Config, extra: list[Tool] | None = None, telephony: Telephony | None = None,
                http_client: Any = None) -> ToolRegistry:
    """The registry every call draws from: built-ins, telephony tools, configured tools, ``extra``."""
    registry = ToolRegistry()
    for cls in BUILTINS.values():
        registry.register(cls())
    telephony = telephony or make_telephony(config)
    for ami_cls in AMI_TOOLS:
        registry.register(ami_cls(telephony))
    for tool in build_http_tools(config.tools, http_client):
        registry.register(tool)
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
        #: Set when a long-lived part crashed beyond repair: ``voxbridge serve`` then stops and exits 1.
        self.failed = asyncio.Event()
        self.supervisor = Supervisor(self._part_failed)
        self._gateway_factory = gateway_factory
        self._server: asyncio.Server | None = None
        self._sim: Any = None
        self.gateway_url: str | None = config.gateway.url
        self.ami: AmiClient | None = None
        self.channels = ChannelTracker()
        if config.ami.enabled:
            a = config.ami
            # A bug the AMI loop survived (it logs the traceback and reconnects) still counts as a
            # crash of the "ami" part in /metrics.
            self.ami = AmiClient(a.host, a.port, a.username, a.secret.get_secret_value() if a.secret else "",
                                 action_timeout=a.action_timeout, ping_interval=a.ping_interval,
                                 on_fault=lambda exc: self.supervisor.crashes.update(["ami"]))
            self.channels.attach(self.ami)
        self.telephony = make_telephony(config, self.ami)
        self.http = make_client()
        try:
            self.tools = build_tools(config, tools, self.telephony, self.http)
        except ValueError as exc:  # e.g. an http tool header names a missing environment variable
            raise ConfigError(str(exc)) from None
        self._call_rules = [re.compile(p) for p in config.allow.calls]
        #: Calls started through the API, waiting for their AudioSocket connection (by UUID).
        self.pending: dict[str, CallSettings] = {}
        self.known_ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._background: set[asyncio.Task[Any]] = set()
        self.store: CallStore | None = None
        self.webhooks: WebhookDispatcher | None = None
        self._webhook_http: httpx.AsyncClient | None = None
        self.api: Any = None
        errors, warnings = config.problems(self.tools.names)
        if config.gateway.url and not config.gateway.api_key and gateway_factory is None:
            errors.append("gateway.api_key: required when gateway.url is set (or set VOXBRIDGE_GATEWAY_API_KEY)")
        for w in warnings:
            log.warning("config: %s", w)
        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))

    # ------------------------------------------------------------------ life cycle

    def _part_failed(self, name: str, exc: BaseException) -> None:
        log.critical("%s is broken (%r): the bridge must be restarted", name, exc)
        self.failed.set()

    async def start(self) -> None:
        """Start every part; if one fails, stop those already started and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        cfg = self.config
        if self.gateway_url is None and self._gateway_factory is None:
            from .gateway.sim import GatewaySim

            self._sim = GatewaySim(accepted_keys={DEMO_API_KEY})
            await self._sim.start("127.0.0.1", 0)
            self.gateway_url = self._sim.url
            # Loud either way: the demo answers callers with an echo, never with an AI. A config file
            # cannot get here by accident (bridge/config.py requires gateway.url or gateway.demo).
            log.warning("DEMO MODE: calls go to the embedded reference gateway at %s, an echo that never reaches "
                        "an AI (%s); set gateway.url for a real gateway", self.gateway_url,
                        "gateway.demo: true" if cfg.gateway.demo else "no gateway.url configured")
        api_host, api_port = parse_hostport(cfg.api.listen, "api.listen")
        if cfg.api.enabled and not is_loopback(api_host) and cfg.api.token is None:
            raise ConfigError(f"api.listen {cfg.api.listen} is not a loopback address: set api.token "
                              "(VOXBRIDGE_API_TOKEN) or listen on 127.0.0.1")
        self.store = CallStore(cfg.store.path, cfg.store.redact_args, retention_days=cfg.store.retention_days,
                               supervisor=self.supervisor)
        await self.store.start()
        self.events.add_sink(self.store.record)
        # Webhooks get their own client: the tools' client carries tool-specific defaults.
        self._webhook_http = httpx.AsyncClient(follow_redirects=False, timeout=10.0)
        # 6 attempts, waits of 2+4+8+16+30 s: a subscriber down for about a minute misses nothing.
        self.webhooks = WebhookDispatcher(self.store, self._webhook_http, max_attempts=6, backoff_base=2.0,
                                          policy=EgressPolicy(cfg.allow.webhooks), max_webhooks=cfg.api.max_webhooks,
                                          supervisor=self.supervisor)
        await self.webhooks.start()
        self.events.add_sink(self.webhooks.offer)
        if self.ami is not None:
            # Connects (and reconnects) in the background. The loop survives every failure of a
            # connection by itself; the supervisor catches a bug in the loop's own machinery.
            await self.ami.start(lambda run: self.supervisor.start("ami", run))
        host, port = parse_hostport(cfg.audiosocket.listen, "audiosocket.listen")
        self._server = await start_server(self, host, port, reuse_port=cfg.audiosocket.reuse_port)
        log.info("AudioSocket listening on %s:%d (max %d calls)", *self.audiosocket_address, cfg.audiosocket.max_calls)
        if cfg.api.enabled:
            from .api import ApiServer

            self.api = ApiServer(self, api_host, api_port)
            await self.api.start()

    @property
    def audiosocket_address(self) -> tuple[str, int]:
        assert self._server is not None
        addr = self._server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, end every call (the dialplan continues for each), then close."""
        if self._server is not None:
            self._server.close()
        for task in list(self._background):
            task.cancel()
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
        await self.supervisor.stop()
        if self.ami is not None:
            await self.ami.stop()
        if self.api is not None:
            await self.api.stop()
            self.api = None
        if self.webhooks is not None:
            await self.webhooks.close()  # after the calls: their call.ended gets a chance to go out
            self.webhooks = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self._webhook_http is not None:
            await self._webhook_http.aclose()
            self._webhook_http = None
        await self.http.aclose()

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
        self.known_ended[session.call_id] = None
        while len(self.known_ended) > 10000:
            self.known_ended.popitem(last=False)

    async def resolve_settings(self, session: CallSession) -> CallSettings:
        """Per-call settings: API request, then dialplan (AMI channel variables), then defaults."""
        api_request = self.pending.pop(session.call_id, None)
        settings = api_request or CallSettings()
        if self.ami is None:
            return settings
        cfg = self.config
        channel = await self.channels.wait_for(session.call_id, cfg.ami.channel_wait)
        if channel is None:
            if cfg.audiosocket.unknown_uuid == "refuse" and api_request is None:
                settings.refuse = "no Asterisk channel claims this UUID (audiosocket.unknown_uuid: refuse)"
            else:
                session.log.warning("no Asterisk channel claims this UUID within %.1f s: tools that need the "
                                    "channel (transfer, hangup, DTMF) will not work for this call",
                                    cfg.ami.channel_wait)
            return settings
        settings.channel = channel
        if api_request is not None:
            return settings  # the API request's profile and variables win over the dialplan's
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
            keepalive_interval=g.keepalive_interval, keepalive_timeout=g.keepalive_timeout,
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
                with self.telephony.handoff(session, "fallback:hangup"):
                    await self.telephony.hangup(session)
            elif fallback.action == "transfer":
                with self.telephony.handoff(session, f"fallback:transferred:{fallback.context},{fallback.exten}"):
                    await self.telephony.redirect(session, fallback.context, fallback.exten)
        except (AmiError, ToolError) as exc:
            session.log.error("fallback %s failed: %s (returning to the dialplan)", fallback.action, exc)


    # ------------------------------------------------------------------ API operations

    async def start_outbound_call(self, req: Any) -> str:
        """Dial ``req.destination`` over AMI; the answered callee reaches the AI with this call's UUID.

        Raises NotAllowed (destination not in allow.calls), LookupError (unknown profile),
        ToolError (no AMI). Returns at once; the outcome arrives as events.
        """
        cfg = self.config
        self.telephony.check_originate("api", req.destination, rules=self._call_rules)
        if req.profile is not None and req.profile not in cfg.profiles:
            raise LookupError(f"no profile {req.profile!r} (profiles: {', '.join(cfg.profiles)})")
        if self.ami is None:
            raise ToolError("starting calls needs AMI (ami.enabled: true)")
        if not self.ami.connected.is_set():
            raise ToolError(f"Asterisk is not connected ({self.ami.last_error or 'connecting'})")
        call_id = str(uuid.uuid4())
        overrides = {k: getattr(req, k) for k in ("prompt", "first_message", "voice", "language")
                     if getattr(req, k) is not None}
        profile = req.profile or cfg.default_profile
        self.pending[call_id] = CallSettings(profile=profile, variables=dict(req.variables),
                                             metadata=dict(req.metadata), overrides=overrides, direction="outbound")
        self.store.record_dialing(call_id, "outbound", profile, req.destination, dict(req.metadata))
        task = asyncio.create_task(self._dial(call_id, req, profile), name=f"dial-{call_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.info("[%s] API call to %s (profile %s)", call_id, req.destination, profile)
        return call_id

    async def _dial(self, call_id: str, req: Any, profile: str) -> None:
        o = self.config.outbound
        variables = {"AS_UUID": call_id, "AS_PROFILE": profile, "AS_VARS": urlencode(req.variables)}
        try:
            outcome = await self.telephony.originate(
                req.destination, channel_template=o.channel, context=o.context, exten=o.exten,
                variables=variables, timeout=o.ring_timeout, caller_id=req.caller_id or o.caller_id)
            message = outcome
        except ToolError as exc:
            outcome, message = "failed", str(exc)
        if outcome == "answered":
            # Answered: the AudioSocket connection should follow. If it does not, say so.
            await asyncio.sleep(o.answer_timeout)
            outcome, message = "no-audiosocket", f"answered, but no AudioSocket connection within {o.answer_timeout:g} s"
        if self.pending.pop(call_id, None) is not None:
            log.warning("[%s] API call to %s failed: %s", call_id, req.destination, message)
            self.events.publish("call.failed", call_id, reason=outcome.replace(" ", "-"), message=message,
                                destination=req.destination, metadata=dict(req.metadata), direction="outbound")

    async def hangup_call(self, session: CallSession, reason: str) -> None:
        if self.ami is not None and session.channel is not None and self.ami.connected.is_set():
            try:
                with self.telephony.handoff(session, reason):
                    await self.telephony.hangup(session)
                return
            except ToolError as exc:
                session.log.warning("AMI hangup failed (%s): ending the AudioSocket session instead", exc)
        session.end(reason)

    def _live_info(self, session: CallSession) -> dict[str, Any]:
        info = session.info()
        info["tools"] = [{"tool": o.name, "outcome": o.outcome, "duration_ms": round(o.duration_ms, 1)}
                         for o in (session.router.outcomes if session.router else [])]
        info.setdefault("ended_at", None)
        return info

    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        session = self.sessions.get(call_id)
        if session is not None:
            return self._live_info(session)
        return await self.store.get_call(call_id)

    async def list_calls(self, state: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        calls = await self.store.list_calls(state, limit, offset)
        return [self._live_info(self.sessions[c["call_id"]]) if c["call_id"] in self.sessions else c
                for c in calls]

    def metrics_text(self) -> str:
        """Prometheus text exposition (hand-written: a handful of series, no extra dependency)."""
        m = self.metrics
        clock = self.clock.stats()
        lines = [
            "# HELP voxbridge_calls_active Calls in progress.", "# TYPE voxbridge_calls_active gauge",
            f"voxbridge_calls_active {len(self.sessions)}",
            "# HELP voxbridge_calls_total Calls accepted since start.", "# TYPE voxbridge_calls_total counter",
            f"voxbridge_calls_total {m['calls_total']}",
            "# HELP voxbridge_calls_refused_total Calls refused (capacity, unknown UUID).",
            "# TYPE voxbridge_calls_refused_total counter", f"voxbridge_calls_refused_total {m['calls_refused']}",
            "# HELP voxbridge_protocol_errors_total AudioSocket connections closed for malformed input.",
            "# TYPE voxbridge_protocol_errors_total counter", f"voxbridge_protocol_errors_total {m['protocol_errors']}",
            "# HELP voxbridge_playout_late_ticks_total Playout ticks that fired a whole period late.",
            "# TYPE voxbridge_playout_late_ticks_total counter", f"voxbridge_playout_late_ticks_total {clock['late_ticks']}",
            "# HELP voxbridge_playout_max_lateness_seconds Worst playout tick lateness since start.",
            "# TYPE voxbridge_playout_max_lateness_seconds gauge",
            f"voxbridge_playout_max_lateness_seconds {clock['max_lateness_ms'] / 1000:.6f}",
            "# HELP voxbridge_ami_connected 1 if the AMI connection is up.", "# TYPE voxbridge_ami_connected gauge",
            f"voxbridge_ami_connected {int(bool(self.ami and self.ami.connected.is_set()))}",
        ]
        store = self.store
        lines += [
            "# HELP voxbridge_store_errors_total Call-history writes that failed (each is logged).",
            "# TYPE voxbridge_store_errors_total counter", f"voxbridge_store_errors_total {store.errors if store else 0}",
            "# HELP voxbridge_store_dropped_total Call-history events dropped (write queue full or closed).",
            "# TYPE voxbridge_store_dropped_total counter", f"voxbridge_store_dropped_total {store.dropped if store else 0}",
            "# HELP voxbridge_part_crashes_total Unexpected exceptions in long-lived parts (each logged with its traceback).",
            "# TYPE voxbridge_part_crashes_total counter",
        ]
        for part, n in sorted(self.supervisor.crashes.items()):
            lines.append(f'voxbridge_part_crashes_total{{part="{part}"}} {n}')
        wh = self.webhooks.totals if self.webhooks is not None else {}
        lines += [
            "# HELP voxbridge_webhook_deliveries_total Webhook events delivered (answered 2xx).",
            "# TYPE voxbridge_webhook_deliveries_total counter",
            f"voxbridge_webhook_deliveries_total {wh.get('delivered', 0)}",
            "# HELP voxbridge_webhook_failures_total Webhook events given up on (every attempt failed, or refused).",
            "# TYPE voxbridge_webhook_failures_total counter", f"voxbridge_webhook_failures_total {wh.get('failed', 0)}",
            "# HELP voxbridge_webhook_refused_total Webhook deliveries refused by allow.webhooks or the address checks.",
            "# TYPE voxbridge_webhook_refused_total counter", f"voxbridge_webhook_refused_total {wh.get('refused', 0)}",
            "# HELP voxbridge_webhook_events_dropped_total Webhook events dropped (a subscriber's queue full, "
            "or queued for one that answered 410 Gone).",
            "# TYPE voxbridge_webhook_events_dropped_total counter",
            f"voxbridge_webhook_events_dropped_total {wh.get('dropped', 0)}",
        ]
        lines += ["# HELP voxbridge_tool_calls_total Tool calls answered, by outcome.",
                  "# TYPE voxbridge_tool_calls_total counter"]
        for outcome, n in sorted((k[len("tool_"):], v) for k, v in m.items() if k.startswith("tool_")):
            lines.append(f'voxbridge_tool_calls_total{{outcome="{outcome}"}} {n}')
        return "\n".join(lines) + "\n"


def parse_vars(text: str) -> dict[str, str]:
    """``AS_VARS`` from the dialplan: ``name=value&other=value`` (URL-encoded) → prompt variables."""
    from urllib.parse import parse_qsl

    return {k: v for k, v in parse_qsl(text, keep_blank_values=True) if k.isidentifier()}
