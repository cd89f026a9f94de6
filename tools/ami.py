"""Built-in telephony tools over AMI: transfer, hangup, originate, send_dtmf.

A call that came in over ARI carries its own way to its channel (``ChannelInfo.driver``, see
tools/base.py): transfer, hangup and DTMF then go through ARI, behind the same allowlists, and
need no AMI.

An AI can be talked into dialling anything (toll fraud), so every target is checked against
the allowlists in config before AMI is touched; a refusal is a tool error that names the
reason, and it is logged as a security event. Transfers and originates always use priority 1.
Every action awaits Asterisk's Response (by ActionID, with a deadline) before reporting
success — "transfer silently does nothing" is the most common complaint about peer bridges.

Every failure here is a :class:`ToolError` with a sentence the AI (or the API caller) can use:
an AMI error, a value AMI cannot carry (a control character in an extension: bridge/ami_protocol.py
refuses it rather than let it inject AMI commands), a missing connection. Nothing else escapes.

A Redirect or Hangup takes the channel away from the bridge, and the socket closing must not then
be recorded as the caller hanging up: the session is told first (``note_handoff``). If the action
then fails, that note must be withdrawn, or a later genuine caller hang-up would be recorded as
"transferred" or "ai-hangup". :meth:`Telephony.handoff` is the one construct every such path uses.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.ami_protocol import AmiError, control_character

from .base import AFTER_SPEECH, END_REASON, CallControl, ChannelDriver, ChannelInfo, Tool, ToolError, arguments, text

if TYPE_CHECKING:
    from bridge.ami import AmiClient

log = logging.getLogger("voxbridge.tools.ami")
security = logging.getLogger("voxbridge.security")

#: OriginateResponse ``Reason`` codes (Asterisk's AST_CONTROL_*), as tool outcomes.
ORIGINATE_REASONS = {"0": "failed", "1": "hangup", "3": "no answer", "4": "answered", "5": "busy", "8": "congestion"}
#: As a JSON Schema pattern (sent to the gateway). Match with ``fullmatch`` on :data:`DTMF_DIGITS`:
#: ``re.search`` with ``$`` also accepts a trailing newline ("12\n").
DTMF_RE = re.compile(r"^[0-9*#A-D]{1,32}$")
DTMF_DIGITS = re.compile(r"[0-9*#A-D]{1,32}")
#: How long to let the AI finish its sentence before a transfer or hangup.
SPEECH_WAIT_S = 5.0


class NotAllowed(ToolError):
    """The target is not in the allowlist (a security refusal, not a failure)."""


@dataclass(frozen=True)
class TransferRule:
    context: str
    exten: re.Pattern[str]

    @classmethod
    def parse(cls, spec: str) -> TransferRule:
        context, sep, exten = spec.partition(",")
        if not sep or not context.strip() or not exten.strip():
            raise ValueError(f"transfer allowlist entry {spec!r} must be 'context,extension-pattern'")
        return cls(context.strip(), re.compile(exten.strip()))


def _full(pattern: re.Pattern[str], value: str) -> bool:
    return pattern.fullmatch(value) is not None


def _printable(what: str, value: str) -> None:
    """Refuse a control character in a value bound for AMI, naming it (not a security refusal:
    the allowlist is not even consulted for such a value)."""
    bad = control_character(value)
    if bad is not None:
        raise ToolError(f"{what} {value!r} contains {bad}")


class Telephony:
    """What the AMI tools (and the fallback, and the API) may do to Asterisk."""

    def __init__(self, ami: AmiClient | None, *, transfer_allow: list[str], originate_allow: list[str],
                 originate_channel: str, originate_context: str | None, originate_exten: str | None,
                 ring_timeout: float = 12.0, caller_id: str | None = None) -> None:
        self.ami = ami
        self.transfer_rules = [TransferRule.parse(s) for s in transfer_allow]
        self.originate_rules = [re.compile(p) for p in originate_allow]
        self.originate_channel = originate_channel
        self.originate_context = originate_context
        self.originate_exten = originate_exten
        self.ring_timeout = ring_timeout
        self.caller_id = caller_id

    def _require(self, what: str) -> AmiClient:
        if self.ami is None:
            raise ToolError(f"{what} is not available: the bridge has no AMI connection configured")
        if not self.ami.connected.is_set():
            raise ToolError(f"{what} is not possible right now: the connection to Asterisk is down")
        return self.ami

    @staticmethod
    @contextlib.contextmanager
    def handoff(call: CallControl, reason: str) -> Iterator[None]:
        """Around the AMI action that hands the channel to Asterisk (Redirect, Hangup): the session
        knows why its socket is about to close; if the action fails or is cancelled, it no longer
        expects that (see the module docstring)."""
        call.note_handoff(reason)
        try:
            yield
        except BaseException:
            call.note_handoff(None)
            raise

    @staticmethod
    def _channel(call: CallControl, what: str) -> ChannelInfo:
        ch = call.channel
        if ch is None or not ch.name:
            raise ToolError(f"cannot {what}: this call's Asterisk channel is not known")
        return ch

    @staticmethod
    def _driver(call: CallControl) -> ChannelDriver | None:
        """The call's own way to its channel (ARI), if it has one; else AMI is the way."""
        ch = call.channel
        return ch.driver if ch is not None else None

    def ready(self, call: CallControl, what: str) -> None:
        """Raise the ToolError that acting on the call's channel now would meet (before waiting
        for the AI's sentence to end, so a transfer that cannot happen says so at once)."""
        if self._driver(call) is None:
            self._require(what)
            self._channel(call, what)

    # -- allowlists

    def check_transfer(self, call: CallControl, exten: str, context: str | None) -> tuple[str, str]:
        _printable("the extension", exten)
        if context is not None:
            _printable("the context", context)
        for rule in self.transfer_rules:
            if (context is None or context == rule.context) and _full(rule.exten, exten):
                return rule.context, exten
        security.warning("SECURITY refused transfer of call %s to %s,%s (not in allow.transfer)",
                         call.call_id, context or "*", exten)
        raise NotAllowed(f"transfers to {exten!r}{' in ' + context if context else ''} are not allowed")

    def check_originate(self, call_id: str, destination: str, rules: list[re.Pattern[str]] | None = None) -> None:
        _printable("the destination", destination)
        if not any(_full(p, destination) for p in (self.originate_rules if rules is None else rules)):
            security.warning("SECURITY refused originate from call %s to %r (not in allow.originate)",
                             call_id, destination)
            raise NotAllowed(f"calling {destination!r} is not allowed")

    # -- actions

    async def redirect(self, call: CallControl, context: str, exten: str) -> None:
        if (driver := self._driver(call)) is not None:
            await driver.redirect(context, exten)
            return
        ami = self._require("transfer")
        ch = self._channel(call, "transfer")
        try:
            await ami.action("Redirect", Channel=ch.name, Context=context, Exten=exten, Priority=1)
        except AmiError as exc:
            raise ToolError(f"transfer failed: {exc}") from None

    async def hangup(self, call: CallControl, cause: int = 16) -> None:
        if (driver := self._driver(call)) is not None:
            await driver.hangup(cause)
            return
        ami = self._require("hangup")
        ch = self._channel(call, "hang up")
        try:
            await ami.action("Hangup", Channel=ch.name, Cause=cause)
        except AmiError as exc:
            raise ToolError(f"hangup failed: {exc}") from None

    async def play_dtmf(self, call: CallControl, digits: str, duration_ms: int = 250) -> None:
        if not DTMF_DIGITS.fullmatch(digits):
            raise ToolError(f"{digits!r} is not DTMF: 1 to 32 of 0-9, *, #, A-D")
        if (driver := self._driver(call)) is not None:
            await driver.play_dtmf(digits, duration_ms)
            return
        ami = self._require("sending DTMF")
        ch = self._channel(call, "send DTMF")
        try:
            for d in digits:
                await ami.action("PlayDTMF", Channel=ch.name, Digit=d, Duration=duration_ms)
        except AmiError as exc:
            raise ToolError(f"sending DTMF failed: {exc}") from None

    async def originate(self, destination: str, *, channel_template: str, context: str | None, exten: str | None,
                        variables: dict[str, str], timeout: float, caller_id: str | None = None,
                        application: str | None = None, data: str | None = None) -> str:
        """Place a call; return the outcome (answered, busy, no answer, failed, …)."""
        ami = self._require("placing a call")
        fields: dict[str, Any] = {
            "Channel": channel_template.format(destination=destination),
            "Timeout": int(timeout * 1000),
            "CallerID": caller_id or self.caller_id,
            "Variable": variables or None,
        }
        if application:
            fields.update(Application=application, Data=data or "")
        else:
            fields.update(Context=context, Exten=exten, Priority=1)
        try:
            event = await ami.originate(timeout=timeout + 3, **fields)
        except AmiError as exc:
            raise ToolError(f"the call could not be placed: {exc}") from None
        return ORIGINATE_REASONS.get(event.get("Reason") or "", "failed")


class _AmiTool(Tool):
    def __init__(self, telephony: Telephony) -> None:
        self.telephony = telephony
        self._driver = telephony._driver


class TransferTool(_AmiTool):
    name = "transfer"
    description = (
        "Transfer the caller to another extension (for example a human operator or a department). "
        "Tell the caller you are transferring them first; the transfer happens after your current sentence."
    )
    parameters = arguments(
        ["extension"],
        extension=text("the extension to transfer to, e.g. 100"),
        context=text("the dialplan context, if more than one is allowed"),
        after_speech=AFTER_SPEECH,
    )

    async def run(self, call: CallControl, args: dict[str, Any]) -> dict[str, str]:
        context, exten = self.telephony.check_transfer(call, args["extension"].strip(), args.get("context"))
        self.telephony.ready(call, "transfer")
        if args.get("after_speech", True):
            await call.wait_playout(SPEECH_WAIT_S)
        with self.telephony.handoff(call, f"transferred:{context},{exten}"):
            await self.telephony.redirect(call, context, exten)
        log.info("call %s transferred to %s,%s", call.call_id, context, exten)
        return {"status": "transferred", "context": context, "extension": exten}


class HangupTool(_AmiTool):
    name = "hangup"
    description = (
        "Hang up the phone call. Say goodbye first: by default the call ends after your current sentence."
    )
    parameters = arguments(after_speech=AFTER_SPEECH, reason=END_REASON)

    async def run(self, call: CallControl, args: dict[str, Any]) -> str:
        if args.get("after_speech", True):
            await call.wait_playout(SPEECH_WAIT_S)
        reason = "ai-hangup" + (f": {args['reason']}" if args.get("reason") else "")
        if self._driver(call) is None and (self.telephony.ami is None or call.channel is None):
            call.end(reason, after_speech=False)  # 0x00: the dialplan continues (and hangs up)
            return "ok: the call is ending"
        with self.telephony.handoff(call, reason):
            await self.telephony.hangup(call)
        return "ok: the call has been hung up"


class OriginateTool(_AmiTool):
    name = "originate"
    description = (
        "Place a new phone call to an allowed number or extension and report whether it was answered, "
        "busy, or not answered. Only destinations the operator allowed can be called."
    )
    parameters = arguments(["destination"], destination=text("the number or extension to call"))

    async def run(self, call: CallControl, args: dict[str, Any]) -> dict[str, str]:
        t = self.telephony
        destination = args["destination"].strip()
        t.check_originate(call.call_id, destination)
        if not (t.originate_context and t.originate_exten):
            raise ToolError("placing calls is not configured (originate.context / originate.exten)")
        outcome = await t.originate(
            destination, channel_template=t.originate_channel, context=t.originate_context,
            exten=t.originate_exten, variables={"VOXBRIDGE_PARENT_CALL": call.call_id}, timeout=t.ring_timeout,
        )
        return {"destination": destination, "outcome": outcome}


class SendDtmfTool(_AmiTool):
    name = "send_dtmf"
    description = "Send DTMF tones (keypad digits) on the call, e.g. to navigate another system's menu."
    parameters = arguments(["digits"], digits=text("digits to send: 0-9, *, #, A-D", pattern=DTMF_RE.pattern))

    async def run(self, call: CallControl, args: dict[str, Any]) -> str:
        await self.telephony.play_dtmf(call, args["digits"])
        return f"ok: sent {args['digits']}"


AMI_TOOLS: tuple[type[_AmiTool], ...] = (TransferTool, HangupTool, OriginateTool, SendDtmfTool)
