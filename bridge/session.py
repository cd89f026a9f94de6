"""One call: the single owner of everything about it.

A :class:`CallSession` is created when a caller's leg (bridge/leg.py; an AudioSocket connection
today) delivers its UUID and owns, until the call ends: the leg, the gateway session, the playout buffer (registered on
the process-wide clock), both resamplers, the tool router and its tasks, and the timers.
Every way a call ends — caller hangs up, gateway hangs up, AI ends it, error, fallback,
max duration, shutdown — goes through :meth:`CallSession.end`, which tears all of it down
once, in order, and publishes ``call.ended``. Nothing outlives its call; tests check.

Media path (per 20 ms, per call):
  caller → ``on_caller_audio`` → resample → ``Gateway.send_audio`` (queued, non-blocking)
  gateway → ``AudioOut`` → resample → :class:`PlayoutBuffer` → clock tick → ``on_tick``
  → ``CallerLeg.send_frame`` → caller
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tools.base import ChannelInfo, ToolRegistry
from tools.router import ToolOutcome, ToolRouter

from .calls import CallSettings, EventPublisher
from .config import Config, Fallback, Profile
from .gateway.base import (
    BRIDGE_COMMANDS,
    COMMANDS,
    AudioOut,
    ClearPlayback,
    Closed,
    CommandUnavailable,
    CommandUnsupported,
    Gateway,
    GatewayError,
    RemoteError,
    RemoteHangup,
    ResponseDone,
    SessionSetup,
    ToolCall,
    Transcript,
    cancel_and_wait,
)
from .leg import CallerLeg
from .playout import PlayoutBuffer
from .resample import Resampler
from .silence import EnergyGate, SilenceWatchdog
from .state import FINISHING, CallState, CallStateMachine, InvalidTransition

log = logging.getLogger("voxbridge.call")

#: Grace beyond the profile's max_duration before the bridge ends a call the gateway did not.
MAX_DURATION_GRACE_S = 10.0
#: Caller audio held while the call is being set up — its settings resolved (under load, AMI
#: correlation waits for the channel), the gateway connected — then handed to the gateway whole,
#: in order (``Gateway.send_held_audio``): a caller who speaks at once keeps their first words.
#: Bounded by time, not by a frame count a slow start would overrun: beyond this much audio the
#: oldest is dropped (counted in ``preconnect_dropped``). At the caller's rate that is
#: ``PRECONNECT_HOLD_S * rate * 2`` bytes: 160 000 at 8 kHz, 320 000 at 16 kHz, per call.
PRECONNECT_HOLD_S = 10.0
#: Before connecting, how long to wait for the caller's first audio frame, which tells the caller's
#: rate (AudioSocket: the frame's kind): adapters choose their wire format from it (OpenAI Realtime
#: speaks µ-law to an 8 kHz call, PCM 24 kHz to a 16 kHz one). Asterisk sends a frame every 20 ms.
FIRST_FRAME_WAIT_S = 0.1
#: A gateway connection opened while the call's settings are resolved (Gateway.preconnect) and still
#: unused this long after the longest they can take — the AMI channel wait, the on_call_start hook's
#: timeout — is closed: services drop sockets that stay unconfigured, and one that did would only be
#: replaced at connect. This margin also covers the rest of the set-up (Getvar, the first frame).
PRECONNECT_IDLE_MARGIN_S = 3.0
#: "After the current sentence": wait for the queue to drain, then this long for more speech.
SPEECH_TAIL_S = 0.8
SPEECH_WAIT_MAX_S = 10.0
#: How long tools still running may take to answer after the call was handed to Asterisk.
HANDOFF_GRACE_S = 2.0
#: Gateway error messages that mean "the call is over" rather than "the gateway failed".
NORMAL_END_ERRORS = frozenset({"max_duration_reached"})
#: Most bytes of JSON the call's metadata may grow to through the API's ``tags`` command.
MAX_TAGGED_METADATA_BYTES = 16 * 1024


__all__ = ["CallServices", "CallSession", "CallSettings"]

# --------------------------------------------------------------------------- what a call needs
# The session receives these, never the whole bridge: bridge/app.py builds one CallServices and
# every call shares it. Each is a Protocol; what implements it is the wiring's business.


class PlayoutClock(Protocol):
    """The process-wide 20 ms tick (bridge/playout.py): calls ``on_tick`` of every sink."""

    def add(self, sink: Any) -> None: ...

    def remove(self, sink: Any) -> None: ...


class SettingsResolver(Protocol):
    """Profile, variables and channel of a call: API request, then dialplan, then defaults
    (bridge/telephony.py)."""

    async def resolve_settings(self, call: CallSession) -> CallSettings: ...

    def expected_profile(self, call_id: str) -> str | None:
        """The call's profile if it is known before resolving (an API request's); None: not yet."""
        ...


class GatewayFactory(Protocol):
    """A new gateway adapter for this call (bridge/gateway/factory.py)."""

    def __call__(self, call: CallSession) -> Gateway: ...

    def speculative(self, call: CallSession, profile: Profile) -> Gateway | None:
        """The adapter the call gets if it keeps ``profile``, to preconnect; None: nothing to open early."""
        ...


class FallbackTelephony(Protocol):
    """The Asterisk side of a fallback: transfer to a human, hang up, or back to the dialplan."""

    async def apply_fallback(self, call: CallSession, fallback: Fallback) -> None: ...


class CallRegistryHooks(Protocol):
    """The call registry (bridge/calls.py): told once the call's teardown is done."""

    def ended(self, call: CallSession) -> None: ...


class TaskWatcher(Protocol):
    """Logs and counts a crash of a task that must not fail (bridge/supervise.py)."""

    def watch(self, task: asyncio.Task[Any], name: str, on_crash: Callable[[BaseException], None]) -> Any: ...


class CallHooks(Protocol):
    """The profiles' on_call_start / on_call_end hooks (bridge/hooks.py)."""

    async def call_starting(self, profile: str, context: dict[str, Any], settings: CallSettings,
                            logger: Any = None) -> str | None: ...

    def call_ended(self, profile: str, ended: Any) -> None: ...


class _NoHooks:
    async def call_starting(self, profile: str, context: dict[str, Any], settings: CallSettings,
                            logger: Any = None) -> str | None:
        return None

    def call_ended(self, profile: str, ended: Any) -> None:
        return None


#: For services without hooks (a bridge wires bridge/hooks.py's CallHooks).
NO_HOOKS = _NoHooks()


class RecordingOpener(Protocol):
    """The recordings directory (bridge/recording.py): a recorder for a ``record: true`` call."""

    def open(self, call_id: str, rate: int, pad_frames: int = 0) -> Any: ...


class CallMetrics(Protocol):
    """The counters a call bumps (bridge/metrics.py)."""

    def call_refused(self) -> None: ...

    def tool_completed(self, outcome: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class CallServices:
    """Everything a call uses that outlives it."""

    config: Config
    clock: PlayoutClock
    events: EventPublisher
    tools: ToolRegistry
    gateways: GatewayFactory
    settings: SettingsResolver
    fallbacks: FallbackTelephony
    registry: CallRegistryHooks
    supervisor: TaskWatcher
    metrics: CallMetrics
    hooks: CallHooks = NO_HOOKS
    #: Set when a profile has ``record: true`` (bridge/recording.py's Recordings).
    recordings: RecordingOpener | None = None


class CallSession:  # implements tools.base.CallControl (structurally)
    def __init__(self, services: CallServices, call_uuid: str, leg: CallerLeg) -> None:
        self.services = services
        self.call_id = call_uuid
        self.leg = leg
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self.log = logging.LoggerAdapter(log, {"call": call_uuid})
        cfg = services.config
        self.profile_name = cfg.default_profile
        self.profile: Profile = cfg.profile(None)
        self.variables: dict[str, str] = {}
        self.metadata: dict[str, Any] = {}
        self.direction = "inbound"
        self._channel: ChannelInfo | None = None
        # Media state. The leg tells the caller's rate (AudioSocket learns it from the first audio
        # frame's kind, and says so through on_caller_rate).
        self.caller_rate = leg.rate
        self.playout = PlayoutBuffer(self.caller_rate, cfg.audiosocket.playout_max_seconds)
        self._up: Resampler | None = None
        self._down: Resampler | None = None
        #: The bridge's own speech detector (bridge/vad.py), only when the gateway asks for one.
        self._vad: Any = None
        #: After a local barge-in, until the caller stops speaking: the AI's audio still arriving
        #: is the rest of the answer the caller just cut off, and is dropped.
        self._floor_taken = False
        self.gateway: Gateway | None = None
        # The gateway connection opened while the settings are resolved (see _start_preconnect):
        # the adapter holding it until the call's own takes it over or it is closed, the task that
        # opens it (then closes it if it stays unused), set once the handshake is over either way,
        # and how it failed.
        self._spec: Gateway | None = None
        self._spec_task: asyncio.Task[None] | None = None
        self._spec_opened = asyncio.Event()
        self._spec_failure: GatewayError | None = None
        self._preconnect: collections.deque[bytes] = collections.deque()
        self._preconnect_bytes = 0
        self._first_frame = asyncio.Event()
        self._audio_arrived = asyncio.Event()
        self.router: ToolRouter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._fsm = CallStateMachine(call_uuid)
        self._handoff: str | None = None
        self.end_reason: str | None = None
        self.ended = asyncio.Event()
        self.transcript: list[dict[str, Any]] = []
        self.stats: collections.Counter[str] = collections.Counter()
        #: The call's recording (bridge/recording.py's CallRecorder) when its profile says ``record``.
        self.recorder: Any = None
        #: Where ``GET`` finds the recording (in ``call.ended`` and the call's info), once recording.
        self.recording_url: str | None = None
        #: Mid-call ``mute``: the caller's audio goes to the AI as silence (see :meth:`mute`).
        self.muted = False
        self._silence_frame = b""
        #: The tools this call may be given mid-call (the profile's offer when it started) and the
        #: snapshot that describes them; set once the gateway is being connected.
        self._offerable: list[str] = []
        self._tool_snapshot: ToolRegistry | None = None
        #: The silence watchdog (profile ``silence``) and, without a local VAD, its energy gate.
        self._silence: SilenceWatchdog | None = None
        self._gate: EnergyGate | None = None
        #: What the call's adapter can do mid-call, known as soon as it is built (before it connects).
        self._gateway_capabilities: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"<CallSession {self.call_id} {self._fsm.state.name}>"

    @property
    def state(self) -> CallState:
        """Where the call is in its life (bridge/state.py has the states and their transitions)."""
        return self._fsm.state

    # ------------------------------------------------------------------ CallControl

    @property
    def channel(self) -> ChannelInfo | None:
        return self._channel

    @property
    def playout_pending_ms(self) -> int:
        return self.playout.pending_ms

    async def wait_playout(self, max_wait: float) -> None:
        try:
            async with asyncio.timeout(max_wait):
                await self.playout.wait_drained()
        except TimeoutError:
            pass

    def context(self) -> dict[str, Any]:
        ch = self._channel
        return {
            "call_id": self.call_id,
            "profile": self.profile_name,
            "direction": self.direction,
            "caller": ch.caller_num if ch else self.variables.get("caller_id", ""),
            "caller_name": ch.caller_name if ch else "",
            "called": ch.exten if ch else self.variables.get("called", ""),
            "channel": ch.name if ch else None,
            "variables": dict(self.variables),
            "metadata": dict(self.metadata),
        }

    def end(self, reason: str, *, after_speech: bool = False, tail: float = SPEECH_TAIL_S) -> None:
        """End the call (idempotent).

        With ``after_speech``, first let the caller hear what is queued, then wait ``tail``
        seconds for more speech (the AI's goodbye after an ``end_call`` result); ``tail=0``
        when nothing more can come (the gateway hung up).
        """
        state = self._fsm.state
        if state in FINISHING or (after_speech and state is CallState.DRAINING):
            return
        # Never raises: it is called from protocol callbacks, the clock, done-callbacks and
        # tools, none of which can do anything useful with an exception from here.
        try:
            loop = asyncio.get_running_loop()  # before any coroutine is created: none is left unawaited
            if after_speech:
                self._fsm.to(CallState.DRAINING)
                self.spawn(self._end_after_speech(reason, tail), "end-after-speech")
                return
            self.end_reason = reason
            self._fsm.to(CallState.ENDING)
            self._finisher = loop.create_task(self._finish(), name=f"call-finish-{self.call_id}")
            # _finish does not raise by design; if it ever does, the supervisor logs it with its
            # traceback and counts it (never "Task exception was never retrieved"), and the call
            # is released anyway.
            self.services.supervisor.watch(self._finisher, "call-teardown", self._teardown_crashed)
        except InvalidTransition:
            raise  # only raised under tests (bridge/state.py): a bug to see, not to survive
        except Exception:
            self.log.exception("cannot schedule the end of the call (%s): releasing it at once", reason)
            self.end_reason = self.end_reason or reason
            self._release_now()

    # ------------------------------------------------------------------ life cycle

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Start a task the call owns: cancelled when the call ends."""
        task = asyncio.create_task(coro, name=f"{name}-{self.call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("call task %s failed: %r", task.get_name(), exc, exc_info=exc)
            self.end("internal-error")

    def start(self) -> None:
        """Called as the UUID arrives: silence starts flowing now (asterisk/asterisk#2089)."""
        self.services.clock.add(self)
        self.spawn(self._run(), "call")

    async def _run(self) -> None:
        services = self.services
        self._start_preconnect()
        settings = await services.settings.resolve_settings(self)
        if settings.refuse:
            self.log.warning("refused: %s", settings.refuse)
            services.metrics.call_refused()
            self.end("refused: " + settings.refuse)
            return
        self._apply_settings(settings)
        # The profile's on_call_start hook (if any) may change the profile, variables, metadata,
        # prompt…, or refuse the call; within its timeout, else the call goes on as it is.
        refusal: str | None = None
        if self.profile.hooks.on_call_start is not None:
            refusal = await services.hooks.call_starting(self.profile_name, self.context(), settings, self.log)
            self._apply_settings(settings)
        settled = time.monotonic()
        self._start_recording()
        self._publish("call.started", self.call_id, **self._summary())
        if self._fsm.state in FINISHING:
            return
        self._fsm.to(CallState.CONNECTING)
        if refusal is not None:
            self.log.warning("the on_call_start hook refused the call: %s", refusal)
            await self._use_preconnected(None)
            await self._fallback(f"refused by the on_call_start hook: {refusal}")
            return
        if not self._first_frame.is_set():
            try:
                async with asyncio.timeout(FIRST_FRAME_WAIT_S):
                    await self._first_frame.wait()
            except TimeoutError:
                self.log.debug("no caller audio yet: assuming %d Hz", self.caller_rate)
        profile = self.profile
        prompt, missing = profile.render_prompt({"call_id": self.call_id, **self.variables},
                                                template=settings.overrides.get("prompt"))
        if missing:
            self.log.warning("prompt placeholders without a value: %s", ", ".join(sorted(set(missing))))
        # The tools as they are now (a tool source's come and go): what the AI is offered is what
        # this call may run, whatever the sources do meanwhile.
        offered = services.tools.offered(profile.tools, profile.tool_sources)
        tools = services.tools.snapshot(offered + [a.tool for a in profile.dtmf.values()])
        setup = SessionSetup(
            provider=profile.provider,
            sample_rate=profile.sample_rate,
            system_prompt=prompt,
            voice=settings.overrides.get("voice", profile.voice),
            language=settings.overrides.get("language", profile.language),
            first_message=settings.overrides.get("first_message", profile.first_message),
            farewell_message=settings.overrides.get("farewell_message", profile.farewell_message),
            max_duration=profile.max_duration,
            tools=tools.specs(offered),
            caller_rate=self.caller_rate,
        )
        gateway = services.gateways(self)
        self._gateway_capabilities = gateway.capabilities
        # Where the caller is in the AI's audio (for adapters that must say where a barge-in cut it).
        gateway.playout_position = lambda: self.playout.consumed_s
        self._offerable, self._tool_snapshot = offered, tools
        self.router = ToolRouter(
            tools, self, gateway.send_tool_result,
            allowed=offered, local_allowed=[a.tool for a in profile.dtmf.values()],
            deadline=services.config.tool_deadline, max_concurrent=services.config.tool_concurrency,
            on_called=self._tool_called, on_completed=self._tool_completed,
        )
        try:
            await self._use_preconnected(gateway)
            await gateway.connect(setup)
        except GatewayError as exc:
            self.log.error("%s", exc)
            # A close that fails must not cost the caller the fallback.
            await self._guard_async("closing the gateway connection", gateway.close, timeout=3)
            await self._fallback(str(exc))
            return
        except asyncio.CancelledError:
            await gateway.close()
            raise
        except Exception as exc:  # an adapter's bug or a library's surprise: the caller still gets the fallback
            self.log.exception("gateway set-up failed unexpectedly")
            await self._guard_async("closing the gateway connection", gateway.close, timeout=3)
            await self._fallback(f"gateway set-up failed ({type(exc).__name__})")
            return
        self.gateway = gateway
        if self._fsm.state is CallState.CONNECTING:  # not if already ending (after speech, or at all)
            self._fsm.to(CallState.ACTIVE)
        # The set-up's timeline: settings (channel, Getvar, hook), then the gateway ready — with a
        # preconnected connection the latter is the opening messages only, not the handshake too.
        connected = time.monotonic()
        timeline = {"setup_ms": round((connected - self._t0) * 1000),
                    "settings_ms": round((settled - self._t0) * 1000),
                    "connect_ms": round((connected - settled) * 1000),
                    "preconnect_used": int(gateway.used_preconnect)}
        for key, value in timeline.items():
            self.stats[key] = value
        self._publish("call.answered", self.call_id, profile=self.profile_name, **timeline)
        self._init_uplink()
        # Held at the caller's rate while connecting: resample now, through the call's own
        # (stateful) resampler, so the first words reach the AI at the right pitch.
        held, self._preconnect, self._preconnect_bytes = list(self._preconnect), collections.deque(), 0
        if held:
            up = self._up
            gateway.send_held_audio([up.process(pcm) for pcm in held] if up is not None else held)
            self.stats["preconnect_frames"] += len(held)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(profile.max_duration + MAX_DURATION_GRACE_S, self._max_duration)
        if profile.silence is not None:
            self._silence = SilenceWatchdog(profile.silence.timeout_s, profile.silence.hangup_after_s,
                                            time.monotonic())
            self._init_gate()
            self.spawn(self._watch_silence(), "silence-watchdog")
        await self._downlink(gateway)

    # ------------------------------------------------------------------ preconnect

    def _start_preconnect(self) -> None:
        """Open the gateway connection now, while the settings are resolved (under load the AMI
        channel arrives seconds late, and a hook answers over HTTP): for the gateway of the profile
        the call has if they change nothing — the API request's or the ingress's if already known,
        else the default. Only the handshake: nothing of the call is sent before its settings are
        known (:meth:`_use_preconnected` decides then). A call refused before it has a session (at
        capacity: bridge/app.py) never gets here; one refused by its settings closes it unused."""
        services, cfg = self.services, self.services.config
        name = services.settings.expected_profile(self.call_id)
        profile = cfg.profiles[name] if name is not None and name in cfg.profiles else self.profile
        try:
            spec = services.gateways.speculative(self, profile)
        except Exception as exc:  # noqa: BLE001 - e.g. a credential gone: the ordinary connect will say so
            self.log.debug("no preconnect: %s", exc)
            return
        if spec is None or spec.endpoint is None:
            return
        self._spec = spec
        self._spec_task = self.spawn(self._open_early(spec), "gateway-preconnect")

    def _preconnect_idle_s(self) -> float:
        """How long a preconnected connection may wait for its call's settings (see PRECONNECT_IDLE_MARGIN_S)."""
        cfg = self.services.config
        channel_wait = cfg.ami.channel_wait if cfg.ami.enabled else 0.0
        hook = max((p.hooks.on_call_start.timeout for p in cfg.profiles.values()
                    if p.hooks.on_call_start is not None), default=0.0)
        return channel_wait + hook + PRECONNECT_IDLE_MARGIN_S

    async def _open_early(self, spec: Gateway) -> None:
        """The call-owned task that opens ``spec``'s connection, then closes it if the call has not
        taken it within :meth:`_preconnect_idle_s` (cancelled when it does, or when the call ends;
        the teardown closes what is left). A failure is not the call's: it connects normally later."""
        started = time.monotonic()
        try:
            await spec.preconnect()
        except GatewayError as exc:
            self._spec_failure = exc
            self.log.debug("preconnect failed (the call will connect normally): %s", exc)
            return
        except Exception as exc:  # an adapter's surprise: the ordinary connect decides
            self._spec_failure = GatewayError(f"gateway preconnect failed ({type(exc).__name__})")
            self.log.debug("preconnect failed unexpectedly (the call will connect normally)", exc_info=True)
            return
        finally:
            self._spec_opened.set()
        self.log.debug("gateway preconnected in %.0f ms", (time.monotonic() - started) * 1000)
        idle = self._preconnect_idle_s()
        await asyncio.sleep(idle)
        if self._spec is spec:
            self.log.debug("preconnected gateway connection unused after %.1f s: closing it", idle)
            await spec.close()

    async def _use_preconnected(self, gateway: Gateway | None) -> None:
        """The settings are known: hand the preconnected connection to the call's ``gateway`` if it
        leads to the same endpoint (waiting for its handshake if still under way: it is the one the
        call would open now), else close it, cleanly, having carried nothing, beside the call's own
        connect (which does not wait for that closing handshake). ``None``: the call will not
        connect (refused). A handshake the call waited for that failed is the call's
        connect failing, at the same moment an ordinary connect would have (GatewayError); one that
        failed earlier, while the settings were resolved, is only logged: connect() tries afresh."""
        spec, task = self._spec, self._spec_task
        if spec is None or task is None:
            return
        self._spec = None  # from here this method closes it, whatever happens
        try:
            if gateway is not None and gateway.endpoint is not None and gateway.endpoint == spec.endpoint:
                waited = not self._spec_opened.is_set()
                await self._spec_opened.wait()  # bounded: the handshake's own connect_timeout
                if self._spec_failure is not None:
                    if waited:
                        raise self._spec_failure
                elif not gateway.take_preconnected(spec):
                    self.log.debug("preconnected gateway connection no longer usable: connecting afresh")
            elif gateway is not None:
                self.log.debug("the call's gateway is not the one preconnected: closing that connection")
            await cancel_and_wait(task)  # _open_early catches its own failures
        except BaseException:  # the call is failing or being torn down: close it before going on
            await cancel_and_wait(task)
            await self._guard_async("closing the preconnected gateway connection", spec.close, timeout=3)
            raise
        # Closed beside the call's own connect, not before it: a closing handshake is a round trip,
        # and up to CLOSE_TIMEOUT_S with a service slow to answer it. A call that ends meanwhile
        # cancels it with its other tasks, which drops the socket (ws._close_quietly).
        self.spawn(self._guard_async("closing the preconnected gateway connection", spec.close, timeout=3),
                   "preconnect-close")

    def _start_recording(self) -> None:
        """Record the call if its profile says so. The clock has been ticking since the UUID
        arrived: those ticks become silence at the start, so the recording is as long as the call."""
        recordings = self.services.recordings
        if not self.profile.record or recordings is None or self.recorder is not None:
            return
        ticks = self.stats["frames_out"] + self.stats["frames_out_dropped"]
        self.recorder = recordings.open(self.call_id, self.caller_rate, ticks)
        if self.recorder is not None:
            self.recording_url = f"/v1/calls/{self.call_id}/recording"

    def _apply_settings(self, s: CallSettings) -> None:
        cfg = self.services.config
        name = s.profile or cfg.default_profile
        if name not in cfg.profiles:
            self.log.warning("profile %r does not exist; using %r", name, cfg.default_profile)
            name = cfg.default_profile
        self.profile_name = name
        self.profile = cfg.profiles[name]
        self.variables = dict(s.variables)
        self.metadata = dict(s.metadata)
        self.direction = s.direction
        if s.channel is not None:
            self._channel = s.channel
            self.variables.setdefault("caller_id", s.channel.caller_num)
            self.variables.setdefault("caller_name", s.channel.caller_name)

    def _publish(self, type: str, call_id: str, **data: Any) -> Any:
        """Publish a call event; every event echoes the call's metadata (from the API request)."""
        data.setdefault("metadata", dict(self.metadata))
        return self.services.events.publish(type, call_id, **data)

    def _summary(self) -> dict[str, Any]:
        ctx = self.context()
        ctx.pop("call_id")
        return ctx

    # ------------------------------------------------------------------ media

    def on_caller_audio(self, pcm: bytes) -> None:
        """A frame from the caller, at :attr:`caller_rate` (called from the leg, e.g. data_received)."""
        self.stats["frames_in"] += 1
        # end_reason is set exactly as the call moves to ENDING: one load per frame, not a set lookup.
        if self.end_reason is not None:
            return
        rec = self.recorder
        if rec is not None:
            rec.caller(pcm)  # what the caller said, muted or not
        muted = self.muted
        if muted:  # the AI hears silence in its place (see mute), held audio included
            pcm = self._silent(len(pcm))
        gw = self.gateway
        if gw is None:
            self._hold_preconnect(pcm)
            return
        if muted:
            if self._silence is not None:
                self._silence.caller_active(time.monotonic())  # the operator has the floor: no check-in
        elif (gate := self._gate) is not None and (edge := gate.feed(pcm)) is not None:
            self._caller_speech(edge == "start")
        vad = self._vad
        if vad is not None and (what := vad.feed_chunk(pcm)) is not None:
            self._on_local_speech(what)
        up = self._up
        gw.send_audio(up.process(pcm) if up is not None else pcm)

    def _hold_preconnect(self, pcm: bytes) -> None:
        """Hold a caller frame until the gateway is connected (resampled then): PRECONNECT_HOLD_S at most."""
        held = self._preconnect
        held.append(pcm)
        self._preconnect_bytes += len(pcm)
        cap = int(PRECONNECT_HOLD_S * self.caller_rate) * 2
        while self._preconnect_bytes > cap:
            self._preconnect_bytes -= len(held.popleft())
            self.stats["preconnect_dropped"] += 1
        self._first_frame.set()

    def on_caller_rate(self, rate: int) -> None:
        """The leg's rate changed (before the first frame at the new rate)."""
        self.log.info("caller audio at %d Hz", rate)
        self.caller_rate = rate
        self.playout = PlayoutBuffer(rate, self.services.config.audiosocket.playout_max_seconds)
        self._preconnect.clear()
        if self.recorder is not None:
            self.recorder.rate_changed(rate)
        self._preconnect_bytes = 0
        if self.gateway is not None:
            self._init_uplink()

    def _init_uplink(self) -> None:
        gw = self.gateway
        assert gw is not None
        if self._floor_taken:  # a new detector will not report the end of the old one's speech
            self._floor_taken = False
            gw.caller_speech_stopped()
        rate, out_rate, caller = gw.sample_rate, gw.output_rate or gw.sample_rate, self.caller_rate
        self._up = None if rate == caller else Resampler(caller, rate)
        self._down = None if out_rate == caller else Resampler(out_rate, caller)
        # Only calls whose AI service cannot hear the caller interrupt pay for a detector.
        if gw.local_vad is not None:
            from .vad import make_detector

            try:
                self._vad = make_detector(gw.local_vad, caller)
            except Exception as exc:  # noqa: BLE001 - checked at start-up; if it fails anyway, talk on
                self.log.error("local VAD unavailable, no barge-in on this call: %s", exc)
                self._vad = None
        self._init_gate()

    def _init_gate(self) -> None:
        """The silence watchdog hears the caller through the local VAD when the call runs one, else
        through a cheap energy gate on the same frames."""
        cfg = self.profile.silence
        self._gate = None
        if cfg is not None and self._silence is not None and self._vad is None:
            self._gate = EnergyGate(cfg.energy_threshold_dbfs)

    def _caller_speech(self, started: bool) -> None:
        if self._silence is not None:
            self._silence.caller_speech(time.monotonic(), started)

    def _on_local_speech(self, what: str) -> None:
        """The bridge's detector heard the caller start or stop speaking."""
        self._caller_speech(what == "start")
        gw = self.gateway
        if what == "start":
            heard_s = self.playout.consumed_s  # before the clear counts the dropped audio as passed
            if not self.playout.empty:
                self._barge_in("local")
                # A service without barge-in of its own keeps streaming the answer it was giving:
                # what still arrives while the caller speaks is stale (the next answer comes after).
                self._floor_taken = True
            if gw is not None:
                gw.caller_speech_started(heard_s)
        else:
            self._floor_taken = False
            if gw is not None:
                gw.caller_speech_stopped()

    def _barge_in(self, source: str) -> None:
        """The caller spoke over the AI: what is queued for them is dropped now (the next tick is silence)."""
        dropped = self.playout.clear()
        if self._down is not None:
            self._down.reset()
        self.stats["barge_ins"] += 1
        self.log.debug("barge-in (%s): dropped %d queued frames", source, dropped)
        self._publish("barge_in", self.call_id, source=source, dropped_ms=dropped * 20)

    def on_tick(self) -> None:
        """The clock's 20 ms tick: exactly one frame to the caller."""
        frame = self.playout.pop()
        rec = self.recorder
        if rec is not None:
            rec.tick(frame)
        if self.leg.send_frame(frame):
            self.stats["frames_out"] += 1
        else:
            self.stats["frames_out_dropped"] += 1

    def on_tick_failed(self, exc: BaseException) -> None:
        """The clock dropped this call because ``on_tick`` raised (it logged the traceback).

        Without frames the caller would sit in dead air until they gave up: end the call, so
        the caller gets 0x00 and the dialplan continues (to a human, typically).
        """
        self.stats["playout_failures"] += 1
        self.log.error("playout failed (%r): ending the call", exc)
        self.end("internal-error")

    async def _downlink(self, gateway: Gateway) -> None:
        # The gateway calls _on_gateway_event for each event as it arrives (a WebSocket adapter:
        # straight from its connection's read callback), and paces a flood itself
        # (bridge/gateway/base.py, DOWNLINK_SLICE_S).
        if gateway.takes_audio_handler:
            await gateway.deliver(self._on_gateway_event, self._on_ai_audio)
        else:  # an adapter with deliver(handle) of its own (GatewayFactory.override)
            await gateway.deliver(self._on_gateway_event)

    def _on_ai_audio(self, pcm: bytes) -> None:
        """The AI's speech, at the gateway's output rate: queued for the caller (50 times a second
        while the AI speaks; a gateway may call this instead of handing an :class:`AudioOut`)."""
        if self._floor_taken:
            self.stats["stale_audio_dropped"] += 1
            return
        down = self._down
        playout = self.playout
        playout.push(down.process(pcm) if down is not None else pcm)
        self._audio_arrived.set()
        if self._silence is not None:  # the caller is listening until this has played
            self._silence.ai_speaking_until(time.monotonic() + playout.pending_ms / 1000)

    def _on_gateway_event(self, event: Any) -> Awaitable[None] | None:
        """One gateway event, handled now; an awaitable when the rest must wait for it (fallback)."""
        if type(event) is AudioOut:  # 50 times a second while the AI speaks: first, and no isinstance
            self._on_ai_audio(event.pcm)
        elif isinstance(event, ClearPlayback):
            self._barge_in("gateway")
        elif isinstance(event, ToolCall):
            assert self.router is not None
            self.router.dispatch(event.call_id, event.name, event.args, problem=event.problem)
        elif isinstance(event, Transcript):
            if event.final:
                item = {"role": event.role, "text": event.text, "t": round(time.monotonic() - self._t0, 3)}
                self.transcript.append(item)
                self._publish("transcript", self.call_id, **item)
        elif isinstance(event, ResponseDone):
            self.stats["responses"] += 1
        elif isinstance(event, RemoteHangup):
            self.log.info("gateway hung up")
            self.end("gateway-hangup", after_speech=True, tail=0)
        elif isinstance(event, RemoteError):
            return self._on_gateway_error(event.message)
        elif isinstance(event, Closed):
            state = self._fsm.state
            if state not in FINISHING and state is not CallState.DRAINING:
                if event.clean:
                    self.end("gateway-closed", after_speech=True, tail=0)
                else:
                    self.log.error("gateway connection lost (code %s: %s)", event.code, event.reason or "-")
                    return self._fallback(f"gateway connection lost ({event.code})")
        return None

    async def _on_gateway_error(self, message: str) -> None:
        if message in NORMAL_END_ERRORS:
            self.log.info("gateway ended the call: %s", message)
            self.end("max-duration", after_speech=True, tail=0)
            return
        self.log.error("gateway error: %s", message)
        self._publish("call.failed", self.call_id, reason="gateway-error", message=message)
        await self._fallback(f"gateway error: {message}")

    async def _fallback(self, why: str) -> None:
        """The gateway failed: never leave the caller in dead air."""
        if self._fsm.state in FINISHING:
            return
        self._fsm.to(CallState.FALLING_BACK)
        fb = self.profile.fallback
        self.log.warning("fallback (%s) because %s", fb.action, why)
        if self.gateway is not None:
            # No more AI audio: what the failed gateway queued is dropped for the message.
            self.playout.clear()
        if fb.message_wav is not None:
            try:
                self.playout.push(_load_wav(fb.message_wav, self.caller_rate))
                await self.wait_playout(30.0)
            except (OSError, ValueError, wave.Error) as exc:
                self.log.error("fallback message %s cannot be played: %s", fb.message_wav, exc)
        await self.services.fallbacks.apply_fallback(self, fb)
        self.end("fallback:" + why)

    async def _end_after_speech(self, reason: str, tail: float) -> None:
        """Wait for the AI to finish what it is saying (queue drained, no new speech), capped."""
        try:
            async with asyncio.timeout(SPEECH_WAIT_MAX_S):
                while True:
                    await self.playout.wait_drained()
                    if tail <= 0:
                        break
                    self._audio_arrived.clear()
                    try:
                        async with asyncio.timeout(tail):
                            await self._audio_arrived.wait()
                    except TimeoutError:
                        break
        except TimeoutError:
            self.log.info("ending mid-speech: the AI was still talking after %.0f s", SPEECH_WAIT_MAX_S)
        self.end(reason)  # DRAINING (or FALLING_BACK since) → ENDING; nothing if already ending

    def _max_duration(self) -> None:
        self.log.warning("max duration %d s (+%.0f s grace) reached; the bridge ends the call",
                         self.profile.max_duration, MAX_DURATION_GRACE_S)
        self.end("max-duration")

    def on_dtmf(self, digit: str) -> None:
        self._publish("dtmf", self.call_id, digit=digit)
        action = self.profile.dtmf.get(digit)
        if action is None or self.router is None:
            self.log.info("DTMF %s (no shortcut)", digit)
            return
        self.log.info("DTMF %s → tool %s", digit, action.tool)
        self.router.run_local(action.tool, dict(action.args))

    def note_handoff(self, reason: str | None) -> None:
        self._handoff = reason

    def on_caller_gone(self, why: str) -> None:
        """The caller's leg is gone (caller hung up, redirect, or protocol error)."""
        self.end(self._handoff if self._handoff and why == "caller-hangup" else why)

    # ------------------------------------------------------------------ tools → events

    def _tool_called(self, o: ToolOutcome) -> None:
        self._publish("tool.called", self.call_id, tool=o.name, tool_call_id=o.call_id,
                                   args=o.args, origin=o.origin)

    def _tool_completed(self, o: ToolOutcome) -> None:
        self.services.metrics.tool_completed(o.outcome, o.duration_ms / 1000)
        self._publish("tool.completed", self.call_id, tool=o.name, tool_call_id=o.call_id,
                                   outcome=o.outcome, result=o.result, duration_ms=round(o.duration_ms, 1),
                                   origin=o.origin)

    # ------------------------------------------------------------------ teardown

    async def _finish(self) -> None:
        """Tear the call down: every step runs whatever the others did.

        A step that raises (a gateway adapter's ``hangup``, the router, the connection…) is
        logged with its traceback and the rest still runs. Whatever happens, the call is
        deregistered (it stops counting against ``audiosocket.max_calls``), ``call.ended`` is
        published and :attr:`ended` is set: a session stuck half-torn-down would hold a call
        slot and anyone waiting on it (shutdown, the API) for the life of the process.
        """
        reason = self.end_reason or "internal-error"
        try:
            await self._teardown(reason)
        finally:
            # The leg's hangup (AudioSocket: 0x00) ends the AudioSocket() app cleanly and the dialplan
            # continues at the next priority; if even that fails, the leg is dropped (Asterisk continues too).
            if not self._guard("sending the caller the hangup frame", self.leg.hangup):
                self._guard("closing the caller's connection", self.leg.abort)
            duration = time.monotonic() - self._t0
            self._guard("deregistering the call", self.services.registry.ended, self)
            self._guard("publishing call.ended", self._publish_ended, reason, duration)
            self._mark_ended()
            self.log.info("call ended: %s after %.1f s (in %d / out %d frames)", reason, duration,
                          self.stats["frames_in"], self.stats["frames_out"])

    async def _teardown(self, reason: str) -> None:
        self.log.info("call ending: %s", reason)
        self._guard("removing the call from the playout clock", self.services.clock.remove, self)
        if self._timer is not None:
            self._timer.cancel()
        me = asyncio.current_task()
        gateway_alive = self.gateway is not None and not reason.startswith(("gateway", "fallback"))
        if self.router is not None:
            # Ended by a handoff a tool started (transfer, AMI hangup): give that tool a moment
            # to report what Asterisk answered, rather than "the call has ended".
            handed_off = self._handoff is not None and reason == self._handoff
            router = self.router
            await self._guard_async("closing the tool router", lambda: router.aclose(
                answer_pending=gateway_alive, grace=HANDOFF_GRACE_S if handed_off else 0.0))
        owned = [t for t in self._tasks if t is not me]
        for t in owned:
            t.cancel()
        if owned:
            await asyncio.gather(*owned, return_exceptions=True)
        if self._spec is not None:  # ended while its settings were resolved: the early connection goes too
            spec, self._spec = self._spec, None
            await self._guard_async("closing the preconnected gateway connection", spec.close, timeout=3)
        if self.gateway is not None:
            gateway = self.gateway
            closed = False
            if gateway_alive:
                closed = await self._guard_async("hanging up the gateway", gateway.hangup, timeout=3)
            if not closed:  # not alive, or the hangup failed: at least release the connection
                await self._guard_async("closing the gateway connection", gateway.close, timeout=3)

    def _guard(self, step: str, fn: Any, *args: Any) -> bool:
        """Run one synchronous teardown step; log (with traceback) rather than raise. True if it ran."""
        try:
            fn(*args)
            return True
        except Exception:
            self.log.exception("teardown: %s failed", step)
            self.stats["teardown_errors"] += 1
            return False

    async def _guard_async(self, step: str, fn: Any, timeout: float | None = None) -> bool:
        """Await ``fn()`` (within ``timeout``); log rather than raise. True if it completed."""
        try:
            async with asyncio.timeout(timeout):
                await fn()
            return True
        except TimeoutError:
            self.log.warning("teardown: %s did not finish within %g s", step, timeout)
        except Exception:
            self.log.exception("teardown: %s failed", step)
            self.stats["teardown_errors"] += 1
        return False

    def _publish_ended(self, reason: str, duration: float) -> None:
        gateway_stats: dict[str, int] = {}
        if self.gateway is not None:
            self._guard("reading the gateway's counters", lambda: gateway_stats.update(self.gateway.stats))
        recording: dict[str, Any] = {}
        if self.recorder is not None:
            # The file is completed on the recordings' thread; GET .../recording waits for it.
            self._guard("finishing the recording", self.recorder.close, round(duration, 3))
            recording["recording"] = self.recording_url
        ended = self._publish(
            "call.ended", self.call_id, reason=reason, duration_s=round(duration, 3), **recording,
            transcript=list(self.transcript),
            tools=[{"tool": o.name, "outcome": o.outcome, "duration_ms": round(o.duration_ms, 1)}
                   for o in (self.router.outcomes if self.router else [])],
            metadata=dict(self.metadata), profile=self.profile_name,
            stats={**self.stats, **gateway_stats},
        )
        # In the background: the outcome goes to the profile's on_call_end hook, retried like a
        # webhook, without holding up the teardown.
        self._guard("starting the on_call_end hook", self.services.hooks.call_ended, self.profile_name, ended)

    def _teardown_crashed(self, exc: BaseException) -> None:
        if not self.ended.is_set():
            self._release_now()

    def _release_now(self) -> None:
        """Last resort, synchronous: stop the frames, drop the caller, free the slot, complete the
        recording (else its file stays open and counted as being written), signal the end."""
        self._guard("removing the call from the playout clock", self.services.clock.remove, self)
        if self.recorder is not None:  # idempotent: nothing if call.ended already closed it
            self._guard("finishing the recording", self.recorder.close, round(time.monotonic() - self._t0, 3))
        self._guard("closing the caller's connection", self.leg.abort)
        self._guard("deregistering the call", self.services.registry.ended, self)
        self._mark_ended()

    def _mark_ended(self) -> None:
        if self._fsm.state is not CallState.ENDED:
            if self._fsm.state is not CallState.ENDING:  # released without a scheduled teardown
                self._fsm.to(CallState.ENDING)
            self._fsm.to(CallState.ENDED)
        self.ended.set()

    def info(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "state": self._api_state(),
            "started_at": self.started_at,
            "duration_s": round(time.monotonic() - self._t0, 3),
            **self._summary(),
            "caller_rate": self.caller_rate,
            "gateway_rate": self.gateway.sample_rate if self.gateway is not None else self.profile.sample_rate,
            "transcript": list(self.transcript),
            "end_reason": self.end_reason,
            "recording": self.recording_url,
            # Media health: frames each way, what could not be sent, the playout queue.
            "media": {"frames_in": self.stats["frames_in"], "frames_out": self.stats["frames_out"],
                      "frames_out_dropped": self.stats["frames_out_dropped"],
                      "barge_ins": self.stats["barge_ins"], "playout_pending_ms": self.playout.pending_ms,
                      # What the leg itself counts: an RTP leg's packets late, lost, reordered,
                      # concealed, from a wrong source (bridge/rtp.py); AudioSocket's TCP has none.
                      "leg": leg_stats() if (leg_stats := getattr(getattr(self.leg, "stats", None), "as_dict",
                                                                  None)) is not None else None},
            "capabilities": self.capabilities,
            "muted": self.muted,
        }

    # ------------------------------------------------------------------ mid-call commands
    # Each is carried out by the call's own gateway adapter (context, say, tools: what its protocol
    # can do, bridge/gateway/base.py) or by the session itself (mute, tag), and published as an
    # event. CommandUnsupported: the protocol cannot; CommandUnavailable: not on this call now.

    @property
    def capabilities(self) -> list[str]:
        """The mid-call commands this call supports (the API's ``capabilities``): the bridge's own,
        and its AI backend's once the adapter is chosen (while it connects, those answer 409)."""
        own = self._gateway_capabilities
        return [c for c in COMMANDS if c in BRIDGE_COMMANDS or c in own]

    def _live_gateway(self, command: str) -> Gateway:
        """The call's gateway if ``command`` can reach a live AI now: only while ACTIVE. While
        FALLING_BACK the gateway object may still be set but its connection has failed, so a
        command there would be accepted and do nothing; every other state says which it is."""
        gw, state = self.gateway, self._fsm.state
        if state in FINISHING or state is CallState.DRAINING:
            raise CommandUnavailable(f"call {self.call_id} is ending (state {state.value}): "
                                     f"'{command}' is no longer possible")
        if state is CallState.FALLING_BACK:
            raise CommandUnavailable(f"call {self.call_id} is falling back (state {state.value}): its AI "
                                     f"backend failed, so '{command}' is no longer possible")
        if gw is None or state is not CallState.ACTIVE:
            raise CommandUnavailable(f"call {self.call_id} is still connecting to its AI backend "
                                     f"(state {state.value}): '{command}' is possible once it has answered")
        if command not in gw.capabilities:
            raise CommandUnsupported(gw.protocol_name, command)
        return gw

    def add_context(self, text: str, origin: str = "api") -> None:
        """Add instructions or facts to the live conversation ("this caller is a VIP")."""
        self._live_gateway("context").add_context(text)
        self._publish("call.context", self.call_id, text=text, origin=origin)

    def say(self, text: str, origin: str = "api") -> None:
        """Make the AI say ``text`` now."""
        self._live_gateway("say").say(text)
        self._publish("call.say", self.call_id, text=text, origin=origin)

    def set_tools(self, names: list[str], origin: str = "api") -> list[str]:
        """Replace the tools the AI may call with ``names`` (a subset of what the profile offered
        this call). Raises ValueError naming unknown tools. DTMF shortcuts keep their tools (the
        router allows them separately: the AI cannot call them unless it was offered them)."""
        gw = self._live_gateway("tools")
        unknown = [n for n in names if n not in self._offerable]
        if unknown:
            offered = ", ".join(self._offerable) or "none"
            raise ValueError(f"unknown tools for this call: {', '.join(unknown)} "
                             f"(profile {self.profile_name} offers: {offered})")
        chosen = list(dict.fromkeys(names))
        assert self._tool_snapshot is not None and self.router is not None
        gw.set_tools(self._tool_snapshot.specs(chosen))
        self.router.set_allowed(chosen)
        self._publish("call.tools", self.call_id, tools=chosen, origin=origin)
        return chosen

    def mute(self, origin: str = "api") -> bool:
        """Stop sending the caller's audio to the AI: it gets silence instead, frame for frame.

        Silence rather than nothing: every protocol here streams caller audio in real time and the
        services detect turns on that stream (server VAD closes the caller's turn on silence; with
        no audio a half-spoken utterance would hang open), aivoco sends ``has_audio`` per frame, and
        a stall can look like a dead uplink. The local VAD hears the same silence, so a muted
        caller does not barge in on the AI. Returns False if it already was muted."""
        if self._fsm.state in FINISHING:
            raise CommandUnavailable(f"call {self.call_id} is ending: 'mute' is no longer possible")
        changed = not self.muted
        self.muted = True
        if changed:
            self._publish("call.muted", self.call_id, origin=origin)
        return changed

    def unmute(self, origin: str = "api") -> bool:
        """Resume sending the caller's audio to the AI. Returns False if it was not muted."""
        if self._fsm.state in FINISHING:
            raise CommandUnavailable(f"call {self.call_id} is ending: 'unmute' is no longer possible")
        changed = self.muted
        self.muted = False
        if changed:
            self._publish("call.unmuted", self.call_id, origin=origin)
        return changed

    def add_tags(self, tags: dict[str, str], origin: str = "api") -> dict[str, Any]:
        """Merge ``tags`` into the call's metadata, which every later event of the call carries
        (and the history keeps). Raises ValueError if the metadata would grow too large."""
        if self._fsm.state in FINISHING:
            raise CommandUnavailable(f"call {self.call_id} is ending: 'tag' is no longer possible")
        merged = {**self.metadata, **tags}
        size = len(json.dumps(merged, default=str))
        if size > MAX_TAGGED_METADATA_BYTES:
            raise ValueError(f"the call's metadata would be {size} bytes with these tags, over the limit of "
                             f"{MAX_TAGGED_METADATA_BYTES}")
        self.metadata = merged
        self._publish("call.tagged", self.call_id, tags=dict(tags), origin=origin)
        return dict(merged)

    def _silent(self, nbytes: int) -> bytes:
        if len(self._silence_frame) != nbytes:
            self._silence_frame = bytes(nbytes)
        return self._silence_frame

    # ------------------------------------------------------------------ silence watchdog

    async def _watch_silence(self) -> None:
        """Check in with a silent caller, then end the call if they stay silent (profile ``silence``)."""
        wd, cfg = self._silence, self.profile.silence
        assert wd is not None and cfg is not None
        while not wd.done:
            await asyncio.sleep(wd.wait_s(time.monotonic()) + 0.02)
            if self._fsm.state is not CallState.ACTIVE:
                return
            now = time.monotonic()
            if not self.playout.empty:  # the AI is still being heard
                wd.ai_speaking_until(now + self.playout.pending_ms / 1000)
            silent = wd.silent_s(now)
            decision = wd.poll(now)
            if decision == "detected":
                self._silence_check_in(silent)
            elif decision == "hangup":
                self.log.info("caller silent for %.1f s after the check-in: ending the call", silent)
                self._publish("silence.hangup", self.call_id, silent_s=round(silent, 2))
                self.end("silence-timeout", after_speech=True, tail=0)

    def _silence_check_in(self, silent: float) -> None:
        cfg = self.profile.silence
        assert cfg is not None and self._silence is not None
        self.log.info("caller silent for %.1f s: %s", silent, cfg.action)
        self._publish("silence.detected", self.call_id, silent_s=round(silent, 2), action=cfg.action,
                      hangup_after_s=cfg.hangup_after_s)
        if cfg.action == "prompt":
            try:
                self._live_gateway("say").say(cfg.prompt_text)
            except (CommandUnsupported, CommandUnavailable) as exc:  # config.py refuses this for real gateways
                self.log.error("silence check-in not possible: %s", exc)
            return
        assert cfg.wav is not None
        try:
            self.playout.push(_load_wav(cfg.wav, self.caller_rate))
        except (OSError, ValueError, wave.Error) as exc:
            self.log.error("silence check-in %s cannot be played: %s", cfg.wav, exc)
            return
        self._silence.ai_speaking_until(time.monotonic() + self.playout.pending_ms / 1000)

    def _api_state(self) -> str:
        """The API's word for the state (connecting / active / ending / ended).

        Draining and falling back are still "active" once the gateway answered, "connecting" before.
        """
        state = self._fsm.state
        if state is CallState.ENDED:
            return "ended"
        if state is CallState.ENDING:
            return "ending"
        if state is CallState.ACTIVE:
            return "active"
        if state in (CallState.RESOLVING, CallState.CONNECTING):
            return "connecting"
        return "active" if self.gateway is not None else "connecting"


def _load_wav(path: Any, rate: int) -> bytes:
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError("must be mono 16-bit PCM")
        pcm = w.readframes(w.getnframes())
        src = w.getframerate()
    return pcm if src == rate else Resampler(src, rate).process(pcm)

