"""What a warm worker process does with one detector of one visit.

The front end (ISR → characterization → astrometry → photometry) yields the image-quality
parameters the observatory wants; with the QA-first policy they are sent back through the
QA queue the moment they exist, before difference imaging starts. The back end (difference
imaging → DIA sources → association into the APDB → alert packets) then runs unless the
visit's science timeout has passed, in which case the detector is left for offline
catch-up. Calibration exposures (bias, dark, flat) get calibration QA only.

A per-detector problem is a :class:`~ldf.pipelines.types.DetectorError`; it becomes a
FAILED outcome naming the stage and the reason, never an exception that kills the worker.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

# Imported here so the forkserver's workers start with the whole stack loaded.
import pandas as pd  # noqa: F401
import sep  # noqa: F401

from ldf.pipelines import (
    alertpacket,
    apdb,
    association,
    calibs,
    dia,
    diffim,
    isr,
    prewarp,
    refcat,
    templates,
)
from ldf.pipelines.singleframe import StageTimer, plain_quality, single_frame
from ldf.pipelines.types import DetectorError, VisitInfo
from ldf.prompt import validation
from ldf.prompt.inputs import InputPaths, load_snapshot
from ldf.prompt.models import DetectorJob, DetectorOutcome, JobState, PrewarpJob

__all__ = ["init_worker", "prewarp_template", "process_detector"]

_qa_queue: Any = None


def init_worker(qa_queue: Any) -> None:
    """Pool initializer: remember the queue QA parameters are sent back through."""
    global _qa_queue
    _qa_queue = qa_queue


def _send_qa(job: DetectorJob, name: str, qa: dict[str, Any]) -> None:
    if _qa_queue is not None:
        _qa_queue.put((job.exposure_id, job.detector, name, qa, job.offline))


def process_detector(job_json: str) -> str:
    """Process one detector; returns the :class:`DetectorOutcome` as JSON (never raises)."""
    job = DetectorJob.model_validate_json(job_json)
    outcome = DetectorOutcome(
        exposure_id=job.exposure_id, detector=job.detector, state=JobState.DONE
    )
    timer = StageTimer(outcome.stage_s)
    try:
        _run(job, outcome, timer)
    except DetectorError as exc:
        outcome.state = JobState.FAILED
        outcome.failed_stage = exc.stage
        outcome.reason = exc.reason
    except Exception as exc:  # a bug or an unforeseen input: report it, keep the worker
        outcome.state = JobState.FAILED
        outcome.failed_stage = timer.current or "unknown"
        last = traceback.extract_tb(exc.__traceback__)[-1]
        outcome.reason = f"{type(exc).__name__}: {exc} ({Path(last.filename).name}:{last.lineno})"
    return outcome.model_dump_json()


def prewarp_template(job_json: str) -> str:
    """Warp a detector's template onto the grid its commanded pointing predicts (run by an
    idle worker on nextVisit; see :mod:`ldf.pipelines.prewarp`). Returns a JSON report
    ``{"ok", "seconds", "reason"}``; never raises (a failed prewarp only means the detector
    warps its template after the raw arrives, and reports any real problem then)."""
    from ldf.sim.instruments import get_instrument
    from ldf.sim.wcs import detector_wcs

    job = PrewarpJob.model_validate_json(job_json)
    t0 = time.perf_counter()
    try:
        camera = get_instrument(job.instrument, job.camera_scale)
        det = camera.detector(job.detector)
        wcs = detector_wcs(camera, det, job.ra_deg, job.dec_deg, job.rot_sky_deg)
        local, home = InputPaths(Path(job.scratch)), InputPaths(Path(job.home))
        store = templates.TemplateStore(_first_existing(local.templates, home.templates))
        prewarp.prewarp(store, job.band, wcs, (det.ny, det.nx), local.prewarped(det.name, job.band))
    except Exception as exc:  # DetectorError, a missing file, a bug: the detector warps later
        reason = exc.reason if isinstance(exc, DetectorError) else f"{type(exc).__name__}: {exc}"
        return json.dumps({"ok": False, "seconds": time.perf_counter() - t0, "reason": reason})
    return json.dumps({"ok": True, "seconds": time.perf_counter() - t0, "reason": None})


def _run(job: DetectorJob, outcome: DetectorOutcome, timer: StageTimer) -> None:
    from ldf.sim.instruments import get_instrument

    local = InputPaths(Path(job.scratch))
    home = InputPaths(Path(job.home))
    with timer("read"):
        raw = isr.read_raw(job.raw_path)
        info = VisitInfo.from_header(raw.metadata)
        calib_set = _load_calibs(local, home, info)
    camera = get_instrument(info.instrument, job.camera_scale)

    if info.obs_type in ("bias", "dark", "flat"):
        with timer("isr"):
            qa = calibs.calibration_qa(raw, calib_set, camera)
        outcome.qa = plain_quality({"obs_type": info.obs_type, **qa})
        _send_qa(job, "calibrationQA", outcome.qa)
        return

    frame = single_frame(
        raw,
        camera,
        calib_set,
        refcat.RefcatStore(_first_existing(local.refcat, home.refcat)),
        timer=timer,
    )
    science = frame.exposure
    outcome.qa = plain_quality(frame.quality())
    if job.qa_first:
        _send_qa(job, "imageQuality", outcome.qa)

    if job.deadline_unix is not None and time.time() > job.deadline_unix:
        outcome.state = JobState.TIMEOUT
        outcome.reason = "science timeout passed before difference imaging"
        return
    _back_end(job, outcome, timer, science, frame.characterization, local, home, info)
    if not job.qa_first:
        _send_qa(job, "imageQuality", outcome.qa)


def _back_end(
    job: DetectorJob,
    outcome: DetectorOutcome,
    timer: StageTimer,
    science: Any,
    char: Any,
    local: InputPaths,
    home: InputPaths,
    info: VisitInfo,
) -> None:
    from astropy.time import Time

    with timer("template"):
        if not info.band:
            raise DetectorError("diffim", "the raw header names no band (FILTBAND)")
        got = prewarp.from_prewarped(
            local.prewarped(job.detector, info.band), science.wcs, science.shape, info=info
        )
        if isinstance(got, prewarp.PrewarpMiss):
            store = templates.TemplateStore(_first_existing(local.templates, home.templates))
            template = store.warp_to(info.band, science.wcs, science.shape, info=info)
        else:
            template = got
            outcome.template_prewarped = True
    with timer("diffim"):
        diff = diffim.subtract(science, template, sources=char.sources)
        # The usable area of the difference, for science validation (~10 kB, ~40 ms full size).
        validation.save_coverage(
            validation.coverage_path(job.home, job.exposure_id, job.detector),
            validation.coverage_mask(diff.difference.mask, science.mask),
        )
    with timer("dia"):
        sources = dia.detect_dia_sources(
            diff.difference, science, diff.template, threshold=job.detection_threshold
        )
    with timer("association"):
        db = _apdb(home.apdb_config)
        ra, dec, radius = _footprint(science)
        visit_time = Time(info.mjd_mid_tai, format="mjd", scale="tai")
        try:
            if job.history_snapshot:
                # Preloaded on nextVisit and still current (the service checked).
                snapshot = load_snapshot(job.history_snapshot)
                objects, history, forced_history = apdb.history_within(snapshot, ra, dec, radius)
            else:
                objects, history, forced_history = db.load_history(ra, dec, radius, visit_time)
        except apdb.ApdbUnavailableError as exc:
            # Without the APDB's history association would invent duplicate DiaObjects: leave
            # the detector to offline catch-up (nothing is lost: the raw is archived).
            outcome.state = JobState.OFFLINE
            outcome.failed_stage = "association"
            outcome.reason = f"APDB unavailable, left for offline catch-up: {exc}"
            return
        result = association.associate(
            sources,
            objects,
            info=info,
            radius_arcsec=job.association_radius_arcsec,
            history=history,
        )
        forced = dia.forced_photometry(diff.difference, science, objects)
        forced = association.prepare_forced(forced, info=info)
        stored = db.store_or_buffer(
            visit_time,
            result.objects,
            result.sources,
            forced,
            visit=info.exposure_id,
            detector=info.detector_id,
        )
        outcome.apdb_store = stored
    outcome.n_dia_sources = len(result.sources)
    outcome.n_new_objects = int(result.n_new)
    if job.offline:
        return
    with timer("alerts"):
        alerts = alertpacket.build_alerts(
            result.sources,
            result.objects,
            history,
            forced_history,
            science=science,
            template=diff.template,
            difference=diff.difference,
        )
        schema = alertpacket.AlertSchema.latest()
        packets = [schema.serialize(a) for a in alerts]
        alertpacket.LocalAlertSink(home.alerts).deliver(job.exposure_id, job.detector, packets)
    outcome.n_alerts = len(packets)
    outcome.alerts_handed_unix = time.time()


_APDBS: dict[Path, Any] = {}


def _apdb(config: Path) -> Any:
    """The worker's APDB client (opened once per process: dax_apdb reads its schema on open)."""
    db = _APDBS.get(config)
    if db is None:
        db = _APDBS[config] = apdb.PromptApdb.open(config)
    return db


def _first_existing(*paths: Path) -> Path:
    for p in paths:
        if p.exists():
            return p
    return paths[-1]


def _footprint(exposure: Any) -> tuple[float, float, float]:
    """Centre (deg) and radius (deg, with a margin) of a detector on the sky."""
    ny, nx = exposure.shape
    ra, dec = (float(v) for v in exposure.wcs.wcs_pix2world((nx - 1) / 2, (ny - 1) / 2, 0))
    radius = math.hypot(nx, ny) / 2 * exposure.pixel_scale_arcsec / 3600 + 10 / 3600
    return ra, dec, radius


def _load_calibs(local: InputPaths, home: InputPaths, info: VisitInfo) -> Any:
    """The detector's master calibrations (preloaded copy first, else the facility's)."""

    def one(kind: str, band: str | None = None) -> Any:
        for root in (local, home):
            path = root.calib(info.instrument, info.detector, kind, band)
            if path.exists():
                return calibs.MasterCalib.load(path)
        return None

    needs_flat = info.obs_type in ("science", "engtest", "flat") and info.band
    return calibs.CalibSet(
        bias=one("bias"),
        dark=one("dark") if info.obs_type != "bias" else None,
        flat=one("flat", info.band) if needs_flat else None,
    )
