"""The Backbone benchmark runs with its smallest options and prints the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "backbone.py"


@pytest.mark.slow  # a whole benchmark run (make test-all)
def test_backbone_benchmark_smallest_run() -> None:
    argv = ["--files", "3", "--checksum-files", "1", "--checksum-mb", "1", "--audit-files", "50"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["benchmark"] == "backbone"
    assert result["catalog"] == "sqlite"
    for section in ("ingest", "checksum", "replication", "audit"):
        assert {"figure", "baseline", "ratio", "ratio_meaning"} <= result[section].keys()
    assert result["ingest"]["files"] == 3
    assert result["ingest"]["figure"]["files_per_s"] > 0
    assert result["ingest"]["baseline"]["files_per_s"] > 0
    assert result["checksum"]["figure"]["MB_per_s"] > 0
    assert {"md5sum", "b3sum"} <= result["checksum"]["baseline"].keys()
    assert result["replication"]["figure"]["MB_per_s"] > 0
    assert result["replication"]["baseline"]["MB_per_s"] > 0
    assert result["audit"]["files"] == 50
    assert result["audit"]["figure"]["files_per_s"] > 0
    assert result["audit"]["baseline"]["files_per_s"] > 0
