"""The archivers: DAQ → raw FITS in the OODS → Data Backbone, exactly once, whatever happens."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from astropy.io import fits
from tests.archiver.conftest import DAY_OBS, end_readouts

from ldf.archiver.models import Designation, JobState
from ldf.archiver.service import Archiver, lfn_for
from ldf.butler.records import RawRecord
from ldf.errors import StorageFullError, UserInputError
from ldf.sim.daq import DaqStore
from ldf.sim.models import VisitSpec

Make = Callable[..., tuple[Archiver, list[tuple[str, dict[str, Any]]]]]


def _names(events: list[tuple[str, dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    return [p for n, p in events if n == name]


def test_night_archived_to_oods_and_backbone(night: DaqStore, make_archiver: Make) -> None:
    arch, events = make_archiver("LSSTCam")
    for payload in end_readouts(night, "LSSTCam"):
        exp = arch.on_end_readout(payload)
        assert exp is not None
        assert exp.designation is Designation.ARCHIVE
    report = arch.run()
    assert report.errors == []
    assert (report.in_oods, report.archived) == (4, 4)
    jobs = arch.store.jobs("LSSTCam")
    assert {j.state for j in jobs} == {JobState.ARCHIVED}
    for job in jobs:
        exp = arch.store.exposure("LSSTCam", job.obs_id)
        assert exp is not None
        assert exp.complete_at is not None
        # The OODS path is the predictable one, and the file is a valid raw.
        path = Path(job.oods_path or "")
        assert path == arch.oods.path_for("LSSTCam", DAY_OBS, job.obs_id, job.detector)
        assert path.name == f"{job.obs_id}_{job.detector}.fits"
        record = RawRecord.from_file(path)
        assert (record.obs_id, record.detector) == (job.obs_id, job.detector)
        with fits.open(path, checksum=True) as hdul:
            assert len(hdul) == 17
        # Archived once in the Backbone, organized by exposure, same bytes as the OODS copy.
        visit = VisitSpec.model_validate(exp.visit)
        lfn = lfn_for(visit, job.detector)
        assert lfn == f"raw/LSSTCam/{DAY_OBS}/{job.obs_id}/{job.obs_id}_{job.detector}.fits"
        f = arch.backbone.store.get_file(lfn)  # type: ignore[union-attr]
        assert f is not None
        assert f.adler32 == job.checksum == f"{zlib.adler32(path.read_bytes()):08x}"
        assert f.metadata["detector"] == job.detector
    in_oods = _names(events, "imageInOODS")
    archived = _names(events, "imageArchived")
    assert len(in_oods) == len(archived) == 4
    assert {(e["obs_id"], e["detector"], e["checksum"]) for e in in_oods} == {
        (j.obs_id, j.detector, j.checksum) for j in jobs
    }
    assert len(_names(events, "exposureArchived")) == 2
    status = arch.status()
    assert status["files_archived"] == 4
    assert status["latency_s"]["p50"] is not None
    # A repeated endReadout and a second run change nothing: exactly once.
    for payload in end_readouts(night, "LSSTCam"):
        arch.on_end_readout(payload)
    assert arch.run().archived == 0
    assert arch.backbone.store.file_counts() == {"active": 4}  # type: ignore[union-attr]


def test_latiss_organized_by_day_obs_and_seq_num(night: DaqStore, make_archiver: Make) -> None:
    arch, _ = make_archiver("LATISS")
    assert arch.rescan_daq() == 1  # catch-up from the DAQ, no event needed
    arch.run()
    [job] = arch.store.jobs("LATISS")
    assert job.state is JobState.ARCHIVED
    assert job.lfn == f"raw/LATISS/{DAY_OBS}/000001/AT_O_{DAY_OBS}_000001_RXX_S00.fits"


def test_designation_oods_only_by_policy(night: DaqStore, make_archiver: Make) -> None:
    arch, events = make_archiver("LSSTCam", oods_only=["science"])
    for payload in end_readouts(night, "LSSTCam"):
        assert arch.on_end_readout(payload).designation is Designation.OODS_ONLY  # type: ignore[union-attr]
    arch.run()
    assert {j.state for j in arch.store.jobs("LSSTCam")} == {JobState.DONE}
    assert arch.backbone.store.file_counts() == {}  # type: ignore[union-attr]
    assert len(_names(events, "imageInOODS")) == 4
    assert _names(events, "imageArchived") == []
    with pytest.raises(UserInputError, match="backlog_order"):
        arch.set_policy(backlog_order="random")
    with pytest.raises(UserInputError, match="bad policy"):
        arch.set_policy(nonsense=1)


def test_missing_detector_alarm_then_late_arrival(settings: Any, make_archiver: Make) -> None:
    from ldf.sim.camera import render_detector
    from ldf.sim.instruments import get_instrument
    from ldf.sim.scheduler import plan_night
    from ldf.sim.sky import Sky

    inst = get_instrument("LSSTCam", scale=0.06)
    visit = (
        plan_night("LSSTCam", day_obs=DAY_OBS, science_visits=1, seed=2, calibrations=False)
        .exposures[0]
        .visit
    )
    daq = DaqStore(settings.home / "daq")
    sky = Sky(2)
    readout = render_detector(inst, inst.detector("R22_S11"), visit, sky, seed=2)
    daq.write_detector(visit, "R22_S11", readout.amps)
    daq.complete(visit, ["R22_S11", "R22_S12"], ["R22_S11"], visit.end_tai_mjd, 0.06)
    arch, events = make_archiver("LSSTCam")
    arch.on_end_readout({"imageName": visit.obs_id, "visit": visit.model_dump(mode="json")})
    arch.run()
    [alarm] = _names(events, "missingDetector")
    assert alarm["missing"] == ["R22_S12"]
    exp = arch.store.exposure("LSSTCam", visit.obs_id)
    assert exp is not None
    assert exp.complete_at is None  # not archived until every expected detector is
    arch.run()
    assert len(_names(events, "missingDetector")) == 1  # raised once
    late = render_detector(inst, inst.detector("R22_S12"), visit, sky, seed=2)
    daq.write_detector(visit, "R22_S12", late.amps)
    arch.run()
    assert {j.detector: j.state for j in arch.store.jobs("LSSTCam")} == {
        "R22_S11": JobState.ARCHIVED,
        "R22_S12": JobState.ARCHIVED,
    }
    assert arch.store.exposure("LSSTCam", visit.obs_id).complete_at is not None  # type: ignore[union-attr]
    assert len(_names(events, "exposureArchived")) == 1


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_pixels_archived_flagged(night: DaqStore, make_archiver: Make, damage: str) -> None:
    arch, events = make_archiver("LSSTCam")
    payload = end_readouts(night, "LSSTCam")[0]
    raw = night.exposure_dir("LSSTCam", DAY_OBS, payload["imageName"]) / "R22_S11.raw"
    data = bytearray(raw.read_bytes())
    if damage == "corrupt":
        data[1000] ^= 0xFF
        raw.write_bytes(bytes(data))
    else:
        raw.write_bytes(bytes(data[: len(data) // 3]))
    arch.on_end_readout(payload)
    arch.run()
    jobs = {j.detector: j for j in arch.store.jobs("LSSTCam")}
    bad = jobs["R22_S11"]
    assert bad.state is JobState.ARCHIVED  # still archived with what is known
    assert bad.flagged
    assert any("corrupt" in p or "truncated" in p for p in bad.problems)
    assert not any(j.flagged for d, j in jobs.items() if d != "R22_S11")
    [alarm] = _names(events, "archiverAlarm")
    assert alarm["detector"] == "R22_S11"
    with fits.open(bad.oods_path) as hdul:
        assert hdul[0].header["HIERARCH LDF FLAGGED"] is True
    lfn = bad.lfn or ""
    assert arch.backbone.store.get_file(lfn).metadata["flagged"] is True  # type: ignore[union-attr]


def test_bad_header_metadata_archived_flagged(night: DaqStore, make_archiver: Make) -> None:
    arch, _ = make_archiver("LSSTCam")
    payload = end_readouts(night, "LSSTCam")[0]
    del payload["visit"]["ra_deg"]
    payload["visit"]["exp_time_s"] = "thirty"
    arch.on_end_readout(payload)
    arch.run()
    jobs = arch.store.jobs("LSSTCam")
    assert {j.state for j in jobs} == {JobState.ARCHIVED}
    assert all(j.flagged for j in jobs)
    problems = " ".join(jobs[0].problems)
    assert "ra" in problems.lower()
    assert "exp" in problems.lower()


def test_full_disk_retried_nothing_half_written(
    night: DaqStore, make_archiver: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ldf.archiver.rawfits as rawfits

    arch, events = make_archiver("LSSTCam")
    real = rawfits.write_raw

    def full(path: Path, *args: Any, **kwargs: Any) -> int:
        raise StorageFullError(f"cannot write {path}: no space left on device")

    monkeypatch.setattr(rawfits, "write_raw", full)
    for payload in end_readouts(night, "LSSTCam"):
        arch.on_end_readout(payload)
    report = arch.run()
    assert report.in_oods == 0
    assert report.retried >= 4  # each file at least once (more if the machine is slow)
    assert "no space left" in report.errors[0]
    assert not list(arch.oods.root.rglob("*.fits"))  # nothing half-written
    assert {j.state for j in arch.store.jobs("LSSTCam")} == {JobState.QUEUED}
    assert _names(events, "archiverAlarm")
    monkeypatch.setattr(rawfits, "write_raw", real)  # space returns
    import time

    time.sleep(0.6)
    assert arch.run().archived == 4


def test_backlog_order_newest_first(night: DaqStore, make_archiver: Make) -> None:
    arch, _ = make_archiver("LSSTCam", backlog_order="newest-first")
    for payload in end_readouts(night, "LSSTCam"):
        arch.on_end_readout(payload)
    batch = arch.store.claim("LSSTCam", "t", 1, 60, arch.policy.backlog_order)
    assert batch[0].obs_id == end_readouts(night, "LSSTCam")[-1]["imageName"]


def test_archivers_are_independent(night: DaqStore, make_archiver: Make) -> None:
    lsst, _ = make_archiver("LSSTCam")
    latiss, _ = make_archiver("LATISS")
    lsst.set_policy(oods_only=["science"], backlog_order="newest-first")
    assert latiss.policy.oods_only == ["engtest"]
    assert latiss.policy.backlog_order == "oldest-first"
    assert lsst.store.engine.url != latiss.store.engine.url
    for payload in end_readouts(night, "LSSTCam"):
        lsst.on_end_readout(payload)
    assert latiss.on_end_readout(end_readouts(night, "LSSTCam")[0]) is None  # not its camera
    assert latiss.store.counts("LATISS") == {}
