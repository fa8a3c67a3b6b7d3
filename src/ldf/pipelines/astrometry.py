"""Astrometric calibration: match sources to the reference catalogue and fit a TAN WCS.

Algorithm (the pattern of Rubin's ``AstrometryTask`` with a simpler matcher, suited to a
header WCS that is right up to a pointing error of a few arcseconds):

1. **Offset vote.** Project the reference stars through the header (commanded-pointing)
   WCS. For the brightest detections and the brightest reference stars, every pairwise
   offset within ``search_radius_arcsec`` goes into a 2-D histogram of 1-pixel bins; the
   peak of the 3 × 3-smoothed histogram is the pointing error seen on this detector
   (random pairs spread over the whole search disc, true pairs pile up in one bin — the
   "offset histogram" of e.g. Valdes et al. 1995, PASP 107, 1119, without the rotation
   search the header makes unnecessary). The median of the offsets near the peak refines it.
2. **Matching.** Nearest neighbours (``scipy.spatial.cKDTree``) between the shifted
   reference positions and the unsaturated detections, each reference star used once,
   within 1.5 pixels, with a magnitude-consistency cut (1 mag about the median
   instrumental-minus-catalogue offset).
3. **TAN fit.** The tangent point stays at the header's CRPIX (where the boresight falls for
   this distortion-free camera); CRVAL and the CD matrix are fitted by weighted linear least
   squares on the tangent plane (gnomonic standard coordinates ξ, η; Calabretta & Greisen
   2002, A&A 395, 1077), re-projecting about the new CRVAL until it converges. With fewer
   than 10 matches only CRVAL is fitted (the CD matrix is kept). Then a re-match with the
   fitted WCS and 3σ clipping of the residuals, and a final fit.

The pointing offset reported is the fitted minus the header WCS evaluated at the header's
CRPIX: east (ΔRA·cos Dec) and north, arcseconds — the mount's pointing error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from ldf.pipelines.refcat import RefcatStore
from ldf.pipelines.types import DetectorError, Exposure

__all__ = ["MIN_MATCHES", "AstrometryResult", "fit_astrometry", "load_refcat_for"]

STAGE = "astrometry"

MIN_MATCHES = 6
"""Fewest matched stars a WCS is fitted from."""
MIN_MATCHES_FOR_CD = 10
"""With fewer matches only the tangent point is fitted (the header's CD matrix is kept)."""
_N_VOTE = 200  # brightest detections and reference stars in the offset vote
_MATCH_RADIUS_PX = 1.5
_MAG_WINDOW = 1.0
_CLIP_SIGMA = 3.5


@dataclass
class AstrometryResult:
    """The fitted WCS of one detector-exposure and what it was fitted from."""

    wcs: WCS
    """Fitted TAN WCS (also set on the exposure)."""
    offset_east_arcsec: float
    """Fitted minus commanded boresight along RA·cos Dec, arcseconds."""
    offset_north_arcsec: float
    """Fitted minus commanded boresight in Dec, arcseconds."""
    offset_err_arcsec: float
    """Standard error of each offset component (from the fit's covariance, scaled by the
    residuals). Large for an off-axis detector with few stars: its boresight is an
    extrapolation of the fitted CD matrix far outside the detector."""
    rms_arcsec: float
    """RMS of the 2-D residual distance between matched sources and reference stars."""
    n_matched: int
    """Matches used in the final fit."""
    matches: np.ndarray
    """(n_matched, 2) int64: positional row in ``sources`` and index in ``refcat``."""
    refcat: np.ndarray
    """The reference rows ``matches`` index (loaded from the store if one was given)."""
    vote_offset_px: tuple[float, float]
    """(dx, dy) the offset vote found: reference minus source position, pixels."""

    @property
    def offset_ra_arcsec(self) -> float:
        """The pointing offset in RA as the simulator states it: ΔRA·cos Dec (= east)."""
        return self.offset_east_arcsec

    @property
    def offset_dec_arcsec(self) -> float:
        """The pointing offset in Dec (= north), arcseconds."""
        return self.offset_north_arcsec


def load_refcat_for(
    exposure: Exposure, store: RefcatStore, *, margin_arcsec: float = 30.0
) -> np.ndarray:
    """Reference rows covering an exposure's detector (its circumscribed circle + margin).

    Raises
    ------
    DetectorError
        No header WCS, or a shard is missing (see :meth:`RefcatStore.load_region`).
    """
    wcs = _header_wcs(exposure)
    ny, nx = exposure.shape
    ra_c, dec_c = (float(v) for v in wcs.wcs_pix2world((nx - 1) / 2.0, (ny - 1) / 2.0, 0))
    radius = math.hypot(nx, ny) / 2.0 * exposure.pixel_scale_arcsec + margin_arcsec
    return store.load_region(ra_c, dec_c, radius / 3600.0)


def _header_wcs(exposure: Exposure) -> WCS:
    if exposure.wcs is None or not exposure.wcs.has_celestial:
        raise DetectorError(
            STAGE, "exposure has no celestial WCS; the raw header lacks a usable pointing"
        )
    return exposure.wcs


def _gnomonic(
    ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Standard coordinates (ξ, η) in degrees of (ra, dec) about the tangent point."""
    a, d = np.radians(ra), np.radians(dec)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cd, sd, cda = np.cos(d), np.sin(d), np.cos(a - a0)
    den = sd * math.sin(d0) + cd * math.cos(d0) * cda
    xi = cd * np.sin(a - a0) / den
    eta = (sd * math.cos(d0) - cd * math.sin(d0) * cda) / den
    return np.degrees(xi), np.degrees(eta)


def _deproject(xi: float, eta: float, ra0: float, dec0: float) -> tuple[float, float]:
    """Inverse gnomonic projection of (ξ, η) degrees about (ra0, dec0)."""
    x, y = math.radians(xi), math.radians(eta)
    d0 = math.radians(dec0)
    rho = math.hypot(x, y)
    c = math.atan(rho)
    if rho == 0.0:
        return ra0, dec0
    dec = math.asin(math.cos(c) * math.sin(d0) + y * math.sin(c) * math.cos(d0) / rho)
    ra = ra0 + math.degrees(
        math.atan2(
            x * math.sin(c), rho * math.cos(d0) * math.cos(c) - y * math.sin(d0) * math.sin(c)
        )
    )
    return ra % 360.0, math.degrees(dec)


def _fit_tan(
    x: np.ndarray,
    y: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    weight: np.ndarray,
    start: WCS,
    fit_cd: bool,
) -> tuple[WCS, float]:
    """TAN WCS with ``start``'s CRPIX: CRVAL (and CD if ``fit_cd``) by linear least squares.

    Returns the WCS and the per-axis standard error of its CRVAL (arcsec), from the
    parameter covariance scaled by the residual variance.
    """
    wcs = copy.deepcopy(start)
    crpix0 = np.asarray(wcs.wcs.crpix, np.float64) - 1.0
    u, v = x - crpix0[0], y - crpix0[1]
    cd = np.array(wcs.wcs.cd if wcs.wcs.has_cd() else wcs.pixel_scale_matrix, np.float64)
    ra0, dec0 = (float(c) for c in wcs.wcs.crval)
    sw = np.sqrt(weight)
    design = np.column_stack([u, v, np.ones_like(u)]) if fit_cd else np.ones((u.size, 1))
    wdesign = design * sw[:, None]
    for _ in range(8):
        xi, eta = _gnomonic(ra, dec, ra0, dec0)
        if fit_cd:
            cx = np.linalg.lstsq(wdesign, xi * sw, rcond=None)[0]
            cy = np.linalg.lstsq(wdesign, eta * sw, rcond=None)[0]
            cd = np.array([[cx[0], cx[1]], [cy[0], cy[1]]])
            xi0, eta0 = float(cx[2]), float(cy[2])
        else:
            pred = cd @ np.vstack([u, v])
            xi0 = float(np.sum(weight * (xi - pred[0])) / np.sum(weight))
            eta0 = float(np.sum(weight * (eta - pred[1])) / np.sum(weight))
        # CRPIX maps to standard coordinates (ξ0, η0) about the current tangent point: that
        # sky position is the new tangent point; re-project about it until (ξ0, η0) → 0.
        ra0, dec0 = _deproject(xi0, eta0, ra0, dec0)
        if math.hypot(xi0, eta0) * 3.6e6 < 0.01:  # converged to 10 µas
            break
    wcs.wcs.crval = [ra0, dec0]
    wcs.wcs.cd = cd
    wcs.wcs.set()
    # Covariance of the CRVAL terms, scaled by the weighted residual variance.
    xi, eta = _gnomonic(ra, dec, ra0, dec0)
    pred = cd @ np.vstack([u, v])
    chi2 = float(np.sum(weight * ((xi - pred[0]) ** 2 + (eta - pred[1]) ** 2)))
    dof = max(2 * u.size - 2 * design.shape[1], 1)
    try:
        cov = np.linalg.inv(wdesign.T @ wdesign)
    except np.linalg.LinAlgError:
        return wcs, math.inf
    err = math.sqrt(max(float(cov[-1, -1]) * chi2 / dof, 0.0)) * 3600.0
    return wcs, err


def _residuals_arcsec(
    wcs: WCS, x: np.ndarray, y: np.ndarray, ra: np.ndarray, dec: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(east, north) residuals, reference minus source, on the tangent plane (arcsec)."""
    ra_s, dec_s = wcs.wcs_pix2world(x, y, 0)
    ra0, dec0 = (float(c) for c in wcs.wcs.crval)
    xi_r, eta_r = _gnomonic(ra, dec, ra0, dec0)
    xi_s, eta_s = _gnomonic(np.asarray(ra_s), np.asarray(dec_s), ra0, dec0)
    return (xi_r - xi_s) * 3600.0, (eta_r - eta_s) * 3600.0


def _match(
    src_xy: np.ndarray, ref_xy: np.ndarray, radius_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Unique nearest-neighbour pairs (source i, ref j) closer than ``radius_px``."""
    if len(src_xy) == 0 or len(ref_xy) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    dist, j = cKDTree(ref_xy).query(src_xy, distance_upper_bound=radius_px)
    i = np.flatnonzero(np.isfinite(dist))
    j, dist = j[i], dist[i]
    order = np.argsort(dist, kind="stable")  # each reference star keeps its closest source
    i, j = i[order], j[order]
    _, first = np.unique(j, return_index=True)
    return i[first].astype(np.int64), j[first].astype(np.int64)


def _vote_offset(
    src_xy: np.ndarray, ref_xy: np.ndarray, radius_px: float
) -> tuple[float, float, int]:
    """Offset (ref − source, pixels) with most pairs; also the number of pairs at the peak."""
    lists = cKDTree(ref_xy).query_ball_point(src_xy, r=radius_px)
    n_per = np.fromiter((len(lst) for lst in lists), np.int64, len(lists))
    if n_per.sum() == 0:
        return 0.0, 0.0, 0
    js = np.fromiter((j for lst in lists for j in lst), np.int64, int(n_per.sum()))
    is_ = np.repeat(np.arange(len(lists)), n_per)
    dx = ref_xy[js, 0] - src_xy[is_, 0]
    dy = ref_xy[js, 1] - src_xy[is_, 1]
    nb = 2 * math.ceil(radius_px) + 1
    edges = np.arange(nb + 1) - (nb / 2.0)
    hist, _, _ = np.histogram2d(dy, dx, bins=(edges, edges))
    smooth = ndimage.uniform_filter(hist, size=3, mode="constant") * 9.0
    iy, ix = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    cx, cy = (edges[ix] + edges[ix + 1]) / 2.0, (edges[iy] + edges[iy + 1]) / 2.0
    near = (np.abs(dx - cx) <= 1.5) & (np.abs(dy - cy) <= 1.5)
    return float(np.median(dx[near])), float(np.median(dy[near])), int(near.sum())


def fit_astrometry(
    exposure: Exposure,
    sources: pd.DataFrame,
    refcat: np.ndarray | RefcatStore,
    *,
    search_radius_arcsec: float = 10.0,
) -> AstrometryResult:
    """Fit the WCS of a characterized exposure against the reference catalogue.

    Parameters
    ----------
    exposure
        Exposure with the header (commanded-pointing) WCS; its ``wcs`` is replaced by the
        fit.
    sources
        Characterization's source table (``x``, ``y``, ``flux``, ``snr``, ``saturated``…).
        Columns ``coord_ra`` and ``coord_dec`` (degrees, from the fitted WCS) are added to
        it in place.
    refcat
        Reference rows (:data:`ldf.pipelines.refcat.REFCAT_DTYPE`) covering the detector, or
        a :class:`~ldf.pipelines.refcat.RefcatStore` to load them from.
    search_radius_arcsec
        Largest pointing error searched for.

    Returns
    -------
    AstrometryResult

    Raises
    ------
    DetectorError
        No WCS, no sources or reference stars on the detector, no consistent offset, or
        fewer than :data:`MIN_MATCHES` matches.
    """
    header_wcs = _header_wcs(exposure)
    if isinstance(refcat, RefcatStore):
        refcat = load_refcat_for(exposure, refcat, margin_arcsec=search_radius_arcsec + 20.0)
    for col in ("x", "y", "flux"):
        if col not in sources.columns:
            raise DetectorError(STAGE, f"source table has no {col!r} column; run characterize")
    ny, nx = exposure.shape
    scale = exposure.pixel_scale_arcsec
    band = exposure.info.band if exposure.info.band in ("u", "g", "r", "i", "z", "y") else "r"
    radius_px = search_radius_arcsec / scale

    # Reference stars near the detector, through the header WCS.
    missing = {"ra", "dec", "ra_err", "dec_err", band} - set(refcat.dtype.names or ())
    if missing:
        raise DetectorError(
            STAGE, f"reference rows lack {sorted(missing)}; expected refcat.REFCAT_DTYPE"
        )
    if len(refcat) == 0:
        raise DetectorError(
            STAGE, "the reference catalog has no stars here; re-run `ldf refcat ingest`"
        )
    rx, ry = (np.asarray(v) for v in header_wcs.wcs_world2pix(refcat["ra"], refcat["dec"], 0))
    on = (rx > -radius_px) & (rx < nx - 1 + radius_px)
    on &= (ry > -radius_px) & (ry < ny - 1 + radius_px)
    ref_idx = np.flatnonzero(on & np.isfinite(refcat[band]))
    if ref_idx.size < MIN_MATCHES:
        raise DetectorError(
            STAGE,
            f"only {ref_idx.size} reference stars fall on the detector (need ≥ {MIN_MATCHES}); "
            "is the reference catalog ingested for this field, and the pointing right?",
        )
    ref_xy = np.column_stack([rx[ref_idx], ry[ref_idx]])
    ref_mag = np.asarray(refcat[band][ref_idx], np.float64)

    x = sources["x"].to_numpy(np.float64)
    y = sources["y"].to_numpy(np.float64)
    flux = sources["flux"].to_numpy(np.float64)
    sat = sources["saturated"].to_numpy(bool) if "saturated" in sources else np.zeros(len(x), bool)
    snr = sources["snr"].to_numpy(np.float64) if "snr" in sources else np.full(len(x), 100.0)
    usable = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0) & ~sat
    src_idx = np.flatnonzero(usable)
    if src_idx.size < MIN_MATCHES:
        raise DetectorError(
            STAGE, f"only {src_idx.size} usable detections (need ≥ {MIN_MATCHES}) to match"
        )

    # 1. Offset vote among the bright ends of both lists.
    bright_src = src_idx[np.argsort(-flux[src_idx])][:_N_VOTE]
    bright_ref = np.argsort(ref_mag)[:_N_VOTE]
    dx, dy, n_peak = _vote_offset(
        np.column_stack([x[bright_src], y[bright_src]]), ref_xy[bright_ref], radius_px
    )
    if n_peak < min(MIN_MATCHES, 4):
        raise DetectorError(
            STAGE,
            f"no consistent offset between detections and reference stars within "
            f"{search_radius_arcsec:g}″ (best bin has {n_peak} pairs): pointing error too "
            "large, wrong field, or a bad image",
        )

    # 2. Match all usable detections to the shifted reference stars.
    src_xy = np.column_stack([x[src_idx], y[src_idx]])
    i, j = _match(src_xy, ref_xy - [dx, dy], _MATCH_RADIUS_PX)
    i, j = _magnitude_consistent(i, j, flux[src_idx], ref_mag, exposure.info.exp_time_s)
    if i.size < MIN_MATCHES:
        raise DetectorError(
            STAGE,
            f"only {i.size} detections match reference stars (need ≥ {MIN_MATCHES}) after "
            f"an offset of ({dx * scale:.2f}″, {dy * scale:.2f}″)",
        )

    # 3. Fit, re-match with the fitted WCS, clip, refit.
    ref_ra = np.asarray(refcat["ra"][ref_idx], np.float64)
    ref_dec = np.asarray(refcat["dec"][ref_idx], np.float64)
    ref_err_px = np.hypot(refcat["ra_err"][ref_idx], refcat["dec_err"][ref_idx]) / 1e3 / scale
    fwhm = exposure.psf.fwhm_px if exposure.psf is not None else 1.0 / scale
    cen_err_px = fwhm / np.maximum(snr[src_idx], 1.0)
    wcs = header_wcs
    for it in range(3):
        w = 1.0 / (ref_err_px[j] ** 2 / 2.0 + cen_err_px[i] ** 2 + 0.01**2)
        fit_cd = i.size >= MIN_MATCHES_FOR_CD
        wcs, crval_err = _fit_tan(
            src_xy[i, 0], src_xy[i, 1], ref_ra[j], ref_dec[j], w, header_wcs, fit_cd
        )
        de, dn = _residuals_arcsec(wcs, src_xy[i, 0], src_xy[i, 1], ref_ra[j], ref_dec[j])
        r = np.hypot(de, dn)
        rms = float(np.sqrt(np.mean(r * r)))
        if it == 2:
            break
        if it == 0:
            # Re-match everything through the fitted WCS.
            px, py = (np.asarray(v) for v in wcs.wcs_world2pix(ref_ra, ref_dec, 0))
            radius = max(5.0 * rms / scale, 0.5)
            i, j = _match(src_xy, np.column_stack([px, py]), min(radius, _MATCH_RADIUS_PX))
            i, j = _magnitude_consistent(i, j, flux[src_idx], ref_mag, exposure.info.exp_time_s)
        else:
            # Per-axis σ from the median of the (Rayleigh-distributed) 2-D residual.
            sigma = float(np.median(r)) / math.sqrt(2.0 * math.log(2.0))
            keep = r <= max(_CLIP_SIGMA * sigma, 0.02)
            i, j = i[keep], j[keep]
        if i.size < MIN_MATCHES:
            raise DetectorError(
                STAGE, f"only {i.size} matches survive clipping (need ≥ {MIN_MATCHES})"
            )

    # Offset of the fitted boresight (the header's CRPIX) from the commanded one.
    crpix0 = np.asarray(header_wcs.wcs.crpix, np.float64) - 1.0
    ra_h, dec_h = (float(v) for v in header_wcs.wcs_pix2world(crpix0[0], crpix0[1], 0))
    ra_f, dec_f = (float(v) for v in wcs.wcs_pix2world(crpix0[0], crpix0[1], 0))
    dra = (ra_f - ra_h + 180.0) % 360.0 - 180.0
    east = dra * math.cos(math.radians(dec_h)) * 3600.0
    north = (dec_f - dec_h) * 3600.0

    exposure.wcs = wcs
    ra_all, dec_all = wcs.wcs_pix2world(x, y, 0)
    sources["coord_ra"] = np.asarray(ra_all) % 360.0
    sources["coord_dec"] = np.asarray(dec_all)
    exposure.metadata["HIERARCH LDF ASTRMS"] = (round(rms, 4), "astrometric rms, arcsec")
    exposure.metadata["HIERARCH LDF ASTNMAT"] = (int(i.size), "astrometric matches")
    matches = np.column_stack([src_idx[i], ref_idx[j]]).astype(np.int64)
    return AstrometryResult(
        wcs=wcs,
        offset_east_arcsec=east,
        offset_north_arcsec=north,
        offset_err_arcsec=crval_err,
        rms_arcsec=rms,
        n_matched=int(i.size),
        matches=matches,
        refcat=refcat,
        vote_offset_px=(dx, dy),
    )


def _magnitude_consistent(
    i: np.ndarray, j: np.ndarray, flux: np.ndarray, ref_mag: np.ndarray, exp_time: float
) -> tuple[np.ndarray, np.ndarray]:
    """Drop pairs whose instrumental − catalogue magnitude is > 1 mag from the median."""
    if i.size < 3:
        return i, j
    with np.errstate(divide="ignore", invalid="ignore"):
        dm = ref_mag[j] + 2.5 * np.log10(flux[i] / max(exp_time, 1e-9))
    ok = np.isfinite(dm)
    if ok.sum() < 3:
        return i[ok], j[ok]
    med = float(np.median(dm[ok]))
    ok &= np.abs(dm - med) <= _MAG_WINDOW
    return i[ok], j[ok]
