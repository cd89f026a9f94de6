"""The second way in: calls sent to ``Stasis(voxbridge[,profile[,vars]])``, their audio over RTP.

For each caller channel that enters the application (StasisStart), the ingress:

1. reads what the dialplan gave the call: the Stasis arguments (profile, then ``AS_VARS``-style
   URL-encoded variables), else the channel variables ``AS_PROFILE``/``AS_VARS``; ``AS_UUID``
   names the call when set (calls started through the API), else the channel's id does.
   With ``channelvars = AS_UUID,AS_PROFILE,AS_VARS`` in ari.conf these come inside the event and
   no request is needed;
2. refuses it at once if the bridge is full (``continue``: the dialplan goes on, to an overflow
   route), exactly as an AudioSocket call is refused;
3. answers it, opens an RTP leg (bridge/rtp_leg.py) on a port of ``ari.rtp.ports``, and asks
   Asterisk for an External Media channel sending to that port; the channel's
   ``UNICASTRTP_LOCAL_ADDRESS``/``PORT`` is the only source the leg accepts packets from;
4. starts the call's session on that leg (the same :class:`~bridge.session.CallSession` as
   AudioSocket's: tools, events, API, history and the n8n node cannot tell the difference), and
   only then puts the caller and the External Media channel into one mixing bridge, so no audio
   flows before there is a session to hear it.

Everything the session does to its call goes back through ARI: the leg's ``hangup()`` (the
normal end) sends the caller ``continue`` — the dialplan carries on after ``Stasis()``, as it
does after ``AudioSocket()`` —, ``abort()`` hangs the channel up, and the call's
:class:`AriCall` is the ``ChannelInfo.driver`` through which transfer (``continue`` to an
allowlisted context/extension), hangup, DTMF and channel variables go (tools/ami.py checks the
allowlists first). The caller's DTMF (ChannelDtmfReceived) feeds the DTMF shortcuts. AMI is not
used at all.

The event stream can drop (Asterisk restarts); bridge/ari.py reconnects, and :meth:`resync`
then ends the calls whose channels are gone. Nothing is redone for a call already running: a
call is set up once, from its one StasisStart, and torn down once (:meth:`AriCall.release`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from tools.base import ChannelInfo, ToolError

from .ari import AriClient, AriError
from .calls import CallSettings
from .config import Config, ConfigError
from .leg import CallerLeg, LegListener
from .rtp_leg import RtpLeg, RtpPortPool, RtpPortsExhausted
from .telephony import parse_vars

log = logging.getLogger("voxbridge.ari")

#: The channel variables the dialplan gives a call (read over REST when ari.conf's channelvars lacks them).
CALL_VARIABLES = ("AS_UUID", "AS_PROFILE", "AS_VARS")
#: How long shutdown waits for the calls' last ARI requests (continue, delete).
RELEASE_GRACE_S = 3.0
#: How long a channel entering the application again waits for its previous call to finish ending.
PREVIOUS_CALL_WAIT_S = 5.0
#: How long set-up waits for the External Media channel to enter the application before bridging
#: it (Asterisk answers POST /channels/externalMedia before the channel's StasisStart, and a
#: bridge refuses a channel not yet in Stasis: "422 Channel not in Stasis application").
MEDIA_STASIS_WAIT_S = 5.0


class Session(LegListener, Protocol):
    call_id: str
    #: Set once the call's teardown is done.
    ended: asyncio.Event


class AriIngress:
    """Calls arriving through one Stasis application (see the module docstring)."""

    def __init__(self, config: Config, client: AriClient, ports: RtpPortPool, *,
                 open_call: Callable[[str, CallerLeg], Session | None],
                 refusal: Callable[[str], str | None],
                 pending: dict[str, CallSettings], resolved: dict[str, CallSettings]) -> None:
        self.config = config
        self.client = client
        self.ports = ports
        self._open_call = open_call
        self._refusal = refusal
        self._pending = pending
        self._resolved = resolved
        #: Calls by their caller channel's id, from StasisStart until released.
        self.calls: dict[str, AriCall] = {}
        #: External Media channel id → its call (their StasisStart and StasisEnd are ours, not calls).
        self._media: dict[str, AriCall] = {}
        #: Every call not yet released (``calls`` forgets one at its StasisEnd; this at release).
        self._unreleased: set[AriCall] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.setup_failures = 0
        #: Set at shutdown: a caller entering the application now is sent straight back to the dialplan.
        self.closing = False
        client.add_listener(self.on_event)
        client.on_connect(self.resync)

    # ------------------------------------------------------------------ events

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        channel = event.get("channel")
        if not isinstance(channel, dict) or not isinstance(channel.get("id"), str):
            return
        cid = channel["id"]
        if kind == "StasisStart":
            if (owner := self._media.get(cid)) is not None:
                owner.media_in_stasis.set()  # our own External Media channel: bridgeable now
                return
            if cid in self.calls:
                return  # a call already running: never set up twice
            if self.closing:
                self._spawn(self._turn_away(cid), f"ari-turn-away-{cid}")
                return
            call = AriCall(self, channel, event.get("args") or [])
            self.calls[cid] = call
            self._unreleased.add(call)
            self._spawn(call.setup(), f"ari-setup-{cid}")
        elif kind in ("StasisEnd", "ChannelDestroyed"):
            # Forgotten at once: the same channel may enter the application again (a transfer to an
            # extension that runs Stasis() with another profile) while this call is still being torn down.
            if (caller := self.calls.pop(cid, None)) is not None:
                caller.caller_left("caller-hangup")
            elif (owner := self._media.get(cid)) is not None:
                owner.media_left()
        elif kind == "ChannelDtmfReceived":
            known = self.calls.get(cid)
            digit = event.get("digit")
            if known is not None and known.session is not None and isinstance(digit, str) and len(digit) == 1:
                known.session.on_dtmf(digit)

    async def resync(self) -> None:
        """After a (re)connection: end the calls whose channels did not survive the gap."""
        if not self.calls:
            return
        channels = await self.client.request("GET", "/channels")
        alive = {c.get("id") for c in channels or [] if isinstance(c, dict)}
        for call in list(self.calls.values()):
            if call.channel_id not in alive:
                call.caller_left("connection-lost: the channel was gone when ARI reconnected")
            elif call.media_id is not None and call.media_id not in alive and call.session is not None:
                call.media_left()
        log.info("ARI resync: %d call(s) still up", len(self.calls))

    async def _turn_away(self, channel_id: str) -> None:
        try:
            await self.client.request("POST", f"/channels/{channel_id}/continue")
        except AriError as exc:
            log.warning("shutting down: could not send channel %s back to the dialplan: %s", channel_id, exc)

    # ------------------------------------------------------------------ bookkeeping

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("ARI task %s failed: %r", task.get_name(), exc, exc_info=exc)

    async def close(self) -> None:
        """Shutdown (after every session ended): release the calls still being set up, let the
        calls' last requests (continue, delete) finish within a grace, then drop what is left."""
        self.closing = True
        for call in list(self._unreleased):
            if not call.released:
                self._spawn(call.release("hangup"), f"ari-release-{call.channel_id}")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=RELEASE_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        for call in list(self._unreleased):
            if call.leg is not None:
                call.leg.abort()
        self._unreleased.clear()
        self.calls.clear()
        self._media.clear()


class AriCall:
    """One call that came in over ARI, and its channel's :class:`~tools.base.ChannelDriver`."""

    via = "ARI"

    def __init__(self, ingress: AriIngress, channel: dict[str, Any], args: list[Any]) -> None:
        self.ingress = ingress
        self.channel = channel
        self.channel_id: str = channel["id"]
        self.args = [str(a) for a in args]
        self.call_id = self.channel_id
        self.media_id: str | None = None
        #: Set by the External Media channel's StasisStart: it may be bridged from then on.
        self.media_in_stasis = asyncio.Event()
        self.bridge_id: str | None = None
        self.leg: RtpLeg | None = None
        self.session: Session | None = None
        #: The caller's channel left the application (hung up, or went where we sent it).
        self.gone = False
        #: We sent the channel somewhere ourselves (continue, hangup): do not send it again.
        self.handed_off = False
        self.released = False
        self.log = logging.LoggerAdapter(log, {})

    @property
    def _client(self) -> AriClient:
        return self.ingress.client

    # ------------------------------------------------------------------ set-up

    async def setup(self) -> None:
        """Set the call up; whatever fails (Asterisk's answer, no free port, a malformed event, a
        bug), the caller goes back to the dialplan and nothing it was given is left behind."""
        try:
            await self._setup()
        except asyncio.CancelledError:
            await asyncio.shield(self._undo())
            raise
        except Exception as exc:  # any failure: the caller is not left in Stasis in silence
            self.ingress.setup_failures += 1
            expected = isinstance(exc, AriError | OSError | RtpPortsExhausted | ValueError)
            log.error("[%s] ARI call set-up failed: %s", self.call_id, exc if expected else repr(exc),
                      exc_info=None if expected else exc)
            if self.session is not None:
                self.session.on_caller_gone(f"ari-setup-failed: {exc}")
            else:
                await self.release("hangup")
                await self._undo()

    def _abandoned(self) -> bool:
        """After an await of the set-up: was the call released, or did its caller leave meanwhile?"""
        return self.released or self.gone or self.ingress.closing

    async def _setup(self) -> None:
        ingress, cfg = self.ingress, self.ingress.config.ari
        values = await self._read_variables()
        if values.get("AS_UUID"):
            self.call_id = values["AS_UUID"]
        await self._previous_call_over()
        why = ingress._refusal(self.call_id)
        if why is not None:
            log.warning("[%s] refused: %s (the dialplan continues)", self.call_id, why)
            await self.release("hangup")
            return
        if self._abandoned():
            await self.release("hangup")
            return
        settings = self._settings(values)
        if self.channel.get("state") != "Up":
            answer = asyncio.ensure_future(self._client.request("POST", f"/channels/{self.channel_id}/answer"))
        else:
            answer = None
        try:
            self.leg = await ingress.ports.open(cfg.format, on_hangup=self._leg_closed)
            self.media_id = f"vb-media-{uuid.uuid4().hex}"
            ingress._media[self.media_id] = self
            host = cfg.rtp.advertise or cfg.rtp.host
            media = await self._client.request("POST", "/channels/externalMedia", params={
                "app": cfg.app, "channelId": self.media_id, "external_host": f"{host}:{self.leg.local_port}",
                "format": cfg.format, "encapsulation": "rtp", "transport": "udp", "direction": "both"})
            remote_host, remote_port = await self._media_address(media)
            self.leg.set_remote(remote_host, remote_port)
        finally:
            if answer is not None:
                await answer
        if self._abandoned():
            await self.release("hangup")
            await self._undo()  # the External Media channel may have been created after release() ran
            return
        settings.channel = ChannelInfo(
            name=str(self.channel.get("name") or self.channel_id), uniqueid=self.channel_id,
            linkedid=str(self.channel.get("linkedid") or ""),
            caller_num=str((self.channel.get("caller") or {}).get("number") or ""),
            caller_name=str((self.channel.get("caller") or {}).get("name") or ""),
            context=str((self.channel.get("dialplan") or {}).get("context") or ""),
            exten=str((self.channel.get("dialplan") or {}).get("exten") or ""),
            variables={k: v for k, v in values.items() if v}, driver=self)
        ingress._resolved[self.call_id] = settings
        session = ingress._open_call(self.call_id, self.leg)
        if session is None:  # refused after all (capacity taken meanwhile): the leg was hung up
            ingress._resolved.pop(self.call_id, None)
            return
        self.session = session
        self.leg.attach(session)
        self.bridge_id = f"vb-bridge-{uuid.uuid4().hex}"
        await self._client.request("POST", "/bridges", params={"type": "mixing", "bridgeId": self.bridge_id})
        if self.released:  # the session ended meanwhile: its release may have missed the new bridge
            await self._undo()
            return
        try:
            await asyncio.wait_for(self.media_in_stasis.wait(), MEDIA_STASIS_WAIT_S)
        except TimeoutError:  # its event lost (the stream reconnected)? Asterisk's answer decides
            log.warning("[%s] no StasisStart from External Media %s within %.0f s: bridging it anyway",
                        self.call_id, self.media_id, MEDIA_STASIS_WAIT_S)
        if self.released:
            await self._undo()
            return
        await self._client.request("POST", f"/bridges/{self.bridge_id}/addChannel",
                                   params={"channel": f"{self.channel_id},{self.media_id}"})
        if self.gone:  # hung up while we bridged: the StasisEnd already told the session
            return
        log.info("[%s] ARI call on %s bridged with External Media %s (RTP %s, port %d)", self.call_id,
                 settings.channel.name, self.media_id, cfg.format, self.leg.local_port)

    async def _previous_call_over(self) -> None:
        """A channel that enters the application again (a transfer to an extension running Stasis()
        with another profile) has the same call id as the call it just left, which may still be
        tearing down (the gateway's goodbye, tools finishing): wait for that, briefly."""
        for other in list(self.ingress._unreleased):
            if other is not self and other.call_id == self.call_id and other.session is not None:
                try:
                    await asyncio.wait_for(other.session.ended.wait(), PREVIOUS_CALL_WAIT_S)
                except TimeoutError:
                    log.warning("[%s] the previous call on this channel is still ending after %.0f s",
                                self.call_id, PREVIOUS_CALL_WAIT_S)

    async def _read_variables(self) -> dict[str, str]:
        values = {k: str(v) for k, v in (self.channel.get("channelvars") or {}).items()
                  if k in CALL_VARIABLES and v is not None}
        missing = [name for name in CALL_VARIABLES if name not in values]
        if missing:
            got = await asyncio.gather(*(self._get_variable(n) for n in missing))
            values.update({n: v for n, v in zip(missing, got, strict=True) if v is not None})
        return values

    async def _get_variable(self, name: str) -> str | None:
        try:
            answer = await self._client.request("GET", f"/channels/{self.channel_id}/variable",
                                                params={"variable": name})
        except AriError as exc:
            if exc.status == 404 and "variable" in str(exc).lower():  # the dialplan did not set it
                return None
            raise  # the channel itself is gone (404 "Channel not found"), or worse
        return str(answer.get("value") or "") if isinstance(answer, dict) else None

    def _settings(self, values: dict[str, str]) -> CallSettings:
        """API request first (a call started through the API), then the Stasis arguments, then
        the channel variables, then the defaults."""
        api_request = self.ingress._pending.pop(self.call_id, None)
        if api_request is not None:
            return api_request
        settings = CallSettings()
        profile = self.args[0] if self.args and self.args[0] else values.get("AS_PROFILE")
        if profile:
            settings.profile = profile
        raw_vars = self.args[1] if len(self.args) > 1 else values.get("AS_VARS", "")
        settings.variables.update(parse_vars(raw_vars))
        return settings

    async def _media_address(self, media: Any) -> tuple[str, int]:
        """Where Asterisk sends this call's RTP from (and expects ours): the External Media
        channel's UNICASTRTP_LOCAL_ADDRESS and _PORT."""
        cv = (media or {}).get("channelvars") or {} if isinstance(media, dict) else {}
        addr, port = cv.get("UNICASTRTP_LOCAL_ADDRESS"), cv.get("UNICASTRTP_LOCAL_PORT")
        if not addr or not port:
            got = {}
            for name in ("UNICASTRTP_LOCAL_ADDRESS", "UNICASTRTP_LOCAL_PORT"):
                answer = await self._client.request("GET", f"/channels/{self.media_id}/variable",
                                                    params={"variable": name})
                got[name] = (answer or {}).get("value")
            addr, port = got["UNICASTRTP_LOCAL_ADDRESS"], got["UNICASTRTP_LOCAL_PORT"]
        try:
            return str(addr), int(str(port))
        except ValueError:
            raise AriError(f"the External Media channel gave no usable RTP address ({addr!r}:{port!r})") from None

    # ------------------------------------------------------------------ the channel going away

    def caller_left(self, why: str) -> None:
        """StasisEnd (or ChannelDestroyed) of the caller's channel, or it was gone at a resync."""
        if self.gone:
            return
        self.gone = True
        if self.ingress.calls.get(self.channel_id) is self:
            del self.ingress.calls[self.channel_id]
        if self.session is not None:
            self.session.on_caller_gone(why)  # the session ends; its leg's hangup() releases the rest
        # else: the set-up notices at its next step (_abandoned) and releases

    def media_left(self) -> None:
        """The External Media channel went away under a live call: its audio has stopped."""
        if self.session is not None and not self.released and not self.gone:
            self.session.on_caller_gone("connection-lost: the External Media channel went away")

    def _leg_closed(self, how: str) -> None:
        """The leg closed: the session ended and hung it up (``hangup``, the normal way, or
        ``abort``), or its socket failed (the caller then goes back to the dialplan)."""
        self.ingress._spawn(self.release("abort" if how == "abort" else "hangup"), f"ari-release-{self.channel_id}")

    async def release(self, how: str = "hangup") -> None:
        """Tear down once: the caller back to the dialplan (or hung up), then ours deleted."""
        if self.released:
            return
        self.released = True
        try:
            if not self.gone and not self.handed_off:
                self.handed_off = True
                if how == "abort":
                    await self._quietly("DELETE", f"/channels/{self.channel_id}")
                else:
                    await self._quietly("POST", f"/channels/{self.channel_id}/continue")
            if self.media_id is not None:
                await self._quietly("DELETE", f"/channels/{self.media_id}")
            if self.bridge_id is not None:
                await self._quietly("DELETE", f"/bridges/{self.bridge_id}")
        finally:
            if self.leg is not None:
                self.leg.abort()  # closes the socket, frees the port (idempotent)
            if self.ingress.calls.get(self.channel_id) is self:
                del self.ingress.calls[self.channel_id]
            self.ingress._unreleased.discard(self)
            if self.media_id is not None:
                self.ingress._media.pop(self.media_id, None)

    async def _undo(self) -> None:
        """Delete what the set-up created after :meth:`release` ran (it may have been in flight)."""
        if self.leg is not None:
            self.leg.abort()
        if self.media_id is not None:
            await self._quietly("DELETE", f"/channels/{self.media_id}")
            self.ingress._media.pop(self.media_id, None)
        if self.bridge_id is not None:
            await self._quietly("DELETE", f"/bridges/{self.bridge_id}")

    async def _quietly(self, method: str, path: str) -> None:
        try:
            await self._client.request(method, path)
        except AriError as exc:
            if not exc.gone:  # already gone is what we wanted
                log.warning("[%s] %s", self.call_id, exc)

    # ------------------------------------------------------------------ ChannelDriver (tools/base.py)

    async def _hand_off(self, method: str, path: str, params: dict[str, Any], what: str) -> None:
        if self.gone:
            raise ToolError(f"cannot {what}: the caller's channel has already left")
        self.handed_off = True
        try:
            await self._client.request(method, path, params=params)
        except AriError as exc:
            self.handed_off = False
            raise ToolError(f"{what} failed: {exc}") from None

    async def redirect(self, context: str, exten: str) -> None:
        await self._hand_off("POST", f"/channels/{self.channel_id}/continue",
                             {"context": context, "extension": exten, "priority": 1}, "transfer")

    async def hangup(self, cause: int) -> None:
        await self._hand_off("DELETE", f"/channels/{self.channel_id}", {"reason_code": cause}, "hangup")

    async def play_dtmf(self, digits: str, duration_ms: int) -> None:
        try:
            await self._client.request("POST", f"/channels/{self.channel_id}/dtmf",
                                       params={"dtmf": digits, "duration": duration_ms},
                                       timeout=self._client.action_timeout + len(digits) * duration_ms / 500)
        except AriError as exc:
            raise ToolError(f"sending DTMF failed: {exc}") from None

    async def set_variable(self, name: str, value: str) -> None:
        try:
            await self._client.request("POST", f"/channels/{self.channel_id}/variable",
                                       params={"variable": name, "value": value})
        except AriError as exc:
            raise ToolError(f"setting {name} failed: {exc}") from None


def check_rtp_host(host: str) -> None:
    """Raise ConfigError naming ``ari.rtp.host`` if no UDP socket can be bound there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError as exc:
        raise ConfigError(f"ari.rtp.host: cannot bind a UDP socket on {host}: {exc.strerror or exc}") from None


def build(config: Config, *, open_call: Callable[[str, CallerLeg], Session | None],
          refusal: Callable[[str], str | None], pending: dict[str, CallSettings],
          resolved: dict[str, CallSettings], on_fault: Callable[[BaseException], None] | None = None) -> AriIngress:
    """The ARI client, the RTP port pool and the ingress, from ``config.ari``."""
    a = config.ari
    assert a.password is not None  # the config refuses ingress ari without one
    client = AriClient(a.url, a.username, a.password.get_secret_value(), a.app, action_timeout=a.action_timeout,
                       backoff_max=a.reconnect_max, on_fault=on_fault)
    first, last = a.rtp.port_range
    ports = RtpPortPool(a.rtp.host, first, last, jitter_packets=a.rtp.jitter_packets)
    return AriIngress(config, client, ports, open_call=open_call, refusal=refusal, pending=pending,
                      resolved=resolved)
