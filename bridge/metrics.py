"""The bridge's Prometheus metrics (``GET /metrics``), through prometheus_client.

Each :class:`~bridge.app.Bridge` has its own :class:`BridgeMetrics` and so its own
``CollectorRegistry``, never the process-global one: the tests (and ``voxbridge bench``) run many
bridges in one process, and each must count only its own calls.

Two kinds of series:

- **Counted here, when the thing happens** (never per audio frame): calls accepted and refused,
  AudioSocket protocol errors, tool calls by outcome and their duration (:meth:`call_accepted`,
  :meth:`call_refused`, :meth:`protocol_error`, :meth:`tool_completed`).
- **Read at scrape time from where the value already lives** (:class:`_LiveCollector`), so the
  hot path pays nothing for them: the playout clock's counters and its per-sub-tick lateness
  histogram (bridge/playout.py, ``PlayoutClock.lateness_hist``), the call-history store's errors
  and drops, the webhook dispatcher's totals, the supervisor's crash counts, AMI's connection,
  and the per-call drop counters (frames for the caller that could not be written, caller audio
  a gateway adapter dropped). A per-call counter is the sum over live calls plus what ended calls
  reported in their ``call.ended`` event (:meth:`on_event`, an EventBus sink).

Every series keeps the name and meaning it had when this text was written by hand; the ones
added with this module are the two histograms and the per-call drop counters.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BridgeMetrics", "CONTENT_TYPE", "MetricsSource", "render"]

#: What :func:`render` writes: the Prometheus text format 0.0.4 (generate_latest's).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Tool call durations (seconds): a tool answers within 15 s (the router's hard limit).
TOOL_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0)
#: Playout tick lateness (seconds). Edges are multiples of the clock's 0.1 ms histogram buckets.
LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
#: The clock's histogram resolution (bridge/playout.py: 0.1 ms buckets, the last "100 ms or more").
_CLOCK_BUCKET_S = 0.0001

#: Per-call counters exported as process totals: (key in the call's counters, metric, help).
_CALL_DROPS = (
    ("frames_out_dropped", "voxbridge_frames_out_dropped",
     "Frames for callers that could not be written (the caller's connection was not reading, or closing)."),
    ("dropped_up", "voxbridge_gateway_uplink_dropped",
     "Caller audio frames a gateway adapter dropped (its queue towards a slow gateway was full)."),
)


# ------------------------------------------------------------------ what the metrics read


class _Clock(Protocol):
    late_ticks: int
    max_lateness: float
    lateness_hist: list[int]


class _Gateway(Protocol):
    @property
    def stats(self) -> Mapping[str, int]: ...


class _Call(Protocol):
    stats: Mapping[str, int]
    gateway: _Gateway | None


class _Store(Protocol):
    dropped: int

    @property
    def errors(self) -> int: ...


class _Webhooks(Protocol):
    totals: Mapping[str, int]


class _Supervisor(Protocol):
    crashes: Mapping[str, int]


class _Connected(Protocol):
    def is_set(self) -> bool: ...


class _Ami(Protocol):
    connected: _Connected


class MetricsSource(Protocol):
    """What the scrape-time series are read from (the bridge provides it)."""

    clock: Any  # a PlayoutClock (see _Clock); Any: tests substitute their own clocks
    supervisor: Any  # a Supervisor (see _Supervisor)

    @property
    def sessions(self) -> Mapping[str, Any]: ...  # live calls (see _Call)

    @property
    def store(self) -> Any: ...  # a CallStore or None (see _Store)

    @property
    def webhooks(self) -> Any: ...  # a WebhookDispatcher or None (see _Webhooks)

    @property
    def ami(self) -> Any: ...  # an AmiClient or None (see _Ami)


# ------------------------------------------------------------------ the metrics


class BridgeMetrics:
    """One bridge's metrics: the counters it bumps and the registry ``/metrics`` renders."""

    def __init__(self, source: MetricsSource) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._calls = Counter("voxbridge_calls", "Calls accepted since start.", registry=r)
        self._refused = Counter("voxbridge_calls_refused", "Calls refused (capacity, unknown UUID).", registry=r)
        self._protocol_errors = Counter("voxbridge_protocol_errors",
                                        "AudioSocket connections closed for malformed input.", registry=r)
        self._tool_calls = Counter("voxbridge_tool_calls", "Tool calls answered, by outcome.", ["outcome"],
                                   registry=r)
        self._tool_duration = Histogram("voxbridge_tool_duration_seconds",
                                        "How long tool calls took to answer, by outcome.", ["outcome"],
                                        buckets=TOOL_DURATION_BUCKETS, registry=r)
        self._hooks = Counter("voxbridge_hook_calls", "Call hooks run (on_call_start, on_call_end), by outcome.",
                              ["hook", "outcome"], registry=r)
        #: What ended calls reported of each per-call drop counter (see on_event).
        self._ended: collections.Counter[str] = collections.Counter()
        r.register(_LiveCollector(source, self._ended))

    # -- counted when it happens

    def call_accepted(self) -> None:
        self._calls.inc()

    def call_refused(self) -> None:
        self._refused.inc()

    def protocol_error(self) -> None:
        self._protocol_errors.inc()

    def tool_completed(self, outcome: str, seconds: float) -> None:
        """A tool call was answered (``outcome``: the router's, e.g. ``ok``, ``error``, ``timeout``)."""
        self._tool_calls.labels(outcome).inc()
        self._tool_duration.labels(outcome).observe(seconds)

    def on_event(self, event: Any) -> None:
        """EventBus sink: fold an ended call's drop counters into the process totals, and count
        the call hooks' outcomes (``hook.completed``).

        The bridge deregisters a call just before publishing its ``call.ended`` (synchronously,
        with no await between), so no scrape sees a call both live and ended.
        """
        if event.type == "hook.completed":  # bridge/hooks.py
            self._hooks.labels(str(event.data.get("hook")), str(event.data.get("outcome"))).inc()
            return
        if event.type != "call.ended":
            return
        stats = event.data.get("stats")
        if isinstance(stats, Mapping):
            for key, _name, _help in _CALL_DROPS:
                value = stats.get(key)
                if isinstance(value, int):
                    self._ended[key] += value

    # -- reading

    def text(self) -> str:
        """The Prometheus text exposition of everything in this bridge's registry."""
        return render(self.registry)

    def value(self, name: str) -> float:
        """A counter's current value by its short name: ``calls_total``, ``calls_refused``,
        ``protocol_errors`` or ``tool_<outcome>`` (0 if it never moved)."""
        if name.startswith("tool_"):
            got = self.registry.get_sample_value("voxbridge_tool_calls_total", {"outcome": name[len("tool_"):]})
        else:
            series = {"calls_total": "voxbridge_calls_total", "calls_refused": "voxbridge_calls_refused_total",
                      "protocol_errors": "voxbridge_protocol_errors_total"}.get(name)
            if series is None:
                raise KeyError(name)
            got = self.registry.get_sample_value(series)
        return got or 0.0

    __getitem__ = value


def render(*registries: CollectorRegistry) -> str:
    """The text exposition of ``registries``, one after the other (their names must not clash)."""
    return "".join(generate_latest(r).decode("utf-8") for r in registries)


class _LiveCollector(Collector):
    """The series whose values live elsewhere, read when ``/metrics`` is scraped."""

    def __init__(self, source: MetricsSource, ended: Mapping[str, int]) -> None:
        self._source = source
        self._ended = ended
        #: The last value exported per drop counter: a counter never goes down, even if a call
        #: vanished without its call.ended (a teardown that itself failed).
        self._last: dict[str, float] = {}

    def describe(self) -> Iterable[Metric]:
        return []  # read lazily: the source is still being built when this is registered

    def collect(self) -> Iterator[Metric]:
        s = self._source
        sessions = s.sessions
        yield _gauge("voxbridge_calls_active", "Calls in progress.", len(sessions))
        yield from _clock_metrics(s.clock)
        ami = s.ami
        yield _gauge("voxbridge_ami_connected", "1 if the AMI connection is up.",
                     int(bool(ami is not None and ami.connected.is_set())))

        store = s.store
        yield _counter("voxbridge_store_errors", "Call-history writes that failed (each is logged).",
                       store.errors if store is not None else 0)
        yield _counter("voxbridge_store_dropped", "Call-history events dropped (write queue full or closed).",
                       store.dropped if store is not None else 0)

        crashes = CounterMetricFamily("voxbridge_part_crashes", "Unexpected exceptions in long-lived parts "
                                      "(each logged with its traceback).", labels=["part"])
        for part, n in sorted(s.supervisor.crashes.items()):
            crashes.add_metric([part], n)
        yield crashes

        wh: Mapping[str, int] = s.webhooks.totals if s.webhooks is not None else {}
        yield _counter("voxbridge_webhook_deliveries", "Webhook events delivered (answered 2xx).",
                       wh.get("delivered", 0))
        yield _counter("voxbridge_webhook_failures",
                       "Webhook events given up on (every attempt failed, or refused).", wh.get("failed", 0))
        yield _counter("voxbridge_webhook_refused",
                       "Webhook deliveries refused by allow.webhooks or the address checks.", wh.get("refused", 0))
        yield _counter("voxbridge_webhook_events_dropped", "Webhook events dropped (a subscriber's queue full, "
                       "or queued for one that answered 410 Gone).", wh.get("dropped", 0))

        yield from _tool_source_metrics(getattr(s, "tool_sources", ()))

        live: collections.Counter[str] = collections.Counter()
        for call in list(sessions.values()):
            stats = call.stats
            for key, _name, _help in _CALL_DROPS:
                live[key] += stats.get(key, 0)
            gateway = call.gateway
            if gateway is not None:
                gstats = gateway.stats
                for key, _name, _help in _CALL_DROPS:
                    live[key] += gstats.get(key, 0)
        for key, name, help_ in _CALL_DROPS:
            value = max(self._last.get(key, 0.0), float(live[key] + self._ended.get(key, 0)))
            self._last[key] = value
            yield _counter(name, help_, value)


def _tool_source_metrics(sources: Iterable[Any]) -> Iterator[Metric]:
    """Per MCP tool source (tools/mcp.py): up or down, the tools it offers, the names refused."""
    up = GaugeMetricFamily("voxbridge_tool_source_up", "1 if the tool source (MCP server) is connected.",
                           labels=["source"])
    tools = GaugeMetricFamily("voxbridge_tool_source_tools", "Tools a tool source offers now.", labels=["source"])
    refused = GaugeMetricFamily("voxbridge_tool_source_refused",
                                "Tools of a tool source refused at its last listing (name taken, bad schema).",
                                labels=["source"])
    for source in sources:
        health = source.health()
        up.add_metric([source.name], 1 if health["state"] == "up" else 0)
        tools.add_metric([source.name], health["tools"])
        refused.add_metric([source.name], health["refused"])
    yield from (up, tools, refused)


def _clock_metrics(clock: _Clock) -> Iterator[Metric]:
    yield _counter("voxbridge_playout_late_ticks", "Playout ticks that fired a whole period late.", clock.late_ticks)
    yield _gauge("voxbridge_playout_max_lateness_seconds", "Worst playout tick lateness since start.",
                 round(clock.max_lateness, 6))
    yield _lateness_histogram(list(clock.lateness_hist))


def _lateness_histogram(hist: list[int]) -> HistogramMetricFamily:
    """The clock's per-sub-tick lateness histogram (0.1 ms buckets) as a Prometheus histogram.

    The clock counts each sub-tick in one bucket and keeps no sum, so ``_sum`` is estimated from
    the bucket midpoints (within 0.05 ms per tick; the last bucket, "100 ms or more", counts
    as 100 ms).
    """
    buckets: list[tuple[str, float]] = []
    for edge in LATENESS_BUCKETS:
        buckets.append((_fmt(edge), float(sum(hist[: round(edge / _CLOCK_BUCKET_S)]))))
    total = sum(hist)
    buckets.append(("+Inf", float(total)))
    last = len(hist) - 1
    estimate = sum(n * ((i + 0.5) * _CLOCK_BUCKET_S if i < last else i * _CLOCK_BUCKET_S)
                   for i, n in enumerate(hist) if n)
    return HistogramMetricFamily(
        "voxbridge_playout_tick_lateness_seconds",
        "How late playout clock sub-ticks fired (each serves a quarter of the calls one frame); "
        "the sum is estimated from 0.1 ms buckets.",
        buckets=buckets, sum_value=round(estimate, 6))


def _fmt(edge: float) -> str:
    return repr(float(edge))


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)
