"""PSF-matched image subtraction (Alard & Lupton) on simulated exposures and on synthetic ones."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.signal
from astropy.wcs import WCS

from ldf.pipelines.diffim import (
    CONVOLVE_SCIENCE,
    CONVOLVE_TEMPLATE,
    DifferenceResult,
    fft_convolve,
    psf_matching_prior,
    subtract,
)
from ldf.pipelines.templates import TemplateStore
from ldf.pipelines.types import DetectorError, Exposure, Mask, PsfModel, VisitInfo
from ldf.sim.instruments import Instrument
from ldf.sim.sky import Sky
from tests.pipelines.test_templates import (
    SCIENCE_MJD,
    build_store,
    calibrated_copy,
    field_visit,
    isolated,
    psf_model,
    star_truth,
    template_visits,
)


@pytest.fixture(scope="module")
def store(
    small_camera: Instrument, rich_sky: Sky, tmp_path_factory: pytest.TempPathFactory
) -> TemplateStore:
    det = small_camera.detector("R22_S11")
    root = tmp_path_factory.mktemp("templates")
    return build_store(root, small_camera, det, rich_sky, template_visits())


@pytest.fixture(scope="module")
def science(small_camera: Instrument, rich_sky: Sky) -> Exposure:
    det = small_camera.detector("R22_S11")
    return calibrated_copy(small_camera, det, field_visit(1, SCIENCE_MJD, 0.9, 3, -2), rich_sky)[0]


@pytest.fixture(scope="module")
def warped(store: TemplateStore, science: Exposure) -> Exposure:
    assert science.wcs is not None
    return store.warp_to("r", science.wcs, science.shape, info=science.info)


@pytest.fixture(scope="module")
def result(science: Exposure, warped: Exposure) -> DifferenceResult:
    return subtract(science, warped)


def _blank_sky_noise(res: DifferenceResult) -> float:
    """Robust std of difference / σ over unmasked pixels (half the 16–84 % range)."""
    d = res.difference
    ok = d.mask == 0
    z = d.image[ok] / np.sqrt(d.variance[ok])
    lo, hi = np.percentile(z, [15.865, 84.135])
    return float(0.5 * (hi - lo))


def _star_residuals(res: DifferenceResult, sky: Sky, exp: Exposure) -> np.ndarray:
    """Residual PSF flux / σ at isolated catalogue stars (15.5–21.5 mag) in the difference."""
    d = res.difference
    assert d.psf is not None
    stars = star_truth(sky, exp, (15.5, 21.5))
    ok = isolated(stars["x"], stars["y"], stars["njy"], 20.0)
    ny, nx = exp.shape
    ok &= (stars["x"] > 30) & (stars["x"] < nx - 30) & (stars["y"] > 30) & (stars["y"] < ny - 30)
    psf = d.psf.stamp(21).astype(np.float64)
    pulls = []
    for x, y in zip(stars["x"][ok], stars["y"][ok], strict=True):
        ix, iy = round(x), round(y)
        sl = (slice(iy - 10, iy + 11), slice(ix - 10, ix + 11))
        if (d.mask[sl] & np.uint16(Mask.SAT | Mask.NO_DATA)).any():
            continue
        flux = float(np.sum(psf * d.image[sl]) / np.sum(psf**2))
        err = float(np.sqrt(np.sum(psf**2 * d.variance[sl])) / np.sum(psf**2))
        pulls.append(flux / err)
    return np.array(pulls)


def test_convolve_template_subtracts_the_static_sky(
    result: DifferenceResult, science: Exposure, warped: Exposure, rich_sky: Sky
) -> None:
    res = result
    assert res.mode == CONVOLVE_TEMPLATE
    assert res.template is warped
    # The zero points are exact: the photometric scaling the kernel finds is 1.
    assert abs(res.kernel_sum - 1.0) < 0.01, res.kernel_sum
    assert res.n_stamps >= 5
    assert 0.9 < res.quality < 1.15
    assert res.kernel.shape[0] % 2 == 1
    assert res.stamps["used"].sum() == res.n_stamps
    d = res.difference
    assert d.image.dtype == np.float32
    assert d.zero_point == science.zero_point
    assert d.psf is science.psf
    assert d.wcs is science.wcs
    assert d.metadata["DIFFMODE"] == CONVOLVE_TEMPLATE
    # Blank sky: the propagated variance describes the noise.
    assert 0.93 < _blank_sky_noise(res) < 1.1
    # Catalogue stars vanish: residual PSF fluxes are consistent with noise.
    pulls = _star_residuals(res, rich_sky, science)
    assert pulls.size >= 5
    assert float(np.median(np.abs(pulls))) < 2.0, pulls
    # EDGE along the border (the kernel's half-width).
    hw = res.kernel.shape[0] // 2
    edge = np.uint16(Mask.EDGE)
    assert (d.mask[:hw] & edge).all()
    assert (d.mask[:, -hw:] & edge).all()
    assert not (d.mask[hw + 5 : -hw - 5, hw + 5 : -hw - 5] & edge).any()


def test_convolve_science_when_the_science_is_sharper(
    small_camera: Instrument, rich_sky: Sky, tmp_path: Path
) -> None:
    det = small_camera.detector("R22_S11")
    blurry = template_visits(seeing=(0.9, 0.95, 0.92, 0.88, 0.97), first_seq=300)
    store = build_store(tmp_path, small_camera, det, rich_sky, blurry)
    sci = calibrated_copy(small_camera, det, field_visit(2, SCIENCE_MJD, 0.6, -4, 3), rich_sky)[0]
    assert sci.wcs is not None
    tmpl = store.warp_to("r", sci.wcs, sci.shape, info=sci.info)
    res = subtract(sci, tmpl)
    assert res.mode == CONVOLVE_SCIENCE
    assert res.difference.psf is tmpl.psf  # the difference has the template's PSF
    assert abs(res.kernel_sum - 1.0) < 0.02, res.kernel_sum
    assert 0.6 < res.quality < 1.15
    # Science noise convolved with the kernel is correlated, so pixel-level z is narrower
    # than 1 only if the variance were wrong; it is propagated through K², so ≈ 1.
    assert 0.9 < _blank_sky_noise(res) < 1.15
    pulls = _star_residuals(res, rich_sky, sci)
    assert pulls.size >= 5
    assert float(np.median(np.abs(pulls))) < 3.0, pulls


def test_mask_propagation_grows_template_holes(science: Exposure, warped: Exposure) -> None:
    holed = warped.copy()
    holed.mask[400:420, 500:520] |= np.uint16(Mask.NO_DATA)
    holed.image[400:420, 500:520] = 0.0
    res = subtract(science, holed)
    hw = res.kernel.shape[0] // 2
    nodata = (res.difference.mask & np.uint16(Mask.NO_DATA)) != 0
    assert nodata[400 - hw : 420 + hw, 500 - hw : 520 + hw].all()
    assert not nodata[400 - hw - 3, 510]
    assert (res.difference.image[nodata] == 0).all()
    # A science mask bit survives into the difference.
    sci = science.copy()
    sci.mask[300, 300] |= np.uint16(Mask.BAD)
    assert subtract(sci, warped).difference.mask[300, 300] & np.uint16(Mask.BAD)


def test_residual_background_is_removed(science: Exposure, warped: Exposure) -> None:
    """A smooth background the science has and the template lacks (a broad 5 e⁻ bump no plane
    fits: what separately fitted background meshes leave) is gone from the difference, on
    scales the 128-pixel mesh with its 3×3 median filter resolves (≳ 400 pixels)."""
    sci = science.copy()
    ny, nx = sci.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    bump = 5.0 * np.exp(-0.5 * ((xx - 0.3 * nx) ** 2 + (yy - 0.6 * ny) ** 2) / 500.0**2)
    sci.image += bump.astype(np.float32)
    plain = subtract(science, warped).difference
    bumped = subtract(sci, warped).difference
    assert bumped.metadata["DIFFBKG"] > plain.metadata["DIFFBKG"]
    # What the bump left in the difference, cell by cell (same noise in both: it cancels).
    change = (bumped.image - plain.image).astype(np.float64)
    left, added = [], []
    for y0 in range(16, ny - 256, 120):
        for x0 in range(16, nx - 256, 120):
            sl = (slice(y0, y0 + 240), slice(x0, x0 + 240))
            left.append(float(np.median(change[sl])))
            added.append(float(bump[sl].mean()))
    slope = float(np.polyfit(added, left, 1)[0])
    print(f"\nleft {np.round(left, 2)} of {np.round(added, 2)} e-: slope {slope:.3f}")
    assert max(added) > 3.0
    assert abs(slope) < 0.1  # ≈ 1 without the residual background
    assert np.abs(left).max() < 0.5


def test_convolve_science_grows_cosmic_rays_by_the_kernel_core(
    small_camera: Instrument, rich_sky: Sky, tmp_path: Path
) -> None:
    """ISR has interpolated CR pixels and defects; only the kernel's core spreads them (not
    its wings). A BAD pixel nobody interpolated spreads as far as the kernel reaches."""
    det = small_camera.detector("R22_S11")
    blurry = template_visits(seeing=(0.9, 0.95, 0.92, 0.88, 0.97), first_seq=300)
    store = build_store(tmp_path, small_camera, det, rich_sky, blurry)
    sci = calibrated_copy(small_camera, det, field_visit(2, SCIENCE_MJD, 0.6, -4, 3), rich_sky)[0]
    assert sci.wcs is not None
    sci.mask[500, 500] |= np.uint16(Mask.CR)
    sci.mask[100:300, 200] |= np.uint16(Mask.BAD | Mask.INTRP)  # a defect column ISR repaired
    sci.mask[700, 300] |= np.uint16(Mask.BAD)  # not interpolated
    res = subtract(sci, store.warp_to("r", sci.wcs, sci.shape, info=sci.info))
    assert res.mode == CONVOLVE_SCIENCE
    hw = res.kernel.shape[0] // 2
    m = res.difference.mask
    cr = (m[500 - hw : 501 + hw, 500 - hw : 501 + hw] & np.uint16(Mask.CR)) != 0
    rows, cols = np.nonzero(cr)
    radius = int(max(np.abs(rows - hw).max(), np.abs(cols - hw).max()))
    assert 1 <= radius < hw, (radius, hw)
    k = np.abs(res.kernel)
    core = k[hw - radius : hw + radius + 1, hw - radius : hw + radius + 1].sum()
    assert core >= 0.9 * k.sum()
    bad = (m[200, 200 - hw : 201 + hw] & np.uint16(Mask.BAD)) != 0
    assert np.flatnonzero(bad).tolist() == list(range(hw - radius, hw + radius + 1))
    assert (m[700 - hw : 701 + hw, 300 - hw : 301 + hw] & np.uint16(Mask.BAD)).all()


def test_modes_can_be_forced_and_sources_can_be_given(science: Exposure, warped: Exposure) -> None:
    import sep

    objs = sep.extract(science.image, 30.0, err=np.sqrt(science.variance))
    sources = pd.DataFrame({"x": objs["x"], "y": objs["y"], "flux": objs["flux"]})
    res = subtract(science, warped, sources=sources, mode=CONVOLVE_TEMPLATE)
    assert res.mode == CONVOLVE_TEMPLATE
    assert res.n_stamps >= 5
    assert abs(res.kernel_sum - 1.0) < 0.01
    with pytest.raises(ValueError, match="mode must be one of"):
        subtract(science, warped, mode="deconvolve")
    with pytest.raises(DetectorError, match="no x/y columns"):
        subtract(science, warped, sources=pd.DataFrame({"ra": [1.0]}))


def test_subtract_refuses_unusable_input(science: Exposure, warped: Exposure) -> None:
    with pytest.raises(DetectorError, match="no PSF model"):
        subtract(science.copy(psf=None), warped)
    with pytest.raises(DetectorError, match="no photometric zero point"):
        subtract(science.copy(zero_point=None), warped)
    small = warped.copy(
        image=warped.image[:500], variance=warped.variance[:500], mask=warped.mask[:500]
    )
    with pytest.raises(DetectorError, match=r"warp it with TemplateStore\.warp_to"):
        subtract(science, small)
    blank = science.copy()
    blank.image[:] = 0.0
    with pytest.raises(DetectorError, match=r"only \d+ bright isolated unsaturated stars") as info:
        subtract(blank, warped)
    assert info.value.stage == "diffim"
    assert "R22_S11" in info.value.reason


# -- synthetic checks of the machinery --------------------------------------------------------


def _gauss_psf(sigma: float, h: int = 15) -> PsfModel:
    d = np.arange(-h, h + 1)
    g = np.exp(-0.5 * (d / sigma) ** 2)
    img = np.outer(g, g)
    return PsfModel(image=(img / img.sum()).astype(np.float32), fwhm_px=2.3548 * sigma)


def _exposure(image: np.ndarray, variance: np.ndarray, psf: PsfModel, zp: float) -> Exposure:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, 0.0]
    w.wcs.crpix = [200.0, 200.0]
    w.wcs.cd = np.array([[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]])
    info = VisitInfo(
        instrument="LSSTCam", exposure_id=2026010100001, day_obs=20260101, seq_num=1,
        detector="R22_S11", detector_id=94, obs_type="science", band="r",
        physical_filter="r_57", exp_time_s=30.0, dark_time_s=31.0, mjd_begin_tai=61000.0,
        ra_deg=10.0, dec_deg=0.0, rot_sky_deg=0.0, airmass=1.0,
    )  # fmt: skip
    return Exposure(
        image=image.astype(np.float32),
        variance=variance.astype(np.float32),
        mask=np.zeros(image.shape, np.uint16),
        info=info,
        wcs=w,
        psf=psf,
        zero_point=zp,
    )


def test_kernel_recovers_a_known_blur_and_flux_scale() -> None:
    rng = np.random.default_rng(3)
    ny, nx = 400, 420
    n = 60
    xs, ys = rng.uniform(30, nx - 30, n), rng.uniform(30, ny - 30, n)
    fluxes = 10 ** rng.uniform(4.5, 5.5, n)

    def render(sigma: float, scale: float) -> np.ndarray:
        yy, xx = np.mgrid[0:ny, 0:nx]
        img = np.zeros((ny, nx))
        for x, y, f in zip(xs, ys, fluxes, strict=True):
            img += (
                scale
                * f
                * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2)
                / (2 * math.pi * sigma**2)
            )
        return img

    sky = 500.0
    tmpl_true, sci_true = render(1.2, 1.0), render(2.0, 1.0)
    tmpl = tmpl_true + rng.normal(0, 3.0, tmpl_true.shape)
    sci = sci_true + rng.normal(0, 1.0, sci_true.shape) * np.sqrt(sky + sci_true)
    # The science zero point is 0.03 mag brighter than claimed: the kernel sum shows it.
    science = _exposure(sci, sky + sci_true, _gauss_psf(2.0), 28.0)
    template = _exposure(tmpl, np.full_like(tmpl, 9.0), _gauss_psf(1.2), 28.0)
    template.zero_point = 28.0 + 2.5 * math.log10(1.0 / 1.03)
    res = subtract(science, template)
    assert res.mode == CONVOLVE_TEMPLATE
    assert res.kernel_sum == pytest.approx(1.0 / 1.03, rel=3e-3)
    # The kernel turns the template PSF into the science PSF (its frequencies above the
    # template's band are unconstrained by the data and do not matter).
    matched = scipy.signal.convolve(_gauss_psf(1.2).image.astype(np.float64), res.kernel, "same")
    target = _gauss_psf(2.0).image * res.kernel_sum
    assert np.abs(matched - target).max() < 0.01 * target.max()
    assert 0.95 < _blank_sky_noise(res) < 1.06


def test_fft_convolve_is_a_true_convolution() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(123, 97)).astype(np.float32)
    ker = rng.normal(size=(9, 9))
    direct = scipy.signal.convolve(img.astype(np.float64), ker, mode="same", method="direct")
    assert np.abs(fft_convolve(img, ker) - direct).max() < 1e-4
    with pytest.raises(ValueError, match="odd-sized"):
        fft_convolve(img, np.ones((4, 4)))


def test_psf_matching_prior_turns_one_moffat_into_the_other() -> None:
    narrow, wide = psf_model(3.0), psf_model(4.6)
    k = psf_matching_prior(narrow, wide, 12)
    assert k.sum() == pytest.approx(1.0)
    conv = scipy.signal.convolve(narrow.image.astype(np.float64), k, mode="same")
    target = wide.stamp(narrow.image.shape[0]).astype(np.float64)
    assert np.abs(conv - target).max() < 1e-3 * target.max()
