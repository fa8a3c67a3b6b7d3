"""Benchmark: simulated exposures per second at full LSSTCam detector size, one core.

Renders a sample of full-size (4072×4000) science detectors of one science visit and writes
each into the camera DAQ store, in this process only (one core). Baseline in the same run: a
plain ``numpy.ndarray.tofile`` of the same bytes into the same directory. The figure for a
whole exposure extrapolates the per-detector time to LSSTCam's 205 files (189 science CCDs,
8 wavefront and 8 guider sensors, by pixel count).

Requirement it answers: archiving must keep up with the nominal frame rate (one exposure every
~34–39 s, LDM-230 2.2.2.2); the simulator feeding it should not be the bottleneck of tests.

Usage: python benchmarks/sim.py [--detectors K] [--scale S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the figure claims

from ldf.sim.camera import render_detector
from ldf.sim.daq import DaqStore
from ldf.sim.instruments import get_instrument
from ldf.sim.night import _conditions_model
from ldf.sim.scheduler import plan_night
from ldf.sim.sky import Sky


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", type=int, default=3, help="Detectors rendered (sample).")
    parser.add_argument("--scale", type=float, default=1.0, help="Pixel scale (1 = full size).")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    inst = get_instrument("LSSTCam", scale=args.scale)
    plan = plan_night(
        "LSSTCam", day_obs=20261121, science_visits=1, seed=args.seed,
        calibrations=False, conditions=_conditions_model,
    )  # fmt: skip
    visit = plan.exposures[0].visit
    sky = Sky(args.seed)
    science = inst.science_detectors()[: args.detectors]
    tmp = Path(tempfile.mkdtemp(prefix="ldf-bench-sim-"))
    try:
        daq = DaqStore(tmp / "daq")
        # Warm up caches (star catalogue tile, PSF) outside the timing, as a warm worker has them.
        render_detector(inst, science[0], visit, sky, seed=args.seed)
        sim_s = 0.0
        raw_s = 0.0
        nbytes = 0
        for det in science:
            t0 = time.perf_counter()
            readout = render_detector(inst, det, visit, sky, seed=args.seed)
            manifest = daq.write_detector(visit, det.name, readout.amps)
            sim_s += time.perf_counter() - t0
            nbytes += manifest.nbytes
            t0 = time.perf_counter()
            with open(tmp / f"{det.name}.tofile", "wb") as f:
                for a in readout.amps.values():
                    a.tofile(f)
            raw_s += time.perf_counter() - t0
        pixels = {d.name: sum(a.nx * a.ny for a in d.amplifiers) for d in inst.detectors}
        science_px = sum(a.nx * a.ny for a in science[0].amplifiers)
        exposure_equiv = sum(pixels.values()) / science_px  # detectors-worth of pixels
        per_det = sim_s / len(science)
        per_exposure = per_det * exposure_equiv
        raw_per_exposure = raw_s / len(science) * exposure_equiv
        print(
            json.dumps(
                {
                    "benchmark": "sim",
                    "requirement": "feed archiving at the nominal frame rate (LDM-230 2.2.2.2)",
                    "scale": args.scale,
                    "detectors_sampled": len(science),
                    "detector_pixels": science_px,
                    "figure": {
                        "exposures_per_s": round(1 / per_exposure, 5),
                        "seconds_per_exposure": round(per_exposure, 2),
                        "seconds_per_detector": round(per_det, 4),
                        "MB_per_s": round(nbytes / 1e6 / sim_s, 1),
                    },
                    "baseline": {
                        "what": "numpy tofile of the same bytes, same run, same directory",
                        "seconds_per_exposure": round(raw_per_exposure, 3),
                        "MB_per_s": round(nbytes / 1e6 / raw_s, 1),
                    },
                    "ratio": round(per_exposure / raw_per_exposure, 2),
                    "ratio_meaning": "simulate+write time / plain write time (lower is better)",
                    "cores": 1,
                    "python": sys.version.split()[0],
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
