"""What the science pipelines talk in: exposures, PSF models, visit metadata, mask planes.

Plain numpy/astropy containers (there is no ``afw`` here). Every stage of
:mod:`ldf.pipelines` takes and returns these, so prompt processing, batch campaigns and tests
chain the stages the same way.

Units and conventions
    * Images are assembled detector images, ``(ny, nx)`` float32, row = y, column = x,
      0-based pixel centres. After ISR they are in **electrons**; variance in electrons².
    * ``Exposure.zero_point`` is the AB magnitude of a source giving **1 electron per second**
      in the calibrated image (the simulator's convention, ``ldf.sim.camera``). So
      ``mag = zero_point − 2.5 log10(flux_e / exp_time_s)`` and
      ``flux_nJy = flux_e · Exposure.njy_per_electron()`` (AB: ``m = 31.4 − 2.5 log10 f_nJy``).
    * Catalogue tables are pandas DataFrames with Rubin's APDB column names (``lsst-sdm-schemas``
      ``apdb.yaml``) where Rubin defines one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import IntFlag
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

__all__ = [
    "AB_NJY_ZERO_POINT",
    "DetectorError",
    "Exposure",
    "Mask",
    "PsfModel",
    "VisitInfo",
]

AB_NJY_ZERO_POINT = 31.4
"""AB magnitude of 1 nJy: ``m = 31.4 − 2.5 log10(f / nJy)``."""


class Mask(IntFlag):
    """Mask planes (uint16 bits), after Rubin's afw mask plane names."""

    BAD = 1
    """Hot, dead or otherwise unusable pixel (from the bad-pixel mask)."""
    SAT = 2
    """Saturated, or in a bleed trail."""
    CR = 4
    """Cosmic ray."""
    EDGE = 8
    """Too close to the detector edge for a full PSF or kernel footprint."""
    DETECTED = 16
    """In a footprint of a positive detection."""
    DETECTED_NEGATIVE = 32
    """In a footprint of a negative detection (difference images)."""
    NO_DATA = 64
    """No data (outside the template's coverage, for example)."""
    INTRP = 128
    """Interpolated over."""
    SUSPECT = 256
    """Near saturation or in a pixel whose calibration is uncertain."""


class DetectorError(Exception):
    """One detector cannot be processed, for a reason an operator can act on.

    Raised by a pipeline stage for a per-detector problem (missing calibration or template,
    corrupt raw, no stars to calibrate on…). The prompt service records ``stage`` and
    ``reason`` for that detector and goes on with the others.
    """

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class VisitInfo:
    """Who and what one detector-exposure is (from the raw's primary header)."""

    instrument: str
    exposure_id: int
    day_obs: int
    seq_num: int
    detector: str
    """Detector name, e.g. 'R22_S11'."""
    detector_id: int
    obs_type: str
    """'science', 'bias', 'dark', 'flat', 'engtest'."""
    band: str | None
    physical_filter: str | None
    exp_time_s: float
    dark_time_s: float
    mjd_begin_tai: float
    ra_deg: float | None
    """Commanded boresight (the header's RA); the true pointing differs by the pointing error."""
    dec_deg: float | None
    rot_sky_deg: float | None
    airmass: float | None
    end_readout_tai_mjd: float | None = None

    @property
    def mjd_mid_tai(self) -> float:
        """Mid-exposure TAI MJD (DiaSource ``midpointMjdTai``)."""
        return self.mjd_begin_tai + self.exp_time_s / 2.0 / 86400.0

    @classmethod
    def from_header(cls, header: fits.Header) -> VisitInfo:
        """Read a raw's primary header (as :mod:`ldf.archiver.rawfits` writes it).

        Raises
        ------
        DetectorError
            A keyword the pipelines cannot do without is missing or malformed.
        """
        try:
            day_obs = int(header["DAYOBS"])
            seq_num = int(header["SEQNUM"])
            imgtype = str(header["IMGTYPE"]).lower()
            return cls(
                instrument=str(header["INSTRUME"]),
                exposure_id=day_obs * 100000 + seq_num,
                day_obs=day_obs,
                seq_num=seq_num,
                detector=f"{header['RAFTBAY']}_{header['CCDSLOT']}",
                detector_id=int(header["DETECTOR"]),
                obs_type="science" if imgtype == "object" else imgtype,
                band=_opt_str(header.get("FILTBAND")),
                physical_filter=_opt_str(header.get("FILTER")),
                exp_time_s=float(header["EXPTIME"]),
                dark_time_s=float(header.get("DARKTIME", header["EXPTIME"])),
                mjd_begin_tai=float(header["MJD-BEG"]),
                ra_deg=_opt_float(header.get("RA")),
                dec_deg=_opt_float(header.get("DEC")),
                rot_sky_deg=_opt_float(header.get("ROTPA")),
                airmass=_opt_float(header.get("AMSTART")),
                end_readout_tai_mjd=_opt_float(header.get("HIERARCH LDF READEND")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DetectorError("header", f"unusable raw header: {exc}") from exc


def _opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, fits.card.Undefined):
        return None
    return str(value)


def _opt_float(value: Any) -> float | None:
    if value is None or isinstance(value, fits.card.Undefined):
        return None
    out = float(value)
    return None if math.isnan(out) else out


@dataclass
class PsfModel:
    """A spatially constant PSF: a normalised pixel image plus its summary parameters."""

    image: np.ndarray
    """Odd-sized square float array, centred on its middle pixel, summing to 1."""
    fwhm_px: float
    """Full width at half maximum, pixels (geometric mean of the two axes)."""
    e1: float = 0.0
    """Ellipticity component (a²−b²)/(a²+b²) · cos 2θ."""
    e2: float = 0.0
    """Ellipticity component (a²−b²)/(a²+b²) · sin 2θ."""

    def stamp(self, size: int | None = None) -> np.ndarray:
        """The PSF image, cropped or zero-padded to ``size`` (odd), renormalised to sum 1."""
        img = self.image
        if size is not None:
            if size % 2 == 0:
                raise ValueError(f"PSF stamp size must be odd, got {size}")
            have = img.shape[0]
            if size < have:
                c = (have - size) // 2
                img = img[c : c + size, c : c + size]
            elif size > have:
                p = (size - have) // 2
                img = np.pad(img, p)
        total = float(img.sum())
        return (img / total).astype(np.float32) if total > 0 else img.astype(np.float32)

    @property
    def ellipticity(self) -> float:
        """|e| = sqrt(e1² + e2²)."""
        return math.hypot(self.e1, self.e2)

    @property
    def noise_equivalent_area(self) -> float:
        """1 / Σ psf², pixels: the variance of a PSF flux is ``σ²_pixel · NEA``."""
        stamp = self.stamp()
        return float(1.0 / np.sum(stamp.astype(np.float64) ** 2))


@dataclass
class Exposure:
    """One detector's image with its variance, mask and calibration."""

    image: np.ndarray
    """float32 (ny, nx): electrons after ISR (background-subtracted after characterization)."""
    variance: np.ndarray
    """float32 (ny, nx): variance of ``image``."""
    mask: np.ndarray
    """uint16 (ny, nx): :class:`Mask` bits."""
    info: VisitInfo
    metadata: fits.Header = field(default_factory=fits.Header)
    """The raw's primary header (plus processing keywords stages add)."""
    wcs: WCS | None = None
    """Sky WCS: from the header's commanded pointing after ISR, fitted after astrometry."""
    pixel_scale_arcsec: float = 0.2
    psf: PsfModel | None = None
    zero_point: float | None = None
    """AB magnitude of 1 e-/s (see the module docstring); None until photometric calibration."""
    background_level: float | None = None
    """Median sky subtracted by characterization (electrons per pixel)."""

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx)."""
        return self.image.shape

    def njy_per_electron(self) -> float:
        """nJy of a source per electron it gives in this exposure.

        Raises
        ------
        DetectorError
            No zero point yet (photometric calibration has not run or failed).
        """
        if self.zero_point is None:
            raise DetectorError("photometry", "exposure has no photometric zero point")
        return 10 ** (-0.4 * (self.zero_point - AB_NJY_ZERO_POINT)) / max(
            self.info.exp_time_s, 1e-9
        )

    def copy(self, **changes: Any) -> Exposure:
        """A deep copy of the pixel planes, with ``changes`` applied to fields."""
        out = replace(
            self,
            image=self.image.copy(),
            variance=self.variance.copy(),
            mask=self.mask.copy(),
            metadata=self.metadata.copy(),
        )
        return replace(out, **changes) if changes else out
