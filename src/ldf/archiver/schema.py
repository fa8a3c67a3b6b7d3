"""SQLAlchemy tables of an archiver's durable work queue (never used outside storage.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ldf.db import JsonType, UtcDateTime

__all__ = ["Base", "SQLExposure", "SQLJob"]

Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SQLExposure(Base):
    """An exposure announced by endReadout."""

    __tablename__ = "archiver_exposure"
    __table_args__ = (UniqueConstraint("instrument", "obs_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    instrument: Mapped[str] = mapped_column(String(16))
    obs_id: Mapped[str] = mapped_column(String(64))
    day_obs: Mapped[int] = mapped_column(Integer)
    seq_num: Mapped[int] = mapped_column(Integer)
    exposure_id: Mapped[int] = mapped_column(BigInteger)
    obs_type: Mapped[str] = mapped_column(String(32))
    designation: Mapped[str] = mapped_column(String(16))
    visit: Mapped[dict[str, Any]] = mapped_column(JsonType)
    expected: Mapped[list[str]] = mapped_column(JsonType)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    complete_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    alarm_raised: Mapped[bool] = mapped_column(Boolean, default=False)


class SQLJob(Base):
    """One detector file on its way to the OODS and the archive."""

    __tablename__ = "archiver_job"
    __table_args__ = (
        UniqueConstraint("instrument", "obs_id", "detector"),
        Index("ix_archiver_job_queue", "state", "seq_num"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    instrument: Mapped[str] = mapped_column(String(16))
    obs_id: Mapped[str] = mapped_column(String(64))
    seq_num: Mapped[int] = mapped_column(Integer)
    science: Mapped[bool] = mapped_column(Boolean)
    detector: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    problems: Mapped[list[str]] = mapped_column(JsonType, default=list)
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    checksum: Mapped[str | None] = mapped_column(String(64), nullable=True)
    oods_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    lfn: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    oods_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    archived_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
