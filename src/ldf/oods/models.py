"""What the OODS talks in: cached files, pins, arrivals, expiry reports."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Arrival", "ExpiryReport", "OodsEntry", "Pin"]


class _Model(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class OodsEntry(_Model):
    """One file in the cache (one detector of one exposure, for raws)."""

    id: int
    """Index id (stable while the file is cached)."""
    instrument: str
    """Rubin's instrument name ('LSSTCam', 'LATISS')."""
    day_obs: int
    """Observing day YYYYMMDD."""
    obs_id: str
    """Rubin's observation id ('MC_O_20261121_000123')."""
    exposure_id: int
    """Rubin's exposure id, ``day_obs * 100000 + seq_num``."""
    detector: str
    """Detector name ('R22_S11')."""
    obs_type: str
    """Observation type ('science', 'bias', 'engtest', …)."""
    dataset_type: str = "raw"
    """Dataset type; decides the retention window."""
    path: str = Field(description="Location relative to the cache root (POSIX).")
    size: int
    """Length in bytes."""
    checksum: str
    """Adler-32 (8 hex digits) or BLAKE3 (64 hex digits) of the bytes, as the archiver gave."""
    arrived_at: datetime
    """When the archiver handed the file to the OODS."""
    pinned: bool = False
    """Whether an Operations pin protects it from expiry."""

    @property
    def filename(self) -> str:
        """The file's name (last component of ``path``)."""
        return self.path.rsplit("/", 1)[-1]


class Pin(_Model):
    """An Operations pin: files it selects never expire (including ones that arrive later).

    Exactly one of ``obs_id``, ``exposure_id`` and ``day_obs`` is set; ``instrument`` narrows
    it (None: every instrument).
    """

    id: int
    instrument: str | None = None
    obs_id: str | None = None
    exposure_id: int | None = None
    day_obs: int | None = None
    reason: str = ""
    pinned_by: str = ""
    created_at: datetime
    files: int = Field(default=0, description="Cached files it selects now.")

    def describe(self) -> str:
        """The selector in words: 'obs_id MC_O_20261121_000001 (LSSTCam)'."""
        if self.obs_id is not None:
            what = f"obs_id {self.obs_id}"
        elif self.exposure_id is not None:
            what = f"exposure {self.exposure_id}"
        else:
            what = f"day_obs {self.day_obs}"
        return f"{what} ({self.instrument})" if self.instrument else what


class Arrival(_Model):
    """A file's arrival in the cache, as the live stream announces it."""

    event_id: int
    """Position in the arrival log (the SSE event id; resume after it)."""
    entry: OodsEntry


class ExpiryReport(_Model):
    """What one expiry pass did (or, with ``dry_run``, would do)."""

    now: datetime
    dry_run: bool
    removed: int = 0
    """Files removed (or that would be)."""
    bytes: int = 0
    """Their total size."""
    kept_pinned: int = 0
    """Files past their window kept because a pin selects them."""
    kept_leased: int = 0
    """Files past their window kept because someone is reading them."""
    butler_removed: int = 0
    """Butler datasets removed."""
    paths: list[str] = Field(default_factory=list, description="Removed paths (first 1000).")
    errors: list[str] = Field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return self.model_dump(mode="json")
