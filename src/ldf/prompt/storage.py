"""Prompt Processing's durable state: announced visits, the per-detector queue, the QA outbox."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, select, update

from ldf.db.store import SqlStore
from ldf.prompt.models import TERMINAL, DetectorOutcome, JobState, NextVisit
from ldf.prompt.schema import SQLJob, SQLTelemetry, SQLVisit

__all__ = ["PromptStore"]


def _job_dict(row: SQLJob) -> dict[str, Any]:
    return {c.name: getattr(row, c.name) for c in SQLJob.__table__.columns}


class PromptStore(SqlStore):
    """SQL store of one facility's Prompt Processing (SQLite or PostgreSQL)."""

    package = "ldf.prompt"

    # -- visits ---------------------------------------------------------------------------

    def announce(
        self,
        visit: NextVisit,
        *,
        scratch: str,
        detectors: list[str],
        preloaded: dict[str, Any] | None = None,
        offline: bool = False,
    ) -> bool:
        """Record an announced visit and a WAITING job per detector; False if already known."""
        with self._session() as s, s.begin():
            row = s.get(SQLVisit, visit.exposure_id)
            if row is not None and row.spec:
                return False
            if row is None:
                row = SQLVisit(exposure_id=visit.exposure_id, readout_unix=None)
                s.add(row)
            # (A row without a spec was made by an endReadout heard before the nextVisit.)
            row.instrument = visit.instrument
            row.day_obs = visit.day_obs
            row.obs_type = visit.obs_type
            row.band = visit.band
            row.spec = visit.model_dump(mode="json")
            row.scratch = scratch
            row.preloaded = preloaded or {}
            row.announced_at = datetime.now(UTC)
            row.offline = offline
            existing = set(
                s.scalars(select(SQLJob.detector).where(SQLJob.exposure_id == visit.exposure_id))
            )
            for det in detectors:
                if det not in existing:
                    s.add(
                        SQLJob(
                            exposure_id=visit.exposure_id,
                            detector=det,
                            instrument=visit.instrument,
                            state=JobState.WAITING.value,
                            offline=offline,
                        )
                    )
            return True

    def set_preloaded(self, exposure_id: int, preloaded: dict[str, Any]) -> None:
        """Record what the preload of a visit found."""
        with self._session() as s, s.begin():
            s.execute(
                update(SQLVisit)
                .where(SQLVisit.exposure_id == exposure_id)
                .values(preloaded=preloaded)
            )

    def set_readout(self, exposure_id: int, readout_unix: float, *, instrument: str) -> None:
        """Record a visit's end of readout (first report wins).

        The camera's endReadout may be heard before the scheduler's nextVisit has been
        handled: the visit is then recorded without its announcement, which fills it in later.
        """
        with self._session() as s, s.begin():
            row = s.get(SQLVisit, exposure_id)
            if row is None:
                s.add(
                    SQLVisit(
                        exposure_id=exposure_id,
                        instrument=instrument,
                        day_obs=exposure_id // 100000,
                        obs_type="unknown",
                        band=None,
                        spec={},
                        scratch="",
                        preloaded={},
                        announced_at=datetime.now(UTC),
                        readout_unix=readout_unix,
                        offline=False,
                    )
                )
            elif row.readout_unix is None:
                row.readout_unix = readout_unix

    def visit(self, exposure_id: int) -> dict[str, Any] | None:
        """An announced visit as a dict (``spec`` is the NextVisit), or None."""
        with self._reader() as s:
            row = s.get(SQLVisit, exposure_id)
            if row is None:
                return None
            return {c.name: getattr(row, c.name) for c in SQLVisit.__table__.columns}

    def visits(
        self, *, day_obs: int | None = None, instrument: str | None = None
    ) -> list[dict[str, Any]]:
        """Announced visits, oldest first."""
        q = select(SQLVisit).order_by(SQLVisit.exposure_id)
        if day_obs is not None:
            q = q.where(SQLVisit.day_obs == day_obs)
        if instrument is not None:
            q = q.where(SQLVisit.instrument == instrument)
        with self._reader() as s:
            return [
                {c.name: getattr(r, c.name) for c in SQLVisit.__table__.columns}
                for r in s.scalars(q)
            ]

    # -- jobs -----------------------------------------------------------------------------

    def arrive(
        self,
        instrument: str,
        exposure_id: int,
        detector: str,
        raw_path: str,
        *,
        arrived_unix: float | None = None,
        offline: bool = False,
    ) -> bool:
        """A detector's raw is in the OODS: queue it (idempotent). True if newly queued."""
        now = arrived_unix if arrived_unix is not None else time.time()
        with self._session() as s, s.begin():
            row = s.get(SQLJob, (exposure_id, detector))
            if row is None:
                s.add(
                    SQLJob(
                        exposure_id=exposure_id,
                        detector=detector,
                        instrument=instrument,
                        state=(JobState.OFFLINE if offline else JobState.QUEUED).value,
                        raw_path=raw_path,
                        arrived_unix=now,
                        offline=offline,
                    )
                )
                return True
            if row.state != JobState.WAITING.value:
                return False
            row.state = (JobState.OFFLINE if row.offline else JobState.QUEUED).value
            row.raw_path = raw_path
            row.arrived_unix = now
            return True

    def claim(self, *, offline: bool = False) -> dict[str, Any] | None:
        """Take the oldest queued job (or offline job) and mark it RUNNING; None if none."""
        states = (
            [JobState.OFFLINE.value, JobState.TIMEOUT.value] if offline else [JobState.QUEUED.value]
        )
        with self._session() as s, s.begin():
            q = (
                select(SQLJob)
                .where(SQLJob.state.in_(states))
                .order_by(SQLJob.exposure_id, SQLJob.detector)
                .limit(1)
            )
            if s.bind is not None and s.bind.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            row = s.scalars(q).first()
            if row is None:
                return None
            row.state = JobState.RUNNING.value
            row.attempts += 1
            row.started_unix = time.time()
            row.offline = row.offline or offline
            return _job_dict(row)

    def finish(self, outcome: DetectorOutcome, *, finished_unix: float | None = None) -> None:
        """Record a worker's outcome for a detector."""
        with self._session() as s, s.begin():
            row = s.get(SQLJob, (outcome.exposure_id, outcome.detector))
            if row is None:
                return
            row.state = outcome.state.value
            row.reason = outcome.reason
            row.failed_stage = outcome.failed_stage
            row.stage_s = outcome.stage_s
            row.qa = outcome.qa
            row.validation = outcome.validation
            row.n_dia_sources = outcome.n_dia_sources
            row.n_new_objects = outcome.n_new_objects
            row.n_alerts = outcome.n_alerts
            row.apdb_store = outcome.apdb_store
            row.alerts_handed_unix = outcome.alerts_handed_unix
            row.template_prewarped = outcome.template_prewarped
            row.finished_unix = finished_unix if finished_unix is not None else time.time()

    def requeue(self, exposure_id: int, detector: str, *, reason: str) -> None:
        """Put a RUNNING job back in its queue (its worker died)."""
        with self._session() as s, s.begin():
            row = s.get(SQLJob, (exposure_id, detector))
            if row is not None and row.state == JobState.RUNNING.value:
                row.state = (JobState.OFFLINE if row.offline else JobState.QUEUED).value
                row.reason = reason

    def recover(self) -> int:
        """After a crash: every RUNNING job goes back to its queue. Returns how many."""
        with self._session() as s, s.begin():
            n = 0
            for row in s.scalars(select(SQLJob).where(SQLJob.state == JobState.RUNNING.value)):
                row.state = (JobState.OFFLINE if row.offline else JobState.QUEUED).value
                row.reason = "service restarted while this detector was running"
                n += 1
            return n

    def set_state(
        self,
        exposure_id: int,
        state: JobState,
        *,
        reason: str,
        from_states: tuple[JobState, ...],
        detector: str | None = None,
    ) -> int:
        """Move a visit's jobs (or one detector's) from ``from_states`` to ``state``."""
        conds = [
            SQLJob.exposure_id == exposure_id,
            SQLJob.state.in_([st.value for st in from_states]),
        ]
        if detector is not None:
            conds.append(SQLJob.detector == detector)
        values: dict[str, Any] = {"state": state.value, "reason": reason}
        if state in (JobState.OFFLINE, JobState.TIMEOUT):
            values["offline"] = True  # both wait for offline catch-up
        with self._session() as s, s.begin():
            result = s.execute(update(SQLJob).where(and_(*conds)).values(**values))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def jobs(
        self, exposure_id: int | None = None, *, day_obs: int | None = None
    ) -> list[dict[str, Any]]:
        """Jobs of a visit or of a day, by exposure and detector."""
        q = select(SQLJob).order_by(SQLJob.exposure_id, SQLJob.detector)
        if exposure_id is not None:
            q = q.where(SQLJob.exposure_id == exposure_id)
        if day_obs is not None:
            lo = day_obs * 100000
            q = q.where(SQLJob.exposure_id >= lo, SQLJob.exposure_id < lo + 100000)
        with self._reader() as s:
            return [_job_dict(r) for r in s.scalars(q)]

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        with self._reader() as s:
            return {
                state: int(n)
                for state, n in s.execute(select(SQLJob.state, func.count()).group_by(SQLJob.state))
            }

    def pending_exposures(self) -> list[int]:
        """Exposures that still have queued (not yet running) detectors, oldest first."""
        with self._reader() as s:
            return list(
                s.scalars(
                    select(SQLJob.exposure_id)
                    .where(SQLJob.state == JobState.QUEUED.value)
                    .group_by(SQLJob.exposure_id)
                    .order_by(SQLJob.exposure_id)
                )
            )

    def finished_since(self, since_unix: float) -> list[int]:
        """Exposures with a detector done (its DiaSources stored) after ``since_unix``."""
        with self._reader() as s:
            return list(
                s.scalars(
                    select(SQLJob.exposure_id)
                    .where(
                        SQLJob.state == JobState.DONE.value,
                        SQLJob.finished_unix > since_unix,
                    )
                    .distinct()
                )
            )

    def busy_exposures(self) -> int:
        """Visits with detectors queued or running (the processing backlog)."""
        with self._reader() as s:
            return int(
                s.scalar(
                    select(func.count(func.distinct(SQLJob.exposure_id))).where(
                        SQLJob.state.in_([JobState.QUEUED.value, JobState.RUNNING.value])
                    )
                )
                or 0
            )

    def unfinished(self, exposure_id: int) -> int:
        """Detectors of a visit not in a terminal state (offline counts as unfinished)."""
        with self._reader() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(SQLJob)
                    .where(
                        SQLJob.exposure_id == exposure_id,
                        SQLJob.state.not_in([st.value for st in TERMINAL]),
                    )
                )
                or 0
            )

    # -- telemetry outbox -----------------------------------------------------------------

    def add_telemetry(
        self, exposure_id: int, detector: str, name: str, payload: dict[str, Any], *, late: bool
    ) -> int:
        """Keep a QA message until the telemetry interface takes it; returns its id."""
        with self._session() as s, s.begin():
            row = SQLTelemetry(
                exposure_id=exposure_id,
                detector=detector,
                name=name,
                payload=payload,
                created_unix=time.time(),
                late=late,
            )
            s.add(row)
            s.flush()
            return int(row.id)

    def unsent_telemetry(self, limit: int = 500) -> list[dict[str, Any]]:
        """QA messages not yet delivered, oldest first."""
        with self._reader() as s:
            rows = s.scalars(
                select(SQLTelemetry)
                .where(SQLTelemetry.sent_unix.is_(None))
                .order_by(SQLTelemetry.id)
                .limit(limit)
            )
            return [
                {c.name: getattr(r, c.name) for c in SQLTelemetry.__table__.columns} for r in rows
            ]

    def mark_sent(self, ids: list[int]) -> None:
        """Record QA messages as delivered."""
        if not ids:
            return
        with self._session() as s, s.begin():
            s.execute(
                update(SQLTelemetry).where(SQLTelemetry.id.in_(ids)).values(sent_unix=time.time())
            )

    def telemetry(self, exposure_id: int | None = None) -> list[dict[str, Any]]:
        """All QA messages (of one visit)."""
        q = select(SQLTelemetry).order_by(SQLTelemetry.id)
        if exposure_id is not None:
            q = q.where(SQLTelemetry.exposure_id == exposure_id)
        with self._reader() as s:
            return [
                {c.name: getattr(r, c.name) for c in SQLTelemetry.__table__.columns}
                for r in s.scalars(q)
            ]
