"""Characterization against the simulator's truth: sky, seeing, PSF shape, fluxes, flags."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ldf.pipelines.characterize import (
    _moffat_and_jac,
    characterize,
    moffat_image,
    psf_photometry,
)
from ldf.pipelines.types import DetectorError, Exposure, Mask
from ldf.sim.camera import DetectorReadout, flat_pattern
from ldf.sim.instruments import Detector, Instrument
from ldf.sim.models import VisitSpec
from ldf.sim.sky import Sky, star_mags
from tests.pipelines.conftest import (
    SEED,
    expected_zero_point,
    good_conditions,
    make_visit,
    sim_exposure,
)


@pytest.fixture(scope="module")
def dense_sky() -> Sky:
    """Star counts of a field at |b| ≈ 10° (3× the default field's), so a quarter-size
    detector has a few dozen PSF stars."""
    return Sky(SEED, star_density_scale=3.0)


def _expected_sky(instrument: Instrument, detector_name: str, visit: VisitSpec) -> float:
    """Sky electrons per pixel in the calibrated image (``ldf.sim.camera._render_sky``)."""
    cond, band = visit.conditions, visit.band
    assert cond is not None
    assert band is not None
    zp, k = instrument.zero_points[band], instrument.extinction[band]
    sky_e = (
        10 ** (-0.4 * (cond.sky_mag_arcsec2 - zp - k))
        * instrument.pixel_scale_arcsec**2
        * visit.exp_time_s
    )
    norm = float(np.median(flat_pattern(instrument, instrument.detector(detector_name))))
    return sky_e * norm


def _truth_stars(
    instrument: Instrument, detector: Detector, visit: VisitSpec, sky: Sky, readout: DetectorReadout
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, expected electrons) of the catalogue stars on the detector."""
    ny, nx = detector.ny, detector.nx
    assert readout.wcs is not None
    assert visit.band is not None
    ra_c, dec_c = readout.wcs.wcs_pix2world((nx - 1) / 2, (ny - 1) / 2, 0)
    radius = math.hypot(nx, ny) / 2 * instrument.pixel_scale_arcsec / 3600 + 0.002
    stars = sky.stars(float(ra_c), float(dec_c), radius)
    x, y = readout.wcs.wcs_world2pix(stars["ra"], stars["dec"], 0)
    zp = expected_zero_point(instrument, detector, visit)
    flux = visit.exp_time_s * 10 ** (-0.4 * (star_mags(stars, visit.band) - zp))
    on = (x > 0) & (x < nx - 1) & (y > 0) & (y < ny - 1)
    return x[on], y[on], flux[on]


@pytest.mark.parametrize("seeing", [0.5, 0.8, 1.1, 1.5])
def test_seeing_and_sky_recovered(small_camera: Instrument, dense_sky: Sky, seeing: float) -> None:
    det = small_camera.detector("R22_S11")
    visit = make_visit(seq_num=11, conditions=good_conditions(seeing_fwhm_arcsec=seeing))
    exp, _ = sim_exposure(small_camera, det, visit, dense_sky)
    res = characterize(exp)
    assert res.seeing_arcsec == pytest.approx(seeing, rel=0.03)
    assert abs(res.psf_e1) < 0.02
    assert abs(res.psf_e2) < 0.02
    expected = _expected_sky(small_camera, "R22_S11", visit)
    assert res.sky_e_per_pixel == pytest.approx(expected, rel=0.01)
    assert res.exposure.background_level == res.sky_e_per_pixel
    # Read noise is 5-7 e- for this e2v sensor: the sky rms is about sqrt(sky + RN²).
    assert res.sky_rms_e == pytest.approx(math.sqrt(expected + 36.0), rel=0.05)
    assert res.n_psf_stars >= 10
    # Moffat index of the simulator (Trujillo et al. 2001).
    assert res.psf_beta == pytest.approx(4.765, rel=0.1)


@pytest.mark.parametrize(("e1", "e2"), [(0.05, -0.03), (-0.04, 0.05), (0.0, 0.08)])
def test_elliptical_psf(small_camera: Instrument, dense_sky: Sky, e1: float, e2: float) -> None:
    det = small_camera.detector("R22_S11")
    cond = good_conditions(seeing_fwhm_arcsec=0.9, psf_e1=e1, psf_e2=e2)
    exp, _ = sim_exposure(small_camera, det, make_visit(seq_num=12, conditions=cond), dense_sky)
    res = characterize(exp)
    assert res.psf_e1 == pytest.approx(e1, abs=0.02)
    assert res.psf_e2 == pytest.approx(e2, abs=0.02)
    assert res.ellipticity == pytest.approx(math.hypot(e1, e2), abs=0.02)
    assert res.seeing_arcsec == pytest.approx(0.9, rel=0.03)
    psf = res.exposure.psf
    assert psf is not None
    assert (psf.e1, psf.e2) == (res.psf_e1, res.psf_e2)


def test_psf_model_image_and_exposure_state(small_camera: Instrument, dense_sky: Sky) -> None:
    det = small_camera.detector("R22_S11")
    visit = make_visit(seq_num=13)
    exp, readout = sim_exposure(small_camera, det, visit, dense_sky)
    res = characterize(exp)
    assert res.exposure is exp  # in place by default
    psf = exp.psf
    assert psf is not None
    img = psf.image
    assert img.ndim == 2
    assert img.shape[0] == img.shape[1]
    assert img.shape[0] % 2 == 1
    assert float(img.sum()) == pytest.approx(1.0, abs=1e-5)
    c = (img.shape[0] - 1) / 2
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    core = np.hypot(xx - c, yy - c) < 2 * psf.fwhm_px
    w = img * core
    assert float((w * xx).sum() / w.sum()) == pytest.approx(c, abs=0.05)
    assert float((w * yy).sum() / w.sum()) == pytest.approx(c, abs=0.05)
    # The empirical image matches the true Moffat profile (normalised on the same stamp).
    half = img.shape[0] // 2
    truth = moffat_image(half, 0.8 / small_camera.pixel_scale_arcsec, 4.765)
    truth /= truth.sum()
    assert float(np.abs(img - truth)[core].sum()) < 0.02
    assert float(img[half, half]) == pytest.approx(float(truth[half, half]), rel=0.03)
    assert float(np.abs(img - truth)[~core].max()) < 1e-3  # wings: noise only
    # Background subtracted, DETECTED footprints on the stars.
    sky_pixels = (exp.mask & np.uint16(Mask.DETECTED)) == 0
    assert abs(float(np.median(exp.image[sky_pixels]))) < 1.0
    x, y, flux = _truth_stars(small_camera, det, visit, dense_sky, readout)
    bright = flux > 2e4
    rows, cols = np.rint(y[bright]).astype(int), np.rint(x[bright]).astype(int)
    assert np.all(exp.mask[rows, cols] & np.uint16(Mask.DETECTED))
    assert exp.metadata["HIERARCH LDF PSFFWHM"] == pytest.approx(psf.fwhm_px, abs=1e-3)


def test_source_table_fluxes_match_truth(small_camera: Instrument, dense_sky: Sky) -> None:
    det = small_camera.detector("R22_S11")
    visit = make_visit(seq_num=14, conditions=good_conditions(seeing_fwhm_arcsec=1.2))
    exp, readout = sim_exposure(small_camera, det, visit, dense_sky)
    res = characterize(exp)
    src = res.sources
    for col in ("x", "y", "flux", "flux_err", "snr", "a", "b", "theta", "flags",
                "psf_candidate", "psf_used", "saturated", "edge", "blended"):  # fmt: skip
        assert col in src.columns
    assert src["psf_candidate"].dtype == bool
    assert src["psf_used"].sum() == res.n_psf_stars
    assert (src["psf_candidate"] | ~src["psf_used"]).all()
    assert len(src) == res.n_sources

    x, y, flux = _truth_stars(small_camera, det, visit, dense_sky, readout)
    dist, k = cKDTree(np.column_stack([x, y])).query(src[["x", "y"]].to_numpy())
    good = (dist < 0.5) & ~src["saturated"] & ~src["edge"] & ~src["blended"] & (src["snr"] > 100)
    assert good.sum() >= 15
    ratio = src["flux"].to_numpy()[good] / flux[k[good]]
    # Total flux (aperture-corrected PSF flux) is unbiased to better than 1 %.
    assert float(np.median(ratio)) == pytest.approx(1.0, abs=0.01)
    # Centroids good to a small fraction of a pixel for bright stars (a few with faint
    # neighbours are pulled by up to a few tenths).
    assert float(np.median(dist[good])) < 0.04
    assert float(np.percentile(dist[good], 90)) < 0.1
    # Errors describe the scatter of faint stars (S/N 20-100) where noise dominates.
    faint = (dist < 0.5) & ~src["blended"] & (src["snr"] > 20) & (src["snr"] < 100)
    pull = (src["flux"].to_numpy()[faint] - flux[k[faint]]) / src["flux_err"].to_numpy()[faint]
    assert faint.sum() >= 10
    assert 0.6 < float(np.std(pull)) < 1.6

    # Forced PSF photometry at the true positions gives the same fluxes.
    f, e, frac = psf_photometry(exp, x, y)
    inside = frac > 0.99
    sel = inside & (flux > 1e5)
    scale = res.aperture_correction
    assert float(np.median(f[sel] * scale / flux[sel])) == pytest.approx(1.0, abs=0.01)
    assert np.all(e[inside] > 0)


def test_saturated_stars_flagged_and_not_psf_stars(
    small_camera: Instrument, dense_sky: Sky
) -> None:
    det = small_camera.detector("R22_S11")
    exp, _ = sim_exposure(small_camera, det, make_visit(seq_num=15), dense_sky)
    ref = characterize(exp.copy())
    src = ref.sources
    # Pretend the brightest PSF star saturated: mark its core SAT and re-run.
    star = src[src["psf_used"]].sort_values("flux").iloc[-1]
    yx = (round(float(star["y"])), round(float(star["x"])))
    exp.mask[yx[0] - 1 : yx[0] + 2, yx[1] - 1 : yx[1] + 2] |= np.uint16(Mask.SAT)
    res = characterize(exp)
    dist, k = cKDTree(res.sources[["x", "y"]].to_numpy()).query([star["x"], star["y"]])
    assert dist < 0.5
    row = res.sources.iloc[int(k)]
    assert bool(row["saturated"])
    assert not bool(row["psf_candidate"])
    assert res.seeing_arcsec == pytest.approx(ref.seeing_arcsec, rel=0.01)


def test_not_in_place_leaves_input_untouched(small_camera: Instrument, dense_sky: Sky) -> None:
    det = small_camera.detector("R22_S11")
    exp, _ = sim_exposure(small_camera, det, make_visit(seq_num=16), dense_sky)
    before = exp.image.copy()
    res = characterize(exp, in_place=False)
    assert res.exposure is not exp
    np.testing.assert_array_equal(exp.image, before)
    assert exp.psf is None
    assert not np.any(exp.mask & np.uint16(Mask.DETECTED))


def test_nan_pixels_become_no_data(small_camera: Instrument, dense_sky: Sky) -> None:
    det = small_camera.detector("R22_S11")
    exp, _ = sim_exposure(small_camera, det, make_visit(seq_num=17), dense_sky)
    exp.image[100:110, 200:260] = np.nan
    res = characterize(exp)
    assert np.all(exp.mask[100:110, 200:260] & np.uint16(Mask.NO_DATA))
    assert np.isfinite(res.seeing_arcsec)
    assert res.seeing_arcsec == pytest.approx(0.8, rel=0.03)


def _blank(exp: Exposure) -> Exposure:
    rng = np.random.default_rng(3)
    exp.image[:] = rng.normal(1000.0, 32.0, exp.shape).astype(np.float32)
    return exp


@pytest.mark.parametrize(
    ("spoil", "words"),
    [
        (lambda e: e.image.fill(np.nan), "NaN"),
        (_blank, "sources detected"),
        (lambda e: e.variance.fill(0.0), "variance"),
        (lambda e: setattr(e, "mask", e.mask[:-1]), "differ"),
    ],
)
def test_bad_input_raises_detector_error(
    small_camera: Instrument,
    dense_sky: Sky,
    spoil: Callable[[Exposure], object],
    words: str,
) -> None:
    det = small_camera.detector("R22_S11")
    exp, _ = sim_exposure(small_camera, det, make_visit(seq_num=18), dense_sky)
    spoil(exp)
    with pytest.raises(DetectorError) as info:
        characterize(exp)
    assert info.value.stage == "characterize"
    assert words in info.value.reason


def test_too_few_psf_stars(small_camera: Instrument) -> None:
    det = small_camera.detector("R22_S11")
    sparse = Sky(SEED, star_density_scale=0.05)
    exp, _ = sim_exposure(small_camera, det, make_visit(seq_num=19), sparse)
    with pytest.raises(DetectorError, match=r"PSF stars|sources detected") as info:
        characterize(exp)
    assert info.value.stage == "characterize"


def test_moffat_jacobian_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    dx, dy = rng.uniform(-6, 6, 200), rng.uniform(-6, 6, 200)
    p = np.array([1.1, 0.2, -0.1, 3.0, 4.2, 0.07, -0.04])
    _, jac = _moffat_and_jac(p, dx, dy, True)
    assert jac is not None
    for k in range(p.size):
        h = 1e-6 * max(1.0, abs(p[k]))
        up, dn = p.copy(), p.copy()
        up[k] += h
        dn[k] -= h
        num = (_moffat_and_jac(up, dx, dy, False)[0] - _moffat_and_jac(dn, dx, dy, False)[0]) / (
            2 * h
        )
        np.testing.assert_allclose(jac[:, k], num, rtol=1e-5, atol=1e-9)


def test_moffat_image_is_normalised_and_fwhm_is_right() -> None:
    img = moffat_image(40, 4.0, 4.765)
    assert float(img.sum()) == pytest.approx(1.0, abs=2e-4)
    c = 40
    peak = img[c, c]
    # Half maximum at 2 px along the axes for FWHM 4 px.
    assert img[c, c + 2] == pytest.approx(peak / 2, rel=1e-9)
