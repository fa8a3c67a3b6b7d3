"""ISR against the simulator's truth: sky level and noise, flat pattern, cosmic rays, defects,
saturation, geometry from the headers, and every way a raw or a calibration can be wrong."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ldf.archiver.rawfits import HeaderProblem, build_hdulist
from ldf.butler.formatters import RawImage
from ldf.pipelines.calibs import CalibSet
from ldf.pipelines.isr import amplifier_noise, read_raw, run_isr
from ldf.pipelines.types import DetectorError, Exposure, Mask
from ldf.sim.camera import (
    DetectorReadout,
    _add_cosmic_rays,
    _visit_rngs,
    assemble,
    flat_pattern,
    render_detector,
)
from ldf.sim.instruments import Detector, Instrument, get_instrument
from ldf.sim.models import ObsType, VisitSpec
from ldf.sim.sky import Sky, star_mags
from ldf.sim.wcs import detector_wcs, sky_to_pixel
from tests.pipelines.conftest import (
    SEED,
    good_conditions,
    make_visit,
    sim_exposure,
    write_sim_raw,
)
from tests.pipelines.test_calibs import (
    DETECTOR,
    copy_raw,
    hot_pixel_truth,
    master_calibs,
    raw_image,
)


@dataclass
class Processed:
    visit: VisitSpec
    raw: RawImage
    readout: DetectorReadout
    exposure: Exposure


def _sky_e(camera: Instrument, visit: VisitSpec) -> float:
    """Sky electrons per pixel as the simulator puts them (before the flat pattern)."""
    assert visit.conditions is not None
    assert visit.band is not None
    zp, k = camera.zero_points[visit.band], camera.extinction[visit.band]
    return (
        10 ** (-0.4 * (visit.conditions.sky_mag_arcsec2 - zp - k))
        * camera.pixel_scale_arcsec**2
        * visit.exp_time_s
    )


def _cosmic_ray_truth(camera: Instrument, det: Detector, visit: VisitSpec) -> np.ndarray:
    """Electrons the simulator's cosmic rays put in each pixel (its own event stream)."""
    _, events, _ = _visit_rngs(SEED, visit, det)
    image = np.zeros((det.ny, det.nx), np.float32)
    _add_cosmic_rays(image, camera, visit.dark_time_s, events)
    return image


@pytest.fixture(scope="module")
def det(small_camera: Instrument) -> Detector:
    return small_camera.detector(DETECTOR)


@pytest.fixture(scope="module")
def calibs(small_camera: Instrument) -> CalibSet:
    return master_calibs(small_camera)


@pytest.fixture(scope="module")
def science(
    small_camera: Instrument,
    det: Detector,
    calibs: CalibSet,
    rich_sky: Sky,
    tmp_path_factory: pytest.TempPathFactory,
) -> Processed:
    """A 30 s r-band science exposure written as a raw file, read back and ISR'd."""
    visit = make_visit(seq_num=100)
    path, readout = write_sim_raw(
        tmp_path_factory.mktemp("raw"), small_camera, det, visit, rich_sky
    )
    raw = read_raw(path)
    return Processed(visit, raw, readout, run_isr(raw, small_camera, calibs))


# --------------------------------------------------------------------------- the camera


def test_electronics_do_not_depend_on_scale() -> None:
    small, full = get_instrument("LSSTCam", 0.25), get_instrument("LSSTCam", 1.0)
    for name in ("R01_S00", "R22_S11", "R00_SW0"):
        for a, b in zip(
            small.detector(name).amplifiers, full.detector(name).amplifiers, strict=True
        ):
            assert a.name == b.name
            assert (a.gain, a.read_noise, a.bias_level, a.dark_current, a.saturation) == (
                b.gain,
                b.read_noise,
                b.bias_level,
                b.dark_current,
                b.saturation,
            )
            assert (a.nx, a.ny) != (b.nx, b.ny)


@pytest.mark.parametrize("name", ["R22_S11", "R01_S00", "R00_SW0"])
def test_geometry_comes_from_the_headers(small_camera: Instrument, name: str) -> None:
    """E2V, ITL and a half-height wavefront CCD assemble like the simulator's own inverse,
    with the description of the camera at the right scale or at another one."""
    det = small_camera.detector(name)
    raw, readout = raw_image(small_camera, det, make_visit(seq_num=5))
    truth = assemble(det, readout.amps)
    for camera in (small_camera, get_instrument("LSSTCam", 1.0)):
        exp = run_isr(
            raw, camera, do_bias=False, do_dark=False, do_flat=False, mask_cosmic_rays=False
        )
        assert exp.shape == truth.shape == (det.ny, det.nx)
        diff = exp.image - truth
        # Both subtract a per-row overscan level (clipped mean here, median there).
        assert abs(float(np.mean(diff))) < 0.2
        assert float(np.std(diff)) < 1.5
        assert exp.wcs is not None
        expected = detector_wcs(small_camera, det, 150.0, -30.0, 0.0)
        np.testing.assert_allclose(
            exp.wcs.wcs_pix2world([[0, 0], [det.nx - 1, det.ny - 1]], 0),
            expected.wcs_pix2world([[0, 0], [det.nx - 1, det.ny - 1]], 0),
            atol=1e-9,
        )


# --------------------------------------------------------------------------- science


def test_science_exposure_matches_the_noiseless_expectation(
    small_camera: Instrument, det: Detector, science: Processed, rich_sky: Sky
) -> None:
    exp = science.exposure
    assert exp.image.dtype == np.float32
    assert exp.variance.dtype == np.float32
    assert exp.mask.dtype == np.uint16
    flat = flat_pattern(small_camera, det)
    # Flat-fielding by a flat normalised to its median leaves the sky at sky_e × median.
    sky = _sky_e(small_camera, science.visit) * float(np.median(flat))
    clean = exp.mask == 0
    levels = []
    for amp in det.amplifiers:
        sl = amp.assembled_slice()
        levels.append(float(np.median(exp.image[sl][clean[sl]])))
        assert levels[-1] == pytest.approx(sky, rel=0.01), amp.name
    # The vignetting (10 % across this CCD) and the amplifiers' QE steps are gone.
    assert max(levels) / min(levels) - 1 < 0.003
    assert np.ptp(flat) > 0.05
    # Pixel noise: the sky's scatter is what the variance plane says, not more.
    noise = math.sqrt(float(np.median(exp.variance[clean])))
    rn2 = float(np.mean([a.read_noise**2 for a in det.amplifiers]))
    assert noise == pytest.approx(math.sqrt(sky + rn2), rel=0.03)
    pix = exp.image[clean]
    pix = pix[np.abs(pix - sky) < 4 * noise]  # sources out; 4σ keeps 99.99 % of the sky
    assert float(np.std(pix)) < 1.2 * noise
    # Tighter: with the flat left in, this is 1.15 (and the amplifier levels 7 % apart).
    assert 0.95 * noise < float(np.std(pix)) < 1.06 * noise
    # Pixel by pixel, the same raw calibrated with the simulator's own truth (exact flat,
    # mean dark) differs only by the master calibrations' noise.
    truth, _ = sim_exposure(small_camera, det, science.visit, rich_sky)
    diff = (exp.image - truth.image)[clean]
    assert abs(float(np.mean(diff))) < 0.3
    assert float(np.std(diff)) < 0.2 * noise


def test_science_exposure_info_wcs_and_metadata(
    small_camera: Instrument, det: Detector, science: Processed
) -> None:
    exp = science.exposure
    info = exp.info
    assert (info.instrument, info.detector, info.detector_id) == ("LSSTCam", DETECTOR, det.id)
    assert info.exposure_id == science.visit.exposure_id
    assert (info.obs_type, info.band) == ("science", "r")
    assert info.exp_time_s == 30.0
    assert info.dark_time_s == 31.0
    assert exp.pixel_scale_arcsec == small_camera.pixel_scale_arcsec
    assert exp.wcs is not None
    expected = detector_wcs(small_camera, det, science.visit.ra_deg, science.visit.dec_deg, 0.0)
    centre = [[(det.nx - 1) / 2, (det.ny - 1) / 2]]
    np.testing.assert_allclose(exp.wcs.wcs_pix2world(centre, 0), expected.wcs_pix2world(centre, 0))
    assert exp.psf is None
    assert exp.zero_point is None
    assert exp.metadata["OBSID"] == science.visit.obs_id
    for step in ("BIAS", "DARK", "FLAT"):
        assert exp.metadata[f"LDF ISR {step}"] is True
    noise = amplifier_noise(exp)
    assert set(noise) == {a.name for a in det.amplifiers}
    for amp in det.amplifiers:
        os_adu, rn = noise[amp.name]
        assert rn == pytest.approx(amp.read_noise, rel=0.05)
        assert os_adu == pytest.approx(rn / amp.gain, rel=1e-3)


def test_no_pointing_no_wcs(small_camera: Instrument, det: Detector) -> None:
    visit = make_visit(seq_num=7)
    readout = render_detector(small_camera, det, visit, Sky(SEED), seed=SEED)
    hdul = build_hdulist(
        small_camera, det, visit, readout.amps, problems=[HeaderProblem("RA", "missing")]
    )
    raw = RawImage(
        metadata=hdul[0].header,
        amplifiers={a.name: h.data for a, h in zip(det.amplifiers, hdul[1:], strict=True)},
        amp_headers={a.name: h.header for a, h in zip(det.amplifiers, hdul[1:], strict=True)},
    )
    exp = run_isr(raw, small_camera, do_bias=False, do_dark=False, do_flat=False)
    assert exp.info.ra_deg is None
    assert exp.wcs is None


# --------------------------------------------------------------------------- cosmic rays


def _star_and_source_centres(
    camera: Instrument,
    det: Detector,
    visit: VisitSpec,
    sky: Sky,
    readout: DetectorReadout,
    max_mag: float,
) -> tuple[np.ndarray, np.ndarray]:
    assert readout.wcs is not None
    stars = sky.stars(visit.ra_deg, visit.dec_deg, 0.3)
    stars = stars[star_mags(stars, "r") < max_mag]
    xs, ys = sky_to_pixel(readout.wcs, stars["ra"], stars["dec"])
    xs = np.concatenate([xs, [t.x for t in readout.truth]])
    ys = np.concatenate([ys, [t.y for t in readout.truth]])
    on = (xs > -0.5) & (xs < det.nx - 0.5) & (ys > -0.5) & (ys < det.ny - 0.5)
    return np.rint(ys[on]).astype(int), np.rint(xs[on]).astype(int)


@pytest.mark.parametrize("seeing", [0.8, 0.5])
def test_cosmic_rays_are_masked_and_stars_are_not(
    small_camera: Instrument, det: Detector, calibs: CalibSet, rich_sky: Sky, seeing: float
) -> None:
    visit = make_visit(seq_num=110, conditions=good_conditions(seeing_fwhm_arcsec=seeing))
    raw, readout = raw_image(small_camera, det, visit, rich_sky)
    exp = run_isr(raw, small_camera, calibs)
    cr_truth = _cosmic_ray_truth(small_camera, det, visit)
    sigma = math.sqrt(_sky_e(small_camera, visit) + 60.0)
    hit = cr_truth > 10 * sigma
    is_cr = (exp.mask & np.uint16(Mask.CR)) != 0
    assert hit.sum() > 300
    assert np.count_nonzero(is_cr & hit) >= 0.9 * hit.sum()
    # Hardly anything else: a few faint track ends and the pixels next to them.
    near_track = np.zeros_like(hit)
    near_track[1:-1, 1:-1] = (
        (cr_truth[1:-1, 1:-1] > 0)
        | (cr_truth[:-2, 1:-1] > 0)
        | (cr_truth[2:, 1:-1] > 0)
        | (cr_truth[1:-1, :-2] > 0)
        | (cr_truth[1:-1, 2:] > 0)
    )
    assert np.count_nonzero(is_cr & ~near_track) <= 0.02 * is_cr.sum()
    # Interpolated: CR pixels now look like their surroundings.
    assert (exp.mask[is_cr] & np.uint16(Mask.INTRP)).all()
    assert float(np.median(exp.image[is_cr])) < float(np.median(exp.image)) + 3 * sigma
    # No star (to r = 22) and no injected transient or variable has its centre flagged,
    # except where a cosmic ray really fell within a pixel of it.
    ys, xs = _star_and_source_centres(small_camera, det, visit, rich_sky, readout, 22.0)
    assert ys.size > 100
    crossed = np.zeros(ys.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = np.clip(ys + dy, 0, det.ny - 1), np.clip(xs + dx, 0, det.nx - 1)
            crossed |= cr_truth[yy, xx] > 0
    flagged = is_cr[ys, xs] & ~crossed
    assert not flagged.any(), list(zip(ys[flagged], xs[flagged], strict=True))


def test_saturated_stars_and_bleed_trails(
    small_camera: Instrument, det: Detector, calibs: CalibSet, rich_sky: Sky
) -> None:
    visit = make_visit(seq_num=120, exp_time_s=300.0)
    raw, readout = raw_image(small_camera, det, visit, rich_sky)
    exp = run_isr(raw, small_camera, calibs)
    sat = (exp.mask & np.uint16(Mask.SAT)) != 0
    assert sat.sum() > 50
    # Every pixel filled to within 1 % of its full well is SAT (the noisy ones in trails too).
    truth_e = assemble(det, readout.amps)
    for amp in det.amplifiers:
        sl = amp.assembled_slice()
        full = truth_e[sl] >= 0.99 * amp.full_well
        assert sat[sl][full].all(), amp.name
    # Bleed trails run along columns, so SAT reaches beyond the full pixels up and down.
    full_e = np.zeros_like(sat)
    for amp in det.amplifiers:
        sl = amp.assembled_slice()
        full_e[sl] = truth_e[sl] >= 0.99 * amp.full_well
    assert sat.sum() >= full_e.sum() + 2 * np.count_nonzero(full_e.any(axis=0))
    # The cosmic-ray finder leaves saturated stars alone.
    grown = sat.copy()
    grown[1:] |= sat[:-1]
    grown[:-1] |= sat[1:]
    grown[:, 1:] |= sat[:, :-1]
    grown[:, :-1] |= sat[:, 1:]
    is_cr = (exp.mask & np.uint16(Mask.CR)) != 0
    cr_truth = _cosmic_ray_truth(small_camera, det, visit)
    assert np.count_nonzero(is_cr & grown & (cr_truth == 0)) == 0


# --------------------------------------------------------------------------- defects


def test_hot_pixels_are_removed_masked_and_interpolated(
    small_camera: Instrument, det: Detector, calibs: CalibSet, science: Processed
) -> None:
    exp = science.exposure
    index, rates = hot_pixel_truth(small_camera, det)
    assert calibs.dark is not None
    bad = calibs.dark.defect_index
    assert np.isin(index[rates > 0.1], bad).all()
    flat_mask = exp.mask.reshape(-1)
    assert ((flat_mask[bad] & np.uint16(Mask.BAD | Mask.INTRP)) == Mask.BAD | Mask.INTRP).all()
    assert exp.metadata["LDF ISR NDEFECT"] == bad.size
    # A 30 e-/s hot pixel would be 900 e- above the sky; it is now sky-like.
    sky = float(np.median(exp.image))
    noise = math.sqrt(float(np.median(exp.variance)))
    values = exp.image.reshape(-1)[bad]
    assert float(np.median(np.abs(values - sky))) < 2 * noise


# --------------------------------------------------------------------------- errors


def test_missing_or_wrong_calibrations(
    small_camera: Instrument, det: Detector, calibs: CalibSet, science: Processed
) -> None:
    raw = science.raw
    with pytest.raises(DetectorError, match=rf"no master flat for {DETECTOR} band r") as info:
        run_isr(raw, small_camera, CalibSet(bias=calibs.bias, dark=calibs.dark))
    assert info.value.stage == "isr"
    with pytest.raises(DetectorError, match=rf"no master bias for {DETECTOR}"):
        run_isr(raw, small_camera)
    # Everything off needs nothing.
    run_isr(raw, small_camera, do_bias=False, do_dark=False, do_flat=False)

    assert calibs.flat is not None
    assert calibs.dark is not None
    g_flat = copy.copy(calibs.flat)
    g_flat.band = "g"
    with pytest.raises(DetectorError, match=r"no master flat for R01_S00 band r: .* band g"):
        run_isr(raw, small_camera, CalibSet(calibs.bias, calibs.dark, g_flat))
    other = copy.copy(calibs.dark)
    other.detector = "R22_S11"
    with pytest.raises(DetectorError, match=r"no master dark for R01_S00: .*R22_S11"):
        run_isr(raw, small_camera, CalibSet(calibs.bias, other, calibs.flat))
    with pytest.raises(DetectorError, match=r"master bias given for R01_S00 is a dark"):
        run_isr(raw, small_camera, CalibSet(calibs.dark, calibs.dark, calibs.flat))
    full_size = get_instrument("LSSTCam", 1.0)
    big = raw_image(full_size, full_size.detector(DETECTOR), make_visit(ObsType.BIAS, seq_num=3))[0]
    with pytest.raises(DetectorError, match=r"made at another scale"):
        run_isr(big, full_size, calibs, do_dark=False, do_flat=False)


def test_corrupt_raws(small_camera: Instrument, science: Processed, tmp_path: Path) -> None:
    raw = science.raw
    missing = copy_raw(raw)
    del missing.amplifiers["C07"]
    with pytest.raises(DetectorError, match=r"missing amplifier HDU.*C07") as info:
        run_isr(missing, small_camera, do_bias=False, do_dark=False, do_flat=False)
    assert info.value.stage == "isr"

    short = copy_raw(raw)
    short.amplifiers["C12"] = short.amplifiers["C12"][:, :100]
    with pytest.raises(DetectorError, match=r"C12: pixels are .*truncated readout"):
        run_isr(short, small_camera, do_bias=False, do_dark=False, do_flat=False)

    garbled = copy_raw(raw)
    garbled.amp_headers["C15"]["DATASEC"] = "[4:x,1:500]"
    with pytest.raises(DetectorError, match=r"C15: DATASEC is '\[4:x,1:500\]'"):
        run_isr(garbled, small_camera, do_bias=False, do_dark=False, do_flat=False)

    shifted = copy_raw(raw)
    shifted.amp_headers["C16"]["DETSEC"] = shifted.amp_headers["C15"]["DETSEC"]
    with pytest.raises(DetectorError, match=r"do not tile the detector"):
        run_isr(shifted, small_camera, do_bias=False, do_dark=False, do_flat=False)

    with pytest.raises(DetectorError, match=r"is from 'LSSTCam', not LATISS"):
        run_isr(raw, get_instrument("LATISS", 0.25), do_bias=False, do_dark=False, do_flat=False)

    renamed = copy_raw(raw)
    renamed.metadata["CCDSLOT"] = "S11"
    with pytest.raises(DetectorError, match=r"RAFTBAY/CCDSLOT say R01_S11"):
        run_isr(renamed, small_camera, do_bias=False, do_dark=False, do_flat=False)

    path = tmp_path / "raw.fits"
    raw.writeto(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DetectorError, match=r"cannot read raw .*truncated.fits"):
        read_raw(truncated)
    with pytest.raises(DetectorError, match=r"does not exist"):
        read_raw(tmp_path / "nothing.fits")
    assert read_raw(path).amplifiers.keys() == raw.amplifiers.keys()
