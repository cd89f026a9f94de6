"""Smoke run of ``voxbridge bench``: a handful of calls for a few seconds, real processes on loopback.

Only that the machinery works and the numbers are sane; the service levels themselves belong to
the full benchmark run on a quiet machine, not to a test.
"""

from __future__ import annotations

import json

import pytest

from bridge.devtools import bench


async def _small_run(tmp_path, *options: str) -> dict:
    """4 calls, a barge-in and a tool call a second per call, the relay for 2 s: bench.json."""
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--calls", "4", "--warmup", "1", "--baseline-duration", "2", "--barge-every", "1",
                              "--tool-every", "1", "--out", str(tmp_path), *options])
    await bench.run_bench(args)
    return json.loads((tmp_path / "bench.json").read_text())


@pytest.mark.timeout(120)
async def test_bench_smoke_writes_json_with_sane_numbers(tmp_path):
    result = await _small_run(tmp_path, "--duration", "3", "--keep-going")
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


@pytest.mark.timeout(120)
async def test_floor_carries_every_frame_and_is_reported_beside_the_relay(tmp_path, capsys):
    """``--floor``: the minimal bridge (bridge/devtools/floor.py) runs against the same gateway
    simulator and callers in the same step, carries their audio both ways through the product's
    clock without losing a frame, and the bridge's CPU is reported against it and the relay."""
    result = await _small_run(tmp_path, "--duration", "2", "--floor")
    assert result["params"]["floor"] is True
    (step,) = result["steps"]
    floor = step["floor"]
    assert floor["callers"]["connected"] == 4 and floor["callers"]["ended_early"] == 0
    # Both ways through the floor: every echoed frame came back, 50 a second per call, on the clock.
    assert floor["frames_received"] > 4 * 50 * 1.5 and floor["lost_frames"] == 0
    assert floor["uplink_ms"]["p50"] is not None and floor["downlink_added_ms"]["p50"] is not None
    assert floor["bridge_tick"]["lateness_p99_ms"] is not None  # the product's clock, reported as the bridge's
    assert floor["cpu_pct"] > 0
    assert floor["cpu_ratio_to_baseline"] == pytest.approx(
        floor["cpu_pct_per_call"] / step["baseline"]["cpu_pct_per_call"], rel=0.02)
    assert step["cpu_ratio_to_floor"] == pytest.approx(step["cpu_pct_per_call"] / floor["cpu_pct_per_call"], rel=0.02)
    assert "the bridge ×" in capsys.readouterr().out


def test_frames_a_barge_in_cleared_from_the_queue_are_not_lost_but_others_are():
    """Echoed frames still queued when the gateway's ``playback_clear_buffer`` came were discarded
    by design (one unbroken run of missing frames ending where the gateway's hold began); a
    missing frame anywhere else, or a run longer than CLEARED_RUN_MAX, is lost."""
    import numpy as np

    def data(got_seqs: dict[int, list[int]], holds: list[tuple[int, int, int]]) -> dict:
        cids = [c for c, seqs in got_seqs.items() for _ in seqs]
        seqs = [s for ss in got_seqs.values() for s in ss]
        z = np.zeros(len(seqs))
        return {
            "arr_cid": np.array(cids, dtype=np.int64), "arr_t": np.arange(len(seqs)) * 0.02,
            "e_cid": np.array(cids, dtype=np.int64), "e_seq": np.array(seqs, dtype=np.int64),
            "e_tsend": z, "e_tgwr": z, "e_tgws": z, "e_trecv": z,
            "call_cid": np.array(list(got_seqs), dtype=np.int64),
            "call_seq_first": np.zeros(len(got_seqs), dtype=np.int64),
            "call_seq_last": np.full(len(got_seqs), 199, dtype=np.int64),
            "skip_cid": np.array([h[0] for h in holds], dtype=np.int64),
            "skip_first": np.array([h[1] for h in holds], dtype=np.int64),
            "skip_count": np.array([h[2] for h in holds], dtype=np.int64),
            "flush": np.zeros(0), "tool_rtt": np.zeros(0), "tick_late": np.zeros(0),
            "counters": np.array([len(got_seqs), 0, 0, 0]),
        }

    every = list(range(200))
    # Call 1: a hold at 100 (5 frames), the 4 frames before it cleared from a standing backlog.
    # Call 2: a hold at 50 with nothing cleared, and frame 150 missing on its own: lost.
    # Call 3: a hold at 120 after 60 missing frames: more than one barge-in can clear: lost.
    # Call 4: every frame of the window back; a hold after the window (its frames unrecorded).
    got = {1: [s for s in every if not 96 <= s < 105],
           2: [s for s in every if not 50 <= s < 55 and s != 150],
           3: [s for s in every if not 60 <= s < 125],
           4: every}
    res = bench._analyse(data(got, [(1, 100, 5), (2, 50, 5), (3, 120, 5), (4, 205, 5)]), {})
    assert res["barge_in_skipped_frames"] == 15
    assert res["barge_in_cleared_frames"] == 4 and res["barge_in_cleared_max_run"] == 4
    assert res["lost_frames"] == 1 + 60
