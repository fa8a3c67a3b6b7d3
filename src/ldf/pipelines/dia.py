"""DIA sources: detection and measurement on a difference image, and forced photometry.

Detection
    Matched filtering (the likelihood-optimal detector of a point source in Gaussian noise;
    Kaiser 2004, "The likelihood of point sources in pixellated images", Pan-STARRS
    PSDC-002-010; Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27, §3): the difference
    image is correlated with its PSF — the rank-1 separable approximation from the SVD of the
    PSF image cropped to ±1.5 FWHM, two symmetric 1-D ``scipy.ndimage.correlate1d`` passes
    (≈ 0.16 s on a full-size detector; a 2-D FFT costs more). The S/N of a pixel is
    ``F / (c · √(Σφ² · V))`` with ``V`` the variance averaged under the filter and ``c`` an
    empirical noise scale — the robust standard deviation of the S/N map in blank sky, which
    corrects for the pixel-to-pixel correlations the convolution of the science image
    introduces (Rubin rescales its difference variance for the same reason). Local extrema of
    the filtered image with ``|S/N| ≥ threshold`` are peaks, positive and negative; peaks of
    one sign closer than one FWHM are one source, and a positive and a negative peak closer
    than 1.5 FWHM are one **dipole** (a mis-registered or moving source), measured together.
    A subtraction is never perfect around bright static sources (kernel and PSF-model errors,
    sub-pixel registration: measured, 0.2–1 % of a star's flux): as in the ``S_corr`` of
    Zackay, Ofek & Gal-Yam (2016, §3.3–3.4), that error — ``MATCHING_ERROR`` (0.5 %) of the
    brightest static flux at or near the source (:func:`_nearby_static_flux`) — is added in
    quadrature to the source's noise, and a source must pass the threshold with it
    (``snr`` is that corrected S/N; away from bright stars it is the matched filter's).
    What the threshold cannot remove is Gaussian noise: a 5σ threshold lets through
    ``A λ₂ (2π)^-3/2 u e^{-u²/2}`` peaks of each sign (Adler's Euler-characteristic density;
    ``λ₂`` the variance of the S/N map's gradient, 0.11–0.19 px⁻² for 0.4–0.9″ PSFs), 2–3.5
    per sign on a full-size detector.
Measurement
    A centroid from a parabola through the filtered image around the peak; the PSF flux by a
    linear fit of the PSF at that position (sub-pixel phase from a 0.1-pixel grid of shifted
    PSF images), with uniform weights so bright sources are unbiased by their own photon
    noise (optimal in the sky-dominated regime DIA lives in), its error propagated from the
    variance plane. Fluxes are in nJy through
    ``science.njy_per_electron()`` (the difference is in the science's electrons). The same
    fit at the same position on the science image gives ``scienceFlux`` and on the template
    ``templateFlux``; ``apFlux`` is the sum in a 12-pixel radius (the APDB definition). A dipole
    is two PSFs fitted together, their positions by ``scipy.optimize.least_squares`` with the
    fluxes solved linearly at each step (for a shift much smaller than the PSF only lobe flux
    × separation is constrained: ``dipoleMeanFlux · dipoleLength`` is the robust quantity);
    ``ixx``/``iyy``/``ixy`` are Gaussian-weighted second moments corrected for the weight
    (arcsec²), ``extendedness`` compares their trace with the PSF's.
Reliability
    Cosmic rays, hot pixels and subtraction artefacts are not PSF-shaped. The misfit of the PSF
    model beyond what noise explains, as a fraction of the source's own signal power,
    ``b = max(0, χ² − ν − 3√(2ν)) / (S/N)²``, is ≈ 0 for a point source of any brightness
    (a PSF model good to a few per cent leaves ``b ~ 10⁻³``), ≈ 3–10 for a cosmic ray (one
    pixel or a 1-pixel-wide track carries power the PSF cannot absorb) and ≳ 0.5 for the ring of
    a poor subtraction; it is computed over the PSF's core after dropping > 5σ outliers in its
    wings, so a cosmic ray *next to* a real source does not condemn it. The science image is
    checked too, for pixels within ±2 of the source sharper than its PSF allows — a cosmic ray
    or hot pixel, which in convolveScience mode the kernel has smeared into a nearly PSF-like
    blob in the difference (:func:`_sharpness`: the Laplacian's excess over the fitted PSF
    model's, ``s₁`` in σ, and over twice the largest Laplacian-to-intensity ratio the PSF can
    produce, ``s₂``; ``s₁`` allows the PSF model an error of 30 % of its Laplacian, which at
    0.4″ seeing, 2 pixels, is what a measured PSF and a sub-pixel centroid are good to). A
    cosmic-ray *track* that ISR masked only in part (its per-pixel threshold is 6σ; a track at
    3–5σ per pixel survives, and the convolveScience kernel smooths it into a ridge the matched
    filter finds at S/N 5–15) is a straight line through or ending at the source in the
    science image (:func:`_track`: the S/N along the two arms of the best line, ``t``); pixels
    the template explains are left out of it — a cosmic ray is in no template, while in a
    crowded field a neighbouring star's core, in sharp seeing as narrow as a track, lies
    along some line through most sources.
    ``reliability = 1 / (1 + (b / 0.3)²) / (1 + e²)`` with
    ``e = max(0, (s₁ − 5) / 2, s₂, (t − 3) / 0.5)``; sources below ``RELIABILITY_CUT`` (0.5:
    ``b > 0.3``, ``s₁ > 7``, ``s₂ > 1`` or ``t > 3.5``) are dropped, and so are sources centred on
    a pixel masked CR or BAD in the difference, or within 2 pixels of the science's CR pixels
    (reliability 0). This stands in for Rubin's machine-learned ``reliability`` with a
    physically motivated score.
Flags
    APDB ``pixelFlags_*`` from the difference's mask (the OR of science and template masks)
    in a box of ±1.5 FWHM (the footprint) and in the central 3×3 (``…Center``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

from ldf.pipelines.types import DetectorError, Exposure, Mask, PsfModel

__all__ = [
    "DIA_SOURCE_COLUMNS",
    "MATCHING_ERROR",
    "RELIABILITY_CUT",
    "detect_dia_sources",
    "forced_photometry",
]

RELIABILITY_CUT = 0.5
"""DiaSources with a lower ``reliability`` are dropped (see the module docstring)."""

MATCHING_ERROR = 0.005
"""Fraction of a static source's flux a PSF-matched subtraction leaves (see
:func:`_matching_factor`): added in quadrature to the noise of a DiaSource's S/N."""

_RELIABILITY_B0 = 0.3
_SHARP_MODEL_OK = 5.0
_SHARP_MODEL_SCALE = 2.0
_SHARP_MODEL_TOL = 0.3
"""Fraction of the PSF model's largest Laplacian allowed as model error (:func:`_sharpness`);
stars measured on 0.38–0.9″ science images: ≤ 0.3 at S/N > 100, 0.15 typical at 0.4″."""
_TRACK_OK = 3.0
_TRACK_SCALE = 0.5
_TRACK_R = (2, 12)
"""Arms of the track test (:func:`_track`): from this many pixels to this many."""
_TRACK_ANGLES = 24
_TRACK_TOL = 0.3
_TRACK_PIXEL_SNR = 2.0
_TRACK_NARROW = 0.4
_TRACK_END_PIXELS = 6
"""Pixels of one arm that must look like a track (> 2σ, one pixel wide) for a track end."""
_TRACK_STATIC_SIGMA = 2.0
_TRACK_STATIC_FRACTION = 0.2
"""A pixel the template explains is left out of the track test (:func:`_track`): template
above this many of its σ plus this fraction of the science residual. A star's core in the
template is ≥ 0.3 of the science's (the template's PSF is at most ~1.9× wider); noise in a
cosmic ray's pixels passes the cut with probability < 2.3 %."""
_APERTURE_RADIUS = 12.0
_PHASES = 11
_NO_DETECT = np.uint16(Mask.NO_DATA | Mask.EDGE | Mask.SAT | Mask.BAD | Mask.CR)
"""Pixels zeroed before detection: they carry no usable difference signal."""
_REJECT_CENTER = np.uint16(Mask.CR | Mask.BAD)

_FOOTPRINT_FLAGS = (
    ("pixelFlags_bad", Mask.BAD),
    ("pixelFlags_cr", Mask.CR),
    ("pixelFlags_edge", Mask.EDGE),
    ("pixelFlags_nodata", Mask.NO_DATA),
    ("pixelFlags_interpolated", Mask.INTRP),
    ("pixelFlags_saturated", Mask.SAT),
    ("pixelFlags_suspect", Mask.SUSPECT),
)
_CENTER_FLAGS = (
    ("pixelFlags_crCenter", Mask.CR),
    ("pixelFlags_nodataCenter", Mask.NO_DATA),
    ("pixelFlags_interpolatedCenter", Mask.INTRP),
    ("pixelFlags_saturatedCenter", Mask.SAT),
    ("pixelFlags_suspectCenter", Mask.SUSPECT),
)

DIA_SOURCE_COLUMNS = (
    "x",
    "y",
    "xErr",
    "yErr",
    "ra",
    "dec",
    "raErr",
    "decErr",
    "centroid_flag",
    "snr",
    "psfFlux",
    "psfFluxErr",
    "psfChi2",
    "psfNdata",
    "psfFlux_flag",
    "psfFlux_flag_edge",
    "psfFlux_flag_noGoodPixels",
    "apFlux",
    "apFluxErr",
    "apFlux_flag",
    "apFlux_flag_apertureTruncated",
    "scienceFlux",
    "scienceFluxErr",
    "forced_PsfFlux_flag",
    "forced_PsfFlux_flag_edge",
    "templateFlux",
    "templateFluxErr",
    "isNegative",
    "isDipole",
    "dipoleFitAttempted",
    "dipoleMeanFlux",
    "dipoleMeanFluxErr",
    "dipoleFluxDiff",
    "dipoleFluxDiffErr",
    "dipoleLength",
    "dipoleAngle",
    "dipoleChi2",
    "dipoleNdata",
    "ixx",
    "iyy",
    "ixy",
    "ixxPSF",
    "iyyPSF",
    "ixyPSF",
    "shape_flag",
    "extendedness",
    "reliability",
    "bboxSize",
    "band",
    "pixelFlags",
    *(name for name, _ in _FOOTPRINT_FLAGS),
    *(name for name, _ in _CENTER_FLAGS),
    "pixelFlags_offimage",
)
"""Columns of :func:`detect_dia_sources` (APDB ``DiaSource`` names)."""


# -- PSF helpers -----------------------------------------------------------------------------


@dataclass
class _PsfGrid:
    """A PSF image cropped to ±h pixels, shifted to a grid of sub-pixel phases."""

    stamps: np.ndarray
    """(n_phase, n_phase, 2h+1, 2h+1): stamps[iy, ix] centred at (dy, dx) = phase[iy], phase[ix]."""
    h: int
    sigma: float
    """Gaussian-equivalent width (pixels), for the moment weights."""

    def at(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """Stamps for sub-pixel offsets in [−0.5, 0.5] (nearest phase)."""
        ix = np.clip(np.rint((fx + 0.5) * (_PHASES - 1)).astype(np.int64), 0, _PHASES - 1)
        iy = np.clip(np.rint((fy + 0.5) * (_PHASES - 1)).astype(np.int64), 0, _PHASES - 1)
        return np.asarray(self.stamps[iy, ix])


def _psf_grid(psf: PsfModel, h: int) -> _PsfGrid:
    img = psf.stamp().astype(np.float64)
    n = img.shape[0]
    pad = max(0, h + 3 - n // 2)
    img = np.pad(img, pad)
    c = img.shape[0] // 2
    coef = ndi.spline_filter(img, order=3)
    phases = np.linspace(-0.5, 0.5, _PHASES)
    out = np.empty((_PHASES, _PHASES, 2 * h + 1, 2 * h + 1))
    for a, dy in enumerate(phases):
        for b, dx in enumerate(phases):
            shifted = ndi.shift(coef, (dy, dx), order=3, prefilter=False, mode="constant")
            out[a, b] = shifted[c - h : c + h + 1, c - h : c + h + 1]
    sigma = psf.fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return _PsfGrid(out, h, sigma)


def _separable(psf: PsfModel, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-1 separable approximation ``a ⊗ b`` of the PSF cropped to ±h (from its SVD).

    The factors are symmetrised: a point-symmetric PSF (any Moffat, elliptical or not) has
    even singular vectors, and ``correlate1d`` is fastest with symmetric weights. Returns the
    two factors (float32) and the approximation itself (the matched filter actually applied).
    """
    img = psf.stamp(2 * h + 1).astype(np.float64)
    u, s, vt = np.linalg.svd(img)
    a = u[:, 0] * math.sqrt(s[0])
    b = vt[0] * math.sqrt(s[0])
    if a.sum() < 0:
        a, b = -a, -b
    a = 0.5 * (a + a[::-1])
    b = 0.5 * (b + b[::-1])
    return a.astype(np.float32), b.astype(np.float32), np.outer(a, b)


def _padded(shape: tuple[int, int]) -> np.ndarray:
    """An empty float32 array whose rows are 64 values longer than ``shape`` says (a view).

    A power-of-two row length (E2V detectors are 4096 wide) makes column-wise filtering
    thrash the cache (2.5× slower); the padding breaks the stride's alignment.
    """
    ny, nx = shape
    return np.empty((ny, nx + 64), np.float32)[:, :nx]


def _matched_filter(image: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation of the image with ``a ⊗ b`` (two 1-D passes)."""
    tmp = _padded(image.shape)
    ndi.correlate1d(image, a, axis=0, mode="constant", output=tmp)
    out = _padded(image.shape)
    ndi.correlate1d(tmp, b, axis=1, mode="constant", output=out)
    return out


def _gather(
    image: np.ndarray, ix: np.ndarray, iy: np.ndarray, h: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2h+1, 2h+1) stamps around integer centres, and which stamp pixels are on the image."""
    stamps, inside = _gather_many((image,), ix, iy, h)
    return stamps[0], inside


def _gather_many(
    images: tuple[np.ndarray, ...], ix: np.ndarray, iy: np.ndarray, h: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Stamps of several same-shape images around the same centres (indices computed once)."""
    ny, nx = images[0].shape
    off = np.arange(-h, h + 1)
    yy = iy[:, None, None] + off[None, :, None]
    xx = ix[:, None, None] + off[None, None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    yc = np.clip(yy, 0, ny - 1)
    xc = np.clip(xx, 0, nx - 1)
    return [im[yc, xc] for im in images], inside


def _noise_scale(s_n: np.ndarray) -> float:
    """Robust standard deviation of S/N values (half the 16–84 % range), clipped to [0.7, 3]."""
    if s_n.size < 100:
        return 1.0
    lo, hi = np.percentile(s_n, [15.865, 84.135])
    return float(np.clip(0.5 * (hi - lo), 0.7, 3.0))


# -- detection -------------------------------------------------------------------------------


@dataclass
class _Peaks:
    ix: np.ndarray
    iy: np.ndarray
    filt: np.ndarray
    """Matched-filter value at the peak."""
    snr: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    centroid_flag: np.ndarray


def _find_peaks(
    filt: np.ndarray,
    variance: np.ndarray,
    kill: np.ndarray,
    sum_phi2: float,
    psf_sq: np.ndarray,
    scale: float,
    threshold: float,
) -> _Peaks:
    ny, nx = filt.shape
    # Candidates: first against a lower bound of the threshold (the smallest variance: one
    # cheap pass), then with each pixel's variance; 20 % below the final threshold so no peak
    # is lost to a noisy variance pixel (the PSF-averaged variance is used at peaks below).
    vmin = float(np.min(variance[::5, ::5][~kill[::5, ::5]], initial=np.inf))
    vmin = vmin if math.isfinite(vmin) and vmin > 0 else 0.0
    t_lo = np.float32(0.8 * threshold * scale * math.sqrt(sum_phi2 * vmin))
    iy, ix = np.nonzero(np.abs(filt) >= t_lo)
    k = (0.8 * threshold * scale) ** 2 * sum_phi2
    fc = filt[iy, ix].astype(np.float64)
    keep = fc * fc >= variance[iy, ix] * k
    keep &= (iy > 0) & (iy < ny - 1) & (ix > 0) & (ix < nx - 1)
    iy, ix = iy[keep], ix[keep]
    keep = ~kill[iy, ix]
    iy, ix = iy[keep], ix[keep]
    if iy.size:
        v = filt[iy, ix]
        a = np.abs(v)
        is_peak = np.ones(iy.size, bool)
        for oy, ox in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
            nb = filt[iy + oy, ix + ox]
            later = (oy, ox) > (0, 0)
            is_peak &= (a > np.abs(nb)) | ((a == np.abs(nb)) & later) | (np.sign(nb) != np.sign(v))
        iy, ix = iy[is_peak], ix[is_peak]
    # S/N with the variance averaged under the PSF.
    h = psf_sq.shape[0] // 2
    vst, inside = _gather(variance, ix, iy, h)
    vbar = np.sum(np.where(inside, vst, 0.0) * psf_sq, axis=(1, 2), dtype=np.float64) / np.maximum(
        np.sum(inside * psf_sq, axis=(1, 2)), 1e-12
    )
    fv = filt[iy, ix].astype(np.float64)
    snr = fv / (scale * np.sqrt(np.maximum(vbar * sum_phi2, 1e-30)))
    keep = np.abs(snr) >= threshold
    ix, iy, fv, snr = ix[keep], iy[keep], fv[keep], snr[keep]
    # Parabolic centroid on the filtered image.
    c = fv
    xm, xp = filt[iy, ix - 1].astype(np.float64), filt[iy, ix + 1].astype(np.float64)
    ym, yp = filt[iy - 1, ix].astype(np.float64), filt[iy + 1, ix].astype(np.float64)
    sgn = np.sign(c)
    den_x = sgn * (2 * c - xm - xp)
    den_y = sgn * (2 * c - ym - yp)
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.where(den_x > 0, sgn * (xp - xm) / (2 * den_x), 0.0)
        dy = np.where(den_y > 0, sgn * (yp - ym) / (2 * den_y), 0.0)
    bad = (den_x <= 0) | (den_y <= 0) | (np.abs(dx) > 0.5) | (np.abs(dy) > 0.5)
    dx = np.where(bad, 0.0, dx)
    dy = np.where(bad, 0.0, dy)
    return _Peaks(ix, iy, fv, snr, dx, dy, bad)


def _merge_same_sign(p: _Peaks, radius: float) -> _Peaks:
    """Keep the strongest peak of each sign within ``radius`` pixels."""
    if p.ix.size < 2:
        return p
    keep = np.ones(p.ix.size, bool)
    pos = np.stack([p.ix, p.iy], axis=1).astype(np.float64)
    tree = cKDTree(pos)
    order = np.argsort(-np.abs(p.snr), kind="stable")
    removed = np.zeros(p.ix.size, bool)
    for i in order.tolist():
        if removed[i]:
            continue
        for j in tree.query_ball_point(pos[i], r=radius):
            if j != i and not removed[j] and np.sign(p.snr[j]) == np.sign(p.snr[i]):
                removed[j] = True
                keep[j] = False
    return _Peaks(*(getattr(p, f)[keep] for f in p.__dataclass_fields__))


def _pair_dipoles(p: _Peaks, radius: float) -> list[tuple[int, int]]:
    """(positive, negative) peak index pairs closer than ``radius``, closest first."""
    posi = np.flatnonzero(p.snr > 0)
    negi = np.flatnonzero(p.snr < 0)
    if posi.size == 0 or negi.size == 0:
        return []
    tree = cKDTree(np.stack([p.ix[negi], p.iy[negi]], axis=1).astype(np.float64))
    pairs: list[tuple[float, int, int]] = []
    for i in posi.tolist():
        pt = (float(p.ix[i] + p.dx[i]), float(p.iy[i] + p.dy[i]))
        for j in tree.query_ball_point(pt, r=radius):
            k = int(negi[j])
            d = math.hypot(p.ix[k] + p.dx[k] - pt[0], p.iy[k] + p.dy[k] - pt[1])
            pairs.append((d, i, k))
    pairs.sort()
    used: set[int] = set()
    out: list[tuple[int, int]] = []
    for _, i, k in pairs:
        if i in used or k in used:
            continue
        used.update((i, k))
        out.append((i, k))
    return out


# -- measurement -----------------------------------------------------------------------------


@dataclass
class _Fit:
    flux: np.ndarray
    err: np.ndarray
    chi2: np.ndarray
    ndata: np.ndarray
    edge: np.ndarray
    no_good: np.ndarray
    chi2_core: np.ndarray
    ndata_core: np.ndarray


def _psf_fit(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    grid: _PsfGrid,
    x: np.ndarray,
    y: np.ndarray,
    scale: float = 1.0,
) -> _Fit:
    """Uniform-weight linear PSF flux at fixed positions (image units).

    Pixels in the PSF's wings (below 10 % of its peak) that deviate by more than 5σ from the
    first fit — a cosmic ray or a neighbour's core, not this source — are dropped and the fit
    repeated. ``chi2`` is over the whole stamp, ``chi2_core``/``ndata_core`` over the core
    (PSF ≥ 10 % of its peak), where a cosmic ray at the peak shows and a neighbour does not.
    """
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    phi = grid.at(x - ix, y - iy)
    planes = (image, variance) if mask is None else (image, variance, mask)
    stamps, inside = _gather_many(planes, ix, iy, grid.h)
    d, v = stamps[0], stamps[1]
    w = inside.astype(np.float64)
    if mask is not None:
        w *= (stamps[2] & np.uint16(Mask.NO_DATA)) == 0
    d = d.astype(np.float64)
    v = np.maximum(v.astype(np.float64), 1e-12)
    full = np.sum(phi * phi, axis=(1, 2))
    core = phi >= 0.1 * phi.max(axis=(1, 2), keepdims=True)
    flux = np.zeros(len(ix))
    pp = np.zeros(len(ix))
    for it in range(2):
        pp = np.sum(w * phi * phi, axis=(1, 2))
        flux = np.sum(w * phi * d, axis=(1, 2)) / np.maximum(pp, 1e-30)
        if it == 0:
            z = (d - flux[:, None, None] * phi) / np.sqrt(v)
            w = w * ~(~core & (np.abs(z) > 5.0))
    safe = np.maximum(pp, 1e-30)
    err = np.sqrt(np.sum(w * phi * phi * v, axis=(1, 2))) / safe * scale
    r2 = w * (d - flux[:, None, None] * phi) ** 2 / v
    chi2 = r2.sum(axis=(1, 2))
    chi2_core = np.where(core, r2, 0.0).sum(axis=(1, 2))
    ndata = w.sum(axis=(1, 2))
    ndata_core = (w * core).sum(axis=(1, 2))
    no_good = pp < 0.5 * full
    flux = np.where(no_good, np.nan, flux)
    err = np.where(no_good, np.nan, err)
    return _Fit(
        flux,
        err,
        chi2,
        ndata.astype(np.int64),
        ~inside.all(axis=(1, 2)),
        no_good,
        chi2_core,
        ndata_core.astype(np.int64),
    )


def _moments(
    stamps: np.ndarray, x_off: np.ndarray, y_off: np.ndarray, sigma_w: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-weighted second moments corrected for the weight, pixels² (and a fail flag)."""
    _n, s, _ = stamps.shape
    h = s // 2
    off = np.arange(-h, h + 1, dtype=np.float64)
    dx = off[None, None, :] - x_off[:, None, None]
    dy = off[None, :, None] - y_off[:, None, None]
    wgt = np.exp(-0.5 * (dx * dx + dy * dy) / sigma_w**2) * stamps
    norm = wgt.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        mxx = (wgt * dx * dx).sum(axis=(1, 2)) / norm
        myy = (wgt * dy * dy).sum(axis=(1, 2)) / norm
        mxy = (wgt * dx * dy).sum(axis=(1, 2)) / norm
        # Weighted moments of a Gaussian of covariance C are (C⁻¹ + W⁻¹)⁻¹: invert that.
        det = mxx * myy - mxy * mxy
        ixx_i, iyy_i, ixy_i = myy / det, mxx / det, -mxy / det
        w_inv = 1.0 / sigma_w**2
        axx, ayy, axy = ixx_i - w_inv, iyy_i - w_inv, ixy_i
        det_a = axx * ayy - axy * axy
        ok = (norm > 0) & (det > 0) & (axx > 0) & (ayy > 0) & (det_a > 0)
        ixx = np.where(ok, ayy / det_a, np.nan)
        iyy = np.where(ok, axx / det_a, np.nan)
        ixy = np.where(ok, -axy / det_a, np.nan)
    return ixx, iyy, ixy, ~ok


def _sharpness(
    image: np.ndarray,
    variance: np.ndarray,
    grid: _PsfGrid,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Two measures of how much sharper than its PSF the science image is near positions.

    Both use the discrete Laplacian ``L = I − ¼ Σ 4-neighbours`` over the 5×5 pixels around
    each position and its noise ``σ_L`` (van Dokkum 2001's cosmic-ray statistic):

    * ``model``: the largest excess of ``L`` over the Laplacian of the PSF model scaled to
      ``flux`` (the science PSF flux there), in units of its noise plus the model's own error
      (``_SHARP_MODEL_TOL`` of the model's largest Laplacian: a PSF model and a sub-pixel
      centroid are good to that much; without it a 0.4″ PSF, 2 pixels, gives real sources of
      S/N > 100 an excess of 8–15 σ) — ≲ 4 for a point source, tens for a cosmic ray or hot
      pixel;
    * ``ratio``: the largest ``(L − 2κ max(I, 0)) / σ_L`` over pixels with ``L > 5σ_L``, where
      κ is the largest ``L / I`` the PSF model produces (its peak pixel at the most
      favourable phase); independent of the fitted flux, which a bright cosmic ray inflates.
      −inf where no pixel qualifies.
    """
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    (d, v), inside = _gather_many((image, variance), ix, iy, 3)
    ok = inside[:, 1:-1, 1:-1].all(axis=(1, 2))
    d = np.where(inside, d, 0.0).astype(np.float64)
    v = np.where(inside, v, np.inf).astype(np.float64)
    c = grid.h

    def lap(a: np.ndarray) -> np.ndarray:
        return a[..., 1:-1, 1:-1] - 0.25 * (
            a[..., :-2, 1:-1] + a[..., 2:, 1:-1] + a[..., 1:-1, :-2] + a[..., 1:-1, 2:]
        )

    noise = np.sqrt(
        v[:, 1:-1, 1:-1]
        + (v[:, :-2, 1:-1] + v[:, 2:, 1:-1] + v[:, 1:-1, :-2] + v[:, 1:-1, 2:]) / 16.0
    )
    lap_d = lap(d)
    phi = grid.at(x - ix, y - iy)[:, c - 3 : c + 4, c - 3 : c + 4]
    lap_m = lap(phi * np.nan_to_num(flux)[:, None, None])
    # The PSF model's own error: a fraction of its Laplacian (see _SHARP_MODEL_TOL).
    allow = _SHARP_MODEL_TOL * np.abs(lap_m).max(axis=(1, 2))
    model = (lap_d - lap_m) / np.sqrt(noise * noise + (allow * allow)[:, None, None])
    core = grid.stamps[..., c - 1 : c + 2, c - 1 : c + 2]
    kappa = float(np.max(lap(core)[..., 0, 0] / np.maximum(core[..., 1, 1], 1e-30)))
    ratio = (lap_d - 2.0 * kappa * np.maximum(d[:, 1:-1, 1:-1], 0.0)) / noise
    sharp = np.isfinite(noise) & (lap_d > 5.0 * noise)
    s_model = np.where(ok, np.where(np.isfinite(noise), model, -np.inf).max(axis=(1, 2)), -np.inf)
    s_ratio = np.where(sharp, ratio, -np.inf).max(axis=(1, 2))
    return np.asarray(s_model), np.asarray(s_ratio)


def _track_offsets(r0: int, r1: int, n_angles: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (dx, dy) of the track test's arms, (n_angles, 3, 2, r1 − r0 + 1) each.

    For each direction θ (``n_angles`` over 180°), three parallel lines one pixel apart
    (a track need not pass through the source's centroid to the pixel), each split into the
    two arms at distances ``r0 … r1`` on either side of the source.
    """
    ang = np.arange(n_angles) * math.pi / n_angles
    r = np.arange(r0, r1 + 1, dtype=np.float64)
    side = np.array([1.0, -1.0])
    perp = np.array([-1.0, 0.0, 1.0])
    c, s = np.cos(ang)[:, None, None, None], np.sin(ang)[:, None, None, None]
    along = side[None, None, :, None] * r[None, None, None, :]
    across = perp[None, :, None, None]
    return along * c - across * s, along * s + across * c


def _track(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    grid: _PsfGrid,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    static: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> np.ndarray:
    """How strongly a straight line runs through each position in the science image (σ).

    A cosmic ray crossing the CCD at an angle leaves a one-pixel-wide track tens of pixels
    long; ISR finds its bright pixels (``CR``) but pixels below its per-pixel threshold stay,
    and in convolveScience mode the kernel smooths them into a ridge the PSF-shaped matched
    filter picks up at S/N 5–15 (the source's own PSF misfit is small: the ridge *is*
    smooth). A point source has no such line. The statistic: the fitted PSF model (``flux``
    at ``x, y``) is subtracted from the science image and, for each direction and each of
    three parallel lines, the signal-to-noise of the sum along each of the two *arms*
    (``_TRACK_R`` pixels from the source, on opposite sides) is computed, with the PSF
    model's error allowed for (``_TRACK_TOL`` of the model's sum there), CR-masked pixels left
    out. The result is the largest, over lines, of the *smaller* arm — both arms must carry
    the line, so a neighbouring star (on one side) does not count — or of an arm that
    reaches a CR-masked pixel: the source then sits on the unmasked end of a track ISR found
    in part, and the pixels between carry the track. For noise alone it is ≳ 3 with
    probability ~10⁻⁴; a track at 3 σ per pixel gives ~10. A wholly unmasked track *ending* at
    the source has one arm only: it is recognised by its pixels — at least
    ``_TRACK_END_PIXELS`` of the arm's 11 above 2σ and one pixel wide (the residual two pixels
    across below 40 % of theirs) — and scores +inf (noise: ~10⁻⁹ per arm; a star's core covers
    three or four of them, its wings are not that narrow). Positions off the image get −inf.

    ``static`` — the template on the science grid (image, variance, and the factor that
    turns its units into the science's electrons) — leaves out the pixels a *static* source
    explains: where the template holds more than ``_TRACK_STATIC_SIGMA`` of its own noise plus
    ``_TRACK_STATIC_FRACTION`` of the science residual. A cosmic ray is in no template; a
    neighbouring star is, and in a crowded field (a star within 12 pixels of most sources)
    its core along an arm — a few pixels, as narrow as a track in sharp seeing — would
    otherwise complete a "track" with the source's own residual and condemn a real transient.
    """
    n = x.size
    if n == 0:
        return np.zeros(0)
    r0, r1 = _TRACK_R
    h = r1 + 2
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    (d, v, m), inside = _gather_many((image, variance, mask), ix, iy, h)
    c = grid.h
    k = min(c, h)
    phi = grid.at(x - ix, y - iy)[:, c - k : c + k + 1, c - k : c + k + 1]
    model = np.zeros((n, 2 * h + 1, 2 * h + 1))
    model[:, h - k : h + k + 1, h - k : h + k + 1] = phi * np.nan_to_num(flux)[:, None, None]
    unusable = np.uint16(Mask.NO_DATA | Mask.SAT | Mask.BAD | Mask.EDGE | Mask.CR)
    w = inside & ((m & unusable) == 0)
    raw = d.astype(np.float64) - model
    if static is not None:
        (t_img, t_var), _ = _gather_many(static[:2], ix, iy, h)
        t_img = t_img.astype(np.float64) * static[2]
        t_sig = np.sqrt(np.maximum(t_var.astype(np.float64), 0.0)) * static[2]
        w &= ~(t_img > _TRACK_STATIC_SIGMA * t_sig + _TRACK_STATIC_FRACTION * np.maximum(raw, 0.0))
    resid = np.where(w, raw, 0.0)
    var = np.where(w, v.astype(np.float64), 0.0)
    amod = np.where(w, np.abs(model), 0.0)
    is_cr = inside & ((m & np.uint16(Mask.CR)) != 0)
    odx, ody = _track_offsets(r0, r1, _TRACK_ANGLES)
    qx = np.rint(odx[None] + (x - ix)[:, None, None, None, None]).astype(np.int64) + h
    qy = np.rint(ody[None] + (y - iy)[:, None, None, None, None]).astype(np.int64) + h
    qx = np.clip(qx, 0, 2 * h)
    qy = np.clip(qy, 0, 2 * h)
    src = np.arange(n)[:, None, None, None, None]
    signal = resid[src, qy, qx].sum(axis=-1)
    noise2 = var[src, qy, qx].sum(axis=-1) + (_TRACK_TOL * amod[src, qy, qx].sum(axis=-1)) ** 2
    used = w[src, qy, qx].sum(axis=-1)
    arm = np.where(used >= 3, signal / np.sqrt(np.maximum(noise2, 1e-30)), 0.0)
    through = arm.min(axis=-1).reshape(n, -1).max(axis=1)
    # An arm that reaches a CR-masked pixel continues a track ISR found in part: one is enough.
    reaches_cr = is_cr[src, qy, qx].any(axis=-1)
    to_cr = np.where(reaches_cr, arm, -np.inf).reshape(n, -1).max(axis=1)
    # A track ending at the source, unmasked: pixels along one arm that are significant and
    # a line's width (two pixels across, the residual falls below 40 % of theirs; a star's
    # profile does not, or covers only a few pixels of the arm).
    px, py = _track_perpendicular(_TRACK_ANGLES)
    on = resid[src, qy, qx]
    beside = np.zeros_like(on)
    for sign in (1.0, -1.0):
        bx = np.clip(np.rint(qx + sign * 2.0 * px).astype(np.int64), 0, 2 * h)
        by = np.clip(np.rint(qy + sign * 2.0 * py).astype(np.int64), 0, 2 * h)
        beside += 0.5 * resid[src, by, bx]
    line = (
        w[src, qy, qx]
        & (on * on > _TRACK_PIXEL_SNR**2 * var[src, qy, qx])
        & (on > 0)
        & (beside < _TRACK_NARROW * on)
    )
    pixels = line.sum(axis=-1).reshape(n, -1).max(axis=1)
    ending = np.where(pixels >= _TRACK_END_PIXELS, np.inf, -np.inf)
    best = np.maximum(np.maximum(through, to_cr), ending)
    return np.where(inside[:, h, h], best, -np.inf)


def _track_perpendicular(n_angles: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vector across each direction of :func:`_track_offsets`, broadcastable to it."""
    ang = np.arange(n_angles) * math.pi / n_angles
    return -np.sin(ang)[None, :, None, None, None], np.cos(ang)[None, :, None, None, None]


def _nearby_static_flux(
    reference: Exposure, x: np.ndarray, y: np.ndarray, fwhm: float
) -> np.ndarray:
    """Flux of the brightest static source near each position, down-weighted with distance.

    ``max_p I(p) · exp(−d_p² / 2σ_w²) / φ_peak`` over the reference image (the template: what
    does not vary) within ``2σ_w`` pixels, ``σ_w = 2.5 FWHM`` of the difference's PSF: a
    kernel error moves a star's light by up to a kernel's width plus the star's own extent,
    which is where its residual rings lie. In the reference's units.
    """
    assert reference.psf is not None
    if x.size == 0:
        return np.zeros(0)
    sigma_w = 2.5 * fwhm
    r = math.ceil(2.0 * sigma_w)
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    stamps, inside = _gather(reference.image, ix, iy, r)
    off = np.arange(-r, r + 1, dtype=np.float64)
    d2 = (off[None, None, :] - (x - ix)[:, None, None]) ** 2 + (
        off[None, :, None] - (y - iy)[:, None, None]
    ) ** 2
    weight = np.exp(-0.5 * d2 / sigma_w**2)
    peak = np.where(inside, np.maximum(stamps, 0.0), 0.0) * weight
    phi_peak = float(reference.psf.stamp().max())
    return np.asarray(peak.max(axis=(1, 2)) / max(phi_peak, 1e-12))


def _matching_factor(flux_err: np.ndarray, static: np.ndarray) -> np.ndarray:
    """``σ / √(σ² + (η F)²)``: the S/N's scaling for the PSF matching's error.

    No subtraction is perfect: a static source of flux ``F`` leaves a residual of a fraction
    of ``F`` — kernel and PSF-model errors, sub-pixel registration — at its position and in
    rings around it. Measured at the catalogue stars of full-size 0.38–0.9″ science images
    against 0.65″ templates, that residual's PSF flux is 0.2 % of the star's (median), 0.55 %
    (90th percentile), 1 % at most. ``F`` is the largest of the science and template PSF
    fluxes at the source and the nearby static flux (:func:`_nearby_static_flux`); with
    ``η = MATCHING_ERROR`` (0.5 %) added in quadrature to the source's noise, as the "source
    noise" and astrometric terms of Zackay, Ofek & Gal-Yam (2016, ApJ 830, 27, §3.3–3.4) are
    for their ``S_corr``, such residuals fall below any threshold, while a variable star
    changing by ≳ 3 % stays significant. Away from bright stars the factor is 1.
    """
    err = np.nan_to_num(flux_err, nan=np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = err / np.sqrt(err * err + (MATCHING_ERROR * static) ** 2)
    return np.where(np.isfinite(f), f, 1.0)


def _reliability(chi2: np.ndarray, ndata: np.ndarray, snr2: np.ndarray) -> np.ndarray:
    nu = np.maximum(ndata - 1, 1).astype(np.float64)
    excess = np.maximum(0.0, chi2 - nu - 3.0 * np.sqrt(2.0 * nu))
    b = excess / np.maximum(snr2, 1.0)
    rel = 1.0 / (1.0 + (b / _RELIABILITY_B0) ** 2)
    return np.where(np.isfinite(rel), rel, 0.0)


def _flags(mask: np.ndarray, ix: np.ndarray, iy: np.ndarray, h: int) -> dict[str, np.ndarray]:
    fp, inside = _gather(mask, ix, iy, h)
    fp = np.where(inside, fp, np.uint16(0))
    out: dict[str, np.ndarray] = {}
    any_fp = np.bitwise_or.reduce(np.bitwise_or.reduce(fp, axis=2), axis=1)
    for name, plane in _FOOTPRINT_FLAGS:
        out[name] = (any_fp & np.uint16(plane)) != 0
    out["pixelFlags_edge"] |= ~inside.all(axis=(1, 2))
    c = h
    center = fp[:, c - 1 : c + 2, c - 1 : c + 2]
    any_c = np.bitwise_or.reduce(np.bitwise_or.reduce(center, axis=2), axis=1)
    for name, plane in _CENTER_FLAGS:
        out[name] = (any_c & np.uint16(plane)) != 0
    out["_reject_center"] = (any_c & _REJECT_CENTER) != 0
    return out


def _validate(difference: Exposure, science: Exposure, template: Exposure | None) -> None:
    where = f"{science.info.detector} of visit {science.info.exposure_id}"
    if difference.psf is None:
        raise DetectorError("dia", f"the difference image of {where} has no PSF")
    if science.psf is None or science.wcs is None or science.zero_point is None:
        raise DetectorError("dia", f"{where} lacks a PSF, WCS or zero point")
    if difference.shape != science.shape:
        raise DetectorError(
            "dia", f"difference {difference.shape} and science {science.shape} differ in shape"
        )
    if template is not None and (template.shape != science.shape or template.psf is None):
        raise DetectorError(
            "dia", f"the template of {where} is not on the science grid or has no PSF"
        )


def detect_dia_sources(
    difference: Exposure,
    science: Exposure,
    template: Exposure | None = None,
    *,
    threshold: float = 5.0,
    min_reliability: float = RELIABILITY_CUT,
) -> pd.DataFrame:
    """Detect and measure DiaSources on a difference image.

    Parameters
    ----------
    difference
        Difference image (science electrons, PSF set), e.g.
        :attr:`ldf.pipelines.diffim.DifferenceResult.difference`.
    science
        The science exposure (WCS, PSF, zero point): positions, nJy and ``scienceFlux``.
    template
        The warped template (for ``templateFlux``), optional.
    threshold
        Detection threshold on the matched-filter |S/N|.
    min_reliability
        Sources with a lower ``reliability`` are dropped; 0 keeps every detection (those
        centred on a CR or BAD pixel too, with reliability 0).

    Returns
    -------
    pandas.DataFrame
        One row per DiaSource with :data:`DIA_SOURCE_COLUMNS` (APDB names; fluxes in nJy,
        positions in pixels and degrees, moments in arcsec², ``dipoleLength`` in arcsec).
        Identifiers, visit and times are the association stage's to add.

    Raises
    ------
    DetectorError
        Missing PSF, WCS or zero point, or images of different shapes.
    """
    _validate(difference, science, template)
    psf = difference.psf
    assert psf is not None
    assert science.psf is not None
    assert science.wcs is not None
    fwhm = psf.fwhm_px
    h_det = max(3, math.ceil(1.5 * fwhm))
    fa, fb, filt_psf = _separable(psf, h_det)
    sum_phi2 = float(np.sum(filt_psf**2))
    psf_sq = filt_psf**2

    kill = (difference.mask & _NO_DETECT) != 0
    det = _padded(difference.shape)
    np.copyto(det, difference.image, casting="same_kind")
    det[kill] = 0.0
    filt = _matched_filter(det, fa, fb)
    variance = difference.variance
    # Noise scale from blank sky (every 7th pixel, unmasked).
    sub = (slice(h_det, -h_det, 7), slice(h_det, -h_det, 7))
    fs, vs, ks = filt[sub], variance[sub], kill[sub]
    good = ~ks & (vs > 0)
    scale = _noise_scale(fs[good] / np.sqrt(vs[good] * sum_phi2))
    peaks = _find_peaks(filt, variance, kill, sum_phi2, psf_sq, scale, threshold)
    del filt, det
    peaks = _merge_same_sign(peaks, fwhm)
    pairs = _pair_dipoles(peaks, 1.5 * fwhm)
    in_pair = np.zeros(peaks.ix.size, bool)
    for i, k in pairs:
        in_pair[i] = in_pair[k] = True
    single = np.flatnonzero(~in_pair)

    njy = science.njy_per_electron()
    h_fit = max(4, math.ceil(2.0 * fwhm))
    grid = _psf_grid(psf, h_fit)
    sci_grid = grid if science.psf is psf else _psf_grid(science.psf, h_fit)
    tmpl_grid = None
    if template is not None:
        assert template.psf is not None
        tmpl_grid = _psf_grid(template.psf, h_fit)

    rows = _measure_singles(difference, peaks, single, grid, scale, h_fit)
    rows_d = _measure_dipoles(difference, peaks, pairs, grid, psf, scale, h_fit)
    table = {k: np.concatenate([rows[k], rows_d[k]]) for k in rows}
    n = table["x"].size
    n_single = rows["x"].size
    x, y = table["x"], table["y"]

    # Forced fluxes on the science and template images.
    sfit = _psf_fit(science.image, science.variance, science.mask, sci_grid, x, y)
    table["scienceFlux"] = sfit.flux * njy
    table["scienceFluxErr"] = sfit.err * njy
    table["forced_PsfFlux_flag"] = sfit.no_good
    table["forced_PsfFlux_flag_edge"] = sfit.edge
    # A cosmic ray or hot pixel in the science image is sharper than its PSF allows (in
    # convolveScience mode the kernel has smeared it in the difference, so look here).
    # For dipoles, at the positive lobe: where the science has its source.
    xs, ys, fs = x.copy(), y.copy(), sfit.flux
    if rows_d["x"].size:
        xs[n_single:], ys[n_single:] = rows_d["_xp"], rows_d["_yp"]
        lobe = _psf_fit(
            science.image, science.variance, science.mask, sci_grid, xs[n_single:], ys[n_single:]
        )
        fs = np.concatenate([sfit.flux[:n_single], lobe.flux])
    s_model, s_ratio = _sharpness(science.image, science.variance, sci_grid, xs, ys, fs)
    excess = np.maximum(
        np.maximum(0.0, s_model - _SHARP_MODEL_OK) / _SHARP_MODEL_SCALE, np.maximum(0.0, s_ratio)
    )
    # A cosmic-ray track ISR left (partly) unmasked: a line through the source in the science.
    # Pixels a static source (in the template) explains are no track: crowded fields.
    static = None
    if template is not None:
        static = (
            template.image,
            template.variance,
            template.njy_per_electron() / science.njy_per_electron(),
        )
    track = _track(science.image, science.variance, science.mask, sci_grid, xs, ys, fs, static)
    track = np.where(table["psfFlux"] > 0, track, -np.inf)
    excess = np.maximum(excess, np.maximum(0.0, track - _TRACK_OK) / _TRACK_SCALE)
    table["reliability"] = table["reliability"] / (1.0 + excess**2)
    if template is not None and tmpl_grid is not None:
        tfit = _psf_fit(template.image, template.variance, template.mask, tmpl_grid, x, y)
        tnjy = template.njy_per_electron()
        table["templateFlux"] = tfit.flux * tnjy
        table["templateFluxErr"] = tfit.err * tnjy
    else:
        table["templateFlux"] = np.full(n, np.nan)
        table["templateFluxErr"] = np.full(n, np.nan)
    for key in ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr"):
        table[key] = table[key] * njy
    for key in ("dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleFluxDiffErr"):
        table[key] = table[key] * njy
    # Significance with the PSF matching's own error on the static sources around it.
    static = np.fmax(
        np.abs(np.nan_to_num(table["scienceFlux"])), np.abs(np.nan_to_num(table["templateFlux"]))
    )
    reference = template if template is not None else science
    assert reference.psf is not None
    nearby = _nearby_static_flux(reference, x, y, fwhm) * reference.njy_per_electron()
    table["snr"] = table["snr"] * _matching_factor(table["psfFluxErr"], np.fmax(static, nearby))
    significant = np.abs(table["snr"]) >= threshold

    # Shapes (arcsec²) of the source and of the PSF.
    pix2 = science.pixel_scale_arcsec**2
    for key in ("ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF"):
        table[key] = table[key] * pix2
    trace = table["ixx"] + table["iyy"]
    trace_psf = table["ixxPSF"] + table["iyyPSF"]
    with np.errstate(invalid="ignore", divide="ignore"):
        ext = np.clip((trace / trace_psf - 1.0) / 0.5, 0.0, 1.0)
    table["extendedness"] = ext

    # Sky positions.
    if n:
        ra, dec = science.wcs.all_pix2world(x, y, 0)
    else:
        ra = dec = np.zeros(0)
    table["ra"] = np.asarray(ra, np.float64)
    table["dec"] = np.asarray(dec, np.float64)
    scale_deg = science.pixel_scale_arcsec / 3600.0
    table["raErr"] = table["xErr"] * scale_deg
    table["decErr"] = table["yErr"] * scale_deg
    if rows_d["x"].size:
        table["dipoleAngle"][n_single:] = _bearing(science, rows_d)

    # Flags.
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    flags = _flags(difference.mask, ix, iy, max(2, math.ceil(1.5 * fwhm)))
    reject_center = flags.pop("_reject_center")
    # ISR masks a cosmic ray's bright pixels and may leave a faint one or two between or
    # beside them: a source whose centre is within 2 pixels of the science's CR pixels is
    # the remainder of a cosmic ray (or too close to one to be measured).
    cr_box, cr_in = _gather(science.mask, ix, iy, 2)
    reject_center |= (np.where(cr_in, cr_box, 0) & np.uint16(Mask.CR)).any(axis=(1, 2))
    table.update(flags)
    ny, nx = science.shape
    table["pixelFlags_offimage"] = (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
    table["pixelFlags"] = np.zeros(n, bool)
    table["reliability"] = np.where(reject_center, 0.0, table["reliability"])
    table["band"] = np.full(n, science.info.band or "", dtype=object)

    frame = pd.DataFrame({k: _typed(k, table[k]) for k in DIA_SOURCE_COLUMNS})
    frame = frame[significant & (frame["reliability"].to_numpy() >= min_reliability)]
    return frame.sort_values(["y", "x"], kind="stable").reset_index(drop=True)


_INT_COLUMNS = frozenset({"psfNdata", "dipoleNdata", "bboxSize"})
_BOOL_COLUMNS = frozenset(
    {
        "centroid_flag",
        "psfFlux_flag",
        "psfFlux_flag_edge",
        "psfFlux_flag_noGoodPixels",
        "apFlux_flag",
        "apFlux_flag_apertureTruncated",
        "forced_PsfFlux_flag",
        "forced_PsfFlux_flag_edge",
        "isNegative",
        "isDipole",
        "dipoleFitAttempted",
        "shape_flag",
        "pixelFlags",
        "pixelFlags_offimage",
        *(name for name, _ in _FOOTPRINT_FLAGS),
        *(name for name, _ in _CENTER_FLAGS),
    }
)


def _typed(name: str, values: np.ndarray) -> np.ndarray:
    if name in _BOOL_COLUMNS:
        return np.asarray(values).astype(bool)
    if name in _INT_COLUMNS:
        return np.asarray(values).astype(np.int64)
    if name == "band":
        return values
    return np.asarray(values, np.float64)


def _empty_rows() -> dict[str, np.ndarray]:
    keys = [
        "x",
        "y",
        "xErr",
        "yErr",
        "centroid_flag",
        "snr",
        "psfFlux",
        "psfFluxErr",
        "psfChi2",
        "psfNdata",
        "psfFlux_flag",
        "psfFlux_flag_edge",
        "psfFlux_flag_noGoodPixels",
        "apFlux",
        "apFluxErr",
        "apFlux_flag",
        "apFlux_flag_apertureTruncated",
        "isNegative",
        "isDipole",
        "dipoleFitAttempted",
        "dipoleMeanFlux",
        "dipoleMeanFluxErr",
        "dipoleFluxDiff",
        "dipoleFluxDiffErr",
        "dipoleLength",
        "dipoleAngle",
        "dipoleChi2",
        "dipoleNdata",
        "ixx",
        "iyy",
        "ixy",
        "ixxPSF",
        "iyyPSF",
        "ixyPSF",
        "shape_flag",
        "reliability",
        "bboxSize",
    ]
    return {k: np.zeros(0) for k in keys}


def _aperture(
    image: np.ndarray, variance: np.ndarray, x: np.ndarray, y: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = _APERTURE_RADIUS
    h = math.ceil(r) + 1
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    (d, v), inside = _gather_many((image, variance), ix, iy, h)
    off = np.arange(-h, h + 1, dtype=np.float64)
    dx = off[None, None, :] - (x - ix)[:, None, None]
    dy = off[None, :, None] - (y - iy)[:, None, None]
    inap = dx * dx + dy * dy <= r * r
    truncated = (inap & ~inside).any(axis=(1, 2))
    sel = inap & inside
    flux = np.sum(np.where(sel, d, 0.0), axis=(1, 2), dtype=np.float64)
    err = np.sqrt(np.sum(np.where(sel, v, 0.0), axis=(1, 2), dtype=np.float64)) * scale
    return flux, err, truncated


def _measure_singles(
    diff: Exposure, p: _Peaks, idx: np.ndarray, grid: _PsfGrid, scale: float, h_fit: int
) -> dict[str, np.ndarray]:
    n = idx.size
    if n == 0:
        return _empty_rows()
    x = p.ix[idx] + p.dx[idx]
    y = p.iy[idx] + p.dy[idx]
    fit = _psf_fit(diff.image, diff.variance, diff.mask, grid, x, y, scale)
    ap, ap_err, trunc = _aperture(diff.image, diff.variance, x, y, scale)
    snr_fit = np.where(np.isfinite(fit.flux), fit.flux / np.maximum(fit.err / scale, 1e-30), 0.0)
    rel = _reliability(fit.chi2_core, fit.ndata_core, snr_fit**2)
    rel = np.where(fit.no_good, 0.0, rel)
    # Shapes: the source (sign-corrected) and the PSF at the same phase.
    ixi, iyi = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    d, inside = _gather(diff.image, ixi, iyi, h_fit)
    sign = np.where(p.snr[idx] < 0, -1.0, 1.0)
    stamps = np.where(inside, d, 0.0) * sign[:, None, None]
    fx, fy = x - ixi, y - iyi
    ixx, iyy, ixy, shape_bad = _moments(stamps, fx, fy, grid.sigma)
    pxx, pyy, pxy, _ = _moments(grid.at(fx, fy), fx, fy, grid.sigma)
    sig_c = math.sqrt(2.0) * grid.sigma / np.maximum(np.abs(p.snr[idx]), 1e-9)
    nan = np.full(n, np.nan)
    false = np.zeros(n, bool)
    return {
        "x": x,
        "y": y,
        "xErr": sig_c,
        "yErr": sig_c,
        "centroid_flag": p.centroid_flag[idx],
        "snr": p.snr[idx],
        "psfFlux": fit.flux,
        "psfFluxErr": fit.err,
        "psfChi2": fit.chi2,
        "psfNdata": fit.ndata,
        "psfFlux_flag": fit.no_good,
        "psfFlux_flag_edge": fit.edge,
        "psfFlux_flag_noGoodPixels": fit.no_good,
        "apFlux": ap,
        "apFluxErr": ap_err,
        "apFlux_flag": trunc,
        "apFlux_flag_apertureTruncated": trunc,
        "isNegative": p.snr[idx] < 0,
        "isDipole": false,
        "dipoleFitAttempted": false,
        "dipoleMeanFlux": nan,
        "dipoleMeanFluxErr": nan,
        "dipoleFluxDiff": nan,
        "dipoleFluxDiffErr": nan,
        "dipoleLength": nan,
        "dipoleAngle": nan,
        "dipoleChi2": nan,
        "dipoleNdata": np.zeros(n, np.int64),
        "ixx": ixx,
        "iyy": iyy,
        "ixy": ixy,
        "ixxPSF": pxx,
        "iyyPSF": pyy,
        "ixyPSF": pxy,
        "shape_flag": shape_bad,
        "reliability": rel,
        "bboxSize": np.full(n, 2 * h_fit + 1, np.int64),
    }


def _measure_dipoles(
    diff: Exposure,
    p: _Peaks,
    pairs: list[tuple[int, int]],
    grid: _PsfGrid,
    psf: PsfModel,
    scale: float,
    h_fit: int,
) -> dict[str, np.ndarray]:
    """One DiaSource per (positive, negative) peak pair: two PSFs fitted together."""
    rows: dict[str, list[float]] = {k: [] for k in _empty_rows()}
    img = psf.stamp().astype(np.float64)
    pad = h_fit + 8
    coef = ndi.spline_filter(np.pad(img, pad), order=3)
    c = img.shape[0] // 2 + pad
    for i, k in pairs:
        xp, yp = p.ix[i] + p.dx[i], p.iy[i] + p.dy[i]
        xn, yn = p.ix[k] + p.dx[k], p.iy[k] + p.dy[k]
        cx, cy = round((xp + xn) / 2), round((yp + yn) / 2)
        half = h_fit + math.ceil(math.hypot(xp - xn, yp - yn) / 2) + 1
        (d, v, m), inside = _gather_many(
            (diff.image, diff.variance, diff.mask), np.array([cx]), np.array([cy]), half
        )
        d, v = d[0].astype(np.float64).ravel(), np.maximum(v[0].astype(np.float64), 1e-12).ravel()
        w = (inside[0] & ((m[0] & np.uint16(Mask.NO_DATA)) == 0)).astype(np.float64).ravel()
        start = np.array([xp, yp, xn, yn])
        lobes = _DipoleModel(coef, c, d, v, w, cx, cy, half)
        theta = lobes.fit(start)
        a = lobes.design(theta)
        ata = a.T @ a
        try:
            inv = np.linalg.inv(ata)
        except np.linalg.LinAlgError:
            continue
        f = inv @ (a.T @ (d * w))
        cov = inv @ (a.T * v) @ a @ inv * scale**2
        chi2 = float(np.sum(((d * w - a @ f) ** 2) / v))
        xp, yp, xn, yn = (float(t) for t in theta)
        ndata = int(w.sum())
        fpos, fneg = float(f[0]), float(f[1])
        flux = fpos + fneg
        var = float(cov[0, 0] + cov[1, 1] + 2 * cov[0, 1])
        err = math.sqrt(max(var, 0.0))
        ap_abs = abs(fpos) + abs(fneg)
        wp = abs(fpos) / ap_abs if ap_abs > 0 else 0.5
        x = wp * xp + (1 - wp) * xn
        y = wp * yp + (1 - wp) * yn
        snr2 = float(f @ np.linalg.solve(cov / scale**2, f)) if np.all(np.isfinite(cov)) else 0.0
        rel = float(_reliability(np.array([chi2]), np.array([ndata]), np.array([snr2]))[0])
        ap, ap_err, trunc = _aperture(
            diff.image, diff.variance, np.array([x]), np.array([y]), scale
        )
        sig_c = math.sqrt(2.0) * grid.sigma / max(abs(p.snr[i]), abs(p.snr[k]), 1e-9)
        mean_err = 0.5 * math.sqrt(max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0))
        diff_err = math.sqrt(max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0))
        values = {
            "x": x,
            "y": y,
            "xErr": sig_c,
            "yErr": sig_c,
            "centroid_flag": bool(p.centroid_flag[i] or p.centroid_flag[k]),
            "snr": float(p.snr[i] if abs(p.snr[i]) >= abs(p.snr[k]) else p.snr[k]),
            "psfFlux": flux,
            "psfFluxErr": err,
            "psfChi2": chi2,
            "psfNdata": ndata,
            "psfFlux_flag": False,
            "psfFlux_flag_edge": not bool(inside.all()),
            "psfFlux_flag_noGoodPixels": False,
            "apFlux": float(ap[0]),
            "apFluxErr": float(ap_err[0]),
            "apFlux_flag": bool(trunc[0]),
            "apFlux_flag_apertureTruncated": bool(trunc[0]),
            "isNegative": abs(fneg) > abs(fpos),
            "isDipole": True,
            "dipoleFitAttempted": True,
            "dipoleMeanFlux": 0.5 * ap_abs,
            "dipoleMeanFluxErr": mean_err,
            "dipoleFluxDiff": abs(fpos) - abs(fneg),
            "dipoleFluxDiffErr": diff_err,
            "dipoleLength": math.hypot(xp - xn, yp - yn) * diff.pixel_scale_arcsec,
            "dipoleAngle": math.nan,
            "dipoleChi2": chi2,
            "dipoleNdata": ndata,
            "ixx": math.nan,
            "iyy": math.nan,
            "ixy": math.nan,
            "ixxPSF": math.nan,
            "iyyPSF": math.nan,
            "ixyPSF": math.nan,
            "shape_flag": True,
            "reliability": rel,
            "bboxSize": 2 * half + 1,
            "_xp": xp,
            "_yp": yp,
            "_xn": xn,
            "_yn": yn,
        }
        for key, value in values.items():
            rows.setdefault(key, []).append(value)
    out = {key: np.asarray(vals) for key, vals in rows.items()}
    if not pairs:
        for key in ("_xp", "_yp", "_xn", "_yn"):
            out[key] = np.zeros(0)
    return out


class _DipoleModel:
    """Two PSFs (a positive and a negative lobe) on one stamp: positions fitted, fluxes solved.

    A shifted star is two PSFs a fraction of a pixel apart, not two PSFs at the lobes'
    peaks (which lie ~1 FWHM apart): the positions come from a least-squares fit
    (``scipy.optimize.least_squares``) with the two fluxes solved linearly at each step.
    """

    def __init__(
        self,
        coef: np.ndarray,
        c: int,
        d: np.ndarray,
        v: np.ndarray,
        w: np.ndarray,
        cx: int,
        cy: int,
        half: int,
    ) -> None:
        self.coef, self.c = coef, c
        self.d, self.v, self.w = d, v, w
        off = np.arange(-half, half + 1, dtype=np.float64)
        self.rows = np.broadcast_to((cy + off)[:, None], (off.size, off.size))
        self.cols = np.broadcast_to((cx + off)[None, :], (off.size, off.size))

    def design(self, theta: np.ndarray) -> np.ndarray:
        """(n_pix, 2) weighted model columns for lobes at (θ0, θ1) and (θ2, θ3)."""
        cols = [
            ndi.map_coordinates(
                self.coef,
                [self.rows - y + self.c, self.cols - x + self.c],
                order=3,
                prefilter=False,
                mode="constant",
            ).ravel()
            for x, y in ((theta[0], theta[1]), (theta[2], theta[3]))
        ]
        return np.stack(cols, axis=1) * self.w[:, None]

    @staticmethod
    def lobes(q: np.ndarray) -> np.ndarray:
        """(x+, y+, x−, y−) from (x_mid, y_mid, separation, angle)."""
        dx, dy = 0.5 * q[2] * math.cos(q[3]), 0.5 * q[2] * math.sin(q[3])
        return np.array([q[0] + dx, q[1] + dy, q[0] - dx, q[1] - dy])

    def _chi(self, q: np.ndarray) -> np.ndarray:
        a = self.design(self.lobes(q))
        f = np.linalg.lstsq(a, self.d * self.w, rcond=None)[0]
        return np.asarray((self.d * self.w - a @ f) / np.sqrt(self.v))

    def fit(self, start: np.ndarray) -> np.ndarray:
        """Lobe positions (x+, y+, x−, y−), starting from the two peaks.

        Parametrised by midpoint, separation (≥ 0.1 px) and angle (within 90° of the
        peaks'), so the lobes cannot swap: for a shift much smaller than the PSF the
        separation and the lobes' flux are degenerate (only their product is measured).
        """
        xp, yp, xn, yn = start
        sep = math.hypot(xp - xn, yp - yn)
        ang = math.atan2(yp - yn, xp - xn)
        q0 = np.array([(xp + xn) / 2, (yp + yn) / 2, max(0.5 * sep, 0.2), ang])
        lo = np.array([q0[0] - 3.0, q0[1] - 3.0, 0.1, ang - math.pi / 2])
        hi = np.array([q0[0] + 3.0, q0[1] + 3.0, max(2.0 * sep, 1.0), ang + math.pi / 2])
        try:
            res = least_squares(
                self._chi,
                np.clip(q0, lo, hi),
                bounds=(lo, hi),
                x_scale=0.5,
                max_nfev=30,
                ftol=1e-4,
                xtol=1e-4,
            )
        except (ValueError, np.linalg.LinAlgError):
            return np.asarray(start)
        return self.lobes(np.asarray(res.x))


def _bearing(science: Exposure, dipoles: dict[str, np.ndarray]) -> np.ndarray:
    """Position angle (deg, E of N) from the negative to the positive lobe of dipoles."""
    assert science.wcs is not None
    ra_p, dec_p = science.wcs.all_pix2world(dipoles["_xp"], dipoles["_yp"], 0)
    ra_n, dec_n = science.wcs.all_pix2world(dipoles["_xn"], dipoles["_yn"], 0)
    d1, d2 = np.radians(dec_n), np.radians(dec_p)
    dra = np.radians(np.asarray(ra_p) - np.asarray(ra_n))
    y = np.sin(dra) * np.cos(d2)
    x = np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(dra)
    return np.asarray(np.mod(np.degrees(np.arctan2(y, x)), 360.0))


# -- forced photometry ------------------------------------------------------------------------


def forced_photometry(
    difference: Exposure, science: Exposure, objects: pd.DataFrame
) -> pd.DataFrame:
    """PSF photometry at known DiaObject positions on the difference and science images.

    Parameters
    ----------
    difference
        Difference image (science electrons, PSF set).
    science
        The science exposure (WCS, PSF, zero point).
    objects
        DiaObjects with ``diaObjectId``, ``ra``, ``dec`` (degrees).

    Returns
    -------
    pandas.DataFrame
        APDB ``DiaForcedSource`` columns ``diaObjectId``, ``ra``, ``dec``, ``psfFlux``,
        ``psfFluxErr``, ``scienceFlux``, ``scienceFluxErr`` (nJy) and ``band``, plus ``x``,
        ``y``, for the objects whose position falls on the detector. Fluxes are NaN where
        fewer than half the PSF's weight has data.

    Raises
    ------
    DetectorError
        Missing columns, or a difference/science without PSF, WCS or zero point.
    """
    _validate(difference, science, None)
    missing = [c for c in ("diaObjectId", "ra", "dec") if c not in objects.columns]
    if missing:
        raise DetectorError("dia", f"forced photometry needs column(s) {', '.join(missing)}")
    assert difference.psf is not None
    assert science.psf is not None
    assert science.wcs is not None
    ny, nx = science.shape
    ra = np.asarray(objects["ra"], np.float64)
    dec = np.asarray(objects["dec"], np.float64)
    ids = np.asarray(objects["diaObjectId"], np.int64)
    if ra.size:
        x, y = (np.asarray(v) for v in science.wcs.all_world2pix(ra, dec, 0))
    else:
        x = y = np.zeros(0)
    on = (
        np.isfinite(x)
        & np.isfinite(y)
        & (x >= -0.5)
        & (x < nx - 0.5)
        & (y >= -0.5)
        & (y < ny - 0.5)
    )
    x, y, ra, dec, ids = x[on], y[on], ra[on], dec[on], ids[on]
    fwhm = difference.psf.fwhm_px
    h_fit = max(4, math.ceil(2.0 * fwhm))
    grid = _psf_grid(difference.psf, h_fit)
    sci_grid = grid if science.psf is difference.psf else _psf_grid(science.psf, h_fit)
    scale = _forced_noise_scale(difference)
    njy = science.njy_per_electron()
    dfit = _psf_fit(difference.image, difference.variance, difference.mask, grid, x, y, scale)
    sfit = _psf_fit(science.image, science.variance, science.mask, sci_grid, x, y)
    return pd.DataFrame(
        {
            "diaObjectId": ids,
            "ra": ra,
            "dec": dec,
            "x": x,
            "y": y,
            "psfFlux": dfit.flux * njy,
            "psfFluxErr": dfit.err * njy,
            "scienceFlux": sfit.flux * njy,
            "scienceFluxErr": sfit.err * njy,
            "band": np.full(ids.size, science.info.band or "", dtype=object),
        }
    )


def _forced_noise_scale(difference: Exposure) -> float:
    """The matched-filter noise scale of :func:`detect_dia_sources`, from a central crop."""
    assert difference.psf is not None
    ny, nx = difference.shape
    h = max(3, math.ceil(1.5 * difference.psf.fwhm_px))
    fa, fb, filt_psf = _separable(difference.psf, h)
    sum_phi2 = float(np.sum(filt_psf**2))
    cy, cx = ny // 2, nx // 2
    half = 512
    sl = (slice(max(0, cy - half), cy + half), slice(max(0, cx - half), cx + half))
    kill = (difference.mask[sl] & _NO_DETECT) != 0
    det = np.where(kill, np.float32(0.0), difference.image[sl]).astype(np.float32)
    filt = _matched_filter(det, fa, fb)[h:-h:3, h:-h:3]
    var = difference.variance[sl][h:-h:3, h:-h:3]
    good = ~kill[h:-h:3, h:-h:3] & (var > 0)
    return _noise_scale(filt[good] / np.sqrt(var[good] * sum_phi2))
