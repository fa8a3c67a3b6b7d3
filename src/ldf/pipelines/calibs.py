"""Master calibrations (bias, dark, flat), their defect masks, and calibration-exposure QA.

Construction follows Rubin's ``cp_pipe`` (``cpBias``, ``cpDark``, ``cpFlat``; LDM-151 §6.9):
every input exposure goes through :func:`ldf.pipelines.isr.run_isr` with the corrections
available so far (overscan and gain for biases; + bias for darks; + bias and dark for flats),
then the inputs are combined pixel by pixel with a clipped mean: values more than
``CLIP_NSIGMA`` times the pixel's expected noise (from the inputs' variance planes) from the
stack's median are rejected, which removes cosmic rays and other one-off events without the
1.25² noise penalty of a plain median.

* **Bias** — electrons, the residual bias structure after row-by-row overscan subtraction.
* **Dark** — each input divided by its DARKTIME before combining: electrons per second.
  Hot pixels (``> HOT_PIXEL_NSIGMA`` robust σ above their amplifier's median rate) go to the
  defect mask (``Mask.BAD``) as ``cp_pipe``'s ``measureDefects`` does with darks.
* **Flat** — each input scaled by its median (lamp drifts), the combination normalised to
  median 1; the normalisation constant (e-) is kept in the header (``FLATNORM``). Pixels
  below ``LOW_FLAT_FRACTION`` of their amplifier's median response are dead/low (BAD).

Calibration QA (LDM-230 §2.1, "Calibration exposures get quality checks"): see
:func:`calibration_qa` and the ``QA_*`` constants for what is measured and the thresholds.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

from ldf.butler.formatters import RawImage
from ldf.errors import LdfError, StorageError
from ldf.pipelines.isr import amplifier_noise, run_isr
from ldf.pipelines.types import DetectorError, Exposure, Mask, VisitInfo
from ldf.sim.instruments import Instrument

__all__ = [
    "CALIB_KINDS",
    "CLIP_NSIGMA",
    "HOT_PIXEL_NSIGMA",
    "LOW_FLAT_FRACTION",
    "MIN_INPUTS",
    "QA_BIAS_LIGHT_MAX_E",
    "QA_BIAS_MEAN_MAX_E",
    "QA_BIAS_RMS_MAX_RATIO",
    "QA_DARK_CURRENT_MAX_DELTA_E_S",
    "QA_DARK_NEW_HOT_MAX_FRACTION",
    "QA_FLAT_LEVEL_MAX_FULL_WELL",
    "QA_FLAT_LEVEL_MIN_E",
    "QA_FLAT_MAX_DEVIATION",
    "QA_FLAT_RMS_MAX_RATIO",
    "QA_READ_NOISE_TOLERANCE",
    "CalibSet",
    "MasterCalib",
    "calibration_qa",
    "make_master_bias",
    "make_master_dark",
    "make_master_flat",
]

STAGE = "isr"

CALIB_KINDS = ("bias", "dark", "flat")
"""Kinds of master calibration."""
MIN_INPUTS = 3
"""Fewest exposures a master calibration is made from (clipping needs a majority)."""
CLIP_NSIGMA = 3.0
"""Rejection threshold of the combination, in units of one input's expected noise."""
HOT_PIXEL_NSIGMA = 5.0
"""A master-dark pixel this many robust σ above its amplifier's median rate is hot."""
LOW_FLAT_FRACTION = 0.8
"""A master-flat pixel below this fraction of its amplifier's median is dead/low (cp_pipe's
``fracThresholdFlat``)."""

QA_READ_NOISE_TOLERANCE = 0.15
"""Measured read noise must be within ±15 % of the camera's nominal value, every amplifier."""
QA_BIAS_LIGHT_MAX_E = 2.0
"""Light in a bias: median of (bias − master bias) above this (e-/pixel, detector or any
amplifier) means a light leak or a shutter/LED fault."""
QA_BIAS_MEAN_MAX_E = 2.0
"""|clipped mean| of (bias − master bias) above this (e-) fails (bias jump, drift)."""
QA_BIAS_RMS_MAX_RATIO = 1.3
"""Clipped rms of (bias − master bias) above this × its expectation
sqrt(RN² (1 + 1/N)) fails (pickup noise, a noisy amplifier)."""
QA_DARK_CURRENT_MAX_DELTA_E_S = 0.005
"""|dark current − master's| above this (e-/s) fails (light leak, warm CCD)."""
QA_DARK_NEW_HOT_MAX_FRACTION = 1e-4
"""More new hot pixels (isolated, not in the master's defects) than this fraction of the
pixels fails. One dark cannot tell a new hot pixel from a cosmic ray that fell within one
pixel (~1 % of them), so the limit sits well above that (~100 per 600 s on a full CCD)."""
QA_FLAT_LEVEL_MIN_E = 5_000.0
"""A flat below this median level (e-) has too little signal."""
QA_FLAT_LEVEL_MAX_FULL_WELL = 0.8
"""A flat above this fraction of the lowest amplifier full well is non-linear or saturated."""
QA_FLAT_RMS_MAX_RATIO = 1.5
"""Clipped rms of (flat / master flat) above this × the photon-noise expectation fails."""
QA_FLAT_MAX_DEVIATION = 0.01
"""Largest |median − 1| of (flat / master flat) in ``_QA_FLAT_BLOCK``² pixel blocks above
this fails (dust moved, illumination or gain change). Block medians ignore cosmic rays,
which flats cannot be cleaned of (a CR is no sharper than the flat's noise allows)."""
_QA_FLAT_BLOCK = 16
_COMBINE_ROWS = 256
_SAMPLE_STEP = 4

_IMGTYPES = {"bias": "BIAS", "dark": "DARK", "flat": "FLAT"}


# ------------------------------------------------------------------------------- containers


@dataclass(eq=False)
class MasterCalib:
    """One master calibration of one detector (and band, for flats).

    Treated as immutable once made: :attr:`defect_index` and :attr:`inverse_image` are
    computed once and cached (prompt processing applies the same calibrations all night).
    """

    kind: str
    """'bias', 'dark' or 'flat'."""
    instrument: str
    detector: str
    """Detector name, e.g. 'R22_S11'."""
    band: str | None
    """The flat's band; None for bias and dark."""
    image: np.ndarray
    """float32 (ny, nx): bias in e-, dark in e-/s of dark time, flat normalised to median 1."""
    mask: np.ndarray
    """uint16 (ny, nx): ``Mask.BAD`` at defects (hot pixels of a dark, dead pixels of a flat)."""
    n_inputs: int
    metadata: fits.Header = field(default_factory=fits.Header)
    """Input exposure ids (INPUTnnn), creation time (DATE), FLATNORM for flats…"""

    def __post_init__(self) -> None:
        if self.kind not in CALIB_KINDS:
            raise ValueError(f"master calibration kind must be one of {CALIB_KINDS}: {self.kind!r}")
        self.image = np.asarray(self.image, np.float32)
        self.mask = np.asarray(self.mask, np.uint16)
        if self.image.ndim != 2 or self.mask.shape != self.image.shape:
            raise ValueError(
                f"master {self.kind}: image {self.image.shape} and mask {self.mask.shape} "
                "must be the same 2-D shape"
            )

    @cached_property
    def defect_index(self) -> np.ndarray:
        """Flat indices (int64, sorted) of the BAD pixels."""
        return np.flatnonzero(self.mask & np.uint16(Mask.BAD))

    @cached_property
    def inverse_image(self) -> np.ndarray:
        """1 / image (float32), with 1 where the image is not positive (flats' dead pixels)."""
        inv = np.ones_like(self.image)
        np.divide(np.float32(1.0), self.image, out=inv, where=self.image > 0)
        return inv

    def save(self, path: str | Path) -> None:
        """Write a FITS file atomically: primary HDU = image, HDU 'MASK' = mask.

        Written under a temporary name in the same directory, fsynced and renamed, so a
        reader never sees a partial file; CHECKSUM/DATASUM in both HDUs.

        Raises
        ------
        StorageError
            The file could not be written (nothing is left behind).
        """
        path = Path(path)
        header = self.metadata.copy()
        header["LDFCALIB"] = (self.kind, "ldf master calibration kind")
        header["INSTRUME"] = (self.instrument, "Instrument")
        header["DETNAME"] = (self.detector, "Detector name")
        header["FILTBAND"] = (self.band, "Band of a flat")
        header["NINPUTS"] = (self.n_inputs, "Exposures combined")
        header["BUNIT"] = ({"bias": "electron", "dark": "electron/s", "flat": ""}[self.kind], "")
        hdul = fits.HDUList(
            [
                fits.PrimaryHDU(data=self.image, header=header),
                fits.ImageHDU(data=self.mask, name="MASK"),
            ]
        )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                hdul.writeto(f, checksum=True)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)  # os.replace: atomic on POSIX
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write master {self.kind} {path}: {exc}") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> MasterCalib:
        """Read a file written by :meth:`save`.

        Raises
        ------
        DetectorError
            The file is missing, truncated, fails its checksum or is not a master calib.
        """
        path = Path(path)
        if not path.is_file():
            raise DetectorError(STAGE, f"master calibration {path} does not exist")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with fits.open(path, memmap=False, checksum=True) as hdul:
                    header = hdul[0].header.copy()
                    if header.get("LDFCALIB") not in CALIB_KINDS:
                        raise DetectorError(STAGE, f"{path} is not an ldf master calibration")
                    image = np.array(hdul[0].data, dtype=np.float32)
                    mask = np.array(hdul["MASK"].data, dtype=np.uint16)
        except (OSError, ValueError, TypeError, KeyError, IndexError, EOFError) as exc:
            raise DetectorError(
                STAGE,
                f"cannot read master calibration {path} (truncated, or not a master "
                f"calibration file): {exc}",
            ) from exc
        for w in caught:
            text = str(w.message)
            if any(word in text.lower() for word in ("checksum", "datasum", "truncated")):
                raise DetectorError(STAGE, f"master calibration {path} is damaged: {text}")
        kind = header["LDFCALIB"]
        if image.ndim != 2 or mask.shape != image.shape:
            raise DetectorError(
                STAGE,
                f"master calibration {path}: image {image.shape} and mask {mask.shape} differ",
            )
        band = header.get("FILTBAND")
        try:
            return cls(
                kind=str(kind),
                instrument=str(header["INSTRUME"]),
                detector=str(header["DETNAME"]),
                band=None if band is None or isinstance(band, fits.card.Undefined) else str(band),
                image=image,
                mask=mask,
                n_inputs=int(header["NINPUTS"]),
                metadata=_strip_structure(header),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DetectorError(STAGE, f"master calibration {path} is incomplete: {exc}") from exc


def _strip_structure(header: fits.Header) -> fits.Header:
    out = header.copy()
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "CHECKSUM", "DATASUM"):
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


@dataclass
class CalibSet:
    """The master calibrations ISR applies to one detector-exposure."""

    bias: MasterCalib | None = None
    dark: MasterCalib | None = None
    flat: MasterCalib | None = None

    @property
    def defects(self) -> np.ndarray | None:
        """uint16 mask with ``Mask.BAD`` at every calibration's defects (None: no calibs)."""
        masks = [c.mask for c in (self.bias, self.dark, self.flat) if c is not None]
        if not masks:
            return None
        out = np.zeros_like(masks[0])
        for m in masks:
            if m.shape != out.shape:
                raise DetectorError(STAGE, "the calibrations of this set differ in shape")
            out |= m & np.uint16(Mask.BAD)
        return out


# ------------------------------------------------------------------------------- combination


def _check_inputs(raws: Sequence[RawImage], kind: str) -> list[VisitInfo]:
    if len(raws) < MIN_INPUTS:
        raise DetectorError(
            STAGE, f"a master {kind} needs at least {MIN_INPUTS} exposures, got {len(raws)}"
        )
    infos = []
    for raw in raws:
        if not isinstance(raw, RawImage):
            raise DetectorError(STAGE, f"master {kind} inputs must be RawImage, got {type(raw)}")
        infos.append(VisitInfo.from_header(raw.metadata))
    first = infos[0]
    for info, raw in zip(infos, raws, strict=True):
        imgtype = str(raw.metadata.get("IMGTYPE", "")).upper()
        if imgtype != _IMGTYPES[kind]:
            raise DetectorError(
                STAGE,
                f"exposure {info.exposure_id} is IMGTYPE {imgtype or '?'}, not "
                f"{_IMGTYPES[kind]}: cannot go into a master {kind}",
            )
        if (info.instrument, info.detector) != (first.instrument, first.detector):
            raise DetectorError(
                STAGE,
                f"master {kind} inputs mix detectors: exposure {info.exposure_id} is "
                f"{info.instrument} {info.detector}, exposure {first.exposure_id} is "
                f"{first.instrument} {first.detector}",
            )
        if kind == "flat" and info.band != first.band:
            raise DetectorError(
                STAGE,
                f"master flat inputs mix bands: exposure {info.exposure_id} is {info.band}, "
                f"exposure {first.exposure_id} is {first.band}",
            )
        if kind in ("dark", "flat") and info.dark_time_s <= 0:
            raise DetectorError(
                STAGE, f"{kind} exposure {info.exposure_id} has DARKTIME {info.dark_time_s} s"
            )
    ids = [i.exposure_id for i in infos]
    if len(set(ids)) != len(ids):
        raise DetectorError(STAGE, f"master {kind} inputs repeat an exposure: {sorted(ids)}")
    if kind == "flat" and first.band is None:
        raise DetectorError(STAGE, f"flat exposure {first.exposure_id} has no band (FILTBAND)")
    return infos


def _combine(
    images: list[np.ndarray], sigma: np.ndarray, exclude: list[np.ndarray] | None = None
) -> np.ndarray:
    """Clipped mean of a stack: reject |x − median| > CLIP_NSIGMA · sigma, average the rest.

    ``exclude`` (one bool plane per input) leaves an input out at a pixel, unless it would
    leave no input there. Done in blocks of rows to keep the (n, rows, nx) temporaries small.
    """
    ny, nx = images[0].shape
    out = np.empty((ny, nx), np.float32)
    for r0 in range(0, ny, _COMBINE_ROWS):
        r1 = min(r0 + _COMBINE_ROWS, ny)
        stack = np.stack([im[r0:r1] for im in images])
        if exclude is None:
            valid = np.ones(stack.shape, bool)
            med = np.median(stack, axis=0)
        else:
            valid = ~np.stack([e[r0:r1] for e in exclude])
            valid |= ~valid.any(axis=0)[None]
            # Median of the valid values: sort with the others pushed to the end.
            ordered = np.sort(np.where(valid, stack, np.float32(np.inf)), axis=0)
            count = valid.sum(axis=0)
            lo = np.take_along_axis(ordered, ((count - 1) // 2)[None], axis=0)[0]
            hi = np.take_along_axis(ordered, (count // 2)[None], axis=0)[0]
            med = 0.5 * (lo + hi)
        keep = valid & (np.abs(stack - med) <= np.float32(CLIP_NSIGMA) * sigma[r0:r1])
        kept = keep.sum(axis=0)
        total = np.where(keep, stack, np.float32(0)).sum(axis=0, dtype=np.float64)
        out[r0:r1] = np.where(kept > 0, total / np.maximum(kept, 1), med)
    return out


def _calib_header(kind: str, infos: list[VisitInfo]) -> fits.Header:
    header = fits.Header()
    now = Time.now().tai
    now.precision = 3
    header["DATE"] = (now.isot, "Creation time (TAI)")
    header["CALIBDAY"] = (max(i.day_obs for i in infos), "Latest day_obs of the inputs")
    for n, info in enumerate(infos, start=1):
        header[f"INPUT{n:03d}"] = (info.exposure_id, f"Input exposure id ({kind})")
    return header


def _amp_slices(
    camera: Instrument, detector: str, shape: tuple[int, ...]
) -> list[tuple[slice, slice]]:
    """Amplifier sections of the assembled image (the whole image if the camera differs)."""
    try:
        det = camera.detector(detector)
    except LdfError:
        det = None
    if det is None or (det.ny, det.nx) != tuple(shape):
        return [(slice(None), slice(None))]
    return [amp.assembled_slice() for amp in det.amplifiers]


def _robust(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 × MAD of ``values`` (finite ones)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    med = float(np.median(v))
    return med, 1.4826 * float(np.median(np.abs(v - med)))


def _isr_inputs(
    raws: Sequence[RawImage],
    camera: Instrument,
    calibs: CalibSet | None,
    **flags: bool,
) -> tuple[list[np.ndarray], list[np.ndarray], list[Exposure]]:
    images, variances, exposures = [], [], []
    for raw in raws:
        exp = run_isr(raw, camera, calibs, **flags)
        images.append(exp.image)
        variances.append(exp.variance)
        exposures.append(exp)
    return images, variances, exposures


def make_master_bias(raws: Iterable[RawImage], camera: Instrument) -> MasterCalib:
    """Combine bias exposures of one detector into a master bias (electrons).

    Raises
    ------
    DetectorError
        Fewer than ``MIN_INPUTS`` inputs, an input that is not a BIAS, inputs from several
        detectors, or an input ISR cannot process.
    """
    raws = list(raws)
    infos = _check_inputs(raws, "bias")
    images, variances, _ = _isr_inputs(
        raws, camera, None, do_bias=False, do_dark=False, do_flat=False, mask_cosmic_rays=False
    )
    sigma = np.sqrt(np.mean(variances, axis=0, dtype=np.float32))
    image = _combine(images, sigma)
    header = _calib_header("bias", infos)
    return MasterCalib(
        kind="bias",
        instrument=infos[0].instrument,
        detector=infos[0].detector,
        band=None,
        image=image,
        mask=np.zeros(image.shape, np.uint16),
        n_inputs=len(raws),
        metadata=header,
    )


def make_master_dark(
    raws: Iterable[RawImage], camera: Instrument, bias: MasterCalib
) -> MasterCalib:
    """Combine dark exposures into a master dark (e-/s of dark time) with hot pixels masked.

    Raises
    ------
    DetectorError
        As :func:`make_master_bias`, or a master bias that does not fit.
    """
    raws = list(raws)
    infos = _check_inputs(raws, "dark")
    # Cosmic rays are masked in each input (cp_pipe's cpDark repairs them too): long darks
    # have so many that a pixel is often hit in several inputs, beyond what clipping about
    # the median can reject. Hot pixels are sharp too; one flagged in *every* input is
    # persistent, so it is kept (``keep_cosmic_rays`` leaves the values in place).
    images, variances, exposures = _isr_inputs(
        raws,
        camera,
        CalibSet(bias=bias),
        do_bias=True,
        do_dark=False,
        do_flat=False,
        mask_cosmic_rays=True,
        keep_cosmic_rays=True,
    )
    cosmic = [(exp.mask & np.uint16(Mask.CR)) != 0 for exp in exposures]
    var_sum = np.zeros_like(images[0])
    for img, var, info in zip(images, variances, infos, strict=True):
        t = np.float32(info.dark_time_s)
        img /= t
        var /= t * t
        var_sum += var
    image = _combine(images, np.sqrt(var_sum / np.float32(len(images))), cosmic)
    mask = np.zeros(image.shape, np.uint16)
    hot_total = 0
    for sl in _amp_slices(camera, infos[0].detector, image.shape):
        region = image[sl]
        med, sig = _robust(region[::_SAMPLE_STEP, ::_SAMPLE_STEP])
        hot = region > med + HOT_PIXEL_NSIGMA * sig
        mask[sl][hot] |= np.uint16(Mask.BAD)
        hot_total += int(hot.sum())
    header = _calib_header("dark", infos)
    header["NHOTPIX"] = (hot_total, f"Pixels > {HOT_PIXEL_NSIGMA} sigma above amp median")
    header["DARKTIME"] = (sum(i.dark_time_s for i in infos), "[s] Total dark time combined")
    return MasterCalib(
        kind="dark",
        instrument=infos[0].instrument,
        detector=infos[0].detector,
        band=None,
        image=image,
        mask=mask,
        n_inputs=len(raws),
        metadata=header,
    )


def make_master_flat(
    raws: Iterable[RawImage], camera: Instrument, bias: MasterCalib, dark: MasterCalib
) -> MasterCalib:
    """Combine flat exposures of one band into a master flat normalised to median 1.

    Raises
    ------
    DetectorError
        As :func:`make_master_bias`, inputs of several bands, an input without light or
        with saturated pixels, or master bias/dark that do not fit.
    """
    raws = list(raws)
    infos = _check_inputs(raws, "flat")
    images, variances, exposures = _isr_inputs(
        raws,
        camera,
        CalibSet(bias=bias, dark=dark),
        do_bias=True,
        do_dark=True,
        do_flat=False,
        mask_cosmic_rays=False,
    )
    levels = []
    var_sum = np.zeros_like(images[0])
    for img, var, exp in zip(images, variances, exposures, strict=True):
        n_sat = int(np.count_nonzero(exp.mask & np.uint16(Mask.SAT)))
        if n_sat > 1e-4 * img.size:
            raise DetectorError(
                STAGE,
                f"flat {exp.info.exposure_id} {exp.info.detector} has {n_sat} saturated "
                "pixels: overexposed, shorten the flat",
            )
        level = float(np.median(img[::_SAMPLE_STEP, ::_SAMPLE_STEP]))
        if not level > 0:
            raise DetectorError(
                STAGE,
                f"flat {exp.info.exposure_id} {exp.info.detector} has no light "
                f"(median {level:.1f} e-)",
            )
        levels.append(level)
        img /= np.float32(level)
        var /= np.float32(level * level)
        var_sum += var
    image = _combine(images, np.sqrt(var_sum / np.float32(len(images))))
    norm = float(np.median(image))
    image /= np.float32(norm)
    mask = np.zeros(image.shape, np.uint16)
    bad = ~np.isfinite(image) | (image <= 0)
    for sl in _amp_slices(camera, infos[0].detector, image.shape):
        region = image[sl]
        med = float(np.median(region[::_SAMPLE_STEP, ::_SAMPLE_STEP]))
        bad[sl] |= region < LOW_FLAT_FRACTION * med
    mask[bad] = np.uint16(Mask.BAD)
    image[~np.isfinite(image) | (image <= 0)] = 1.0
    header = _calib_header("flat", infos)
    header["FLATNORM"] = (norm * float(np.mean(levels)), "[e-] Level the flat was divided by")
    for n, level in enumerate(levels, start=1):
        header[f"INLEV{n:03d}"] = (round(level, 2), f"[e-] Median level of input {n}")
    header["NLOWPIX"] = (int(bad.sum()), f"Pixels < {LOW_FLAT_FRACTION} of amp median")
    return MasterCalib(
        kind="flat",
        instrument=infos[0].instrument,
        detector=infos[0].detector,
        band=infos[0].band,
        image=image,
        mask=mask,
        n_inputs=len(raws),
        metadata=header,
    )


# ------------------------------------------------------------------------------- QA


def _clipped(values: np.ndarray, nsigma: float = 4.0, iterations: int = 3) -> tuple[float, float]:
    """Mean and standard deviation of ``values`` after iterative clipping about the median."""
    v = values[np.isfinite(values)].astype(np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    med, sig = _robust(v)
    keep = v
    for _ in range(iterations):
        if not sig > 0:
            break
        keep = v[np.abs(v - med) <= nsigma * sig]
        med, sig = float(np.median(keep)), float(np.std(keep))
    return float(np.mean(keep)), float(np.std(keep))


def _need(calib: MasterCalib | None, kind: str, info: VisitInfo) -> MasterCalib:
    if calib is None:
        band = f" band {info.band}" if kind == "flat" else ""
        raise DetectorError(
            STAGE,
            f"calibration QA of {info.obs_type} {info.exposure_id} needs a master "
            f"{kind} for {info.detector}{band}",
        )
    return calib


def calibration_qa(raw: RawImage, calibs: CalibSet, camera: Instrument) -> dict[str, float]:
    """Quality parameters of a bias, dark or flat exposure, for telemetry.

    Every exposure type
        ``overscan_noise_adu_<amp>``, ``read_noise_e_<amp>`` (measured in the serial
        overscan), ``read_noise_max_rel_dev`` (largest |measured/nominal − 1| over the
        amplifiers; fails above ``QA_READ_NOISE_TOLERANCE``).
    Bias (needs the master bias)
        ``bias_mean_e`` and ``bias_rms_e``: clipped mean and rms of (bias − master bias);
        ``bias_rms_ratio``: rms / sqrt(RN²(1 + 1/N)); ``bias_light_e``: the median of the
        difference, the light in the bias (e-/pixel), and ``bias_light_max_amp_e`` its largest
        |value| over the amplifiers.
    Dark (needs bias and dark)
        ``dark_current_e_s`` (median rate after bias subtraction, robust to hot pixels and
        cosmic rays), ``dark_current_master_e_s``, ``dark_hot_pixels`` (isolated pixels
        > ``HOT_PIXEL_NSIGMA`` σ above the median: hot pixels, where cosmic rays hit several),
        ``dark_new_hot_pixels`` (of those, not in the master's defect mask).
    Flat (needs bias, dark and the band's flat)
        ``flat_level_e`` (clipped mean), ``flat_saturated_pixels``, ``flat_ratio_rms``
        (clipped per-pixel rms of flat / master, normalised to median 1),
        ``flat_ratio_expected_rms`` (photon and read noise of the flat and of the master),
        ``flat_ratio_max_dev`` (largest |median − 1| of 16 × 16 pixel blocks).

    ``ok`` is 1.0 when every check passes, else 0.0; each check's verdict is also returned
    as ``ok_<check>``. Thresholds are the module's ``QA_*`` constants.

    Raises
    ------
    DetectorError
        Not a calibration exposure, a master calibration the check needs is missing, or
        ISR fails.
    """
    info = VisitInfo.from_header(raw.metadata)
    if info.obs_type not in CALIB_KINDS:
        raise DetectorError(
            STAGE, f"exposure {info.exposure_id} is a {info.obs_type} exposure, not a calibration"
        )
    out: dict[str, float] = {}
    checks: dict[str, bool] = {}
    if info.obs_type == "bias":
        master = _need(calibs.bias, "bias", info)
        exp = run_isr(
            raw,
            camera,
            CalibSet(bias=master),
            do_bias=False,
            do_dark=False,
            do_flat=False,
            mask_cosmic_rays=False,
        )
        _qa_bias(exp, master, camera, out, checks)
    elif info.obs_type == "dark":
        bias = _need(calibs.bias, "bias", info)
        master = _need(calibs.dark, "dark", info)
        # Cosmic rays masked (values kept, for the hot-pixel count): a long dark has enough
        # of them to pull the median rate up by tens of per cent.
        exp = run_isr(
            raw,
            camera,
            CalibSet(bias=bias),
            do_bias=True,
            do_dark=False,
            do_flat=False,
            mask_cosmic_rays=True,
            keep_cosmic_rays=True,
        )
        _qa_dark(exp, master, out, checks)
    else:
        bias = _need(calibs.bias, "bias", info)
        dark = _need(calibs.dark, "dark", info)
        master = _need(calibs.flat, "flat", info)
        if master.band != info.band:
            raise DetectorError(
                STAGE,
                f"no master flat for {info.detector} band {info.band}: the one given is for "
                f"band {master.band}",
            )
        exp = run_isr(
            raw,
            camera,
            CalibSet(bias=bias, dark=dark, flat=master),
            do_bias=True,
            do_dark=True,
            do_flat=False,
            mask_cosmic_rays=False,
        )
        _qa_flat(exp, master, camera, out, checks)

    detector = camera.detector(info.detector)
    worst = 0.0
    for name, (os_noise, read_noise) in amplifier_noise(exp).items():
        out[f"overscan_noise_adu_{name}"] = os_noise
        out[f"read_noise_e_{name}"] = read_noise
        nominal = detector.amplifier(name).read_noise
        worst = max(worst, abs(read_noise / nominal - 1.0))
    out["read_noise_max_rel_dev"] = worst
    checks["read_noise"] = worst <= QA_READ_NOISE_TOLERANCE
    for name, passed in checks.items():
        out[f"ok_{name}"] = 1.0 if passed else 0.0
    out["ok"] = 1.0 if all(checks.values()) else 0.0
    return out


def _qa_bias(
    exp: Exposure,
    master: MasterCalib,
    camera: Instrument,
    out: dict[str, float],
    checks: dict[str, bool],
) -> None:
    good = master.mask == 0
    diff = exp.image - master.image
    mean, rms = _clipped(diff[good])
    light = float(np.median(diff[good]))
    worst_amp = 0.0
    for sl in _amp_slices(camera, exp.info.detector, diff.shape):
        worst_amp = max(worst_amp, abs(float(np.median(diff[sl]))))
    noise = amplifier_noise(exp)
    rn2 = float(np.mean([rn**2 for _, rn in noise.values()]))
    expected = math.sqrt(rn2 * (1.0 + 1.0 / max(master.n_inputs, 1)))
    out["bias_mean_e"] = mean
    out["bias_rms_e"] = rms
    out["bias_rms_ratio"] = rms / expected if expected > 0 else float("inf")
    out["bias_light_e"] = light
    out["bias_light_max_amp_e"] = worst_amp
    checks["bias_light"] = abs(light) <= QA_BIAS_LIGHT_MAX_E and worst_amp <= QA_BIAS_LIGHT_MAX_E
    checks["bias_mean"] = abs(mean) <= QA_BIAS_MEAN_MAX_E
    checks["bias_rms"] = out["bias_rms_ratio"] <= QA_BIAS_RMS_MAX_RATIO


def _qa_dark(
    exp: Exposure, master: MasterCalib, out: dict[str, float], checks: dict[str, bool]
) -> None:
    t = exp.info.dark_time_s
    if t <= 0:
        raise DetectorError(STAGE, f"dark {exp.info.exposure_id} has DARKTIME {t} s")
    rate = exp.image / np.float32(t)
    clean = (exp.mask & np.uint16(Mask.CR))[::_SAMPLE_STEP, ::_SAMPLE_STEP] == 0
    med, sig = _robust(rate[::_SAMPLE_STEP, ::_SAMPLE_STEP][clean])
    master_rate = float(np.median(master.image[master.mask == 0]))
    hot = rate > med + HOT_PIXEL_NSIGMA * sig
    hot[0, :] = hot[-1, :] = False
    hot[:, 0] = hot[:, -1] = False
    iy, ix = np.nonzero(hot)
    # Isolated: no 8-neighbour above the threshold (cosmic-ray tracks cover several pixels).
    ny, nx = hot.shape
    isolated = np.ones(iy.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                isolated &= ~hot[iy + dy, ix + dx]
    iy, ix = iy[isolated], ix[isolated]
    new = (master.mask[iy, ix] & np.uint16(Mask.BAD)) == 0
    out["dark_current_e_s"] = med
    out["dark_current_master_e_s"] = master_rate
    out["dark_hot_pixels"] = float(iy.size)
    out["dark_new_hot_pixels"] = float(np.count_nonzero(new))
    checks["dark_current"] = abs(med - master_rate) <= QA_DARK_CURRENT_MAX_DELTA_E_S
    checks["dark_new_hot_pixels"] = np.count_nonzero(new) <= max(
        1.0, QA_DARK_NEW_HOT_MAX_FRACTION * nx * ny
    )


def _qa_flat(
    exp: Exposure,
    master: MasterCalib,
    camera: Instrument,
    out: dict[str, float],
    checks: dict[str, bool],
) -> None:
    good = (master.mask == 0) & (exp.mask == 0)
    level, _ = _clipped(exp.image[::_SAMPLE_STEP, ::_SAMPLE_STEP])
    n_sat = int(np.count_nonzero(exp.mask & np.uint16(Mask.SAT)))
    if not level > 0:
        raise DetectorError(STAGE, f"flat {exp.info.exposure_id} has no light ({level:.1f} e-)")
    ratio = exp.image * master.inverse_image
    ratio /= np.float32(np.median(ratio[::_SAMPLE_STEP, ::_SAMPLE_STEP]))
    _, rms = _clipped(ratio[good])
    # Photon and read noise of this flat, and the master's own (N inputs averaged).
    expected = math.sqrt(float(np.median(exp.variance)) * (1.0 + 1.0 / master.n_inputs)) / level
    b = _QA_FLAT_BLOCK
    ny, nx = (ratio.shape[0] // b) * b, (ratio.shape[1] // b) * b
    blocks = np.where(good, ratio, np.float32(np.nan))[:ny, :nx]
    blocks = blocks.reshape(ny // b, b, nx // b, b).swapaxes(1, 2).reshape(-1, b * b)
    usable = np.count_nonzero(np.isfinite(blocks), axis=1) > b * b // 2
    if usable.any():
        # Masked pixels are NaN: sort them to the end and take the median of the others.
        ordered = np.sort(blocks[usable], axis=1)
        count = np.count_nonzero(np.isfinite(ordered), axis=1)
        rows = np.arange(ordered.shape[0])
        median = 0.5 * (ordered[rows, (count - 1) // 2] + ordered[rows, count // 2])
        max_dev = float(np.max(np.abs(median - 1.0)))
    else:
        max_dev = float("nan")
    full_well = min(a.full_well for a in camera.detector(exp.info.detector).amplifiers)
    out["flat_level_e"] = level
    out["flat_saturated_pixels"] = float(n_sat)
    out["flat_ratio_rms"] = rms
    out["flat_ratio_expected_rms"] = expected
    out["flat_ratio_max_dev"] = max_dev
    checks["flat_level"] = (
        QA_FLAT_LEVEL_MIN_E <= level <= QA_FLAT_LEVEL_MAX_FULL_WELL * full_well and n_sat == 0
    )
    checks["flat_rms"] = rms <= QA_FLAT_RMS_MAX_RATIO * expected
    checks["flat_max_dev"] = max_dev <= QA_FLAT_MAX_DEVIATION
