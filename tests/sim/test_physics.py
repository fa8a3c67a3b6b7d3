"""Camera physics measured on simulated images: PSF, noise, astrometry of truth, flats, darks."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import sep
from astropy.stats import sigma_clipped_stats
from scipy.optimize import curve_fit

from ldf.errors import UserInputError
from ldf.sim.camera import (
    FLAT_RATE_E_PER_S,
    apply_saturation,
    assemble,
    flat_pattern,
    render_detector,
)
from ldf.sim.instruments import ADC_MAX, Instrument, get_instrument
from ldf.sim.latiss import DISPERSERS, trace_columns
from ldf.sim.models import ObservingConditions, ObsType, TruthKind, VisitSpec
from ldf.sim.psf import MOFFAT_BETA, MoffatPsf, add_point_sources
from ldf.sim.sky import Sky, star_mags
from ldf.sim.wcs import sky_to_pixel

MakeVisit = Callable[..., VisitSpec]


def _moffat(
    xy: tuple[np.ndarray, np.ndarray], amp: float, x0: float, y0: float, fwhm: float, back: float
) -> np.ndarray:
    x, y = xy
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / MOFFAT_BETA) - 1))
    return amp * (1 + ((x - x0) ** 2 + (y - y0) ** 2) / alpha**2) ** (-MOFFAT_BETA) + back


def _background_subtracted(image: np.ndarray) -> tuple[np.ndarray, float]:
    bkg = sep.Background(image)
    return image - bkg.back(), float(bkg.globalrms)


def test_readout_layout(lsstcam_small: Instrument, make_visit: MakeVisit) -> None:
    det = lsstcam_small.detector("R22_S11")
    out = render_detector(lsstcam_small, det, make_visit(), Sky(1), seed=1)
    assert out.detector == "R22_S11"
    assert list(out.amps) == [a.name for a in det.amplifiers]
    for amp in det.amplifiers:
        raw = out.amps[amp.name]
        assert raw.dtype == np.int32
        assert raw.shape == amp.raw_shape
        assert raw.min() >= 0
        assert raw.max() <= ADC_MAX
    assert out.wcs is not None
    assert out.conditions is not None
    wf = lsstcam_small.detector("R00_SW1")
    wf_out = render_detector(lsstcam_small, wf, make_visit(), Sky(1), seed=1)
    assert len(wf_out.amps) == 8
    assert assemble(wf, wf_out.amps).shape == (wf.ny, wf.nx)


def test_visit_for_another_instrument_is_refused(
    lsstcam_small: Instrument, make_visit: MakeVisit
) -> None:
    det = lsstcam_small.detector("R22_S11")
    with pytest.raises(UserInputError):
        render_detector(lsstcam_small, det, make_visit(instrument="LATISS"), Sky(1), seed=1)


def test_same_seed_same_bytes(lsstcam_small: Instrument, make_visit: MakeVisit) -> None:
    det = lsstcam_small.detector("R22_S12")
    sky = Sky(7, transient_rate_deg2=5000.0)
    visit = make_visit(seq_num=3)
    a = render_detector(lsstcam_small, det, visit, sky, seed=5)
    b = render_detector(lsstcam_small, det, visit, Sky(7, transient_rate_deg2=5000.0), seed=5)
    c = render_detector(lsstcam_small, det, visit, sky, seed=6)
    d = render_detector(lsstcam_small, det, make_visit(seq_num=4), sky, seed=5)
    for name in a.amps:
        assert a.amps[name].tobytes() == b.amps[name].tobytes()
        assert a.amps[name].tobytes() != c.amps[name].tobytes()
        assert a.amps[name].tobytes() != d.amps[name].tobytes()
    assert a.truth == b.truth
    assert a.truth  # the dense transient field puts some on the detector


def test_psf_fwhm_matches_seeing(
    lsstcam_half: Instrument,
    make_visit: MakeVisit,
    good_conditions: Callable[..., ObservingConditions],
) -> None:
    seeing = 0.9
    det = lsstcam_half.detector("R22_S11")
    sky = Sky(3)
    visit = make_visit(conditions=good_conditions(seeing_fwhm_arcsec=seeing))
    out = render_detector(lsstcam_half, det, visit, sky, seed=2)
    assert out.wcs is not None
    image, _ = _background_subtracted(assemble(det, out.amps))
    stars = sky.stars(visit.ra_deg, visit.dec_deg, 0.2)
    xs, ys = sky_to_pixel(out.wcs, stars["ra"], stars["dec"])
    mags = star_mags(stars, "r")
    half = 12
    candidates = (mags > 17.5) & (mags < 20.5)
    candidates &= (xs > half + 2) & (ys > half + 2) & (xs < det.nx - half - 3)
    candidates &= ys < det.ny - half - 3
    measured = []
    for i in np.flatnonzero(candidates):
        dist = np.hypot(xs - xs[i], ys - ys[i])
        neighbours = (dist < 2.5 * half) & (mags < mags[i] + 5)
        neighbours[i] = False
        if neighbours.any():
            continue
        ix, iy = round(xs[i]), round(ys[i])
        stamp = image[iy - half : iy + half + 1, ix - half : ix + half + 1]
        yy, xx = np.mgrid[iy - half : iy + half + 1, ix - half : ix + half + 1]
        p, _ = curve_fit(
            _moffat,
            (xx.ravel(), yy.ravel()),
            stamp.ravel().astype(float),
            p0=[float(stamp.max()), xs[i], ys[i], 4.0, 0.0],
        )
        measured.append(p[3] * lsstcam_half.pixel_scale_arcsec)
    assert len(measured) >= 10
    assert float(np.median(measured)) == pytest.approx(seeing, rel=0.05)


def test_bias_noise_and_level(lsstcam_small: Instrument, make_visit: MakeVisit) -> None:
    det = lsstcam_small.detector("R10_S02")  # an ITL sensor
    out = render_detector(lsstcam_small, det, make_visit(ObsType.BIAS), Sky(1), seed=9)
    assert out.truth == []
    assert out.wcs is None
    for amp in det.amplifiers:
        data = out.amps[amp.name][amp.raw_data_slice].astype(float)
        assert data.std() == pytest.approx(amp.read_noise / amp.gain, rel=0.05)
        assert data.mean() == pytest.approx(amp.bias_level, abs=1.0)
        overscan = out.amps[amp.name][amp.raw_serial_overscan_slice].astype(float)
        assert overscan.mean() == pytest.approx(amp.bias_level, abs=1.0)
    assembled = assemble(det, out.amps)
    assert abs(float(np.median(assembled))) < 1.0  # electrons


def test_transients_are_where_truth_says(lsstcam_small: Instrument, make_visit: MakeVisit) -> None:
    det = lsstcam_small.detector("R22_S11")
    sky = Sky(3, star_density_scale=0.2, transient_rate_deg2=20_000, variable_density_deg2=3000)
    out = render_detector(lsstcam_small, det, make_visit(seq_num=7), sky, seed=1)
    kinds = {t.kind for t in out.truth}
    assert kinds == {TruthKind.TRANSIENT, TruthKind.VARIABLE}
    image, rms = _background_subtracted(assemble(det, out.amps))
    objs = sep.extract(image, 5.0, err=rms, minarea=5)
    sigma = 0.8 / 0.2 / 2.355
    xw, yw, _ = sep.winpos(image, objs["x"], objs["y"], np.full(len(objs), sigma))
    offsets, ratios = [], []
    for t in out.truth:
        assert 0 <= t.x < det.nx
        assert 0 <= t.y < det.ny
        assert t.exposure_id == out.truth[0].exposure_id
        assert t.detector == "R22_S11"
        flux, err, _ = sep.sum_circle(image, [t.x], [t.y], 12.0, err=rms)
        if t.flux_e / err[0] < 50:
            continue
        dist = np.hypot(xw - t.x, yw - t.y)
        offsets.append(float(dist.min()))
        ratios.append(float(flux[0]) / t.flux_e)
    assert len(offsets) >= 10
    assert float(np.percentile(offsets, 90)) < 0.3
    assert float(np.median(ratios)) == pytest.approx(1.0, abs=0.05)


def test_dark_current_and_hot_pixels(lsstcam_small: Instrument, make_visit: MakeVisit) -> None:
    det = lsstcam_small.detector("R22_S00")
    dark_time = 2000.0
    sky = Sky(1)
    bias = assemble(
        det,
        render_detector(lsstcam_small, det, make_visit(ObsType.BIAS, seq_num=1), sky, seed=3).amps,
    )
    darks = [
        assemble(
            det,
            render_detector(
                lsstcam_small,
                det,
                make_visit(
                    ObsType.DARK,
                    band=None,
                    seq_num=seq,
                    exp_time_s=dark_time,
                    dark_time_s=dark_time,
                ),
                sky,
                seed=3,
            ).amps,
        )
        - bias
        for seq in (2, 3)
    ]
    for amp in det.amplifiers:
        # Clipping removes cosmic rays and hot pixels, which would bias even a median.
        level = float(sigma_clipped_stats(darks[0][amp.assembled_slice()], sigma=3.0)[0])
        assert level == pytest.approx(amp.dark_current * dark_time, rel=0.15)
    hot = [d > 200.0 for d in darks]  # ≫ noise (√2 × ~8 e-) and dark (~4 e-)
    both = np.count_nonzero(hot[0] & hot[1])
    assert both > 0  # hot pixels are fixed hardware defects
    assert np.count_nonzero(hot[0]) > both  # cosmic rays are not


def test_flat_field_pattern(lsstcam_small: Instrument, make_visit: MakeVisit) -> None:
    exp = 8.0
    visit = make_visit(ObsType.FLAT, exp_time_s=exp, dark_time_s=exp)
    centre = lsstcam_small.detector("R22_S11")
    edge = lsstcam_small.detector("R01_S00")
    levels = {}
    for det in (centre, edge):
        out = render_detector(lsstcam_small, det, visit, Sky(1), seed=4)
        assert out.truth == []
        image = assemble(det, out.amps)
        expected = flat_pattern(lsstcam_small, det) * FLAT_RATE_E_PER_S * exp
        ratio = image / expected
        assert float(np.median(ratio)) == pytest.approx(1.0, abs=0.01)
        # Residual scatter is shot noise (plus read noise), so the pattern is what we applied.
        shot = 1 / math.sqrt(FLAT_RATE_E_PER_S * exp)
        assert float(np.std(ratio)) == pytest.approx(shot, rel=0.15)
        amp_levels = [float(np.median(image[a.assembled_slice()])) for a in det.amplifiers]
        assert np.std(amp_levels) / np.mean(amp_levels) > 0.005  # per-amplifier QE steps
        levels[det.name] = float(np.median(image))
    assert levels["R01_S00"] < 0.97 * levels["R22_S11"]  # vignetting toward the edge


def test_saturation_and_bleed(make_visit: MakeVisit) -> None:
    inst = get_instrument("LSSTCam", scale=0.25)
    det = inst.detector("R22_S11")
    # A long exposure near the Galactic centre saturates many stars.
    visit = make_visit(ra_deg=266.4, dec_deg=-29.0, exp_time_s=120.0)
    out = render_detector(inst, det, visit, Sky(2), seed=1)
    saturated = 0
    for amp in det.amplifiers:
        raw = out.amps[amp.name]
        ceiling = round(amp.bias_level + amp.saturation) + 6  # + bias structure, row noise
        assert raw.max() <= ceiling
        saturated += int(np.count_nonzero(raw[amp.raw_data_slice] >= ceiling - 9))
    assert saturated > 20


def test_latiss_spectrum_trace(make_visit: MakeVisit) -> None:
    latiss = get_instrument("LATISS")
    (det,) = latiss.detectors
    visit = make_visit(
        instrument="LATISS",
        band="white",
        physical_filter="empty~holo4_003",
        ra_deg=80.0,
        dec_deg=-60.0,
    )
    out = render_detector(latiss, det, visit, Sky(1, star_density_scale=0.1), seed=1)
    assert out.wcs is not None
    image, rms = _background_subtracted(assemble(det, out.amps))
    x0, y0 = (float(v) for v in out.wcs.wcs_world2pix(visit.ra_deg, visit.dec_deg, 0))
    iy = round(y0)
    # Zeroth order: a star at the boresight.
    assert image[iy - 2 : iy + 3, round(x0) - 2 : round(x0) + 3].mean() > 50 * rms
    disperser = DISPERSERS["holo4_003"]
    _c1, c2 = trace_columns(x0, disperser)
    assert c2 < det.nx
    trace = np.median(image[iy - 1 : iy + 2, :], axis=0)
    mid = slice(round(x0 + 500 / disperser.nm_per_px), round(x0 + 700 / disperser.nm_per_px))
    assert np.median(trace[mid]) > 20 * rms  # the first order is there
    off_rows = np.median(image[iy + 200 : iy + 203, :], axis=0)
    assert abs(float(np.median(off_rows[mid]))) < 3 * rms  # and only along the trace
    assert abs(float(np.median(trace[round(x0) - 600 : round(x0) - 100]))) < 3 * rms

    def at(nm: float) -> float:
        col = round(x0 + nm / disperser.nm_per_px)
        return float(np.median(trace[col - 1 : col + 2]))

    assert at(760.5) < 0.6 * (at(745.0) + at(775.0)) / 2  # the O₂ A band


def test_psf_flux_and_ellipticity() -> None:
    image = np.zeros((101, 101), np.float32)
    psf = MoffatPsf(fwhm_px=5.0, e1=0.1, e2=-0.05)
    add_point_sources(image, np.array([50.3]), np.array([49.8]), np.array([1e6]), psf)
    assert float(image.sum(dtype=np.float64)) == pytest.approx(1e6, rel=0.01)
    yy, xx = np.mgrid[0:101, 0:101]
    w = image.astype(np.float64) / image.sum(dtype=np.float64)
    mx, my = (w * xx).sum(), (w * yy).sum()
    assert (mx, my) == (pytest.approx(50.3, abs=0.01), pytest.approx(49.8, abs=0.01))
    qxx, qyy = (w * (xx - mx) ** 2).sum(), (w * (yy - my) ** 2).sum()
    qxy = (w * (xx - mx) * (yy - my)).sum()
    assert (qxx - qyy) / (qxx + qyy) == pytest.approx(0.1, abs=0.01)
    assert 2 * qxy / (qxx + qyy) == pytest.approx(-0.05, abs=0.01)


def test_saturation_bleeds_along_columns(lsstcam_small: Instrument) -> None:
    det = lsstcam_small.detector("R22_S11")
    amp = det.amplifiers[0]
    image = np.zeros((det.ny, det.nx), np.float32)
    x, y = amp.x0 + amp.nx / 2, amp.y0 + amp.ny / 2
    add_point_sources(image, np.array([x]), np.array([y]), np.array([3e8]), MoffatPsf(4.0))
    before = float(image.sum(dtype=np.float64))
    apply_saturation(image, det)
    assert float(image.max()) == pytest.approx(amp.full_well, rel=1e-6)
    assert float(image.sum(dtype=np.float64)) == pytest.approx(before, rel=1e-3)
    full = image >= amp.full_well * 0.999
    rows, cols = np.nonzero(full)
    assert np.ptp(rows) > 5 * np.ptp(cols)  # a vertical bleed trail


def test_science_without_given_conditions(lsstcam_small: Instrument, make_visit: MakeVisit) -> None:
    det = lsstcam_small.detector("R22_S11")
    visit = make_visit(band="i")  # the factory gives science visits conditions; drop them
    visit = visit.model_copy(update={"conditions": None})
    out = render_detector(lsstcam_small, det, visit, Sky(1), seed=1)
    assert out.conditions is not None
    assert out.conditions.sky_mag_arcsec2 < 21.0  # i-band sky
    eng = make_visit(ObsType.ENGTEST, band=None, seq_num=2)
    eng_out = render_detector(lsstcam_small, det, eng, Sky(1), seed=1)
    assert eng_out.wcs is None
    assert eng_out.truth == []


def test_latiss_imaging_without_disperser(make_visit: MakeVisit) -> None:
    latiss = get_instrument("LATISS", scale=0.25)
    (det,) = latiss.detectors
    visit = make_visit(instrument="LATISS", band="r", physical_filter="SDSSr_65mm~empty")
    out = render_detector(latiss, det, visit, Sky(1), seed=1)
    image = assemble(det, out.amps)
    # Sky: 21.2 mag/arcsec², ZP(r) − 3.8 mag for a 1.2 m mirror, 0.01 arcsec² pixels, 30 s.
    zp, k = latiss.zero_points["r"], latiss.extinction["r"]
    expected = 10 ** (-0.4 * (21.2 - zp - k)) * 0.01 * 30.0
    assert float(np.median(image)) == pytest.approx(expected, rel=0.1)
