"""Science validation of Prompt Processing against the simulator's truth.

For one detector-visit: the DiaSources found, and the sources the simulator injected
(transients and periodic variables, :class:`ldf.sim.models.TruthRow`). Reported:

* **recovery**: of the injected *transients* whose expected signal-to-noise on the
  difference image is ≥ 10 and that lie on the difference image's **usable area**, the
  fraction with a DiaSource within 1″. Transients are absent from the templates (templates
  are a year older than any transient's light curve), so the difference flux is the
  transient's flux; the expected S/N uses the PSF's noise-equivalent area (Gaussian
  approximation, NEA = 4π σ²), the measured sky, the read noise, the source's own shot noise
  and a template-noise allowance of 30 %. The usable area (:func:`coverage_mask`, written by
  the worker per detector-visit) leaves out, as a survey's completeness does, what no
  difference image can measure: the transient's centre pixel outside the difference's valid
  area — no template there (``NO_DATA``: the template's visits did not cover it) or in the
  ``EDGE`` band the matching kernel cannot reach (its half-width from the border) — or a
  saturated science pixel within ±1 pixel of it (the charge is lost). Those transients are
  counted apart (``excluded_outside``, ``excluded_saturated``), never silently: on a
  full-size CCD the bands are ~20 pixels of 4000 (1–2 % of the transients), on the
  0.15-scale CCDs of the default night 8 % (their share of the area grows as 1/scale).
  Everything else the pipeline loses — a transient beside a saturated star in the grown mask
  of a convolved science, on a cosmic ray or bad column, near a bright star, rejected by a
  reliability cut — counts as missed;
* **false DiaSources**: DiaSources with no injected source (transient or variable, any
  brightness) within 1″ — subtraction residuals, cosmic rays, artefacts;
* for matched sources, the median psfFlux / true flux ratio (flux bias).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COVERAGE_OUTSIDE",
    "COVERAGE_SATURATED",
    "MATCH_RADIUS_ARCSEC",
    "RECOVERY_SNR",
    "coverage_mask",
    "coverage_path",
    "expected_snr",
    "expected_zero_point",
    "load_coverage",
    "save_coverage",
    "score_detector",
    "summarize",
]

COVERAGE_OUTSIDE = np.uint8(1)
"""Coverage bit: outside the difference's valid area (its ``EDGE`` or ``NO_DATA`` pixels)."""
COVERAGE_SATURATED = np.uint8(2)
"""Coverage bit: a saturated pixel of the science exposure."""

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


def coverage_mask(difference_mask: np.ndarray, science_mask: np.ndarray) -> np.ndarray:
    """The usable area of one detector-visit (uint8, ``COVERAGE_*`` bits per pixel).

    Parameters
    ----------
    difference_mask, science_mask
        The difference's and the science exposure's :class:`~ldf.pipelines.types.Mask` planes.
    """
    from ldf.pipelines.types import Mask

    out = np.zeros(difference_mask.shape, np.uint8)
    out[(difference_mask & np.uint16(Mask.EDGE | Mask.NO_DATA)) != 0] |= COVERAGE_OUTSIDE
    out[(science_mask & np.uint16(Mask.SAT)) != 0] |= COVERAGE_SATURATED
    return out


def coverage_path(home: Path | str, exposure_id: int, detector: str) -> Path:
    """Where the worker keeps a detector-visit's coverage mask under ``$LDF_HOME``."""
    return Path(home) / "prompt" / "coverage" / str(exposure_id) / f"{exposure_id}_{detector}.npz"


def save_coverage(path: Path, coverage: np.ndarray) -> None:
    """Write a coverage mask (bit planes packed, compressed: ~10 kB for a full-size CCD),
    atomically (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            shape=np.array(coverage.shape),
            bit1=np.packbits((coverage & COVERAGE_OUTSIDE) != 0, axis=1),
            bit2=np.packbits((coverage & COVERAGE_SATURATED) != 0, axis=1),
        )
    tmp.replace(path)


def load_coverage(path: Path | str) -> np.ndarray | None:
    """A coverage mask written by :func:`save_coverage`, or None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with np.load(path) as z:
        ny, nx = (int(v) for v in z["shape"])
        out = np.zeros((ny, nx), np.uint8)
        for bit in (COVERAGE_OUTSIDE, COVERAGE_SATURATED):
            plane = np.unpackbits(z[f"bit{bit}"], axis=1, count=nx).astype(bool)
            out[plane] |= bit
    return out


def _coverage_at(
    coverage: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(outside the valid area at the centre pixel, saturated within ±1 pixel) per position."""
    ny, nx = coverage.shape
    ix = np.rint(np.asarray(x, float)).astype(np.int64)
    iy = np.rint(np.asarray(y, float)).astype(np.int64)
    on = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    cx, cy = np.clip(ix, 0, nx - 1), np.clip(iy, 0, ny - 1)
    outside = ~on | ((coverage[cy, cx] & COVERAGE_OUTSIDE) != 0)
    off = np.arange(-1, 2)
    yy = np.clip(cy[:, None, None] + off[None, :, None], 0, ny - 1)
    xx = np.clip(cx[:, None, None] + off[None, None, :], 0, nx - 1)
    saturated = ((coverage[yy, xx] & COVERAGE_SATURATED) != 0).any(axis=(1, 2))
    return outside, saturated & ~outside


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
    coverage: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recovery and false positives of one detector-visit (see the module docstring).

    Parameters
    ----------
    dia
        DiaSources (DataFrame with ``ra``, ``dec``, and ``psfFlux`` in nJy).
    truth
        The detector's TruthRows (or dicts with kind, ra_deg, dec_deg, flux_e, and x, y
        when ``coverage`` is given).
    sky_e, read_noise_e, fwhm_px
        Sky per pixel (electrons), read noise (electrons), PSF FWHM (pixels).
    njy_per_electron
        Calibration of the exposure, for the flux bias (None: not reported).
    coverage
        The detector-visit's :func:`coverage_mask` (None: every transient on the detector
        counts, ``usable_area`` is False in the result).
    """
    rows = [t if isinstance(t, dict) else t.model_dump(mode="json") for t in truth]
    t_ra = np.array([r["ra_deg"] for r in rows], float)
    t_dec = np.array([r["dec_deg"] for r in rows], float)
    t_flux = np.array([r["flux_e"] for r in rows], float)
    is_transient = np.array([r["kind"] == "transient" for r in rows], bool)
    d_ra = np.asarray(dia["ra"], float) if len(dia) else np.empty(0)
    d_dec = np.asarray(dia["dec"], float) if len(dia) else np.empty(0)

    snr = expected_snr(t_flux, sky_e=sky_e, read_noise_e=read_noise_e, fwhm_px=fwhm_px)
    candidates = is_transient & (snr >= RECOVERY_SNR)
    outside = np.zeros(len(rows), bool)
    saturated = np.zeros(len(rows), bool)
    if coverage is not None and rows:
        outside, saturated = _coverage_at(
            coverage, np.array([r["x"] for r in rows]), np.array([r["y"] for r in rows])
        )
    bright = candidates & ~outside & ~saturated
    dist_t, idx_t = _nearest_arcsec(t_ra, t_dec, d_ra, d_dec)
    found = dist_t <= MATCH_RADIUS_ARCSEC
    dist_d, _ = _nearest_arcsec(d_ra, d_dec, t_ra, t_dec)
    false = int(np.sum(dist_d > MATCH_RADIUS_ARCSEC))
    out: dict[str, Any] = {
        "injected": len(rows),
        "transients_snr10": int(bright.sum()),
        "recovered_snr10": int((bright & found).sum()),
        "usable_area": coverage is not None,
        "transients_snr10_on_detector": int(candidates.sum()),
        "excluded_outside": int((candidates & outside).sum()),
        "excluded_saturated": int((candidates & saturated).sum()),
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
    """Totals over detector-visits: recovery fraction (over the usable area), the transients
    left out and why, false DiaSources per detector."""
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
        "usable_area": bool(n) and all(s.get("usable_area", False) for s in scores),
        "transients_snr10_on_detector": sum(
            s.get("transients_snr10_on_detector", s["transients_snr10"]) for s in scores
        ),
        "excluded_outside": sum(s.get("excluded_outside", 0) for s in scores),
        "excluded_saturated": sum(s.get("excluded_saturated", 0) for s in scores),
        "false": false,
        "false_per_detector": round(per_det, 3) if per_det is not None else None,
        "flux_ratio_median": round(float(np.median(ratios)), 4) if ratios else None,
    }
