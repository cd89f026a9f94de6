"""Smoke run of ``voxbridge bench``: a handful of calls for a few seconds, real processes on loopback.

Only that the machinery works and the numbers are sane; the service levels themselves belong to
the full benchmark run on a quiet machine, not to a test.
"""

from __future__ import annotations

import json

import pytest

from bridge.devtools import bench


@pytest.mark.timeout(120)
async def test_bench_smoke_writes_json_with_sane_numbers(tmp_path):
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--calls", "4", "--duration", "3", "--warmup", "1", "--baseline-duration", "2",
                              "--barge-every", "1", "--tool-every", "1", "--keep-going", "--out", str(tmp_path)])
    await bench.run_bench(args)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["params"]["calls"] == [4]
    (step,) = result["steps"]
    assert step["calls"] == 4
    assert step["callers"]["connected"] == 4 and step["callers"]["connect_failed"] == 0
    # ~50 frames/s per call went through the bridge and came back, with markers intact.
    assert step["frames_sent"] > 4 * 50 * 2
    assert step["frames_received"] > 4 * 50 * 2
    assert step["lost_frames"] <= step["frames_sent"] * 0.01
    for key in ("uplink_ms", "downlink_added_ms", "downlink_total_ms", "jitter_ms"):
        p50, p99 = step[key]["p50"], step[key]["p99"]
        assert p50 is not None and p99 >= p50, key
    assert 0 <= step["uplink_ms"]["p50"] < 100
    assert 0 <= step["downlink_total_ms"]["p50"] < 100  # includes the wait for the next 20 ms slot
    assert step["jitter_ms"]["p50"] < 20
    assert step["barge_in_flush_ms"]["n"] >= 1 and 0 <= step["barge_in_flush_ms"]["p50"] < 200
    assert step["tool_rtt_ms"]["n"] >= 1 and 0 < step["tool_rtt_ms"]["p50"] < 500
    assert step["bridge_cpu_pct"] > 0 and step["rss_mb"] > 10
    assert step["bridge_tick"]["lateness_p99_ms"] is not None
    base = step["baseline"]
    assert base["relay_cpu_pct"] > 0 and base["round_trip_ms"]["p50"] is not None
    assert step["cpu_ratio_to_baseline"] > 0
    assert isinstance(step["held"], bool) and isinstance(step["broken"], list)
    assert "largest_n_held" in result
    # Relative verdict: the bridge judged against the bare relay's own figures from the same run.
    assert base["jitter_ms"]["p99"] is not None and base["frames_received"] > 4 * 50
    assert base["late_frames"] >= 0
    rel = step["relative"]
    assert set(rel["levels"]) == set(bench.RELATIVE_LEVELS) and isinstance(rel["held"], bool)
    assert rel["levels"]["added_jitter_p99_ms"] == pytest.approx(
        step["jitter_ms"]["p99"] - base["jitter_ms"]["p99"], abs=1e-3)
    assert rel["levels"]["added_latency_p99_ms"] == pytest.approx(
        step["uplink_ms"]["p99"] + step["downlink_added_ms"]["p99"] - base["round_trip_ms"]["p99"], abs=1e-3)
    assert rel["held"] == (rel["broken"] == [])
    assert "largest_n_held_relative" in result and result["relative_levels"] == bench.RELATIVE_LEVELS


def test_relative_verdict_subtracts_what_the_relay_suffered_too():
    """Noise the relay saw as well (late frames, jitter) is not blamed on the bridge; what only
    the bridge adds is."""
    def step(late: int, jit: float, up: float) -> dict:
        return {"calls": 10, "lost_frames": 0, "late_frames": late, "frames_received": 10_000,
                "jitter_ms": {"p99": jit}, "uplink_ms": {"p99": up}, "downlink_added_ms": {"p99": 1.0},
                "rss_per_call_mb": 0.05, "callers": {"connect_failed": 0, "ended_early": 0,
                                                     "timer_late_ms": {"p99": 1.0}}}

    base = {"late_frames": 8, "frames_received": 5_000, "jitter_ms": {"p99": 3.0}, "round_trip_ms": {"p99": 2.0}}
    noisy = step(late=16, jit=4.0, up=1.5)  # same late rate and +1 ms jitter: absolute breaks, relative holds
    noisy["baseline"] = base
    bench._judge(noisy)
    assert not noisy["held"] and {"late_frames", "jitter_p99_ms"} <= set(noisy["broken"])
    assert noisy["relative"]["held"], noisy["relative"]
    assert noisy["relative"]["levels"]["added_late_per_1000"] == 0
    worse = step(late=40, jit=6.0, up=9.0)  # the bridge's own: late frames, jitter and latency beyond the relay's
    worse["baseline"] = base
    bench._judge(worse)
    assert set(worse["relative"]["broken"]) == {"added_late_per_1000", "added_jitter_p99_ms",
                                                "added_latency_p99_ms"}


def test_the_bench_processes_run_this_checkout_not_an_installed_copy():
    """The bridge, callers and relay start with ``python -m bridge…`` from the directory holding
    this very package: a bench run from a worktree measures that worktree's code, even when the
    venv has another checkout installed in editable mode."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", "import bridge; print(bridge.__file__)"], cwd=bench._SOURCE_ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve() == Path(bench.__file__).resolve().parents[1] / "__init__.py"
