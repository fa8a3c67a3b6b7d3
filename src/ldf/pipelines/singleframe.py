"""Single-frame processing: raw → calibrated exposure with PSF, WCS and zero point.

The front end of Prompt Processing (whose results are the image-quality parameters sent back
to the observatory) and the first step of template building and batch campaigns: ISR,
characterization, astrometry, photometric calibration, in that order, each timed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ldf.butler.formatters import RawImage
from ldf.pipelines import astrometry, characterize, isr, photometry
from ldf.pipelines.calibs import CalibSet
from ldf.pipelines.refcat import RefcatStore
from ldf.pipelines.types import Exposure
from ldf.sim.instruments import Instrument

__all__ = ["PSF_STARS", "SingleFrame", "StageTimer", "plain_quality", "single_frame"]

PSF_STARS = 30
"""Brightest isolated stars the PSF model is fitted to."""


def plain_quality(quality: Mapping[str, Any]) -> dict[str, Any]:
    """Image-quality parameters as plain YAML/JSON values: numpy scalars to Python, NaN/inf to
    None (as Prompt Processing sends them to the observatory)."""
    out: dict[str, Any] = {}
    for key, value in quality.items():
        if isinstance(value, bool | np.bool_):
            out[key] = bool(value)
        elif isinstance(value, int | np.integer):
            out[key] = int(value)
        elif isinstance(value, float | np.floating):
            out[key] = float(value) if math.isfinite(value) else None
        else:
            out[key] = value
    return out


class StageTimer:
    """Accumulates seconds per stage; ``current`` names the stage running (for failures)."""

    def __init__(self, out: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = out if out is not None else {}
        self.current = ""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time the block as ``stage``."""
        self.current = stage
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + dt, 4)


@dataclass
class SingleFrame:
    """A calibrated science exposure and what was measured on the way."""

    exposure: Exposure
    characterization: characterize.CharacterizeResult
    astrometry: astrometry.AstrometryResult
    photometry: photometry.PhotometryResult
    seconds: dict[str, float] = field(default_factory=dict)

    def quality(self) -> dict[str, Any]:
        """Image-quality parameters for the observatory (LDM-230 2.1: seeing, pointing…)."""
        char, ast, phot = self.characterization, self.astrometry, self.photometry
        return {
            "band": self.exposure.info.band,
            "seeing_arcsec": char.seeing_arcsec,
            "psf_e1": char.psf_e1,
            "psf_e2": char.psf_e2,
            "psf_ellipticity": char.ellipticity,
            "sky_e_per_pixel": char.sky_e_per_pixel,
            "n_sources": char.n_sources,
            "pointing_offset_east_arcsec": ast.offset_east_arcsec,
            "pointing_offset_north_arcsec": ast.offset_north_arcsec,
            "pointing_offset_err_arcsec": ast.offset_err_arcsec,
            "astrometry_rms_arcsec": ast.rms_arcsec,
            "astrometry_matches": ast.n_matched,
            "zero_point": phot.zero_point,
            "zero_point_err": phot.zero_point_err,
        }


def single_frame(
    raw: RawImage,
    camera: Instrument,
    calibs: CalibSet,
    refcat: RefcatStore,
    *,
    timer: StageTimer | None = None,
) -> SingleFrame:
    """Run ISR → characterization → astrometry → photometry on one detector's raw.

    Raises
    ------
    DetectorError
        From whichever stage cannot proceed (missing calibration, too few stars…).
    """
    timer = timer or StageTimer()
    with timer("isr"):
        exposure = isr.run_isr(raw, camera, calibs)
    with timer("characterize"):
        # 30 PSF stars measure the seeing to < 1 % (tests/pipelines/test_characterize.py) at a
        # third of the Moffat fit's cost with 100 (its least-squares SVD grows with pixels).
        char = characterize.characterize(exposure, max_psf_stars=PSF_STARS)
    with timer("astrometry"):
        ref = astrometry.load_refcat_for(char.exposure, refcat)
        ast = astrometry.fit_astrometry(char.exposure, char.sources, ref)
    with timer("photometry"):
        phot = photometry.calibrate_photometry(char.exposure, char.sources, ref, ast.matches)
    return SingleFrame(char.exposure, char, ast, phot, timer.seconds)
