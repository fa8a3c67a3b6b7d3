"""Alert distribution's SQL store: the alert index, the log, manifests, feeds, audit.

Positions must become visible in order, or a feed could move its cursor past an entry that
commits later. Writers of the log are therefore serialized: by ``BEGIN IMMEDIATE`` on SQLite,
by a transaction-scoped advisory lock on PostgreSQL (released at commit), so commit order is
position order on both engines.

The log's newest entries are also kept in memory (:class:`_LogTail`) as this store wrote
them, so feeds reading at the head (all of them, during a visit) do not query the database
for rows it has just written: that query was ~15 % of the server's CPU with six feeds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ldf.alerts.formats import AlertMeta
from ldf.alerts.models import EntryKind, Feed, FeedSpec, Manifest, manifest_checksum
from ldf.alerts.schema import SQLAlert, SQLAudit, SQLFeed, SQLLog, SQLManifest
from ldf.db.store import SqlStore
from ldf.errors import NotFoundError, StateError

__all__ = ["AlertStore", "LogRow"]

_LOG_LOCK = 0x4C44_4641_4C52_5431 & 0x7FFF_FFFF_FFFF_FFFF
"""PostgreSQL advisory lock key of the log's writers ('LDFALRT1')."""

LogRow = dict[str, Any]
"""One log entry joined with its alert's index row (see :meth:`AlertStore.read_log`)."""

_ALERT_COLUMNS = [
    SQLAlert.segment,
    SQLAlert.offset,
    SQLAlert.length,
    SQLAlert.schema_id,
    SQLAlert.detector,
    SQLAlert.dia_object_id,
    SQLAlert.ra,
    SQLAlert.dec,
    SQLAlert.band,
    SQLAlert.mjd,
    SQLAlert.psf_flux,
    SQLAlert.psf_flux_err,
    SQLAlert.snr,
    SQLAlert.reliability,
    SQLAlert.archive_file,
    SQLAlert.archive_offset,
    SQLAlert.archive_length,
    SQLAlert.ingest_unix,
    SQLAlert.producer,
]


def _feed(row: Any) -> Feed:
    """A feed from its row (an `SQLFeed` or a Core row of its columns)."""
    return Feed(
        **row.spec,
        cursor=row.cursor,
        created_unix=row.created_unix,
        delivered=row.delivered,
        last_ack_unix=row.last_ack_unix,
        last_fetch_unix=row.last_fetch_unix,
        errors=row.errors,
        state=row.state,
    )


_FEED_BY_NAME = select(*SQLFeed.__table__.c).where(SQLFeed.__table__.c.name == bindparam("name"))


def _relevant(feed: str, live: bool) -> Any:
    """The log entries a feed is presented."""
    if live:
        return or_(SQLLog.target.is_(None), SQLLog.target == feed)
    return SQLLog.target == feed


def _manifest_row(position: int, manifest: Manifest) -> LogRow:
    row: LogRow = {c.key: None for c in _ALERT_COLUMNS}
    row.update(
        position=position,
        kind=EntryKind.MANIFEST.value,
        visit=manifest.visit,
        alert_id=None,
        entry_format=None,
        replay=False,
        body=manifest.model_dump(mode="json"),
        created_unix=manifest.closed_unix,
        target=None,
    )
    return row


class _LogTail:
    """The newest log entries this store committed, as :meth:`AlertStore.read_log` returns
    them, with consecutive positions.

    Exact by construction: it holds one run of consecutive positions, each entry as it was
    committed, so for ``after`` inside the run the entries after it up to the run's end are
    exactly the log's; anything past the run's end (another writer's, or an entry this
    store did not record) is read from the database. A write whose first position does not
    follow the run (something else wrote in between) starts a new run; anything that
    changes committed rows (archiving) empties it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: list[LogRow] = []
        """Consecutive positions; a list, so a read starts at its index in O(1)."""
        self.lock = threading.Lock()

    def extend(self, rows: Sequence[LogRow]) -> None:
        if not rows or self.capacity <= 0:
            return
        with self.lock:
            if self.rows and rows[0]["position"] != self.rows[-1]["position"] + 1:
                self.rows = []
            self.rows.extend(rows)
            if len(self.rows) > self.capacity + self.capacity // 4:  # trimmed in chunks
                del self.rows[: len(self.rows) - self.capacity]

    def clear(self) -> None:
        with self.lock:
            self.rows = []

    def read(
        self, feed: str, live: bool, after: int, limit: int
    ) -> tuple[list[LogRow], int] | None:
        """If the run covers ``after``: the feed's entries of the run after it (at most
        ``limit``) and the last position they account for (the run's end unless ``limit``
        stopped them); entries after that position are the database's. Else None.

        Only live feeds: the run holds entries for everyone, never the copies addressed to
        one feed that are all a non-live feed is presented."""
        if not live:
            return None
        with self.lock:
            if not self.rows:
                return None
            first, last = self.rows[0]["position"], self.rows[-1]["position"]
            if not first - 1 <= after < last:
                return None
            out: list[LogRow] = []
            rows = self.rows
            for i in range(after + 1 - first, len(rows)):
                row = rows[i]
                target = row["target"]
                if (target is None and live) or target == feed:
                    out.append(row)
                    if len(out) >= limit:
                        return out, row["position"]
            return out, last

    def count(self, feed: str, live: bool, after: int, upto: int) -> int | None:
        """Entries of the feed in positions (after, upto] if the run holds them all."""
        if not live:
            return None
        with self.lock:
            if not self.rows:
                return None
            first, last = self.rows[0]["position"], self.rows[-1]["position"]
            if not (first - 1 <= after and upto <= last):
                return None
            n = 0
            for row in self.rows[after + 1 - first : max(upto + 1 - first, 0)]:
                target = row["target"]
                n += (target is None and live) or target == feed
            return n


_TAIL_ENTRIES = 200_000
"""Log entries kept in memory (~0.2 GB of row dicts: five 40,000-alert visits)."""


class AlertStore(SqlStore):
    """SQL store of alert distribution (SQLite or PostgreSQL)."""

    package = "ldf.alerts"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tail = _LogTail(_TAIL_ENTRIES)

    def _lock_log(self, s: Session) -> None:
        if s.bind is not None and s.bind.dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOG_LOCK})

    # -- ingest ---------------------------------------------------------------------------

    def existing(self, alert_ids: Iterable[int]) -> set[int]:
        """Which of these alertIds are stored."""
        ids = list(alert_ids)
        found: set[int] = set()
        with self._reader() as s:
            for i in range(0, len(ids), 900):
                chunk = ids[i : i + 900]
                found.update(
                    s.scalars(select(SQLAlert.alert_id).where(SQLAlert.alert_id.in_(chunk)))
                )
        return found

    def add_alerts(
        self,
        metas: Sequence[AlertMeta],
        locations: Sequence[tuple[int, int, int]],
        producer: str,
    ) -> list[int]:
        """Index new alerts and append them to the log; their positions, in order.

        Raises
        ------
        StateError
            One of the alertIds is already stored (the caller filters duplicates first, under
            the segment writer lock, so this means two services write one log).
        """
        now = time.time()
        # Everything but the positions is built before the transaction: the log's lock is
        # held only for the inserts (every acknowledgement waits for it).
        log_rows = [
            {
                "kind": EntryKind.ALERT.value,
                "visit": m.visit,
                "alert_id": m.alert_id,
                "target": None,
                "format": None,
                "replay": False,
                "created_unix": now,
                "body": None,
            }
            for m in metas
        ]
        # The alerts' index fields, shared by their index rows and the log tail's rows.
        indexed = [
            {
                "alert_id": m.alert_id,
                "visit": m.visit,
                "detector": m.detector,
                "dia_object_id": m.dia_object_id,
                "schema_id": m.schema_id,
                "segment": loc[0],
                "offset": loc[1],
                "length": loc[2],
                "ingest_unix": now,
                "ra": m.ra,
                "dec": m.dec,
                "band": m.band,
                "mjd": m.mjd,
                "psf_flux": m.psf_flux,
                "psf_flux_err": m.psf_flux_err,
                "snr": m.snr,
                "reliability": m.reliability,
                "producer": producer,
            }
            for m, loc in zip(metas, locations, strict=True)
        ]
        log = cast(Table, SQLLog.__table__)
        alerts = cast(Table, SQLAlert.__table__)
        with self._session() as s, s.begin():
            self._lock_log(s)
            # Core inserts on the tables: the ORM's bulk path costs as much as the database.
            positions = list(
                s.scalars(
                    insert(log).returning(log.c.position, sort_by_parameter_order=True), log_rows
                )
            )
            for fields, pos in zip(indexed, positions, strict=True):
                fields["position"] = pos
            try:
                s.execute(insert(alerts), indexed)
            except IntegrityError as exc:
                raise StateError(
                    "an alertId was stored concurrently: is a second alert service writing "
                    "this log?"
                ) from exc
        # Committed: the rows as read_log would return them.
        self.tail.extend(
            [
                {
                    **fields,
                    "kind": EntryKind.ALERT.value,
                    "entry_format": None,
                    "replay": False,
                    "body": None,
                    "created_unix": now,
                    "target": None,
                    "archive_file": None,
                    "archive_offset": None,
                    "archive_length": None,
                }
                for fields in indexed
            ]
        )
        return positions

    def add_copies(
        self,
        target: str,
        alert_ids: Sequence[int],
        *,
        replay: bool,
        formats: Sequence[str | None] | None = None,
    ) -> int:
        """Append copies of stored alerts addressed to one feed; how many."""
        if not alert_ids:
            return 0
        now = time.time()
        with self._session() as s, s.begin():
            self._lock_log(s)
            visits = (
                dict(
                    s.execute(
                        select(SQLAlert.alert_id, SQLAlert.visit).where(
                            SQLAlert.alert_id.in_(list(alert_ids))
                        )
                    ).all()
                )
                if len(alert_ids) <= 900
                else self._visits_of(s, alert_ids)
            )
            fmts = list(formats) if formats is not None else [None] * len(alert_ids)
            rows = [
                {
                    "kind": EntryKind.ALERT.value,
                    "visit": visits[a],
                    "alert_id": a,
                    "target": target,
                    "format": f,
                    "replay": replay,
                    "created_unix": now,
                    "body": None,
                }
                for a, f in zip(alert_ids, fmts, strict=True)
                if a in visits
            ]
            if rows:
                s.execute(insert(SQLLog), rows)
            return len(rows)

    def _visits_of(self, s: Session, alert_ids: Sequence[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        ids = list(alert_ids)
        for i in range(0, len(ids), 900):
            out.update(
                s.execute(
                    select(SQLAlert.alert_id, SQLAlert.visit).where(
                        SQLAlert.alert_id.in_(ids[i : i + 900])
                    )
                ).all()
            )
        return out

    # -- manifests ------------------------------------------------------------------------

    def visit_alert_ids(self, visit: int) -> list[int]:
        """The alertIds of a visit, sorted."""
        with self._reader() as s:
            return list(
                s.scalars(
                    select(SQLAlert.alert_id)
                    .where(SQLAlert.visit == visit)
                    .order_by(SQLAlert.alert_id)
                )
            )

    def close_visit(self, visit: int) -> tuple[Manifest, bool]:
        """Append the visit's manifest unless the latest one already says the same.

        Returns the manifest and whether a new revision was appended.
        """
        manifest, position = self._close_visit(visit)
        if position is not None:  # committed: the entry as read_log would return it
            self.tail.extend([_manifest_row(position, manifest)])
        return manifest, position is not None

    def _close_visit(self, visit: int) -> tuple[Manifest, int | None]:
        now = time.time()
        with self._session() as s, s.begin():
            self._lock_log(s)
            ids = list(s.scalars(select(SQLAlert.alert_id).where(SQLAlert.visit == visit)))
            checksum = manifest_checksum(ids)
            row = s.get(SQLManifest, visit)
            if row is not None and row.count == len(ids) and row.checksum == checksum:
                return (
                    Manifest(
                        visit=visit,
                        count=row.count,
                        checksum=row.checksum,
                        revision=row.revision,
                        closed_unix=row.closed_unix,
                    ),
                    None,
                )
            revision = 1 if row is None else row.revision + 1
            manifest = Manifest(
                visit=visit, count=len(ids), checksum=checksum, revision=revision, closed_unix=now
            )
            entry = SQLLog(
                kind=EntryKind.MANIFEST.value,
                visit=visit,
                alert_id=None,
                target=None,
                format=None,
                replay=False,
                created_unix=now,
                body=manifest.model_dump(mode="json"),
            )
            s.add(entry)
            s.flush()
            if row is None:
                s.add(
                    SQLManifest(
                        visit=visit,
                        revision=revision,
                        count=len(ids),
                        checksum=checksum,
                        closed_unix=now,
                        position=entry.position,
                    )
                )
            else:
                row.revision, row.count, row.checksum = revision, len(ids), checksum
                row.closed_unix, row.position = now, entry.position
            return manifest, entry.position

    def add_feed_manifest(self, target: str, manifest: Manifest, *, replay: bool) -> None:
        """Append a manifest addressed to one feed (a replay's or a filtered feed's)."""
        with self._session() as s, s.begin():
            self._lock_log(s)
            s.add(
                SQLLog(
                    kind=EntryKind.MANIFEST.value,
                    visit=manifest.visit,
                    alert_id=None,
                    target=target,
                    format=None,
                    replay=replay,
                    created_unix=time.time(),
                    body=manifest.model_dump(mode="json"),
                )
            )

    def manifest(self, visit: int) -> Manifest:
        """The latest manifest of a visit.

        Raises
        ------
        NotFoundError
            The visit has not been closed.
        """
        with self._reader() as s:
            row = s.get(SQLManifest, visit)
            if row is None:
                raise NotFoundError(f"visit {visit} has no manifest (not closed yet)")
            return Manifest(
                visit=visit,
                count=row.count,
                checksum=row.checksum,
                revision=row.revision,
                closed_unix=row.closed_unix,
            )

    def manifested_visits(self, visits: Iterable[int]) -> set[int]:
        """Which of these visits have a manifest."""
        wanted = list(visits)
        with self._reader() as s:
            return set(s.scalars(select(SQLManifest.visit).where(SQLManifest.visit.in_(wanted))))

    # -- reading the log ------------------------------------------------------------------

    def head(self) -> int:
        """The last position of the log (0 when empty)."""
        with self._reader() as s:
            return int(s.scalar(select(func.max(SQLLog.position))) or 0)

    def read_log(self, feed: str, live: bool, after: int, limit: int) -> list[LogRow]:
        """Entries presented to a feed after a position, in order, with their alerts' index.

        The rows are shared with the in-memory tail: callers must not modify them.
        """
        cached = self.tail.read(feed, live, after, limit)
        if cached is None:
            return self._read_log(feed, live, after, limit)
        rows, upto = cached
        if len(rows) >= limit:
            return rows
        # Past the run: entries others wrote (or this store did not record), if any.
        return rows + self._read_log(feed, live, upto, limit - len(rows))

    def _read_log(self, feed: str, live: bool, after: int, limit: int) -> list[LogRow]:
        stmt = (
            select(
                SQLLog.position,
                SQLLog.kind,
                SQLLog.visit,
                SQLLog.alert_id,
                SQLLog.format.label("entry_format"),
                SQLLog.replay,
                SQLLog.body,
                SQLLog.created_unix,
                SQLLog.target,
                *_ALERT_COLUMNS,
            )
            .outerjoin(SQLAlert, SQLAlert.alert_id == SQLLog.alert_id)
            .where(SQLLog.position > after, _relevant(feed, live))
            .order_by(SQLLog.position)
            .limit(limit)
        )
        with self._reader() as s:
            return [dict(r._mapping) for r in s.execute(stmt)]

    def feed_backlog(self, feed: str, live: bool, after: int, cap: int = 1_000_000) -> int:
        """Entries presented to a feed after a position (counted up to ``cap``)."""
        sub = (
            select(SQLLog.position)
            .where(SQLLog.position > after, _relevant(feed, live))
            .limit(cap)
            .subquery()
        )
        with self._reader() as s:
            return int(s.scalar(select(func.count()).select_from(sub)) or 0)

    def count_between(self, feed: str, live: bool, after: int, upto: int) -> int:
        """Entries presented to a feed in positions (after, upto]."""
        cached = self.tail.count(feed, live, after, upto)
        if cached is not None:
            return cached
        with self._reader() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(SQLLog)
                    .where(SQLLog.position > after, SQLLog.position <= upto, _relevant(feed, live))
                )
                or 0
            )

    def first_after(self, feed: str, live: bool, after: int) -> tuple[int, float] | None:
        """(position, created) of the first entry presented to a feed after a position."""
        with self._reader() as s:
            row = s.execute(
                select(SQLLog.position, SQLLog.created_unix)
                .where(SQLLog.position > after, _relevant(feed, live))
                .order_by(SQLLog.position)
                .limit(1)
            ).first()
            return None if row is None else (int(row[0]), float(row[1]))

    def feed_head(self, feed: str, live: bool) -> int:
        """The last position presented to a feed (0 when none)."""
        with self._reader() as s:
            if live:
                return int(s.scalar(select(func.max(SQLLog.position))) or 0)
            return int(
                s.scalar(select(func.max(SQLLog.position)).where(SQLLog.target == feed)) or 0
            )

    # -- the archive ----------------------------------------------------------------------

    def alert_row(self, alert_id: int) -> dict[str, Any]:
        """The index row of one alert.

        Raises
        ------
        NotFoundError
            No such alert.
        """
        with self._reader() as s:
            row = s.get(SQLAlert, alert_id)
            if row is None:
                raise NotFoundError(f"no alert {alert_id}")
            return {c.name: getattr(row, c.name) for c in SQLAlert.__table__.columns}

    def alert_visits(self, alert_ids: Sequence[int]) -> dict[int, int]:
        """The visit of each of these alerts."""
        with self._reader() as s:
            return self._visits_of(s, alert_ids)

    def alert_ids(
        self,
        *,
        visit: int | None = None,
        dia_object_id: int | None = None,
        since_unix: float | None = None,
        until_unix: float | None = None,
        alert_id_min: int | None = None,
        alert_id_max: int | None = None,
        visits: Sequence[int] | None = None,
        limit: int | None = None,
    ) -> list[int]:
        """AlertIds matching a selection, in log order."""
        conds = []
        if visit is not None:
            conds.append(SQLAlert.visit == visit)
        if visits is not None:
            conds.append(SQLAlert.visit.in_(list(visits)))
        if dia_object_id is not None:
            conds.append(SQLAlert.dia_object_id == dia_object_id)
        if since_unix is not None:
            conds.append(SQLAlert.ingest_unix >= since_unix)
        if until_unix is not None:
            conds.append(SQLAlert.ingest_unix < until_unix)
        if alert_id_min is not None:
            conds.append(SQLAlert.alert_id >= alert_id_min)
        if alert_id_max is not None:
            conds.append(SQLAlert.alert_id <= alert_id_max)
        stmt = select(SQLAlert.alert_id).where(and_(*conds)).order_by(SQLAlert.position)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._reader() as s:
            return list(s.scalars(stmt))

    def unarchived(self, visit: int) -> list[dict[str, Any]]:
        """Index rows of a visit's alerts not archived yet, in log order."""
        with self._reader() as s:
            rows = s.scalars(
                select(SQLAlert)
                .where(SQLAlert.visit == visit, SQLAlert.archive_file.is_(None))
                .order_by(SQLAlert.position)
            )
            return [
                {
                    "alert_id": r.alert_id,
                    "segment": r.segment,
                    "offset": r.offset,
                    "length": r.length,
                }
                for r in rows
            ]

    def set_archived(self, locations: Sequence[tuple[int, str, int, int]]) -> None:
        """Record where alerts are archived: (alert_id, file, offset, length)."""
        self.tail.clear()  # its rows say "not archived"; the segments may go now
        with self._session() as s, s.begin():
            for alert_id, name, offset, length in locations:
                s.execute(
                    update(SQLAlert)
                    .where(SQLAlert.alert_id == alert_id)
                    .values(archive_file=name, archive_offset=offset, archive_length=length)
                )

    def visits_to_archive(self) -> list[int]:
        """Closed visits with alerts not archived yet."""
        with self._reader() as s:
            return list(
                s.scalars(
                    select(SQLAlert.visit)
                    .where(
                        SQLAlert.archive_file.is_(None),
                        SQLAlert.visit.in_(select(SQLManifest.visit)),
                    )
                    .distinct()
                    .order_by(SQLAlert.visit)
                )
            )

    def counts(self) -> dict[str, int]:
        """Alerts, visits, manifests and log entries stored."""
        with self._reader() as s:
            return {
                "alerts": int(s.scalar(select(func.count()).select_from(SQLAlert)) or 0),
                "visits": int(s.scalar(select(func.count(func.distinct(SQLAlert.visit)))) or 0),
                "manifests": int(s.scalar(select(func.count()).select_from(SQLManifest)) or 0),
                "log_entries": int(s.scalar(select(func.count()).select_from(SQLLog)) or 0),
                "archived": int(
                    s.scalar(
                        select(func.count())
                        .select_from(SQLAlert)
                        .where(SQLAlert.archive_file.is_not(None))
                    )
                    or 0
                ),
            }

    # -- feeds ----------------------------------------------------------------------------

    def create_feed(self, spec: FeedSpec, cursor: int) -> Feed:
        """Create a feed with its cursor.

        Raises
        ------
        StateError
            A feed of that name exists.
        """
        now = time.time()
        try:
            with self._session() as s, s.begin():
                row = SQLFeed(
                    name=spec.name,
                    broker=spec.broker,
                    spec=spec.model_dump(mode="json"),
                    cursor=cursor,
                    created_unix=now,
                    delivered=0,
                    errors=0,
                    state="active",
                )
                s.add(row)
                s.add(
                    SQLAudit(
                        time_unix=now,
                        feed=spec.name,
                        actor=spec.broker,
                        event="feed_created",
                        detail={**spec.model_dump(mode="json"), "cursor": cursor},
                    )
                )
        except IntegrityError:
            raise StateError(f"feed {spec.name!r} exists") from None
        return _feed(row)

    def feed(self, name: str) -> Feed:
        """A feed by name.

        Raises
        ------
        NotFoundError
            No such feed.
        """
        # One prepared Core statement on a plain connection: building the query and the
        # ORM session's machinery were 3/4 of a lookup, and every fetch and acknowledgement
        # makes one (~1,300 per visit).
        with self.read_engine.connect() as conn:
            row = conn.execute(_FEED_BY_NAME, {"name": name}).first()
        if row is None:
            raise NotFoundError(f"no feed {name!r}")
        return _feed(row)

    def feeds(self, broker: str | None = None) -> list[Feed]:
        """Every feed, or a broker's."""
        stmt = select(SQLFeed).order_by(SQLFeed.name)
        if broker is not None:
            stmt = stmt.where(SQLFeed.broker == broker)
        with self._reader() as s:
            return [_feed(r) for r in s.scalars(stmt)]

    def delete_feed(self, name: str, actor: str) -> None:
        """Remove a feed (its addressed entries stay in the log)."""
        with self._session() as s, s.begin():
            row = s.get(SQLFeed, name)
            if row is None:
                raise NotFoundError(f"no feed {name!r}")
            s.delete(row)
            s.add(SQLAudit(time_unix=time.time(), feed=name, actor=actor, event="feed_deleted"))

    def ack(self, name: str, position: int, delivered: int) -> tuple[int, int]:
        """Move a feed's cursor forward to ``position``; (old cursor, new cursor)."""
        now = time.time()
        with self._session() as s, s.begin():
            row = s.get(SQLFeed, name, with_for_update=True)
            if row is None:
                raise NotFoundError(f"no feed {name!r}")
            old = row.cursor
            if position > old:
                row.cursor = position
                row.delivered += delivered
                row.last_ack_unix = now
            return old, row.cursor

    def count_error(self, name: str, detail: dict[str, Any], actor: str) -> None:
        """Count an error on a feed and audit it."""
        with self._session() as s, s.begin():
            s.execute(update(SQLFeed).where(SQLFeed.name == name).values(errors=SQLFeed.errors + 1))
            s.add(
                SQLAudit(
                    time_unix=time.time(), feed=name, actor=actor, event="error", detail=detail
                )
            )

    # -- audit ----------------------------------------------------------------------------

    def audit(self, event: str, actor: str, feed: str | None = None, **detail: Any) -> None:
        """Record an event in the audit trail."""
        with self._session() as s, s.begin():
            s.add(
                SQLAudit(time_unix=time.time(), feed=feed, actor=actor, event=event, detail=detail)
            )

    def audit_trail(self, feed: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The latest audited events, newest first."""
        stmt = select(SQLAudit).order_by(SQLAudit.id.desc()).limit(limit)
        if feed is not None:
            stmt = stmt.where(SQLAudit.feed == feed)
        with self._reader() as s:
            return [
                {
                    "time_unix": r.time_unix,
                    "feed": r.feed,
                    "actor": r.actor,
                    "event": r.event,
                    "detail": r.detail,
                }
                for r in s.scalars(stmt)
            ]
