"""SQLAlchemy tables of alert distribution (used only by the stores: storage.py, filters.py).

``alerts_alert`` indexes every alert once (where its bytes are, what brokers filter on);
``alerts_log`` is the append-only log feeds read: one row per alert as produced, per manifest,
and per copy addressed to one feed (replays, mini-broker matches); ``alerts_manifest`` the
latest manifest of each visit; ``alerts_feed`` the feeds and their cursors; ``alerts_audit``
the audit trail (feeds created, replays, lag alarms, errors). The mini-broker's:
``alerts_filter`` users' filters, ``alerts_filter_visit`` what each filter got of each visit,
``alerts_matcher`` the matcher's cursor.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ldf.db import JsonType

__all__ = [
    "Base",
    "SQLAlert",
    "SQLAudit",
    "SQLFeed",
    "SQLFilter",
    "SQLFilterVisit",
    "SQLLog",
    "SQLManifest",
    "SQLMatcher",
]

Id = BigInteger().with_variant(Integer(), "sqlite")
"""Autoincrementing 64-bit key (SQLite's INTEGER PRIMARY KEY is its rowid, 64-bit)."""


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SQLAlert(Base):
    """One alert: where its bytes are and the fields the service serves and filters on."""

    __tablename__ = "alerts_alert"

    alert_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    position: Mapped[int] = mapped_column(BigInteger, index=True)
    """Position of the alert as produced in the log."""
    visit: Mapped[int] = mapped_column(BigInteger, index=True)
    detector: Mapped[int] = mapped_column(Integer)
    dia_object_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    schema_id: Mapped[int] = mapped_column(Integer)
    segment: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    length: Mapped[int] = mapped_column(Integer)
    ingest_unix: Mapped[float] = mapped_column(Float, index=True)
    producer: Mapped[str] = mapped_column(String(64))
    ra: Mapped[float] = mapped_column(Float)
    dec: Mapped[float] = mapped_column(Float)
    band: Mapped[str | None] = mapped_column(String(8), nullable=True)
    mjd: Mapped[float] = mapped_column(Float)
    psf_flux: Mapped[float | None] = mapped_column(Float, nullable=True)
    psf_flux_err: Mapped[float | None] = mapped_column(Float, nullable=True)
    snr: Mapped[float | None] = mapped_column(Float, nullable=True)
    reliability: Mapped[float | None] = mapped_column(Float, nullable=True)
    archive_file: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The gzipped archive file holding the alert, once archived."""
    archive_offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    archive_length: Mapped[int | None] = mapped_column(Integer, nullable=True)


class SQLLog(Base):
    """The log feeds read, in position order."""

    __tablename__ = "alerts_log"
    __table_args__ = (Index("ix_alerts_log_target", "target", "position"),)

    position: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    visit: Mapped[int] = mapped_column(BigInteger)
    alert_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    target: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The one feed this entry is addressed to; None: every live feed."""
    format: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """A format this entry must be delivered in, overriding the feed's (mini-broker)."""
    replay: Mapped[bool] = mapped_column(Boolean, default=False)
    created_unix: Mapped[float] = mapped_column(Float)
    body: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)
    """A manifest's content."""


class SQLManifest(Base):
    """The latest manifest of each visit (all alerts of the visit)."""

    __tablename__ = "alerts_manifest"

    visit: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    revision: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    checksum: Mapped[str] = mapped_column(String(64))
    closed_unix: Mapped[float] = mapped_column(Float)
    position: Mapped[int] = mapped_column(BigInteger)


class SQLFeed(Base):
    """A feed and its cursor."""

    __tablename__ = "alerts_feed"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    broker: Mapped[str] = mapped_column(String(64), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    cursor: Mapped[int] = mapped_column(BigInteger)
    created_unix: Mapped[float] = mapped_column(Float)
    delivered: Mapped[int] = mapped_column(BigInteger, default=0)
    last_ack_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_fetch_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="active")


class SQLAudit(Base):
    """One audited event."""

    __tablename__ = "alerts_audit"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    time_unix: Mapped[float] = mapped_column(Float, index=True)
    feed: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)


# -- the mini-broker (ldf.alerts.minibroker) --------------------------------------------------


class SQLFilter(Base):
    """A mini-broker user's filter (deleted ones stay, inactive, for the audit)."""

    __tablename__ = "alerts_filter"
    __table_args__ = (Index("ix_alerts_filter_user", "user_name", "name"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_name: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(32))
    expression: Mapped[str] = mapped_column(Text)
    feed: Mapped[str] = mapped_column(String(64))
    """The non-live feed its matches are addressed to."""
    created_unix: Mapped[float] = mapped_column(Float)
    since_position: Mapped[int] = mapped_column(BigInteger)
    """The log's head when it was registered: it matches entries after this position."""
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    deleted_unix: Mapped[float | None] = mapped_column(Float, nullable=True)


class SQLFilterVisit(Base):
    """What one filter's feed got of one visit (the per-user, per-visit limit counts these)."""

    __tablename__ = "alerts_filter_visit"
    __table_args__ = (Index("ix_alerts_filter_visit_user", "user_name", "visit"),)

    filter_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    visit: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_name: Mapped[str] = mapped_column(String(64))
    matched: Mapped[int] = mapped_column(Integer)
    full: Mapped[int] = mapped_column(Integer)
    """Matches delivered as full alerts (the rest as notifications)."""
    first_position: Mapped[int] = mapped_column(BigInteger)
    """No copy of the visit to this filter's feed is before this position (a visit's manifest
    reads the feed's alertIds from there on)."""


class SQLMatcher(Base):
    """The mini-broker matcher's durable cursor over the log's public entries."""

    __tablename__ = "alerts_matcher"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cursor: Mapped[int] = mapped_column(BigInteger)
    updated_unix: Mapped[float] = mapped_column(Float)
    alerts: Mapped[int] = mapped_column(BigInteger, default=0)
    """Alerts matched so far (each decoded once)."""
    copies: Mapped[int] = mapped_column(BigInteger, default=0)
    """Copies appended to users' feeds so far."""
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    """Alerts skipped because they did not decode."""
