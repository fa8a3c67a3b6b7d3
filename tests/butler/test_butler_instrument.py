"""LSSTCam and LATISS registered as pipe_base Instruments, without obs_base."""

from __future__ import annotations

from collections import Counter

import pytest
from lsst.pipe.base import Instrument

from ldf.butler import ButlerRepo, LatissInstrument, LsstCamInstrument
from ldf.butler.instrument import instrument_class
from ldf.errors import UserInputError


def test_lsstcam_registers_205_detectors_with_rubin_names(repo: ButlerRepo) -> None:
    dets = list(repo.butler.registry.queryDimensionRecords("detector", instrument="LSSTCam"))
    assert len(dets) == 205
    by_name = {d.full_name: d for d in dets}
    r22 = by_name["R22_S11"]
    assert (r22.id, r22.raft, r22.name_in_raft, r22.purpose) == (94, "R22", "S11", "SCIENCE")
    assert by_name["R00_SG0"].purpose == "GUIDER"
    assert by_name["R44_SW1"].id == 204
    assert Counter(d.purpose for d in dets) == {"SCIENCE": 189, "GUIDER": 8, "WAVEFRONT": 8}


def test_physical_filters_map_to_bands(repo: ButlerRepo) -> None:
    registry = repo.butler.registry

    def filters(instrument: str) -> dict[str, str]:
        records = registry.queryDimensionRecords("physical_filter", instrument=instrument)
        return {r.name: r.band for r in records}

    lsst = filters("LSSTCam")
    assert lsst == {"u_24": "u", "g_6": "g", "r_57": "r", "i_39": "i", "z_20": "z", "y_10": "y"}
    latiss = filters("LATISS")
    assert latiss["SDSSr_65mm~empty"] == "r"
    assert latiss["empty~holo4_003"] == "white"
    assert len(latiss) == 6 * 3
    (det,) = registry.queryDimensionRecords("detector", instrument="LATISS")
    assert (det.id, det.full_name) == (0, "RXX_S00")


def test_instrument_is_rebuilt_from_the_registry(repo: ButlerRepo) -> None:
    inst = Instrument.fromName("LSSTCam", repo.butler.registry)
    assert isinstance(inst, LsstCamInstrument)
    assert inst.makeDefaultRawIngestRunName() == "LSSTCam/raw/all"
    assert isinstance(Instrument.fromName("LATISS", repo.butler.registry), LatissInstrument)
    (rec,) = repo.butler.registry.queryDimensionRecords("instrument", instrument="LSSTCam")
    assert rec.class_name == "ldf.butler.instrument.LsstCamInstrument"
    assert rec.detector_max == 1000


def test_instrument_class_lookup() -> None:
    assert instrument_class("LATISS") is LatissInstrument
    assert instrument_class("ldf.butler.instrument.LsstCamInstrument") is LsstCamInstrument
    with pytest.raises(UserInputError, match="unknown instrument 'HSC'"):
        instrument_class("HSC")
