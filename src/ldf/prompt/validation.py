"""Science validation of Prompt Processing against the simulator's truth.

For one detector-visit: the DiaSources found, and the sources the simulator injected
(transients and periodic variables, :class:`ldf.sim.models.TruthRow`). Reported:

* **recovery**: of the injected *transients* whose expected signal-to-noise on the
  difference image is ≥ 10, the fraction with a DiaSource within 1″. Transients are absent
  from the templates (templates are a year older than any transient's light curve), so the
  difference flux is the transient's flux; the expected S/N uses the PSF's noise-equivalent
  area (Gaussian approximation, NEA = 4π σ²), the measured sky, the read noise, the source's
  own shot noise and a template-noise allowance of 30 %;
* **false DiaSources**: DiaSources with no injected source (transient or variable, any
  brightness) within 1″ — subtraction residuals, cosmic rays, artefacts;
* for matched sources, the median psfFlux / true flux ratio (flux bias).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "MATCH_RADIUS_ARCSEC",
    "RECOVERY_SNR",
    "expected_snr",
    "expected_zero_point",
    "score_detector",
    "summarize",
]

MATCH_RADIUS_ARCSEC = 1.0
"""A DiaSource within this distance of an injected source recovers it."""

RECOVERY_SNR = 10.0
"""Injected transients at or above this expected S/N count in the recovery fraction."""

_TEMPLATE_NOISE = 0.3
"""Extra variance fraction from the template (a 3-visit coadd in better seeing)."""


def expected_snr(
    flux_e: np.ndarray, *, sky_e: float, read_noise_e: float, fwhm_px: float
) -> np.ndarray:
    """Expected PSF-photometry S/N of point sources of ``flux_e`` electrons on a difference."""
    sigma = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    nea = 4.0 * math.pi * sigma * sigma
    var = np.asarray(flux_e) + nea * (sky_e + read_noise_e**2) * (1.0 + _TEMPLATE_NOISE)
    return np.asarray(flux_e) / np.sqrt(var)


def expected_zero_point(camera: Any, detector: Any, truth: dict[str, Any]) -> float | None:
    """The zero point a correct calibration measures on a detector (AB mag of 1 e-/s):
    the camera's, extinction at the airmass, the clouds, and the flat-field normalisation
    (master flats are normalised to their median, so a source keeps that fraction)."""
    from ldf.sim.camera import flat_pattern

    band, airmass, transp = truth.get("band"), truth.get("airmass"), truth.get("transparency")
    if not band or airmass is None or not transp or band not in camera.zero_points:
        return None
    norm = float(np.median(flat_pattern(camera, detector)))
    return (
        camera.zero_points[band]
        - camera.extinction[band] * (airmass - 1.0)
        + 2.5 * math.log10(transp)
        + 2.5 * math.log10(norm)
    )


def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def _nearest_arcsec(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> tuple[np.ndarray, np.ndarray]:
    """For each point of set 1: distance (arcsec) to and index of the nearest of set 2."""
    from scipy.spatial import cKDTree

    a = np.asarray(ra1, float)
    if len(a) == 0 or len(np.asarray(ra2)) == 0:
        return np.full(len(a), np.inf), np.full(len(a), -1)
    tree = cKDTree(_unit(np.asarray(ra2, float), np.asarray(dec2, float)))
    chord, idx = tree.query(_unit(a, np.asarray(dec1, float)))
    return np.degrees(2 * np.arcsin(np.clip(chord / 2, 0, 1))) * 3600.0, idx


def score_detector(
    dia: Any,
    truth: Iterable[Any],
    *,
    sky_e: float,
    read_noise_e: float,
    fwhm_px: float,
    njy_per_electron: float | None = None,
) -> dict[str, Any]:
    """Recovery and false positives of one detector-visit (see the module docstring).

    Parameters
    ----------
    dia
        DiaSources (DataFrame with ``ra``, ``dec``, and ``psfFlux`` in nJy).
    truth
        The detector's TruthRows (or dicts with kind, ra_deg, dec_deg, flux_e).
    sky_e, read_noise_e, fwhm_px
        Sky per pixel (electrons), read noise (electrons), PSF FWHM (pixels).
    njy_per_electron
        Calibration of the exposure, for the flux bias (None: not reported).
    """
    rows = [t if isinstance(t, dict) else t.model_dump(mode="json") for t in truth]
    t_ra = np.array([r["ra_deg"] for r in rows], float)
    t_dec = np.array([r["dec_deg"] for r in rows], float)
    t_flux = np.array([r["flux_e"] for r in rows], float)
    is_transient = np.array([r["kind"] == "transient" for r in rows], bool)
    d_ra = np.asarray(dia["ra"], float) if len(dia) else np.empty(0)
    d_dec = np.asarray(dia["dec"], float) if len(dia) else np.empty(0)

    snr = expected_snr(t_flux, sky_e=sky_e, read_noise_e=read_noise_e, fwhm_px=fwhm_px)
    bright = is_transient & (snr >= RECOVERY_SNR)
    dist_t, idx_t = _nearest_arcsec(t_ra, t_dec, d_ra, d_dec)
    found = dist_t <= MATCH_RADIUS_ARCSEC
    dist_d, _ = _nearest_arcsec(d_ra, d_dec, t_ra, t_dec)
    false = int(np.sum(dist_d > MATCH_RADIUS_ARCSEC))
    out: dict[str, Any] = {
        "injected": len(rows),
        "transients_snr10": int(bright.sum()),
        "recovered_snr10": int((bright & found).sum()),
        "dia_sources": len(d_ra),
        "false": false,
    }
    if njy_per_electron and len(dia) and np.any(bright & found):
        sel = bright & found
        measured = np.asarray(dia["psfFlux"], float)[idx_t[sel]]
        ratio = measured / (t_flux[sel] * njy_per_electron)
        out["flux_ratio_median"] = float(np.median(ratio))
    return out


def summarize(scores: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals over detector-visits: recovery fraction and false DiaSources per detector."""
    scores = list(scores)
    n = len(scores)
    bright = sum(s["transients_snr10"] for s in scores)
    rec = sum(s["recovered_snr10"] for s in scores)
    false = sum(s["false"] for s in scores)
    per_det = false / n if n else None
    ratios = [s["flux_ratio_median"] for s in scores if "flux_ratio_median" in s]
    return {
        "detector_visits": n,
        "transients_snr10": bright,
        "recovered_snr10": rec,
        "recovery": round(rec / bright, 4) if bright else None,
        "false": false,
        "false_per_detector": round(per_det, 3) if per_det is not None else None,
        "flux_ratio_median": round(float(np.median(ratios)), 4) if ratios else None,
    }
