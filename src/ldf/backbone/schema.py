"""SQLAlchemy tables of the Data Backbone catalog (never used outside storage.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ldf.db import JsonType, UtcDateTime

__all__ = [
    "Base",
    "SQLAudit",
    "SQLDataset",
    "SQLDatasetFile",
    "SQLDeletion",
    "SQLFile",
    "SQLReplica",
    "SQLRule",
    "SQLTransfer",
]

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets 64-bit keys.
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable Alembic diffs)."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SQLFile(Base):
    """A logical file."""

    __tablename__ = "backbone_file"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    lfn: Mapped[str] = mapped_column(String(1024), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    adler32: Mapped[str] = mapped_column(String(8))
    blake3: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    producer: Mapped[str] = mapped_column(String(256), default="")
    inputs: Mapped[list[str]] = mapped_column(JsonType, default=list)
    retention: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SQLDataset(Base):
    """A named group of files."""

    __tablename__ = "backbone_dataset"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SQLDatasetFile(Base):
    """Membership of a file in a dataset (a file may belong to several)."""

    __tablename__ = "backbone_dataset_file"

    dataset_id: Mapped[int] = mapped_column(
        Id, ForeignKey("backbone_dataset.id", ondelete="CASCADE"), primary_key=True
    )
    file_id: Mapped[int] = mapped_column(
        Id, ForeignKey("backbone_file.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class SQLReplica(Base):
    """A copy of a file at one endpoint of one site."""

    __tablename__ = "backbone_replica"
    __table_args__ = (
        UniqueConstraint("file_id", "site", "endpoint"),
        Index("ix_backbone_replica_site_endpoint_state", "site", "endpoint", "state"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    file_id: Mapped[int] = mapped_column(
        Id, ForeignKey("backbone_file.id", ondelete="CASCADE"), index=True
    )
    site: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(16))
    uri: Mapped[str] = mapped_column(String(2048))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    verified_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class SQLRule(Base):
    """A replication rule."""

    __tablename__ = "backbone_rule"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    expression: Mapped[str] = mapped_column(Text)
    copies: Mapped[int] = mapped_column(Integer)
    sites: Mapped[list[str]] = mapped_column(JsonType)
    tier: Mapped[str | None] = mapped_column(String(16), nullable=True)
    priority: Mapped[int] = mapped_column(Integer)
    lifetime_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class SQLTransfer(Base):
    """A queued copy: the durable work queue of the transfer workers."""

    __tablename__ = "backbone_transfer"
    __table_args__ = (
        UniqueConstraint("file_id", "dst_site", "dst_endpoint"),
        Index("ix_backbone_transfer_queue", "state", "priority", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    file_id: Mapped[int] = mapped_column(Id, ForeignKey("backbone_file.id", ondelete="CASCADE"))
    rule_id: Mapped[int | None] = mapped_column(
        Id, ForeignKey("backbone_rule.id", ondelete="SET NULL"), nullable=True
    )
    src_site: Mapped[str | None] = mapped_column(String(64), nullable=True)
    src_endpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dst_site: Mapped[str] = mapped_column(String(64))
    dst_endpoint: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    done_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class SQLAudit(Base):
    """One audit run of one site."""

    __tablename__ = "backbone_audit"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    site: Mapped[str] = mapped_column(String(64), index=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    checksums: Mapped[bool] = mapped_column(Boolean)
    checked: Mapped[int] = mapped_column(BigInteger, default=0)
    lost: Mapped[int] = mapped_column(Integer, default=0)
    corrupt: Mapped[int] = mapped_column(Integer, default=0)
    dark: Mapped[int] = mapped_column(Integer, default=0)
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)


class SQLDeletion(Base):
    """A deletion request and what became of it."""

    __tablename__ = "backbone_deletion"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    expression: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), index=True)
    decided_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    decided_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    executed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    files: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
