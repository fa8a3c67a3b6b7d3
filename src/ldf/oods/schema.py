"""SQLAlchemy tables of the OODS index (never used outside storage.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, MetaData, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ldf.db import UtcDateTime

__all__ = ["Base", "SQLEntry", "SQLEvent", "SQLLease", "SQLPin"]

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


class SQLEntry(Base):
    """A cached file."""

    __tablename__ = "oods_entry"
    __table_args__ = (
        UniqueConstraint("instrument", "obs_id", "detector"),
        Index("ix_oods_entry_instrument_day_obs", "instrument", "day_obs"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    instrument: Mapped[str] = mapped_column(String(32))
    day_obs: Mapped[int] = mapped_column(Integer)
    obs_id: Mapped[str] = mapped_column(String(64), index=True)
    exposure_id: Mapped[int] = mapped_column(BigInteger, index=True)
    detector: Mapped[str] = mapped_column(String(32))
    obs_type: Mapped[str] = mapped_column(String(32))
    dataset_type: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(64))
    arrived_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class SQLEvent(Base):
    """The arrival log: one row per arrival (a replaced file arrives again)."""

    __tablename__ = "oods_event"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    entry_id: Mapped[int] = mapped_column(
        Id, ForeignKey("oods_entry.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UtcDateTime)


class SQLPin(Base):
    """An Operations pin (exactly one of obs_id, exposure_id, day_obs is set)."""

    __tablename__ = "oods_pin"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    instrument: Mapped[str | None] = mapped_column(String(32), nullable=True)
    obs_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    exposure_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    day_obs: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    reason: Mapped[str] = mapped_column(String(512), default="")
    pinned_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SQLLease(Base):
    """A read lease: while unexpired, expiry leaves the file alone.

    The foreign key has no ON DELETE action on purpose: a file cannot leave the index while
    a lease row points at it (expiry purges lapsed leases first).
    """

    __tablename__ = "oods_lease"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    entry_id: Mapped[int] = mapped_column(Id, ForeignKey("oods_entry.id"), index=True)
    holder: Mapped[str] = mapped_column(String(128), default="")
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
