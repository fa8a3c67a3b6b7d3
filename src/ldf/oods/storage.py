"""The OODS index store: cached files, the arrival log, pins and read leases.

Every method is one transaction and returns domain models (`ldf.oods.models`), never ORM
rows. The same code runs on SQLite and PostgreSQL. Whether a file is pinned is computed from
the pin table at query time, so a pin on a day or an exposure also protects files that
arrive after it was made. A file leaves the index only through `IndexStore.delete_expirable`,
whose one conditional ``DELETE`` re-checks pins and leases in the same transaction as the
delete: a reader that took its lease first always wins, one that comes after finds no entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ldf.db.store import SqlStore
from ldf.errors import NotFoundError
from ldf.oods.models import Arrival, OodsEntry, Pin
from ldf.oods.schema import SQLEntry, SQLEvent, SQLLease, SQLPin

__all__ = ["FILTERS", "IndexStore"]

FILTERS = ("instrument", "day_obs", "exposure", "obs_id", "detector", "obs_type", "dataset_type")
"""Exact-match filters of `IndexStore.find` (``exposure`` is the exposure id)."""

_COLUMNS: dict[str, Any] = {
    "instrument": SQLEntry.instrument,
    "day_obs": SQLEntry.day_obs,
    "exposure": SQLEntry.exposure_id,
    "obs_id": SQLEntry.obs_id,
    "detector": SQLEntry.detector,
    "obs_type": SQLEntry.obs_type,
    "dataset_type": SQLEntry.dataset_type,
}


def _pinned() -> ColumnElement[bool]:
    """True for an entry some pin selects (correlated with the outer ``oods_entry``)."""
    return exists().where(
        or_(SQLPin.instrument.is_(None), SQLPin.instrument == SQLEntry.instrument),
        or_(
            SQLPin.obs_id == SQLEntry.obs_id,
            SQLPin.exposure_id == SQLEntry.exposure_id,
            SQLPin.day_obs == SQLEntry.day_obs,
        ),
    )


def _leased(now: datetime) -> ColumnElement[bool]:
    """True for an entry with an unexpired read lease."""
    return exists().where(SQLLease.entry_id == SQLEntry.id, SQLLease.expires_at > now)


def _entry(row: SQLEntry, pinned: bool) -> OodsEntry:
    return OodsEntry(
        id=row.id,
        instrument=row.instrument,
        day_obs=row.day_obs,
        obs_id=row.obs_id,
        exposure_id=row.exposure_id,
        detector=row.detector,
        obs_type=row.obs_type,
        dataset_type=row.dataset_type,
        path=row.path,
        size=row.size,
        checksum=row.checksum,
        arrived_at=row.arrived_at,
        pinned=bool(pinned),
    )


class IndexStore(SqlStore):
    """Persistence of the OODS index in one SQLAlchemy database (see `ldf.db.SqlStore`)."""

    package = "ldf.oods"

    # -- entries ---------------------------------------------------------------------------

    def upsert(self, values: dict[str, Any], now: datetime) -> tuple[OodsEntry, bool]:
        """Index a file; returns the entry and whether it arrived (new or new content).

        The same (instrument, obs_id, detector) with the same size and checksum is a no-op;
        with different content (the archiver rewrote the file) the row takes the new
        values and the arrival is logged again.
        """
        key = (values["instrument"], values["obs_id"], values["detector"])
        for attempt in range(2):
            try:
                with self._session() as session, session.begin():
                    row = session.scalars(
                        select(SQLEntry).where(
                            SQLEntry.instrument == key[0],
                            SQLEntry.obs_id == key[1],
                            SQLEntry.detector == key[2],
                        )
                    ).one_or_none()
                    if row is not None and (row.size, row.checksum) == (
                        values["size"],
                        values["checksum"],
                    ):
                        arrived = False
                    else:
                        if row is None:
                            row = SQLEntry(**values)
                            session.add(row)
                        else:
                            for name, value in values.items():
                                setattr(row, name, value)
                        session.flush()
                        session.add(SQLEvent(entry_id=row.id, at=now))
                        arrived = True
                    pinned = session.scalar(select(_pinned()).where(SQLEntry.id == row.id))
                    return _entry(row, bool(pinned)), arrived
            except IntegrityError:
                # Another writer indexed the same file between our select and insert.
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, instrument: str, obs_id: str, detector: str) -> OodsEntry | None:
        """A cached file by its data ID (None if not cached)."""
        rows = self.find(instrument=instrument, obs_id=obs_id, detector=detector, limit=1)
        return rows[0] if rows else None

    def get_by_id(self, entry_id: int) -> OodsEntry | None:
        """A cached file by index id (None if not cached)."""
        with self._reader() as session:
            got = session.execute(
                select(SQLEntry, _pinned()).where(SQLEntry.id == entry_id)
            ).one_or_none()
            return None if got is None else _entry(got[0], got[1])

    def find(
        self,
        *,
        since: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        **filters: Any,
    ) -> list[OodsEntry]:
        """Cached files matching every given filter (None values are ignored), by id."""
        q = select(SQLEntry, _pinned().label("pinned"))
        for name, value in filters.items():
            if value is not None:
                q = q.where(_COLUMNS[name] == value)
        if since is not None:
            q = q.where(SQLEntry.arrived_at >= since)
        q = q.order_by(SQLEntry.id.desc() if newest_first else SQLEntry.id)
        if limit is not None:
            q = q.limit(limit)
        with self._reader() as session:
            return [_entry(row, pinned) for row, pinned in session.execute(q)]

    def exposures(
        self, *, instrument: str | None = None, day_obs: int | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Cached exposures, newest first: files, bytes, detectors, pinned files."""
        q = select(
            SQLEntry.instrument,
            SQLEntry.day_obs,
            SQLEntry.obs_id,
            SQLEntry.exposure_id,
            SQLEntry.obs_type,
            func.count().label("files"),
            func.sum(SQLEntry.size).label("bytes"),
            func.max(SQLEntry.arrived_at).label("last_arrival"),
            func.sum(case((_pinned(), 1), else_=0)).label("pinned"),
        ).group_by(
            SQLEntry.instrument,
            SQLEntry.day_obs,
            SQLEntry.obs_id,
            SQLEntry.exposure_id,
            SQLEntry.obs_type,
        )
        if instrument is not None:
            q = q.where(SQLEntry.instrument == instrument)
        if day_obs is not None:
            q = q.where(SQLEntry.day_obs == day_obs)
        q = q.order_by(SQLEntry.exposure_id.desc(), SQLEntry.instrument).limit(limit)
        with self._reader() as session:
            return [
                {
                    "instrument": r.instrument,
                    "day_obs": r.day_obs,
                    "obs_id": r.obs_id,
                    "exposure_id": r.exposure_id,
                    "obs_type": r.obs_type,
                    "files": int(r.files),
                    "bytes": int(r.bytes or 0),
                    "pinned_files": int(r.pinned or 0),
                    "last_arrival": r.last_arrival,
                }
                for r in session.execute(q)
            ]

    # -- arrival log -----------------------------------------------------------------------

    def last_event_id(self) -> int:
        """Id of the newest arrival (0 when there is none)."""
        with self._reader() as session:
            return int(session.scalar(select(func.max(SQLEvent.id))) or 0)

    def arrivals_after(
        self, event_id: int, *, limit: int = 100, instrument: str | None = None
    ) -> list[Arrival]:
        """Arrivals logged after ``event_id`` whose file is still cached, oldest first."""
        q = (
            select(SQLEvent.id, SQLEntry, _pinned())
            .join(SQLEntry, SQLEntry.id == SQLEvent.entry_id)
            .where(SQLEvent.id > event_id)
            .order_by(SQLEvent.id)
            .limit(limit)
        )
        if instrument is not None:
            q = q.where(SQLEntry.instrument == instrument)
        with self._reader() as session:
            return [
                Arrival(event_id=eid, entry=_entry(row, pinned))
                for eid, row, pinned in session.execute(q)
            ]

    # -- pins ------------------------------------------------------------------------------

    @staticmethod
    def _pin_where(selector: dict[str, Any]) -> list[ColumnElement[bool]]:
        return [
            getattr(SQLPin, name).is_(None) if value is None else getattr(SQLPin, name) == value
            for name, value in selector.items()
        ]

    def _pin_model(self, session: Session, row: SQLPin) -> Pin:
        match = [
            SQLEntry.obs_id == row.obs_id
            if row.obs_id is not None
            else SQLEntry.exposure_id == row.exposure_id
            if row.exposure_id is not None
            else SQLEntry.day_obs == row.day_obs
        ]
        if row.instrument is not None:
            match.append(SQLEntry.instrument == row.instrument)
        files = session.scalar(select(func.count()).select_from(SQLEntry).where(*match))
        pin = Pin.model_validate(row)
        pin.files = int(files or 0)
        return pin

    def add_pin(self, selector: dict[str, Any], reason: str, by: str, now: datetime) -> Pin:
        """Pin what ``selector`` selects (instrument, obs_id, exposure_id, day_obs); an
        identical pin is returned as it is."""
        with self._session() as session, session.begin():
            row = session.scalars(select(SQLPin).where(*self._pin_where(selector))).first()
            if row is None:
                row = SQLPin(**selector, reason=reason, pinned_by=by, created_at=now)
                session.add(row)
                session.flush()
            return self._pin_model(session, row)

    def remove_pins(self, selector: dict[str, Any]) -> int:
        """Remove the pins with exactly this selector; returns how many."""
        with self._session() as session, session.begin():
            result = session.execute(delete(SQLPin).where(*self._pin_where(selector)))
            return int(result.rowcount)  # type: ignore[attr-defined]

    def pins(self) -> list[Pin]:
        """Every pin, oldest first."""
        with self._reader() as session:
            rows = session.scalars(select(SQLPin).order_by(SQLPin.id)).all()
            return [self._pin_model(session, row) for row in rows]

    # -- read leases -----------------------------------------------------------------------

    def acquire_lease(self, lease_id: str, entry_id: int, holder: str, until: datetime) -> None:
        """Record a read lease on a cached file.

        Raises
        ------
        NotFoundError
            The file has left the cache.
        """
        with self._session() as session, session.begin():
            if session.get(SQLEntry, entry_id) is None:
                raise NotFoundError(f"file {entry_id} is no longer in the OODS cache")
            session.add(SQLLease(id=lease_id, entry_id=entry_id, holder=holder, expires_at=until))

    def renew_lease(self, lease_id: str, until: datetime) -> None:
        """Extend a lease (a long download keeps its file)."""
        with self._session() as session, session.begin():
            q = update(SQLLease).where(SQLLease.id == lease_id).values(expires_at=until)
            session.execute(q)

    def release_lease(self, lease_id: str) -> None:
        """End a lease (no-op if it is gone)."""
        with self._session() as session, session.begin():
            session.execute(delete(SQLLease).where(SQLLease.id == lease_id))

    def active_leases(self, now: datetime) -> int:
        """Unexpired read leases."""
        with self._reader() as session:
            q = select(func.count()).select_from(SQLLease).where(SQLLease.expires_at > now)
            return int(session.scalar(q) or 0)

    # -- expiry ----------------------------------------------------------------------------

    def classes(self) -> list[tuple[str, str]]:
        """Distinct (instrument, dataset_type) in the cache."""
        with self._reader() as session:
            q = select(SQLEntry.instrument, SQLEntry.dataset_type).distinct()
            return [(i, d) for i, d in session.execute(q)]

    def past_window(
        self, cutoffs: Sequence[tuple[str, str, datetime]], now: datetime
    ) -> list[tuple[OodsEntry, bool]]:
        """Files that arrived before their class's cutoff, with whether they are leased.

        ``cutoffs`` holds (instrument, dataset_type, cutoff); oldest arrivals first.
        """
        if not cutoffs:
            return []
        clauses = [
            and_(
                SQLEntry.instrument == inst,
                SQLEntry.dataset_type == dtype,
                SQLEntry.arrived_at < cutoff,
            )
            for inst, dtype, cutoff in cutoffs
        ]
        q = (
            select(SQLEntry, _pinned(), _leased(now))
            .where(or_(*clauses))
            .order_by(SQLEntry.arrived_at, SQLEntry.id)
        )
        with self._reader() as session:
            rows = session.execute(q)
            return [(_entry(row, pinned), bool(leased)) for row, pinned, leased in rows]

    def delete_expirable(self, entry_id: int, now: datetime) -> bool:
        """Remove a file from the index unless it is pinned or leased now (one transaction).

        Lapsed leases of the file go with it. Returns whether the row was removed.
        """
        with self._session() as session, session.begin():
            session.execute(
                delete(SQLLease).where(SQLLease.entry_id == entry_id, SQLLease.expires_at <= now)
            )
            result = session.execute(
                delete(SQLEntry).where(SQLEntry.id == entry_id, ~_pinned(), ~_leased(now))
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def purge_lapsed_leases(self, now: datetime) -> int:
        """Remove leases whose holder never released them (crashed readers)."""
        with self._session() as session, session.begin():
            result = session.execute(delete(SQLLease).where(SQLLease.expires_at <= now))
            return int(result.rowcount)  # type: ignore[attr-defined]

    # -- status ----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Counts and bytes per instrument and dataset type, pinned, oldest and newest."""
        with self._reader() as session:
            per = session.execute(
                select(
                    SQLEntry.instrument,
                    SQLEntry.dataset_type,
                    func.count(),
                    func.sum(SQLEntry.size),
                    func.min(SQLEntry.arrived_at),
                    func.max(SQLEntry.arrived_at),
                ).group_by(SQLEntry.instrument, SQLEntry.dataset_type)
            ).all()
            pinned = session.execute(
                select(func.count(), func.sum(SQLEntry.size)).where(_pinned())
            ).one()
            pins = session.scalar(select(func.count()).select_from(SQLPin))
        classes = [
            {
                "instrument": inst,
                "dataset_type": dtype,
                "files": int(n),
                "bytes": int(size or 0),
                "oldest": oldest,
                "newest": newest,
            }
            for inst, dtype, n, size, oldest, newest in per
        ]
        return {
            "files": sum(c["files"] for c in classes),
            "bytes": sum(c["bytes"] for c in classes),
            "classes": classes,
            "pinned_files": int(pinned[0] or 0),
            "pinned_bytes": int(pinned[1] or 0),
            "pins": int(pins or 0),
            "oldest": min((r[4] for r in per), default=None),
            "newest": max((r[5] for r in per), default=None),
        }
