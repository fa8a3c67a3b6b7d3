"""The Data Backbone catalog store: persistence of files, replicas, rules and the work queue.

Every method is one transaction and returns domain models (`ldf.backbone.models`), never ORM
rows. The same code runs on SQLite and PostgreSQL; the transfer queue is claimed with
``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL, while SQLite's ``BEGIN IMMEDIATE`` (see
`ldf.db.make_engine`) serializes claimers, so no transfer is ever handed to two workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ldf.backbone.models import (
    AuditReport,
    DeletionRequest,
    DeletionState,
    FileState,
    LogicalFile,
    Replica,
    ReplicaState,
    Retention,
    Rule,
    Transfer,
    TransferState,
)
from ldf.backbone.schema import (
    SQLAudit,
    SQLDataset,
    SQLDatasetFile,
    SQLDeletion,
    SQLFile,
    SQLReplica,
    SQLRule,
    SQLTransfer,
)
from ldf.config import Tier
from ldf.db import utcnow
from ldf.db.store import SqlStore
from ldf.errors import NotFoundError, UserInputError

__all__ = ["CatalogStore", "ReplicaRow"]

ReplicaRow = tuple[str, int, str, str, str]
"""(lfn, size, adler32, blake3, replica state) — what an audit compares against storage."""


def _file_model(row: SQLFile, datasets: list[str] | None = None) -> LogicalFile:
    return LogicalFile(
        lfn=row.lfn,
        size=row.size,
        adler32=row.adler32,
        blake3=row.blake3,
        metadata=dict(row.meta or {}),
        producer=row.producer,
        inputs=list(row.inputs or []),
        retention=Retention(row.retention),
        expires_at=row.expires_at,
        state=FileState(row.state),
        datasets=datasets or [],
        created_at=row.created_at,
    )


def _replica_model(row: SQLReplica, lfn: str) -> Replica:
    return Replica(
        lfn=lfn,
        site=row.site,
        endpoint=row.endpoint,
        tier=Tier(row.tier),
        uri=row.uri,
        state=ReplicaState(row.state),
        created_at=row.created_at,
        verified_at=row.verified_at,
    )


def _rule_model(row: SQLRule) -> Rule:
    return Rule(
        id=row.id,
        name=row.name,
        expression=row.expression,
        copies=row.copies,
        sites=list(row.sites),
        tier=Tier(row.tier) if row.tier else None,
        priority=row.priority,
        lifetime_s=row.lifetime_s,
        created_at=row.created_at,
        expires_at=row.expires_at,
        active=row.active,
    )


def _transfer_model(row: SQLTransfer, lfn: str, rule: str | None) -> Transfer:
    return Transfer(
        id=row.id,
        lfn=lfn,
        rule=rule,
        src_site=row.src_site,
        src_endpoint=row.src_endpoint,
        dst_site=row.dst_site,
        dst_endpoint=row.dst_endpoint,
        state=TransferState(row.state),
        priority=row.priority,
        attempts=row.attempts,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at,
        created_at=row.created_at,
        done_at=row.done_at,
    )


class CatalogStore(SqlStore):
    """Persistence of the Backbone catalog in one SQLAlchemy database (see `ldf.db.SqlStore`)."""

    package = "ldf.backbone"

    # -- files -----------------------------------------------------------------------------

    def _file_row(self, session: Session, lfn: str) -> SQLFile | None:
        return session.scalars(select(SQLFile).where(SQLFile.lfn == lfn)).one_or_none()

    def _datasets_of(self, session: Session, file_id: int) -> list[str]:
        q = (
            select(SQLDataset.name)
            .join(SQLDatasetFile, SQLDatasetFile.dataset_id == SQLDataset.id)
            .where(SQLDatasetFile.file_id == file_id)
            .order_by(SQLDataset.name)
        )
        return list(session.scalars(q))

    def get_file(self, lfn: str) -> LogicalFile | None:
        """A file by LFN (None if not catalogued)."""
        with self._reader() as session:
            row = self._file_row(session, lfn)
            return None if row is None else _file_model(row, self._datasets_of(session, row.id))

    def add_file(self, file: LogicalFile, replica: Replica) -> tuple[LogicalFile, bool]:
        """Catalogue a file together with its first, verified replica (one transaction).

        Returns the file and whether it was created. The same LFN with the same content is a
        no-op (the replica is recorded if new); different content raises.

        Raises
        ------
        UserInputError
            The LFN is catalogued with different content.
        """
        now = utcnow()
        with self._session() as session, session.begin():
            row = self._file_row(session, file.lfn)
            created = row is None
            if row is None:
                row = SQLFile(
                    lfn=file.lfn,
                    size=file.size,
                    adler32=file.adler32,
                    blake3=file.blake3,
                    meta=file.metadata,
                    producer=file.producer,
                    inputs=file.inputs,
                    retention=file.retention.value,
                    expires_at=file.expires_at,
                    state=FileState.ACTIVE.value,
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
                session.flush()
            elif (row.size, row.blake3) != (file.size, file.blake3):
                raise UserInputError(
                    f"{file.lfn} is already catalogued with different content "
                    f"({row.size} bytes, blake3 {row.blake3[:12]}…; new: {file.size} bytes, "
                    f"blake3 {file.blake3[:12]}…); an LFN names one content forever"
                )
            self._upsert_replica(session, row.id, replica, now)
            for name in file.datasets:
                self._attach(session, row.id, name, now)
            return _file_model(row, self._datasets_of(session, row.id)), created

    def _attach(self, session: Session, file_id: int, dataset: str, now: datetime) -> None:
        ds = session.scalars(select(SQLDataset).where(SQLDataset.name == dataset)).one_or_none()
        if ds is None:
            ds = SQLDataset(name=dataset, created_at=now)
            session.add(ds)
            session.flush()
        exists = session.get(SQLDatasetFile, (ds.id, file_id))
        if exists is None:
            session.add(SQLDatasetFile(dataset_id=ds.id, file_id=file_id))

    def _upsert_replica(self, session: Session, file_id: int, r: Replica, now: datetime) -> None:
        row = session.scalars(
            select(SQLReplica).where(
                SQLReplica.file_id == file_id,
                SQLReplica.site == r.site,
                SQLReplica.endpoint == r.endpoint,
            )
        ).one_or_none()
        verified = now if r.state is ReplicaState.AVAILABLE else None
        if row is None:
            session.add(
                SQLReplica(
                    file_id=file_id,
                    site=r.site,
                    endpoint=r.endpoint,
                    tier=r.tier.value,
                    uri=r.uri,
                    state=r.state.value,
                    created_at=now,
                    updated_at=now,
                    verified_at=verified,
                )
            )
        else:
            row.state = r.state.value
            row.uri = r.uri
            row.updated_at = now
            row.verified_at = verified or row.verified_at

    def iter_files(
        self,
        *,
        prefix: str | None = None,
        states: tuple[FileState, ...] = (FileState.ACTIVE,),
        batch: int = 2000,
    ) -> Iterator[LogicalFile]:
        """Every file (optionally under an LFN prefix), in LFN order, fetched in batches."""
        last = ""
        while True:
            with self._reader() as session:
                q = select(SQLFile).where(
                    SQLFile.lfn > last, SQLFile.state.in_([s.value for s in states])
                )
                if prefix:
                    q = q.where(SQLFile.lfn.startswith(prefix, autoescape=True))
                rows = list(session.scalars(q.order_by(SQLFile.lfn).limit(batch)))
            if not rows:
                return
            for row in rows:
                yield _file_model(row)
            last = rows[-1].lfn

    def set_file_state(self, lfn: str, state: FileState) -> None:
        """Change a file's lifecycle state."""
        with self._session() as session, session.begin():
            row = self._file_row(session, lfn)
            if row is None:
                raise NotFoundError(f"{lfn}: not in the catalog")
            row.state = state.value
            row.updated_at = utcnow()

    def dataset_files(self, dataset: str) -> list[str]:
        """LFNs in a dataset."""
        with self._reader() as session:
            q = (
                select(SQLFile.lfn)
                .join(SQLDatasetFile, SQLDatasetFile.file_id == SQLFile.id)
                .join(SQLDataset, SQLDataset.id == SQLDatasetFile.dataset_id)
                .where(SQLDataset.name == dataset)
                .order_by(SQLFile.lfn)
            )
            return list(session.scalars(q))

    # -- replicas --------------------------------------------------------------------------

    def replicas(self, lfn: str) -> list[Replica]:
        """Every replica of a file (any state)."""
        with self._reader() as session:
            row = self._file_row(session, lfn)
            if row is None:
                raise NotFoundError(f"{lfn}: not in the catalog")
            reps = session.scalars(
                select(SQLReplica).where(SQLReplica.file_id == row.id).order_by(SQLReplica.id)
            )
            return [_replica_model(r, lfn) for r in reps]

    def replicas_at(
        self, site: str, endpoint: str, states: tuple[ReplicaState, ...]
    ) -> Iterator[ReplicaRow]:
        """Replicas at one endpoint with their file's size and checksums (for audits)."""
        with self._reader() as session:
            q = (
                select(SQLFile.lfn, SQLFile.size, SQLFile.adler32, SQLFile.blake3, SQLReplica.state)
                .join(SQLReplica, SQLReplica.file_id == SQLFile.id)
                .where(
                    SQLReplica.site == site,
                    SQLReplica.endpoint == endpoint,
                    SQLReplica.state.in_([s.value for s in states]),
                )
                .execution_options(yield_per=5000)
            )
            yield from (tuple(row) for row in session.execute(q))  # type: ignore[misc]

    def set_replica(self, replica: Replica) -> None:
        """Record a replica's state (creating the row if needed)."""
        with self._session() as session, session.begin():
            row = self._file_row(session, replica.lfn)
            if row is None:
                raise NotFoundError(f"{replica.lfn}: not in the catalog")
            self._upsert_replica(session, row.id, replica, utcnow())

    # -- rules -----------------------------------------------------------------------------

    def add_rule(self, rule: Rule) -> Rule:
        """Store a new rule.

        Raises
        ------
        UserInputError
            A rule of that name exists.
        """
        now = utcnow()
        expires = now + timedelta(seconds=rule.lifetime_s) if rule.lifetime_s else None
        with self._session() as session:
            try:
                with session.begin():
                    row = SQLRule(
                        name=rule.name,
                        expression=rule.expression,
                        copies=rule.copies,
                        sites=rule.sites,
                        tier=rule.tier.value if rule.tier else None,
                        priority=rule.priority,
                        lifetime_s=rule.lifetime_s,
                        created_at=now,
                        expires_at=expires,
                        active=True,
                    )
                    session.add(row)
            except IntegrityError:
                raise UserInputError(f"a rule named {rule.name!r} exists already") from None
            return _rule_model(row)

    def rules(self, *, active_only: bool = True) -> list[Rule]:
        """Rules, highest priority first; active ones are those not deactivated nor expired."""
        now = utcnow()
        with self._reader() as session:
            q = select(SQLRule).order_by(SQLRule.priority, SQLRule.id)
            if active_only:
                q = q.where(
                    SQLRule.active.is_(True),
                    or_(SQLRule.expires_at.is_(None), SQLRule.expires_at > now),
                )
            return [_rule_model(r) for r in session.scalars(q)]

    def deactivate_rule(self, name: str) -> Rule:
        """Stop enforcing a rule (its replicas stay)."""
        with self._session() as session, session.begin():
            row = session.scalars(select(SQLRule).where(SQLRule.name == name)).one_or_none()
            if row is None:
                raise NotFoundError(f"no rule named {name!r}")
            row.active = False
            return _rule_model(row)

    # -- transfers (the durable work queue) ------------------------------------------------

    def enqueue(
        self,
        lfn: str,
        *,
        dst: Replica,
        priority: int,
        rule_id: int | None = None,
        src: tuple[str, str] | None = None,
    ) -> bool:
        """Queue a copy of a file to an endpoint and record the replica there as pending.

        Idempotent: returns False when a replica (other than lost/deleted) already exists
        there or a transfer is already queued or active.
        """
        now = utcnow()
        with self._session() as session, session.begin():
            f = self._file_row(session, lfn)
            if f is None:
                raise NotFoundError(f"{lfn}: not in the catalog")
            rep = session.scalars(
                select(SQLReplica).where(
                    SQLReplica.file_id == f.id,
                    SQLReplica.site == dst.site,
                    SQLReplica.endpoint == dst.endpoint,
                )
            ).one_or_none()
            if rep is not None and rep.state in (ReplicaState.AVAILABLE, ReplicaState.SUSPECT):
                return False
            t = session.scalars(
                select(SQLTransfer).where(
                    SQLTransfer.file_id == f.id,
                    SQLTransfer.dst_site == dst.site,
                    SQLTransfer.dst_endpoint == dst.endpoint,
                )
            ).one_or_none()
            if t is not None and t.state in (TransferState.QUEUED, TransferState.ACTIVE):
                return False
            pending = dst.model_copy(update={"state": ReplicaState.PENDING})
            self._upsert_replica(session, f.id, pending, now)
            values = {
                "rule_id": rule_id,
                "src_site": src[0] if src else None,
                "src_endpoint": src[1] if src else None,
                "state": TransferState.QUEUED.value,
                "priority": priority,
                "attempts": 0,
                "last_error": None,
                "next_attempt_at": now,
                "lease_owner": None,
                "lease_until": None,
                "updated_at": now,
                "done_at": None,
            }
            if t is None:
                session.add(
                    SQLTransfer(
                        file_id=f.id,
                        dst_site=dst.site,
                        dst_endpoint=dst.endpoint,
                        created_at=now,
                        bytes=0,
                        **values,
                    )
                )
            else:
                for k, v in values.items():
                    setattr(t, k, v)
            return True

    def claim(self, owner: str, limit: int, lease_s: float) -> list[Transfer]:
        """Lease up to ``limit`` due transfers to a worker (expired leases are reclaimed)."""
        now = utcnow()
        with self._session() as session, session.begin():
            due = or_(
                and_(
                    SQLTransfer.state == TransferState.QUEUED.value,
                    SQLTransfer.next_attempt_at <= now,
                ),
                and_(
                    SQLTransfer.state == TransferState.ACTIVE.value, SQLTransfer.lease_until < now
                ),
            )
            rows = list(
                session.scalars(
                    select(SQLTransfer)
                    .where(due)
                    .order_by(SQLTransfer.priority, SQLTransfer.next_attempt_at, SQLTransfer.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            out = []
            for row in rows:
                row.state = TransferState.ACTIVE.value
                row.lease_owner = owner
                row.lease_until = now + timedelta(seconds=lease_s)
                row.attempts += 1
                row.updated_at = now
                lfn = session.scalar(select(SQLFile.lfn).where(SQLFile.id == row.file_id))
                rule = (
                    session.scalar(select(SQLRule.name).where(SQLRule.id == row.rule_id))
                    if row.rule_id
                    else None
                )
                out.append(_transfer_model(row, lfn or "", rule))
            return out

    def finish_transfer(self, transfer_id: int, owner: str, nbytes: int, uri: str) -> bool:
        """Mark a transfer done and its replica available (one transaction).

        Returns False if the lease was lost to another worker (nothing changed).
        """
        now = utcnow()
        with self._session() as session, session.begin():
            row = session.get(SQLTransfer, transfer_id, with_for_update=True)
            if row is None or row.lease_owner != owner or row.state != TransferState.ACTIVE:
                return False
            row.state = TransferState.DONE.value
            row.bytes = nbytes
            row.done_at = now
            row.updated_at = now
            row.lease_owner = None
            row.lease_until = None
            session.execute(
                update(SQLReplica)
                .where(
                    SQLReplica.file_id == row.file_id,
                    SQLReplica.site == row.dst_site,
                    SQLReplica.endpoint == row.dst_endpoint,
                )
                .values(
                    state=ReplicaState.AVAILABLE.value, uri=uri, updated_at=now, verified_at=now
                )
            )
            return True

    def fail_transfer(
        self, transfer_id: int, owner: str, error: str, retry_at: datetime | None
    ) -> None:
        """Record a failed attempt: retry at ``retry_at``, or give up when it is None."""
        now = utcnow()
        with self._session() as session, session.begin():
            row = session.get(SQLTransfer, transfer_id, with_for_update=True)
            if row is None or row.lease_owner != owner:
                return
            row.last_error = error[:2000]
            row.updated_at = now
            row.lease_owner = None
            row.lease_until = None
            if retry_at is None:
                row.state = TransferState.FAILED.value
            else:
                row.state = TransferState.QUEUED.value
                row.next_attempt_at = retry_at

    def retry_failed(self) -> int:
        """Queue every given-up transfer again (an operator's decision); returns how many."""
        now = utcnow()
        with self._session() as session, session.begin():
            result = session.execute(
                update(SQLTransfer)
                .where(SQLTransfer.state == TransferState.FAILED.value)
                .values(state=TransferState.QUEUED.value, attempts=0, next_attempt_at=now)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def transfers(
        self, *, states: tuple[TransferState, ...] | None = None, limit: int = 100
    ) -> list[Transfer]:
        """Transfers, most recently updated first."""
        with self._reader() as session:
            q = (
                select(SQLTransfer, SQLFile.lfn, SQLRule.name)
                .join(SQLFile, SQLFile.id == SQLTransfer.file_id)
                .outerjoin(SQLRule, SQLRule.id == SQLTransfer.rule_id)
                .order_by(SQLTransfer.updated_at.desc(), SQLTransfer.id.desc())
                .limit(limit)
            )
            if states:
                q = q.where(SQLTransfer.state.in_([s.value for s in states]))
            return [_transfer_model(t, lfn, rule) for t, lfn, rule in session.execute(q)]

    def queue_counts(self) -> dict[str, int]:
        """Number of transfers per state."""
        with self._reader() as session:
            q = select(SQLTransfer.state, func.count()).group_by(SQLTransfer.state)
            return {state: int(n) for state, n in session.execute(q)}

    # -- summaries -------------------------------------------------------------------------

    def replica_summary(self) -> list[dict[str, Any]]:
        """Replicas and bytes per site, endpoint and state."""
        with self._reader() as session:
            q = (
                select(
                    SQLReplica.site,
                    SQLReplica.endpoint,
                    SQLReplica.state,
                    func.count(),
                    func.coalesce(func.sum(SQLFile.size), 0),
                )
                .join(SQLFile, SQLFile.id == SQLReplica.file_id)
                .group_by(SQLReplica.site, SQLReplica.endpoint, SQLReplica.state)
                .order_by(SQLReplica.site, SQLReplica.endpoint, SQLReplica.state)
            )
            return [
                {"site": s, "endpoint": e, "state": st, "replicas": int(n), "bytes": int(b)}
                for s, e, st, n, b in session.execute(q)
            ]

    def file_counts(self) -> dict[str, int]:
        """Number of files per lifecycle state."""
        with self._reader() as session:
            q = select(SQLFile.state, func.count()).group_by(SQLFile.state)
            return {state: int(n) for state, n in session.execute(q)}

    # -- audits ----------------------------------------------------------------------------

    def save_audit(self, report: AuditReport) -> AuditReport:
        """Store an audit report; returns it with its id."""
        with self._session() as session, session.begin():
            row = SQLAudit(
                site=report.site,
                started_at=report.started_at,
                finished_at=report.finished_at,
                checksums=report.checksums,
                checked=report.checked,
                lost=report.lost,
                corrupt=report.corrupt,
                dark=report.dark,
                findings=[f.model_dump(mode="json") for f in report.findings],
            )
            session.add(row)
            session.flush()
            return report.model_copy(update={"id": row.id})

    def audits(self, *, site: str | None = None, limit: int = 20) -> list[AuditReport]:
        """Recent audit reports, newest first."""
        with self._reader() as session:
            q = select(SQLAudit).order_by(SQLAudit.id.desc()).limit(limit)
            if site:
                q = q.where(SQLAudit.site == site)
            return [
                AuditReport(
                    id=r.id,
                    site=r.site,
                    started_at=r.started_at,
                    finished_at=r.finished_at,
                    checksums=r.checksums,
                    checked=r.checked,
                    lost=r.lost,
                    corrupt=r.corrupt,
                    dark=r.dark,
                    findings=r.findings,
                )
                for r in session.scalars(q)
            ]

    # -- deletions -------------------------------------------------------------------------

    def add_deletion(self, req: DeletionRequest) -> DeletionRequest:
        """Store a deletion request."""
        with self._session() as session, session.begin():
            row = SQLDeletion(
                expression=req.expression,
                reason=req.reason,
                requested_by=req.requested_by,
                state=DeletionState.REQUESTED.value,
                created_at=utcnow(),
                files=req.files,
                bytes=req.bytes,
            )
            session.add(row)
            session.flush()
            return self._deletion_model(row)

    @staticmethod
    def _deletion_model(row: SQLDeletion) -> DeletionRequest:
        return DeletionRequest(
            id=row.id,
            expression=row.expression,
            reason=row.reason,
            requested_by=row.requested_by,
            state=DeletionState(row.state),
            decided_by=row.decided_by,
            created_at=row.created_at,
            decided_at=row.decided_at,
            executed_at=row.executed_at,
            files=row.files,
            bytes=row.bytes,
        )

    def get_deletion(self, request_id: int) -> DeletionRequest:
        """A deletion request by id."""
        with self._reader() as session:
            row = session.get(SQLDeletion, request_id)
            if row is None:
                raise NotFoundError(f"no deletion request {request_id}")
            return self._deletion_model(row)

    def deletions(self, limit: int = 50) -> list[DeletionRequest]:
        """Recent deletion requests, newest first."""
        with self._reader() as session:
            q = select(SQLDeletion).order_by(SQLDeletion.id.desc()).limit(limit)
            return [self._deletion_model(r) for r in session.scalars(q)]

    def update_deletion(self, request_id: int, **values: Any) -> DeletionRequest:
        """Change a deletion request's state and bookkeeping."""
        with self._session() as session, session.begin():
            row = session.get(SQLDeletion, request_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"no deletion request {request_id}")
            for k, v in values.items():
                setattr(row, k, v.value if isinstance(v, DeletionState) else v)
            return self._deletion_model(row)

    def purge_replicas(self, lfn: str) -> None:
        """Mark every replica of a file deleted and drop its queued transfers."""
        now = utcnow()
        with self._session() as session, session.begin():
            f = self._file_row(session, lfn)
            if f is None:
                return
            session.execute(
                update(SQLReplica)
                .where(SQLReplica.file_id == f.id)
                .values(state=ReplicaState.DELETED.value, updated_at=now)
            )
            session.execute(
                delete(SQLTransfer).where(
                    SQLTransfer.file_id == f.id,
                    SQLTransfer.state.in_([TransferState.QUEUED.value, TransferState.FAILED.value]),
                )
            )
            f.state = FileState.DELETED.value
            f.updated_at = now
