"""Prompt Processing of one instrument: preload on nextVisit, process on arrival, account.

Flow
    ``on_next_visit`` records the visit and a WAITING job per detector and preloads the
    detectors' inputs into the visit's scratch directory (:class:`~ldf.prompt.inputs.Preloader`);
    ``on_end_readout`` records the end of readout (the latency clock starts there);
    ``on_image`` queues a detector whose raw is in the OODS. :meth:`PromptService.run`
    dispatches queued detectors to the warm pool first; a worker with no detector to run
    prewarps a template of an announced visit whose raw has not arrived
    (:mod:`ldf.pipelines.prewarp`: the detector then shifts it instead of warping). It
    records outcomes, applies the timeout and
    backlog policies, and retries a detector whose worker died. QA parameters come back
    through a queue as soon as a worker has them and go to the telemetry outbox, from which
    the telemetry interface (``publish_telemetry``) takes them; while it is unavailable they
    stay there.

Durability
    The queue is the ``prompt_job`` table: a service killed with ``kill -9`` finds its RUNNING
    detectors on restart and queues them again (:meth:`PromptStore.recover`). APDB writes are
    buffered by the pipelines when the APDB is down; alerts are handed to the sink
    idempotently per detector-visit, so a retried detector never duplicates alerts.

Policies (LDM-230 2.1.3.2.1; :class:`ldf.config.models.PromptPolicy`)
    QA-first, the science timeout, backlog handling; ``offline`` catch-up runs the same
    code with no alerts (LDM-230 2.1.3.2.2): :meth:`run_offline`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from ldf.config import Settings
from ldf.config.models import PromptPolicy
from ldf.errors import UserInputError
from ldf.pipelines.refcat import angular_separation_deg
from ldf.prompt.inputs import HISTORY_DIR, InputPaths, Preloader
from ldf.prompt.models import (
    STAGES,
    DetectorJob,
    DetectorOutcome,
    JobState,
    NextVisit,
    PrewarpJob,
    VisitReport,
)
from ldf.prompt.pool import WarmPool
from ldf.prompt.storage import PromptStore

__all__ = ["APDB_FLUSH_S", "OTT1_S", "PromptService"]

_log = logging.getLogger(__name__)

OTT1_S = 60.0
"""Alert latency requirement after end of readout (LSE-61 DMS-REQ-0406)."""

APDB_FLUSH_S = 10.0
"""How often the dispatcher replays DiaSources buffered during an APDB outage."""

TelemetryPublisher = Callable[[str, dict[str, Any]], bool]
"""Hands a QA message to the telemetry interface; False (or raising) when unavailable."""


class PromptService:
    """Prompt Processing for one instrument (see the module docstring).

    Parameters
    ----------
    settings
        The facility configuration (home, databases, policies, simulator scale).
    instrument
        'LSSTCam' or 'LATISS'.
    store
        The state store (default: the ``prompt`` database of ``settings``).
    """

    def __init__(
        self, settings: Settings, instrument: str, *, store: PromptStore | None = None
    ) -> None:
        self.settings = settings
        self.instrument = instrument
        self.store = store or PromptStore.open(settings.database_url("prompt"))
        self.policy = settings.policies.prompt.model_copy()
        self.preloader = Preloader(settings.home, settings.home / "prompt" / "scratch")
        self.camera_scale = settings.sim.scale
        self.detectors: list[str] | None = None
        """The detectors the camera reads out (None: the configured set)."""
        self.publish_telemetry: TelemetryPublisher | None = None
        self.telemetry_rejected = 0
        """QA messages the telemetry interface refused for good (dropped, logged)."""
        self._pool: WarmPool | None = None
        self._qa_queue: Any = None
        self._qa_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inflight: dict[Future[str], dict[str, Any]] = {}
        self._prewarps: deque[PrewarpJob] = deque()
        self.prewarp_counts = {"done": 0, "failed": 0, "skipped": 0}
        """Template prewarps finished, failed (the detector warps in full) and skipped (its
        raw arrived first)."""
        self._idle = threading.Event()
        self._idle.set()
        self._last_flush = 0.0

    @classmethod
    def open(cls, settings: Settings, instrument: str) -> PromptService:
        """The service of an instrument, with its state store."""
        if instrument not in ("LSSTCam", "LATISS"):
            raise UserInputError(f"unknown instrument {instrument!r}; expected LSSTCam or LATISS")
        return cls(settings, instrument)

    # -- policies -------------------------------------------------------------------------

    def set_policy(self, **changes: Any) -> PromptPolicy:
        """Change policies (validated as a whole; unknown names are refused)."""
        unknown = sorted(set(changes) - set(PromptPolicy.model_fields))
        if unknown:
            raise UserInputError(
                f"unknown prompt policy {', '.join(unknown)}; known: "
                f"{', '.join(PromptPolicy.model_fields)}"
            )
        try:
            new = PromptPolicy.model_validate({**self.policy.model_dump(), **changes})
        except ValueError as exc:
            raise UserInputError(f"invalid prompt policy: {exc}") from exc
        if new.workers != self.policy.workers and self._pool is not None:
            raise UserInputError("the number of workers changes only while the service is stopped")
        self.policy = new
        return new

    # -- events ---------------------------------------------------------------------------

    def on_next_visit(self, payload: dict[str, Any], *, detectors: list[str] | None = None) -> bool:
        """A visit is announced: record it and preload its detectors' inputs.

        Returns False if the visit was already known (the event is idempotent).
        """
        visit = NextVisit.model_validate(payload)
        if visit.instrument != self.instrument:
            return False
        dets = detectors if detectors is not None else self._detectors(payload)
        scratch = self.preloader.scratch_for(visit.exposure_id)
        if not self.store.announce(visit, scratch=str(scratch), detectors=dets):
            return False
        try:
            report = self.preloader.preload(visit, dets, camera_scale=self.camera_scale)
        except Exception as exc:  # the preload is an optimisation: log, process from home
            _log.warning("preload of %s failed: %s", visit.exposure_id, exc)
            report = {"error": str(exc), "detectors": {}}
        self.store.set_preloaded(visit.exposure_id, report)
        if self.policy.prewarp_templates and visit.is_science and visit.band:
            for det in dets:
                if (report.get("detectors") or {}).get(det, {}).get("missing"):
                    continue  # the detector will fail with the preload's reason
                self._prewarps.append(
                    PrewarpJob(
                        instrument=visit.instrument,
                        exposure_id=visit.exposure_id,
                        detector=det,
                        band=visit.band,
                        ra_deg=visit.ra_deg,
                        dec_deg=visit.dec_deg,
                        rot_sky_deg=visit.rot_sky_deg,
                        scratch=str(scratch),
                        home=str(self.settings.home),
                        camera_scale=self.camera_scale,
                    )
                )
        return True

    def _detectors(self, payload: dict[str, Any]) -> list[str]:
        names = payload.get("detectors")
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        if self.detectors is not None:
            return list(self.detectors)
        from ldf.sim.night import detectors_for

        wanted = self.settings.instruments.get(self.instrument)  # type: ignore[call-overload]
        if wanted is not None and wanted.detectors:
            return list(wanted.detectors)
        return detectors_for(self.instrument, self.camera_scale, self.settings.sim.detectors)

    def on_end_readout(self, exposure_id: int, readout_unix: float) -> None:
        """The camera finished reading out a visit (the latency clock starts)."""
        self.store.set_readout(exposure_id, readout_unix, instrument=self.instrument)

    def on_image(
        self,
        exposure_id: int,
        detector: str,
        raw_path: str | Path,
        *,
        arrived_unix: float | None = None,
    ) -> bool:
        """A detector's raw is in the OODS: queue it. True if newly queued (idempotent)."""
        visit = self.store.visit(exposure_id)
        return self.store.arrive(
            self.instrument,
            exposure_id,
            detector,
            str(raw_path),
            arrived_unix=arrived_unix,
            offline=bool(visit and visit["offline"]),
        )

    # -- processing -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the warm workers and the QA listener; re-queue work a crash left RUNNING."""
        if self._pool is not None:
            return
        recovered = self.store.recover()
        if recovered:
            _log.warning("%s: re-queued %d detector(s) left running", self.instrument, recovered)
        import multiprocessing as mp

        from ldf.prompt.worker import init_worker

        self._qa_queue = mp.get_context("forkserver").Queue()
        self._pool = WarmPool(
            self.policy.workers, initializer=init_worker, initargs=(self._qa_queue,)
        )
        self._pool.warm_up()
        self._qa_thread = threading.Thread(
            target=self._qa_listener, name=f"prompt-{self.instrument}-qa", daemon=True
        )
        self._qa_thread.start()

    def stop(self) -> None:
        """Stop the workers (running detectors finish) and the QA listener."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._qa_queue is not None:
            self._qa_queue.put(None)
            if self._qa_thread is not None:
                self._qa_thread.join(timeout=10)
            self._qa_queue = None
            self._qa_thread = None

    def close(self) -> None:
        """Stop and release the store."""
        self.stop()
        self.store.close()

    @property
    def pool(self) -> WarmPool | None:
        """The warm pool (None while stopped)."""
        return self._pool

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        until_idle: bool = False,
        offline: bool = False,
        poll_s: float = 0.05,
    ) -> int:
        """Dispatch detectors until ``stop`` is set (or, with ``until_idle``, nothing is left).

        Returns the number of detectors finished.
        """
        self.start()
        assert self._pool is not None
        done = 0
        stop = stop or threading.Event()
        while not stop.is_set():
            if not offline:
                self._apply_timeouts()
                self._apply_backlog()
                if time.monotonic() - self._last_flush > APDB_FLUSH_S:
                    self.flush_apdb()
            while len(self._inflight) < self._pool.workers:
                job = self.store.claim(offline=offline)
                if job is None:
                    break
                self._submit(job, offline=offline)
            if not offline:
                self._submit_prewarps()
            if not self._inflight:
                self._idle.set()
                if until_idle:
                    break
                stop.wait(poll_s)
                continue
            self._idle.clear()
            finished, _ = wait(list(self._inflight), timeout=poll_s, return_when=FIRST_COMPLETED)
            for future in finished:
                done += self._collect(future)
        return done

    def run_offline(self) -> int:
        """Offline catch-up: process every detector waiting for it (no alerts, QA kept late)."""
        self.flush_apdb()
        return self.run(until_idle=True, offline=True)

    def flush_apdb(self) -> dict[str, int]:
        """Replay DiaSource batches buffered while the APDB was down (idempotent).

        Returns ``{"stored": n, "skipped": n, "remaining": n}``; an APDB still down leaves
        everything buffered.
        """
        from ldf.pipelines.apdb import ApdbUnavailableError, PromptApdb

        self._last_flush = time.monotonic()
        config = InputPaths(self.settings.home).apdb_config
        if not config.exists():
            return {"stored": 0, "skipped": 0, "remaining": 0}
        db = PromptApdb.open(config)
        try:
            if db.buffer is None or len(db.buffer) == 0:
                return {"stored": 0, "skipped": 0, "remaining": 0}
            report = db.flush()
        except ApdbUnavailableError as exc:
            _log.warning("APDB still unavailable; DiaSources stay buffered: %s", exc)
            return {"stored": 0, "skipped": 0, "remaining": len(db.buffer or ())}
        finally:
            db.close()
        if report.stored:
            _log.info("replayed %d buffered APDB batch(es)", report.stored)
        return {"stored": report.stored, "skipped": report.skipped, "remaining": report.remaining}

    def _submit(self, job: dict[str, Any], *, offline: bool) -> None:
        assert self._pool is not None
        visit = self.store.visit(job["exposure_id"])
        deadline = None
        if visit is not None and not offline:
            t0 = visit["readout_unix"] or job["arrived_unix"]
            if t0 is not None:
                deadline = t0 + self.policy.science_timeout_s
        spec = DetectorJob(
            instrument=job["instrument"],
            exposure_id=job["exposure_id"],
            detector=job["detector"],
            raw_path=job["raw_path"] or "",
            scratch=(visit or {}).get("scratch")
            or str(self.preloader.scratch_for(job["exposure_id"])),
            home=str(self.settings.home),
            camera_scale=self.camera_scale,
            offline=offline or bool(job["offline"]),
            qa_first=self.policy.qa_first,
            deadline_unix=deadline,
            detection_threshold=self.policy.detection_threshold,
            association_radius_arcsec=self.policy.association_radius_arcsec,
            attempt=job["attempts"],
            history_snapshot=self._current_snapshot(job, visit, offline=offline),
        )
        from ldf.prompt.worker import process_detector

        preload = (visit or {}).get("preloaded") or {}
        missing = (preload.get("detectors") or {}).get(job["detector"], {}).get("missing")
        if missing:
            # Known before any pixel is read: fail at once, with the preload's reason.
            self.store.finish(
                DetectorOutcome(
                    exposure_id=spec.exposure_id,
                    detector=spec.detector,
                    state=JobState.FAILED,
                    failed_stage="preload",
                    reason="; ".join(missing),
                )
            )
            return
        future = self._pool.submit(process_detector, spec.model_dump_json())
        self._inflight[future] = job

    def _submit_prewarps(self) -> None:
        """Give workers that have no detector to run a template to prewarp (oldest visit
        first; a detector whose raw already arrived is skipped)."""
        assert self._pool is not None
        waiting: dict[int, set[str]] = {}
        while self._prewarps and len(self._inflight) < self._pool.workers:
            pj = self._prewarps.popleft()
            if pj.exposure_id not in waiting:
                waiting[pj.exposure_id] = {
                    j["detector"]
                    for j in self.store.jobs(pj.exposure_id)
                    if j["state"] == JobState.WAITING.value
                }
            if pj.detector not in waiting[pj.exposure_id]:
                self.prewarp_counts["skipped"] += 1
                continue
            from ldf.prompt.worker import prewarp_template

            future = self._pool.submit(prewarp_template, pj.model_dump_json())
            self._inflight[future] = {
                "kind": "prewarp",
                "exposure_id": pj.exposure_id,
                "detector": pj.detector,
            }

    def _current_snapshot(
        self, job: dict[str, Any], visit: dict[str, Any] | None, *, offline: bool
    ) -> str | None:
        """The visit's preloaded APDB history, if no visit of its region stored DiaSources
        since it was taken (otherwise the worker must see those new DiaObjects)."""
        if visit is None or not visit.get("scratch") or offline:
            return None
        directory = Path(visit["scratch"]) / HISTORY_DIR
        try:
            meta = json.loads((directory / "snapshot.json").read_text())
        except (OSError, ValueError):
            return None
        for eid in self.store.finished_since(float(meta["taken_unix"])):
            if eid == job["exposure_id"]:
                continue
            other = self.store.visit(eid)
            spec = (other or {}).get("spec") or {}
            if "ra_deg" not in spec or spec.get("obs_type") != "science":
                continue
            if angular_separation_deg(meta["ra"], meta["dec"], spec["ra_deg"], spec["dec_deg"]) < (
                2 * float(meta["radius_deg"])
            ):
                return None
        return str(directory)

    def _collect(self, future: Future[str]) -> int:
        job = self._inflight.pop(future)
        if job.get("kind") == "prewarp":
            try:
                result = json.loads(future.result())
            except BrokenProcessPool:
                return self._worker_died(job)
            self.prewarp_counts["done" if result["ok"] else "failed"] += 1
            if not result["ok"]:
                _log.info(
                    "%s %s: template not prewarped (%s); it will be warped after the raw",
                    job["exposure_id"], job["detector"], result["reason"],
                )  # fmt: skip
            self._maybe_cleanup(job["exposure_id"])  # a visit finished while it ran
            return 0
        try:
            outcome = DetectorOutcome.model_validate_json(future.result())
        except BrokenProcessPool:
            return self._worker_died(job)
        self.store.finish(outcome)
        self._maybe_cleanup(job["exposure_id"])
        return 1

    def _worker_died(self, job: dict[str, Any]) -> int:
        assert self._pool is not None
        self._pool.replace()
        # Every future in flight failed with the pool: retry each (or report it).
        lost = [j for j in (job, *self._inflight.values()) if j.get("kind") != "prewarp"]
        self._inflight.clear()
        for j in lost:
            if j["attempts"] >= self.policy.max_attempts:
                self.store.finish(
                    DetectorOutcome(
                        exposure_id=j["exposure_id"],
                        detector=j["detector"],
                        state=JobState.FAILED,
                        failed_stage="worker",
                        reason=f"worker process died {j['attempts']} time(s) on this detector",
                    )
                )
            else:
                self.store.requeue(
                    j["exposure_id"], j["detector"], reason="worker process died; retrying"
                )
        return 0

    def _apply_timeouts(self) -> None:
        now = time.time()
        for visit in self._visits_with_queued():
            t0 = visit["readout_unix"]
            if t0 is not None and now > t0 + self.policy.science_timeout_s:
                n = self.store.set_state(
                    visit["exposure_id"],
                    JobState.TIMEOUT,
                    reason=f"science timeout ({self.policy.science_timeout_s:g} s after readout)",
                    from_states=(JobState.QUEUED,),
                )
                if n:
                    _log.warning("%s: %d detector(s) timed out", visit["exposure_id"], n)

    def _visits_with_queued(self) -> list[dict[str, Any]]:
        out = []
        for eid in self.store.pending_exposures():
            v = self.store.visit(eid)
            if v is not None:
                out.append(v)
        return out

    def _apply_backlog(self) -> None:
        if self.policy.backlog == "process":
            return
        pending = self.store.pending_exposures()
        if len(pending) < 2:
            return
        state = JobState.SKIPPED if self.policy.backlog == "skip-to-newest" else JobState.OFFLINE
        for eid in pending[:-1]:
            self.store.set_state(
                eid,
                state,
                reason=f"backlog policy {self.policy.backlog}: a newer visit arrived",
                from_states=(JobState.QUEUED,),
            )

    def _maybe_cleanup(self, exposure_id: int) -> None:
        if self.store.unfinished(exposure_id) == 0:
            self.preloader.cleanup(exposure_id)

    def wait_idle(self, timeout_s: float = 600.0) -> bool:
        """Wait until nothing is queued or running (for a caller running :meth:`run`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = self.store.counts()
            busy = counts.get(JobState.QUEUED.value) or counts.get(JobState.RUNNING.value)
            if not busy and self._idle.is_set():
                return True
            time.sleep(0.05)
        return False

    # -- telemetry ------------------------------------------------------------------------

    def _qa_listener(self) -> None:
        q = self._qa_queue
        while True:
            try:
                item = q.get()
            except (EOFError, OSError):
                return
            if item is None:
                return
            exposure_id, detector, name, qa, late = item
            self.store.add_telemetry(exposure_id, detector, name, qa, late=late)
            if not late:
                self.flush_telemetry()

    def flush_telemetry(self, *, include_late: bool = False) -> int:
        """Hand buffered QA messages to the telemetry interface; returns how many went."""
        publish = self.publish_telemetry
        if publish is None:
            return 0
        with self._lock:
            sent: list[int] = []
            for msg in self.store.unsent_telemetry():
                if msg["late"] and not include_late:
                    continue
                payload = {
                    "exposure_id": msg["exposure_id"],
                    "detector": msg["detector"],
                    **msg["payload"],
                }
                try:
                    ok = publish(msg["name"], payload)
                except UserInputError as exc:
                    # Refused for good (a 4xx from the gateway, which audits it): keeping it
                    # would hold every later message behind it.
                    _log.error("telemetry %s of %s/%s refused, dropped: %s", msg["name"],
                               msg["exposure_id"], msg["detector"], exc)  # fmt: skip
                    self.telemetry_rejected += 1
                    ok = True
                except Exception as exc:
                    _log.warning("telemetry unavailable, QA kept: %s", exc)
                    ok = False
                if not ok:
                    break
                sent.append(msg["id"])
            self.store.mark_sent(sent)
            return len(sent)

    # -- reports --------------------------------------------------------------------------

    def reports(self, day_obs: int | None = None) -> list[VisitReport]:
        """Per-visit latency and yield (the OTT1/OTR1 service level, per visit)."""
        out: list[VisitReport] = []
        for visit in self.store.visits(day_obs=day_obs, instrument=self.instrument):
            jobs = self.store.jobs(visit["exposure_id"])
            out.append(_report(visit, jobs))
        return out


def _report(visit: dict[str, Any], jobs: list[dict[str, Any]]) -> VisitReport:
    states = [j["state"] for j in jobs]
    t0 = visit["readout_unix"]
    lat: list[float] = []
    for j in jobs:
        end = j["alerts_handed_unix"] or (
            j["finished_unix"] if j["state"] == JobState.DONE.value else None
        )
        if t0 is not None and end is not None:
            # Each alert of a detector shares the detector's hand-over time.
            lat.extend([end - t0] * max(int(j["n_alerts"]), 1))
    stage_p50 = {}
    for stage in STAGES:
        vals = [j["stage_s"][stage] for j in jobs if stage in (j["stage_s"] or {})]
        if vals:
            stage_p50[stage] = round(float(np.median(vals)), 3)
    arr = np.array(lat)
    return VisitReport(
        exposure_id=visit["exposure_id"],
        instrument=visit["instrument"],
        obs_type=visit["obs_type"],
        detectors=len(jobs),
        done=states.count(JobState.DONE.value),
        failed=states.count(JobState.FAILED.value),
        timeout=states.count(JobState.TIMEOUT.value),
        skipped=states.count(JobState.SKIPPED.value),
        offline=states.count(JobState.OFFLINE.value),
        alerts=sum(int(j["n_alerts"]) for j in jobs),
        templates_prewarped=sum(bool(j.get("template_prewarped")) for j in jobs),
        latency_p50_s=round(float(np.percentile(arr, 50)), 3) if len(arr) else None,
        latency_p98_s=round(float(np.percentile(arr, 98)), 3) if len(arr) else None,
        within_ott1=round(float(np.mean(arr <= OTT1_S)), 4) if len(arr) else None,
        stage_p50_s=stage_p50,
    )
