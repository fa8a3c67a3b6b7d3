"""Raw MEF FITS files as Rubin's cameras write them: content, geometry, flags, atomic writes."""

from __future__ import annotations

import errno
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldf.archiver.rawfits import (
    HeaderProblem,
    build_hdulist,
    check_metadata,
    primary_header,
    raw_filename,
    write_raw,
)
from ldf.butler import ButlerRepo, RawRecord
from ldf.errors import StorageError, StorageFullError, UserInputError
from ldf.sim.camera import render_detector
from ldf.sim.instruments import Detector, Instrument, get_instrument
from ldf.sim.models import ObservingConditions, VisitSpec
from ldf.sim.scheduler import plan_night
from ldf.sim.sky import Sky

DAY_OBS = 20261121
SCALE = 0.1
DETECTORS = {"LSSTCam": "R22_S11", "LATISS": "RXX_S00"}
CONDITIONS = ObservingConditions(
    seeing_fwhm_arcsec=0.8,
    sky_mag_arcsec2=21.0,
    transparency=0.95,
    moon_illumination=0.1,
    moon_alt_deg=-12.0,
)


@pytest.fixture(autouse=True)
def _all_warnings_are_errors() -> Iterator[None]:
    # pytest ignores AstropyWarning globally; here astropy's VerifyWarning (bad or truncated
    # cards) and checksum-verification warnings must fail the test.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture(scope="module")
def science_visits() -> dict[str, VisitSpec]:
    """One planned science visit per instrument (with observing conditions)."""
    out = {}
    for name in DETECTORS:
        plan = plan_night(name, day_obs=DAY_OBS, science_visits=2, seed=5, calibrations=False)
        visit = plan.exposures[0].visit
        out[name] = visit.model_copy(update={"conditions": CONDITIONS})
    return out


def _setup(name: str) -> tuple[Instrument, Detector]:
    instrument = get_instrument(name, scale=SCALE)
    return instrument, instrument.detector(DETECTORS[name])


def _rendered_amps(instrument: Instrument, detector: Detector, visit: VisitSpec) -> Any:
    return render_detector(instrument, detector, visit, Sky(1), seed=1).amps


def _synthetic_amps(detector: Detector, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        a.name: rng.integers(0, 262_143, a.raw_shape, dtype=np.int32) for a in detector.amplifiers
    }


def _write(
    tmp_path: Path,
    instrument: Instrument,
    detector: Detector,
    visit: VisitSpec,
    amps: dict[str, np.ndarray],
    **kwargs: Any,
) -> Path:
    path = tmp_path / raw_filename(visit, detector.name)
    write_raw(path, build_hdulist(instrument, detector, visit, amps, **kwargs))
    return path


def _section(text: str) -> tuple[int, int, int, int]:
    m = re.fullmatch(r"\[(\d+):(\d+),(\d+):(\d+)\]", text)
    assert m, text
    x1, x2, y1, y2 = map(int, m.groups())
    return x1, x2, y1, y2


# ------------------------------------------------------------------------------ content


@pytest.mark.parametrize("name", list(DETECTORS))
def test_file_has_rubin_layout_and_verifies(
    name: str, tmp_path: Path, science_visits: dict[str, VisitSpec]
) -> None:
    instrument, detector = _setup(name)
    visit = science_visits[name]
    amps = _rendered_amps(instrument, detector, visit)
    path = tmp_path / raw_filename(visit, detector.name)
    size = write_raw(
        path, build_hdulist(instrument, detector, visit, amps, end_readout_tai_mjd=61366.5)
    )
    assert path.name == f"{visit.obs_id}_{detector.name}.fits"
    assert size == path.stat().st_size
    assert size % 2880 == 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left

    with fits.open(path, checksum=True) as hdul:  # a bad checksum would warn → error
        assert len(hdul) == 17
        h = hdul[0].header
        assert hdul[0].data is None
        for hdu in hdul:
            assert "CHECKSUM" in hdu.header
            assert "DATASUM" in hdu.header
        for amp, hdu in zip(detector.amplifiers, hdul[1:], strict=True):
            assert hdu.header["EXTNAME"] == f"Segment{amp.name[1:]}"
            assert hdu.header["BITPIX"] == 32
            assert hdu.header["CCDSLOT"] == detector.sensor
            assert hdu.data.shape == amp.raw_shape
            np.testing.assert_array_equal(hdu.data, amps[amp.name])

    assert h["INSTRUME"] == name
    assert h["TELESCOP"] == (
        "Simonyi Survey Telescope" if name == "LSSTCam" else "Rubin Auxiliary Telescope"
    )
    assert h["CAMCODE"] == ("MC" if name == "LSSTCam" else "AT")
    assert h["CONTRLLR"] == "O"
    assert h["DAYOBS"] == str(DAY_OBS)
    assert h["SEQNUM"] == visit.seq_num
    assert h["OBSID"] == visit.obs_id
    assert h["GROUPID"] == visit.group_id
    assert h["IMGTYPE"] == "OBJECT"
    assert h["REASON"] == visit.reason
    assert h["PROGRAM"] == visit.program
    assert isinstance(h["OBJECT"], str)
    assert h["EXPTIME"] == h["SHUTTIME"] == visit.exp_time_s
    assert h["DARKTIME"] == visit.dark_time_s
    assert h["FILTBAND"] == visit.band
    assert (h["RA"], h["DEC"]) == (visit.ra_deg, visit.dec_deg)
    assert (h["RASTART"], h["DECSTART"]) == (visit.ra_deg, visit.dec_deg)
    assert (h["AZSTART"], h["ELSTART"]) == (visit.az_deg, visit.alt_deg)
    assert h["AMSTART"] == visit.airmass
    assert h["ROTPA"] == visit.rot_sky_deg
    assert h["TIMESYS"] == "TAI"
    assert h["MJD-BEG"] == visit.start_tai_mjd
    assert h["MJD-END"] == visit.end_tai_mjd
    begin = Time(h["DATE-BEG"], format="isot", scale="tai")
    end = Time(h["DATE-END"], format="isot", scale="tai")
    assert abs((begin.mjd - visit.start_tai_mjd) * 86400) < 0.001
    assert abs((end - begin).sec - visit.dark_time_s) < 0.002
    written = Time(h["DATE"], format="isot", scale="tai")
    assert abs((Time.now() - written).sec) < 60  # file write time, not observation time
    assert h["HIERARCH LDF READEND"] == 61366.5
    assert (h["RAFTBAY"], h["CCDSLOT"]) == (detector.raft, detector.sensor)
    assert h["DETECTOR"] == detector.id
    assert h["DETSIZE"] == f"[1:{detector.nx},1:{detector.ny}]"
    assert h["CCD_MANU"] == detector.vendor
    assert h["LSST_NUM"] == detector.serial
    assert detector.serial.split("-")[1] == h["CCD_TYPE"]
    assert h["SIMULATE"] is True
    assert h["HIERARCH SIM SEEING"] == pytest.approx(0.8)
    assert "HIERARCH LDF FLAGGED" not in h
    if name == "LATISS":
        filt, grating = visit.physical_filter.split("~")
        assert (h["FILTER"], h["GRATING"]) == (filt, grating)
    else:
        assert h["FILTER"] == visit.physical_filter
        assert "GRATING" not in h


def test_corrupted_file_fails_checksum(tmp_path: Path, science_visits: dict) -> None:
    instrument, detector = _setup("LSSTCam")
    path = _write(
        tmp_path, instrument, detector, science_visits["LSSTCam"], _synthetic_amps(detector)
    )
    data = bytearray(path.read_bytes())
    data[2880 * 4 + 100] ^= 0x01  # a pixel byte of the first amplifier
    path.write_bytes(bytes(data))
    # Recorded, not raised: an exception inside fits.open would leak its file handle.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fits.open(path, checksum=True, lazy_load_hdus=False):
            pass
    assert [str(w.message) for w in caught if "Checksum" in str(w.message)]


def test_amplifier_geometry_matches_obs_lsst_and_assembles() -> None:
    # Full-size ITL CCD: the values obs_lsst raws carry for ITL Segment10 and Segment07.
    instrument = get_instrument("LSSTCam")
    detector = instrument.detector("R01_S00")
    visit = _simple_visit()
    hdul = build_hdulist(instrument, detector, visit, _zeros(detector))
    seg10, seg07 = hdul[1].header, hdul[9].header
    assert seg10["DATASEC"] == "[4:512,1:2000]"
    assert seg10["BIASSEC"] == "[513:576,1:2000]"
    assert seg10["DETSEC"] == "[509:1,1:2000]"
    assert (seg10["DTV1"], seg10["DTV2"], seg10["DTM1_1"], seg10["DTM2_2"]) == (513, 0, -1, 1)
    assert seg07["DETSEC"] == "[4072:3564,4000:2001]"
    assert (seg07["DTV1"], seg07["DTV2"], seg07["DTM2_2"]) == (4076, 4001, -1)


@pytest.mark.parametrize("detector_name", ["R22_S11", "R01_S00", "R00_SW0"])
def test_detsec_and_dtv_put_every_pixel_where_the_camera_read_it(detector_name: str) -> None:
    instrument = get_instrument("LSSTCam", scale=SCALE)
    detector = instrument.detector(detector_name)
    amps = _synthetic_amps(detector)
    hdul = build_hdulist(instrument, detector, _simple_visit(), amps)
    from_detsec = np.full((detector.ny, detector.nx), -1, np.int64)
    from_dtv = np.full_like(from_detsec, -1)
    for amp, hdu in zip(detector.amplifiers, hdul[1:], strict=True):
        h = hdu.header
        x1, x2, y1, y2 = _section(h["DATASEC"])
        data = hdu.data[y1 - 1 : y2, x1 - 1 : x2]
        dx1, dx2, dy1, dy2 = _section(h["DETSEC"])
        placed = data[:, ::-1] if dx1 > dx2 else data
        placed = placed[::-1, :] if dy1 > dy2 else placed
        from_detsec[min(dy1, dy2) - 1 : max(dy1, dy2), min(dx1, dx2) - 1 : max(dx1, dx2)] = placed
        # detector pixel (1-based) = DTM * raw pixel + DTV
        rows, cols = np.mgrid[y1 : y2 + 1, x1 : x2 + 1]
        det_x = (h["DTM1_1"] * cols + h["DTV1"]).astype(int)
        det_y = (h["DTM2_2"] * rows + h["DTV2"]).astype(int)
        from_dtv[det_y - 1, det_x - 1] = data
        # and the instrument model agrees on where and which way round
        expect = amps[amp.name][amp.raw_data_slice]
        expect = expect[:, ::-1] if amp.flip_x else expect
        expect = expect[::-1, :] if amp.flip_y else expect
        np.testing.assert_array_equal(from_detsec[amp.assembled_slice()], expect)
    assert (from_detsec >= 0).all()
    np.testing.assert_array_equal(from_dtv, from_detsec)


# ------------------------------------------------------------------------------ Butler


@pytest.mark.parametrize("name", list(DETECTORS))
def test_round_trip_through_the_butler(
    name: str, tmp_path: Path, science_visits: dict[str, VisitSpec]
) -> None:
    instrument, detector = _setup(name)
    visit = science_visits[name]
    amps = _rendered_amps(instrument, detector, visit)
    plain = _write(tmp_path / "plain", instrument, detector, visit, amps)
    packed = _write(tmp_path / "fz", instrument, detector, visit, amps, compress=True)
    assert packed.stat().st_size < plain.stat().st_size

    expected = RawRecord.from_visit(visit, detector.name, plain)
    for path in (plain, packed):
        rec = RawRecord.from_file(path)
        for field in (
            "instrument",
            "day_obs",
            "seq_num",
            "exposure_id",
            "obs_id",
            "detector",
            "physical_filter",
            "band",
            "obs_type",
            "exp_time_s",
            "dark_time_s",
            "start_tai_mjd",
            "end_tai_mjd",
            "group",
            "science_program",
            "observation_reason",
            "ra_deg",
            "dec_deg",
            "az_deg",
            "alt_deg",
            "airmass",
            "has_simulated",
        ):
            assert getattr(rec, field) == getattr(expected, field), field

    with ButlerRepo.create(tmp_path / "repo") as repo:
        repo.ingest_raws([RawRecord.from_file(plain)])
        repo.ingest_raws([RawRecord.from_file(packed)], run=f"{name}/raw/fz")
        for run in (f"{name}/raw/all", f"{name}/raw/fz"):
            raw = repo.get_raw(name, visit.exposure_id, detector.name, collections=run)
            assert list(raw.amplifiers) == [a.name for a in detector.amplifiers]
            for amp_name, pixels in amps.items():
                np.testing.assert_array_equal(raw.amplifiers[amp_name], pixels)
            assert raw.metadata["OBSID"] == visit.obs_id
            assert raw.amp_headers["C10"]["DATASEC"].startswith("[")
        some = repo.get_raw(
            name, visit.exposure_id, detector.name, collections=f"{name}/raw/fz", amplifiers=["C01"]
        )
        np.testing.assert_array_equal(some.amplifiers["C01"], amps["C01"])


def test_compression_is_lossless_and_verifies(
    tmp_path: Path, science_visits: dict[str, VisitSpec]
) -> None:
    instrument, detector = _setup("LSSTCam")
    visit = science_visits["LSSTCam"]
    amps = _rendered_amps(instrument, detector, visit)
    path = _write(tmp_path, instrument, detector, visit, amps, compress=True)
    with fits.open(path, checksum=True) as hdul:
        assert len(hdul) == 17
        for amp, hdu in zip(detector.amplifiers, hdul[1:], strict=True):
            assert isinstance(hdu, fits.CompImageHDU)
            assert hdu.header["EXTNAME"] == f"Segment{amp.name[1:]}"
            np.testing.assert_array_equal(hdu.data, amps[amp.name])
    with fits.open(path, disable_image_compression=True) as tables:
        assert {hdu.header["ZCMPTYPE"] for hdu in tables[1:]} == {"RICE_1"}


def test_calibration_exposures_round_trip(tmp_path: Path) -> None:
    plan = plan_night("LSSTCam", day_obs=DAY_OBS, science_visits=1, seed=5)
    instrument, detector = _setup("LSSTCam")
    for planned in plan.exposures[:12:4]:  # a bias, a dark, a flat
        visit = planned.visit
        path = _write(tmp_path, instrument, detector, visit, _synthetic_amps(detector))
        rec = RawRecord.from_file(path)
        assert rec.obs_type == visit.obs_type.value
        assert rec.physical_filter == (visit.physical_filter or "unknown")
        assert rec.exp_time_s == visit.exp_time_s


# ------------------------------------------------------------------------------ metadata


def _simple_visit(**update: Any) -> VisitSpec:
    values: dict[str, Any] = {
        "instrument": "LSSTCam",
        "day_obs": DAY_OBS,
        "seq_num": 42,
        "obs_type": "science",
        "reason": "wfd",
        "program": "BLOCK-365",
        "group_id": f"{DAY_OBS}-wfd-000-a",
        "band": "r",
        "physical_filter": "r_57",
        "ra_deg": 150.1,
        "dec_deg": -30.2,
        "alt_deg": 70.0,
        "az_deg": 180.0,
        "airmass": 1.064,
        "exp_time_s": 30.0,
        "dark_time_s": 31.0,
        "start_tai_mjd": 61366.05,
        "conditions": CONDITIONS,
    }
    values.update(update)
    return VisitSpec.model_validate(values)


def _zeros(detector: Detector) -> dict[str, np.ndarray]:
    return {a.name: np.zeros(a.raw_shape, np.int32) for a in detector.amplifiers}


def _payload(**changes: Any) -> dict[str, Any]:
    meta = _simple_visit().model_dump(mode="json")
    for key, value in changes.items():
        if value is ...:
            del meta[key]
        else:
            meta[key] = value
    return meta


def test_complete_metadata_has_no_problems() -> None:
    visit, problems = check_metadata(_payload())
    assert problems == []
    assert visit == _simple_visit()


def test_missing_ra_is_flagged_and_written_undefined(tmp_path: Path) -> None:
    visit, problems = check_metadata(_payload(ra_deg=...))
    assert visit is not None
    assert problems == [HeaderProblem("RA", "missing")]
    instrument, detector = _setup("LSSTCam")
    path = _write(tmp_path, instrument, detector, visit, _zeros(detector), problems=problems)
    h = fits.getheader(path)
    assert h["HIERARCH LDF FLAGGED"] is True
    assert h["HIERARCH LDF PROBLEM1"] == "RA: missing"
    assert "HIERARCH LDF PROBLEM2" not in h
    assert "RA" in h
    assert h["RA"] is None
    assert h["RASTART"] is None
    assert h["DEC"] == -30.2  # what is known is kept
    rec = RawRecord.from_file(path)
    assert rec.ra_deg is None
    assert rec.dec_deg == -30.2
    with ButlerRepo.create(tmp_path / "repo") as repo:  # a flagged file is still archived
        repo.ingest_raws([rec])
        assert repo.get_raw_header("LSSTCam", visit.exposure_id, "R22_S11")["RA"] is None


def test_malformed_exposure_time_is_flagged() -> None:
    visit, problems = check_metadata(_payload(exp_time_s="abc"))
    assert visit is not None
    assert problems == [HeaderProblem("EXPTIME", "not a number: abc")]
    assert visit.exp_time_s == 31.0  # dark time: an upper bound, flagged
    instrument, detector = _setup("LSSTCam")
    h = primary_header(instrument, detector, visit, problems=problems)
    assert h["EXPTIME"] == 31.0
    assert h["HIERARCH LDF PROBLEM1"] == "EXPTIME: not a number: abc"
    assert RawRecord.from_header(h, "x.fits").exp_time_s == 31.0


@pytest.mark.parametrize(
    ("changes", "keyword", "text"),
    [
        ({"airmass": 0.5}, "AMSTART", "out of range: 0.5"),
        ({"ra_deg": 400.0}, "RA", "out of range: 400"),
        ({"start_tai_mjd": "NaN"}, "MJD-BEG", "not finite"),
        ({"start_tai_mjd": 50000.0}, "MJD-BEG", "not on day_obs 20261121"),
        ({"dark_time_s": 1e9}, "DARKTIME", "implausibly long"),
        ({"obs_type": "selfie"}, "IMGTYPE", "selfie"),
        ({"group_id": ...}, "GROUPID", "missing"),
        ({"alt_deg": ...}, "ELSTART", "missing"),
        ({"conditions": {"seeing_fwhm_arcsec": -1}}, "CONDITIONS", "seeing_fwhm_arcsec"),
        ({"dark_time_s": 10.0}, "DARKTIME", "shorter than EXPTIME"),
        ({"obs_id": "MC_O_20261121_000041"}, "OBSID", "MC_O_20261121_000042"),
    ],
)
def test_bad_fields_are_flagged(changes: dict[str, Any], keyword: str, text: str) -> None:
    visit, problems = check_metadata(_payload(**changes), end_readout_tai_mjd=61366.06)
    assert visit is not None
    assert len(problems) == 1
    assert problems[0].keyword == keyword
    assert text in problems[0].problem
    instrument, detector = _setup("LSSTCam")
    h = primary_header(instrument, detector, visit, problems=problems)
    assert h["HIERARCH LDF FLAGGED"] is True
    assert h["HIERARCH LDF PROBLEM1"].startswith(f"{keyword}: ")
    rec = RawRecord.from_header(h, "x.fits")
    assert rec.obs_id == visit.obs_id
    if keyword == "MJD-BEG":  # estimated from the end of readout: dark time + 2 s earlier
        assert visit.start_tai_mjd == pytest.approx(61366.06 - 33.0 / 86400)
    if keyword == "AMSTART":
        assert h["AMSTART"] is None
        assert rec.airmass is None
    if keyword == "GROUPID":
        assert visit.group_id == visit.obs_id


def test_missing_identity_gives_no_visit_but_every_problem() -> None:
    visit, problems = check_metadata(_payload(seq_num=..., exp_time_s="abc"))
    assert visit is None
    assert HeaderProblem("SEQNUM", "missing") in problems
    assert HeaderProblem("EXPTIME", "not a number: abc") in problems
    assert len(problems) == 2  # nothing spurious from the missing identity
    assert check_metadata(_payload(instrument="HSC"))[0] is None
    assert check_metadata(_payload(day_obs=20261340))[0] is None
    assert check_metadata(_payload(seq_num=0))[0] is None
    assert check_metadata({})[0] is None
    assert check_metadata("not a dict")[0] is None  # type: ignore[arg-type]


def test_identity_given_as_strings_is_accepted() -> None:
    visit, problems = check_metadata(_payload(day_obs=str(DAY_OBS), seq_num="42"))
    assert problems == []
    assert visit == _simple_visit()


def test_long_problems_fit_their_cards() -> None:
    instrument, detector = _setup("LSSTCam")
    long = [HeaderProblem("REASON", "it's " + "very " * 40 + "wrong ✗")] * 12
    h = primary_header(instrument, detector, _simple_visit(), problems=long)
    text = h["HIERARCH LDF PROBLEM12"]
    assert text.startswith("REASON: it's very")
    assert text.endswith("...")
    assert all(len(card.image) == 80 for card in h.cards)
    assert h.tostring().isascii()


_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replaced=st.dictionaries(st.sampled_from(sorted(_payload())), _junk, max_size=6),
    removed=st.sets(st.sampled_from(sorted(_payload())), max_size=4),
)
def test_any_payload_gives_a_visit_or_none_and_never_raises(
    replaced: dict[str, Any], removed: set[str]
) -> None:
    meta = _payload() | replaced
    for key in removed:
        meta.pop(key, None)
    visit, problems = check_metadata(meta, end_readout_tai_mjd=61366.06)
    identity_intact = not ({"instrument", "day_obs", "seq_num"} & (set(replaced) | removed))
    if identity_intact:
        assert visit is not None
    if visit is None:
        assert problems
        return
    instrument, detector = _setup("LSSTCam")
    header = primary_header(instrument, detector, visit, problems=problems)
    assert bool(problems) == ("HIERARCH LDF FLAGGED" in header)
    rec = RawRecord.from_header(header, "x.fits")
    assert (rec.day_obs, rec.seq_num) == (visit.day_obs, visit.seq_num)


# ------------------------------------------------------------------------------ bad pixels


def test_wrong_shape_missing_or_unknown_amplifier_is_refused() -> None:
    instrument, detector = _setup("LSSTCam")
    visit = _simple_visit()
    amps = _zeros(detector)
    shape = detector.amplifiers[3].raw_shape
    truncated = amps | {"C13": amps["C13"][:-5]}
    with pytest.raises(UserInputError, match=rf"C13.*\({shape[0] - 5}, {shape[1]}\).*{shape}"):
        build_hdulist(instrument, detector, visit, truncated)
    with pytest.raises(UserInputError, match=r"missing amplifier.*C00"):
        build_hdulist(instrument, detector, visit, {k: v for k, v in amps.items() if k != "C00"})
    with pytest.raises(UserInputError, match=r"unknown amplifier.*C99"):
        build_hdulist(instrument, detector, visit, amps | {"C99": amps["C00"]})
    with pytest.raises(UserInputError, match="integers"):
        build_hdulist(instrument, detector, visit, amps | {"C10": amps["C10"].astype(float)})
    with pytest.raises(UserInputError, match="overflow"):
        build_hdulist(
            instrument, detector, visit, amps | {"C10": amps["C10"].astype(np.int64) + 2**40}
        )
    latiss = _simple_visit(instrument="LATISS")
    with pytest.raises(UserInputError, match="LATISS, not LSSTCam"):
        build_hdulist(instrument, detector, latiss, amps)
    full_size = get_instrument("LSSTCam").detector("R22_S11")
    with pytest.raises(UserInputError, match=r"not LSSTCam's at scale 0\.1"):
        primary_header(instrument, full_size, visit)


def test_input_arrays_are_not_copied_nor_changed(tmp_path: Path) -> None:
    instrument, detector = _setup("LSSTCam")
    amps = _synthetic_amps(detector)
    before = {k: v.copy() for k, v in amps.items()}
    readonly = {k: v.copy() for k, v in amps.items()}
    for v in readonly.values():
        v.flags.writeable = False
    big_endian = {k: v.astype(">i4") for k, v in amps.items()}
    widened = {k: v.astype(np.int64) for k, v in amps.items()}
    hdul = build_hdulist(instrument, detector, _simple_visit(), amps)
    assert all(
        hdu.data is amps[a.name] for a, hdu in zip(detector.amplifiers, hdul[1:], strict=True)
    )
    for i, variant in enumerate((amps, readonly, big_endian, widened)):
        path = tmp_path / f"{i}.fits"
        write_raw(path, build_hdulist(instrument, detector, _simple_visit(), variant))
        with fits.open(path, checksum=True) as back:
            for amp, hdu in zip(detector.amplifiers, back[1:], strict=True):
                np.testing.assert_array_equal(hdu.data, before[amp.name])
    for name, pixels in amps.items():
        np.testing.assert_array_equal(pixels, before[name])


# ------------------------------------------------------------------------------ writing


def _small_hdulist() -> fits.HDUList:
    instrument, detector = _setup("LATISS")
    return build_hdulist(instrument, detector, _simple_visit(instrument="LATISS"), _zeros(detector))


def _failing_writeto(err: int, seen: dict[str, Any]) -> Any:
    def writeto(self: fits.HDUList, fileobj: Any, **kwargs: Any) -> None:
        seen["name"] = Path(fileobj.name)
        seen["checksum"] = kwargs.get("checksum")
        fileobj.write(b"SIMPLE  =" + b" " * 1000)  # a partial file, then the disk fills up
        raise OSError(err, "simulated")

    return writeto


@pytest.mark.parametrize(
    ("err", "error"),
    [(errno.ENOSPC, StorageFullError), (errno.EDQUOT, StorageFullError), (errno.EIO, StorageError)],
)
def test_write_failure_leaves_nothing_behind(
    err: int, error: type[StorageError], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "raws" / "AT_O_20261121_000042_RXX_S00.fits"
    write_raw(path, _small_hdulist())
    good = path.read_bytes()
    seen: dict[str, Any] = {}
    monkeypatch.setattr(fits.HDUList, "writeto", _failing_writeto(err, seen))
    with pytest.raises(error, match=f"cannot write {path}: simulated") as info:
        write_raw(path, _small_hdulist())
    assert (error is StorageFullError) == isinstance(info.value, StorageFullError)
    assert "\n" not in str(info.value)
    assert seen["name"].parent == path.parent
    assert seen["name"] != path
    assert seen["checksum"] is True
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_bytes() == good  # the earlier file is intact


def test_final_name_appears_only_when_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.fits"
    original = fits.HDUList.writeto
    observed = []

    def writeto(self: fits.HDUList, fileobj: Any, **kwargs: Any) -> None:
        original(self, fileobj, **kwargs)
        observed.append(path.exists())

    monkeypatch.setattr(fits.HDUList, "writeto", writeto)
    size = write_raw(path, _small_hdulist(), fsync=False)
    assert observed == [False]
    assert path.stat().st_size == size


def test_interrupted_write_removes_the_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def writeto(self: fits.HDUList, fileobj: Any, **kwargs: Any) -> None:
        fileobj.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fits.HDUList, "writeto", writeto)
    with pytest.raises(KeyboardInterrupt):
        write_raw(tmp_path / "x.fits", _small_hdulist())
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot write"):
        write_raw(blocker / "x.fits", _small_hdulist())


def test_raw_filename() -> None:
    assert raw_filename(_simple_visit(), "R22_S11") == "MC_O_20261121_000042_R22_S11.fits"
