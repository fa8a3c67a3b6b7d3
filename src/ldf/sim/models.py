"""What the simulated observatory talks in: visits, observing conditions, truth.

These are the messages the scheduler and camera publish (nextVisit, startIntegration,
endReadout carry a `VisitSpec`) and the header metadata the archiver needs.
Identifiers follow Rubin's conventions: ``day_obs`` (YYYYMMDD, the observing day in UTC-12h),
``seq_num`` (per instrument per day), ``exposure_id = day_obs * 100000 + seq_num`` and
``obs_id`` like ``MC_O_20261121_000123`` (``AT_O_...`` for LATISS).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, computed_field

__all__ = [
    "OBS_ID_PREFIX",
    "ObsType",
    "ObservingConditions",
    "TruthKind",
    "TruthRow",
    "VisitSpec",
    "exposure_id",
    "obs_id",
]

OBS_ID_PREFIX = {"LSSTCam": "MC", "LATISS": "AT"}
"""Two-letter instrument code of Rubin's obs_id (controller 'O' = OCS-driven)."""


def exposure_id(day_obs: int, seq_num: int) -> int:
    """Rubin's exposure id: ``day_obs * 100000 + seq_num``."""
    if not 0 < seq_num < 100000:
        raise ValueError(f"seq_num must be in 1..99999, got {seq_num}")
    return day_obs * 100000 + seq_num


def obs_id(instrument: str, day_obs: int, seq_num: int) -> str:
    """Rubin's observation id, e.g. ``MC_O_20261121_000123``."""
    return f"{OBS_ID_PREFIX[instrument]}_O_{day_obs}_{seq_num:06d}"


class ObsType(StrEnum):
    """Observation type (Rubin's IMGTYPE / observation_type)."""

    SCIENCE = "science"
    BIAS = "bias"
    DARK = "dark"
    FLAT = "flat"
    ENGTEST = "engtest"
    """Engineering test exposure."""


class ObservingConditions(BaseModel):
    """The atmosphere and sky during one visit."""

    model_config = ConfigDict(frozen=True)

    seeing_fwhm_arcsec: float = Field(gt=0, description="Delivered PSF FWHM at the airmass.")
    sky_mag_arcsec2: float = Field(description="Sky surface brightness in the band (moon incl.).")
    transparency: float = Field(gt=0, le=1, description="Fraction of light through clouds.")
    moon_illumination: float = Field(ge=0, le=1, description="Illuminated fraction of the moon.")
    moon_alt_deg: float = Field(description="Altitude of the moon.")
    psf_e1: float = Field(default=0.0, description="PSF ellipticity component e1.")
    psf_e2: float = Field(default=0.0, description="PSF ellipticity component e2.")
    pointing_dra_arcsec: float = Field(
        default=0.0,
        description="True minus commanded boresight, east (ΔRA·cos Dec), arcsec: the "
        "telescope's pointing error, which the header's RA/DEC do not know.",
    )
    pointing_ddec_arcsec: float = Field(
        default=0.0, description="True minus commanded boresight, north, arcsec."
    )


class VisitSpec(BaseModel):
    """One exposure as the scheduler plans it and the camera takes it."""

    model_config = ConfigDict(frozen=True)

    instrument: str = Field(description="'LSSTCam' or 'LATISS'.")
    day_obs: int = Field(description="Observing day YYYYMMDD.")
    seq_num: int = Field(ge=1, lt=100000, description="Sequence number within the day.")
    obs_type: ObsType
    reason: str = Field(description="Observation reason, e.g. 'wfd', 'ddf', 'calibration'.")
    program: str = Field(default="", description="Science program, e.g. 'BLOCK-365'.")
    group_id: str = Field(description="Group of visits (pair, DDF sequence, calib block).")
    band: str | None = Field(default=None, description="Abstract filter ugrizy (None: dark).")
    physical_filter: str | None = Field(default=None, description="Filter in the beam.")
    ra_deg: float = Field(ge=0, lt=360)
    dec_deg: float = Field(ge=-90, le=90)
    rot_sky_deg: float = Field(default=0.0, description="Sky rotation angle.")
    alt_deg: float = Field(default=90.0)
    az_deg: float = Field(default=0.0)
    airmass: float = Field(default=1.0, ge=1)
    exp_time_s: float = Field(ge=0, description="Shutter-open time (0 for a bias).")
    dark_time_s: float = Field(ge=0, description="Time from CCD clear to readout.")
    start_tai_mjd: float = Field(description="Start of integration, TAI, as MJD.")
    conditions: ObservingConditions | None = Field(
        default=None, description="Atmosphere and sky (None for closed-dome exposures)."
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exposure_id(self) -> int:
        """Rubin's exposure id."""
        return exposure_id(self.day_obs, self.seq_num)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def obs_id(self) -> str:
        """Rubin's observation id."""
        return obs_id(self.instrument, self.day_obs, self.seq_num)

    @property
    def end_tai_mjd(self) -> float:
        """End of integration (start of readout), TAI MJD."""
        return self.start_tai_mjd + self.dark_time_s / 86400.0


class TruthKind(StrEnum):
    """What a truth-table row describes."""

    TRANSIENT = "transient"
    VARIABLE = "variable"


class TruthRow(BaseModel):
    """One injected source in one detector of one visit."""

    model_config = ConfigDict(frozen=True)

    exposure_id: int
    detector: str
    kind: TruthKind
    source_id: int = Field(description="Id of the injected source (stable across visits).")
    ra_deg: float
    dec_deg: float
    x: float = Field(description="Column in the assembled detector image (0-based, pixels).")
    y: float = Field(description="Row in the assembled detector image (0-based, pixels).")
    mag: float = Field(description="AB magnitude in the visit's band at the visit's time.")
    flux_e: float = Field(description="Total electrons from the source in this exposure.")
    mjd: float = Field(description="Mid-exposure TAI MJD.")
