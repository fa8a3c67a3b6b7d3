"""The Prompt Processing benchmark runs with tiny options and prints the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ldf.prompt.models import STAGES
from ldf.sim.instruments import get_instrument

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "prompt.py"
SCALE = 0.15


def run_bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # a whole benchmark run (make test-all)
def test_prompt_benchmark_smallest_run() -> None:
    proc = run_bench(
        "--scale", str(SCALE), "--detectors", "1", "--repeats", "1", "--visit-detectors", "2"
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["benchmark"] == "prompt"
    assert r["target_s"] == 5.0
    assert r["scale"] == SCALE
    assert r["cpu_steal_fraction"] is None or 0.0 <= r["cpu_steal_fraction"] <= 1.0
    det = get_instrument("LSSTCam", SCALE).detector(r["timed_detectors"][0])
    assert r["detector_shape"] == [det.ny, det.nx]
    assert r["runs"] == r["runs_kept"] == 1  # one round: it is kept (and says so)

    # The per-detector figure is the worker's wall time: its stages plus what no stage times
    # (one run: medians are that run's values).
    assert set(r["stages_s"]) == set(STAGES)
    assert sum(r["stages_s"].values()) == pytest.approx(r["stages_sum_s"], abs=0.01)
    assert r["outside_stages_s"] >= 0
    assert r["detector_s"] == pytest.approx(r["stages_sum_s"] + r["outside_stages_s"], abs=0.002)
    assert r["meets_target"] is (r["detector_s"] <= r["target_s"])

    # The I/O floor: the raw read and the calexp + difference planes (+ alerts) written.
    floor = r["io_floor"]
    assert r["io_floor_s"] == pytest.approx(floor["read_s"] + floor["write_s"], abs=0.002)
    assert floor["read_s"] > 0
    assert floor["write_s"] > 0
    assert floor["written_bytes"] >= 2 * det.ny * det.nx * (4 + 4 + 2)
    assert r["ratio"] == pytest.approx(r["detector_s"] / r["io_floor_s"], rel=0.02)

    # Science yield read back from the APDB and scored against the renderer's truth.
    one = r["per_detector"][r["timed_detectors"][0]]
    assert one["dia_sources"] == r["dia_sources"] > 0
    assert 0 < r["alerts"] <= r["dia_sources"]
    assert one["validation"]["dia_sources"] == r["dia_sources"]  # the APDB holds this run's
    assert 0 < r["recovered_snr10"] <= r["transients_snr10"]
    assert 0 <= r["false_dia_sources"] < r["dia_sources"]

    # Every core busy with a detector, no service: both processes report.
    busy = r["all_cores_busy"]
    assert busy["processes"] == 2
    assert 0 < busy["detector_s"] <= busy["max_s"]
    assert set(busy["stages_s"]) == set(STAGES)
    assert busy["slowdown_vs_one_core"] == pytest.approx(
        busy["detector_s"] / r["detector_s"], rel=0.02
    )

    # End to end: as many detectors as workers, both visits of the pair fully processed.
    for key in ("visit", "first_visit"):
        v = r[key]
        assert v["detectors"] == v["workers"] == 2
        assert 0 < v["latency_p50_s"] <= v["latency_p98_s"] <= v["wall_s"] + 0.5
        assert v["alerts"] > 0
        assert set(v["stage_p50_s"]) == set(STAGES)
    assert r["visit"]["obs_id"] != r["first_visit"]["obs_id"]
    assert r["setup_s"] > 0
    assert r["seeded"]["templates"] > 0
    assert r["seeded"]["calibs"] > 0


def test_prompt_benchmark_refuses_bad_options() -> None:
    proc = run_bench("--repeats", "0")
    assert proc.returncode == 2
    assert "--repeats must be >= 1" in proc.stderr
    proc = run_bench("--scale", "1.5")
    assert proc.returncode == 2
    assert "--scale must be in (0, 1]" in proc.stderr
