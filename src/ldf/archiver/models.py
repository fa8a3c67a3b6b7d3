"""What the archivers talk in: exposures, per-detector jobs, their states."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ArchiveJob", "Designation", "ExposureRecord", "JobState"]


class JobState(StrEnum):
    """Where one detector file of one exposure is on its way to the archive.

    ``queued`` → ``in_oods`` (FITS written and indexed in the OODS) → ``archived`` (ingested in
    the Backbone), or ``done`` for OODS-only exposures; ``failed`` after the last attempt.
    """

    QUEUED = "queued"
    ACTIVE = "active"
    IN_OODS = "in_oods"
    ARCHIVED = "archived"
    DONE = "done"
    FAILED = "failed"


class Designation(StrEnum):
    """Where an exposure goes (LDM-230 2.2.3.2.1)."""

    ARCHIVE = "archive"
    """OODS and the permanent archive."""
    OODS_ONLY = "oods-only"
    """OODS only (engineering, smoke tests, one-off calibrations)."""


class _Model(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ExposureRecord(_Model):
    """An exposure the archiver was told about."""

    instrument: str
    obs_id: str
    day_obs: int
    seq_num: int
    exposure_id: int
    obs_type: str
    designation: Designation
    visit: dict[str, Any] = Field(description="The visit metadata of the endReadout event.")
    expected: list[str]
    received_at: datetime
    complete_at: datetime | None = None
    alarm_raised: bool = False


class ArchiveJob(_Model):
    """One detector file of one exposure."""

    id: int
    instrument: str
    obs_id: str
    detector: str
    state: JobState
    attempts: int = 0
    error: str | None = None
    flagged: bool = False
    problems: list[str] = Field(default_factory=list)
    size: int | None = None
    checksum: str | None = Field(default=None, description="Adler-32 of the FITS file.")
    oods_path: str | None = None
    lfn: str | None = None
    received_at: datetime | None = None
    oods_at: datetime | None = None
    archived_at: datetime | None = None
