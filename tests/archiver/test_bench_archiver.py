"""The archiver benchmark runs with its smallest options and prints the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "archiver.py"


@pytest.mark.slow  # a whole benchmark run (make test-all)
def test_archiver_benchmark_smallest_run() -> None:
    argv = ["--exposures", "1", "--detectors", "1", "--speedup", "39", "--no-compare-no-butler"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["benchmark"] == "archiver"
    assert {"requirement", "setup", "figure", "baseline", "ratio", "ratio_meaning"} <= set(result)
    figure = result["figure"]
    assert figure["butler"] is True
    assert figure["files"] == 1
    for key in (
        "FITS_MB_per_s",
        "files_per_s",
        "exposures_per_nominal_visit_time",
        "x_nominal_per_detector_stream",
    ):
        assert figure[key] > 0
    assert isinstance(figure["meets_2x_nominal"], bool)
    assert set(figure["definitions"]) >= {"x_nominal_per_detector_stream", "meets_2x_nominal"}
    assert result["baseline"]["MB_per_s"] > 0
    assert result["baseline"]["bytes_per_file"] == figure["bytes_per_file"]
    assert result["ratio"] > 0
    assert result["catch_up_butler_false"] is None
    latency = result["latency"]
    assert latency["files"] == 1
    assert latency["period_s"] == 1.0
    assert {"p50", "p99", "max"} <= set(latency["latency_s"])
    assert 0 <= latency["latency_s"]["p50"] <= latency["latency_s"]["max"]
    assert latency["offered_MB_per_s"] > 0
