"""Templates warped before the exposure ends, put on the science grid in a tenth of the time.

Resampling a template onto a full-size detector (:meth:`TemplateStore.warp_to`: cubic-spline
interpolation of 16 Mpixels) costs ≈ 2.5 s on one core, half of Prompt Processing's 5 s
budget. Nothing in it needs the science pixels except the WCS, and the WCS is known to within
the telescope's pointing error when ``nextVisit`` arrives, ≈ 30 s before the raw: the
commanded boresight and rotator angle give each detector's *predicted* WCS. So on
``nextVisit`` an idle worker warps the template onto the predicted grid, enlarged by
:data:`MARGIN` pixels on every side (:func:`prewarp`), and when the raw has been processed to a
fitted WCS, :func:`from_prewarped` maps it onto the science grid:

* the fitted-to-predicted pixel mapping is evaluated on a 7×7 grid over the detector; a
  pointing error moves the whole detector, so the mapping is a translation ``s`` to within
  the fit's noise (0.02–0.04 px at the corners of a 4k detector: the fitted CD matrix's
  scale is good to ~3·10⁻⁶). If any point departs from the median translation by more than
  ``max_residual_px`` (0.1 px: a rotator error of ~5″, a plate-scale change of 5·10⁻⁵), or
  ``s`` reaches past the margin, it returns ``None`` and the caller warps in full;
* the image is shifted by ``s``: integer part by slicing, fractional part by separable
  Lanczos-3 interpolation (two 6-tap 1-D passes, ``scipy.ndimage.correlate1d``: ≈ 0.3 s
  full size). The template is then interpolated twice (cubic spline, then Lanczos-3), both
  nearly exact for a coadd sampled at ≥ 2.5 px per FWHM; the PSF-matching kernel absorbs
  the little extra smoothing;
* variance by the nearest pixel (the warp already resamples it from 4×4-binned planes);
  mask as the OR of the four pixels around each position, NO_DATA grown over the Lanczos
  support (the zeros there must not leak into the interpolation unflagged).

Rubin's Prompt Processing preloads templates too, but warps at run time; warping before the
exposure ends is what lets a full-size detector fit in the budget on one core.

Written here because the split (a predicted warp, then a residual shift checked against the
fitted WCS) is specific to this service; the interpolation itself is ``scipy.ndimage``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from astropy.io import fits
from astropy.wcs import WCS

from ldf.pipelines.templates import TemplateStore, _template_info
from ldf.pipelines.types import Exposure, Mask, PsfModel, VisitInfo

__all__ = ["MARGIN", "MAX_RESIDUAL_PX", "PrewarpMiss", "from_prewarped", "prewarp"]

MARGIN = 64
"""Pixels added on every side of the predicted grid: 12.8″ at 0.2″/px, beyond the largest
pointing error astrometry searches for (10″)."""
MAX_RESIDUAL_PX = 0.1
"""Largest departure of the fitted-to-predicted mapping from a translation (pixels)."""
_LANCZOS_A = 3
_FORMAT = 1


@dataclass(frozen=True)
class PrewarpMiss:
    """Why a prewarped template could not be used (the caller warps in full)."""

    reason: str


def _expanded(wcs: WCS, shape: tuple[int, int], margin: int) -> tuple[WCS, tuple[int, int]]:
    big = wcs.deepcopy()
    big.wcs.crpix = [float(c) + margin for c in wcs.wcs.crpix]
    ny, nx = shape[0] + 2 * margin, shape[1] + 2 * margin
    big.pixel_shape = (nx, ny)
    big.wcs.set()
    return big, (ny, nx)


def prewarp(
    store: TemplateStore,
    band: str,
    wcs: WCS,
    shape: tuple[int, int],
    directory: Path,
    *,
    info: VisitInfo | None = None,
    margin: int = MARGIN,
) -> Path:
    """Warp the template onto the predicted grid plus ``margin``; save it to ``directory``.

    Written to a temporary name and renamed, so a reader sees a whole prewarp or none.

    Raises
    ------
    DetectorError
        As :meth:`TemplateStore.warp_to` (no template, too little coverage, unreadable).
    """
    big_wcs, big_shape = _expanded(wcs, shape, margin)
    warped = store.warp_to(band, big_wcs, big_shape, info=info)
    assert warped.psf is not None
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        np.save(tmp / "image.npy", warped.image)
        np.save(tmp / "variance.npy", warped.variance)
        np.save(tmp / "mask.npy", warped.mask)
        np.save(tmp / "psf.npy", warped.psf.image)
        meta = {
            "format": _FORMAT,
            "band": band,
            "margin": margin,
            "shape": list(shape),
            "wcs": big_wcs.to_header_string(relax=True),
            "header": warped.metadata.tostring(),
            "psf": {"fwhm_px": warped.psf.fwhm_px, "e1": warped.psf.e1, "e2": warped.psf.e2},
            "zero_point": warped.zero_point,
            "pixel_scale_arcsec": warped.pixel_scale_arcsec,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _offsets(wcs: WCS, shape: tuple[int, int], predicted: WCS) -> tuple[np.ndarray, np.ndarray]:
    """Predicted-grid position minus science position on a 7×7 grid (x, y)."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 7), np.linspace(0, ny - 1, 7))
    ra, dec = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    qx, qy = predicted.all_world2pix(ra, dec, 0)
    return np.asarray(qx) - gx.ravel(), np.asarray(qy) - gy.ravel()


def lanczos_weights(frac: float, a: int = _LANCZOS_A) -> np.ndarray:
    """Lanczos-``a`` weights of the 2a pixels ``k = 1−a … a`` for a value at ``0 + frac``,
    normalised to sum 1 (a flat image stays flat)."""
    k = np.arange(1 - a, a + 1, dtype=np.float64)
    x = k - frac
    w = np.sinc(x) * np.sinc(x / a)
    return w / w.sum()


def _shift_axis(src: np.ndarray, start: int, n: int, frac: float, axis: int) -> np.ndarray:
    """``out[j] = Σ_k w_k src[start + j + k]`` along ``axis`` (k = −2 … 3), j < n."""
    w = lanczos_weights(frac).astype(np.float32)
    a = _LANCZOS_A
    lo, hi = start - a + 1, start + n + a
    slab = src[lo:hi, :] if axis == 0 else src[:, lo:hi]
    # correlate1d with an even-length (6) filter: out[i] = Σ_m w[m] in[i + m − 3]; the
    # origin −1 makes it Σ_m w[m] in[i + m − 2], i.e. k = m − 2 around i.
    out = ndi.correlate1d(slab, w, axis=axis, mode="constant", origin=-1)
    core = slice(a - 1, a - 1 + n)
    return out[core, :] if axis == 0 else out[:, core]


def from_prewarped(
    directory: Path,
    wcs: WCS,
    shape: tuple[int, int],
    *,
    info: VisitInfo | None = None,
    max_residual_px: float = MAX_RESIDUAL_PX,
) -> Exposure | PrewarpMiss:
    """The prewarped template on the grid of a science exposure with WCS ``wcs``.

    Returns
    -------
    Exposure or PrewarpMiss
        The template (nJy, as :meth:`TemplateStore.warp_to` returns it), or why the prewarp
        does not fit this science grid (missing, another format or shape, a mapping that is
        not a translation, a pointing error past the margin).
    """
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return PrewarpMiss(f"no prewarped template at {directory}")
    if meta.get("format") != _FORMAT or tuple(meta["shape"]) != tuple(shape):
        return PrewarpMiss(f"prewarped template at {directory} is for another grid")
    margin = int(meta["margin"])
    predicted = WCS(fits.Header.fromstring(meta["wcs"]))
    dx, dy = _offsets(wcs, shape, predicted)
    sx, sy = float(np.median(dx)), float(np.median(dy))
    dev = float(max(np.abs(dx - sx).max(), np.abs(dy - sy).max()))
    if not math.isfinite(dev) or dev > max_residual_px:
        return PrewarpMiss(
            f"fitted WCS departs from a shift of the predicted one by {dev:.3f} px "
            f"(limit {max_residual_px} px)"
        )
    ny, nx = shape
    ix, iy = math.floor(sx), math.floor(sy)
    fx, fy = sx - ix, sy - iy
    a = _LANCZOS_A
    big_ny, big_nx = ny + 2 * margin, nx + 2 * margin
    if ix - a + 1 < 0 or iy - a + 1 < 0 or ix + nx + a > big_nx or iy + ny + a > big_ny:
        return PrewarpMiss(
            f"pointing offset ({sx - margin:+.1f}, {sy - margin:+.1f}) px is past the "
            f"prewarp's {margin}-pixel margin"
        )
    # Whole reads: faulting a memory map in page by page costs more than reading it.
    image = np.load(directory / "image.npy")
    variance = np.load(directory / "variance.npy")
    mask = np.load(directory / "mask.npy")
    rows = _shift_axis(image[iy - a + 1 : iy + ny + a], ix, nx, fx, axis=1)
    out_image = np.ascontiguousarray(_shift_axis(rows, a - 1, ny, fy, axis=0), np.float32)
    rx, ry = round(sx), round(sy)
    out_var = np.array(variance[ry : ry + ny, rx : rx + nx], np.float32)
    out_mask = np.array(mask[iy : iy + ny, ix : ix + nx])
    out_mask |= mask[iy + 1 : iy + 1 + ny, ix : ix + nx]
    out_mask |= mask[iy : iy + ny, ix + 1 : ix + 1 + nx]
    out_mask |= mask[iy + 1 : iy + 1 + ny, ix + 1 : ix + 1 + nx]
    nodata = np.uint16(Mask.NO_DATA)
    region = mask[iy - a + 1 : iy + ny + a, ix - a + 1 : ix + nx + a]
    if np.any(region & nodata):
        grown = _grown_nodata((region & nodata) != 0, ny, nx)
        out_mask[grown] |= nodata
    header = fits.Header.fromstring(meta["header"])
    header["TMPLPREW"] = (True, "template warped on nextVisit, then shifted")
    header["TMPLSHX"] = (round(sx - margin, 4), "shift from the predicted grid, x pixels")
    header["TMPLSHY"] = (round(sy - margin, 4), "shift from the predicted grid, y pixels")
    header["TMPLSHRE"] = (round(dev, 4), "largest departure from a pure shift, pixels")
    psf = meta["psf"]
    band = str(meta["band"])
    return Exposure(
        image=out_image,
        variance=out_var,
        mask=out_mask,
        info=_template_info(info, band),
        metadata=header,
        wcs=wcs,
        pixel_scale_arcsec=float(meta["pixel_scale_arcsec"]),
        psf=PsfModel(
            image=np.load(directory / "psf.npy"),
            fwhm_px=float(psf["fwhm_px"]),
            e1=float(psf["e1"]),
            e2=float(psf["e2"]),
        ),
        zero_point=meta["zero_point"],
    )


def _grown_nodata(region: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Science pixels whose Lanczos support (k = −2 … 3 per axis) touches a NO_DATA pixel of
    ``region`` (the prewarp from 2 pixels before to 3 after the science grid)."""
    a = _LANCZOS_A
    cols = np.zeros((region.shape[0], nx), bool)
    for k in range(2 * a):
        cols |= region[:, k : k + nx]
    out = np.zeros((ny, nx), bool)
    for k in range(2 * a):
        out |= cols[k : k + ny, :]
    return out
