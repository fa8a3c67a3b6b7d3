"""The alert distribution benchmark runs with tiny options and prints the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "alerts.py"


def test_alerts_benchmark_smallest_run() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--alerts", "120", "--batch", "40", "--no-telemetry"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["benchmark"] == "alerts"
    assert r["alerts"] == 120
    assert r["feeds"] == 6
    assert r["stalled_feeds"] == ["ampel"]
    assert 70_000 < r["packet_bytes"] < 90_000  # DMTN-102's ~80 KB
    assert set(r["per_feed"]) == {"validation", "alerce", "fink", "lasair", "antares"}
    for feed in r["per_feed"].values():
        assert feed["received"] == 120
        assert feed["done_s"] <= r["time_to_last_healthy_feed_s"]
    # The stalled feed holds the whole visit and its alarm is up; nobody waited for it.
    assert r["stalled_feed"]["lag_entries"] == 121  # 120 alerts + the manifest
    assert r["stalled_feed"]["lagging"]
    assert r["ratio"] == pytest.approx(r["time_to_last_healthy_feed_s"] / r["baseline_s"], rel=0.05)
