"""bridge/metrics.py: /metrics through prometheus_client, one registry per bridge.

The exposition is read back with prometheus_client's own text parser, so what is checked is what
a Prometheus server would see: every family present with HELP and TYPE, and counters that move
when the thing they count happens.
"""

from __future__ import annotations

import collections
from types import SimpleNamespace
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.api import REFUSAL_CAUSES, Refusal, RefusalLog
from bridge.events import EventBus
from bridge.metrics import CONTENT_TYPE, BridgeMetrics
from bridge.playout import PlayoutClock
from bridge.supervise import Supervisor

#: Every family /metrics exports (as the parser names them: a counter without ``_total``) and its type.
FAMILIES = {
    "voxbridge_calls_active": "gauge",
    "voxbridge_calls": "counter",
    "voxbridge_calls_refused": "counter",
    "voxbridge_protocol_errors": "counter",
    "voxbridge_playout_late_ticks": "counter",
    "voxbridge_playout_max_lateness_seconds": "gauge",
    "voxbridge_playout_tick_lateness_seconds": "histogram",
    "voxbridge_ami_connected": "gauge",
    "voxbridge_store_errors": "counter",
    "voxbridge_store_dropped": "counter",
    "voxbridge_part_crashes": "counter",
    "voxbridge_webhook_deliveries": "counter",
    "voxbridge_webhook_failures": "counter",
    "voxbridge_webhook_refused": "counter",
    "voxbridge_webhook_events_dropped": "counter",
    "voxbridge_tool_calls": "counter",
    "voxbridge_tool_duration_seconds": "histogram",
    "voxbridge_frames_out_dropped": "counter",
    "voxbridge_gateway_uplink_dropped": "counter",
}


def parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (by its full name, e.g. ``voxbridge_calls_total``)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels or ''}")


def make_source(**kw: Any) -> SimpleNamespace:
    base: dict[str, Any] = {"clock": PlayoutClock(), "supervisor": Supervisor(), "sessions": {}, "store": None,
                            "webhooks": None, "ami": None}
    return SimpleNamespace(**{**base, **kw})


def call(stats: dict[str, int], gateway_stats: dict[str, int] | None = None) -> SimpleNamespace:
    return SimpleNamespace(stats=collections.Counter(stats),
                           gateway=SimpleNamespace(stats=gateway_stats) if gateway_stats is not None else None)


def test_every_family_is_exported_with_help_and_type() -> None:
    text = BridgeMetrics(make_source()).text()
    families = parse(text)
    missing = set(FAMILIES) - set(families)
    assert not missing, f"not exported: {sorted(missing)}"
    for name, kind in FAMILIES.items():
        assert families[name].type == kind, name
        assert families[name].documentation, f"{name} has no HELP"
        exposed = name + "_total" if kind == "counter" else name  # the series names /metrics always had
        assert f"# HELP {exposed} " in text and f"# TYPE {exposed} {kind}\n" in text, exposed


async def test_a_bridge_exports_them_all_and_keeps_the_old_series_names(tmp_path: Any) -> None:
    from bridge.app import Bridge
    from bridge.config import Config

    bridge = Bridge(Config(audiosocket={"listen": "127.0.0.1:0"}, api={"enabled": False},
                           store={"path": str(tmp_path / "calls.db")}))
    text = bridge.metrics_text()
    assert set(FAMILIES) <= set(parse(text))
    for series in ("voxbridge_calls_active 0.0", "voxbridge_calls_total 0.0", "voxbridge_calls_refused_total 0.0",
                   "voxbridge_protocol_errors_total 0.0", "voxbridge_playout_late_ticks_total 0.0",
                   "voxbridge_ami_connected 0.0", "voxbridge_store_errors_total 0.0",
                   "voxbridge_webhook_events_dropped_total 0.0", "voxbridge_frames_out_dropped_total 0.0"):
        assert series + "\n" in text, series
    bridge.metrics.call_accepted()
    bridge.metrics.call_refused()
    assert bridge.metrics["calls_total"] == 1 and bridge.metrics["calls_refused"] == 1
    assert bridge.metrics["protocol_errors"] == 0 and bridge.metrics["tool_ok"] == 0
    with pytest.raises(KeyError):
        bridge.metrics["no_such_counter"]
    await bridge.http.aclose()


def test_counters_move_when_the_thing_happens() -> None:
    m = BridgeMetrics(make_source())
    m.call_accepted()
    m.call_accepted()
    m.call_refused()
    m.protocol_error()
    m.tool_completed("ok", 0.2)
    m.tool_completed("ok", 3.0)
    m.tool_completed("timeout", 15.0)
    text = m.text()
    assert sample(text, "voxbridge_calls_total") == 2
    assert sample(text, "voxbridge_calls_refused_total") == 1
    assert sample(text, "voxbridge_protocol_errors_total") == 1
    assert sample(text, "voxbridge_tool_calls_total", outcome="ok") == 2
    assert sample(text, "voxbridge_tool_calls_total", outcome="timeout") == 1
    assert sample(text, "voxbridge_tool_duration_seconds_count", outcome="ok") == 2
    assert sample(text, "voxbridge_tool_duration_seconds_sum", outcome="ok") == pytest.approx(3.2)
    assert sample(text, "voxbridge_tool_duration_seconds_bucket", outcome="ok", le="0.25") == 1
    assert sample(text, "voxbridge_tool_duration_seconds_bucket", outcome="ok", le="5.0") == 2
    assert sample(text, "voxbridge_tool_duration_seconds_bucket", outcome="timeout", le="10.0") == 0
    assert sample(text, "voxbridge_tool_duration_seconds_bucket", outcome="timeout", le="15.0") == 1


def test_playout_lateness_histogram_is_read_from_the_clocks_own_histogram() -> None:
    clock = PlayoutClock()
    m = BridgeMetrics(make_source(clock=clock))
    assert sample(m.text(), "voxbridge_playout_tick_lateness_seconds_count") == 0
    # The clock counts each sub-tick in a 0.1 ms bucket (the last: 100 ms or more).
    clock.lateness_hist[3] += 5  # 0.3-0.4 ms
    clock.lateness_hist[15] += 2  # 1.5-1.6 ms
    clock.lateness_hist[-1] += 1  # >= 100 ms
    clock.late_ticks, clock.max_lateness = 1, 0.1234
    text = m.text()
    name = "voxbridge_playout_tick_lateness_seconds"
    assert sample(text, name + "_bucket", le="0.0005") == 5
    assert sample(text, name + "_bucket", le="0.001") == 5
    assert sample(text, name + "_bucket", le="0.002") == 7
    assert sample(text, name + "_bucket", le="0.1") == 7
    assert sample(text, name + "_bucket", le="+Inf") == 8
    assert sample(text, name + "_count") == 8
    assert sample(text, name + "_sum") == pytest.approx(5 * 0.00035 + 2 * 0.00155 + 0.1)
    assert sample(text, "voxbridge_playout_late_ticks_total") == 1
    assert sample(text, "voxbridge_playout_max_lateness_seconds") == pytest.approx(0.1234)


def test_drops_are_counted_across_live_and_ended_calls() -> None:
    sessions: dict[str, Any] = {}
    events = EventBus()
    m = BridgeMetrics(make_source(sessions=sessions))
    events.add_sink(m.on_event)
    sessions["a"] = call({"frames_out_dropped": 3}, {"dropped_up": 4})
    sessions["b"] = call({"frames_out": 10}, None)
    text = m.text()
    assert sample(text, "voxbridge_frames_out_dropped_total") == 3
    assert sample(text, "voxbridge_gateway_uplink_dropped_total") == 4
    # "a" ends: deregistered, then its call.ended reports what it counted (session.py does both).
    ended = sessions.pop("a")
    events.publish("call.ended", "a", stats={**ended.stats, **ended.gateway.stats})
    sessions["b"].stats["frames_out_dropped"] += 2
    text = m.text()
    assert sample(text, "voxbridge_frames_out_dropped_total") == 5
    assert sample(text, "voxbridge_gateway_uplink_dropped_total") == 4
    # A call that vanishes without its call.ended (a failed teardown) never makes a counter go down.
    sessions.pop("b")
    assert sample(m.text(), "voxbridge_frames_out_dropped_total") == 5


def test_webhook_store_and_crash_counts_are_read_where_they_live() -> None:
    supervisor = Supervisor()
    source = make_source(supervisor=supervisor, store=SimpleNamespace(errors=2, dropped=7),
                         webhooks=SimpleNamespace(totals=collections.Counter(delivered=5, failed=1, dropped=9)),
                         ami=SimpleNamespace(connected=SimpleNamespace(is_set=lambda: True)))
    m = BridgeMetrics(source)
    supervisor.crashes["webhooks"] += 1
    text = m.text()
    assert sample(text, "voxbridge_store_errors_total") == 2
    assert sample(text, "voxbridge_store_dropped_total") == 7
    assert sample(text, "voxbridge_webhook_deliveries_total") == 5
    assert sample(text, "voxbridge_webhook_failures_total") == 1
    assert sample(text, "voxbridge_webhook_refused_total") == 0
    assert sample(text, "voxbridge_webhook_events_dropped_total") == 9
    assert sample(text, "voxbridge_part_crashes_total", part="webhooks") == 1
    assert sample(text, "voxbridge_ami_connected") == 1
    source.webhooks.totals["dropped"] += 1
    assert sample(m.text(), "voxbridge_webhook_events_dropped_total") == 10


def test_each_bridge_has_its_own_registry_and_the_global_one_is_untouched() -> None:
    before = {f.name for f in prometheus_client.REGISTRY.collect()}
    one, two = BridgeMetrics(make_source()), BridgeMetrics(make_source())
    one.call_accepted()
    one.tool_completed("ok", 0.1)
    assert one["calls_total"] == 1 and two["calls_total"] == 0
    after = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert after == before and not any(name.startswith("voxbridge") for name in after)


def test_api_refusals_are_exported_per_cause_from_the_start() -> None:
    refusals = RefusalLog()
    refusals.note(Refusal(421, "host", "not loopback"), "/v1/calls")
    refusals.note(Refusal(421, "host", "not loopback"), "/v1/calls")
    text = refusals.metrics()
    family = parse(text)["voxbridge_api_refused"]
    assert family.type == "counter" and family.documentation
    values = {s.labels["cause"]: s.value for s in family.samples if s.name == "voxbridge_api_refused_total"}
    assert values == {cause: (2 if cause == "host" else 0) for cause in REFUSAL_CAUSES}


def test_content_type_is_the_text_format_generate_latest_writes() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
