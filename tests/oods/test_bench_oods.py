"""The OODS benchmark runs with its smallest options and prints the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "oods.py"


@pytest.mark.slow  # a whole benchmark run (make test-all)
def test_oods_benchmark_smallest_run() -> None:
    argv = ["--mb", "1", "--downloads", "2", "--entries", "20", "--searches", "5"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["benchmark"] == "oods"
    assert result["download_MB_per_s"] > 0
    assert result["search_requests_per_s"] > 0
    for peer in ("http_server", "starlette_static"):
        assert result["baselines"][peer]["download_MB_per_s"] > 0
        assert result["baselines"][peer]["search_requests_per_s"] > 0
    assert set(result["ratio"]) == {
        "download_vs_http_server",
        "download_vs_starlette_static",
        "search_vs_http_server_static_answer",
        "search_vs_starlette_static_answer",
    }
    assert result["leases_left_after"] == 0
