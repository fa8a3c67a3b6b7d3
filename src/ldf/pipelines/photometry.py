"""Photometric calibration: the zero point of one detector-exposure from reference stars.

Rubin's ``PhotoCalTask`` in its simplest (single-band, no colour term) form: for the
astrometric matches that are unsaturated, unblended, away from the edges, measured with
S/N ≥ 10 and free of repaired pixels near their centre (no ``CR``, ``INTRP``, ``BAD``, ``SAT``
or ``NO_DATA`` within ±:data:`CENTER_BOX_PX`: an interpolated core — a cosmic ray's, or a
core the cosmic-ray finder mistook for one — changes the star's flux by up to tens of per
cent, as Rubin's photometric source selector excludes ``…_interpolatedCenter`` and
``…_crCenter``), each star gives ``zp_i = m_ref + 2.5 log10(f_i / t)`` (f in electrons, t the
exposure time), with variance ``σ_ref² + (1.0857 σ_f / f)²``. The zero point is their
inverse-variance weighted mean, iteratively 3σ-clipped about the weighted median, with an
error that is the larger of the formal one and the scatter over √N (so an unmodelled
colour term or flat-field structure shows in the error, not only in the mean).

The fluxes are characterization's ``flux``: PSF fluxes corrected to total flux by the
aperture correction and the PSF model's enclosed energy, so the zero point is that of total
flux (the convention of :mod:`ldf.pipelines.types`: AB magnitude of 1 e-/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ldf.pipelines.types import DetectorError, Exposure, Mask

__all__ = ["MIN_STARS", "PhotometryResult", "calibrate_photometry"]

STAGE = "photometry"

MIN_STARS = 3
"""Fewest calibration stars a zero point is computed from."""
_MIN_SNR = 10.0
_CLIP_SIGMA = 3.0
_MAG_ERR_FLOOR = 0.003  # per-star systematic floor (flat-field residuals, PSF variation)
CENTER_BOX_PX = 2
"""Half-width of the box around a calibration star's centre that must hold no repaired pixel."""
_CENTER_REJECT = np.uint16(Mask.CR | Mask.INTRP | Mask.BAD | Mask.SAT | Mask.NO_DATA)


def _repaired_centres(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether any pixel within ±CENTER_BOX_PX of each position is in ``_CENTER_REJECT``."""
    ny, nx = mask.shape
    h = CENTER_BOX_PX
    ix = np.rint(np.nan_to_num(x, nan=-1e9)).astype(np.int64)
    iy = np.rint(np.nan_to_num(y, nan=-1e9)).astype(np.int64)
    off = np.arange(-h, h + 1)
    yy = np.clip(iy[:, None, None] + off[None, :, None], 0, ny - 1)
    xx = np.clip(ix[:, None, None] + off[None, None, :], 0, nx - 1)
    return np.asarray(((mask[yy, xx] & _CENTER_REJECT) != 0).any(axis=(1, 2)))


@dataclass
class PhotometryResult:
    """The photometric zero point of one detector-exposure."""

    zero_point: float
    """AB magnitude of a source giving 1 e-/s (also set on the exposure)."""
    zero_point_err: float
    """Error of the zero point, magnitudes."""
    n_stars: int
    """Stars in the final (clipped) mean."""
    scatter_mag: float
    """RMS of the per-star zero points about the mean, magnitudes."""
    band: str
    """Band of the reference magnitudes used."""
    used: np.ndarray
    """(n_stars, 2) int64: the (source row, refcat index) pairs used."""


def calibrate_photometry(
    exposure: Exposure,
    sources: pd.DataFrame,
    refcat: np.ndarray,
    matches: np.ndarray,
) -> PhotometryResult:
    """Zero point from the matched reference stars; sets ``exposure.zero_point``.

    Parameters
    ----------
    exposure
        The characterized exposure (band and exposure time come from its ``info``).
    sources
        Characterization's source table (``flux``, ``flux_err``, ``snr`` and the flag
        columns ``saturated``, ``edge``, ``blended`` when present).
    refcat
        Reference rows (:data:`ldf.pipelines.refcat.REFCAT_DTYPE`).
    matches
        (n, 2) pairs (positional source row, refcat index), e.g.
        :attr:`ldf.pipelines.astrometry.AstrometryResult.matches`.

    Returns
    -------
    PhotometryResult

    Raises
    ------
    DetectorError
        No band or exposure time, or fewer than :data:`MIN_STARS` good calibration stars.
    """
    band = exposure.info.band
    if band == "white":  # LATISS's open filter position; the catalogue's r stands in
        band = "r"
    names = refcat.dtype.names or ()
    if band is None or band not in names:
        raise DetectorError(
            STAGE, f"the reference catalog has no magnitudes in band {exposure.info.band!r}"
        )
    exp_time = float(exposure.info.exp_time_s)
    if not exp_time > 0.0:
        raise DetectorError(STAGE, f"exposure time {exp_time} s: nothing to calibrate")
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    if len(matches) and (matches[:, 0].max() >= len(sources) or matches[:, 1].max() >= len(refcat)):
        raise DetectorError(STAGE, "matches index past the source table or reference catalog")
    si, ri = matches[:, 0], matches[:, 1]

    flux = sources["flux"].to_numpy(np.float64)[si]
    flux_err = sources["flux_err"].to_numpy(np.float64)[si]
    good = np.isfinite(flux) & np.isfinite(flux_err) & (flux > 0) & (flux_err > 0)
    good &= flux >= _MIN_SNR * flux_err
    for col in ("saturated", "edge", "blended"):
        if col in sources.columns:
            good &= ~sources[col].to_numpy(bool)[si]
    if "x" in sources.columns and "y" in sources.columns and si.size:
        good &= ~_repaired_centres(
            exposure.mask,
            sources["x"].to_numpy(np.float64)[si],
            sources["y"].to_numpy(np.float64)[si],
        )
    mag = np.asarray(refcat[band], np.float64)[ri]
    err_col = f"{band}_err"
    mag_err = (
        np.asarray(refcat[err_col], np.float64)[ri] if err_col in names else np.full(ri.size, 0.02)
    )
    good &= np.isfinite(mag) & np.isfinite(mag_err)
    if good.sum() < MIN_STARS:
        raise DetectorError(
            STAGE,
            f"only {int(good.sum())} clean unsaturated matched stars with S/N ≥ {_MIN_SNR:g} "
            f"(need ≥ {MIN_STARS}): too few reference stars in band {band} or heavy cloud",
        )
    flux, flux_err, mag, mag_err = flux[good], flux_err[good], mag[good], mag_err[good]
    pairs = matches[good]

    zp_i = mag + 2.5 * np.log10(flux / exp_time)
    sig_i = np.sqrt(mag_err**2 + (2.5 / math.log(10.0) * flux_err / flux) ** 2 + _MAG_ERR_FLOOR**2)
    w = 1.0 / sig_i**2
    keep = np.ones(zp_i.size, bool)
    zp = _weighted_median(zp_i, w)
    for _ in range(5):
        # Clip on each star's own σ, inflated by the excess scatter if the data demand it.
        chi = (zp_i - zp) / sig_i
        excess = max(1.0, 1.4826 * float(np.median(np.abs(chi[keep]))))
        new_keep = np.abs(chi) <= _CLIP_SIGMA * excess
        if new_keep.sum() < MIN_STARS:
            break
        converged = np.array_equal(new_keep, keep)
        keep = new_keep
        zp = float(np.sum(w[keep] * zp_i[keep]) / np.sum(w[keep]))
        if converged:
            break
    n = int(keep.sum())
    resid = zp_i[keep] - zp
    scatter = float(np.sqrt(np.mean(resid**2)))
    formal = 1.0 / math.sqrt(float(np.sum(w[keep])))
    zp_err = max(formal, scatter / math.sqrt(max(n - 1, 1)))

    exposure.zero_point = zp
    exposure.metadata["HIERARCH LDF MAGZERO"] = (round(zp, 5), "AB mag of 1 e-/s")
    exposure.metadata["HIERARCH LDF MAGZERR"] = (round(zp_err, 5), "zero point error, mag")
    return PhotometryResult(
        zero_point=zp,
        zero_point_err=zp_err,
        n_stars=n,
        scatter_mag=scatter,
        band=band,
        used=pairs[keep],
    )


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    k = int(np.searchsorted(cw, 0.5 * cw[-1]))
    return float(values[order][min(k, values.size - 1)])
