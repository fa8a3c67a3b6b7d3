"""The alert distribution benchmark runs with tiny options and prints the figures it promises."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engines import NATS_URL, require_nats

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "alerts.py"


@pytest.mark.slow  # a whole benchmark run (make test-all)
def test_alerts_benchmark_smallest_run() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--alerts", "120", "--batch", "40", "--no-telemetry"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["benchmark"] == "alerts"
    assert r["transport"] == "http"
    assert r["alerts"] == 120
    assert r["feeds"] == 6
    assert r["stalled_feeds"] == ["ampel"]
    assert r["cpu_steal_fraction"] is None or 0.0 <= r["cpu_steal_fraction"] <= 1.0
    assert 70_000 < r["packet_bytes"] < 90_000  # DMTN-102's ~80 KB
    assert set(r["per_feed"]) == {"validation", "alerce", "fink", "lasair", "antares"}
    for feed in r["per_feed"].values():
        assert feed["received"] == 120
        assert feed["done_s"] <= r["time_to_last_healthy_feed_s"]
    # The stalled feed holds the whole visit and its alarm is up; nobody waited for it.
    assert r["stalled_feed"]["lag_entries"] == 121  # 120 alerts + the manifest
    assert r["stalled_feed"]["lagging"]
    assert r["ratio"] == pytest.approx(r["time_to_last_healthy_feed_s"] / r["baseline_s"], rel=0.05)
    assert r["store_floor"]["seconds"] > 0
    assert r["store_floor"]["MB_per_s"] > 0


async def _streams_of(prefix: str, delete: bool) -> list[str]:
    """The streams of a benchmark run's NATS prefix (deleted with ``delete``)."""
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        names = [i.config.name or "" for i in await js.streams_info()]
        mine = [n for n in names if n.startswith(prefix.upper() + "_")]
        for name in mine if delete else []:
            await js.delete_stream(name)
        return mine
    finally:
        await nc.close()


@pytest.mark.slow  # a whole benchmark run (make test-all)
@pytest.mark.nats
def test_alerts_benchmark_smallest_run_over_nats() -> None:
    require_nats()
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--alerts", "120", "--batch", "40", "--no-telemetry",
         "--transport", "nats", "--nats-url", NATS_URL, "--nats-max-backlog", "20"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    prefix = r["nats"]["prefix"]
    # The run deleted its streams (the ldf feeds' and the baseline's).
    assert "deleted JetStream streams" in proc.stderr
    assert asyncio.run(_streams_of(prefix, delete=True)) == []
    assert (r["benchmark"], r["transport"], r["alerts"], r["feeds"]) == ("alerts", "nats", 120, 6)
    assert r["stalled_feeds"] == ["ampel"]
    assert 70_000 < r["packet_bytes"] < r["nats"]["max_payload"]
    assert set(r["per_feed"]) == {"validation", "alerce", "fink", "lasair", "antares"}
    for feed in r["per_feed"].values():
        assert feed["received"] == 120
        assert feed["done_s"] <= r["time_to_last_healthy_feed_s"]
    # The stalled feed's pump paused at max_backlog (20): the rest of the visit, the manifest
    # at least, waits in the service, whose lag alarm fired. Nobody waited for it.
    stalled = r["stalled_feed"]
    assert 20 <= stalled["jetstream_pending"] < 121
    # Its lag counts what the service has not published and what JetStream holds unread.
    assert stalled["lag_entries"] == 121  # 120 alerts + manifest
    assert stalled["lagging"]
    assert "nats-py" in r["baseline"]
    assert r["ratio"] == pytest.approx(r["time_to_last_healthy_feed_s"] / r["baseline_s"], rel=0.05)
