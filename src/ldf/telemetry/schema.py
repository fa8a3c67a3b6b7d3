"""SQLAlchemy tables of the Telemetry Gateway (never used outside storage.py).

``telemetry_message`` is the durable buffer (outbox): a message is stored here before the
producer gets its 2xx, and marked injected only after the bus took it. ``telemetry_audit``
is append-only: one row per message taken (accepted or duplicate) and one per rejected
request; whether a message reached the bus is read from the buffer row it points to.
``telemetry_producer`` holds each producer's next sequence number (its row lock orders
concurrent requests of one producer on PostgreSQL) and its counters.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ldf.db import JsonType, UtcDateTime

__all__ = ["Base", "SQLAudit", "SQLMessage", "SQLProducer"]

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets 64-bit keys.
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable Alembic diffs)."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SQLProducer(Base):
    """A producer that has sent something: its sequence counter and counters."""

    __tablename__ = "telemetry_producer"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    next_seq: Mapped[int] = mapped_column(BigInteger, default=1)
    accepted: Mapped[int] = mapped_column(BigInteger, default=0)
    duplicates: Mapped[int] = mapped_column(BigInteger, default=0)
    rejected: Mapped[int] = mapped_column(BigInteger, default=0)
    injected: Mapped[int] = mapped_column(BigInteger, default=0)
    injection_errors: Mapped[int] = mapped_column(BigInteger, default=0)
    last_received_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_injected_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    last_error_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class SQLMessage(Base):
    """A message in the durable buffer; ``state`` is ``pending`` until the bus took it."""

    __tablename__ = "telemetry_message"
    __table_args__ = (
        UniqueConstraint("producer", "message_id"),
        UniqueConstraint("producer", "seq"),
        # The injector's query: a producer's pending messages in order.
        Index("ix_telemetry_message_pending", "state", "producer", "seq"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    producer: Mapped[str] = mapped_column(String(64), ForeignKey("telemetry_producer.name"))
    message_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    topic: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    payload_sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    injected_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")


class SQLAudit(Base):
    """One audit row: a message taken, or a request rejected."""

    __tablename__ = "telemetry_audit"
    __table_args__ = (Index("ix_telemetry_audit_producer_id", "producer", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    producer: Mapped[str] = mapped_column(String(64))
    topic: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(512), default="")
    client: Mapped[str] = mapped_column(String(64), default="")
    message_ref: Mapped[int | None] = mapped_column(
        Id, ForeignKey("telemetry_message.id", ondelete="SET NULL"), nullable=True, index=True
    )
