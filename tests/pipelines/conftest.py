"""Shared helpers of the pipeline tests: simulated raws and calibrated exposures.

``sim_exposure`` stands in for ISR (overscan, gain and the true flat, applied exactly) so a
stage's tests do not depend on the stages before it; ``write_sim_raw`` writes the raw FITS
file the archiver would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ldf.archiver.rawfits import build_hdulist, primary_header, raw_filename, write_raw
from ldf.pipelines.types import Exposure, Mask, VisitInfo
from ldf.sim.camera import DetectorReadout, assemble, flat_pattern, render_detector
from ldf.sim.instruments import Detector, Instrument, get_instrument
from ldf.sim.models import ObservingConditions, ObsType, VisitSpec
from ldf.sim.sky import Sky
from ldf.sim.wcs import detector_wcs
from tests.sim.conftest import _good_conditions, _make_visit

SEED = 7
"""Night seed of the pipeline tests."""

__all__ = [
    "SEED",
    "expected_zero_point",
    "good_conditions",
    "make_visit",
    "sim_exposure",
    "write_sim_raw",
]


def make_visit(obs_type: ObsType = ObsType.SCIENCE, **kw: Any) -> VisitSpec:
    """A visit with sensible defaults (see ``tests.sim.conftest._make_visit``)."""
    return _make_visit(obs_type, **kw)


def good_conditions(**overrides: Any) -> ObservingConditions:
    """Photometric, 0.8″ seeing, round PSF, no pointing error unless overridden."""
    return _good_conditions(**overrides)


def write_sim_raw(
    directory: Path,
    instrument: Instrument,
    detector: Detector,
    visit: VisitSpec,
    sky: Sky,
    *,
    seed: int = SEED,
) -> tuple[Path, DetectorReadout]:
    """Render one detector and write its raw FITS file as the archiver does."""
    readout = render_detector(instrument, detector, visit, sky, seed=seed)
    hdul = build_hdulist(instrument, detector, visit, readout.amps, end_readout_tai_mjd=61000.2)
    path = directory / raw_filename(visit, detector.name)
    write_raw(path, hdul, fsync=False)
    return path, readout


def sim_exposure(
    instrument: Instrument,
    detector: Detector,
    visit: VisitSpec,
    sky: Sky,
    *,
    seed: int = SEED,
) -> tuple[Exposure, DetectorReadout]:
    """A calibrated exposure made with the simulator's own knowledge instead of ISR.

    Overscan and gain by :func:`ldf.sim.camera.assemble`, the dark current subtracted at its
    mean, division by the true flat pattern normalised to its median. The WCS is the
    *commanded* one (what the header says), so astrometry still has the pointing error to
    find. Variance is sky + source + read noise from the image itself.
    """
    readout = render_detector(instrument, detector, visit, sky, seed=seed)
    image = assemble(detector, readout.amps)
    dark = np.zeros_like(image)
    for amp in detector.amplifiers:
        dark[amp.assembled_slice()] = amp.dark_current * visit.dark_time_s
    image -= dark
    flat = flat_pattern(instrument, detector)
    norm = float(np.median(flat))
    image /= flat / np.float32(norm)
    rn2 = np.zeros_like(image)
    for amp in detector.amplifiers:
        rn2[amp.assembled_slice()] = amp.read_noise**2
    variance = (np.maximum(image, 0) + rn2).astype(np.float32)
    mask = np.zeros(image.shape, np.uint16)
    sat = np.zeros(image.shape, bool)
    for amp in detector.amplifiers:
        sl = amp.assembled_slice()
        sat[sl] = image[sl] >= 0.98 * amp.saturation * amp.gain - 1.0
    mask[sat] |= np.uint16(Mask.SAT)
    header = primary_header(instrument, detector, visit)
    wcs = detector_wcs(instrument, detector, visit.ra_deg, visit.dec_deg, visit.rot_sky_deg)
    exposure = Exposure(
        image=image.astype(np.float32),
        variance=variance,
        mask=mask,
        info=VisitInfo.from_header(header),
        metadata=header,
        wcs=wcs,
        pixel_scale_arcsec=instrument.pixel_scale_arcsec,
    )
    return exposure, readout


def expected_zero_point(instrument: Instrument, detector: Detector, visit: VisitSpec) -> float:
    """The zero point (AB mag of 1 e-/s) a correct calibration measures on ``sim_exposure``.

    Instrument zero point, extinction at the airmass, transparency, and the median of the
    detector's flat pattern (the calibrated image is divided by the flat normalised to its
    median, so a source keeps that fraction of its electrons).
    """
    from ldf.prompt.validation import expected_zero_point as expected

    assert visit.conditions is not None
    truth = {
        "band": visit.band,
        "airmass": visit.airmass,
        "transparency": visit.conditions.transparency,
    }
    zp = expected(instrument, detector, truth)
    assert zp is not None
    return zp


@pytest.fixture(scope="session")
def small_camera() -> Instrument:
    """LSSTCam at a quarter size per axis (~1018 × 1000 px detectors, 3.4′ on a side)."""
    return get_instrument("LSSTCam", scale=0.25)


@pytest.fixture(scope="session")
def rich_sky() -> Sky:
    """A sky with many transients (for recovery statistics) and normal star counts."""
    return Sky(SEED, transient_rate_deg2=20000.0, variable_density_deg2=500.0)
