"""The Telemetry Gateway store: the durable buffer, producers' counters, the audit trail.

Every method is one transaction and returns domain models (`ldf.telemetry.models`), never
ORM rows; the same code runs on SQLite and PostgreSQL. `GatewayStore.accept` is the heart:
in one transaction it locks the producer's row (PostgreSQL ``SELECT … FOR UPDATE``; SQLite's
``BEGIN IMMEDIATE`` serialises every writer), decides for each message whether it is new,
a duplicate (same id, same payload digest) or a conflict (same id, other payload: the whole
request is rolled back), numbers new messages with the producer's next sequence numbers and
writes their audit rows. A message is durable when `accept` returns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from ldf.db.store import SqlStore
from ldf.telemetry.errors import DuplicateConflictError
from ldf.telemetry.models import (
    UNAUTHENTICATED,
    Accepted,
    AuditEntry,
    Incoming,
    ProducerStatus,
    StoredMessage,
    bus_topic,
)
from ldf.telemetry.schema import SQLAudit, SQLMessage, SQLProducer

__all__ = ["GatewayStore"]

PENDING = "pending"
INJECTED = "injected"


_MESSAGE_COLUMNS = (
    SQLMessage.id,
    SQLMessage.producer,
    SQLMessage.message_id,
    SQLMessage.seq,
    SQLMessage.topic,
    SQLMessage.device,
    SQLMessage.payload,
    SQLMessage.received_at,
    SQLMessage.injected_at,
    SQLMessage.state,
)
"""The columns a `StoredMessage` is made of (selected with Core: no ORM objects)."""


def _message(row: Any) -> StoredMessage:
    return StoredMessage(*row)


# The statements of `GatewayStore.accept`, built once: building them per call cost as much as
# running them (benchmarks/telemetry.py).
_NEXT_SEQ = (
    select(SQLProducer.next_seq)
    .where(SQLProducer.name == bindparam("b_producer"))
    .with_for_update()
)
_KNOWN = select(
    SQLMessage.id,
    SQLMessage.message_id,
    SQLMessage.seq,
    SQLMessage.topic,
    SQLMessage.device,
    SQLMessage.payload_sha256,
    SQLMessage.received_at,
).where(
    SQLMessage.producer == bindparam("b_producer"),
    SQLMessage.message_id.in_(bindparam("b_ids", expanding=True)),
)
_INSERT_MESSAGES = insert(SQLMessage).returning(
    SQLMessage.message_id, SQLMessage.id, sort_by_parameter_order=True
)
_COUNT_ACCEPTED = (
    update(SQLProducer)
    .where(SQLProducer.name == bindparam("b_producer"))
    .values(
        device=bindparam("b_device"),
        next_seq=bindparam("b_next_seq"),
        accepted=SQLProducer.accepted + bindparam("b_new"),
        duplicates=SQLProducer.duplicates + bindparam("b_duplicates"),
        last_received_at=bindparam("b_now", type_=SQLProducer.last_received_at.type),
    )
)
_INSERT_AUDIT = insert(SQLAudit)

# ... and of the injector's loop.
_PENDING_PRODUCERS = (
    select(SQLMessage.producer)
    .where(SQLMessage.state == PENDING)
    .distinct()
    .order_by(SQLMessage.producer)
)
_PENDING = (
    select(*_MESSAGE_COLUMNS)
    .where(SQLMessage.state == PENDING, SQLMessage.producer == bindparam("b_producer"))
    .order_by(SQLMessage.seq)
    .limit(bindparam("b_limit"))
)
_MARK = (
    update(SQLMessage)
    .where(SQLMessage.id.in_(bindparam("b_ids", expanding=True)), SQLMessage.state == PENDING)
    .values(state=INJECTED, injected_at=bindparam("b_at", type_=SQLMessage.injected_at.type))
)
_COUNT_INJECTED = (
    update(SQLProducer)
    .where(SQLProducer.name == bindparam("b_producer"))
    .values(
        injected=SQLProducer.injected + bindparam("b_changed"),
        last_injected_at=bindparam("b_at", type_=SQLProducer.last_injected_at.type),
    )
)


class GatewayStore(SqlStore):
    """Persistence of the gateway in one SQLAlchemy database (see `ldf.db.SqlStore`).

    On SQLite, the writing transactions of one process take turns on a lock before they
    begin: concurrent HTTP requests and the injector would otherwise meet in SQLite's busy
    handler, which sleeps 1, 2, 5, 10… ms between tries (an order of magnitude more latency
    under load, measured by benchmarks/telemetry.py). Other processes still wait in SQLite.
    """

    package = "ldf.telemetry"

    def __init__(self, engine: Engine, read_engine: Engine | None = None) -> None:
        super().__init__(engine, read_engine)
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A connection in a writing transaction, committed at the end (rolled back on error)."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    # -- accepting ---------------------------------------------------------------------------

    def accept(
        self,
        producer: str,
        device: str,
        topic: str,
        messages: Sequence[Incoming],
        *,
        now: datetime,
        status: int = 201,
        client: str = "",
    ) -> list[Accepted]:
        """Store messages of one producer durably, in order; duplicates are not stored again.

        Parameters
        ----------
        producer, device, topic
            Who sent them, the OCS device they go out as, their topic.
        messages
            Validated messages, in the producer's order.
        now
            Reception time.
        status
            HTTP status recorded in the audit rows of new messages (duplicates: 200).
        client
            The client's address, for the audit trail.

        Returns
        -------
        list[Accepted]
            One per message, in order.

        Raises
        ------
        DuplicateConflictError
            A message id the producer used before (or twice in ``messages``) with another
            payload; nothing was stored.
        """
        for attempt in range(3):
            try:
                return self._accept(producer, device, topic, messages, now, status, client)
            except IntegrityError:
                # PostgreSQL: another request created the producer's row between our read
                # and our insert; its row lock orders us after it the next time.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _accept(
        self,
        producer: str,
        device: str,
        topic: str,
        messages: Sequence[Incoming],
        now: datetime,
        status: int,
        client: str,
    ) -> list[Accepted]:
        # SQLAlchemy Core, not the ORM: this is the per-message hot path, and the unit of
        # work cost several times the statements themselves (benchmarks/telemetry.py).
        with self._writing() as conn:
            next_seq = conn.execute(_NEXT_SEQ, {"b_producer": producer}).scalar()
            if next_seq is None:
                next_seq = 1
                conn.execute(
                    insert(SQLProducer).values(
                        name=producer,
                        device=device,
                        next_seq=1,
                        accepted=0,
                        duplicates=0,
                        rejected=0,
                        injected=0,
                        injection_errors=0,
                    )
                )
            known: dict[str, Any] = {
                r.message_id: r
                for r in conn.execute(
                    _KNOWN, {"b_producer": producer, "b_ids": [m.message_id for m in messages]}
                )
            }
            results: list[Accepted] = []
            refs: list[int | None] = []
            new: dict[str, tuple[int, str]] = {}  # new message id -> (index in results, digest)
            rows: list[dict[str, Any]] = []
            for msg in messages:
                seen = known.get(msg.message_id)
                if seen is not None:
                    if seen.payload_sha256 != msg.digest or seen.topic != topic:
                        what = "payload" if seen.topic == topic else f"topic ({seen.topic})"
                        raise DuplicateConflictError(
                            f"message id {msg.message_id!r} of {producer} was used before "
                            f"with another {what}; use a new id for a new message"
                        )
                    outcome, seq, at, ref = "duplicate", seen.seq, seen.received_at, seen.id
                    target = bus_topic(seen.device, topic)
                elif msg.message_id in new:
                    index, digest = new[msg.message_id]
                    first = results[index]
                    if digest != msg.digest:
                        raise DuplicateConflictError(
                            f"message id {msg.message_id!r} appears twice in the request "
                            "with different payloads"
                        )
                    outcome, seq, at, ref = "duplicate", first.seq, now, None
                    target = first.bus_topic
                else:
                    outcome, seq, at, ref = "accepted", next_seq, now, None
                    target = bus_topic(device, topic)
                    next_seq += 1
                    new[msg.message_id] = (len(results), msg.digest)
                    rows.append(
                        {
                            "producer": producer,
                            "message_id": msg.message_id,
                            "seq": seq,
                            "topic": topic,
                            "device": device,
                            "payload": msg.payload,
                            "payload_sha256": msg.digest,
                            "received_at": now,
                            "injected_at": None,
                            "state": PENDING,
                        }
                    )
                results.append(
                    Accepted(
                        message_id=msg.message_id,
                        status=outcome,
                        seq=seq,
                        topic=topic,
                        bus_topic=target,
                        received_at=at,
                    )
                )
                refs.append(ref)
            ids: dict[str, int] = {}
            if rows:
                inserted = conn.execute(_INSERT_MESSAGES, rows)
                ids = {mid: rid for mid, rid in inserted}  # noqa: C416 (dict() takes it for a mapping)
            n_new = len(rows)
            conn.execute(
                _COUNT_ACCEPTED,
                {
                    "b_producer": producer,
                    "b_device": device,
                    "b_next_seq": next_seq,
                    "b_new": n_new,
                    "b_duplicates": len(results) - n_new,
                    "b_now": now,
                },
            )
            conn.execute(
                _INSERT_AUDIT,
                [
                    {
                        "at": now,
                        "producer": producer,
                        "topic": topic,
                        "message_id": r.message_id,
                        "outcome": r.status,
                        "status": status if r.status == "accepted" else 200,
                        "reason": "",
                        "client": client[:64],
                        "message_ref": ref if ref is not None else ids[r.message_id],
                    }
                    for r, ref in zip(results, refs, strict=True)
                ],
            )
            return results

    def reject(
        self,
        *,
        now: datetime,
        producer: str | None,
        topic: str | None,
        message_id: str | None,
        status: int,
        reason: str,
        client: str = "",
    ) -> None:
        """Record a rejected request in the audit trail (and the producer's counter)."""
        name = producer or UNAUTHENTICATED
        with self._writing() as conn:
            conn.execute(
                insert(SQLAudit).values(
                    at=now,
                    producer=name[:64],
                    topic=None if topic is None else topic[:64],
                    message_id=None if message_id is None else message_id[:128],
                    outcome="rejected",
                    status=status,
                    reason=reason[:512],
                    client=client[:64],
                )
            )
            if producer is not None:
                conn.execute(
                    update(SQLProducer)
                    .where(SQLProducer.name == producer)
                    .values(rejected=SQLProducer.rejected + 1)
                )

    # -- injecting ---------------------------------------------------------------------------

    def pending_producers(self) -> list[str]:
        """Producers with messages waiting for the bus, by name."""
        with self.read_engine.connect() as conn:
            return list(conn.execute(_PENDING_PRODUCERS).scalars())

    def pending(self, producer: str, limit: int = 100) -> list[StoredMessage]:
        """A producer's oldest messages waiting for the bus, in its order."""
        with self.read_engine.connect() as conn:
            rows = conn.execute(_PENDING, {"b_producer": producer, "b_limit": limit})
            return [_message(r) for r in rows]

    def mark_injected(self, producer: str, ids: Sequence[int], at: datetime) -> int:
        """Record messages of a producer as on the bus; returns how many changed state."""
        if not ids:
            return 0
        with self._writing() as conn:
            changed = int(conn.execute(_MARK, {"b_ids": list(ids), "b_at": at}).rowcount)
            conn.execute(
                _COUNT_INJECTED, {"b_producer": producer, "b_changed": changed, "b_at": at}
            )
            return changed

    def injection_failed(self, producer: str, error: str, at: datetime) -> None:
        """Record that the bus refused or was unreachable for a producer's next message."""
        with self._writing() as conn:
            conn.execute(
                update(SQLProducer)
                .where(SQLProducer.name == producer)
                .values(
                    injection_errors=SQLProducer.injection_errors + 1,
                    last_error=error[:1024],
                    last_error_at=at,
                )
            )

    # -- reading -----------------------------------------------------------------------------

    def messages(
        self,
        producer: str | None = None,
        *,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[StoredMessage]:
        """Buffered messages (of a producer, in a state), by producer and sequence."""
        q = select(*_MESSAGE_COLUMNS)
        if producer is not None:
            q = q.where(SQLMessage.producer == producer)
        if state is not None:
            q = q.where(SQLMessage.state == state)
        q = q.order_by(SQLMessage.producer, SQLMessage.seq).limit(limit)
        with self.read_engine.connect() as conn:
            return [_message(r) for r in conn.execute(q)]

    def status(self) -> list[ProducerStatus]:
        """Every producer's counters, backlog and last errors, by name."""
        with self._reader() as session:
            oldest = dict(
                session.execute(
                    select(SQLMessage.producer, func.min(SQLMessage.received_at))
                    .where(SQLMessage.state == PENDING)
                    .group_by(SQLMessage.producer)
                ).all()
            )
            out = []
            for row in session.scalars(select(SQLProducer).order_by(SQLProducer.name)):
                out.append(
                    ProducerStatus(
                        producer=row.name,
                        device=row.device,
                        accepted=row.accepted,
                        duplicates=row.duplicates,
                        rejected=row.rejected,
                        injected=row.injected,
                        backlog=max(0, row.accepted - row.injected),
                        oldest_pending_at=oldest.get(row.name),
                        last_received_at=row.last_received_at,
                        last_injected_at=row.last_injected_at,
                        injection_errors=row.injection_errors,
                        last_error=row.last_error,
                        last_error_at=row.last_error_at,
                    )
                )
            return out

    def rejected_unauthenticated(self) -> int:
        """Rejected requests that had no valid token (in the audit trail's retention)."""
        with self._reader() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(SQLAudit)
                    .where(SQLAudit.producer == UNAUTHENTICATED)
                )
                or 0
            )

    def audit(
        self,
        *,
        producer: str | None = None,
        outcome: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """The audit trail, newest first (``before_id`` pages back)."""
        q: Any = select(SQLAudit, SQLMessage.injected_at).outerjoin(
            SQLMessage, SQLMessage.id == SQLAudit.message_ref
        )
        if producer is not None:
            q = q.where(SQLAudit.producer == producer)
        if outcome is not None:
            q = q.where(SQLAudit.outcome == outcome)
        if before_id is not None:
            q = q.where(SQLAudit.id < before_id)
        q = q.order_by(SQLAudit.id.desc()).limit(limit)
        with self._reader() as session:
            return [
                AuditEntry(
                    id=a.id,
                    at=a.at,
                    producer=a.producer,
                    topic=a.topic,
                    message_id=a.message_id,
                    outcome=a.outcome,
                    status=a.status,
                    reason=a.reason,
                    client=a.client,
                    injected_at=injected_at,
                )
                for a, injected_at in session.execute(q)
            ]

    # -- retention ---------------------------------------------------------------------------

    def purge(self, before: datetime) -> tuple[int, int]:
        """Delete injected messages received and audit rows written before a time.

        Pending messages are never deleted, however old. Returns (messages, audit rows).
        """
        with self._writing() as conn:
            audits = conn.execute(delete(SQLAudit).where(SQLAudit.at < before))
            messages = conn.execute(
                delete(SQLMessage).where(
                    SQLMessage.state == INJECTED, SQLMessage.received_at < before
                )
            )
            return int(messages.rowcount), int(audits.rowcount)

    def counts(self) -> dict[str, int]:
        """Buffered messages by state."""
        with self._reader() as session:
            rows = session.execute(
                select(SQLMessage.state, func.count()).group_by(SQLMessage.state)
            ).all()
            return {state: int(n) for state, n in rows}
