"""SQLAlchemy tables of Prompt Processing (never used outside storage.py).

``prompt_visit`` holds announced visits; ``prompt_job`` is the durable per-detector work queue
(a job left RUNNING by a killed service is queued again on restart); ``prompt_telemetry`` is
the outbox of QA parameters, kept until the telemetry interface has taken them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ldf.db import JsonType, UtcDateTime

__all__ = ["Base", "SQLJob", "SQLTelemetry", "SQLVisit"]

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


class SQLVisit(Base):
    """A visit announced by nextVisit (or first seen through its raws)."""

    __tablename__ = "prompt_visit"

    exposure_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    instrument: Mapped[str] = mapped_column(String(16))
    day_obs: Mapped[int] = mapped_column(Integer, index=True)
    obs_type: Mapped[str] = mapped_column(String(32))
    band: Mapped[str | None] = mapped_column(String(16), nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    """The NextVisit as announced."""
    scratch: Mapped[str] = mapped_column(Text)
    preloaded: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    """What the preload found (or did not) per detector."""
    announced_at: Mapped[datetime] = mapped_column(UtcDateTime)
    readout_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    """End of readout (wall clock, from the camera's endReadout)."""
    offline: Mapped[bool] = mapped_column(Boolean, default=False)


class SQLJob(Base):
    """One detector of one visit."""

    __tablename__ = "prompt_job"
    __table_args__ = (Index("ix_prompt_job_state", "state", "exposure_id"),)

    exposure_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    detector: Mapped[str] = mapped_column(String(16), primary_key=True)
    instrument: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    raw_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    failed_stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    arrived_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    alerts_handed_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    stage_s: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    qa: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    validation: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    n_dia_sources: Mapped[int] = mapped_column(Integer, default=0)
    n_new_objects: Mapped[int] = mapped_column(Integer, default=0)
    n_alerts: Mapped[int] = mapped_column(Integer, default=0)
    apdb_store: Mapped[str | None] = mapped_column(String(16), nullable=True)
    template_prewarped: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    offline: Mapped[bool] = mapped_column(Boolean, default=False)


class SQLTelemetry(Base):
    """A QA message for the observatory, kept until the telemetry interface took it."""

    __tablename__ = "prompt_telemetry"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    exposure_id: Mapped[int] = mapped_column(BigInteger, index=True)
    detector: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_unix: Mapped[float] = mapped_column(Float)
    sent_unix: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    """Produced by offline catch-up (the scheduler may still use it)."""
