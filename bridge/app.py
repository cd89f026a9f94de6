"""The running service, built and wired in one place.

:class:`Bridge` is what ``voxbridge serve`` runs and what the tests start in-process::

    async with Bridge(load_config(...)) as bridge:
        ...  # bridge.audiosocket_address, bridge.sessions, bridge.events

It builds the parts, hands each the narrow interfaces it needs, and starts and stops them in
order. The parts, each with one job:

=====================  ==========================================================================
``calls``              the call registry: live calls, capacity, calls waiting for their leg
                       (bridge/calls.py)
``asterisk``           telephony: AMI client, channel tracker, the allowlist-checked actions,
                       the fallback over AMI (bridge/telephony.py)
``dialer``             calls started through the API (bridge/telephony.py)
``hub``                events: one bus feeding the call history, webhooks and the live stream
                       (bridge/event_hub.py)
``tools``              the tool registry every call draws from (bridge/toolset.py)
``gateways``           the gateway adapter each call gets (bridge/gateway/factory.py)
``clock``              the playout clock, one tick for every call (bridge/playout.py)
AudioSocket server     the caller legs (bridge/server.py); each call is a
                       :class:`~bridge.session.CallSession` given :attr:`Bridge.call_services`
``ari``                the other way in (``ingress: ari``): Stasis calls, RTP legs
                       (bridge/ari_ingress.py)
``api``                the HTTP API (bridge/api.py), when enabled
``cluster``            with ``cluster.redis_url``: the shared registry, command routing and event
                       stream (bridge/cluster.py); None in a single process
``router``             where commands for calls of other nodes go (bridge/cluster.py)
=====================  ==========================================================================

With no ``gateway.url`` configured it starts the embedded reference gateway on a loopback
port and points every call at it: a demo that needs no API key and no network.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from tools.base import Tool

from .calls import CallRegistry
from .cluster import ClusterCallRegistry, ClusterNode, ClusterSettings, CommandRouter, LocalRouter
from .config import Config, ConfigError, is_loopback, parse_hostport
from .event_hub import EventHub
from .events import EventBus
from .gateway.base import Gateway
from .gateway.factory import DEMO_API_KEY, GatewayFactory
from .hooks import CallHooks
from .leg import CallerLeg
from .metrics import BridgeMetrics
from .playout import PlayoutClock
from .recording import Recordings
from .server import AudioSocketConnection, AudioSocketIngress, start_server
from .session import CallServices, CallSession
from .store import TERMINAL_STATES
from .supervise import Supervisor
from .telephony import Asterisk, OutboundDialer, TelephonyCall, parse_vars
from .toolset import build_tools, first_tool_listing, make_http_client, make_telephony

__all__ = ["DEMO_API_KEY", "Bridge", "build_tools", "make_telephony", "parse_vars"]

log = logging.getLogger("voxbridge")

#: How long start-up waits for the tool sources' first listing (each is up, or down and retrying).
TOOL_SOURCES_WAIT_S = 3.0


def _part_attribute(part: str, name: str) -> Any:
    """``Bridge.<name>`` reads ``bridge.<part>.<name>``: the façade's short names for what the
    parts own (the CLI, the API and the tests use them)."""
    return property(lambda self: getattr(getattr(self, part), name), doc=f"``{part}.{name}``")


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
        self.connections: set[AudioSocketConnection] = set()
        #: Counters and /metrics (bridge/metrics.py): its own registry, read from this bridge at scrape time.
        self.metrics = BridgeMetrics(self)
        self.events.add_sink(self.metrics.on_event)
        #: Set when a long-lived part crashed beyond repair: ``voxbridge serve`` then stops and exits 1.
        self.failed = asyncio.Event()
        self.supervisor = Supervisor(self._part_failed)
        #: A cluster's membership (bridge/cluster.py), or None: one process, no Redis imported.
        self.cluster: ClusterNode | None = None
        self.calls: CallRegistry[CallSession]
        if config.cluster.enabled:
            self.cluster = ClusterNode(config, self.events, self.supervisor)
            self.calls = ClusterCallRegistry(config.audiosocket.max_calls, self.cluster)
        else:
            self.calls = CallRegistry(config.audiosocket.max_calls)
        self.router: CommandRouter = self.cluster if self.cluster is not None else LocalRouter()
        self.hub = EventHub(config, self.supervisor, self.events, webhooks_from_bus=self.cluster is None,
                            node=self.cluster.node_id if self.cluster is not None else None)
        if self.cluster is not None:
            self.events.add_sink(self.cluster.offer)
        self.gateways = GatewayFactory(config, gateway_factory)
        self._server: asyncio.Server | None = None
        #: The ARI ingress (bridge/ari_ingress.py) when ``ingress`` names ari.
        self.ari: Any = None
        self._sim: Any = None
        # A bug the AMI loop survived (it logs the traceback and reconnects) still counts as a
        # crash of the "ami" part in /metrics.
        self.asterisk = Asterisk(config, self.calls.pending,
                                 on_fault=lambda exc: self.supervisor.crashes.update(["ami"]))
        self.dialer = OutboundDialer(config, self.asterisk, self.calls.pending, events=self.events,
                                     record_dialing=self._record_dialing, shared=self.cluster)
        self.http = make_http_client()
        try:
            self.tools = build_tools(config, tools, self.asterisk.telephony, self.http)
        except ValueError as exc:  # e.g. an http tool header names a missing environment variable
            raise ConfigError(str(exc)) from None
        try:  # the profiles' on_call_start / on_call_end hooks, sent through the webhook dispatcher
            self.hooks = CallHooks(config, lambda: self.hub.webhooks, self.events, self.supervisor)
        except ValueError as exc:  # e.g. a hook header names a missing environment variable
            raise ConfigError(str(exc)) from None
        #: The call recordings, when a profile records (bridge/recording.py).
        self.recordings: Recordings | None = None
        if any(p.record for p in config.profiles.values()):
            self.recordings = Recordings(config.recordings.path, int(config.recordings.max_total_mb * 1024 * 1024),
                                         config.store.retention_days)
        self.call_services = CallServices(
            config=config, clock=self.clock, events=self.events, tools=self.tools, gateways=self.gateways,
            settings=self.asterisk if self.cluster is None else ClusterSettings(self.cluster, self.asterisk),
            fallbacks=self.asterisk, registry=self.calls, supervisor=self.supervisor,
            metrics=self.metrics, hooks=self.hooks, recordings=self.recordings,
        )
        self.api: Any = None
        errors, warnings = config.problems(self.tools.names)
        if config.gateway.url and not config.gateway.api_key and gateway_factory is None:
            errors.append("gateway.api_key: required when gateway.url is set (or set VOXBRIDGE_GATEWAY_API_KEY)")
        if gateway_factory is None:
            errors += config.credential_problems()
        for w in warnings:
            log.warning("config: %s", w)
        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))

    # ------------------------------------------------------------------ the façade's names for the parts

    @property
    def tool_sources(self) -> list[Any]:
        """The MCP tool sources (tools/mcp.py), each with ``name`` and ``health()``."""
        return list(self.tools.sources)

    @property
    def sessions(self) -> dict[str, CallSession]:
        """The calls in progress, by UUID."""
        return self.calls.live

    pending = _part_attribute("calls", "pending")
    known_ended = _part_attribute("calls", "known_ended")
    ami = _part_attribute("asterisk", "ami")
    channels = _part_attribute("asterisk", "channels")
    telephony = _part_attribute("asterisk", "telephony")
    store = _part_attribute("hub", "store")
    webhooks = _part_attribute("hub", "webhooks")
    gateway_url = _part_attribute("gateways", "url")

    @property
    def _gateway_factory(self) -> Callable[[CallSession], Gateway] | None:
        return self.gateways.override

    @_gateway_factory.setter
    def _gateway_factory(self, factory: Callable[[CallSession], Gateway] | None) -> None:
        self.gateways.override = factory

    def _record_dialing(self, *args: Any) -> None:
        assert self.hub.store is not None  # the API (the only way to dial) starts after the store
        self.hub.store.record_dialing(*args)

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
        if self.gateways.url is None and self.gateways.override is None and cfg.uses_default_gateway:
            from .devtools.gateway_sim import GatewaySim

            self._sim = GatewaySim(accepted_keys={DEMO_API_KEY})
            await self._sim.start("127.0.0.1", 0)
            self.gateways.url, self.gateways.demo = self._sim.url, True
            # Loud either way: the demo answers callers with an echo, never with an AI. A config file
            # cannot get here by accident (bridge/config.py requires gateway.url or gateway.demo).
            log.warning("DEMO MODE: calls go to the embedded reference gateway at %s, an echo that never reaches "
                        "an AI (%s); set gateway.url for a real gateway", self.gateway_url,
                        "gateway.demo: true" if cfg.gateway.demo else "no gateway.url configured")
        if self.gateways.override is None:
            self.gateways.prepare()
        api_host, api_port = parse_hostport(cfg.api.listen, "api.listen")
        if cfg.api.enabled and not is_loopback(api_host) and cfg.api.token is None:
            raise ConfigError(f"api.listen {cfg.api.listen} is not a loopback address: set api.token "
                              "(VOXBRIDGE_API_TOKEN) or listen on 127.0.0.1")
        if self.cluster is not None:
            await self.cluster.connect()  # before the store: a wrong URL fails start-up, naming the key
        await self.hub.start()
        if self.cluster is not None:
            assert self.hub.webhooks is not None
            self.hub.webhooks.on_change = self.cluster.hooks_changed
            if cfg.store.postgres_url is not None:
                # Before taking calls: calls of a cluster that went down whole are still "active".
                await self.cluster.sweep(self.hub.store)
        if self.recordings is not None:
            await self.recordings.start()
        # AMI connects (and reconnects) in the background. The loop survives every failure of a
        # connection by itself; the supervisor catches a bug in the loop's own machinery.
        await self.asterisk.start(lambda run: self.supervisor.start("ami", run))
        # MCP tool sources connect, list and reconnect in the background, like AMI. The first calls
        # get their tools if they answer within TOOL_SOURCES_WAIT_S; one that is down stops nothing.
        for source in self.tools.sources:
            self.supervisor.start(f"tool_source.{source.name}", source.run)
        await first_tool_listing(self.tool_sources, TOOL_SOURCES_WAIT_S)
        if "audiosocket" in cfg.ingress:
            host, port = parse_hostport(cfg.audiosocket.listen, "audiosocket.listen")
            ingress = AudioSocketIngress(self.open_session, cfg.audiosocket.uuid_timeout, self.connections,
                                         self.metrics)
            self._server = await start_server(ingress, host, port, reuse_port=cfg.audiosocket.reuse_port)
            log.info("AudioSocket listening on %s:%d (max %d calls)", *self.audiosocket_address,
                     cfg.audiosocket.max_calls)
        if "ari" in cfg.ingress:
            from . import ari_ingress

            ari_ingress.check_rtp_host(cfg.ari.rtp.host)  # a wrong address fails start-up, not the first call
            if self.cluster is not None:
                log.warning("cluster with ingress ari: Asterisk gives one Stasis application's events to one "
                            "connection, so each node needs its own ari.app (now %r; e.g. VOXBRIDGE_ARI__APP="
                            "voxbridge-%s) and the dialplan spreads calls over them", cfg.ari.app,
                            self.cluster.node_id)
            self.ari = ari_ingress.build(cfg, open_call=self.open_session, refusal=self.calls.refusal,
                                         pending=self.calls.pending, resolved=self.asterisk.resolved,
                                         on_fault=lambda exc: self.supervisor.crashes.update(["ari"]))
            # Like AMI: connects and reconnects in the background; calls arrive once it is registered.
            self.supervisor.start("ari", self.ari.client.run)
            log.info("ARI: Stasis application %s at %s (RTP %s on %s, ports %s)", cfg.ari.app, cfg.ari.url,
                     cfg.ari.format, cfg.ari.rtp.host, cfg.ari.rtp.ports)
        if cfg.api.enabled:
            from .api import ApiServer

            self.api = ApiServer(self, api_host, api_port)
            await self.api.start()
        if self.cluster is not None:
            self.cluster.start(webhooks=self.hub.webhooks, executor=self.api.replay if self.api is not None else None,
                               live_view=self._live_views)

    @property
    def audiosocket_address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("AudioSocket is not listening (ingress: audiosocket is not configured)")
        addr = self._server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, end every call (the dialplan continues for each), then close."""
        if self._server is not None:
            self._server.close()
        if self.ari is not None:
            self.ari.closing = True  # a caller entering Stasis now goes straight back to the dialplan
        self.dialer.stop()
        sessions = list(self.sessions.values())
        if sessions:
            log.info("shutting down: ending %d call(s)", len(sessions))
        for s in sessions:
            s.end("shutdown")
        if sessions:
            _done, pending = await asyncio.wait([asyncio.ensure_future(s.ended.wait()) for s in sessions],
                                               timeout=grace)
            for p in pending:
                p.cancel()
        for conn in list(self.connections):
            conn.abort()
        ari, self.ari = self.ari, None
        if ari is not None:
            await ari.close()  # the calls' last ARI requests (continue, delete), then their sockets
        # The parts are taken off the bridge before they are awaited, so a second stop() running
        # meanwhile (a signal during shutdown) finds nothing left to close twice.
        server, sim, api = self._server, self._sim, self.api
        self._server = self._sim = self.api = None
        if server is not None:
            await server.wait_closed()
        if sim is not None:
            await sim.stop()
        await self.supervisor.stop()
        if self.cluster is not None:
            await self.cluster.close()  # after the calls: their last events reach the shared stream
        await self.asterisk.stop()
        if ari is not None:
            await ari.client.close()
        if api is not None:
            await api.stop()
        if self.recordings is not None:
            await self.recordings.close()  # after the calls: each one's file is completed
        await self.hooks.close()  # on_call_end deliveries still retrying: a short grace (before the hub's client)
        await self.hub.close()  # after the calls: their call.ended gets a chance to go out
        await self.http.aclose()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ calls

    def open_session(self, call_uuid: str, conn: CallerLeg) -> CallSession | None:
        """A caller's leg delivered its UUID. Returns None if the call is refused (and hangs the leg up)."""
        why = self.calls.refusal(call_uuid)
        if why is not None:
            # At capacity, refuse at once: the dialplan continues (to an overflow queue or a
            # human), rather than the caller waiting in silence for capacity that will not come.
            log.warning("[%s] refused: %s", call_uuid, why)
            if call_uuid not in self.calls.live:
                self.metrics.call_refused()
            conn.hangup()
            return None
        session = CallSession(self.call_services, call_uuid, conn)
        self.calls.add(session)
        self.metrics.call_accepted()
        session.start()
        return session

    # ------------------------------------------------------------------ API operations

    async def start_outbound_call(self, req: Any) -> str:
        """Dial ``req.destination`` over AMI (see :meth:`OutboundDialer.start_call`)."""
        return await self.dialer.start_call(req)

    async def hangup_call(self, session: TelephonyCall, reason: str) -> None:
        await self.asterisk.hangup_call(session, reason)

    def _live_info(self, session: CallSession) -> dict[str, Any]:
        info = session.info()
        info["tools"] = [{"tool": o.name, "outcome": o.outcome, "duration_ms": round(o.duration_ms, 1)}
                         for o in (session.router.outcomes if session.router else [])]
        info.setdefault("ended_at", None)
        return info

    def _live_views(self, call_ids: list[str]) -> dict[str, Any]:
        """This node's live views of those of ``call_ids`` it has (for another cluster node's API)."""
        return {cid: self._live_info(self.sessions[cid]) for cid in call_ids if cid in self.sessions}

    async def _remote_live(self, call_ids: list[str]) -> dict[str, Any]:
        """In a cluster: the live views the owning nodes give of the calls they have; {} for the
        calls whose owner does not answer in time (their history row stands in)."""
        if self.cluster is None or not call_ids:
            return {}
        try:
            return await self.cluster.live_views(call_ids)
        except Exception as exc:  # noqa: BLE001 - Redis unreachable: the shared history still answers
            log.warning("cluster: cannot ask the owning nodes for live calls (%s: %s)", type(exc).__name__, exc)
            return {}

    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        session = self.sessions.get(call_id)
        if session is not None:
            return self._live_info(session)
        remote = await self._remote_live([call_id])
        if call_id in remote:
            return cast(dict[str, Any], remote[call_id])
        call = await self.store.get_call(call_id)
        return None if call is None else (await self._with_recordings([call]))[0]

    async def _with_recordings(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Ended calls from the history, each with the link to its recording if it has one
        (looked up off the event loop: bridge/recording.py's ``which_have``)."""
        have = (await self.recordings.which_have([c["call_id"] for c in calls])
                if self.recordings is not None and calls else set())
        return [{**c, "recording": f"/v1/calls/{c['call_id']}/recording" if c["call_id"] in have else None}
                for c in calls]

    async def list_calls(self, state: str | None, limit: int, offset: int,
                         **filters: str | None) -> list[dict[str, Any]]:
        """The history, newest first; ``filters``: caller, profile, end_reason, since, until
        (bridge/store.py's ``list_calls``)."""
        calls = await self.store.list_calls(state, limit, offset, **filters)
        live = {c["call_id"]: s for c in calls if (s := self.sessions.get(c["call_id"])) is not None}
        # Another node's live call: its owner's live view (state, duration, tools), not the row.
        remote = await self._remote_live([c["call_id"] for c in calls if c["call_id"] not in live
                                          and c.get("state") not in TERMINAL_STATES])
        rows = iter(await self._with_recordings([c for c in calls if c["call_id"] not in live
                                                 and c["call_id"] not in remote]))
        return [self._live_info(live[c["call_id"]]) if c["call_id"] in live
                else remote[c["call_id"]] if c["call_id"] in remote
                else next(rows) for c in calls]

    def metrics_text(self) -> str:
        """Prometheus text exposition of this bridge's metrics (bridge/metrics.py)."""
        return self.metrics.text()
