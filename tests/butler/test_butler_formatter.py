"""Raw MEF FITS files as RawImage, and RawRecord from headers and visits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from tests.butler.rawfiles import WriteRaw, amp_pixels, exp_id

from ldf.butler import RawImage, RawRecord
from ldf.butler.formatters import amp_name
from ldf.errors import UserInputError
from ldf.sim.models import ObsType, VisitSpec


def test_raw_image_round_trip(write_raw: WriteRaw) -> None:
    path = write_raw(3, "R22_S11")
    raw = RawImage.read(path)
    assert list(raw.amplifiers) == ["C10", "C11", "C12", "C13"]
    np.testing.assert_array_equal(raw.amplifiers["C12"], amp_pixels(3, "R22_S11", 2))
    assert raw.amplifiers["C12"].dtype == np.int32
    assert raw.amp_headers["C11"]["EXTNAME"] == "Segment11"
    assert raw.metadata["OBSID"] == "MC_O_20261121_000003"
    only = RawImage.read(path, amplifiers=["C13"])
    assert list(only.amplifiers) == ["C13"]
    with pytest.raises(KeyError, match="C99"):
        RawImage.read(path, amplifiers=["C99"])


def test_amp_name_from_extname_or_ampname() -> None:
    assert amp_name(fits.Header({"EXTNAME": "Segment07"})) == "C07"
    assert amp_name(fits.Header({"EXTNAME": "C10"})) == "C10"
    assert amp_name(fits.Header({"EXTNAME": "Segment10", "AMPNAME": "C10"})) == "C10"


def test_record_from_file(write_raw: WriteRaw) -> None:
    rec = RawRecord.from_file(write_raw(5, "R01_S00"))
    assert rec.instrument == "LSSTCam"
    assert (rec.day_obs, rec.seq_num, rec.exposure_id) == (20261121, 5, exp_id(5))
    assert (rec.detector, rec.physical_filter, rec.band) == ("R01_S00", "r_57", "r")
    assert rec.obs_type == "science"
    assert rec.end_tai_mjd > rec.start_tai_mjd
    assert rec.zenith_angle_deg == pytest.approx(20.0)
    assert rec.has_simulated


def test_latiss_record_joins_filter_and_grating(write_raw: WriteRaw) -> None:
    rec = RawRecord.from_file(write_raw(1, "RXX_S00", instrument="LATISS"))
    assert rec.physical_filter == "SDSSr_65mm~empty"
    assert rec.obs_id == "AT_O_20261121_000001"


def test_record_from_bad_header(tmp_path: Path) -> None:
    header = fits.Header({"INSTRUME": "LSSTCam", "DAYOBS": "20261121"})
    with pytest.raises(UserInputError, match="no SEQNUM, OBSID, EXPTIME keyword"):
        RawRecord.from_header(header, tmp_path / "x.fits")
    (tmp_path / "junk.fits").write_text("not fits")
    with pytest.raises(UserInputError, match=r"junk\.fits"):
        RawRecord.from_file(tmp_path / "junk.fits")


def test_record_from_visit() -> None:
    visit = VisitSpec(
        instrument="LSSTCam",
        day_obs=20261121,
        seq_num=12,
        obs_type=ObsType.BIAS,
        reason="calibration",
        group_id="bias-block",
        ra_deg=10.0,
        dec_deg=-5.0,
        exp_time_s=0.0,
        dark_time_s=0.5,
        start_tai_mjd=61365.9,
    )
    rec = RawRecord.from_visit(visit, "R22_S11", "/data/x.fits")
    assert rec.exposure_id == exp_id(12)
    assert rec.obs_id == "MC_O_20261121_000012"
    assert rec.physical_filter == "unknown"
    assert rec.band is None
    assert rec.ra_deg is None
    assert rec.can_see_sky is False
