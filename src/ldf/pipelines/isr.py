"""Instrument signature removal (ISR): from a raw multi-amplifier readout to an exposure in e-.

What :func:`run_isr` does, in the order of Rubin's ``IsrTaskLSST`` (``ip_isr``; LDM-151 §6.1,
LDM-230 §2.1 "instrument signature removal")::

    per amplifier (geometry from the HDU's DATASEC / BIASSEC / DETSEC, not from the camera)
        serial overscan   a 3σ-clipped mean of the overscan columns of each row (Rubin's
                          MEDIAN_PER_ROW idea: row-correlated bias jumps are common to data and
                          overscan), subtracted row by row; the clipped rms of the overscan
                          is the amplifier's measured read noise
        saturation        SAT where the overscan-subtracted level reaches
                          ``SATURATION_FRACTION`` of the amplifier's saturation (ADU), grown
                          ``SATURATION_GROW_PX`` along the columns (bleed trails)
        gain              ADU → electrons (nominal gains of the camera description, as
                          obs_lsst's); readout flips undone into the assembled image
        bias              − master bias (e-)
        dark              − master dark rate (e-/s) × DARKTIME
        variance          (max(signal, 0) + read_noise²) / flat²
        flat              ÷ master flat (normalised to median 1)
    defects               BAD (+ INTRP) from the calibrations' defect masks, interpolated
    cosmic rays           CR (+ INTRP), interpolated

Cosmic rays
    Detected with the "neighbour contrast" test of Rubin's ``findCosmicRays``
    (``meas_algorithms`` CR.cc, designed by K. Shimasaku and R. Lupton for SDSS PHOTO):
    a pixel more than ``CR_MIN_SIGMA`` σ above the sky is a cosmic ray when, for some
    direction d (horizontal, vertical, two diagonals),
    ``thres_d · (p − c₃ σ_p) > mean_d + c₃ σ_mean`` with p and the mean of its two
    neighbours along d above the background, ``c₃ = CR_COND3_FAC`` and
    ``thres_d = CR_COND3_FAC2 · PSF(d)/PSF(0)``. No optical image can be sharper than the
    PSF, so a star can never pass; ISR runs before any PSF is measured, so the PSF used
    is the *sharpest the site delivers* (``CR_MIN_PSF_FWHM_ARCSEC``, a Moffat of Rubin's
    β = 4.765), which makes the test safe for every real PSF. The neighbours of CR pixels
    are then examined again with ``c₃ = 0`` after the CR pixels were interpolated
    (Lupton's second pass), which picks up the fainter ends of tracks. L.A.Cosmic
    (van Dokkum 2001, PASP 113, 1420; ``astroscrappy``) is the usual alternative; its
    Laplacian and median filters over the whole image cost seconds per 16 Mpix CCD, while the
    contrast test only looks at the few 10⁵ pixels above the threshold.

Interpolation (defects and cosmic rays)
    Linear interpolation along the row or the column, whichever has the shorter gap between
    the nearest good pixels (at most ``INTERP_MAX_GAP`` away), else the amplifier's sky level;
    the variance plane is interpolated the same way.

Units: the assembled image and variance are in electrons and electrons² (see
:mod:`ldf.pipelines.types`). Only numpy is used: every step is a few vectorised passes over
each amplifier while it is in cache, plus work proportional to the pixels above threshold.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits

from ldf.butler.formatters import RawImage
from ldf.errors import LdfError
from ldf.pipelines.types import DetectorError, Exposure, Mask, VisitInfo
from ldf.sim.psf import MOFFAT_BETA
from ldf.sim.wcs import detector_wcs

if TYPE_CHECKING:
    from ldf.pipelines.calibs import CalibSet, MasterCalib
    from ldf.sim.instruments import Amplifier, Detector, Instrument

__all__ = [
    "CR_COND3_FAC",
    "CR_COND3_FAC2",
    "CR_MIN_PSF_FWHM_ARCSEC",
    "CR_MIN_SIGMA",
    "INTERP_MAX_GAP",
    "OVERSCAN_SKIP_COLUMNS",
    "SATURATION_FRACTION",
    "SATURATION_GROW_PX",
    "amplifier_noise",
    "read_raw",
    "run_isr",
]

STAGE = "isr"

OVERSCAN_SKIP_COLUMNS = 2
"""Leading serial-overscan columns not used: charge-transfer inefficiency trails the last
data columns into them on real CCDs (Rubin's ``leadingToSkip``)."""
OVERSCAN_CLIP_NSIGMA = 3.0
"""Clipping of the per-row overscan mean and of the overscan noise estimate (σ)."""
SATURATION_FRACTION = 0.98
"""A pixel whose overscan-subtracted level reaches this fraction of its amplifier's
saturation (ADU) is SAT: shot noise (σ ≈ 250 ADU at a full well) scatters pixels filled to
the full well below the clipping level, and near-full pixels are non-linear anyway."""
SATURATION_GROW_PX = 2
"""SAT is grown this many pixels up and down the columns (the bleed direction), so the
partly filled ends of bleed trails are masked too."""
CR_MIN_SIGMA = 6.0
"""Cosmic-ray candidates are this many sky σ above the amplifier's sky level (Rubin's
``minSigma``), and above the mean of two opposite neighbours by as much (condition 2)."""
CR_COND3_FAC = 2.5
"""Noise allowance (σ) of the sharpness test (Rubin's ``cond3_fac``)."""
CR_COND3_FAC2 = 0.6
"""Fraction of the PSF's own neighbour-to-peak ratio a cosmic ray must fall below (Rubin's
``cond3_fac2``, 0.4 there with the measured PSF; 0.6 here because the PSF assumed is already
the sharpest possible one)."""
CR_MIN_PSF_FWHM_ARCSEC = 0.45
"""Sharpest PSF assumed by the cosmic-ray test: the best seeing delivered on Cerro Pachón
(the site's seeing rarely goes below 0.45″). Nothing optical is sharper."""
CR_GROW_ITERATIONS = 2
"""Passes of the neighbour re-examination (Lupton's second pass), each with ``c₃ = 0`` and
half the candidate threshold."""
INTERP_MAX_GAP = 8
"""Farthest good pixel (pixels) linear interpolation looks for along a row or a column."""

_INTERP_AVOID = np.uint16(Mask.BAD | Mask.SAT | Mask.CR | Mask.NO_DATA)
_SECTION = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")
_BLOCK_ROWS = 128
"""Rows per block of the per-amplifier arithmetic: a block of every plane stays in cache."""
_SKY_SAMPLE_STEP = 8
"""Sky level and noise per amplifier come from every 8th pixel of every 8th row."""


# ------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _AmpPlan:
    """Where one amplifier's pixels are: raw sections (readout order) and assembled place."""

    amp: Amplifier
    data: tuple[slice, slice]
    overscan: tuple[slice, slice]
    y0: int
    x0: int
    ny: int
    nx: int
    flip_x: bool
    flip_y: bool

    @property
    def det(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y0 + self.ny), slice(self.x0, self.x0 + self.nx))


def _section(header: fits.Header, key: str, where: str) -> tuple[int, int, int, int]:
    """``[x1:x2,y1:y2]`` (1-based, inclusive, possibly reversed) of a header keyword."""
    value = header.get(key)
    match = _SECTION.match(str(value)) if isinstance(value, str) else None
    if match is None:
        raise DetectorError(STAGE, f"{where}: {key} is {value!r}, not a section [x1:x2,y1:y2]")
    x1, x2, y1, y2 = (int(g) for g in match.groups())
    if min(x1, x2, y1, y2) < 1:
        raise DetectorError(STAGE, f"{where}: {key} {value} starts before pixel 1")
    return x1, x2, y1, y2


def _resolve_detector(raw: RawImage, camera: Instrument) -> Detector:
    header = raw.metadata
    where = f"raw {header.get('OBSID', '?')}"
    instrument = header.get("INSTRUME")
    if instrument != camera.name:
        raise DetectorError(STAGE, f"{where} is from {instrument!r}, not {camera.name}")
    try:
        det_id = int(header["DETECTOR"])
        name = f"{header['RAFTBAY']}_{header['CCDSLOT']}"
        detector = camera.detector_by_id(det_id)
    except (KeyError, TypeError, ValueError, LdfError) as exc:
        raise DetectorError(STAGE, f"{where}: cannot identify the detector: {exc}") from exc
    if detector.name != name:
        raise DetectorError(
            STAGE,
            f"{where}: DETECTOR {det_id} is {detector.name} in {camera.name} but "
            f"RAFTBAY/CCDSLOT say {name}",
        )
    return detector


def _plan(raw: RawImage, detector: Detector) -> tuple[list[_AmpPlan], tuple[int, int]]:
    """Amplifier sections from the HDU headers, checked against the pixels and each other."""
    where = f"{raw.metadata.get('OBSID', '?')} {detector.name}"
    expected = [a.name for a in detector.amplifiers]
    missing = [n for n in expected if n not in raw.amplifiers]
    extra = sorted(set(raw.amplifiers) - set(expected))
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing amplifier HDU(s) {', '.join(missing)}")
        if extra:
            what.append(f"unknown amplifier HDU(s) {', '.join(extra)}")
        raise DetectorError(STAGE, f"{where}: {'; '.join(what)} (truncated or corrupt raw?)")
    plans: list[_AmpPlan] = []
    det_size: tuple[int, int] | None = None
    if "DETSIZE" in raw.metadata:
        _, dx2, _, dy2 = _section(raw.metadata, "DETSIZE", where)
        det_size = (dy2, dx2)
    for amp in detector.amplifiers:
        pix = raw.amplifiers[amp.name]
        hdr = raw.amp_headers.get(amp.name, fits.Header())
        at = f"{where} amplifier {amp.name}"
        if not isinstance(pix, np.ndarray) or pix.ndim != 2 or pix.dtype.kind not in "iuf":
            raise DetectorError(STAGE, f"{at}: pixels are not a 2-D numeric image")
        rows, cols = pix.shape
        dx1, dx2, dy1, dy2 = _section(hdr, "DATASEC", at)
        bx1, bx2, by1, by2 = _section(hdr, "BIASSEC", at)
        tx1, tx2, ty1, ty2 = _section(hdr, "DETSEC", at)
        if dx1 > dx2 or dy1 > dy2 or bx1 > bx2 or by1 > by2:
            raise DetectorError(STAGE, f"{at}: DATASEC/BIASSEC must run forwards")
        if max(dx2, bx2) > cols or max(dy2, by2) > rows:
            raise DetectorError(
                STAGE,
                f"{at}: pixels are {rows}×{cols} but DATASEC {hdr['DATASEC']} / BIASSEC "
                f"{hdr['BIASSEC']} need more (truncated readout?)",
            )
        if (by1, by2) != (dy1, dy2):
            raise DetectorError(
                STAGE, f"{at}: BIASSEC rows {by1}:{by2} differ from DATASEC rows {dy1}:{dy2}"
            )
        skip = OVERSCAN_SKIP_COLUMNS if bx2 - bx1 + 1 > OVERSCAN_SKIP_COLUMNS + 4 else 0
        nx, ny = dx2 - dx1 + 1, dy2 - dy1 + 1
        if (abs(tx2 - tx1) + 1, abs(ty2 - ty1) + 1) != (nx, ny):
            raise DetectorError(
                STAGE, f"{at}: DETSEC {hdr['DETSEC']} is not the size of DATASEC {hdr['DATASEC']}"
            )
        plans.append(
            _AmpPlan(
                amp=amp,
                data=(slice(dy1 - 1, dy2), slice(dx1 - 1, dx2)),
                overscan=(slice(by1 - 1, by2), slice(bx1 - 1 + skip, bx2)),
                y0=min(ty1, ty2) - 1,
                x0=min(tx1, tx2) - 1,
                ny=ny,
                nx=nx,
                flip_x=tx1 > tx2,
                flip_y=ty1 > ty2,
            )
        )
    ny_det = max(p.y0 + p.ny for p in plans)
    nx_det = max(p.x0 + p.nx for p in plans)
    if det_size is not None and det_size != (ny_det, nx_det):
        raise DetectorError(
            STAGE,
            f"{where}: DETSIZE is {det_size[1]}×{det_size[0]} but DETSEC span {nx_det}×{ny_det}",
        )
    area = sum(p.nx * p.ny for p in plans)
    overlap = any(
        a.x0 < b.x0 + b.nx and b.x0 < a.x0 + a.nx and a.y0 < b.y0 + b.ny and b.y0 < a.y0 + a.ny
        for i, a in enumerate(plans)
        for b in plans[i + 1 :]
    )
    if overlap or area != nx_det * ny_det:
        raise DetectorError(STAGE, f"{where}: amplifier DETSECs do not tile the detector")
    return plans, (ny_det, nx_det)


# ------------------------------------------------------------------------------- overscan


def _overscan_rows(overscan: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-row clipped mean of the serial overscan (ADU) and its clipped rms (ADU).

    The rms is about the row means, i.e. the read noise of one pixel (×sqrt(1 − 1/ncol)).
    """
    osf = overscan.astype(np.float32)
    ncol = osf.shape[1]
    level = osf.mean(axis=1, dtype=np.float64).astype(np.float32)
    resid = osf - level[:, None]
    sigma = float(np.std(resid))
    if sigma == 0.0 or not math.isfinite(sigma):
        return level, 0.0 if sigma == 0.0 else float("nan")
    for _ in range(2):
        good = np.abs(resid) <= np.float32(OVERSCAN_CLIP_NSIGMA * sigma)
        n = good.sum(axis=1)
        sums = np.where(good, osf, np.float32(0)).sum(axis=1, dtype=np.float64)
        level = np.where(n > 0, sums / np.maximum(n, 1), level).astype(np.float32)
        resid = osf - level[:, None]
        sigma = float(np.sqrt(np.mean(resid[good] ** 2)))
    # Clipping at 3σ trims 0.27 % of a Gaussian and the rms by 1.3 %; the row mean took one
    # degree of freedom of each row. Undo both so this is the single-pixel noise.
    return level, sigma / 0.98665 * math.sqrt(ncol / max(ncol - 1, 1))


# ------------------------------------------------------------------------------- calibs


def _check_calib(
    calib: MasterCalib | None,
    kind: str,
    info: VisitInfo,
    shape: tuple[int, int],
) -> MasterCalib:
    what = f"{info.detector}" + (f" band {info.band}" if kind == "flat" else "")
    if calib is None:
        raise DetectorError(STAGE, f"no master {kind} for {what} (exposure {info.exposure_id})")
    if calib.kind != kind:
        raise DetectorError(STAGE, f"the master {kind} given for {what} is a {calib.kind}")
    if calib.instrument != info.instrument or calib.detector != info.detector:
        raise DetectorError(
            STAGE,
            f"no master {kind} for {what}: the one given is for {calib.instrument} "
            f"{calib.detector}",
        )
    if kind == "flat" and calib.band != info.band:
        raise DetectorError(
            STAGE, f"no master flat for {what}: the one given is for band {calib.band}"
        )
    if calib.image.shape != shape:
        raise DetectorError(
            STAGE,
            f"master {kind} for {what} is {calib.image.shape[1]}×{calib.image.shape[0]} px, "
            f"the raw assembles to {shape[1]}×{shape[0]} (made at another scale?)",
        )
    return calib


# ------------------------------------------------------------------------------- the task


def read_raw(path: str | Path) -> RawImage:
    """Read a raw file for ISR, turning every way it can fail into a :class:`DetectorError`.

    Parameters
    ----------
    path
        A raw multi-extension FITS file (as :mod:`ldf.archiver.rawfits` writes them).

    Raises
    ------
    DetectorError
        The file is missing, unreadable, truncated or not a FITS file.
    """
    if not Path(path).is_file():
        raise DetectorError(STAGE, f"raw {path} does not exist")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            raw = RawImage.read(path)
    except (OSError, ValueError, TypeError, KeyError, IndexError, EOFError) as exc:
        raise DetectorError(
            STAGE, f"cannot read raw {path} (truncated, or not a raw FITS file): {exc}"
        ) from exc
    for w in caught:
        text = str(w.message)
        if "truncated" in text.lower() or "corrupt" in text.lower():
            raise DetectorError(STAGE, f"raw {path} is damaged: {text}")
    if not raw.amplifiers:
        raise DetectorError(STAGE, f"raw {path} has no amplifier HDUs")
    return raw


def run_isr(
    raw: RawImage,
    camera: Instrument,
    calibs: CalibSet | None = None,
    *,
    do_bias: bool = True,
    do_dark: bool = True,
    do_flat: bool = True,
    mask_cosmic_rays: bool = True,
    keep_cosmic_rays: bool = False,
) -> Exposure:
    """Remove the instrument signature of one detector's raw exposure.

    See the module docstring for the algorithm.

    Parameters
    ----------
    raw
        The raw readout (:meth:`ldf.butler.formatters.RawImage.read` or :func:`read_raw`).
    camera
        The instrument, ``ldf.sim.instruments.get_instrument(name, scale)``: gains,
        saturation and nominal read noise per amplifier (these do not depend on ``scale``);
        the geometry comes from the raw's headers.
    calibs
        Master bias, dark and flat of this detector (and band, for the flat). Their defect
        masks are applied whenever they are given.
    do_bias, do_dark, do_flat
        Apply that correction; a correction asked for needs its master calibration.
    mask_cosmic_rays
        Find, mask (CR) and interpolate cosmic rays.
    keep_cosmic_rays
        Mask cosmic rays but leave their pixel values (Rubin's ``keepCRs``): for master
        calibrations, which must tell a hot pixel (flagged in every input) from a cosmic ray.

    Returns
    -------
    Exposure
        Image (e-), variance (e-²) and mask; ``info`` from the header, ``wcs`` from the
        header's commanded pointing (None without one), ``metadata`` the primary header
        plus ``LDF ISR …`` keywords (per-amplifier overscan noise and read noise, the
        corrections applied, the number of CR pixels).

    Raises
    ------
    DetectorError
        Missing or mismatched calibration, a missing or misshapen amplifier HDU, a header
        without usable geometry (stage 'isr'), or unusable exposure keywords (stage 'header').
    """
    info = VisitInfo.from_header(raw.metadata)
    detector = _resolve_detector(raw, camera)
    plans, shape = _plan(raw, detector)
    ny, nx = shape

    bias = _check_calib(calibs.bias if calibs else None, "bias", info, shape) if do_bias else None
    dark = _check_calib(calibs.dark if calibs else None, "dark", info, shape) if do_dark else None
    flat = _check_calib(calibs.flat if calibs else None, "flat", info, shape) if do_flat else None
    if do_flat and info.band is None:
        raise DetectorError(STAGE, f"{info.detector}: the raw has no band; cannot flat-field")
    defect_calibs = []
    if calibs is not None:
        for calib in (calibs.bias, calibs.dark, calibs.flat):
            if calib is not None and calib.image.shape == shape:
                defect_calibs.append(calib)
    dark_time = np.float32(info.dark_time_s)

    image = np.empty(shape, np.float32)
    variance = np.empty(shape, np.float32)
    mask = np.zeros(shape, np.uint16)
    scratch = np.empty((_BLOCK_ROWS, max(p.nx for p in plans)), np.float32)
    sky = np.zeros(len(plans))
    sky_sigma = np.zeros(len(plans))
    noise: dict[str, tuple[float, float]] = {}
    cand_parts: list[np.ndarray] = []

    for k, plan in enumerate(plans):
        amp = plan.amp
        pixels = raw.amplifiers[amp.name]
        level, os_noise = _overscan_rows(pixels[plan.overscan])
        gain = np.float32(amp.gain)
        read_noise = os_noise * amp.gain
        noise[amp.name] = (os_noise, read_noise)
        data = pixels[plan.data]
        if plan.flip_x:
            data = data[:, ::-1]
        if plan.flip_y:
            data = data[::-1]
            level = level[::-1]
        det = plan.det
        out = image[det]
        var = variance[det]
        # Overscan, gain and saturation on the whole amplifier (one cast-and-subtract pass).
        np.subtract(data, level[:, None], out=out, dtype=np.float32)
        sat_adu = np.float32(SATURATION_FRACTION * amp.saturation)
        if float(out.max()) >= sat_adu:
            _mask_saturation(out >= sat_adu, mask[det])
        out *= gain
        rn2 = np.float32(read_noise**2)
        # Calibrations in blocks of rows so every plane of a block stays in cache.
        for r0 in range(0, plan.ny, _BLOCK_ROWS):
            r1 = min(r0 + _BLOCK_ROWS, plan.ny)
            rows = slice(plan.y0 + r0, plan.y0 + r1)
            cols = det[1]
            o = out[r0:r1]
            if bias is not None:
                o -= bias.image[rows, cols]
            if dark is not None:
                tmp = scratch[: r1 - r0, : plan.nx]
                np.multiply(dark.image[rows, cols], dark_time, out=tmp)
                o -= tmp
            v = var[r0:r1]
            np.maximum(o, np.float32(0), out=v)
            v += rn2
            if flat is not None:
                inv = flat.inverse_image[rows, cols]
                o *= inv
                v *= inv
                v *= inv
        sample_img = out[::_SKY_SAMPLE_STEP, ::_SKY_SAMPLE_STEP]
        sky[k] = float(np.median(sample_img))
        sky_sigma[k] = math.sqrt(
            max(float(np.median(var[::_SKY_SAMPLE_STEP, ::_SKY_SAMPLE_STEP])), 1e-12)
        )
        if mask_cosmic_rays:
            r, c = np.nonzero(out > np.float32(sky[k] + CR_MIN_SIGMA * sky_sigma[k]))
            cand_parts.append((r + plan.y0) * nx + (c + plan.x0))

    sky_map = _AmpLookup(plans, sky)
    defect_index = _defect_index(defect_calibs)
    if defect_index.size:
        mask.reshape(-1)[defect_index] |= np.uint16(Mask.BAD | Mask.INTRP)
        _interpolate(image, variance, mask, defect_index, sky_map)

    n_cr = 0
    if mask_cosmic_rays:
        cand = np.concatenate(cand_parts) if cand_parts else np.empty(0, np.int64)
        n_cr = _mask_cosmic_rays(
            image,
            variance,
            mask,
            cand,
            sky_map,
            _AmpLookup(plans, sky_sigma),
            camera.pixel_scale_arcsec,
            keep=keep_cosmic_rays,
        )

    metadata = raw.metadata.copy()
    for name, (os_noise, read_noise) in noise.items():
        metadata[f"HIERARCH LDF ISR OSNOISE {name}"] = (round(os_noise, 4), "[ADU] overscan rms")
        metadata[f"HIERARCH LDF ISR RDNOISE {name}"] = (round(read_noise, 4), "[e-] read noise")
    metadata["HIERARCH LDF ISR BIAS"] = (bias is not None, "master bias subtracted")
    metadata["HIERARCH LDF ISR DARK"] = (dark is not None, "master dark subtracted")
    metadata["HIERARCH LDF ISR FLAT"] = (flat is not None, "flat-fielded")
    metadata["HIERARCH LDF ISR NDEFECT"] = (int(defect_index.size), "defect pixels interpolated")
    metadata["HIERARCH LDF ISR NCRPIX"] = (n_cr, "cosmic-ray pixels masked")

    wcs = None
    if info.ra_deg is not None and info.dec_deg is not None:
        wcs_detector = detector
        if (detector.ny, detector.nx) != shape:
            # A camera description at another scale: the pixel grid is the raw's.
            wcs_detector = replace(detector, nx=nx, ny=ny)
        wcs = detector_wcs(camera, wcs_detector, info.ra_deg, info.dec_deg, info.rot_sky_deg or 0.0)
    return Exposure(
        image=image,
        variance=variance,
        mask=mask,
        info=info,
        metadata=metadata,
        wcs=wcs,
        pixel_scale_arcsec=camera.pixel_scale_arcsec,
    )


def amplifier_noise(exposure: Exposure) -> dict[str, tuple[float, float]]:
    """Per-amplifier noise :func:`run_isr` measured in the serial overscan.

    Returns
    -------
    dict
        Amplifier name → (overscan rms in ADU, read noise in electrons).
    """
    out: dict[str, tuple[float, float]] = {}
    prefix = "LDF ISR OSNOISE "
    for key in exposure.metadata:
        if key.startswith(prefix):
            name = key[len(prefix) :]
            out[name] = (
                float(exposure.metadata[key]),
                float(exposure.metadata[f"HIERARCH LDF ISR RDNOISE {name}"]),
            )
    return out


# ------------------------------------------------------------------------------- masks


def _mask_saturation(saturated: np.ndarray, mask: np.ndarray) -> None:
    """OR SAT into ``mask`` where ``saturated``, grown along the columns (assembled view)."""
    grown = saturated.copy()
    for k in range(1, SATURATION_GROW_PX + 1):
        grown[k:] |= saturated[:-k]
        grown[:-k] |= saturated[k:]
    np.bitwise_or(mask, np.uint16(Mask.SAT), out=mask, where=grown)


class _AmpLookup:
    """A per-amplifier value at pixel positions (amplifiers tile the detector in a grid)."""

    def __init__(self, plans: list[_AmpPlan], values: np.ndarray) -> None:
        self.plans = plans
        self.values = values

    def at(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        out = np.zeros(iy.shape, np.float64)
        for plan, value in zip(self.plans, self.values, strict=True):
            inside = (
                (iy >= plan.y0)
                & (iy < plan.y0 + plan.ny)
                & (ix >= plan.x0)
                & (ix < plan.x0 + plan.nx)
            )
            out[inside] = value
        return out


def _defect_index(calibs: list[MasterCalib]) -> np.ndarray:
    parts = [c.defect_index for c in calibs if c.defect_index.size]
    if not parts:
        return np.empty(0, np.int64)
    return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))


def _interpolate(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    index: np.ndarray,
    sky: _AmpLookup,
) -> None:
    """Replace ``image``/``variance`` at flat ``index`` by linear interpolation (in place).

    Along the row or the column with the shorter gap between the nearest pixels not masked
    BAD/SAT/CR/NO_DATA (at most ``INTERP_MAX_GAP`` away); the amplifier's sky where neither
    has one. Hand-written (not ``scipy.interpolate``): a vectorised nearest-good search over
    a few thousand pixels is all that is needed.
    """
    if index.size == 0:
        return
    ny, nx = image.shape
    iy, ix = np.divmod(index, nx)
    steps = np.arange(1, INTERP_MAX_GAP + 1)
    flat_mask = mask.reshape(-1)
    best_gap = np.full(index.size, np.inf)
    best_img = sky.at(iy, ix)
    best_var = np.zeros(index.size)
    for dy, dx in ((0, 1), (1, 0)):
        ends = []
        for sign in (-1, 1):
            yy = iy[:, None] + sign * dy * steps[None, :]
            xx = ix[:, None] + sign * dx * steps[None, :]
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            flat = np.where(inside, yy * nx + xx, 0)
            good = inside & ((flat_mask[flat] & _INTERP_AVOID) == 0)
            found = good.any(axis=1)
            first = np.argmax(good, axis=1)
            where = flat[np.arange(index.size), first]
            ends.append((found, first + 1.0, where))
        (f1, d1, w1), (f2, d2, w2) = ends
        v1, v2 = image.reshape(-1)[w1], image.reshape(-1)[w2]
        s1, s2 = variance.reshape(-1)[w1], variance.reshape(-1)[w2]
        both = f1 & f2
        gap = np.where(both, d1 + d2, np.where(f1, 2 * d1, np.where(f2, 2 * d2, np.inf)))
        with np.errstate(invalid="ignore", divide="ignore"):
            img = np.where(both, (v1 * d2 + v2 * d1) / (d1 + d2), np.where(f1, v1, v2))
            var = np.where(both, (s1 * d2 + s2 * d1) / (d1 + d2), np.where(f1, s1, s2))
        better = gap < best_gap
        best_gap = np.where(better, gap, best_gap)
        best_img = np.where(better, img, best_img)
        best_var = np.where(better, var, best_var)
    no_source = ~np.isfinite(best_gap)
    if np.any(no_source):
        best_var[no_source] = np.median(variance[::_SKY_SAMPLE_STEP, ::_SKY_SAMPLE_STEP])
    image.reshape(-1)[index] = best_img
    variance.reshape(-1)[index] = best_var


# ------------------------------------------------------------------------------- cosmic rays


def _psf_ratios(fwhm_px: float) -> tuple[float, float]:
    """Moffat (β = 4.765) PSF at 1 and √2 pixels from its peak, relative to the peak."""
    alpha2 = (fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / MOFFAT_BETA) - 1.0))) ** 2
    return (1.0 + 1.0 / alpha2) ** -MOFFAT_BETA, (1.0 + 2.0 / alpha2) ** -MOFFAT_BETA


def _contrast_test(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    cand: np.ndarray,
    sky: np.ndarray,
    min_excess: np.ndarray,
    thresholds: tuple[float, float],
    cond3_fac: float,
) -> np.ndarray:
    """Rubin's conditions 2-4 for flat pixel indices ``cand`` (interior pixels only)."""
    nx = image.shape[1]
    img = image.reshape(-1)
    var = variance.reshape(-1)
    msk = mask.reshape(-1)
    p = img[cand] - sky
    sig_p = np.sqrt(np.maximum(var[cand], 0.0))
    cond2 = np.zeros(cand.size, bool)
    cond3 = np.zeros(cand.size, bool)
    near_sat = np.zeros(cand.size, bool)
    thr_1, thr_d = thresholds
    for offset, thr in ((1, thr_1), (nx, thr_1), (nx + 1, thr_d), (nx - 1, thr_d)):
        lo, hi = cand - offset, cand + offset
        mean = 0.5 * (img[lo] + img[hi]) - sky
        sig_mean = 0.5 * np.sqrt(np.maximum(var[lo] + var[hi], 0.0))
        cond2 |= p - mean > min_excess
        cond3 |= thr * (p - cond3_fac * sig_p) > mean + cond3_fac * sig_mean
        near_sat |= ((msk[lo] | msk[hi]) & np.uint16(Mask.SAT)) != 0
    return cond2 & cond3 & ~near_sat


def _mask_cosmic_rays(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    cand: np.ndarray,
    sky: _AmpLookup,
    sky_sigma: _AmpLookup,
    pixel_scale_arcsec: float,
    *,
    keep: bool = False,
) -> int:
    """Find, mask and interpolate cosmic rays; returns the number of CR pixels.

    With ``keep``, the CR pixels get their original values back at the end (they are
    interpolated meanwhile so the second pass judges their neighbours against clean values).
    """
    ny, nx = image.shape
    ratio_1, ratio_d = _psf_ratios(CR_MIN_PSF_FWHM_ARCSEC / pixel_scale_arcsec)
    thresholds = (CR_COND3_FAC2 * ratio_1, CR_COND3_FAC2 * ratio_d)
    flat_mask = mask.reshape(-1)

    def interior(idx: np.ndarray) -> np.ndarray:
        iy, ix = np.divmod(idx, nx)
        ok = (iy > 0) & (iy < ny - 1) & (ix > 0) & (ix < nx - 1)
        ok &= (flat_mask[idx] & np.uint16(Mask.SAT | Mask.BAD | Mask.CR)) == 0
        return idx[ok]

    cand = interior(cand)
    iy, ix = np.divmod(cand, nx)
    sigma = sky_sigma.at(iy, ix)
    is_cr = _contrast_test(
        image, variance, mask, cand, sky.at(iy, ix), CR_MIN_SIGMA * sigma, thresholds, CR_COND3_FAC
    )
    found = cand[is_cr]
    total = 0
    saved: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    neighbours = np.array([-nx - 1, -nx, -nx + 1, -1, 1, nx - 1, nx, nx + 1])
    for iteration in range(CR_GROW_ITERATIONS + 1):
        if found.size == 0:
            break
        flat_mask[found] |= np.uint16(Mask.CR | Mask.INTRP)
        if keep:
            saved.append((found, image.reshape(-1)[found], variance.reshape(-1)[found]))
        _interpolate(image, variance, mask, found, sky)
        total += found.size
        if iteration == CR_GROW_ITERATIONS:
            break
        # Lupton's second pass: neighbours of CR pixels, now that those are interpolated,
        # with half the threshold and no noise allowance in the sharpness test.
        around = interior(np.unique((found[:, None] + neighbours[None, :]).ravel()))
        iy, ix = np.divmod(around, nx)
        sigma = sky_sigma.at(iy, ix)
        level = sky.at(iy, ix)
        bright = image.reshape(-1)[around] - level > 0.5 * CR_MIN_SIGMA * sigma
        around, level = around[bright], level[bright]
        is_cr = _contrast_test(
            image, variance, mask, around, level, np.full(around.size, -np.inf), thresholds, 0.0
        )
        found = around[is_cr]
    for index, values, variances in saved:
        image.reshape(-1)[index] = values
        variance.reshape(-1)[index] = variances
        flat_mask[index] &= np.uint16(~Mask.INTRP & 0xFFFF)
    return total
