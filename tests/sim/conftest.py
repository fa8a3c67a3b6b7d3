"""Shared helpers of the simulator tests: small instruments and visit factories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ldf.sim.instruments import Instrument, get_instrument
from ldf.sim.models import ObservingConditions, ObsType, VisitSpec

DAY_OBS = 20261121
MJD = 61000.1  # 2026-01-... night, any time works for these tests


@pytest.fixture(scope="session")
def lsstcam_small() -> Instrument:
    """LSSTCam with each amplifier's data section shrunk to a quarter per axis."""
    return get_instrument("LSSTCam", scale=0.25)


@pytest.fixture(scope="session")
def lsstcam_half() -> Instrument:
    """LSSTCam at half size per axis."""
    return get_instrument("LSSTCam", scale=0.5)


def _good_conditions(**overrides: Any) -> ObservingConditions:
    """Photometric dark-time conditions with a round PSF."""
    values: dict[str, Any] = {
        "seeing_fwhm_arcsec": 0.8,
        "sky_mag_arcsec2": 21.2,
        "transparency": 1.0,
        "moon_illumination": 0.0,
        "moon_alt_deg": -20.0,
    }
    values.update(overrides)
    return ObservingConditions(**values)


def _make_visit(
    obs_type: ObsType = ObsType.SCIENCE,
    *,
    seq_num: int = 1,
    instrument: str = "LSSTCam",
    band: str | None = "r",
    ra_deg: float = 150.0,
    dec_deg: float = -30.0,
    exp_time_s: float = 30.0,
    dark_time_s: float | None = None,
    conditions: ObservingConditions | None = None,
    **extra: Any,
) -> VisitSpec:
    """A visit with sensible defaults for each observation type."""
    if obs_type is ObsType.BIAS:
        band, exp_time_s = None, 0.0
    if obs_type is ObsType.SCIENCE and conditions is None:
        conditions = _good_conditions()
    return VisitSpec(
        instrument=instrument,
        day_obs=DAY_OBS,
        seq_num=seq_num,
        obs_type=obs_type,
        reason="test",
        group_id="test",
        band=band,
        ra_deg=ra_deg,
        dec_deg=dec_deg,
        exp_time_s=exp_time_s,
        dark_time_s=exp_time_s + 1.0 if dark_time_s is None else dark_time_s,
        start_tai_mjd=MJD,
        conditions=conditions,
        **extra,
    )


@pytest.fixture
def make_visit() -> Callable[..., VisitSpec]:
    """Factory of visits with sensible defaults (see ``_make_visit``)."""
    return _make_visit


@pytest.fixture
def good_conditions() -> Callable[..., ObservingConditions]:
    """Factory of photometric dark-time conditions (see ``_good_conditions``)."""
    return _good_conditions
