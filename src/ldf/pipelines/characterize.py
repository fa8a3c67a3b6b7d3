"""Image characterization: background, detection, source measurement and the PSF.

What Rubin's ``CharacterizeImageTask`` does for one calibrated detector image, with Source
Extractor's algorithms (Bertin & Arnouts 1996, A&AS 117, 393) through SEP (Barbary 2016,
JOSS 1, 58) and an empirical PSF in the spirit of PSFEx at degree 0 (Bertin 2011, ASPC 442,
435):

1. **Background.** SExtractor's mesh background: 128 × 128 pixel meshes, κσ-clipped mode
   ``2.5 median − 1.5 mean`` per mesh, a 3 × 3 median filter over the meshes and a bicubic
   spline between them; SAT, BAD, CR and NO_DATA pixels are left out. The map is subtracted
   from the exposure's image **in place** (pass ``in_place=False`` to work on a copy).
   ``background_level`` is the median of the mesh values (electrons per pixel).
2. **Detection.** ``sep.extract`` thresholded at ``detection_sigma`` times the noise of the
   filtered image (SEP's matched filter with its 3 × 3 kernel and the exposure's variance
   plane), SExtractor's multi-threshold deblending; every footprint pixel gets ``DETECTED``.
3. **PSF stars.** Unsaturated, unblended, isolated sources away from the edges with S/N ≥ 50,
   axis ratio ≥ 0.6, and a half-light radius on the stellar locus (the mode of the
   half-light-radius distribution; cosmic rays, hot pixels and blends fall off it).
4. **Empirical PSF.** Stamps of the brightest PSF stars, normalised to unit sum, recentred
   to the middle pixel by a cubic-spline sub-pixel shift and median-combined (spatially
   constant; PSFEx degree 0). FWHM, β and the ellipticity (e1, e2) come from an elliptical
   Moffat profile (Moffat 1969, A&A 3, 455; the simulator's area-preserving shear
   convention) fitted by ``scipy.optimize.least_squares`` to the stars' pixels at their
   exact sub-pixel offsets — the stack before resampling, as in the effective-PSF method of
   Anderson & King (2000, PASP 112, 1360) — so the interpolation of the stack does not
   broaden the measured seeing.
5. **Photometry.** ``psf_flux``: linear fit of the PSF image (shifted to the centroid by a
   cubic spline) with uniform weights, which is unbiased whatever the source's brightness;
   ``ap_flux``: a circular aperture of radius 3 × FWHM. The aperture correction (the median
   ``ap_flux / psf_flux`` of the PSF stars) and the fitted Moffat's enclosed energy within
   the aperture turn the PSF flux into the source's **total** flux, reported as ``flux``:
   the flux photometric calibration uses.

Source table columns (pixel units, electrons)
    ``id`` (0-based row), ``x``, ``y`` (centroid, 0-based pixel centres), ``a``, ``b``,
    ``theta`` (SExtractor isophotal ellipse, pixels and radians), ``npix``, ``peak``,
    ``flux``/``flux_err`` (aperture-corrected PSF flux = total flux), ``psf_flux``/
    ``psf_flux_err``, ``ap_flux``/``ap_flux_err``, ``snr`` (psf_flux / psf_flux_err),
    ``r50`` (half-light radius, pixels; NaN unless measured), ``flags`` (SEP's extraction
    and aperture bits: 1 merged/deblended, 2 truncated at the edge, 16 aperture truncated…),
    and booleans ``saturated``, ``edge``, ``blended``, ``psf_candidate``, ``psf_used``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sep
from scipy import ndimage
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

from ldf.pipelines.types import DetectorError, Exposure, Mask, PsfModel

__all__ = [
    "CharacterizeResult",
    "characterize",
    "moffat_image",
    "psf_photometry",
    "subtract_background",
]

STAGE = "characterize"

BACKGROUND_MASK = Mask.SAT | Mask.BAD | Mask.CR | Mask.NO_DATA
"""Pixels left out of the background estimate."""
DETECTION_MASK = Mask.BAD | Mask.NO_DATA
"""Pixels SEP treats as missing when detecting (saturated stars are still detected)."""
PHOTOMETRY_MASK = Mask.SAT | Mask.BAD | Mask.CR | Mask.NO_DATA
"""Pixels left out of PSF fits and PSF-star stamps."""

MIN_PSF_STARS = 5
"""Fewer PSF stars than this and the detector cannot be characterized."""
BACKGROUND_MESH_PX = 128
"""Background mesh size (pixels)."""
APERTURE_RADIUS_FWHM = 3.0
"""Radius of the aperture flux, in units of the PSF FWHM."""

_MIN_AXIS_RATIO = 0.6
_LOCUS_HALF_WIDTH = 0.12  # ± fractional half-light-radius band around the stellar locus
_ISOLATION_FLUX_RATIO = 0.01  # neighbours brighter than this fraction disqualify a PSF star
_MIN_FWHM_PX = 1.2
_MAX_PSF_HALF = 40
_MAX_FIT_PIXELS = 25_000


@dataclass
class CharacterizeResult:
    """What characterization measured on one detector-exposure."""

    exposure: Exposure
    """The exposure, background-subtracted, with ``psf``, ``background_level`` and the
    DETECTED mask plane set."""
    sources: pd.DataFrame
    """Detected sources (columns in the module docstring)."""
    seeing_arcsec: float
    """PSF FWHM (geometric mean of the axes), arcseconds."""
    psf_e1: float
    """PSF ellipticity component (a²−b²)/(a²+b²)·cos 2θ."""
    psf_e2: float
    """PSF ellipticity component (a²−b²)/(a²+b²)·sin 2θ."""
    ellipticity: float
    """|e| of the PSF."""
    psf_beta: float
    """Fitted Moffat index."""
    sky_e_per_pixel: float
    """Median background subtracted, electrons per pixel."""
    sky_rms_e: float
    """Median background noise, electrons per pixel."""
    n_sources: int
    """Number of detections."""
    n_psf_stars: int
    """Number of stars the PSF was built from."""
    aperture_radius_px: float
    """Radius of ``ap_flux`` (pixels)."""
    aperture_correction: float
    """``flux / psf_flux``: aperture correction times the inverse enclosed energy."""


# -- background -------------------------------------------------------------------------------


def _mask_u8(mask: np.ndarray, bits: int) -> np.ndarray:
    """``mask & bits`` as a uint8 array SEP can read (all our masking bits are in the low byte)."""
    if bits > 0xFF:
        raise ValueError("mask bits above the low byte")
    out = np.empty(mask.shape, np.uint8)
    np.bitwise_and(mask, np.uint16(bits), out=out, casting="unsafe")
    return out


def subtract_background(
    exposure: Exposure, *, mesh_px: int = BACKGROUND_MESH_PX
) -> tuple[float, float]:
    """Estimate the sky with SExtractor's mesh algorithm and subtract it, in place.

    Parameters
    ----------
    exposure
        Calibrated exposure (electrons); its image is modified in place and its
        ``background_level`` set.
    mesh_px
        Background mesh size, pixels.

    Returns
    -------
    level, rms : float
        Median background and median background noise, electrons per pixel.

    Raises
    ------
    DetectorError
        The image has no usable pixels or the background is not finite.
    """
    image = exposure.image
    m8 = _mask_u8(exposure.mask, int(BACKGROUND_MASK))
    try:
        bkg = sep.Background(image, mask=m8, maskthresh=0, bw=mesh_px, bh=mesh_px, fw=3, fh=3)
    except Exception as exc:  # SEP raises plain Exception subclasses from C status codes
        raise DetectorError(STAGE, f"background estimation failed: {exc}") from exc
    level, rms = float(bkg.globalback), float(bkg.globalrms)
    if not (math.isfinite(level) and math.isfinite(rms)) or rms <= 0.0:
        raise DetectorError(
            STAGE,
            f"background is not measurable (level {level}, rms {rms}): the image is empty, "
            "fully masked or contains NaNs; check ISR's output for this detector",
        )
    bkg.subfrom(image)
    exposure.background_level = level
    return level, rms


# -- PSF model helpers ------------------------------------------------------------------------


def _shear_form(e1: float, e2: float) -> tuple[float, float, float, float]:
    """(a, b, c, s) of the area-preserving quadratic form ``a dx² + 2b dx dy + c dy²``."""
    s = math.sqrt(max(1.0 - e1 * e1 - e2 * e2, 1e-12))
    return (1.0 - e1) / s, -e2 / s, (1.0 + e1) / s, s


def moffat_image(
    half: int, fwhm_px: float, beta: float, e1: float = 0.0, e2: float = 0.0
) -> np.ndarray:
    """An elliptical Moffat profile of unit total flux sampled at pixel centres.

    Parameters
    ----------
    half
        Half-size of the square image (pixels); the image is ``2 half + 1`` wide and
        centred on its middle pixel.
    fwhm_px
        FWHM (geometric mean of the axes), pixels.
    beta
        Moffat index.
    e1, e2
        Ellipticity components (area-preserving shear).

    Returns
    -------
    numpy.ndarray
        float64 image; its sum is the enclosed fraction within the square (≤ 1).
    """
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    a, b, c, _ = _shear_form(e1, e2)
    off = np.arange(-half, half + 1, dtype=np.float64)
    dx, dy = off[None, :], off[:, None]
    q = a * dx * dx + 2.0 * b * dx * dy + c * dy * dy
    out: np.ndarray = (beta - 1.0) / (math.pi * alpha**2) * (1.0 + q / alpha**2) ** (-beta)
    return out


def _moffat_and_jac(
    p: np.ndarray, dxs: np.ndarray, dys: np.ndarray, want_jac: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Model ``A · Moffat(dx − x0, dy − y0; α, β, e1, e2)`` and its Jacobian (n, 7)."""
    amp, x0, y0, alpha, beta, e1, e2 = (float(v) for v in p)
    a, b, c, s = _shear_form(e1, e2)
    dx = dxs - x0
    dy = dys - y0
    q = a * dx * dx + 2.0 * b * dx * dy + c * dy * dy
    al2 = alpha * alpha
    u = 1.0 + q / al2
    norm = (beta - 1.0) / (math.pi * al2)
    m = amp * norm * u ** (-beta)
    if not want_jac:
        return m, None
    jac = np.empty((m.size, 7))
    bu = m * beta / (al2 * u)
    jac[:, 0] = m / amp
    jac[:, 1] = bu * 2.0 * (a * dx + b * dy)
    jac[:, 2] = bu * 2.0 * (b * dx + c * dy)
    jac[:, 3] = m * (-2.0 / alpha) + bu * 2.0 * q / alpha
    jac[:, 4] = m * (1.0 / (beta - 1.0) - np.log(u))
    s3 = s**3
    da1, db1, dc1 = (e1 - 1.0 + e2 * e2) / s3, -e1 * e2 / s3, (1.0 + e1 - e2 * e2) / s3
    da2, db2, dc2 = (1.0 - e1) * e2 / s3, -(1.0 - e1 * e1) / s3, (1.0 + e1) * e2 / s3
    jac[:, 5] = -bu * (da1 * dx * dx + 2.0 * db1 * dx * dy + dc1 * dy * dy)
    jac[:, 6] = -bu * (da2 * dx * dx + 2.0 * db2 * dx * dy + dc2 * dy * dy)
    return m, jac


def _fit_moffat(
    dxs: np.ndarray,
    dys: np.ndarray,
    data: np.ndarray,
    weight: np.ndarray,
    sigma: np.ndarray,
    fwhm_guess: float,
) -> np.ndarray:
    """Fit the elliptical Moffat to normalised star pixels; 5σ-clipped, two passes.

    ``weight`` are per-pixel fit weights independent of the pixel values (so the fit is
    unbiased); ``sigma`` is each normalised pixel's noise, used only for the clipping.
    Returns the parameters ``(A, x0, y0, α, β, e1, e2)``.
    """
    beta0 = 3.5
    alpha0 = fwhm_guess / (2.0 * math.sqrt(2.0 ** (1.0 / beta0) - 1.0))
    p0 = np.array([1.0, 0.0, 0.0, alpha0, beta0, 0.0, 0.0])
    lower = np.array([0.3, -1.5, -1.5, 0.2, 1.2, -0.7, -0.7])
    upper = np.array([3.0, 1.5, 1.5, 80.0, 30.0, 0.7, 0.7])
    keep = np.ones(data.size, bool)
    p = p0
    for _ in range(2):
        xs, ys, d, w = dxs[keep], dys[keep], data[keep], weight[keep]

        def resid(pp: np.ndarray, xs: np.ndarray = xs, ys: np.ndarray = ys, d: np.ndarray = d,
                  w: np.ndarray = w) -> np.ndarray:  # fmt: skip
            return w * (_moffat_and_jac(pp, xs, ys, False)[0] - d)

        def jac(pp: np.ndarray, xs: np.ndarray = xs, ys: np.ndarray = ys,
                w: np.ndarray = w) -> np.ndarray:  # fmt: skip
            j = _moffat_and_jac(pp, xs, ys, True)[1]
            assert j is not None
            return w[:, None] * j

        fit = least_squares(
            resid,
            np.clip(p, lower, upper),
            jac=jac,
            bounds=(lower, upper),
            x_scale="jac",
            # lsmr: no SVD of the (pixels × 7) Jacobian per iteration (3× faster, same fit).
            tr_solver="lsmr",
        )
        p = fit.x
        model = _moffat_and_jac(p, dxs, dys, False)[0]
        keep = np.abs(data - model) < 5.0 * sigma
    return np.asarray(p)


# -- photometry ---------------------------------------------------------------------------------


def psf_photometry(
    exposure: Exposure,
    x: np.ndarray,
    y: np.ndarray,
    *,
    psf: PsfModel | None = None,
    radius_fwhm: float = 1.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF fluxes at fixed positions (forced photometry), vectorised over sources.

    The PSF image is shifted to each position with a cubic spline and fitted linearly with
    uniform weights over the unmasked pixels within ``radius_fwhm`` FWHM (a square of that
    half-size): ``f = Σ P I / Σ P²``, ``σ_f² = Σ P² V / (Σ P²)²`` — unbiased at any
    brightness, and within a few per cent of the optimal variance for sky-limited sources.
    The background must already be subtracted.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (electrons) with a PSF.
    x, y
        0-based pixel positions of the sources.
    psf
        PSF to use (default: ``exposure.psf``).
    radius_fwhm
        Half-size of the fitted stamp, in FWHM.

    Returns
    -------
    flux, flux_err : numpy.ndarray
        PSF flux and its error (electrons; the PSF image's normalisation, not corrected to
        total flux). NaN where no unmasked pixel is left.
    psf_frac : numpy.ndarray
        Fraction of Σ P² from unmasked, on-image pixels (1 for a clean source).

    Raises
    ------
    DetectorError
        The exposure has no PSF.
    """
    psf = psf or exposure.psf
    if psf is None:
        raise DetectorError(STAGE, "PSF photometry needs a PSF model; run characterization")
    x = np.atleast_1d(np.asarray(x, np.float64))
    y = np.atleast_1d(np.asarray(y, np.float64))
    n = x.size
    if n == 0:
        empty = np.empty(0)
        return empty, empty.copy(), empty.copy()
    ny, nx = exposure.shape
    kimg = psf.image.astype(np.float64)
    centre = (kimg.shape[0] - 1) / 2.0
    half = int(min(centre, max(3, math.ceil(radius_fwhm * psf.fwhm_px))))
    offs = np.arange(-half, half + 1)
    k = offs.size
    ix = np.rint(np.nan_to_num(x, nan=-1e6)).astype(np.int64)
    iy = np.rint(np.nan_to_num(y, nan=-1e6)).astype(np.int64)
    px = ix[:, None] + offs[None, :]
    py = iy[:, None] + offs[None, :]
    okx = (px >= 0) & (px < nx)
    oky = (py >= 0) & (py < ny)
    pxc = np.clip(px, 0, nx - 1)
    pyc = np.clip(py, 0, ny - 1)
    rows, cols = pyc[:, :, None], pxc[:, None, :]
    data = exposure.image[rows, cols].astype(np.float64)
    var = exposure.variance[rows, cols].astype(np.float64)
    valid = oky[:, :, None] & okx[:, None, :]
    valid &= (exposure.mask[rows, cols] & np.uint16(PHOTOMETRY_MASK)) == 0
    # PSF image coordinates of each stamp pixel: centre + (pixel − source position).
    cy = centre + (py - y[:, None])
    cx = centre + (px - x[:, None])
    coords = np.empty((2, n, k, k))
    coords[0] = cy[:, :, None]
    coords[1] = cx[:, None, :]
    coeffs = ndimage.spline_filter(kimg, order=3, mode="grid-constant")
    model = ndimage.map_coordinates(
        coeffs, coords.reshape(2, -1), order=3, mode="grid-constant", cval=0.0, prefilter=False
    ).reshape(n, k, k)
    wp = np.where(valid, model, 0.0)
    spp = np.einsum("nij,nij->n", wp, model)
    spp_all = np.einsum("nij,nij->n", model, model)
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.einsum("nij,nij->n", wp, np.where(valid, data, 0.0)) / spp
        err = np.sqrt(np.einsum("nij,nij->n", wp * wp, np.where(valid, var, 0.0))) / spp
        frac = spp / spp_all
    bad = ~(spp > 0)
    flux[bad] = np.nan
    err[bad] = np.nan
    return flux, err, np.nan_to_num(frac)


# -- the stage ----------------------------------------------------------------------------------


def _check_planes(exposure: Exposure) -> None:
    img, var, msk = exposure.image, exposure.variance, exposure.mask
    if img.ndim != 2 or var.shape != img.shape or msk.shape != img.shape:
        raise DetectorError(
            STAGE,
            f"image {img.shape}, variance {var.shape} and mask {msk.shape} planes differ; "
            "the exposure is corrupt",
        )
    if img.dtype != np.float32 or var.dtype != np.float32 or msk.dtype != np.uint16:
        raise DetectorError(
            STAGE,
            f"planes must be float32/float32/uint16, got {img.dtype}/{var.dtype}/{msk.dtype}",
        )
    if min(img.shape) < 2 * BACKGROUND_MESH_PX:
        raise DetectorError(STAGE, f"image {img.shape} is too small to characterize")
    # Non-finite pixels (one cheap reduction finds whether there are any) become NO_DATA.
    if not math.isfinite(float(img.sum(dtype=np.float64))):
        bad = ~np.isfinite(img)
        n_bad = int(bad.sum())
        if n_bad > 0.5 * img.size:
            raise DetectorError(
                STAGE, f"{n_bad} of {img.size} pixels are NaN or infinite; check ISR's output"
            )
        img[bad] = 0.0
        var[bad] = np.float32(1e30)
        msk[bad] |= np.uint16(Mask.NO_DATA)
    vmin = float(var.min())
    if not math.isfinite(vmin) or vmin <= 0.0:
        raise DetectorError(
            STAGE,
            f"variance plane has non-positive or non-finite pixels (min {vmin}); "
            "ISR must give every pixel a positive variance (mask bad ones as NO_DATA)",
        )


def _detect(exposure: Exposure, detection_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Run ``sep.extract``; set DETECTED; return (objects, saturated flag per object)."""
    image, mask = exposure.image, exposure.mask
    npix = image.size
    if sep.get_extract_pixstack() < npix // 16:
        sep.set_extract_pixstack(npix // 16)
    if sep.get_sub_object_limit() < 4096:
        sep.set_sub_object_limit(4096)
    m8 = _mask_u8(mask, int(DETECTION_MASK | Mask.SAT))
    det_mask = m8 & np.uint8(DETECTION_MASK)
    try:
        objects, seg = sep.extract(
            image,
            detection_sigma,
            var=exposure.variance,
            mask=det_mask,
            minarea=5,
            segmentation_map=True,
        )
    except Exception as exc:  # SEP's C errors (pixel buffer full, deblending overflow)
        raise DetectorError(
            STAGE, f"source detection failed ({exc}); the image may be badly calibrated"
        ) from exc
    del det_mask
    np.bitwise_or(mask, np.uint16(Mask.DETECTED), out=mask, where=seg > 0)
    saturated = np.zeros(len(objects), bool)
    sat_pix = np.flatnonzero(m8 & np.uint8(Mask.SAT))
    if sat_pix.size:
        ids = seg.reshape(-1)[sat_pix]
        ids = np.unique(ids[ids > 0]) - 1
        saturated[ids] = True
    return objects, saturated


def _select_psf_stars(
    exposure: Exposure,
    cat: pd.DataFrame,
    snr: np.ndarray,
    *,
    min_snr: float,
    max_stars: int,
) -> tuple[np.ndarray, float, int]:
    """Indices of PSF stars (best first), a FWHM guess (pixels) and the stamp half-size."""
    ny, nx = exposure.shape
    x, y = cat["x"].to_numpy(), cat["y"].to_numpy()
    a, b = cat["a"].to_numpy(), cat["b"].to_numpy()
    border = 12
    cand = (
        (snr >= min_snr)
        & ~cat["saturated"].to_numpy()
        & ((cat["flags"].to_numpy() & (sep.OBJ_MERGED | sep.OBJ_TRUNC | sep.OBJ_SINGU)) == 0)
        & (b >= _MIN_AXIS_RATIO * a)
        & (x > border)
        & (x < nx - 1 - border)
        & (y > border)
        & (y < ny - 1 - border)
    )
    idx = np.flatnonzero(cand)
    if idx.size < MIN_PSF_STARS:
        raise DetectorError(
            STAGE,
            f"only {idx.size} unsaturated, unblended sources with S/N ≥ {min_snr:g} "
            f"(need ≥ {MIN_PSF_STARS} PSF stars): too few stars, clouds, or bad focus",
        )
    idx = idx[np.argsort(-snr[idx])][: 4 * max_stars]
    r50, _ = sep.flux_radius(exposure.image, x[idx], y[idx], np.full(idx.size, 20.0), 0.5, subpix=5)
    cat.loc[cat.index[idx], "r50"] = r50
    ok = np.isfinite(r50) & (r50 > 0.5 * _MIN_FWHM_PX)
    idx, r50 = idx[ok], r50[ok]
    if idx.size < MIN_PSF_STARS:
        raise DetectorError(STAGE, f"only {idx.size} measurable PSF star candidates")
    # Stellar locus: the densest ±3 % window of log r50.
    lr = np.sort(np.log(r50))
    counts = np.searchsorted(lr, lr + 0.03) - np.searchsorted(lr, lr - 0.03)
    locus = math.exp(float(np.median(lr[np.abs(lr - lr[np.argmax(counts)]) < 0.03])))
    on_locus = np.abs(r50 / locus - 1.0) < _LOCUS_HALF_WIDTH
    idx = idx[on_locus]
    # Half-light radius → FWHM for a Moffat with β≈4.8 (r50 ≈ 0.57 FWHM).
    fwhm_guess = max(_MIN_FWHM_PX, locus / 0.57)
    half = int(min(_MAX_PSF_HALF, max(7, math.ceil(4.0 * fwhm_guess))))
    # Away from the edges by a stamp, and isolated: no neighbour brighter than 1 % of the
    # star within the stamp's diagonal.
    # (one pixel more than the stamp: the windowed centroid may still move by up to 1 px).
    inside = (x[idx] >= half + 1) & (x[idx] <= nx - 2 - half)
    inside &= (y[idx] >= half + 1) & (y[idx] <= ny - 2 - half)
    idx = idx[inside]
    if idx.size:
        tree = cKDTree(np.column_stack([x, y]))
        iso_flux = cat["iso_flux"].to_numpy()
        neighbours = tree.query_ball_point(
            np.column_stack([x[idx], y[idx]]), r=math.sqrt(2.0) * half + 2.0
        )
        isolated = np.array(
            [
                not any(j != i and iso_flux[j] > _ISOLATION_FLUX_RATIO * iso_flux[i] for j in nb)
                for i, nb in zip(idx, neighbours, strict=True)
            ],
            dtype=bool,
        )
        idx = idx[isolated]
    cat.loc[cat.index[idx], "psf_candidate"] = True
    if idx.size < MIN_PSF_STARS:
        raise DetectorError(
            STAGE,
            f"only {idx.size} isolated PSF stars on the stellar locus (need ≥ {MIN_PSF_STARS}):"
            " the field is too sparse or too crowded, or the image is trailed/out of focus",
        )
    return idx[:max_stars], fwhm_guess, half


def _build_psf(
    exposure: Exposure, cat: pd.DataFrame, idx: np.ndarray, fwhm_guess: float, half: int
) -> tuple[PsfModel, float, np.ndarray]:
    """Stack the PSF stars into an empirical PSF and fit a Moffat; returns (psf, β, used)."""
    image, variance, mask = exposure.image, exposure.variance, exposure.mask
    # Windowed centroids (SExtractor XWIN/YWIN) of the PSF stars.
    sig = np.full(idx.size, max(fwhm_guess, 1.5) / 2.3548)
    xw, yw, wflag = sep.winpos(image, cat["x"].to_numpy()[idx], cat["y"].to_numpy()[idx], sig)
    x0 = cat["x"].to_numpy()[idx]
    y0 = cat["y"].to_numpy()[idx]
    good = (wflag == 0) & (np.hypot(xw - x0, yw - y0) < 1.0)
    xs = np.where(good, xw, x0)
    ys = np.where(good, yw, y0)
    offs = np.arange(-half, half + 1)
    ix = np.rint(xs).astype(np.int64)
    iy = np.rint(ys).astype(np.int64)
    rows = (iy[:, None] + offs[None, :])[:, :, None]
    cols = (ix[:, None] + offs[None, :])[:, None, :]
    stamps = image[rows, cols].astype(np.float64)
    svar = variance[rows, cols].astype(np.float64)
    sbad = (mask[rows, cols] & np.uint16(PHOTOMETRY_MASK)) != 0
    fracx = xs - ix
    fracy = ys - iy
    norm = np.where(sbad, 0.0, stamps).sum(axis=(1, 2))
    ok = norm > 0
    stamps, svar, sbad, norm = stamps[ok], svar[ok], sbad[ok], norm[ok]
    fracx, fracy, used = fracx[ok], fracy[ok], idx[ok]
    if used.size < MIN_PSF_STARS:
        raise DetectorError(STAGE, f"only {used.size} usable PSF star stamps")
    stamps /= norm[:, None, None]

    # Moffat fit to the pixels at their exact offsets from each star's centroid.
    r_fit = min(float(half), max(3.0, 3.0 * fwhm_guess))
    dxg = offs[None, None, :] - fracx[:, None, None]
    dyg = offs[None, :, None] - fracy[:, None, None]
    dxg, dyg = np.broadcast_arrays(dxg, dyg)
    sel = (dxg * dxg + dyg * dyg <= r_fit * r_fit) & ~sbad
    # The least-squares cost grows with the pixel count (an SVD of the Jacobian per step):
    # fit the highest-S/N stars (they come first) up to ~_MAX_FIT_PIXELS pixels.
    n_fit = max(MIN_PSF_STARS, int(_MAX_FIT_PIXELS // max(1, int(sel[0].sum()))))
    sel[n_fit:] = False
    sky_var = float(np.median(svar[:, 0, :]))  # the stamps' edge rows are sky-dominated
    snr_star = norm / np.sqrt(norm + sky_var * 4.0 * math.pi * (fwhm_guess / 2.3548) ** 2)
    weight = np.broadcast_to((snr_star / snr_star.mean())[:, None, None], sel.shape)
    sigma = np.sqrt(svar) / norm[:, None, None]
    try:
        p = _fit_moffat(dxg[sel], dyg[sel], stamps[sel], weight[sel], sigma[sel], fwhm_guess)
    except ValueError as exc:  # non-finite residuals from corrupt pixels
        raise DetectorError(STAGE, f"PSF fit failed: {exc}") from exc
    _, _, _, alpha, beta, e1, e2 = (float(v) for v in p)
    fwhm = 2.0 * alpha * math.sqrt(2.0 ** (1.0 / beta) - 1.0)
    if not (math.isfinite(fwhm) and 0.5 * fwhm_guess < fwhm < 2.0 * fwhm_guess):
        raise DetectorError(
            STAGE,
            f"PSF fit gave FWHM {fwhm:.2f} px for stars whose half-light radius implies "
            f"{fwhm_guess:.2f} px: the PSF is not Moffat-like (trailing, defocus, double image)",
        )

    # Empirical image: recentre each normalised stamp (cubic spline), median-combine.
    shifted = np.empty_like(stamps)
    for k in range(stamps.shape[0]):
        filled = np.where(sbad[k], 0.0, stamps[k])
        shifted[k] = ndimage.shift(filled, (-fracy[k], -fracx[k]), order=3, mode="nearest")
        if sbad[k].any():  # masked pixels do not vote in the median
            moved = ndimage.shift(sbad[k].astype(float), (-fracy[k], -fracx[k]), order=1)
            shifted[k][moved > 0.01] = np.nan
    stack = np.nanmedian(shifted, axis=0)
    stack = np.nan_to_num(stack)
    total = float(stack.sum())
    if not total > 0:
        raise DetectorError(STAGE, "the PSF stack has no flux")
    psf = PsfModel(image=(stack / total).astype(np.float32), fwhm_px=fwhm, e1=e1, e2=e2)
    return psf, beta, used


def _aperture_fluxes(
    exposure: Exposure, x: np.ndarray, y: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flux, err, flag = sep.sum_circle(exposure.image, x, y, radius, var=exposure.variance)
    return np.asarray(flux), np.asarray(err), np.asarray(flag)


def characterize(
    exposure: Exposure,
    *,
    detection_sigma: float = 5.0,
    in_place: bool = True,
    psf_min_snr: float = 50.0,
    max_psf_stars: int = 100,
) -> CharacterizeResult:
    """Background, detection, measurement and PSF of one calibrated detector image.

    Parameters
    ----------
    exposure
        ISR output: image in electrons, variance in electrons², mask planes.
    detection_sigma
        Detection threshold in units of the noise of the filtered image.
    in_place
        Subtract the background from ``exposure`` itself and set its ``psf``,
        ``background_level`` and DETECTED plane (the default, to save a 64 MB copy at full
        size); if False, work on a copy and leave ``exposure`` untouched.
    psf_min_snr
        Minimum S/N of a PSF star.
    max_psf_stars
        Most stars stacked into the PSF (the highest-S/N candidates).

    Returns
    -------
    CharacterizeResult
        The characterized exposure, the source table and summary statistics.

    Raises
    ------
    DetectorError
        Corrupt planes, an unmeasurable background, failed detection, or fewer than
        :data:`MIN_PSF_STARS` usable PSF stars.
    """
    exp = exposure if in_place else exposure.copy()
    _check_planes(exp)
    sky, sky_rms = subtract_background(exp)
    objects, saturated = _detect(exp, detection_sigma)
    n = len(objects)
    ny, nx = exp.shape
    cat = pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": objects["x"].astype(np.float64),
            "y": objects["y"].astype(np.float64),
            "a": objects["a"].astype(np.float64),
            "b": objects["b"].astype(np.float64),
            "theta": objects["theta"].astype(np.float64),
            "npix": objects["npix"].astype(np.int64),
            "peak": objects["peak"].astype(np.float64),
            "iso_flux": objects["flux"].astype(np.float64),
            "flags": objects["flag"].astype(np.int64),
            "saturated": saturated,
            "blended": (objects["flag"] & sep.OBJ_MERGED) != 0,
            "r50": np.full(n, np.nan),
            "psf_candidate": np.zeros(n, bool),
            "psf_used": np.zeros(n, bool),
        }
    )
    if n < MIN_PSF_STARS:
        raise DetectorError(
            STAGE,
            f"only {n} sources detected at {detection_sigma:g}σ: closed dome, clouds, "
            "or a dead detector",
        )
    # Preliminary S/N from a 5-pixel aperture to choose PSF candidates.
    f5, e5, _ = _aperture_fluxes(exp, cat["x"].to_numpy(), cat["y"].to_numpy(), 5.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr5 = np.where(e5 > 0, f5 / e5, 0.0)
    idx, fwhm_guess, half = _select_psf_stars(
        exp, cat, snr5, min_snr=psf_min_snr, max_stars=max_psf_stars
    )
    psf, beta, used = _build_psf(exp, cat, idx, fwhm_guess, half)
    exp.psf = psf
    cat.loc[cat.index[used], "psf_used"] = True

    # Windowed centroids (SExtractor's XWIN/YWIN, Gaussian window of the PSF's σ) for
    # sources with S/N ≥ 5; the isophotal barycentre stays where the iteration fails or
    # wanders more than a pixel (pulled by a neighbour).
    x, y = cat["x"].to_numpy().copy(), cat["y"].to_numpy().copy()
    sel = np.flatnonzero(snr5 >= 5.0)
    if sel.size:
        sig = np.full(sel.size, psf.fwhm_px / 2.3548)
        xw, yw, wflag = sep.winpos(exp.image, x[sel], y[sel], sig, subpix=1)
        ok = (wflag == 0) & (np.hypot(xw - x[sel], yw - y[sel]) < 1.0)
        x[sel[ok]], y[sel[ok]] = xw[ok], yw[ok]
    cat["x"], cat["y"] = x, y
    pflux, perr, _ = psf_photometry(exp, x, y, psf=psf)
    radius = APERTURE_RADIUS_FWHM * psf.fwhm_px
    aflux, aerr, aflag = _aperture_fluxes(exp, x, y, radius)
    ratio = aflux[used] / pflux[used]
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size < MIN_PSF_STARS:
        raise DetectorError(STAGE, "no aperture correction: PSF stars have no usable flux")
    med = float(np.median(ratio))
    mad = float(np.median(np.abs(ratio - med))) * 1.4826
    apcorr = float(np.median(ratio[np.abs(ratio - med) <= 3.0 * mad + 1e-12]))
    enc_half = math.ceil(radius) + 2
    model = moffat_image(enc_half, psf.fwhm_px, beta, psf.e1, psf.e2)
    enclosed = float(sep.sum_circle(model, [enc_half], [enc_half], radius, subpix=0)[0][0])
    to_total = apcorr / enclosed

    cat["psf_flux"], cat["psf_flux_err"] = pflux, perr
    cat["ap_flux"], cat["ap_flux_err"] = aflux, aerr
    cat["flux"] = pflux * to_total
    cat["flux_err"] = perr * to_total
    with np.errstate(invalid="ignore", divide="ignore"):
        cat["snr"] = pflux / perr
    cat["flags"] = cat["flags"].to_numpy() | aflag.astype(np.int64)
    edge = half
    cat["edge"] = ((x < edge) | (y < edge) | (x > nx - 1 - edge) | (y > ny - 1 - edge)) | (
        (cat["flags"].to_numpy() & sep.OBJ_TRUNC) != 0
    )
    cat = cat[
        [
            "id", "x", "y", "flux", "flux_err", "snr", "psf_flux", "psf_flux_err",
            "ap_flux", "ap_flux_err", "iso_flux", "a", "b", "theta", "npix", "peak", "r50",
            "flags", "saturated", "edge", "blended", "psf_candidate", "psf_used",
        ]
    ]  # fmt: skip

    exp.metadata["HIERARCH LDF SKYLEVEL"] = (round(sky, 3), "median sky subtracted, e-/pixel")
    exp.metadata["HIERARCH LDF PSFFWHM"] = (round(psf.fwhm_px, 4), "PSF FWHM, pixels")
    seeing = psf.fwhm_px * exp.pixel_scale_arcsec
    return CharacterizeResult(
        exposure=exp,
        sources=cat.reset_index(drop=True),
        seeing_arcsec=seeing,
        psf_e1=psf.e1,
        psf_e2=psf.e2,
        ellipticity=psf.ellipticity,
        psf_beta=beta,
        sky_e_per_pixel=sky,
        sky_rms_e=sky_rms,
        n_sources=n,
        n_psf_stars=int(used.size),
        aperture_radius_px=radius,
        aperture_correction=to_total,
    )
