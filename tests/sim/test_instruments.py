"""Geometry and electronics of the simulated cameras, and detector WCSs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldf.errors import NotFoundError, UserInputError
from ldf.sim.instruments import ADC_MAX, MIN_AMP_PIXELS, Instrument, get_instrument
from ldf.sim.wcs import detector_wcs

FULL = get_instrument("LSSTCam")


def test_lsstcam_detector_counts() -> None:
    kinds = [d.kind for d in FULL.detectors]
    assert len(FULL.detectors) == 205
    assert kinds.count("SCIENCE") == 189
    assert kinds.count("WAVEFRONT") == 8
    assert kinds.count("GUIDER") == 8
    assert len({d.name for d in FULL.detectors}) == 205
    assert [d.id for d in FULL.detectors] == list(range(205))
    assert len(FULL.science_detectors()) == 189


def test_rubin_detector_numbering() -> None:
    assert FULL.detector("R22_S11").id == 94
    assert FULL.detector("R01_S00").id == 0
    assert FULL.detector("R43_S22").id == 188
    assert FULL.detector("R00_SG0").id == 189
    assert FULL.detector("R00_SW0").id == 191
    assert FULL.detector("R44_SW1").id == 204
    assert FULL.detector_by_id(94).name == "R22_S11"
    assert FULL.detector("R00_SW0").kind == "WAVEFRONT"
    assert FULL.detector("R04_SG1").kind == "GUIDER"
    with pytest.raises(NotFoundError):
        FULL.detector("R00_S11")


def test_science_ccd_geometry() -> None:
    itl, e2v = FULL.detector("R01_S00"), FULL.detector("R22_S11")
    assert (itl.vendor, e2v.vendor) == ("ITL", "E2V")
    assert (itl.nx, itl.ny) == (4072, 4000)
    assert (e2v.nx, e2v.ny) == (4096, 4004)
    for det in (itl, e2v):
        names = [a.name for a in det.amplifiers]
        assert names == [f"C1{i}" for i in range(8)] + [f"C0{i}" for i in range(7, -1, -1)]
        assert [a.index for a in det.amplifiers] == list(range(16))
    a = itl.amplifiers[0]
    assert (a.nx, a.ny, a.prescan, a.serial_overscan, a.parallel_overscan) == (509, 2000, 3, 64, 48)
    assert a.raw_shape == (2000 + 48, 3 + 509 + 64) == (2048, 576)
    b = e2v.amplifiers[0]
    assert b.raw_shape == (2002 + 46, 10 + 512 + 54) == (2048, 576)


@pytest.mark.parametrize("name", ["R22_S11", "R01_S00", "R00_SW0", "R00_SG1"])
def test_amplifiers_tile_the_detector(name: str) -> None:
    det = FULL.detector(name)
    cover = np.zeros((det.ny, det.nx), np.int8)
    for amp in det.amplifiers:
        cover[amp.assembled_slice()] += 1
        rows, cols = amp.raw_shape
        assert rows == amp.ny + amp.parallel_overscan
        assert cols == amp.prescan + amp.nx + amp.serial_overscan
    assert np.all(cover == 1)


def test_wavefront_sensors_are_half_height() -> None:
    wf = FULL.detector("R40_SW1")
    assert len(wf.amplifiers) == 8
    assert (wf.nx, wf.ny) == (4072, 2000)
    assert len(FULL.detector("R40_SG0").amplifiers) == 16


def test_electronics_are_plausible_and_fixed() -> None:
    for det in FULL.detectors:
        for amp in det.amplifiers:
            assert 1.35 <= amp.gain <= 1.65
            assert 5.0 <= amp.read_noise <= 9.0
            assert 20_000 <= amp.bias_level <= 30_000
            assert 0.0005 < amp.dark_current < 0.01
            assert 100_000 <= amp.full_well <= 150_001
            assert amp.bias_level + amp.saturation < ADC_MAX
    gains = [a.gain for d in FULL.detectors for a in d.amplifiers]
    assert np.std(gains) > 0.05  # they do vary


def test_scale_shrinks_pixels_only() -> None:
    small = get_instrument("LSSTCam", scale=0.25)
    assert [d.name for d in small.detectors] == [d.name for d in FULL.detectors]
    assert small.pixel_scale_arcsec == FULL.pixel_scale_arcsec
    for big_det, small_det in zip(FULL.detectors, small.detectors, strict=True):
        assert (small_det.fp_x_mm, small_det.fp_y_mm) == (big_det.fp_x_mm, big_det.fp_y_mm)
        assert small_det.nx < big_det.nx
        assert small_det.ny < big_det.ny
        for a, b in zip(big_det.amplifiers, small_det.amplifiers, strict=True):
            assert b.nx == round(a.nx * 0.25)
            assert b.ny == round(a.ny * 0.25)
            same = ("name", "gain", "read_noise", "bias_level", "dark_current", "saturation")
            assert all(getattr(a, f) == getattr(b, f) for f in same)
            assert (a.prescan, a.serial_overscan, a.parallel_overscan) == (
                b.prescan,
                b.serial_overscan,
                b.parallel_overscan,
            )
    tiny = get_instrument("LSSTCam", scale=0.001)
    amp = tiny.detector("R22_S11").amplifiers[0]
    assert (amp.nx, amp.ny) == (MIN_AMP_PIXELS, MIN_AMP_PIXELS)


@pytest.mark.parametrize(
    ("name", "scale"), [("HSC", 1.0), ("LSSTCam", 0.0), ("LSSTCam", 1.5), ("LATISS", math.nan)]
)
def test_bad_instrument_requests(name: str, scale: float) -> None:
    with pytest.raises(UserInputError):
        get_instrument(name, scale)


def test_latiss() -> None:
    latiss = get_instrument("LATISS")
    assert latiss.obs_id_prefix == "AT"
    assert latiss.pixel_scale_arcsec == 0.1
    (det,) = latiss.detectors
    assert (det.nx, det.ny, len(det.amplifiers), det.vendor) == (4072, 4000, 16, "ITL")
    assert "holo4_003" in latiss.dispersers
    assert latiss.physical_filter("r") == "SDSSr_65mm"
    with pytest.raises(UserInputError):
        latiss.physical_filter("u")


def _sep_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(min(1.0, c)))


def test_wcs_scale_orientation_and_focal_plane() -> None:
    det = FULL.detector("R22_S11")
    w = detector_wcs(FULL, det, 10.0, -45.0, 0.0)
    cx, cy = (det.nx - 1) / 2, (det.ny - 1) / 2
    ra0, dec0 = (float(v) for v in w.wcs_pix2world(cx, cy, 0))
    assert _sep_deg(ra0, dec0, 10.0, -45.0) < 1e-6  # R22_S11 sits on the optical axis
    ra1, dec1 = (float(v) for v in w.wcs_pix2world(cx, cy + 1000, 0))
    assert dec1 > dec0  # +y is North at rotation 0
    assert _sep_deg(ra0, dec0, ra1, dec1) * 3600 == pytest.approx(200.0, rel=1e-4)
    ra2, _ = (float(v) for v in w.wcs_pix2world(cx + 1000, cy, 0))
    assert ra2 < ra0  # +x is West (East to the left)
    # The neighbouring CCD's centre is 42.25 mm = 4225 px away.
    nb = FULL.detector("R22_S12")
    wn = detector_wcs(FULL, nb, 10.0, -45.0, 0.0)
    ran, decn = (float(v) for v in wn.wcs_pix2world((nb.nx - 1) / 2, (nb.ny - 1) / 2, 0))
    assert _sep_deg(ra0, dec0, ran, decn) * 3600 == pytest.approx(845.0, rel=1e-3)


@settings(max_examples=60, deadline=None)
@given(
    det_id=st.integers(0, 204),
    ra=st.floats(0.0, 359.999),
    dec=st.floats(-88.0, 88.0),
    rot=st.floats(-180.0, 180.0),
    fx=st.floats(0.0, 1.0),
    fy=st.floats(0.0, 1.0),
)
def test_wcs_round_trip(
    det_id: int, ra: float, dec: float, rot: float, fx: float, fy: float
) -> None:
    inst: Instrument = FULL
    det = inst.detector_by_id(det_id)
    w = detector_wcs(inst, det, ra, dec, rot)
    x, y = fx * (det.nx - 1), fy * (det.ny - 1)
    sky = w.wcs_pix2world(np.array([[x, y]]), 0)
    back = w.wcs_world2pix(sky, 0)
    assert back[0, 0] == pytest.approx(x, abs=1e-6)
    assert back[0, 1] == pytest.approx(y, abs=1e-6)
