"""What Prompt Processing talks in: announced visits, detector jobs, outcomes, latency."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "STAGES",
    "DetectorJob",
    "DetectorOutcome",
    "JobState",
    "NextVisit",
    "PrewarpJob",
    "VisitReport",
]

STAGES = (
    "read",
    "isr",
    "characterize",
    "astrometry",
    "photometry",
    "template",
    "diffim",
    "dia",
    "association",
    "alerts",
)
"""Pipeline stages of a science detector, in order (each one timed). ``template`` puts the
template on the science grid: a shift of the one prewarped on nextVisit (≈ 0.3 s full size)
or, without it, a full warp (≈ 2.5 s)."""


class JobState(StrEnum):
    """Where a detector of a visit is in Prompt Processing."""

    WAITING = "waiting"
    """Announced by nextVisit (preloaded), raw not yet in the OODS."""
    QUEUED = "queued"
    """Raw in the OODS, waiting for a worker."""
    RUNNING = "running"
    DONE = "done"
    """Processed; alerts (if any) handed to distribution."""
    FAILED = "failed"
    """Could not be processed; ``reason`` says why (missing template, corrupt raw…)."""
    TIMEOUT = "timeout"
    """Not done within the visit's science timeout; handed to offline catch-up."""
    SKIPPED = "skipped"
    """Dropped by the skip-to-newest backlog policy."""
    OFFLINE = "offline"
    """Waiting for offline catch-up (no alerts will be sent)."""


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.SKIPPED})


class NextVisit(BaseModel):
    """What Prompt Processing may know of a visit before it is taken (Rubin's nextVisit).

    Built from the scheduler's event; anything else the event carries (the simulator's truth
    of the atmosphere, for one) is ignored.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    instrument: str
    day_obs: int
    seq_num: int
    obs_type: str
    group_id: str = ""
    band: str | None = None
    physical_filter: str | None = None
    ra_deg: float
    dec_deg: float
    rot_sky_deg: float = 0.0
    exp_time_s: float = 30.0
    start_tai_mjd: float | None = None
    """When the exposure is planned to start (the APDB history window ends there)."""

    @property
    def exposure_id(self) -> int:
        """Rubin's exposure id."""
        return self.day_obs * 100000 + self.seq_num

    @property
    def is_science(self) -> bool:
        """Whether alert production runs on it (calibrations get QA only)."""
        return self.obs_type == "science"


class DetectorJob(BaseModel):
    """One detector of one visit to process: everything a worker needs, by path."""

    instrument: str
    exposure_id: int
    detector: str
    raw_path: str
    scratch: str
    """Worker-local directory the visit's inputs were preloaded into."""
    home: str
    """The facility's LDF_HOME (calibration, template, refcat and APDB roots)."""
    camera_scale: float = 1.0
    offline: bool = False
    """Offline catch-up: same code, no alerts."""
    qa_first: bool = True
    deadline_unix: float | None = None
    """Wall-clock time after which the back end is abandoned (the visit's science timeout)."""
    detection_threshold: float = 5.0
    association_radius_arcsec: float = 1.0
    attempt: int = 1
    history_snapshot: str | None = None
    """The APDB history preloaded for the visit's region, when still current (no visit of
    the region has stored DiaSources since it was taken); None: query the APDB."""


class PrewarpJob(BaseModel):
    """Warp one detector's template onto its predicted grid while the exposure is taken."""

    instrument: str
    exposure_id: int
    detector: str
    band: str
    ra_deg: float
    dec_deg: float
    rot_sky_deg: float = 0.0
    """The commanded pointing (nextVisit), which predicts the detector's WCS."""
    scratch: str
    home: str
    camera_scale: float = 1.0


class DetectorOutcome(BaseModel):
    """What a worker reports for one detector."""

    exposure_id: int
    detector: str
    state: JobState
    reason: str | None = None
    failed_stage: str | None = None
    stage_s: dict[str, float] = Field(default_factory=dict)
    """Seconds spent in each stage (see :data:`STAGES`)."""
    qa: dict[str, Any] = Field(default_factory=dict)
    """Image-quality (or calibration QA) parameters."""
    n_dia_sources: int = 0
    n_new_objects: int = 0
    n_alerts: int = 0
    apdb_store: str | None = None
    """'stored', 'buffered' (APDB unavailable: kept for replay) or 'already-stored'."""
    alerts_handed_unix: float | None = None
    """When the alerts were handed to distribution (wall clock)."""
    validation: dict[str, Any] = Field(default_factory=dict)
    """Recovery of the simulator's injected sources (filled when truth is available)."""
    template_prewarped: bool = False
    """The template was the one prewarped on nextVisit (shifted), not warped after the raw."""


class VisitReport(BaseModel):
    """One visit's latency and yield: the OTT1/OTR1 service level, visible per visit."""

    exposure_id: int
    instrument: str
    obs_type: str
    detectors: int
    done: int
    failed: int
    timeout: int
    skipped: int
    offline: int
    alerts: int
    latency_p50_s: float | None
    latency_p98_s: float | None
    within_ott1: float | None
    """Fraction of the visit's alerts handed over within OTT1 (60 s)."""
    stage_p50_s: dict[str, float] = Field(default_factory=dict)
    templates_prewarped: int = 0
    """Detectors whose template was prewarped on nextVisit (the rest warped it in full)."""
