"""An archiver: every detector of every exposure to the OODS, then to the permanent archive.

One `Archiver` per instrument; nothing is shared between them but the code. For each
``endReadout`` it records the exposure and queues one job per detector read out. A job runs
two steps, each recorded before the next begins, so a ``kill -9`` anywhere resumes at the
right step and every file is archived exactly once:

1. read the detector from the camera DAQ, check the OCS metadata, write one multi-extension
   FITS file into the OODS at its predictable path (temp name → fsync → rename), index it
   there (and in the OODS Butler), publish ``imageInOODS`` with its checksum;
2. unless the observation type is designated OODS-only, ingest that file into the Data
   Backbone (verified, idempotent) and publish ``imageArchived``.

Damaged input never stops the exposure: malformed or missing header metadata and corrupt or
truncated pixels raise an alarm event and the file is archived with what is known, flagged
in its header (``LDF FLAGGED``) and in the Backbone metadata. A detector still missing after
``missing_detector_timeout_s`` raises ``missingDetector``; it is archived when it appears.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ldf.archiver.models import ArchiveJob, Designation, ExposureRecord, JobState
from ldf.archiver.storage import QueueStore
from ldf.backbone.checksums import checksum_file
from ldf.backbone.ratelimit import RateLimiter
from ldf.config import Settings
from ldf.config.models import ArchiverPolicy
from ldf.db import utcnow
from ldf.errors import NotFoundError, StorageError, StorageFullError, UserInputError
from ldf.sim.daq import DaqStore
from ldf.sim.instruments import Instrument, get_instrument
from ldf.sim.models import OBS_ID_PREFIX, VisitSpec

if TYPE_CHECKING:
    from ldf.backbone.service import Backbone
    from ldf.oods.service import Oods

__all__ = ["NOMINAL_VISIT_S", "Archiver", "Publisher", "RunReport", "lfn_for"]

_log = logging.getLogger(__name__)

NOMINAL_VISIT_S = 39.0
"""Nominal time between visits (30 s exposure, 2 s readout, slew and settle)."""

MAX_ATTEMPTS = 10
"""Attempts before a job fails for good (a full disk is retried forever)."""

Publisher = Callable[[str, dict[str, Any]], None]
"""Publishes an event of the archiver's device (name, payload); must be thread-safe."""


def lfn_for(visit: VisitSpec, detector: str) -> str:
    """The file's LFN in the permanent archive.

    LSSTCam data are organized by exposure; LATISS data temporally, by day_obs and seq_num
    (LDM-230 2.2, 2.3).
    """
    name = f"{visit.obs_id}_{detector}.fits"
    if visit.instrument == "LATISS":
        return f"raw/LATISS/{visit.day_obs}/{visit.seq_num:06d}/{name}"
    return f"raw/{visit.instrument}/{visit.day_obs}/{visit.obs_id}/{name}"


@dataclass
class RunReport:
    """What one pass over the queue did."""

    in_oods: int = 0
    archived: int = 0
    retried: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "in_oods": self.in_oods,
            "archived": self.archived,
            "retried": self.retried,
            "failed": self.failed,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "MB_per_s": round(self.bytes / 1e6 / self.seconds, 1) if self.seconds else 0.0,
            "errors": self.errors[:20],
        }


class Archiver:
    """The archiver of one instrument."""

    def __init__(
        self,
        instrument: str,
        settings: Settings,
        *,
        store: QueueStore,
        daq: DaqStore,
        oods: Oods,
        backbone: Backbone | None,
        publish: Publisher | None = None,
    ) -> None:
        if instrument not in OBS_ID_PREFIX:
            raise UserInputError(f"unknown instrument {instrument!r}")
        self.instrument = instrument
        self.settings = settings
        self.policy: ArchiverPolicy = settings.policies.archiver.model_copy()
        self.store = store
        self.daq = daq
        self.oods = oods
        self.backbone = backbone
        self.publish: Publisher = publish or (lambda name, payload: None)
        self._instruments: dict[float, Instrument] = {}
        self._lock = threading.Lock()
        self._limiter: RateLimiter | None = None
        self._limiter_rate: float | None = None
        self._bytes_per_exposure = 0.0

    @classmethod
    def open(
        cls, instrument: str, settings: Settings, *, publish: Publisher | None = None
    ) -> Archiver:
        """An archiver wired to the configuration's DAQ, OODS and Backbone."""
        from ldf.backbone.service import Backbone
        from ldf.oods.service import Oods

        store = QueueStore.open(settings.database_url(f"archiver_{instrument.lower()}"))
        reclaimed = store.reclaim(instrument)
        if reclaimed:
            _log.warning(
                "%s archiver: resuming %d file(s) a previous run left", instrument, reclaimed
            )
        return cls(
            instrument,
            settings,
            store=store,
            daq=DaqStore(settings.home / "daq"),
            oods=Oods.open(settings),
            backbone=Backbone.open(settings),
            publish=publish,
        )

    def close(self) -> None:
        """Release databases."""
        self.store.close()
        self.oods.close()
        if self.backbone is not None:
            self.backbone.close()

    # -- policies --------------------------------------------------------------------------

    def set_policy(self, **changes: Any) -> ArchiverPolicy:
        """Change policies at run time (the OCS ``setPolicy`` command).

        Raises
        ------
        UserInputError
            An unknown policy or a bad value; nothing changes.
        """
        from pydantic import ValidationError

        try:
            policy = ArchiverPolicy.model_validate({**self.policy.model_dump(), **changes})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserInputError(f"bad policy {where}: {first['msg']}") from None
        with self._lock:
            self.policy = policy
            self._limiter_rate = None  # rebuilt with the new limits
        return policy

    def designation(self, obs_type: str) -> Designation:
        """Where an observation type goes under the current policy."""
        return Designation.OODS_ONLY if obs_type in self.policy.oods_only else Designation.ARCHIVE

    # -- intake ----------------------------------------------------------------------------

    def _instrument(self, scale: float) -> Instrument:
        if scale not in self._instruments:
            self._instruments[scale] = get_instrument(self.instrument, scale=scale)
        return self._instruments[scale]

    def on_end_readout(self, payload: dict[str, Any]) -> ExposureRecord | None:
        """Record an exposure announced by ``endReadout`` and queue its detectors.

        Idempotent (a repeated event queues nothing). An event naming no exposure of this
        instrument is logged and ignored.
        """
        obs_id = str(payload.get("imageName", ""))
        parsed = _parse_obs_id(obs_id)
        if parsed is None or parsed[0] != self.instrument:
            _log.warning("%s archiver: ignoring endReadout for %r", self.instrument, obs_id)
            return None
        _, day_obs, seq_num = parsed
        try:
            manifest = self.daq.exposure(self.instrument, day_obs, obs_id)
            expected = list(manifest.expected)
            present = list(manifest.detectors)
        except NotFoundError:
            expected = [str(d) for d in payload.get("detectors", [])]
            present = [
                d for d in expected if self.daq.has_detector(self.instrument, day_obs, obs_id, d)
            ]
        visit = payload.get("visit") if isinstance(payload.get("visit"), dict) else {}
        obs_type = str((visit or {}).get("obs_type", "science"))
        record = ExposureRecord(
            instrument=self.instrument,
            obs_id=obs_id,
            day_obs=day_obs,
            seq_num=seq_num,
            exposure_id=day_obs * 100000 + seq_num,
            obs_type=obs_type,
            designation=self.designation(obs_type),
            visit=visit or {},
            expected=expected,
            received_at=utcnow(),
        )
        stored, _ = self.store.add_exposure(record, present)
        return stored

    def rescan_daq(self, day_obs: int | None = None) -> int:
        """Queue every completed readout (of a day, or of all) the archiver never heard of.

        This is how an archiver catches up after an outage: the camera kept writing to the
        DAQ while nobody listened for ``endReadout``.
        """
        found = 0
        root = self.daq.root / self.instrument
        days = (
            [day_obs]
            if day_obs is not None
            else sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
            if root.is_dir()
            else []
        )
        manifests = [m for d in days for m in self.daq.exposures(self.instrument, d)]
        for manifest in manifests:
            v = manifest.visit
            if self.store.exposure(self.instrument, v.obs_id) is None:
                self.on_end_readout({"imageName": v.obs_id, "visit": v.model_dump(mode="json")})
                found += 1
        return found

    def check_completeness(self) -> list[dict[str, Any]]:
        """Queue detectors that arrived late; raise alarms for those still missing.

        Returns the alarms raised now.
        """
        alarms = []
        timeout = timedelta(seconds=self.policy.missing_detector_timeout_s)
        now = utcnow()
        for exp, missing in self.store.incomplete(self.instrument):
            arrived = [
                d
                for d in missing
                if self.daq.has_detector(self.instrument, exp.day_obs, exp.obs_id, d)
            ]
            if arrived:
                self.store.add_late(self.instrument, exp.obs_id, arrived)
            still = [d for d in missing if d not in arrived]
            if still and not exp.alarm_raised and now - exp.received_at >= timeout:
                alarm = {
                    "obs_id": exp.obs_id,
                    "missing": still,
                    "waited_s": round((now - exp.received_at).total_seconds(), 1),
                }
                self.publish("missingDetector", alarm)
                self.store.set_alarm(self.instrument, exp.obs_id)
                alarms.append(alarm)
            if not still:
                self._complete(exp.obs_id)
        return alarms

    def _complete(self, obs_id: str) -> None:
        done = self.store.mark_complete_if_done(self.instrument, obs_id)
        if done is not None:
            jobs = self.store.jobs(self.instrument, obs_id=obs_id)
            self.publish(
                "exposureArchived",
                {
                    "obs_id": obs_id,
                    "designation": done.designation.value,
                    "detectors": len(jobs),
                    "flagged": sum(j.flagged for j in jobs),
                },
            )

    # -- work ------------------------------------------------------------------------------

    def _rate_limiter(self) -> RateLimiter | None:
        """The write-rate limiter, raised to the catch-up rate while there is a backlog."""
        policy = self.policy
        if policy.rate_limit_mbps is None:
            return None
        rate = policy.rate_limit_mbps * 1e6 / 8
        backlog = self.store.counts(self.instrument).get(JobState.QUEUED.value, 0)
        # A backlog (more waiting than one round of writers) is archived at the catch-up rate.
        if backlog > 2 * policy.workers and self._bytes_per_exposure:
            nominal = self._bytes_per_exposure / NOMINAL_VISIT_S
            rate = max(rate, policy.catchup_factor * nominal)
        with self._lock:
            if self._limiter is None or self._limiter_rate != rate:
                self._limiter = RateLimiter(rate)
                self._limiter_rate = rate
            return self._limiter

    def _visit(self, exp: ExposureRecord) -> tuple[VisitSpec, list[str]]:
        from ldf.archiver.rawfits import check_metadata

        visit, problems = check_metadata(exp.visit)
        notes = [f"{p.keyword}: {p.problem}" for p in problems]
        if visit is None:
            # The OCS metadata lacks even the identity: take it from the DAQ's own record.
            manifest = self.daq.exposure(self.instrument, exp.day_obs, exp.obs_id)
            visit = manifest.visit
            notes.append("visit metadata unusable; identity and pointing taken from the DAQ")
        return visit, notes

    def _write_to_oods(self, job: ArchiveJob, exp: ExposureRecord, owner: str) -> ArchiveJob:
        from ldf.archiver.rawfits import build_hdulist, write_raw

        visit, problems = self._visit(exp)
        try:
            manifest = self.daq.exposure(self.instrument, exp.day_obs, exp.obs_id)
            scale = manifest.scale
        except NotFoundError:
            scale = 1.0
        try:
            amps = self.daq.read_detector(self.instrument, exp.day_obs, exp.obs_id, job.detector)
        except StorageError:
            amps, damage = self.daq.salvage_detector(
                self.instrument, exp.day_obs, exp.obs_id, job.detector
            )
            problems += damage
            self.publish(
                "archiverAlarm",
                {"obs_id": exp.obs_id, "detector": job.detector, "problem": "; ".join(damage)},
            )
        if problems:
            _log.warning("%s %s flagged: %s", exp.obs_id, job.detector, "; ".join(problems))
        inst = self._instrument(scale)
        hdul = build_hdulist(
            inst,
            inst.detector(job.detector),
            visit,
            amps,
            problems=_as_problems(problems),
            compress=self.policy.compress,
        )
        path = self.oods.path_for(self.instrument, exp.day_obs, exp.obs_id, job.detector)
        limiter = self._rate_limiter()
        nbytes = write_raw(path, hdul)
        if limiter is not None:
            limiter.acquire(nbytes)
        sums = checksum_file(path)
        now = utcnow()
        self.oods.add(
            path,
            instrument=self.instrument,
            day_obs=exp.day_obs,
            obs_id=exp.obs_id,
            exposure_id=exp.exposure_id,
            detector=job.detector,
            obs_type=exp.obs_type,
            size=sums.size,
            checksum=sums.adler32,
            arrived_at=now,
        )
        updated = job.model_copy(
            update={
                "state": JobState.IN_OODS,
                "oods_path": str(path),
                "size": sums.size,
                "checksum": sums.adler32,
                "flagged": bool(problems),
                "problems": problems,
                "oods_at": now,
            }
        )
        self.store.record(
            job.id,
            owner,
            state=JobState.ACTIVE,
            oods_path=str(path),
            size=sums.size,
            checksum=sums.adler32,
            flagged=bool(problems),
            problems=problems,
            oods_at=now,
            error=None,
        )
        self.publish(
            "imageInOODS",
            {
                "obs_id": exp.obs_id,
                "detector": job.detector,
                "filename": path.name,
                "size": sums.size,
                "checksum": sums.adler32,
                "blake3": sums.blake3,
                "flagged": bool(problems),
            },
        )
        with self._lock:
            self._bytes_per_exposure = max(
                self._bytes_per_exposure, sums.size * max(len(exp.expected), 1)
            )
        return updated

    def _archive(self, job: ArchiveJob, exp: ExposureRecord, owner: str) -> None:
        assert job.oods_path is not None
        if exp.designation is Designation.OODS_ONLY or self.backbone is None:
            self.store.record(job.id, owner, state=JobState.DONE)
            return
        visit, _ = self._visit(exp)
        lfn = lfn_for(visit, job.detector)
        from pathlib import Path

        result = self.backbone.ingest(
            Path(job.oods_path),
            lfn,
            site=self.policy.backbone_site,
            metadata={
                "dataset_type": "raw",
                "instrument": self.instrument,
                "day_obs": visit.day_obs,
                "seq_num": visit.seq_num,
                "exposure": visit.exposure_id,
                "obs_id": visit.obs_id,
                "detector": job.detector,
                "obs_type": visit.obs_type.value,
                "band": visit.band,
                "physical_filter": visit.physical_filter,
                "flagged": job.flagged,
            },
            producer=f"{self.instrument} archiver",
            datasets=[f"raw/{self.instrument}/{visit.day_obs}"],
        )
        self.store.record(
            job.id, owner, state=JobState.ARCHIVED, lfn=lfn, archived_at=utcnow(), error=None
        )
        self.publish(
            "imageArchived",
            {
                "obs_id": exp.obs_id,
                "detector": job.detector,
                "lfn": lfn,
                "site": result.site,
                "size": result.size,
                "checksum": result.adler32,
                "blake3": result.blake3,
                "flagged": job.flagged,
            },
        )

    def _run_job(self, job: ArchiveJob, owner: str, report: RunReport) -> None:
        exp = self.store.exposure(self.instrument, job.obs_id)
        if exp is None:  # pragma: no cover - jobs are created with their exposure
            return
        try:
            if job.oods_at is None:
                job = self._write_to_oods(job, exp, owner)
                with self._lock:
                    report.in_oods += 1
                    report.bytes += job.size or 0
            self._archive(job, exp, owner)
            with self._lock:
                report.archived += 1
            self._complete(exp.obs_id)
        except Exception as exc:
            # Expected failures are LdfError/OSError; anything else (a library's exception, a
            # bug) must not kill the writer thread and stall the camera either: the job is
            # retried with back-off and an alarm says what happened.
            self._failed(job, owner, exc, report)

    def _failed(self, job: ArchiveJob, owner: str, exc: Exception, report: RunReport) -> None:
        message = f"{type(exc).__name__}: {exc}"
        give_up = job.attempts >= MAX_ATTEMPTS and not isinstance(exc, StorageFullError)
        delay = min(0.5 * 2 ** (job.attempts - 1), 60.0)
        back = JobState.IN_OODS if job.oods_at is not None else JobState.QUEUED
        self.store.record(
            job.id,
            owner,
            state=JobState.FAILED if give_up else back,
            error=message[:2000],
            next_attempt_at=utcnow() + timedelta(seconds=delay),
        )
        self.publish(
            "archiverAlarm",
            {"obs_id": job.obs_id, "detector": job.detector, "problem": message, "final": give_up},
        )
        with self._lock:
            if give_up:
                report.failed += 1
            else:
                report.retried += 1
            report.errors.append(f"{job.obs_id} {job.detector}: {message}")

    def run(
        self,
        *,
        until_idle: bool = True,
        stop: threading.Event | None = None,
        max_seconds: float | None = None,
        poll_s: float = 0.1,
    ) -> RunReport:
        """Work through the queue with ``policy.workers`` parallel writers."""
        owner = uuid.uuid4().hex[:12]
        report = RunReport()
        t0 = time.monotonic()
        workers = self.policy.workers
        with ThreadPoolExecutor(workers, thread_name_prefix=f"{self.instrument}-archiver") as pool:
            while not (stop is not None and stop.is_set()):
                if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                    break
                self.check_completeness()
                batch = self.store.claim(
                    self.instrument, owner, workers * 2, 300.0, self.policy.backlog_order
                )
                if not batch:
                    if until_idle:
                        break
                    (stop or threading.Event()).wait(poll_s)
                    continue
                list(pool.map(lambda j: self._run_job(j, owner, report), batch))
        report.seconds = time.monotonic() - t0
        return report

    # -- status ----------------------------------------------------------------------------

    def exposures_behind(self) -> int:
        """How many exposures have detector files not yet in the OODS."""
        waiting = self.store.jobs(self.instrument, states=(JobState.QUEUED, JobState.ACTIVE))
        return len({j.obs_id for j in waiting if j.oods_at is None})

    def idle(self) -> bool:
        """Whether nothing is queued or in progress."""
        counts = self.store.counts(self.instrument)
        busy = (JobState.QUEUED, JobState.ACTIVE, JobState.IN_OODS)
        return not any(counts.get(s.value, 0) for s in busy)

    def _jobs(self, day_obs: int | None) -> list[ArchiveJob]:
        jobs = self.store.jobs(self.instrument)
        if day_obs is None:
            return jobs
        return [j for j in jobs if f"_{day_obs}_" in j.obs_id]

    def latencies(self, day_obs: int | None = None) -> list[float]:
        """Seconds from ``endReadout`` received to in-OODS, per detector file."""
        return [
            (j.oods_at - j.received_at).total_seconds()
            for j in self._jobs(day_obs)
            if j.oods_at is not None and j.received_at is not None
        ]

    def status(self, day_obs: int | None = None) -> dict[str, Any]:
        """Queue counts, exposures, bytes, latency percentiles, policy (of one night, or all)."""
        import numpy as np

        jobs = self._jobs(day_obs)
        lat = self.latencies(day_obs)
        exposures = [
            e for e in self.store.exposures(self.instrument)
            if day_obs is None or e.day_obs == day_obs
        ]  # fmt: skip
        return {
            "instrument": self.instrument,
            "day_obs": day_obs,
            "jobs": self.store.counts(self.instrument),
            "exposures": len(exposures),
            "exposures_complete": sum(e.complete_at is not None for e in exposures),
            "files_in_oods": sum(j.oods_at is not None for j in jobs),
            "files_archived": sum(j.state is JobState.ARCHIVED for j in jobs),
            "flagged": sum(j.flagged for j in jobs),
            "bytes": sum(j.size or 0 for j in jobs),
            "latency_s": {
                "p50": round(float(np.percentile(lat, 50)), 3) if lat else None,
                "p99": round(float(np.percentile(lat, 99)), 3) if lat else None,
                "max": round(max(lat), 3) if lat else None,
            },
            "policy": self.policy.model_dump(),
        }


def _parse_obs_id(obs_id: str) -> tuple[str, int, int] | None:
    parts = obs_id.split("_")
    codes = {code: name for name, code in OBS_ID_PREFIX.items()}
    if len(parts) != 4 or parts[0] not in codes or not (parts[2].isdigit() and parts[3].isdigit()):
        return None
    return codes[parts[0]], int(parts[2]), int(parts[3])


def _as_problems(notes: list[str]) -> list[Any]:
    from ldf.archiver.rawfits import HeaderProblem

    out = []
    for note in notes:
        keyword, _, problem = note.partition(": ")
        out.append(HeaderProblem(keyword=keyword if problem else "DATA", problem=problem or note))
    return out
