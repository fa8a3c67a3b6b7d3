"""The Telemetry Gateway benchmark runs with tiny options and prints the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "telemetry.py"


def run_bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # a whole benchmark run (make test-all)
def test_telemetry_benchmark_smallest_run() -> None:
    proc = run_bench("--messages", "40", "--producers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["benchmark"] == "telemetry"
    assert (r["bus"], r["database"], r["producers"], r["batch"]) == ("embedded", "sqlite", 2, 1)
    assert r["messages"] == 40
    # Everything reached the bus, once, in each producer's order; nothing left behind.
    assert (r["lost"], r["duplicates_on_bus"], r["out_of_order"], r["backlog_after"]) == (
        0, 0, 0, 0,
    )  # fmt: skip
    assert r["messages_per_s"] > 0
    assert 0 < r["end_to_end_messages_per_s"] <= r["messages_per_s"] * 1.01
    lat = r["latency_to_bus_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert 0 < r["http_latency_ms"]["p50"] <= r["http_latency_ms"]["p99"]
    direct = r["baseline"]["direct_bus_messages_per_s"]
    assert direct > 0
    assert r["ratio"]["gateway_vs_direct_bus"] == round(r["end_to_end_messages_per_s"] / direct, 3)


def test_telemetry_benchmark_batches_and_bad_options() -> None:
    proc = run_bench("--messages", "40", "--producers", "1", "--batch", "10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert (r["batch"], r["messages"], r["lost"], r["out_of_order"]) == (10, 40, 0, 0)
    proc = run_bench("--producers", "0")
    assert proc.returncode == 2
    assert "--producers must be >= 1" in proc.stderr
    proc = run_bench("--messages", "1", "--producers", "2")
    assert proc.returncode == 2
    assert "--messages must be >= --producers" in proc.stderr


def test_run_is_callable_from_another_benchmark() -> None:
    code = (
        f"import sys, json; sys.path.insert(0, {str(BENCH.parent)!r}); import telemetry; "
        "r = telemetry.run(messages=8, producers=2); print(json.dumps(r))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["messages"] == 8
