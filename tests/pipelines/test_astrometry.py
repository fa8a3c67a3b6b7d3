"""Astrometric calibration against the simulator's true pointing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldf.pipelines.astrometry import (
    MIN_MATCHES,
    MIN_MATCHES_FOR_CD,
    AstrometryResult,
    fit_astrometry,
    load_refcat_for,
)
from ldf.pipelines.characterize import CharacterizeResult, characterize
from ldf.pipelines.refcat import RefcatStore
from ldf.pipelines.types import DetectorError
from ldf.sim.camera import DetectorReadout
from ldf.sim.instruments import Instrument
from ldf.sim.sky import Sky
from tests.pipelines.conftest import SEED, good_conditions, make_visit, sim_exposure

RA, DEC = 150.0, -30.0


@pytest.fixture(scope="module")
def dense_sky() -> Sky:
    return Sky(SEED, star_density_scale=3.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, dense_sky: Sky) -> RefcatStore:
    st = RefcatStore(tmp_path_factory.mktemp("refcat"))
    st.ingest_region(dense_sky, RA, DEC, 2.2)  # the whole focal plane
    return st


def _characterized(
    camera: Instrument,
    sky: Sky,
    *,
    detector: str = "R22_S11",
    seq_num: int = 21,
    rot: float = 0.0,
    **cond: float,
) -> tuple[CharacterizeResult, DetectorReadout]:
    visit = make_visit(
        seq_num=seq_num, ra_deg=RA, dec_deg=DEC, rot_sky_deg=rot, conditions=good_conditions(**cond)
    )
    exp, readout = sim_exposure(camera, camera.detector(detector), visit, sky)
    return characterize(exp), readout


def _wcs_error_arcsec(
    res: AstrometryResult, readout: DetectorReadout, shape: tuple[int, int]
) -> float:
    """Largest distance between fitted and true sky positions over the detector."""
    ny, nx = shape
    xs, ys = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    ra_f, dec_f = res.wcs.wcs_pix2world(xs.ravel(), ys.ravel(), 0)
    assert readout.wcs is not None
    ra_t, dec_t = readout.wcs.wcs_pix2world(xs.ravel(), ys.ravel(), 0)
    d_e = (ra_f - ra_t) * np.cos(np.radians(dec_t)) * 3600
    d_n = (dec_f - dec_t) * 3600
    return float(np.max(np.hypot(d_e, d_n)))


@pytest.mark.parametrize(
    ("dra", "ddec", "rot"),
    [
        (0.0, 0.0, 0.0),
        (3.0, -2.0, 0.0),
        (-6.0, 1.0, 0.0),
        (4.3, 4.3, 0.0),
        (2.0, -3.0, 30.0),
        (-5.0, -2.5, 127.5),
    ],
)
def test_pointing_offset_recovered(
    small_camera: Instrument,
    dense_sky: Sky,
    store: RefcatStore,
    dra: float,
    ddec: float,
    rot: float,
) -> None:
    char, readout = _characterized(
        small_camera, dense_sky, rot=rot, pointing_dra_arcsec=dra, pointing_ddec_arcsec=ddec
    )
    exp = char.exposure
    header_wcs = exp.wcs
    res = fit_astrometry(exp, char.sources, load_refcat_for(exp, store))
    assert res.offset_east_arcsec == pytest.approx(dra, abs=0.1)
    assert res.offset_north_arcsec == pytest.approx(ddec, abs=0.1)
    assert res.offset_err_arcsec < 0.05
    assert res.rms_arcsec < 0.05  # 10 mas catalogue errors + centroid noise
    assert res.n_matched >= 20
    assert exp.wcs is res.wcs
    assert exp.wcs is not header_wcs
    assert _wcs_error_arcsec(res, readout, exp.shape) < 0.05


def test_off_axis_detector(small_camera: Instrument, dense_sky: Sky, store: RefcatStore) -> None:
    """A corner-raft science CCD: its WCS is right; the boresight it implies is an
    extrapolation 1.2° away, as precise as its reported error says."""
    char, readout = _characterized(
        small_camera,
        dense_sky,
        detector="R01_S00",
        seq_num=22,
        rot=15.0,
        pointing_dra_arcsec=3.0,
        pointing_ddec_arcsec=-2.0,
    )
    res = fit_astrometry(char.exposure, char.sources, load_refcat_for(char.exposure, store))
    assert _wcs_error_arcsec(res, readout, char.exposure.shape) < 0.05
    tol = max(0.1, 4.0 * res.offset_err_arcsec)
    assert res.offset_east_arcsec == pytest.approx(3.0, abs=tol)
    assert res.offset_north_arcsec == pytest.approx(-2.0, abs=tol)


def test_sparse_field(small_camera: Instrument, tmp_path: Path) -> None:
    """With the default star counts a quarter-size CCD has only ~12 reference stars."""
    sky = Sky(SEED)
    sparse = RefcatStore(tmp_path / "sparse")
    sparse.ingest_region(sky, RA, DEC, 0.1)
    char, readout = _characterized(
        small_camera, sky, seq_num=23, pointing_dra_arcsec=-2.5, pointing_ddec_arcsec=3.5
    )
    res = fit_astrometry(char.exposure, char.sources, sparse)  # a store works too
    assert res.n_matched >= MIN_MATCHES
    assert res.offset_east_arcsec == pytest.approx(-2.5, abs=0.1)
    assert res.offset_north_arcsec == pytest.approx(3.5, abs=0.1)
    assert _wcs_error_arcsec(res, readout, char.exposure.shape) < 0.1


def test_few_matches_fit_only_the_tangent_point(
    small_camera: Instrument, dense_sky: Sky, store: RefcatStore
) -> None:
    char, readout = _characterized(
        small_camera, dense_sky, seq_num=27, pointing_dra_arcsec=2.0, pointing_ddec_arcsec=2.0
    )
    exp = char.exposure
    assert exp.wcs is not None
    header_cd = exp.wcs.wcs.cd.copy()
    src = char.sources
    few = src[~src["saturated"] & (src["snr"] > 30)].sort_values("flux").iloc[-8:].copy()
    res = fit_astrometry(exp, few, load_refcat_for(exp, store))
    assert MIN_MATCHES <= res.n_matched < MIN_MATCHES_FOR_CD
    np.testing.assert_array_equal(res.wcs.wcs.cd, header_cd)
    assert res.offset_east_arcsec == pytest.approx(2.0, abs=0.1)
    assert res.offset_north_arcsec == pytest.approx(2.0, abs=0.1)
    assert _wcs_error_arcsec(res, readout, exp.shape) < 0.1


def test_matches_and_source_coordinates(
    small_camera: Instrument, dense_sky: Sky, store: RefcatStore
) -> None:
    char, _ = _characterized(
        small_camera, dense_sky, seq_num=24, pointing_dra_arcsec=1.0, pointing_ddec_arcsec=1.0
    )
    res = fit_astrometry(char.exposure, char.sources, store)
    src, ref = char.sources, res.refcat
    assert res.matches.shape == (res.n_matched, 2)
    assert len(np.unique(res.matches[:, 0])) == res.n_matched
    assert len(np.unique(res.matches[:, 1])) == res.n_matched
    si, ri = res.matches[:, 0], res.matches[:, 1]
    assert not src["saturated"].to_numpy()[si].any()
    cos_dec = math.cos(math.radians(DEC))
    d_e = (src["coord_ra"].to_numpy()[si] - ref["ra"][ri]) * cos_dec * 3600
    d_n = (src["coord_dec"].to_numpy()[si] - ref["dec"][ri]) * 3600
    assert float(np.sqrt(np.mean(d_e**2 + d_n**2))) == pytest.approx(res.rms_arcsec, rel=1e-3)
    assert char.exposure.metadata["HIERARCH LDF ASTNMAT"] == res.n_matched


def test_larger_pointing_error_needs_a_larger_search(
    small_camera: Instrument, dense_sky: Sky, store: RefcatStore
) -> None:
    char, _ = _characterized(
        small_camera, dense_sky, seq_num=25, pointing_dra_arcsec=18.0, pointing_ddec_arcsec=-9.0
    )
    refcat = load_refcat_for(char.exposure, store, margin_arcsec=60.0)
    with pytest.raises(DetectorError) as info:
        fit_astrometry(char.exposure, char.sources.copy(), refcat, search_radius_arcsec=10.0)
    assert info.value.stage == "astrometry"
    res = fit_astrometry(char.exposure, char.sources, refcat, search_radius_arcsec=30.0)
    assert res.offset_east_arcsec == pytest.approx(18.0, abs=0.1)
    assert res.offset_north_arcsec == pytest.approx(-9.0, abs=0.1)


def test_bad_inputs(
    small_camera: Instrument, dense_sky: Sky, store: RefcatStore, tmp_path: Path
) -> None:
    char, _ = _characterized(small_camera, dense_sky, seq_num=26)
    exp, src = char.exposure, char.sources
    refcat = load_refcat_for(exp, store)
    # The wrong part of the sky.
    elsewhere = store.load_region(RA + 1.0, DEC + 1.0, 0.05)
    with pytest.raises(DetectorError, match="reference stars"):
        fit_astrometry(exp, src, elsewhere)
    with pytest.raises(DetectorError, match="ldf refcat ingest"):
        fit_astrometry(exp, src, refcat[:0])
    # A region nobody ingested.
    with pytest.raises(DetectorError, match="ldf refcat ingest"):
        fit_astrometry(exp, src, RefcatStore(tmp_path / "empty"))
    # Too few detections.
    with pytest.raises(DetectorError, match="usable detections"):
        fit_astrometry(exp, src.iloc[:3].copy(), refcat)
    # Detections unrelated to the catalogue (a scrambled image).
    rng = np.random.default_rng(1)
    scrambled = src.copy()
    scrambled["x"] = rng.uniform(0, exp.shape[1], len(src))
    scrambled["y"] = rng.uniform(0, exp.shape[0], len(src))
    with pytest.raises(DetectorError) as info:
        fit_astrometry(exp, scrambled, refcat)
    assert info.value.stage == "astrometry"
    with pytest.raises(DetectorError, match="column"):
        fit_astrometry(exp, pd.DataFrame({"x": [1.0]}), refcat)
    exp.wcs = None
    with pytest.raises(DetectorError, match="WCS"):
        fit_astrometry(exp, src, refcat)
