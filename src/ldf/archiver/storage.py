"""An archiver's durable work queue: exposures and per-detector jobs, one transaction a call.

Jobs are leased like the Backbone's transfers: a worker killed mid-file loses its lease and
the job is claimed again; each step records its result, so a restarted archiver continues
from the last completed step and every file is archived exactly once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from ldf.archiver.models import ArchiveJob, Designation, ExposureRecord, JobState
from ldf.archiver.schema import SQLExposure, SQLJob
from ldf.db import utcnow
from ldf.db.store import SqlStore

__all__ = ["QueueStore"]

ORDERS = ("oldest-first", "newest-first", "science-first")
"""Backlog orders an operator can choose."""


def _exposure(row: SQLExposure) -> ExposureRecord:
    return ExposureRecord(
        instrument=row.instrument,
        obs_id=row.obs_id,
        day_obs=row.day_obs,
        seq_num=row.seq_num,
        exposure_id=row.exposure_id,
        obs_type=row.obs_type,
        designation=Designation(row.designation),
        visit=dict(row.visit),
        expected=list(row.expected),
        received_at=row.received_at,
        complete_at=row.complete_at,
        alarm_raised=row.alarm_raised,
    )


def _job(row: SQLJob) -> ArchiveJob:
    return ArchiveJob(
        id=row.id,
        instrument=row.instrument,
        obs_id=row.obs_id,
        detector=row.detector,
        state=JobState(row.state),
        attempts=row.attempts,
        error=row.error,
        flagged=row.flagged,
        problems=list(row.problems or []),
        size=row.size,
        checksum=row.checksum,
        oods_path=row.oods_path,
        lfn=row.lfn,
        received_at=row.received_at,
        oods_at=row.oods_at,
        archived_at=row.archived_at,
    )


class QueueStore(SqlStore):
    """Persistence of one archiver's queue."""

    package = "ldf.archiver"

    # -- exposures -------------------------------------------------------------------------

    def add_exposure(self, exp: ExposureRecord, present: list[str]) -> tuple[ExposureRecord, int]:
        """Record an exposure and queue a job per detector present (idempotent).

        Returns the exposure and how many jobs were newly queued.
        """
        now = utcnow()
        with self._session() as s, s.begin():
            row = s.scalars(
                select(SQLExposure).where(
                    SQLExposure.instrument == exp.instrument, SQLExposure.obs_id == exp.obs_id
                )
            ).one_or_none()
            if row is None:
                row = SQLExposure(
                    instrument=exp.instrument,
                    obs_id=exp.obs_id,
                    day_obs=exp.day_obs,
                    seq_num=exp.seq_num,
                    exposure_id=exp.exposure_id,
                    obs_type=exp.obs_type,
                    designation=exp.designation.value,
                    visit=exp.visit,
                    expected=exp.expected,
                    received_at=exp.received_at,
                    alarm_raised=False,
                )
                s.add(row)
            queued = self._queue(s, row, present, now)
            return _exposure(row), queued

    def _queue(self, s: Session, row: SQLExposure, detectors: list[str], now: datetime) -> int:
        have = set(
            s.scalars(
                select(SQLJob.detector).where(
                    SQLJob.instrument == row.instrument, SQLJob.obs_id == row.obs_id
                )
            )
        )
        queued = 0
        for det in detectors:
            if det in have:
                continue
            s.add(
                SQLJob(
                    instrument=row.instrument,
                    obs_id=row.obs_id,
                    seq_num=row.seq_num,
                    science=row.obs_type == "science",
                    detector=det,
                    state=JobState.QUEUED.value,
                    attempts=0,
                    next_attempt_at=now,
                    received_at=row.received_at,
                    flagged=False,
                    problems=[],
                )
            )
            queued += 1
        return queued

    def add_late(self, instrument: str, obs_id: str, detectors: list[str]) -> int:
        """Queue detectors that arrived after their exposure's readout."""
        with self._session() as s, s.begin():
            row = s.scalars(
                select(SQLExposure).where(
                    SQLExposure.instrument == instrument, SQLExposure.obs_id == obs_id
                )
            ).one()
            return self._queue(s, row, detectors, utcnow())

    def exposure(self, instrument: str, obs_id: str) -> ExposureRecord | None:
        """One exposure."""
        with self._reader() as s:
            row = s.scalars(
                select(SQLExposure).where(
                    SQLExposure.instrument == instrument, SQLExposure.obs_id == obs_id
                )
            ).one_or_none()
            return None if row is None else _exposure(row)

    def incomplete(self, instrument: str) -> list[tuple[ExposureRecord, list[str]]]:
        """Exposures not yet complete, each with the detectors that have no job yet."""
        with self._reader() as s:
            rows = list(
                s.scalars(
                    select(SQLExposure).where(
                        SQLExposure.instrument == instrument, SQLExposure.complete_at.is_(None)
                    )
                )
            )
            out = []
            for row in rows:
                have = set(
                    s.scalars(
                        select(SQLJob.detector).where(
                            SQLJob.instrument == instrument, SQLJob.obs_id == row.obs_id
                        )
                    )
                )
                out.append((_exposure(row), [d for d in row.expected if d not in have]))
            return out

    def set_alarm(self, instrument: str, obs_id: str) -> None:
        """Remember that the missing-detector alarm went out."""
        with self._session() as s, s.begin():
            s.execute(
                update(SQLExposure)
                .where(SQLExposure.instrument == instrument, SQLExposure.obs_id == obs_id)
                .values(alarm_raised=True)
            )

    def mark_complete_if_done(self, instrument: str, obs_id: str) -> ExposureRecord | None:
        """Mark an exposure complete once every expected detector is archived (or done).

        Returns the exposure the first time it becomes complete, else None.
        """
        finished = (JobState.ARCHIVED.value, JobState.DONE.value)
        with self._session() as s, s.begin():
            row = s.scalars(
                select(SQLExposure).where(
                    SQLExposure.instrument == instrument, SQLExposure.obs_id == obs_id
                )
            ).one_or_none()
            if row is None or row.complete_at is not None:
                return None
            done = set(
                s.scalars(
                    select(SQLJob.detector).where(
                        SQLJob.instrument == instrument,
                        SQLJob.obs_id == obs_id,
                        SQLJob.state.in_(finished),
                    )
                )
            )
            if not set(row.expected) <= done:
                return None
            row.complete_at = utcnow()
            return _exposure(row)

    # -- jobs ------------------------------------------------------------------------------

    def claim(
        self, instrument: str, owner: str, limit: int, lease_s: float, order: str
    ) -> list[ArchiveJob]:
        """Lease up to ``limit`` jobs in the backlog order an operator chose."""
        if order not in ORDERS:
            raise ValueError(order)
        now = utcnow()
        workable = (JobState.QUEUED.value, JobState.IN_OODS.value)
        due = or_(
            and_(SQLJob.state.in_(workable), SQLJob.next_attempt_at <= now),
            and_(SQLJob.state == JobState.ACTIVE.value, SQLJob.lease_until < now),
        )
        keys: list[Any] = []
        if order == "science-first":
            keys.append(case((SQLJob.science.is_(True), 0), else_=1))
        keys.append(SQLJob.seq_num.desc() if order == "newest-first" else SQLJob.seq_num)
        keys.append(SQLJob.id)
        with self._session() as s, s.begin():
            rows = list(
                s.scalars(
                    select(SQLJob)
                    .where(SQLJob.instrument == instrument, due)
                    .order_by(*keys)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            for row in rows:
                # An expired lease goes back to the step it had reached.
                if row.state == JobState.ACTIVE.value:
                    row.state = (JobState.IN_OODS if row.oods_at else JobState.QUEUED).value
                row.lease_owner = owner
                row.lease_until = now + timedelta(seconds=lease_s)
                row.attempts += 1
            out = [_job(r) for r in rows]
            for row in rows:
                row.state = JobState.ACTIVE.value
            return out

    def reclaim(self, instrument: str) -> int:
        """Return every leased job of an instrument to the step it had reached.

        Called when an archiver starts: one archiver process serves an instrument (its OCS
        device name is unique on the bus), so any lease still held belongs to a predecessor
        that died, e.g. by ``kill -9``. Returns how many jobs were reclaimed.
        """
        with self._session() as s, s.begin():
            rows = list(
                s.scalars(
                    select(SQLJob).where(
                        SQLJob.instrument == instrument, SQLJob.state == JobState.ACTIVE.value
                    )
                )
            )
            for row in rows:
                row.state = (JobState.IN_OODS if row.oods_at else JobState.QUEUED).value
                row.lease_owner = None
                row.lease_until = None
                row.next_attempt_at = utcnow()
            return len(rows)

    def record(self, job_id: int, owner: str, **values: Any) -> bool:
        """Record a step's result for a leased job; False if the lease was lost."""
        with self._session() as s, s.begin():
            row = s.get(SQLJob, job_id, with_for_update=True)
            if row is None or row.lease_owner != owner:
                return False
            for k, v in values.items():
                setattr(row, k, v.value if isinstance(v, JobState) else v)
            state = values.get("state")
            # Any state but ACTIVE hands the job back: the lease ends.
            if state is not None and state is not JobState.ACTIVE:
                row.lease_owner = None
                row.lease_until = None
            return True

    def jobs(
        self, instrument: str, *, obs_id: str | None = None, states: tuple[JobState, ...] = ()
    ) -> list[ArchiveJob]:
        """Jobs of an instrument (optionally one exposure, some states), in sequence order."""
        with self._reader() as s:
            q = select(SQLJob).where(SQLJob.instrument == instrument)
            if obs_id:
                q = q.where(SQLJob.obs_id == obs_id)
            if states:
                q = q.where(SQLJob.state.in_([st.value for st in states]))
            return [_job(r) for r in s.scalars(q.order_by(SQLJob.seq_num, SQLJob.detector))]

    def counts(self, instrument: str) -> dict[str, int]:
        """Jobs per state."""
        with self._reader() as s:
            q = (
                select(SQLJob.state, func.count())
                .where(SQLJob.instrument == instrument)
                .group_by(SQLJob.state)
            )
            return {state: int(n) for state, n in s.execute(q)}

    def exposures(self, instrument: str, limit: int = 1000) -> list[ExposureRecord]:
        """Exposures, newest first."""
        with self._reader() as s:
            q = (
                select(SQLExposure)
                .where(SQLExposure.instrument == instrument)
                .order_by(SQLExposure.seq_num.desc())
                .limit(limit)
            )
            return [_exposure(r) for r in s.scalars(q)]

    def retry_failed(self, instrument: str) -> int:
        """Queue failed jobs again (an operator's decision)."""
        with self._session() as s, s.begin():
            res = s.execute(
                update(SQLJob)
                .where(SQLJob.instrument == instrument, SQLJob.state == JobState.FAILED.value)
                .values(state=JobState.QUEUED.value, attempts=0, next_attempt_at=utcnow())
            )
            return int(res.rowcount or 0)  # type: ignore[attr-defined]
