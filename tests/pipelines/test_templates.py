"""Templates: skymap geometry, coadds of simulated visits, the store, warping onto a detector.

The module also holds the helpers the difference-imaging and DIA tests share (calibrated
exposures as characterization, astrometry and photometry would deliver them, visits of one
field at two epochs, and templates built from them), because only these test files are ours
to write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.wcs import WCS

from ldf.errors import NotFoundError
from ldf.pipelines.templates import (
    PatchId,
    SkyMap,
    Template,
    TemplateStore,
    build_template,
    pixel_mapping_blocks,
)
from ldf.pipelines.types import DetectorError, Exposure, Mask, PsfModel
from ldf.sim.camera import DetectorReadout, true_pointing
from ldf.sim.instruments import Detector, Instrument
from ldf.sim.models import VisitSpec
from ldf.sim.psf import MoffatPsf, add_point_sources
from ldf.sim.sky import Sky, light_curve_mag
from ldf.sim.wcs import detector_wcs, sky_to_pixel
from tests.pipelines.conftest import (
    SEED,
    expected_zero_point,
    good_conditions,
    make_visit,
    sim_exposure,
)

TEMPLATE_MJD = 60700.1
"""Template epoch: 300 days before the science visits."""
SCIENCE_MJD = 61000.1
FIELD = (150.0, -30.0)
TEMPLATE_SEEING = (0.62, 0.68, 0.65, 0.60, 0.70)
"""Seeing (arcsec) of the five template visits."""
TEMPLATE_DITHERS = (
    (0.0, 0.0, 0.0),
    (6.0, -4.0, 0.3),
    (-5.0, 5.0, -0.3),
    (4.0, 6.0, 0.2),
    (-6.0, -5.0, -0.2),
)
"""(ΔRA·cos δ ″, ΔDec ″, rotation °) of the template visits."""


# -- shared helpers --------------------------------------------------------------------------


def psf_model(fwhm_px: float, e1: float = 0.0, e2: float = 0.0) -> PsfModel:
    """The simulator's Moffat PSF sampled at pixel centres, as characterization would model it."""
    moffat = MoffatPsf(fwhm_px=fwhm_px, e1=e1, e2=e2)
    h = math.ceil(4 * fwhm_px)
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    img = moffat.profile(xx, yy)
    return PsfModel(image=(img / img.sum()).astype(np.float32), fwhm_px=fwhm_px, e1=e1, e2=e2)


def field_visit(
    seq: int,
    mjd: float,
    seeing: float,
    dra_arcsec: float = 0.0,
    ddec_arcsec: float = 0.0,
    rot_deg: float = 0.0,
    field: tuple[float, float] = FIELD,
    **conditions: float,
) -> VisitSpec:
    """A science visit of ``field`` at ``mjd`` (offsets in arcsec, rotation in degrees)."""
    ra, dec = field
    visit = make_visit(
        seq_num=seq,
        ra_deg=(ra + dra_arcsec / 3600.0 / math.cos(math.radians(dec))) % 360.0,
        dec_deg=dec + ddec_arcsec / 3600.0,
        rot_sky_deg=rot_deg,
        conditions=good_conditions(seeing_fwhm_arcsec=seeing, **conditions),
    )
    return visit.model_copy(update={"start_tai_mjd": mjd})


def calibrated(
    instrument: Instrument, detector: Detector, visit: VisitSpec, sky: Sky, *, seed: int = SEED
) -> tuple[Exposure, DetectorReadout]:
    """``sim_exposure`` with what the earlier stages would add: true WCS, PSF model, zero point,
    and a subtracted background (sep, 64-pixel boxes, as characterization does)."""
    exp, readout = sim_exposure(instrument, detector, visit, sky, seed=seed)
    cond = visit.conditions
    assert cond is not None
    ra, dec = true_pointing(visit.ra_deg, visit.dec_deg, cond)
    exp.wcs = detector_wcs(instrument, detector, ra, dec, visit.rot_sky_deg)
    exp.psf = psf_model(
        cond.seeing_fwhm_arcsec / instrument.pixel_scale_arcsec, cond.psf_e1, cond.psf_e2
    )
    exp.zero_point = expected_zero_point(instrument, detector, visit)
    bkg = sep.Background(exp.image, mask=(exp.mask & np.uint16(Mask.SAT)) != 0, bw=64, bh=64)
    exp.background_level = float(bkg.globalback)
    exp.image -= bkg.back()
    return exp, readout


@lru_cache(maxsize=64)
def _calibrated_cached(
    instrument: Instrument, detector: Detector, visit: VisitSpec, sky: Sky
) -> tuple[Exposure, DetectorReadout]:
    return calibrated(instrument, detector, visit, sky)


def calibrated_copy(
    instrument: Instrument, detector: Detector, visit: VisitSpec, sky: Sky
) -> tuple[Exposure, DetectorReadout]:
    """:func:`calibrated`, cached per session; returns a copy the caller may modify."""
    exp, readout = _calibrated_cached(instrument, detector, visit, sky)
    return exp.copy(), readout


def template_visits(
    seeing: Sequence[float] = TEMPLATE_SEEING,
    mjd: float = TEMPLATE_MJD,
    field: tuple[float, float] = FIELD,
    first_seq: int = 100,
) -> list[VisitSpec]:
    """Dithered visits of the field at the template epoch (20 minutes apart)."""
    return [
        field_visit(first_seq + i, mjd + i * 0.014, s, *TEMPLATE_DITHERS[i % 5], field=field)
        for i, s in enumerate(seeing)
    ]


def build_store(
    root: Path,
    instrument: Instrument,
    detector: Detector,
    sky: Sky,
    visits: Sequence[VisitSpec],
    science_wcs_shape: tuple[WCS, tuple[int, int]] | None = None,
    skymap: SkyMap | None = None,
) -> TemplateStore:
    """Coadd the visits on every patch the detector (or the given science WCS) touches."""
    store = TemplateStore(root, skymap or SkyMap())
    exps = [calibrated_copy(instrument, detector, v, sky)[0] for v in visits]
    if science_wcs_shape is None:
        assert exps[0].wcs is not None
        wcs, shape = exps[0].wcs, exps[0].shape
    else:
        wcs, shape = science_wcs_shape
    for patch in store.skymap.patches_overlapping(wcs, shape):
        store.save(build_template(exps, store.skymap, patch, exps[0].info.band or "r"))
    return store


def injected_truth(
    sky: Sky, exp: Exposure, science_mjd: float, template_mjds: Sequence[float]
) -> dict[str, np.ndarray]:
    """Injected sources on the exposure: position, flux now and at the template epoch (nJy).

    The template flux is the mean over the template visits' times.
    """
    assert exp.wcs is not None
    ny, nx = exp.shape
    ra_c, dec_c = (float(v) for v in exp.wcs.all_pix2world((nx - 1) / 2, (ny - 1) / 2, 0))
    radius = math.hypot(nx, ny) / 2 * exp.pixel_scale_arcsec / 3600.0 + 0.01
    t0, t1 = min([science_mjd, *template_mjds]), max([science_mjd, *template_mjds])
    inj = sky.injected(ra_c, dec_c, radius, t0, t1)
    x, y = sky_to_pixel(exp.wcs, inj["ra"], inj["dec"])
    on = (x > -20) & (x < nx + 20) & (y > -20) & (y < ny + 20)
    inj, x, y = inj[on], x[on], y[on]

    def njy(mjd: float) -> np.ndarray:
        m = light_curve_mag(inj, exp.info.band or "r", mjd)
        return np.where(np.isfinite(m), 10 ** (-0.4 * (m - 31.4)), 0.0)

    f_sci = njy(science_mjd)
    f_tmpl = np.mean([njy(t) for t in template_mjds], axis=0)
    return {"x": x, "y": y, "ra": inj["ra"], "dec": inj["dec"], "id": inj["source_id"],
            "f_sci": f_sci, "f_tmpl": f_tmpl}  # fmt: skip


def star_truth(sky: Sky, exp: Exposure, mag_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """Catalogue stars on the exposure in a magnitude range: pixel position and nJy."""
    assert exp.wcs is not None
    ny, nx = exp.shape
    ra_c, dec_c = (float(v) for v in exp.wcs.all_pix2world((nx - 1) / 2, (ny - 1) / 2, 0))
    radius = math.hypot(nx, ny) / 2 * exp.pixel_scale_arcsec / 3600.0
    stars = sky.stars(ra_c, dec_c, radius)
    band = exp.info.band or "r"
    x, y = sky_to_pixel(exp.wcs, stars["ra"], stars["dec"])
    m = np.asarray(stars[band], np.float64)
    sel = (m >= mag_range[0]) & (m < mag_range[1]) & (x > 0) & (x < nx - 1) & (y > 0) & (y < ny - 1)
    return {"x": x[sel], "y": y[sel], "mag": m[sel], "njy": 10 ** (-0.4 * (m[sel] - 31.4))}


def isolated(x: np.ndarray, y: np.ndarray, flux: np.ndarray, radius: float) -> np.ndarray:
    """Sources with no other source of at least a tenth of their |flux| within ``radius``."""
    dx = x[:, None] - x[None, :]
    dy = y[:, None] - y[None, :]
    close = (dx * dx + dy * dy < radius * radius) & ~np.eye(x.size, dtype=bool)
    brighter = np.abs(flux)[None, :] >= 0.1 * np.abs(flux)[:, None]
    return ~(close & brighter).any(axis=1)


# -- skymap ----------------------------------------------------------------------------------


def test_skymap_inner_regions_tile_the_sky_and_fit_in_their_patches() -> None:
    sm = SkyMap()
    rng = np.random.default_rng(1)
    ra = rng.uniform(0, 360, 3000)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))
    # The poles, the RA wrap and ring boundaries too.
    ra = np.concatenate([ra, [0.0, 359.9999, 12.0, 200.0, 45.0, 45.0]])
    dec = np.concatenate([dec, [-90.0, 0.0, 89.99, -89.9, -29.85 + 1e-9, -29.85 - 1e-9]])
    ring, cell = sm.find_patch(ra, dec)
    assert ((ring >= 0) & (ring < sm.n_rings)).all()
    margin = sm.overlap_arcsec / sm.pixel_scale_arcsec
    for r, c, a, d in zip(ring[::7], cell[::7], ra[::7], dec[::7], strict=True):
        patch = PatchId(int(r), int(c))
        assert sm.inner_contains(patch, np.array([a]), np.array([d]))[0]
        ny, nx = sm.patch_shape(patch)
        x, y = sm.patch_wcs(patch).all_world2pix(a, d, 0)
        # Every inner point lies at least the overlap inside its patch grid.
        assert margin - 1 <= float(x) <= nx - margin
        assert margin - 1 <= float(y) <= ny - margin
    # Patches are the size the brief asks for (~0.3° plus overlap) away from the poles.
    ny, nx = sm.patch_shape(PatchId(200, 433))
    assert 5400 < nx < 6200
    assert 5400 < ny < 6200
    assert str(PatchId(200, 433)) == "200.433"
    assert PatchId.parse("200.433") == PatchId(200, 433)


def test_skymap_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="integer"):
        SkyMap(patch_deg=0.7)
    with pytest.raises(ValueError, match="no patch"):
        SkyMap().patch_wcs(PatchId(5, 10_000))
    with pytest.raises(ValueError, match="not a patch id"):
        PatchId.parse("x")


def test_patches_overlapping_finds_both_sides_of_a_ring_boundary(small_camera: Instrument) -> None:
    det = small_camera.detector("R22_S11")
    wcs = detector_wcs(small_camera, det, 150.0, -29.85, 0.0)  # straddles dec −29.85
    patches = SkyMap().patches_overlapping(wcs, (det.ny, det.nx))
    assert {p.ring for p in patches} == {200, 201}


def test_pixel_mapping_blocks_are_affine_to_a_milli_pixel(small_camera: Instrument) -> None:
    det = small_camera.detector("R22_S00")
    wcs = detector_wcs(small_camera, det, 150.0, -30.0, 33.0)
    sm = SkyMap()
    patch = sm.patches_overlapping(wcs, (det.ny, det.nx))[0]
    blocks = pixel_mapping_blocks(wcs, (det.ny, det.nx), sm.patch_wcs(patch))
    assert blocks.curvature < 1e-3
    # Spot-check the affine maps against astropy.
    k = len(blocks) // 2
    r, c = 100.0, 37.0
    sr, sc = blocks.matrix[k] @ np.array([r, c]) + blocks.offset[k]
    ra, dec = wcs.all_pix2world(blocks.x0[k] + c, blocks.y0[k] + r, 0)
    px, py = sm.patch_wcs(patch).all_world2pix(ra, dec, 0)
    assert abs(sc - px) < 1e-3
    assert abs(sr - py) < 1e-3


# -- coadds ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template_inputs(small_camera: Instrument, rich_sky: Sky) -> list[Exposure]:
    det = small_camera.detector("R22_S11")
    return [calibrated_copy(small_camera, det, v, rich_sky)[0] for v in template_visits()]


@pytest.fixture(scope="module")
def coadd(template_inputs: list[Exposure]) -> Template:
    sm = SkyMap()
    assert template_inputs[0].wcs is not None
    patch = sm.patches_overlapping(template_inputs[0].wcs, template_inputs[0].shape)[0]
    return build_template(template_inputs, sm, patch, "r")


def _psf_flux(image: np.ndarray, psf: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Uniform-weight PSF flux at integer-rounded positions (PSF re-centred by shifting)."""
    import scipy.ndimage as ndi

    h = psf.shape[0] // 2
    out = np.empty(x.size)
    for k, (xx, yy) in enumerate(zip(x, y, strict=True)):
        ix, iy = round(xx), round(yy)
        model = ndi.shift(psf.astype(np.float64), (yy - iy, xx - ix), order=3)
        stamp = image[iy - h : iy + h + 1, ix - h : ix + h + 1].astype(np.float64)
        out[k] = np.sum(model * stamp) / np.sum(model * model)
    return out


def test_coadd_photometry_astrometry_psf_and_depth(
    coadd: Template, template_inputs: list[Exposure], rich_sky: Sky
) -> None:
    t = coadd
    assert t.image.dtype == np.float32
    assert t.band == "r"
    assert t.inputs == tuple(e.info.exposure_id for e in template_inputs)
    assert t.depth is not None
    # Most of the footprint has all five inputs; the corners outside every input have none.
    assert np.mean(t.depth == 5) > 0.6
    nodata = (t.mask & np.uint16(Mask.NO_DATA)) != 0
    assert np.array_equal(nodata, t.depth < 2)
    assert (t.image[nodata] == 0).all()
    # The coadd PSF is the weighted mean of the inputs' (FWHM 3.0–3.5 px).
    assert 3.1 < t.psf.fwhm_px < 3.35
    assert abs(float(t.psf.image.sum()) - 1.0) < 1e-5
    # Stars: positions (through the patch WCS) and fluxes (nJy) agree with the catalogue.
    probe = Exposure(
        image=t.image,
        variance=t.variance,
        mask=t.mask,
        info=template_inputs[0].info,
        wcs=t.wcs,
    )
    stars = star_truth(rich_sky, probe, (16.0, 21.0))
    good = (t.depth[np.rint(stars["y"]).astype(int), np.rint(stars["x"]).astype(int)] == 5) & (
        isolated(stars["x"], stars["y"], stars["njy"], 25.0)
    )
    good &= (stars["x"] > 30) & (stars["x"] < t.shape[1] - 30)
    good &= (stars["y"] > 30) & (stars["y"] < t.shape[0] - 30)
    assert good.sum() >= 5
    flux = _psf_flux(t.image, t.psf.image, stars["x"][good], stars["y"][good])
    ratio = flux / stars["njy"][good]
    assert abs(float(np.median(ratio)) - 1.0) < 0.01, ratio
    xw, yw, _ = sep.winpos(t.image, stars["x"][good], stars["y"][good], 1.4)
    assert float(np.median(np.hypot(xw - stars["x"][good], yw - stars["y"][good]))) < 0.05
    # The coadd's noise: five inputs of ~32 e- sky noise, ~1/√5 of one input in nJy.
    one = template_inputs[0]
    sky_njy = math.sqrt(float(np.median(one.variance))) * one.njy_per_electron()
    deep = t.depth == 5
    assert 0.38 < math.sqrt(float(np.median(t.variance[deep]))) / sky_njy < 0.52


def test_coadd_rejects_a_transient_and_cosmic_ray_in_one_input(
    template_inputs: list[Exposure], coadd: Template
) -> None:
    exps = [e.copy() for e in template_inputs]
    victim = exps[2]
    assert victim.wcs is not None
    assert victim.psf is not None
    # A 19th-magnitude point source and a cosmic ray track, in one input only.
    x0, y0 = 400.3, 520.6
    flux_e = 10 ** (-0.4 * (19.0 - 31.4)) / victim.njy_per_electron()
    add_point_sources(
        victim.image, np.array([x0]), np.array([y0]), np.array([flux_e]), MoffatPsf(3.4)
    )
    victim.image[700, 300:306] += np.float32(3000.0)
    assert coadd.wcs is not None
    t = build_template(exps, SkyMap(), coadd.patch, "r")
    for xs, ys in ((x0, y0), (302.5, 700.0)):
        ra, dec = victim.wcs.all_pix2world(xs, ys, 0)
        px, py = (round(float(v)) for v in t.wcs.all_world2pix(ra, dec, 0))
        sl = (slice(py - 6, py + 7), slice(px - 6, px + 7))
        change = t.image[sl] - coadd.image[sl]
        sigma = np.sqrt(t.variance[sl])
        # Nothing left of the 19th-mag source (10⁴ nJy, peak ~10³ nJy/px) or the track.
        assert np.abs(change).max() < 4 * sigma.max()
        assert abs(float(change.sum())) < 0.02 * 10 ** (-0.4 * (19.0 - 31.4))


def test_build_template_refuses_bad_inputs(template_inputs: list[Exposure]) -> None:
    sm = SkyMap()
    first = template_inputs[0]
    assert first.wcs is not None
    patch = sm.patches_overlapping(first.wcs, first.shape)[0]
    with pytest.raises(DetectorError, match="no input exposures"):
        build_template([], sm, patch, "r")
    with pytest.raises(DetectorError, match="no photometric zero point"):
        build_template([first.copy(zero_point=None)], sm, patch, "r")
    with pytest.raises(DetectorError, match="band 'r', not 'g'"):
        build_template([first], sm, patch, "g")
    with pytest.raises(DetectorError, match="none of the 1 input exposures overlaps"):
        build_template([first], sm, PatchId(patch.ring + 20, 0), "r")


# -- store -----------------------------------------------------------------------------------


def test_store_roundtrip_copy_and_errors(coadd: Template, tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "store")
    path = store.save(coadd)
    assert path == store.path("r", coadd.patch)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    back = store.load("r", coadd.patch)
    assert np.array_equal(back.image, coadd.image)
    assert np.array_equal(back.variance, coadd.variance)
    assert np.array_equal(back.mask, coadd.mask)
    assert back.depth is not None
    assert coadd.depth is not None
    assert np.array_equal(back.depth, coadd.depth)
    assert back.origin == coadd.origin
    assert back.inputs == coadd.inputs
    assert back.psf.fwhm_px == pytest.approx(coadd.psf.fwhm_px)
    assert np.allclose(back.wcs.all_pix2world(10, 20, 0), coadd.wcs.all_pix2world(10, 20, 0))
    assert store.patches_for("r", coadd.wcs, coadd.shape) == [coadd.patch]
    assert store.patches_for("g", coadd.wcs, coadd.shape) == []

    local = store.copy_patches("r", [coadd.patch], tmp_path / "local")
    assert local.has("r", coadd.patch)
    assert local.path("r", coadd.patch).read_bytes() == path.read_bytes()
    with pytest.raises(NotFoundError, match=r"patch\(es\) 1.1"):
        store.copy_patches("r", [PatchId(1, 1)], tmp_path / "local")

    with pytest.raises(DetectorError, match="no g-band template for patch"):
        store.load("g", coadd.patch)
    path.write_bytes(b"SIMPLE  = garbage")
    with pytest.raises(DetectorError, match="unreadable template"):
        store.load("r", coadd.patch)
    other = TemplateStore(tmp_path / "other", SkyMap(patch_deg=0.5))
    other.path("r", coadd.patch).parent.mkdir(parents=True)
    local.path("r", coadd.patch).replace(other.path("r", coadd.patch))
    with pytest.raises(DetectorError, match="another skymap"):
        other.load("r", coadd.patch)


def test_warp_to_lines_up_with_a_rotated_science_detector(
    small_camera: Instrument, rich_sky: Sky, coadd: Template, tmp_path: Path
) -> None:
    det = small_camera.detector("R22_S11")
    store = TemplateStore(tmp_path)
    store.save(coadd)
    sci, _ = calibrated_copy(
        small_camera, det, field_visit(1, SCIENCE_MJD, 0.9, 2, -3, 25.0), rich_sky
    )
    assert sci.wcs is not None
    warped = store.warp_to("r", sci.wcs, sci.shape, info=sci.info)
    assert warped.shape == sci.shape
    assert warped.zero_point == 31.4
    assert warped.njy_per_electron() == pytest.approx(1.0)
    assert warped.info.obs_type == "template"
    assert warped.metadata["TMPLPTCH"] == str(coadd.patch)
    # Rotating the detector by 25° leaves its corners outside the (unrotated) coverage.
    covered = (warped.mask & np.uint16(Mask.NO_DATA)) == 0
    assert 0.6 < covered.mean() < 0.97
    assert warped.psf is not None
    assert warped.psf.fwhm_px == pytest.approx(coadd.psf.fwhm_px)
    stars = star_truth(rich_sky, sci, (16.0, 21.0))
    ix, iy = np.rint(stars["x"]).astype(int), np.rint(stars["y"]).astype(int)
    ok = isolated(stars["x"], stars["y"], stars["njy"], 25.0) & (stars["x"] > 30)
    ok &= (stars["x"] < sci.shape[1] - 30) & (stars["y"] > 30) & (stars["y"] < sci.shape[0] - 30)
    ok &= np.array(
        [
            covered[max(0, b - 20) : b + 21, max(0, a - 20) : a + 21].all()
            for a, b in zip(ix, iy, strict=True)
        ]
    )
    ok &= (warped.mask[iy, ix] & np.uint16(Mask.SUSPECT)) == 0
    assert ok.sum() >= 5
    xw, yw, _ = sep.winpos(warped.image, stars["x"][ok], stars["y"][ok], 1.4)
    assert float(np.median(np.hypot(xw - stars["x"][ok], yw - stars["y"][ok]))) < 0.05
    flux = _psf_flux(warped.image, warped.psf.image, stars["x"][ok], stars["y"][ok])
    assert abs(float(np.median(flux / stars["njy"][ok])) - 1.0) < 0.01
    # Variance: resampled (4×4-binned), the coadd's level.
    assert float(np.median(warped.variance[covered])) == pytest.approx(
        float(np.median(coadd.variance[coadd.depth == 5])) if coadd.depth is not None else 0,
        rel=0.2,
    )


def test_warp_to_mosaics_two_patches(
    small_camera: Instrument, rich_sky: Sky, tmp_path: Path
) -> None:
    det = small_camera.detector("R22_S11")
    field = (150.0, -29.85)  # a ring boundary runs across the detector
    visits = template_visits(field=field, first_seq=200)
    sci, _ = calibrated_copy(
        small_camera, det, field_visit(2, SCIENCE_MJD, 0.9, field=field), rich_sky
    )
    assert sci.wcs is not None
    store = build_store(tmp_path, small_camera, det, rich_sky, visits, (sci.wcs, sci.shape))
    patches = store.patches_for("r", sci.wcs, sci.shape)
    assert {p.ring for p in patches} == {200, 201}
    warped = store.warp_to("r", sci.wcs, sci.shape, info=sci.info)
    assert len(warped.metadata["TMPLPTCH"].split(",")) == len(patches)
    covered = (warped.mask & np.uint16(Mask.NO_DATA)) == 0
    assert covered.mean() > 0.9
    assert warped.psf is not None
    stars = star_truth(rich_sky, sci, (16.5, 20.5))
    ok = isolated(stars["x"], stars["y"], stars["njy"], 25.0)
    ok &= (stars["x"] > 40) & (stars["x"] < sci.shape[1] - 40)
    ok &= (stars["y"] > 40) & (stars["y"] < sci.shape[0] - 40)
    flux = _psf_flux(warped.image, warped.psf.image, stars["x"][ok], stars["y"][ok])
    ratio = flux / stars["njy"][ok]
    ra, dec = sci.wcs.all_pix2world(stars["x"][ok], stars["y"][ok], 0)
    ring, _ = store.skymap.find_patch(ra, dec)
    for r in (200, 201):  # stars on both sides of the seam
        assert (ring == r).sum() >= 2
        assert abs(float(np.median(ratio[ring == r])) - 1.0) < 0.015


def test_warp_to_without_template_is_a_detector_error(
    small_camera: Instrument, rich_sky: Sky, coadd: Template, tmp_path: Path
) -> None:
    det = small_camera.detector("R22_S11")
    sci, _ = calibrated_copy(small_camera, det, field_visit(1, SCIENCE_MJD, 0.9), rich_sky)
    assert sci.wcs is not None
    store = TemplateStore(tmp_path)
    with pytest.raises(DetectorError) as info:
        store.warp_to("r", sci.wcs, sci.shape, info=sci.info)
    assert info.value.stage == "diffim"
    assert f"no r-band template covers R22_S11 of visit {sci.info.exposure_id}" in info.value.reason
    assert "run `ldf templates build --band r --patch" in info.value.reason
    # A stored template that misses the detector: same error, with the coverage.
    store.save(coadd)
    far = detector_wcs(small_camera, det, 150.0, -29.9, 0.0)  # same patch, 6′ north
    assert store.skymap.patches_overlapping(far, sci.shape) == [coadd.patch]
    with pytest.raises(DetectorError, match=r"covers only 0% of R22_S11"):
        store.warp_to("r", far, sci.shape, info=sci.info)


def test_template_fits_layout(coadd: Template, tmp_path: Path) -> None:
    path = TemplateStore(tmp_path).save(coadd)
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        assert names == [
            "PRIMARY", "IMAGE", "VARIANCE", "MASK", "PSF", "SPLINE", "VARBIN4", "MASKBIN4",
            "DEPTH", "INPUTS",
        ]  # fmt: skip
        assert hdul["VARBIN4"].data.shape == tuple(-(-n // 4) for n in coadd.shape)
        assert hdul[0].header["BAND"] == "r"
        assert hdul["IMAGE"].header["BUNIT"] == "nJy"
        assert hdul["IMAGE"].header["CTYPE1"] == "RA---TAN"
        assert hdul["MASK"].header["MSKBIT6"] == "NO_DATA"


# -- prewarp (ldf.pipelines.prewarp) ---------------------------------------------------------


def _shifted(wcs: WCS, dx: float, dy: float, rot_deg: float = 0.0) -> WCS:
    """``wcs`` moved by (dx, dy) pixels on the sky (pixel p of the result is p + d of
    ``wcs``), optionally rotated about its reference pixel."""
    out = wcs.deepcopy()
    out.wcs.crpix = [wcs.wcs.crpix[0] - dx, wcs.wcs.crpix[1] - dy]
    if rot_deg:
        th = math.radians(rot_deg)
        rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        out.wcs.cd = wcs.wcs.cd @ rot
    out.wcs.set()
    return out


def test_prewarped_template_shifted_matches_a_full_warp(
    small_camera: Instrument, rich_sky: Sky, coadd: Template, tmp_path: Path
) -> None:
    import scipy.ndimage as ndi

    from ldf.pipelines.prewarp import MARGIN, PrewarpMiss, from_prewarped, prewarp

    det = small_camera.detector("R22_S11")
    store = TemplateStore(tmp_path / "store")
    store.save(coadd)
    predicted = detector_wcs(small_camera, det, FIELD[0], FIELD[1], 0.0)
    shape = (det.ny, det.nx)
    where = prewarp(store, "r", predicted, shape, tmp_path / "prewarped" / "R22_S11-r")
    assert sorted(p.name for p in where.parent.iterdir()) == ["R22_S11-r"]  # no temporary
    # A pointing error of (3.37, −7.61) px: the fitted WCS is the predicted one shifted.
    fitted = _shifted(predicted, 3.37, -7.61)
    got = from_prewarped(where, fitted, shape)
    assert not isinstance(got, PrewarpMiss), got
    full = store.warp_to("r", fitted, shape)
    assert got.shape == full.shape == shape
    assert got.metadata["TMPLSHX"] == pytest.approx(3.37, abs=1e-3)
    assert got.metadata["TMPLSHY"] == pytest.approx(-7.61, abs=1e-3)
    assert got.psf is not None
    assert full.psf is not None
    assert got.psf.fwhm_px == pytest.approx(full.psf.fwhm_px)
    assert got.zero_point == full.zero_point
    usable = ((got.mask | full.mask) & np.uint16(Mask.NO_DATA | Mask.EDGE)) == 0
    assert usable.mean() > 0.8
    # Stars: same positions and fluxes as the direct warp gives.
    stars = star_truth(rich_sky, full, (16.0, 20.5))
    ok = isolated(stars["x"], stars["y"], stars["njy"], 25.0)
    ok &= (stars["x"] > 30) & (stars["x"] < shape[1] - 30)
    ok &= (stars["y"] > 30) & (stars["y"] < shape[0] - 30)
    ix, iy = np.rint(stars["x"]).astype(int), np.rint(stars["y"]).astype(int)
    ok &= usable[iy, ix]
    assert ok.sum() >= 5
    xg, yg, _ = sep.winpos(got.image, stars["x"][ok], stars["y"][ok], 1.4)
    xf, yf, _ = sep.winpos(full.image, stars["x"][ok], stars["y"][ok], 1.4)
    assert float(np.max(np.hypot(xg - xf, yg - yf))) < 0.03
    fg = _psf_flux(got.image, full.psf.image, stars["x"][ok], stars["y"][ok])
    ff = _psf_flux(full.image, full.psf.image, stars["x"][ok], stars["y"][ok])
    assert float(np.max(np.abs(fg / ff - 1.0))) < 0.005
    # Pixel by pixel: the second interpolation smooths the noise a little and a bright
    # star's core by a few per cent of its peak.
    diff = np.abs(got.image - full.image)[usable]
    sigma = np.sqrt(full.variance[usable])
    assert float(np.sqrt(np.mean((diff / sigma) ** 2))) < 0.5
    assert float(diff.max()) < 0.03 * float(full.image[usable].max())
    ratio = got.variance[usable] / full.variance[usable]
    assert float(np.median(ratio)) == pytest.approx(1, rel=0.02)
    # Where the direct warp has no data, the shifted prewarp says so too (both take the
    # mask from 4×4-binned planes: their edges may differ by a binned pixel).
    nodata = np.uint16(Mask.NO_DATA)
    got_nodata = ndi.binary_dilation((got.mask & nodata) != 0, np.ones((9, 9), bool))
    assert not (((full.mask & nodata) != 0) & ~got_nodata).any()
    # At the stored patch's edge (the test stores one patch) the prewarp's enlarged grid
    # may leave a little more without data; never much more.
    frac = (got.mask & nodata).astype(bool).mean() - (full.mask & nodata).astype(bool).mean()
    assert frac < 0.02

    # What it refuses: a rotation (not a shift), a pointing error past the margin, nothing.
    turned = from_prewarped(where, _shifted(predicted, 1.0, 1.0, rot_deg=0.05), shape)
    assert isinstance(turned, PrewarpMiss)
    assert "departs from a shift" in turned.reason
    far = from_prewarped(where, _shifted(predicted, MARGIN + 1.5, 0.0), shape)
    assert isinstance(far, PrewarpMiss)
    assert "past the prewarp's 64-pixel margin" in far.reason
    none = from_prewarped(tmp_path / "nothing", fitted, shape)
    assert isinstance(none, PrewarpMiss)
    assert "no prewarped template" in none.reason
    other = from_prewarped(where, fitted, (shape[0] - 2, shape[1]))
    assert isinstance(other, PrewarpMiss)
    assert "another grid" in other.reason
