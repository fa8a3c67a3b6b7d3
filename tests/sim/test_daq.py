"""The camera DAQ store: atomic files, completion signal, integrity on read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldf.errors import NotFoundError, StorageError, UserInputError
from ldf.sim.daq import DaqStore
from ldf.sim.models import ObsType, VisitSpec


def _visit(seq: int = 7) -> VisitSpec:
    return VisitSpec(
        instrument="LSSTCam", day_obs=20261121, seq_num=seq, obs_type=ObsType.BIAS,
        reason="bias", group_id="g", ra_deg=0, dec_deg=-30, exp_time_s=0, dark_time_s=0,
        start_tai_mjd=61000.5,
    )  # fmt: skip


def _amps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"C1{i}": rng.integers(0, 2**18, size=(20, 12), dtype=np.int32) for i in range(3)}


def test_round_trip_and_completion(tmp_path: Path) -> None:
    daq = DaqStore(tmp_path)
    v = _visit()
    amps = _amps()
    m = daq.write_detector(v, "R22_S11", amps)
    assert m.nbytes == sum(a.nbytes for a in amps.values())
    with pytest.raises(NotFoundError):
        daq.exposure("LSSTCam", 20261121, v.obs_id)  # not complete yet
    daq.complete(v, ["R22_S11", "R22_S12"], ["R22_S11"], 61000.6)
    exp = daq.exposure("LSSTCam", 20261121, v.obs_id)
    assert exp.detectors == ("R22_S11",)
    assert exp.expected == ("R22_S11", "R22_S12")
    back = daq.read_detector("LSSTCam", 20261121, v.obs_id, "R22_S11")
    assert list(back) == list(amps)
    for name, a in amps.items():
        np.testing.assert_array_equal(back[name], a)
    assert [e.visit.obs_id for e in daq.exposures("LSSTCam", 20261121)] == [v.obs_id]
    # No temporary files left behind.
    assert not [
        p
        for p in daq.exposure_dir("LSSTCam", 20261121, v.obs_id).iterdir()
        if p.name.startswith(".")
    ]


def test_corrupt_and_truncated_readouts_detected(tmp_path: Path) -> None:
    daq = DaqStore(tmp_path)
    v = _visit()
    daq.write_detector(v, "R22_S11", _amps())
    raw = daq.exposure_dir("LSSTCam", 20261121, v.obs_id) / "R22_S11.raw"
    data = bytearray(raw.read_bytes())
    data[100] ^= 0xFF
    raw.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="checksum"):
        daq.read_detector("LSSTCam", 20261121, v.obs_id, "R22_S11")
    raw.write_bytes(bytes(data[:-40]))
    with pytest.raises(StorageError, match="truncated"):
        daq.read_detector("LSSTCam", 20261121, v.obs_id, "R22_S11")


def test_complete_refuses_missing_detector_and_bad_input(tmp_path: Path) -> None:
    daq = DaqStore(tmp_path)
    v = _visit()
    with pytest.raises(StorageError, match="not in the DAQ"):
        daq.complete(v, ["R22_S11"], ["R22_S11"], 1.0)
    with pytest.raises(UserInputError):
        daq.write_detector(v, "R22_S11", {})
    with pytest.raises(UserInputError, match="2-d"):
        daq.write_detector(v, "R22_S11", {"C10": np.zeros(5, dtype=np.int32)})
    with pytest.raises(NotFoundError):
        daq.read_detector("LSSTCam", 20261121, v.obs_id, "R22_S11")


def test_unwritable_root_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create"):
        DaqStore(blocker).write_detector(_visit(), "R22_S11", _amps())
