"""Telephony: the bridge's side of Asterisk over AMI, apart from the media.

One per bridge, built by bridge/app.py. It owns the AMI connection (bridge/ami.py), the tracker
that maps each AudioSocket UUID to its Asterisk channel (bridge/channels.py), and the
allowlist-checked actions (``tools.ami.Telephony``: the same ones the AI's telephony tools use).
On top of them it does the three things a call needs from Asterisk besides its audio:

* :meth:`Asterisk.resolve_settings`: which profile and variables the dialplan gave the call
  (``AS_PROFILE`` and ``AS_VARS``, read as channel variables), and its channel;
* :meth:`Asterisk.apply_fallback` and :meth:`Asterisk.hangup_call`: the fallback's and the API's
  hang-up and transfer, over AMI when the channel is known;
* :class:`OutboundDialer`: calls started through the API (Originate, then the callee's
  AudioSocket leg arrives with the call's UUID).

Without ``ami.enabled`` there is no AMI client: settings are the API request's or the defaults,
and the fallback and hang-up end the AudioSocket session (the dialplan continues).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

from tools.ami import Telephony
from tools.base import CallControl, ToolError

from .ami import AmiClient, AmiError
from .calls import CallSettings, EventPublisher
from .channels import ChannelTracker
from .config import Config, Fallback
from .toolset import make_telephony

log = logging.getLogger("voxbridge")


class TelephonyCall(CallControl, Protocol):
    """What telephony needs of a call: the tools' view of it, its logger, and a way to end it."""

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...


def parse_vars(text: str) -> dict[str, str]:
    """``AS_VARS`` from the dialplan: ``name=value&other=value`` (URL-encoded) → prompt variables."""
    return {k: v for k, v in parse_qsl(text, keep_blank_values=True) if k.isidentifier()}


class Asterisk:
    """The AMI client, the channel tracker and the allowlist-checked actions, for the calls."""

    def __init__(self, config: Config, pending: dict[str, CallSettings] | None = None, *,
                 on_fault: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        #: Calls started through the API, by UUID: their request's settings win (bridge/calls.py).
        self.pending: dict[str, CallSettings] = {} if pending is None else pending
        #: Calls whose ingress knew their settings and channel before the session started (ARI:
        #: the StasisStart event carries them), by call id; taken by :meth:`resolve_settings`.
        self.resolved: dict[str, CallSettings] = {}
        self.ami: AmiClient | None = None
        self.channels = ChannelTracker()
        if config.ami.enabled:
            a = config.ami
            self.ami = AmiClient(a.host, a.port, a.username, a.secret.get_secret_value() if a.secret else "",
                                 action_timeout=a.action_timeout, ping_interval=a.ping_interval, on_fault=on_fault)
            self.channels.attach(self.ami)
        self.telephony: Telephony = make_telephony(config, self.ami)

    @property
    def connected(self) -> bool:
        return self.ami is not None and self.ami.connected.is_set()

    async def start(self, run: Callable[[Any], Any]) -> None:
        """Connect (and reconnect) in the background; ``run`` starts the loop under supervision."""
        if self.ami is not None:
            await self.ami.start(run)

    async def stop(self) -> None:
        if self.ami is not None:
            await self.ami.stop()

    def expected_profile(self, call_id: str) -> str | None:
        """The profile a call will get, if it is known before :meth:`resolve_settings` has waited for
        anything: an API request's (it wins) or the ingress's (ARI). None: not known yet (a dialplan's
        ``AS_PROFILE`` comes with the AMI channel) — the default profile is the best guess."""
        known = self.pending.get(call_id) or self.resolved.get(call_id)
        return known.profile if known is not None else None

    async def resolve_settings(self, call: TelephonyCall) -> CallSettings:
        """Per-call settings: the API request, then the dialplan (AMI channel variables), then defaults."""
        if (known := self.resolved.pop(call.call_id, None)) is not None:
            # The ingress resolved them (ARI). An API request still wins: a cluster's shared one
            # reaches ``pending`` only now, after the ingress looked (bridge/cluster.py).
            if (api_request := self.pending.pop(call.call_id, None)) is not None:
                api_request.channel = known.channel
                return api_request
            return known
        api_request = self.pending.pop(call.call_id, None)
        settings = api_request or CallSettings()
        if self.ami is None:
            return settings
        cfg = self.config
        channel = await self.channels.wait_for(call.call_id, cfg.ami.channel_wait)
        if channel is None:
            if cfg.audiosocket.unknown_uuid == "refuse" and api_request is None:
                settings.refuse = "no Asterisk channel claims this UUID (audiosocket.unknown_uuid: refuse)"
            else:
                call.log.warning("no Asterisk channel claims this UUID within %.1f s: tools that need the "
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
                    call.log.warning("cannot read %s: %s", name, exc)
        if values.get("AS_PROFILE"):
            settings.profile = values["AS_PROFILE"]
        settings.variables.update(parse_vars(values.get("AS_VARS", "")))
        return settings

    async def apply_fallback(self, call: TelephonyCall, fallback: Fallback) -> None:
        """Telephony side of a fallback. Returning to the dialplan needs nothing but the leg's
        hang-up that ends every session; the rest needs the channel, and AMI unless the call
        brought its own way to it (ARI: ``ChannelInfo.driver``)."""
        channel = call.channel
        driver = channel.driver if channel is not None else None
        if driver is None and (self.ami is None or channel is None):
            if fallback.action != "dialplan":
                call.log.warning("fallback %r needs AMI and a known channel: returning to the dialplan",
                                 fallback.action)
            return
        assert channel is not None
        try:
            if fallback.action == "dialplan":
                if driver is not None:
                    await driver.set_variable("VOXBRIDGE_RESULT", "fallback")
                else:
                    assert self.ami is not None
                    await self.ami.action("Setvar", Channel=channel.name, Variable="VOXBRIDGE_RESULT", Value="fallback")
            elif fallback.action == "hangup":
                with self.telephony.handoff(call, "fallback:hangup"):
                    await self.telephony.hangup(call)
            elif fallback.action == "transfer":
                # The config model refuses a transfer fallback without both (bridge/config.py).
                context, exten = fallback.context or "", fallback.exten or ""
                with self.telephony.handoff(call, f"fallback:transferred:{context},{exten}"):
                    await self.telephony.redirect(call, context, exten)
        except (AmiError, ToolError) as exc:
            call.log.error("fallback %s failed: %s (returning to the dialplan)", fallback.action, exc)

    async def hangup_call(self, call: TelephonyCall, reason: str) -> None:
        """Hang the channel up over AMI (or the call's own driver: ARI) if it can; else end the
        session (its leg hangs up)."""
        if call.channel is not None and call.channel.driver is not None:
            try:
                with self.telephony.handoff(call, reason):
                    await self.telephony.hangup(call)
                return
            except ToolError as exc:
                call.log.warning("hangup over %s failed (%s): ending the session instead",
                                 call.channel.driver.via, exc)
                call.end(reason)
                return
        if self.ami is not None and call.channel is not None and self.ami.connected.is_set():
            try:
                with self.telephony.handoff(call, reason):
                    await self.telephony.hangup(call)
                return
            except ToolError as exc:
                call.log.warning("AMI hangup failed (%s): ending the AudioSocket session instead", exc)
        call.end(reason)


class SharedPending(Protocol):
    """A cluster's API-started calls (bridge/cluster.py): settings any node's leg can take."""

    async def put_pending(self, call_id: str, settings: CallSettings) -> None: ...

    async def discard_pending(self, call_id: str) -> bool: ...


class OutboundDialer:
    """Calls started through the API: Originate over AMI; the answered callee reaches the AI.

    In a cluster (``shared``) the settings are also registered under the UUID before dialing,
    because Asterisk may connect the callee's leg to any node."""

    def __init__(self, config: Config, asterisk: Asterisk, pending: dict[str, CallSettings], *,
                 record_dialing: Callable[..., None], events: EventPublisher,
                 shared: SharedPending | None = None) -> None:
        self.config = config
        self.shared = shared
        self.asterisk = asterisk
        self.pending = pending
        self._record_dialing = record_dialing
        self.events = events
        self._call_rules = [re.compile(p) for p in config.allow.calls]
        self._background: set[asyncio.Task[Any]] = set()

    async def start_call(self, req: Any) -> str:
        """Dial ``req.destination`` over AMI; the answered callee reaches the AI with this call's UUID.

        Raises NotAllowed (destination not in allow.calls), LookupError (unknown profile),
        ToolError (no AMI). Returns at once; the outcome arrives as events.
        """
        cfg = self.config
        ami = self.asterisk.ami
        self.asterisk.telephony.check_originate("api", req.destination, rules=self._call_rules)
        if req.profile is not None and req.profile not in cfg.profiles:
            raise LookupError(f"no profile {req.profile!r} (profiles: {', '.join(cfg.profiles)})")
        if ami is None:
            raise ToolError("starting calls needs AMI (ami.enabled: true)")
        if not ami.connected.is_set():
            raise ToolError(f"Asterisk is not connected ({ami.last_error or 'connecting'})")
        call_id = str(uuid.uuid4())
        overrides = {k: getattr(req, k) for k in ("prompt", "first_message", "voice", "language")
                     if getattr(req, k) is not None}
        profile = req.profile or cfg.default_profile
        settings = CallSettings(profile=profile, variables=dict(req.variables), metadata=dict(req.metadata),
                                overrides=overrides, direction="outbound")
        if self.shared is not None:
            await self.shared.put_pending(call_id, settings)
        self.pending[call_id] = settings
        self._record_dialing(call_id, "outbound", profile, req.destination, dict(req.metadata))
        task = asyncio.create_task(self._dial(call_id, req, profile), name=f"dial-{call_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.info("[%s] API call to %s (profile %s)", call_id, req.destination, profile)
        return call_id

    async def _dial(self, call_id: str, req: Any, profile: str) -> None:
        o = self.config.outbound
        variables = {"AS_UUID": call_id, "AS_PROFILE": profile, "AS_VARS": urlencode(req.variables)}
        try:
            outcome = await self.asterisk.telephony.originate(
                req.destination, channel_template=o.channel, context=o.context, exten=o.exten,
                variables=variables, timeout=o.ring_timeout, caller_id=req.caller_id or o.caller_id)
            message = outcome
        except ToolError as exc:
            outcome, message = "failed", str(exc)
        if outcome == "answered":
            # Answered: the AudioSocket connection should follow. If it does not, say so.
            await asyncio.sleep(o.answer_timeout)
            outcome = "no-audiosocket"
            message = f"answered, but no AudioSocket connection within {o.answer_timeout:g} s"
        unclaimed = self.pending.pop(call_id, None) is not None
        if self.shared is not None:  # the leg may have reached another node, which took the settings
            unclaimed = await self.shared.discard_pending(call_id) and unclaimed
        if unclaimed:
            log.warning("[%s] API call to %s failed: %s", call_id, req.destination, message)
            self.events.publish("call.failed", call_id, reason=outcome.replace(" ", "-"), message=message,
                                destination=req.destination, metadata=dict(req.metadata), direction="outbound")

    def stop(self) -> None:
        """Stop following the dials in progress (the calls themselves are Asterisk's)."""
        for task in list(self._background):
            task.cancel()
