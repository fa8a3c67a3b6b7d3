"""Photometric calibration against the simulator's zero point."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from ldf.pipelines.astrometry import fit_astrometry, load_refcat_for
from ldf.pipelines.characterize import characterize
from ldf.pipelines.photometry import calibrate_photometry
from ldf.pipelines.refcat import RefcatStore
from ldf.pipelines.types import AB_NJY_ZERO_POINT, DetectorError, Exposure, Mask, VisitInfo
from ldf.sim.instruments import Instrument
from ldf.sim.sky import Sky
from tests.pipelines.conftest import (
    SEED,
    expected_zero_point,
    good_conditions,
    make_visit,
    sim_exposure,
)

RA, DEC = 150.0, -30.0
SKY_MAG = {"u": 22.9, "g": 22.3, "r": 21.2, "i": 20.5, "z": 19.6, "y": 18.6}
"""Dark-sky brightness per band (mag/arcsec²), roughly Rubin's SMTN-002 values."""


@pytest.fixture(scope="module")
def dense_sky() -> Sky:
    return Sky(SEED, star_density_scale=3.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, dense_sky: Sky) -> RefcatStore:
    st = RefcatStore(tmp_path_factory.mktemp("refcat"))
    st.ingest_region(dense_sky, RA, DEC, 0.1)
    return st


def _calibrated(  # type: ignore[no-untyped-def]
    camera: Instrument, sky: Sky, store: RefcatStore, *, seq_num: int, band: str = "r",
    airmass: float = 1.0, **cond: float,
):  # fmt: skip
    cond.setdefault("sky_mag_arcsec2", SKY_MAG[band])
    visit = make_visit(
        seq_num=seq_num,
        band=band,
        ra_deg=RA,
        dec_deg=DEC,
        airmass=airmass,
        conditions=good_conditions(pointing_dra_arcsec=1.5, pointing_ddec_arcsec=-1.0, **cond),
    )
    det = camera.detector("R22_S11")
    exp, _ = sim_exposure(camera, det, visit, sky)
    char = characterize(exp)
    astro = fit_astrometry(exp, char.sources, load_refcat_for(exp, store))
    return exp, char, astro, expected_zero_point(camera, det, visit)


@pytest.mark.parametrize(
    ("band", "transparency", "airmass"),
    [
        ("u", 1.0, 1.0),
        ("g", 0.8, 1.2),
        ("r", 1.0, 1.0),
        ("r", 0.4, 1.0),
        ("i", 0.65, 1.5),
        ("z", 1.0, 1.1),
        ("y", 0.9, 1.0),
    ],
)
def test_zero_point_matches_simulation(
    small_camera: Instrument,
    dense_sky: Sky,
    store: RefcatStore,
    band: str,
    transparency: float,
    airmass: float,
) -> None:
    exp, char, astro, expected = _calibrated(
        small_camera, dense_sky, store, seq_num=31, band=band, airmass=airmass,
        transparency=transparency,
    )  # fmt: skip
    res = calibrate_photometry(exp, char.sources, astro.refcat, astro.matches)
    assert res.zero_point == pytest.approx(expected, abs=0.02)
    assert res.band == band
    assert exp.zero_point == res.zero_point
    assert res.n_stars >= 5
    assert 0.0 < res.zero_point_err < 0.01
    # The error is honest: the truth is within a few of it (plus the catalogue's own
    # correlated error, which no number of stars beats below ~2 mmag here).
    assert abs(res.zero_point - expected) < 4 * res.zero_point_err + 0.003
    assert res.scatter_mag < 0.05
    assert exp.metadata["HIERARCH LDF MAGZERO"] == pytest.approx(res.zero_point, abs=1e-5)
    # And nJy follow: a 20th-magnitude star gives 10^(0.4 (31.4 − 20)) nJy.
    f_e = exp.info.exp_time_s * 10 ** (-0.4 * (20.0 - res.zero_point))
    assert f_e * exp.njy_per_electron() == pytest.approx(10 ** (0.4 * (AB_NJY_ZERO_POINT - 20.0)))


@pytest.mark.parametrize("seeing", [0.5, 1.5])
def test_zero_point_unbiased_in_any_seeing(
    small_camera: Instrument, dense_sky: Sky, store: RefcatStore, seeing: float
) -> None:
    """Fluxes are total fluxes (aperture-corrected): the zero point does not follow seeing."""
    exp, char, astro, expected = _calibrated(
        small_camera, dense_sky, store, seq_num=32, seeing_fwhm_arcsec=seeing
    )
    res = calibrate_photometry(exp, char.sources, astro.refcat, astro.matches)
    assert res.zero_point == pytest.approx(expected, abs=0.01)


def test_outliers_are_clipped(small_camera: Instrument, dense_sky: Sky, store: RefcatStore) -> None:
    exp, char, astro, _ = _calibrated(small_camera, dense_sky, store, seq_num=33)
    clean = calibrate_photometry(exp, char.sources, astro.refcat, astro.matches)
    # Two reference stars turn out to be variables 1.5 mag brighter tonight.
    src = char.sources.copy()
    rows = clean.used[:2, 0]
    src.loc[src.index[rows], "flux"] *= 10 ** (0.4 * 1.5)
    res = calibrate_photometry(exp, src, astro.refcat, astro.matches)
    assert res.zero_point == pytest.approx(clean.zero_point, abs=0.005)
    assert res.n_stars == clean.n_stars - 2
    assert not np.isin(res.used[:, 0], rows).any()


def test_saturated_and_blended_stars_are_not_used(
    small_camera: Instrument, dense_sky: Sky, store: RefcatStore
) -> None:
    exp, char, astro, _ = _calibrated(small_camera, dense_sky, store, seq_num=34)
    src = char.sources.copy()
    first = calibrate_photometry(exp, src, astro.refcat, astro.matches)
    flagged = first.used[:3, 0]
    src.loc[src.index[flagged[0]], "saturated"] = True
    src.loc[src.index[flagged[1]], "blended"] = True
    src.loc[src.index[flagged[2]], "edge"] = True
    res = calibrate_photometry(exp, src, astro.refcat, astro.matches)
    assert res.n_stars == first.n_stars - 3
    assert not np.isin(res.used[:, 0], flagged).any()


def test_stars_with_repaired_cores_are_not_used(
    small_camera: Instrument, dense_sky: Sky, store: RefcatStore
) -> None:
    """A star whose core ISR interpolated (a cosmic ray on it, or a core the cosmic-ray
    finder took for one in seeing sharper than it assumes) has lost flux: not a calibrator."""
    exp, char, astro, expected = _calibrated(small_camera, dense_sky, store, seq_num=36)
    first = calibrate_photometry(exp, char.sources, astro.refcat, astro.matches)
    rows = first.used[: max(3, first.n_stars // 2), 0]  # half the calibrators hit
    src = char.sources
    for k, r in enumerate(rows):
        x, y = round(float(src["x"].iloc[r])), round(float(src["y"].iloc[r]))
        bit = (Mask.CR | Mask.INTRP, Mask.INTRP, Mask.BAD)[k % 3]
        exp.mask[y + (k % 2), x - 2 + (k % 5)] |= np.uint16(bit)
    hit = src.copy()
    hit.loc[hit.index[rows], "flux"] *= 0.8  # the interpolated cores lost a fifth
    res = calibrate_photometry(exp, hit, astro.refcat, astro.matches)
    assert not np.isin(res.used[:, 0], rows).any()
    assert res.n_stars == first.n_stars - len(rows)
    assert res.zero_point == pytest.approx(expected, abs=0.01)


def test_bad_inputs(small_camera: Instrument, dense_sky: Sky, store: RefcatStore) -> None:
    exp, char, astro, _ = _calibrated(small_camera, dense_sky, store, seq_num=35)
    src, ref, m = char.sources, astro.refcat, astro.matches
    with pytest.raises(DetectorError) as info:
        calibrate_photometry(exp, src, ref, m[:2])
    assert info.value.stage == "photometry"
    assert "need ≥ 3" in info.value.reason
    with pytest.raises(DetectorError, match="need ≥ 3"):
        calibrate_photometry(exp, src, ref, np.empty((0, 2), np.int64))
    with pytest.raises(DetectorError, match="index past"):
        calibrate_photometry(exp, src, ref, m + len(src))
    no_band = Exposure(
        image=exp.image, variance=exp.variance, mask=exp.mask,
        info=_replace_info(exp, band=None),
    )  # fmt: skip
    with pytest.raises(DetectorError, match="band"):
        calibrate_photometry(no_band, src, ref, m)
    dark = Exposure(
        image=exp.image, variance=exp.variance, mask=exp.mask,
        info=_replace_info(exp, exp_time_s=0.0),
    )  # fmt: skip
    with pytest.raises(DetectorError, match="exposure time"):
        calibrate_photometry(dark, src, ref, m)
    assert math.isfinite(calibrate_photometry(exp, src, ref, m).zero_point)


def _replace_info(exp: Exposure, **changes: Any) -> VisitInfo:
    return replace(exp.info, **changes)
