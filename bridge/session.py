"""One call: the single owner of everything about it.

A :class:`CallSession` is created when an AudioSocket connection delivers its UUID and owns,
until the call ends: the connection, the gateway session, the playout buffer (registered on
the process-wide clock), both resamplers, the tool router and its tasks, and the timers.
Every way a call ends — caller hangs up, gateway hangs up, AI ends it, error, fallback,
max duration, shutdown — goes through :meth:`CallSession.end`, which tears all of it down
once, in order, and publishes ``call.ended``. Nothing outlives its call; tests check.

Media path (per 20 ms, per call):
  caller → ``on_caller_audio`` → resample → ``Gateway.send_audio`` (queued, non-blocking)
  gateway → ``AudioOut`` → resample → :class:`PlayoutBuffer` → clock tick → ``on_tick`` → caller
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import wave
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tools.base import CallControl, ChannelInfo
from tools.router import ToolOutcome, ToolRouter

from .config import Profile
from .gateway.base import (
    AudioOut,
    ClearPlayback,
    Closed,
    Gateway,
    GatewayError,
    RemoteError,
    RemoteHangup,
    SessionSetup,
    ToolCall,
    Transcript,
)
from .playout import PlayoutBuffer
from .resample import Resampler

if TYPE_CHECKING:
    from .app import Bridge
    from .server import AudioSocketConnection

log = logging.getLogger("voxbridge.call")

#: Grace beyond the profile's max_duration before the bridge ends a call the gateway did not.
MAX_DURATION_GRACE_S = 10.0
#: Caller audio held while the gateway connection is being opened (bounded, oldest dropped).
PRECONNECT_FRAMES = 100
#: "After the current sentence": wait for the queue to drain, then this long for more speech.
SPEECH_TAIL_S = 0.8
SPEECH_WAIT_MAX_S = 10.0
#: How long tools still running may take to answer after the call was handed to Asterisk.
HANDOFF_GRACE_S = 2.0
#: Longest the downlink handles gateway messages without giving the event loop a turn.
DOWNLINK_SLICE_S = 0.004
#: Gateway error messages that mean "the call is over" rather than "the gateway failed".
NORMAL_END_ERRORS = frozenset({"max_duration_reached"})


@dataclass
class CallSettings:
    """Per-call choices, from (in order) the API request, the dialplan, the defaults."""

    profile: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # prompt, first_message, voice, …
    channel: ChannelInfo | None = None
    direction: str = "inbound"
    refuse: str | None = None  # set to refuse the call (unknown UUID under a strict policy)


class CallSession(CallControl):
    def __init__(self, bridge: Bridge, call_uuid: str, conn: AudioSocketConnection) -> None:
        self.bridge = bridge
        self.call_id = call_uuid
        self.conn = conn
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self.log = logging.LoggerAdapter(log, {"call": call_uuid})
        cfg = bridge.config
        self.profile_name = cfg.default_profile
        self.profile: Profile = cfg.profile(None)
        self.variables: dict[str, str] = {}
        self.metadata: dict[str, Any] = {}
        self.direction = "inbound"
        self._channel: ChannelInfo | None = None
        # Media state. The caller's rate is learnt from the first audio frame's kind; until then
        # silence goes out at 8 kHz (what the AudioSocket() app always uses).
        self.caller_rate = 8000
        self.playout = PlayoutBuffer(8000, cfg.audiosocket.playout_max_seconds)
        self._header = conn.header_for(8000)
        self._up: Resampler | None = None
        self._down: Resampler | None = None
        self.gateway: Gateway | None = None
        self._preconnect: collections.deque[bytes] = collections.deque(maxlen=PRECONNECT_FRAMES)
        self._audio_arrived = asyncio.Event()
        self.router: ToolRouter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._ending_after_speech = False
        self._handoff: str | None = None
        self.end_reason: str | None = None
        self.ended = asyncio.Event()
        self.transcript: list[dict[str, Any]] = []
        self.stats = collections.Counter()
        self.answered = False

    def __repr__(self) -> str:
        return f"<CallSession {self.call_id}>"

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
        if self.end_reason is not None or self._ending_after_speech and after_speech:
            return
        # Never raises: it is called from protocol callbacks, the clock, done-callbacks and
        # tools, none of which can do anything useful with an exception from here.
        try:
            loop = asyncio.get_running_loop()  # before any coroutine is created: none is left unawaited
            if after_speech:
                self._ending_after_speech = True
                self.spawn(self._end_after_speech(reason, tail), "end-after-speech")
                return
            self.end_reason = reason
            self._finisher = loop.create_task(self._finish(), name=f"call-finish-{self.call_id}")
            # _finish does not raise by design; if it ever does, the supervisor logs it with its
            # traceback and counts it (never "Task exception was never retrieved"), and the call
            # is released anyway.
            self.bridge.supervisor.watch(self._finisher, "call-teardown", self._teardown_crashed)
        except Exception:  # noqa: BLE001 - e.g. no running loop: tear down what can be without one
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
        self.bridge.clock.add(self)
        self.spawn(self._run(), "call")

    async def _run(self) -> None:
        bridge = self.bridge
        settings = await bridge.resolve_settings(self)
        if settings.refuse:
            self.log.warning("refused: %s", settings.refuse)
            self.bridge.metrics["calls_refused"] += 1
            self.end("refused: " + settings.refuse)
            return
        self._apply_settings(settings)
        self._publish("call.started", self.call_id, **self._summary())
        if self.end_reason is not None:
            return
        profile = self.profile
        prompt, missing = profile.render_prompt({"call_id": self.call_id, **self.variables},
                                                template=settings.overrides.get("prompt"))
        if missing:
            self.log.warning("prompt placeholders without a value: %s", ", ".join(sorted(set(missing))))
        setup = SessionSetup(
            provider=profile.provider,
            sample_rate=profile.sample_rate,
            system_prompt=prompt,
            voice=settings.overrides.get("voice", profile.voice),
            language=settings.overrides.get("language", profile.language),
            first_message=settings.overrides.get("first_message", profile.first_message),
            farewell_message=settings.overrides.get("farewell_message", profile.farewell_message),
            max_duration=profile.max_duration,
            tools=bridge.tools.specs(profile.tools),
        )
        gateway = bridge.make_gateway(self)
        self.router = ToolRouter(
            bridge.tools, self, gateway.send_tool_result,
            allowed=list(profile.tools) + [a.tool for a in profile.dtmf.values()],
            deadline=bridge.config.tool_deadline, max_concurrent=bridge.config.tool_concurrency,
            on_called=self._tool_called, on_completed=self._tool_completed,
        )
        try:
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
        self.gateway = gateway
        self.answered = True
        self._publish("call.answered", self.call_id, profile=self.profile_name)
        self._init_uplink()
        # Held at the caller's rate while connecting: resample now, through the call's own
        # (stateful) resampler, so the first words reach the AI at the right pitch.
        while self._preconnect:
            pcm = self._preconnect.popleft()
            gateway.send_audio(self._up.process(pcm) if self._up is not None else pcm)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(profile.max_duration + MAX_DURATION_GRACE_S, self._max_duration)
        await self._downlink(gateway)

    def _apply_settings(self, s: CallSettings) -> None:
        cfg = self.bridge.config
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

    def _publish(self, type: str, call_id: str, **data: Any) -> None:
        """Publish a call event; every event echoes the call's metadata (from the API request)."""
        data.setdefault("metadata", dict(self.metadata))
        self.bridge.events.publish(type, call_id, **data)

    def _summary(self) -> dict[str, Any]:
        ctx = self.context()
        ctx.pop("call_id")
        return ctx

    # ------------------------------------------------------------------ media

    def on_caller_audio(self, rate: int, pcm: bytes) -> None:
        """A frame from Asterisk (called from the connection's data_received)."""
        if rate != self.caller_rate:
            self._set_caller_rate(rate)
        self.stats["frames_in"] += 1
        if self.end_reason is not None:
            return
        gw = self.gateway
        if gw is None:
            self._preconnect.append(pcm)  # resampled when the gateway is connected
            return
        up = self._up
        gw.send_audio(up.process(pcm) if up is not None else pcm)

    def _set_caller_rate(self, rate: int) -> None:
        self.log.info("caller audio at %d Hz", rate)
        self.caller_rate = rate
        self.playout = PlayoutBuffer(rate, self.bridge.config.audiosocket.playout_max_seconds)
        self._header = self.conn.header_for(rate)
        self._preconnect.clear()
        if self.gateway is not None:
            self._init_uplink()

    def _init_uplink(self) -> None:
        grate = self.profile.sample_rate
        self._up = None if grate == self.caller_rate else Resampler(self.caller_rate, grate)
        self._down = None if grate == self.caller_rate else Resampler(grate, self.caller_rate)

    def on_tick(self) -> None:
        """The clock's 20 ms tick: exactly one frame to the caller."""
        frame = self.playout.pop()
        if self.conn.write_frame(self._header, frame):
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
        # A WebSocket hands over messages it has already buffered without suspending, so a
        # gateway that floods (1500 tool calls in one burst) would hold the event loop — and
        # every call's playout — for as long as it takes to handle them all. Give the loop a
        # turn whenever this call has had it for DOWNLINK_SLICE_S.
        loop = asyncio.get_running_loop()
        slice_end = loop.time() + DOWNLINK_SLICE_S
        async for event in gateway.events():
            if loop.time() >= slice_end:
                await asyncio.sleep(0)
                slice_end = loop.time() + DOWNLINK_SLICE_S
            if isinstance(event, AudioOut):
                pcm = self._down.process(event.pcm) if self._down is not None else event.pcm
                self.playout.push(pcm)
                self._audio_arrived.set()
            elif isinstance(event, ClearPlayback):
                dropped = self.playout.clear()
                if self._down is not None:
                    self._down.reset()
                self.stats["barge_ins"] += 1
                self.log.debug("barge-in: dropped %d queued frames", dropped)
            elif isinstance(event, ToolCall):
                assert self.router is not None
                self.router.dispatch(event.call_id, event.name, event.args, problem=event.problem)
            elif isinstance(event, Transcript):
                if event.final:
                    item = {"role": event.role, "text": event.text, "t": round(time.monotonic() - self._t0, 3)}
                    self.transcript.append(item)
                    self._publish("transcript", self.call_id, **item)
            elif isinstance(event, RemoteHangup):
                self.log.info("gateway hung up")
                self.end("gateway-hangup", after_speech=True, tail=0)
            elif isinstance(event, RemoteError):
                await self._on_gateway_error(event.message)
            elif isinstance(event, Closed):
                if self.end_reason is None and not self._ending_after_speech:
                    if event.clean:
                        self.end("gateway-closed", after_speech=True, tail=0)
                    else:
                        self.log.error("gateway connection lost (code %s: %s)", event.code, event.reason or "-")
                        await self._fallback(f"gateway connection lost ({event.code})")
                return

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
        if self.end_reason is not None:
            return
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
        await self.bridge.apply_fallback(self, fb)
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
        self._ending_after_speech = False
        self.end(reason)

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
        """The AudioSocket connection closed (caller hung up, redirect, or protocol error)."""
        self.end(self._handoff if self._handoff and why == "caller-hangup" else why)

    # ------------------------------------------------------------------ tools → events

    def _tool_called(self, o: ToolOutcome) -> None:
        self._publish("tool.called", self.call_id, tool=o.name, tool_call_id=o.call_id,
                                   args=o.args, origin=o.origin)

    def _tool_completed(self, o: ToolOutcome) -> None:
        self.bridge.metrics["tool_" + o.outcome] += 1
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
            # 0x00 ends the AudioSocket() app cleanly and the dialplan continues at the next
            # priority; if even that fails, the connection is dropped (Asterisk then continues too).
            if not self._guard("sending the caller the hangup frame", self.conn.hangup):
                self._guard("closing the caller's connection", self.conn.abort)
            duration = time.monotonic() - self._t0
            self._guard("deregistering the call", self.bridge.session_ended, self)
            self._guard("publishing call.ended", self._publish_ended, reason, duration)
            self.ended.set()
            self.log.info("call ended: %s after %.1f s (in %d / out %d frames)", reason, duration,
                          self.stats["frames_in"], self.stats["frames_out"])

    async def _teardown(self, reason: str) -> None:
        self.log.info("call ending: %s", reason)
        self._guard("removing the call from the playout clock", self.bridge.clock.remove, self)
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
        except Exception:  # noqa: BLE001 - one broken step must not leave the call half torn down
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
        except Exception:  # noqa: BLE001 - see _guard
            self.log.exception("teardown: %s failed", step)
            self.stats["teardown_errors"] += 1
        return False

    def _publish_ended(self, reason: str, duration: float) -> None:
        gateway_stats: dict[str, int] = {}
        if self.gateway is not None:
            self._guard("reading the gateway's counters", lambda: gateway_stats.update(self.gateway.stats))
        self._publish(
            "call.ended", self.call_id, reason=reason, duration_s=round(duration, 3),
            transcript=list(self.transcript),
            tools=[{"tool": o.name, "outcome": o.outcome, "duration_ms": round(o.duration_ms, 1)}
                   for o in (self.router.outcomes if self.router else [])],
            metadata=dict(self.metadata), profile=self.profile_name,
            stats={**self.stats, **gateway_stats},
        )

    def _teardown_crashed(self, exc: BaseException) -> None:
        if not self.ended.is_set():
            self._release_now()

    def _release_now(self) -> None:
        """Last resort, synchronous: stop the frames, drop the caller, free the slot, signal the end."""
        self._guard("removing the call from the playout clock", self.bridge.clock.remove, self)
        self._guard("closing the caller's connection", self.conn.abort)
        self._guard("deregistering the call", self.bridge.session_ended, self)
        self.ended.set()

    def info(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "state": "ended" if self.ended.is_set() else ("ending" if self.end_reason else
                                                          ("active" if self.answered else "connecting")),
            "started_at": self.started_at,
            "duration_s": round(time.monotonic() - self._t0, 3),
            **self._summary(),
            "caller_rate": self.caller_rate,
            "gateway_rate": self.profile.sample_rate,
            "transcript": list(self.transcript),
            "end_reason": self.end_reason,
        }


def _load_wav(path: Any, rate: int) -> bytes:
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError("must be mono 16-bit PCM")
        pcm = w.readframes(w.getnframes())
        src = w.getframerate()
    return pcm if src == rate else Resampler(src, rate).process(pcm)

