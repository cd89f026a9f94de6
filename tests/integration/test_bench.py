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
