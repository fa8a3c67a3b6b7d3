"""Benchmark: Prompt Processing per full-size LSSTCam detector on one core, and per visit.

Setup (timed on its own, reported as ``setup_s``): a fresh LDF_HOME; the night's first two
science visits from ``plan_night`` (a WFD pair: same field and band; conditions from
``conditions_for`` at mid-exposure); ``seed_survey`` makes the reference catalogue, the
master calibrations (bias, dark, flat in the band, from rendered calibration raws) and the
templates (three earlier visits of the field rendered, archived into the Data Backbone and
coadded) for the ``--detectors`` science CCDs nearest the focal-plane centre, plus as many
more as the visit needs (one per core); the APDB is created empty (SQLite). The visits' raws
are rendered at ``--scale`` (1.0: full size, 4096×4004 pixels for the central E2V CCDs,
4072×4000 for ITL) and written as the archiver writes them; the renderer's truth (injected
transients and variables) is kept.

1. **Per detector, one core**: ``OMP_NUM_THREADS`` and its kin are 1 before numpy is imported
   and the process is pinned to one CPU. The first visit's inputs are preloaded into a
   scratch directory as on ``nextVisit`` (:class:`ldf.prompt.inputs.Preloader`), and each
   detector's template is warped onto the grid the commanded pointing predicts, as an idle
   worker does while the exposure is taken (:func:`ldf.prompt.worker.prewarp_template`;
   timed on its own: ``prewarp``; ``--no-prewarp`` leaves it out, the detector then warps
   after the raw). Then :func:`ldf.prompt.worker.process_detector` — the whole chain a warm
   worker runs: read → ISR → characterization → astrometry → photometry → template (the
   prewarp shifted by the pointing error) → difference imaging → DIA sources →
   association into the APDB → alert packets — runs in this process on each of the
   ``--detectors`` raws, ``--repeats`` rounds. The first round warms caches (imports,
   skymap, APDB schema) and is left out when there are more. ``detector_s`` is the median
   wall time of ``process_detector`` over the rest (everything the worker does, including
   what no stage timer covers, e.g. loading the master calibrations: ``outside_stages_s``);
   ``stages_s`` is each stage's median (``DetectorOutcome.stage_s``). Before every run the
   APDB is put back to its empty state (untimed), so every run does the same work as a
   detector's first visit (DiaObjects created, DiaSources stored, an alert per DiaSource).
   Science yield is scored against the renderer's truth
   (:func:`ldf.prompt.validation.score_detector`: recovered transients at S/N ≥ 10, false
   DiaSources), reading the run's DiaSources back from the APDB.
2. **I/O floor, same run, same files**: what any pipeline must spend on the same detector:
   read the raw (:func:`ldf.pipelines.isr.read_raw`, as the worker reads it) and write the
   products a production pipeline persists — the calibrated exposure and the difference
   exposure, each image (float32) + variance (float32) + mask (uint16) at the detector's
   size, plus the detector's alert file (as many bytes as the pipeline's) — with
   ``ndarray.tofile`` and ``os.fsync``. This worker keeps the two exposures in memory (it
   writes only APDB rows and alerts), so the floor is what a pipeline writing Rubin's
   prompt data products would at least spend. Measured after each pipeline run (same
   page-cache state), the same rounds left out; ratio = ``detector_s`` / ``io_floor_s``.
3. **All cores busy, no service**: one plain process per core, each running
   ``process_detector`` on its own detector of the first visit (a warm-up run each, then
   all started together at a barrier). The machine's per-detector time when every core
   works — cores share memory bandwidth and the last-level cache, and most stages stream
   16-Mpixel float32 planes; on a virtual machine the host's other tenants add to it —
   the figure to hold the visit's latency against (what remains is the service's own
   cost); the slowdown against (1) is reported.
4. **End to end, two visits**: a :class:`ldf.prompt.service.PromptService` with
   ``policy.workers`` = the usable cores and visits of as many detectors; the warm
   forkserver pool is started first (outside the clock). Per visit: ``on_next_visit``
   (preload), the exposure (``run`` until idle: the workers prewarp the templates;
   ``prewarp_s`` against the exposure time), the raws put in the OODS,
   ``on_end_readout(now)`` — the latency clock starts
   — then ``on_image`` per detector and ``run(until_idle=True)``. The pair's first visit
   (APDB emptied again) is the first work of freshly forked workers (``first_visit``); the
   second meets warm workers and the first visit's DiaObjects (``visit``: a night's steady
   state). Reported: the service's own per-visit report (``reports()``: alert latency p50
   and p98 from the end of readout over the visit's alerts, per-stage medians) and the
   wall time.

Requirement it answers: Prompt Processing must process a full-size detector in ≤ 5 s on one
core (the project's per-detector budget), so that a visit's alerts leave within OTT1 = 60 s
of the end of readout (LDM-230 2.1, :data:`ldf.prompt.service.OTT1_S`) on a cluster with a
core per CCD. Progress goes to stderr; the result is one JSON object on stdout.

Usage: python benchmarks/prompt.py [--detectors K] [--repeats R] [--scale S] [--seed N]
       [--visit-detectors V]
"""

from __future__ import annotations

import os

# One core, as the figure claims: set before numpy (or anything importing it) loads.
for _var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ[_var] = "1"

import sys  # noqa: E402

# The per-detector runs happen in this process: configure its allocator as the warm workers'
# is (glibc reads these at start-up, hence the re-exec), or every big temporary page-faults
# afresh as no worker's does (measured: template 1.5 s against 0.5 s, dia 0.9 against 0.5).
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
if any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):  # == ldf.prompt.pool's
    os.environ.update(_MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])  # noqa: S606 (this script again)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from ldf.config import Settings, load_settings  # noqa: E402
from ldf.prompt.inputs import InputPaths  # noqa: E402
from ldf.prompt.models import STAGES  # noqa: E402
from ldf.sim.models import VisitSpec  # noqa: E402

INSTRUMENT = "LSSTCam"
DAY_OBS = 20261121
TARGET_S = 5.0
"""Per full-size detector on one core (the project's budget)."""


STEAL_MEANING = (
    "share of the run's CPU demand the virtual machine's host took (/proc/stat steal): "
    "figures measured above ~0.1 are slower than the code"
)


def log(message: str) -> None:
    print(f"[prompt bench] {message}", file=sys.stderr, flush=True)


def usable_cores() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None


@dataclass
class Raw:
    """One rendered raw of the science visit and the renderer's truth."""

    detector: str
    path: Path
    truth: list[Any]
    shape: tuple[int, int]
    read_noise_e: float


def science_visits(seed: int) -> list[VisitSpec]:
    """The night's first two science visits (a WFD pair: same field and band), each with
    its conditions at mid-exposure."""
    from ldf.sim.conditions import conditions_for
    from ldf.sim.scheduler import plan_night

    plan = plan_night(INSTRUMENT, day_obs=DAY_OBS, science_visits=2, seed=seed, calibrations=False)
    out = []
    for p in plan.exposures:
        v = p.visit
        if v.obs_type != "science":
            continue
        mjd = v.start_tai_mjd + v.exp_time_s / 2 / 86400
        cond = conditions_for(
            seed, mjd, v.band or "r", v.airmass, ra_deg=v.ra_deg, dec_deg=v.dec_deg
        )
        out.append(v.model_copy(update={"conditions": cond}))
    if len(out) != 2:
        raise RuntimeError(f"plan_night gave {len(out)} science visits, expected 2")
    return out


def seed_facility(
    settings: Settings, visits: list[VisitSpec], detectors: list[str], *, scale: float, seed: int
) -> dict[str, Any]:
    """Refcat, master calibrations, templates and an empty APDB for the visit's detectors."""
    from ldf.pipelines.apdb import PromptApdb
    from ldf.prompt.seed import seed_survey

    report = seed_survey(
        settings, visits, instrument=INSTRUMENT, detectors=detectors, scale=scale, seed=seed,
        status=log,
    )  # fmt: skip
    home = InputPaths(settings.home)
    PromptApdb.create(f"sqlite:///{home.apdb / 'apdb.sqlite3'}", config_path=home.apdb_config)
    return report


def render_raws(
    settings: Settings, visit: VisitSpec, detectors: list[str], directory: Path, *, seed: int
) -> dict[str, Raw]:
    """The visit's raws as the archiver writes them (FITS, CHECKSUM), truth kept."""
    from ldf.archiver.rawfits import build_hdulist, raw_filename, write_raw
    from ldf.prompt.seed import night_sky
    from ldf.sim.camera import render_detector
    from ldf.sim.instruments import get_instrument

    scale = settings.sim.scale
    camera = get_instrument(INSTRUMENT, scale)
    sky = night_sky(seed, settings.sim.sky(scale))
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in detectors:
        det = camera.detector(name)
        readout = render_detector(camera, det, visit, sky, seed=seed)
        path = directory / raw_filename(visit, name)
        write_raw(path, build_hdulist(camera, det, visit, readout.amps), fsync=True)
        out[name] = Raw(
            detector=name,
            path=path,
            truth=list(readout.truth),
            shape=(det.ny, det.nx),
            read_noise_e=float(np.mean([a.read_noise for a in det.amplifiers])),
        )
    return out


class ApdbReset:
    """Put the APDB (database, config, outage buffer) back to its state at creation."""

    def __init__(self, home: InputPaths, keep: Path) -> None:
        self.live = home.apdb
        self.keep = keep
        shutil.copytree(self.live, self.keep)

    def __call__(self) -> None:
        shutil.rmtree(self.live)
        shutil.copytree(self.keep, self.live)


def dia_sources_of(settings: Settings, visit: VisitSpec, raw: Raw) -> Any:
    """The DiaSources the run stored for this detector-visit (read back from the APDB)."""
    from ldf.pipelines.apdb import PromptApdb
    from ldf.sim.instruments import get_instrument

    det_id = get_instrument(INSTRUMENT, settings.sim.scale).detector(raw.detector).id
    db = PromptApdb.open(InputPaths(settings.home).apdb_config)
    try:
        sources = db.visit_sources([visit.exposure_id])
    finally:
        db.close()
    return sources[sources["detector"] == det_id].reset_index(drop=True)


def score(settings: Settings, visit: VisitSpec, raw: Raw, outcome: Any) -> dict[str, Any]:
    """Recovery and false DiaSources against the renderer's truth."""
    from ldf.pipelines.types import AB_NJY_ZERO_POINT
    from ldf.prompt.validation import score_detector
    from ldf.sim.instruments import get_instrument

    qa = outcome.qa
    seeing, sky, zp = qa.get("seeing_arcsec"), qa.get("sky_e_per_pixel"), qa.get("zero_point")
    if seeing is None or sky is None:
        return {"error": "no seeing or sky level in the QA"}
    camera = get_instrument(INSTRUMENT, settings.sim.scale)
    njy = 10 ** (-0.4 * (zp - AB_NJY_ZERO_POINT)) / visit.exp_time_s if zp is not None else None
    return score_detector(
        dia_sources_of(settings, visit, raw),
        raw.truth,
        sky_e=float(sky),
        read_noise_e=raw.read_noise_e,
        fwhm_px=float(seeing) / camera.pixel_scale_arcsec,
        njy_per_electron=njy,
    )


def io_floor(raw: Raw, directory: Path, alert_bytes: int) -> dict[str, float]:
    """Read the raw as the worker does; write calexp + difference + alerts, fsynced."""
    from ldf.pipelines.isr import read_raw

    t0 = time.perf_counter()
    image = read_raw(raw.path)
    read_s = time.perf_counter() - t0
    del image
    directory.mkdir(parents=True, exist_ok=True)
    ny, nx = raw.shape
    planes: dict[str, np.ndarray] = {  # made untimed: the pipeline has them in memory
        "image": np.ones((ny, nx), np.float32),
        "variance": np.ones((ny, nx), np.float32),
        "mask": np.zeros((ny, nx), np.uint16),
    }
    alerts = np.zeros(alert_bytes, np.uint8)
    outputs = [
        (directory / f"{product}-{plane}.bin", array)
        for product in ("calexp", "difference")
        for plane, array in planes.items()
    ]
    outputs.append((directory / "alerts.bin", alerts))
    t0 = time.perf_counter()
    for path, array in outputs:
        with open(path, "wb") as f:
            array.tofile(f)
            f.flush()
            os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    nbytes = sum(path.stat().st_size for path, _ in outputs)
    for path, _ in outputs:
        path.unlink()
    return {"read_s": read_s, "write_s": write_s, "written_bytes": nbytes}


def alert_file_bytes(settings: Settings, visit: VisitSpec, detector: str) -> int:
    from ldf.pipelines.alertpacket import LocalAlertSink

    path = LocalAlertSink(InputPaths(settings.home).alerts).path(visit.exposure_id, detector)
    return path.stat().st_size if path.exists() else 0


def preload(settings: Settings, visit: VisitSpec, detectors: list[str], root: Path) -> Path:
    """The visit's inputs copied into a scratch directory, as on nextVisit; its path."""
    from ldf.prompt.inputs import Preloader
    from ldf.prompt.models import NextVisit

    preloader = Preloader(settings.home, root)
    nv = NextVisit.model_validate(visit.model_dump(mode="json"))
    report = preloader.preload(nv, detectors, camera_scale=settings.sim.scale)
    missing = {d: r["missing"] for d, r in report["detectors"].items() if r["missing"]}
    if missing:
        raise RuntimeError(f"preload: missing inputs {missing}")
    return preloader.scratch_for(visit.exposure_id)


def prewarp(settings: Settings, visit: VisitSpec, detectors: list[str], scratch: Path) -> float:
    """Each detector's template warped onto its predicted grid, as an idle worker does on
    nextVisit (in this process, one after the other); the median seconds per detector."""
    from ldf.prompt.models import PrewarpJob
    from ldf.prompt.worker import prewarp_template

    seconds = []
    for name in detectors:
        job = PrewarpJob(
            instrument=INSTRUMENT,
            exposure_id=visit.exposure_id,
            detector=name,
            band=visit.band or "r",
            ra_deg=visit.ra_deg,
            dec_deg=visit.dec_deg,
            rot_sky_deg=visit.rot_sky_deg,
            scratch=str(scratch),
            home=str(settings.home),
            camera_scale=settings.sim.scale,
        )
        result = json.loads(prewarp_template(job.model_dump_json()))
        if not result["ok"]:
            raise RuntimeError(f"prewarp of {name}: {result['reason']}")
        seconds.append(result["seconds"])
    return float(np.median(seconds))


def job_json(settings: Settings, visit: VisitSpec, raw: Raw, scratch: Path) -> str:
    """The DetectorJob the service would hand a worker for this raw (no deadline)."""
    from ldf.prompt.models import DetectorJob

    policy = settings.policies.prompt
    return DetectorJob(
        instrument=INSTRUMENT,
        exposure_id=visit.exposure_id,
        detector=raw.detector,
        raw_path=str(raw.path),
        scratch=str(scratch),
        home=str(settings.home),
        camera_scale=settings.sim.scale,
        qa_first=policy.qa_first,
        detection_threshold=policy.detection_threshold,
        association_radius_arcsec=policy.association_radius_arcsec,
    ).model_dump_json()


def per_detector(
    settings: Settings,
    visit: VisitSpec,
    raws: dict[str, Raw],
    reset: ApdbReset,
    *,
    repeats: int,
    scratch: Path,
    tmp: Path,
    prewarped: bool,
) -> dict[str, Any]:
    """``process_detector`` in this process on each raw, ``repeats`` rounds; I/O floor."""
    from ldf.prompt.models import DetectorOutcome, JobState
    from ldf.prompt.worker import process_detector

    runs: list[dict[str, Any]] = []
    for k in range(repeats):
        for name, raw in raws.items():
            reset()
            job = job_json(settings, visit, raw, scratch)
            t0 = time.perf_counter()
            outcome = DetectorOutcome.model_validate_json(process_detector(job))
            wall = time.perf_counter() - t0
            if outcome.state != JobState.DONE:
                raise RuntimeError(
                    f"{name}: {outcome.state} in {outcome.failed_stage}: {outcome.reason}"
                )
            if outcome.template_prewarped != prewarped:
                raise RuntimeError(
                    f"{name}: template_prewarped is {outcome.template_prewarped}, "
                    f"expected {prewarped}"
                )
            floor = io_floor(raw, tmp / "floor", alert_file_bytes(settings, visit, name))
            sc = score(settings, visit, raw, outcome)
            total = sum(outcome.stage_s.values())
            log(
                f"round {k + 1}/{repeats} {name}: {wall:.2f} s ({total:.2f} s in stages), "
                f"floor {floor['read_s'] + floor['write_s']:.2f} s, "
                f"{outcome.n_dia_sources} DiaSources, {outcome.n_alerts} alerts, "
                f"{sc.get('false')} false"
            )
            runs.append(
                {
                    "round": k,
                    "detector": name,
                    "total_s": total,
                    "wall_s": wall,
                    "stage_s": dict(outcome.stage_s),
                    "floor": floor,
                    "dia_sources": outcome.n_dia_sources,
                    "alerts": outcome.n_alerts,
                    "qa": outcome.qa,
                    "score": sc,
                }
            )
    kept = [r for r in runs if r["round"] > 0] or runs
    stages = {s: median([r["stage_s"][s] for r in kept if s in r["stage_s"]]) for s in STAGES}
    floor_s = [r["floor"]["read_s"] + r["floor"]["write_s"] for r in kept]
    last = {r["detector"]: r for r in runs if r["round"] == repeats - 1}
    return {
        "detector_s": median([r["wall_s"] for r in kept]),
        "stages_s": {s: v for s, v in stages.items() if v is not None},
        "stages_sum_s": median([r["total_s"] for r in kept]),
        "outside_stages_s": median([r["wall_s"] - r["total_s"] for r in kept]),
        "io_floor_s": median(floor_s),
        "io_floor": {
            "read_s": median([r["floor"]["read_s"] for r in kept]),
            "write_s": median([r["floor"]["write_s"] for r in kept]),
            "written_bytes": kept[0]["floor"]["written_bytes"],
        },
        "runs_kept": len(kept),
        "runs": len(runs),
        "first_round_s": median([r["wall_s"] for r in runs if r["round"] == 0]),
        "per_detector": {
            name: {
                "seconds": round(r["wall_s"], 3),
                "dia_sources": r["dia_sources"],
                "alerts": r["alerts"],
                "seeing_arcsec": _round(r["qa"].get("seeing_arcsec")),
                "n_sources": r["qa"].get("n_sources"),
                "astrometry_rms_arcsec": _round(r["qa"].get("astrometry_rms_arcsec")),
                "zero_point": _round(r["qa"].get("zero_point")),
                "validation": {k: _round(v, 4) for k, v in r["score"].items()},
            }
            for name, r in last.items()
        },
        "dia_sources": sum(r["dia_sources"] for r in last.values()),
        "alerts": sum(r["alerts"] for r in last.values()),
        "false_dia_sources": sum(int(r["score"].get("false", 0)) for r in last.values()),
        "transients_snr10": sum(int(r["score"].get("transients_snr10", 0)) for r in last.values()),
        "recovered_snr10": sum(int(r["score"].get("recovered_snr10", 0)) for r in last.values()),
    }


def _busy_worker(job: str, barrier: Any, results: Any) -> None:
    """One process of :func:`all_cores_busy`: a warm-up run, then the timed one."""
    from ldf.prompt.models import DetectorOutcome
    from ldf.prompt.worker import process_detector

    process_detector(job)  # imports, caches, first touch of the big buffers
    barrier.wait()  # the main process empties the APDB between these two
    barrier.wait()
    t0 = time.perf_counter()
    out = DetectorOutcome.model_validate_json(process_detector(job))
    results.put((out.detector, time.perf_counter() - t0, str(out.state), out.stage_s))


def all_cores_busy(
    settings: Settings,
    visit: VisitSpec,
    raws: dict[str, Raw],
    reset: ApdbReset,
    *,
    scratch: Path,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """``process_detector`` in one plain process per raw, all started together (warm).

    The machine's per-detector time with every core busy, without the service: the figure
    the visit's latency compares with (shared memory bandwidth and caches slow each core).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(raws) + 1)
    results = ctx.Queue()
    jobs = [job_json(settings, visit, raw, scratch) for raw in raws.values()]
    procs = [ctx.Process(target=_busy_worker, args=(j, barrier, results)) for j in jobs]
    reset()
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=timeout_s)  # every process warm
        reset()
        barrier.wait(timeout=timeout_s)  # go
        got = [results.get(timeout=timeout_s) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    bad = [(d, state) for d, _, state, _ in got if state != "done"]
    if bad:
        raise RuntimeError(f"all cores busy: not done {bad}")
    walls = [w for _, w, _, _ in got]
    stages = {s: median([st[s] for _, _, _, st in got if s in st]) for s in STAGES}
    return {
        "processes": len(procs),
        "detector_s": median(walls),
        "max_s": round(max(walls), 3),
        "stages_s": {s: v for s, v in stages.items() if v is not None},
    }


def _round(value: Any, digits: int = 3) -> Any:
    """Floats rounded for the report; anything else as it is."""
    return round(value, digits) if isinstance(value, float) else value


def one_visit(svc: Any, visit: VisitSpec, raws: dict[str, Raw]) -> dict[str, Any]:
    """nextVisit (preload), raws into the OODS, endReadout (clock), imageInOODS, run."""
    settings = svc.settings
    dets = list(raws)
    t_announce = time.perf_counter()
    svc.on_next_visit(visit.model_dump(mode="json"), detectors=dets)
    preload_s = time.perf_counter() - t_announce
    # The exposure: the idle workers prewarp the detectors' templates (policy permitting).
    t_exposure = time.perf_counter()
    svc.run(until_idle=True)
    prewarp_s = time.perf_counter() - t_exposure
    oods = settings.home / "oods" / INSTRUMENT / str(visit.day_obs) / visit.obs_id
    oods.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, raw in raws.items():
        paths[name] = oods / raw.path.name
        shutil.copyfile(raw.path, paths[name])
    os.sync()  # the copies reach the disk before the clock, not during
    log(f"visit {visit.obs_id}: endReadout, {len(dets)} detectors")
    t0 = time.perf_counter()
    svc.on_end_readout(visit.exposure_id, time.time())
    for name in dets:
        svc.on_image(visit.exposure_id, name, paths[name])
    finished = svc.run(until_idle=True)
    wall = time.perf_counter() - t0
    reports = [r for r in svc.reports() if r.exposure_id == visit.exposure_id]
    if len(reports) != 1:
        raise RuntimeError(f"visit: {len(reports)} reports for {visit.exposure_id}")
    rep = reports[0]
    jobs = svc.store.jobs(visit.exposure_id)
    bad = [(j["detector"], j["state"], j["reason"]) for j in jobs if j["state"] != "done"]
    if finished != len(dets) or bad:
        raise RuntimeError(f"visit: {finished} of {len(dets)} finished; not done: {bad}")
    log(
        f"visit {visit.obs_id}: latency p50 {rep.latency_p50_s} s, p98 {rep.latency_p98_s} s, "
        f"{rep.alerts} alerts"
    )
    return {
        "obs_id": visit.obs_id,
        "detectors": len(dets),
        "workers": svc.policy.workers,
        "latency_p50_s": rep.latency_p50_s,
        "latency_p98_s": rep.latency_p98_s,
        "within_ott1": rep.within_ott1,
        "alerts": rep.alerts,
        "wall_s": round(wall, 3),
        "stage_p50_s": rep.stage_p50_s,
        "preload_s": round(preload_s, 3),
        "prewarp_s": round(prewarp_s, 3),
        "prewarp_within_exposure": prewarp_s <= visit.exp_time_s,
        "templates_prewarped": rep.templates_prewarped,
    }


def visits_end_to_end(
    settings: Settings,
    visits: list[VisitSpec],
    raws: list[dict[str, Raw]],
    reset: ApdbReset,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pair's two visits through one PromptService, one worker per detector.

    The first visit meets freshly forked workers (the night's first visit); the second
    meets them warm and associates with the first's DiaObjects (the steady state).
    """
    from ldf.prompt.service import PromptService

    reset()
    dets = list(raws[0])
    svc = PromptService.open(settings, INSTRUMENT)
    try:
        svc.detectors = dets
        svc.set_policy(workers=len(dets))
        log(f"visits: starting {len(dets)} warm workers (forkserver; not timed)")
        svc.start()
        first = one_visit(svc, visits[0], raws[0])
        second = one_visit(svc, visits[1], raws[1])
    finally:
        svc.close()
    return first, second


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--detectors", type=int, default=2, help="Science CCDs timed one by one (nearest centre)."
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Rounds over them (the first warms caches)."
    )
    parser.add_argument("--scale", type=float, default=1.0, help="Detector scale (1 = full).")
    parser.add_argument("--seed", type=int, default=20261121)
    parser.add_argument(
        "--visit-detectors",
        type=int,
        default=None,
        help="Detectors (= workers) of the end-to-end visit (default: usable cores).",
    )
    parser.add_argument(
        "--no-prewarp",
        action="store_true",
        help="Warp templates after the raw (no prewarp on nextVisit): the old path.",
    )
    args = parser.parse_args()
    from ldf.prompt.pool import _MALLOC_ENV as POOL_MALLOC_ENV

    if POOL_MALLOC_ENV != _MALLOC_ENV:
        raise RuntimeError("benchmarks/prompt.py's _MALLOC_ENV differs from ldf.prompt.pool's")
    for name in ("detectors", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    cores = usable_cores()
    n_visit = args.visit_detectors or cores
    if n_visit < 1:
        parser.error("--visit-detectors must be >= 1")

    from ldf.hoststat import CpuSample, steal_fraction
    from ldf.sim.night import detectors_for

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run removes its tmp
    started = time.perf_counter()
    host_before = CpuSample.now()
    tmp = Path(tempfile.mkdtemp(prefix="ldf-bench-prompt-"))
    try:
        home = tmp / "home"
        os.environ["LDF_HOME"] = str(home)  # anything reading the environment sees this home
        settings = load_settings(
            home=home,
            sim={"scale": args.scale, "seed": args.seed},
            policies={"prompt": {"workers": n_visit, "prewarp_templates": not args.no_prewarp}},
        )
        visits = science_visits(args.seed)
        visit = visits[0]
        all_dets = detectors_for(INSTRUMENT, args.scale, max(args.detectors, n_visit))
        timed = detectors_for(INSTRUMENT, args.scale, args.detectors)
        log(
            f"setup: seeding {len(all_dets)} detector(s) at scale {args.scale} for "
            f"{visit.obs_id} and {visits[1].obs_id} ({visit.band}); at full size this "
            "takes minutes"
        )
        t0 = time.perf_counter()
        seeded = seed_facility(settings, visits, all_dets, scale=args.scale, seed=args.seed)
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        raws = render_raws(settings, visit, all_dets, tmp / "raws", seed=args.seed)
        raws2 = render_raws(settings, visits[1], all_dets[:n_visit], tmp / "raws", seed=args.seed)
        render_s = time.perf_counter() - t0
        reset = ApdbReset(InputPaths(home), tmp / "apdb-empty")
        log(f"setup {setup_s:.1f} s, raws rendered in {render_s:.1f} s")

        scratch = preload(settings, visit, all_dets, tmp / "scratch")
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
        if affinity is not None:
            os.sched_setaffinity(0, {min(affinity)})
        try:
            prewarp_s = None
            if not args.no_prewarp:
                prewarp_s = prewarp(settings, visit, all_dets, scratch)
                log(f"templates prewarped (as on nextVisit): {prewarp_s:.2f} s per detector")
            one = per_detector(
                settings, visit, {d: raws[d] for d in timed}, reset,
                repeats=args.repeats, scratch=scratch, tmp=tmp, prewarped=not args.no_prewarp,
            )  # fmt: skip
        finally:
            if affinity is not None:
                os.sched_setaffinity(0, affinity)  # the visit's workers use every core

        log(f"all cores busy: {n_visit} processes, one detector each (warm-up run first)")
        busy = all_cores_busy(
            settings, visit, {d: raws[d] for d in all_dets[:n_visit]}, reset, scratch=scratch
        )
        log(f"all cores busy: {busy['detector_s']} s per detector")
        first_visit, steady_visit = visits_end_to_end(
            settings, visits, [{d: raws[d] for d in all_dets[:n_visit]}, raws2], reset
        )
        camera_shape = raws[timed[0]].shape
        detector_s = one.pop("detector_s")
        floor_s = one.pop("io_floor_s")
        print(
            json.dumps(
                {
                    "benchmark": "prompt",
                    "requirement": "Prompt Processing of one full-size LSSTCam detector "
                    "(4096x4004 E2V / 4072x4000 ITL) in <= 5 s on one core, so a visit's "
                    "alerts leave within OTT1 = 60 s of the end of readout (LDM-230 2.1)",
                    "scale": args.scale,
                    "detector_shape": list(camera_shape),
                    "detector_s": detector_s,
                    "stages_s": one.pop("stages_s"),
                    "io_floor_s": floor_s,
                    "io_floor": {
                        "what": "read_raw of the same raw + tofile/fsync of calexp and "
                        "difference (image f32, variance f32, mask u16) and the alert file, "
                        "same run, same filesystem",
                        **one.pop("io_floor"),
                    },
                    "ratio": round(detector_s / floor_s, 2) if detector_s and floor_s else None,
                    "ratio_meaning": "pipeline seconds / I/O-floor seconds per detector",
                    "prewarp": {
                        "what": "each detector's template warped onto the grid the commanded "
                        "pointing predicts, done by an idle worker on nextVisit while the "
                        "exposure is taken (median seconds per detector, one core); the "
                        "detector then only shifts it (stage 'template')",
                        "enabled": not args.no_prewarp,
                        "seconds_per_detector": round(prewarp_s, 3) if prewarp_s else None,
                        "exposure_s": visit.exp_time_s,
                    },
                    "target_s": TARGET_S,
                    "meets_target": bool(detector_s is not None and detector_s <= TARGET_S),
                    "all_cores_busy": {
                        "what": "process_detector in as many plain processes as the visit "
                        "has detectors, started together after a warm-up run each (no "
                        "service): per-detector seconds when every core works, to hold "
                        "the visit's latency against",
                        **busy,
                        "slowdown_vs_one_core": round(busy["detector_s"] / detector_s, 2)
                        if busy["detector_s"] and detector_s
                        else None,
                    },
                    "visit": {
                        "what": "PromptService, workers = detectors = usable cores; seconds "
                        "from on_end_readout to each alert handed over (reports(): p50/p98 "
                        "over alerts); warm pool started before the clock, raws in the "
                        "OODS at end of readout; this is the pair's second visit (workers "
                        "warm, DiaObjects of the first visit in the APDB): a night's steady "
                        "state",
                        **steady_visit,
                    },
                    "first_visit": {
                        "what": "the pair's first visit, the first work of freshly forked "
                        "workers, APDB empty",
                        **first_visit,
                    },
                    "setup_s": round(setup_s, 1),
                    "render_s": round(render_s, 1),
                    "seeded": seeded,
                    "obs_id": visit.obs_id,
                    "band": visit.band,
                    "timed_detectors": timed,
                    "repeats": args.repeats,
                    **one,
                    "cores": cores,
                    "total_seconds": round(time.perf_counter() - started, 1),
                    "cpu_steal_fraction": steal_fraction(host_before, CpuSample.now()),
                    "cpu_steal_meaning": STEAL_MEANING,
                    "python": sys.version.split()[0],
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
