"""Master bias, dark and flat against the simulator's truth; calibration QA; bad inputs.

The helpers at the top (``raw_image``, ``master_calibs``…) are shared with ``test_isr``.
Calibrations are made for R01_S00, an ITL CCD at the edge of the focal plane, whose flat has
strong vignetting to take out.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ldf.archiver.rawfits import build_hdulist
from ldf.butler.formatters import RawImage, amp_name
from ldf.pipelines.calibs import (
    MIN_INPUTS,
    CalibSet,
    MasterCalib,
    calibration_qa,
    make_master_bias,
    make_master_dark,
    make_master_flat,
)
from ldf.pipelines.isr import OVERSCAN_SKIP_COLUMNS
from ldf.pipelines.types import DetectorError, Mask
from ldf.sim.camera import (
    FLAT_RATE_E_PER_S,
    HOT_PIXEL_FRACTION,
    DetectorReadout,
    _bias_structure,
    flat_pattern,
    render_detector,
)
from ldf.sim.instruments import Amplifier, Detector, Instrument, hardware_rng
from ldf.sim.models import ObsType, VisitSpec
from ldf.sim.sky import Sky
from tests.pipelines.conftest import SEED, make_visit

DETECTOR = "R01_S00"
N_INPUTS = 5
DARK_TIME_S = 600.0
FLAT_TIME_S = 10.0
_DOME = Sky(SEED)

# --------------------------------------------------------------------------- shared helpers


def raw_image(
    camera: Instrument, detector: Detector, visit: VisitSpec, sky: Sky = _DOME
) -> tuple[RawImage, DetectorReadout]:
    """A raw as :meth:`RawImage.read` returns it, built in memory as the archiver writes it."""
    readout = render_detector(camera, detector, visit, sky, seed=SEED)
    hdul = build_hdulist(camera, detector, visit, readout.amps, end_readout_tai_mjd=61000.2)
    raw = RawImage(metadata=hdul[0].header.copy())
    for hdu in hdul[1:]:
        name = amp_name(hdu.header)
        raw.amplifiers[name] = np.asarray(hdu.data)
        raw.amp_headers[name] = hdu.header.copy()
    return raw, readout


def bias_visit(k: int) -> VisitSpec:
    return make_visit(ObsType.BIAS, seq_num=10 + k)


def dark_visit(k: int) -> VisitSpec:
    return make_visit(ObsType.DARK, band=None, exp_time_s=DARK_TIME_S, seq_num=20 + k)


def flat_visit(k: int, band: str = "r") -> VisitSpec:
    return make_visit(ObsType.FLAT, band=band, exp_time_s=FLAT_TIME_S, seq_num=30 + k)


@dataclass(frozen=True)
class CalibInputs:
    biases: list[RawImage]
    darks: list[RawImage]
    flats: list[RawImage]


@cache
def calib_inputs(camera: Instrument, detector: str = DETECTOR) -> CalibInputs:
    """``N_INPUTS`` biases, 600 s darks and 10 s r-band flats (cached for the session)."""
    det = camera.detector(detector)
    return CalibInputs(
        biases=[raw_image(camera, det, bias_visit(k))[0] for k in range(N_INPUTS)],
        darks=[raw_image(camera, det, dark_visit(k))[0] for k in range(N_INPUTS)],
        flats=[raw_image(camera, det, flat_visit(k))[0] for k in range(N_INPUTS)],
    )


@cache
def master_calibs(camera: Instrument, detector: str = DETECTOR) -> CalibSet:
    """Master bias, dark and r flat made from :func:`calib_inputs` (cached; do not modify)."""
    inputs = calib_inputs(camera, detector)
    bias = make_master_bias(inputs.biases, camera)
    dark = make_master_dark(inputs.darks, camera, bias)
    flat = make_master_flat(inputs.flats, camera, bias, dark)
    return CalibSet(bias=bias, dark=dark, flat=flat)


def copy_raw(raw: RawImage) -> RawImage:
    """A deep copy whose pixels can be altered."""
    return RawImage(
        metadata=raw.metadata.copy(),
        amplifiers={k: v.copy() for k, v in raw.amplifiers.items()},
        amp_headers={k: v.copy() for k, v in raw.amp_headers.items()},
    )


def assembled_position(amp: Amplifier, row: int, col: int) -> tuple[int, int]:
    """(y, x) in the assembled image of data-section pixel (row, col) in readout order."""
    x = amp.x0 + (amp.nx - 1 - col if amp.flip_x else col)
    y = amp.y0 + (amp.ny - 1 - row if amp.flip_y else row)
    return y, x


def hot_pixel_truth(camera: Instrument, detector: Detector) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and rates (e-/s) of the simulator's hot pixels (``_add_dark``'s draw)."""
    rng = hardware_rng(camera.name, detector.id, 0, 5)
    n_hot = int(HOT_PIXEL_FRACTION * detector.nx * detector.ny) + 1
    index = rng.integers(0, detector.nx * detector.ny, n_hot)
    rates = rng.lognormal(0.0, 1.0, n_hot)
    return index, rates


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def det(small_camera: Instrument) -> Detector:
    return small_camera.detector(DETECTOR)


@pytest.fixture(scope="module")
def calibs(small_camera: Instrument) -> CalibSet:
    return master_calibs(small_camera)


# --------------------------------------------------------------------------- master bias


def test_master_bias_recovers_the_bias_structure(
    small_camera: Instrument, det: Detector, calibs: CalibSet
) -> None:
    bias = calibs.bias
    assert bias is not None
    assert (bias.kind, bias.instrument, bias.detector, bias.band) == (
        "bias",
        "LSSTCam",
        DETECTOR,
        None,
    )
    assert bias.n_inputs == N_INPUTS
    assert bias.image.dtype == np.float32
    assert not bias.mask.any()
    for amp in det.amplifiers:
        # Truth: the fixed column pattern (ADU, readout order) left after subtracting the
        # overscan columns ISR uses, in electrons, in assembled orientation.
        pattern = _bias_structure(small_camera.name, det, amp).astype(np.float64)
        data_cols = pattern[amp.prescan : amp.prescan + amp.nx]
        overscan = pattern[amp.prescan + amp.nx + OVERSCAN_SKIP_COLUMNS :]
        expected = (data_cols - overscan.mean()) * amp.gain
        if amp.flip_x:
            expected = expected[::-1]
        measured = bias.image[amp.assembled_slice()].mean(axis=0)
        resid = measured - expected
        # Noise of a column mean: RN / sqrt(rows × inputs) ≈ 0.15 e-; the pattern is ~0.5 e-.
        noise = amp.read_noise / math.sqrt(amp.ny * N_INPUTS)
        assert np.std(resid) < 1.6 * noise, amp.name
        assert abs(np.mean(resid)) < 3 * noise / math.sqrt(amp.nx) + 0.05, amp.name
        assert np.std(expected) > 2.5 * noise  # the test can tell a flat bias from the truth
    assert set(bias.metadata["INPUT*"].values()) == {
        bias_visit(k).exposure_id for k in range(N_INPUTS)
    }


# --------------------------------------------------------------------------- master dark


def test_master_dark_recovers_each_amplifiers_dark_current(det: Detector, calibs: CalibSet) -> None:
    dark = calibs.dark
    assert dark is not None
    for amp in det.amplifiers:
        sl = amp.assembled_slice()
        rate = dark.image[sl][dark.mask[sl] == 0]
        assert float(np.mean(rate)) == pytest.approx(amp.dark_current, rel=0.10), amp.name
    assert dark.metadata["DARKTIME"] == pytest.approx(N_INPUTS * (DARK_TIME_S + 1.0))


def test_master_dark_finds_the_hot_pixels(
    small_camera: Instrument, det: Detector, calibs: CalibSet
) -> None:
    dark = calibs.dark
    assert dark is not None
    index, rates = hot_pixel_truth(small_camera, det)
    flagged = (dark.mask.reshape(-1) & np.uint16(Mask.BAD)) != 0
    # The master's σ is RN / (t sqrt(N)) ≈ 0.006 e-/s: every hot pixel above ~0.1 e-/s.
    bright = index[rates > 0.1]
    assert bright.size >= 10
    assert flagged[bright].all()
    # ...and its master rate is the pixel's rate (the dark subtracts it from science images).
    np.testing.assert_allclose(
        dark.image.reshape(-1)[bright] - np.median(dark.image), rates[rates > 0.1], rtol=0.1
    )
    # Cosmic rays are masked in each input: no pixel they hit several times becomes "hot".
    false = np.setdiff1d(np.flatnonzero(flagged), index)
    assert false.size <= 2
    assert dark.metadata["NHOTPIX"] == int(flagged.sum())


# --------------------------------------------------------------------------- master flat


def test_master_flat_reproduces_the_flat_pattern(
    small_camera: Instrument, det: Detector, calibs: CalibSet
) -> None:
    flat = calibs.flat
    assert flat is not None
    assert flat.band == "r"
    truth = flat_pattern(small_camera, det)
    norm = float(np.median(truth))
    ratio = flat.image / (truth / norm)
    assert float(np.median(flat.image)) == pytest.approx(1.0, abs=1e-6)
    assert float(np.std(ratio - 1.0)) < 0.005
    # Vignetting at the edge of the field: the pattern really varies here.
    assert float(np.ptp(truth)) > 0.05
    assert flat.metadata["FLATNORM"] == pytest.approx(
        FLAT_RATE_E_PER_S * FLAT_TIME_S * norm, rel=0.01
    )
    assert not flat.mask.any()  # the simulator's CCDs have no dead pixels


def test_master_flat_marks_dead_pixels(
    small_camera: Instrument, det: Detector, calibs: CalibSet
) -> None:
    inputs = calib_inputs(small_camera)
    amp = det.amplifiers[3]
    dead = [(10, 5), (200, 60), (301, 100)]  # (row, col) in the data section, readout order
    flats = []
    for raw in inputs.flats:
        raw = copy_raw(raw)
        pix = raw.amplifiers[amp.name]
        level = int(np.median(pix[amp.raw_serial_overscan_slice]))
        for row, col in dead:
            pix[row, amp.prescan + col] = level + 100  # ~150 e- instead of ~40 000
        flats.append(raw)
    assert calibs.bias is not None
    assert calibs.dark is not None
    flat = make_master_flat(flats, small_camera, calibs.bias, calibs.dark)
    expected = {assembled_position(amp, r, c) for r, c in dead}
    ys, xs = np.nonzero(flat.mask & np.uint16(Mask.BAD))
    assert set(zip(ys.tolist(), xs.tolist(), strict=True)) == expected
    assert flat.metadata["NLOWPIX"] == len(dead)


# --------------------------------------------------------------------------- files


def test_master_calib_save_load_round_trip(tmp_path: Path, calibs: CalibSet) -> None:
    for calib in (calibs.bias, calibs.dark, calibs.flat):
        assert calib is not None
        path = tmp_path / f"{calib.kind}.fits"
        calib.save(path)
        back = MasterCalib.load(path)
        assert (back.kind, back.instrument, back.detector, back.band, back.n_inputs) == (
            calib.kind,
            calib.instrument,
            calib.detector,
            calib.band,
            calib.n_inputs,
        )
        np.testing.assert_array_equal(back.image, calib.image)
        np.testing.assert_array_equal(back.mask, calib.mask)
        assert back.metadata["DATE"] == calib.metadata["DATE"]
        assert back.metadata["INPUT001"] == calib.metadata["INPUT001"]
    flat = MasterCalib.load(tmp_path / "flat.fits")
    assert calibs.flat is not None
    assert flat.metadata["FLATNORM"] == calibs.flat.metadata["FLATNORM"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bias.fits", "dark.fits", "flat.fits"]


def test_master_calib_load_rejects_bad_files(tmp_path: Path, calibs: CalibSet) -> None:
    assert calibs.bias is not None
    good = tmp_path / "bias.fits"
    calibs.bias.save(good)
    data = good.read_bytes()

    with pytest.raises(DetectorError, match=r"does not exist") as info:
        MasterCalib.load(tmp_path / "missing.fits")
    assert info.value.stage == "isr"

    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DetectorError, match=r"truncated.fits"):
        MasterCalib.load(truncated)

    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    damaged = tmp_path / "damaged.fits"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(DetectorError, match=r"damaged"):
        MasterCalib.load(damaged)

    other = tmp_path / "other.fits"
    fits.HDUList(
        [fits.PrimaryHDU(np.zeros((4, 4), np.float32)), fits.ImageHDU(name="MASK")]
    ).writeto(other)
    with pytest.raises(DetectorError, match=r"not an ldf master calibration"):
        MasterCalib.load(other)


# --------------------------------------------------------------------------- bad inputs


def test_master_calibs_refuse_bad_inputs(
    small_camera: Instrument, det: Detector, calibs: CalibSet
) -> None:
    inputs = calib_inputs(small_camera)
    assert calibs.bias is not None
    assert calibs.dark is not None
    with pytest.raises(DetectorError, match=rf"at least {MIN_INPUTS} exposures, got 2") as info:
        make_master_bias(inputs.biases[:2], small_camera)
    assert info.value.stage == "isr"
    with pytest.raises(DetectorError, match=r"IMGTYPE DARK, not BIAS"):
        make_master_bias([*inputs.biases[:2], inputs.darks[0]], small_camera)
    with pytest.raises(DetectorError, match=r"repeat an exposure"):
        make_master_bias([inputs.biases[0], *inputs.biases[:3]], small_camera)

    other = small_camera.detector("R22_S11")
    foreign = raw_image(small_camera, other, bias_visit(9))[0]
    with pytest.raises(DetectorError, match=r"mix detectors.*R22_S11"):
        make_master_bias([*inputs.biases[:3], foreign], small_camera)

    g_flat = raw_image(small_camera, det, flat_visit(9, band="g"))[0]
    with pytest.raises(DetectorError, match=r"mix bands"):
        make_master_flat([*inputs.flats[:3], g_flat], small_camera, calibs.bias, calibs.dark)

    # A corrupt input: an amplifier HDU lost, another truncated.
    broken = copy_raw(inputs.biases[1])
    del broken.amplifiers["C03"]
    with pytest.raises(DetectorError, match=r"missing amplifier HDU.*C03"):
        make_master_bias([inputs.biases[0], broken, inputs.biases[2]], small_camera)
    short = copy_raw(inputs.biases[1])
    short.amplifiers["C14"] = short.amplifiers["C14"][:100]
    with pytest.raises(DetectorError, match=r"C14.*truncated readout"):
        make_master_bias([inputs.biases[0], short, inputs.biases[2]], small_camera)

    # The master dark needs a bias of its own detector and size.
    wrong = copy.copy(calibs.bias)
    wrong.detector = "R22_S11"
    with pytest.raises(DetectorError, match=rf"no master bias for {DETECTOR}"):
        make_master_dark(inputs.darks, small_camera, wrong)


# --------------------------------------------------------------------------- QA


def _with_constant(raw: RawImage, adu: int) -> RawImage:
    """Add ``adu`` to every amplifier's data section (not the overscan): light."""
    out = copy_raw(raw)
    for name, pix in out.amplifiers.items():
        datasec = out.amp_headers[name]["DATASEC"]
        x1, x2, y1, y2 = (int(v) for v in datasec.strip("[]").replace(",", ":").split(":"))
        pix[y1 - 1 : y2, x1 - 1 : x2] += adu
    return out


def test_calibration_qa_passes_a_normal_bias_and_flags_light(
    small_camera: Instrument, det: Detector, calibs: CalibSet
) -> None:
    bias = raw_image(small_camera, det, bias_visit(6))[0]  # not one of the master's inputs
    qa = calibration_qa(bias, calibs, small_camera)
    assert qa["ok"] == 1.0
    assert abs(qa["bias_light_e"]) < 0.3
    assert abs(qa["bias_mean_e"]) < 0.3
    assert qa["bias_rms_ratio"] == pytest.approx(1.0, abs=0.1)
    for amp in det.amplifiers:
        assert qa[f"read_noise_e_{amp.name}"] == pytest.approx(amp.read_noise, rel=0.05)
        assert qa[f"overscan_noise_adu_{amp.name}"] == pytest.approx(
            amp.read_noise / amp.gain, rel=0.05
        )

    leaky = calibration_qa(_with_constant(bias, 20), calibs, small_camera)
    gain = float(np.mean([a.gain for a in det.amplifiers]))
    assert leaky["bias_light_e"] == pytest.approx(20 * gain, rel=0.15)
    assert leaky["ok_bias_light"] == 0.0
    assert leaky["ok"] == 0.0
    assert leaky["ok_read_noise"] == 1.0

    noisy = copy_raw(bias)
    amp = det.amplifiers[5]
    rng = np.random.default_rng(1)
    noisy.amplifiers[amp.name] += np.rint(
        rng.normal(0, 2 * amp.read_noise / amp.gain, noisy.amplifiers[amp.name].shape)
    ).astype(np.int32)
    bad = calibration_qa(noisy, calibs, small_camera)
    assert bad[f"read_noise_e_{amp.name}"] == pytest.approx(math.sqrt(5) * amp.read_noise, rel=0.1)
    assert bad["ok_read_noise"] == 0.0
    assert bad["ok"] == 0.0


def test_calibration_qa_of_darks(small_camera: Instrument, det: Detector, calibs: CalibSet) -> None:
    dark = raw_image(small_camera, det, dark_visit(6))[0]
    qa = calibration_qa(dark, calibs, small_camera)
    assert qa["ok"] == 1.0
    mean_dark = float(np.mean([a.dark_current for a in det.amplifiers]))
    assert qa["dark_current_master_e_s"] == pytest.approx(mean_dark, rel=0.1)
    assert abs(qa["dark_current_e_s"] - mean_dark) < 0.001
    _, rates = hot_pixel_truth(small_camera, det)
    # Hot pixels bright enough to stand out in one 600 s dark are seen again.
    assert qa["dark_hot_pixels"] >= np.count_nonzero(rates > 0.3)

    leaky = calibration_qa(_with_constant(dark, 30), calibs, small_camera)
    assert leaky["dark_current_e_s"] - qa["dark_current_e_s"] == pytest.approx(
        30 * float(np.mean([a.gain for a in det.amplifiers])) / (DARK_TIME_S + 1), rel=0.2
    )
    assert leaky["ok_dark_current"] == 0.0
    assert leaky["ok"] == 0.0


def test_calibration_qa_of_flats(small_camera: Instrument, det: Detector, calibs: CalibSet) -> None:
    flat = raw_image(small_camera, det, flat_visit(6))[0]
    qa = calibration_qa(flat, calibs, small_camera)
    assert qa["ok"] == 1.0
    norm = float(np.median(flat_pattern(small_camera, det)))
    assert qa["flat_level_e"] == pytest.approx(FLAT_RATE_E_PER_S * FLAT_TIME_S * norm, rel=0.01)
    assert qa["flat_ratio_rms"] == pytest.approx(qa["flat_ratio_expected_rms"], rel=0.1)
    # Block medians of 256 pixels scatter by ~0.04 %; the largest of ~4000 is ~4σ.
    assert qa["flat_ratio_max_dev"] < 0.0025

    # One amplifier's response changes by 3 % (a gain jump, or dust): the blocks see it.
    changed = copy_raw(flat)
    amp = det.amplifiers[9]
    pix = changed.amplifiers[amp.name]
    level = np.median(pix[amp.raw_serial_overscan_slice], axis=1)[:, None]
    data = pix[amp.raw_data_slice]
    data[:] = np.rint(level + (data - level) * 1.03).astype(np.int32)
    bad = calibration_qa(changed, calibs, small_camera)
    assert bad["flat_ratio_max_dev"] == pytest.approx(0.03, abs=0.005)
    assert bad["ok_flat_max_dev"] == 0.0
    assert bad["ok"] == 0.0


def test_calibration_qa_refuses_what_it_cannot_check(
    small_camera: Instrument, det: Detector, calibs: CalibSet
) -> None:
    science = raw_image(small_camera, det, make_visit(seq_num=90))[0]
    with pytest.raises(DetectorError, match=r"science exposure, not a calibration"):
        calibration_qa(science, calibs, small_camera)
    flat = raw_image(small_camera, det, flat_visit(7))[0]
    with pytest.raises(DetectorError, match=r"needs a master flat for R01_S00 band r"):
        calibration_qa(flat, CalibSet(bias=calibs.bias, dark=calibs.dark), small_camera)
    g_flat = raw_image(small_camera, det, flat_visit(8, band="g"))[0]
    with pytest.raises(DetectorError, match=r"no master flat for R01_S00 band g"):
        calibration_qa(g_flat, calibs, small_camera)


def test_calib_set_defects_combines_the_masks(calibs: CalibSet) -> None:
    assert CalibSet().defects is None
    defects = calibs.defects
    assert defects is not None
    assert calibs.dark is not None
    assert defects.dtype == np.uint16
    np.testing.assert_array_equal(defects != 0, calibs.dark.mask != 0)
    assert calibs.dark.defect_index.size == np.count_nonzero(defects)
