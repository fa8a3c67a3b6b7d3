"""ButlerRepo: create, ingest, query, get, remove — on SQLite and on PostgreSQL."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from tests.butler.rawfiles import DAY_OBS, WriteRaw, amp_pixels, exp_id

from ldf.butler import ButlerRepo, RawImage, RawRecord
from ldf.errors import NotFoundError, StateError, TransportError, UserInputError


def test_create_is_idempotent(repo_root: Path) -> None:
    before = (repo_root / "butler.yaml").read_text()
    with ButlerRepo.create(repo_root) as again:
        dets = list(again.butler.registry.queryDimensionRecords("detector", instrument="LSSTCam"))
    assert len(dets) == 205
    assert (repo_root / "butler.yaml").read_text() == before


@pytest.mark.postgres
def test_create_new_repository_on_postgres(postgres_db: str, tmp_path: Path) -> None:
    root = tmp_path / "pg-repo"
    ButlerRepo.create(root, db_url=postgres_db).close()
    with ButlerRepo.create(root, db_url=postgres_db) as again:
        dets = list(again.butler.registry.queryDimensionRecords("detector", instrument="LATISS"))
    assert [d.full_name for d in dets] == ["RXX_S00"]


def test_unreachable_database_is_a_transport_error(tmp_path: Path) -> None:
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    with pytest.raises(TransportError, match="database unreachable") as info:
        ButlerRepo.create(tmp_path / "r", db_url=url)
    assert "\n" not in str(info.value)


def test_open_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no Butler repository"):
        ButlerRepo.open(tmp_path / "nowhere")


def test_ingest_query_get(repo: ButlerRepo, four_raws: list[RawRecord]) -> None:
    refs = repo.ingest_raws(four_raws)
    assert len(refs) == 4
    assert {ref.run for ref in refs} == {"LSSTCam/raw/all"}

    rows = repo.query_raws("LSSTCam")
    assert [(r["exposure"], r["detector"]) for r in rows] == [
        (exp_id(1), "R22_S11"),
        (exp_id(1), "R22_S12"),
        (exp_id(2), "R22_S11"),
        (exp_id(2), "R22_S12"),
    ]
    row = rows[0]
    assert row["obs_id"] == "MC_O_20261121_000001"
    assert (row["day_obs"], row["seq_num"], row["detector_id"]) == (DAY_OBS, 1, 94)
    assert (row["physical_filter"], row["band"], row["obs_type"]) == ("r_57", "r", "science")
    assert row["exp_time_s"] == 30.0
    assert row["dataset_id"] == refs[0].id

    assert len(repo.query_raws("LSSTCam", exposure=exp_id(2))) == 2
    assert len(repo.query_raws("LSSTCam", detector="R22_S12")) == 2
    assert len(repo.query_raws("LSSTCam", detector=["R22_S11", 95], day_obs=DAY_OBS)) == 4
    assert len(repo.query_raws("LSSTCam", day_obs=DAY_OBS + 1)) == 0
    assert len(repo.query_raws("LSSTCam", obs_type="science", band="r")) == 4
    assert len(repo.query_raws("LSSTCam", obs_type="bias")) == 0
    assert repo.query_raws("LATISS") == []
    with pytest.raises(UserInputError, match="unknown raw filter 'colour'"):
        repo.query_raws("LSSTCam", colour="red")

    raw = repo.get_raw("LSSTCam", exp_id(2), "R22_S12")
    assert isinstance(raw, RawImage)
    assert list(raw.amplifiers) == ["C10", "C11", "C12", "C13"]
    for i, amp in enumerate(raw.amplifiers.values()):
        np.testing.assert_array_equal(amp, amp_pixels(2, "R22_S12", i))
    assert raw.metadata["OBSID"] == "MC_O_20261121_000002"
    one = repo.get_raw("LSSTCam", exp_id(2), 95, amplifiers=["C11"])
    assert list(one.amplifiers) == ["C11"]
    header = repo.get_raw_header("LSSTCam", exp_id(1), "R22_S11")
    assert header["RAFTBAY"] == "R22"

    exposure = next(
        iter(
            repo.butler.registry.queryDimensionRecords(
                "exposure", instrument="LSSTCam", exposure=exp_id(1)
            )
        )
    )
    assert exposure.group == "20261121-pair-1"
    assert exposure.science_program == "BLOCK-365"
    assert exposure.tracking_ra == pytest.approx(150.1)
    assert exposure.zenith_angle == pytest.approx(20.0)
    assert exposure.timespan.begin.tai.mjd == pytest.approx(four_raws[0].start_tai_mjd)


def test_reingest_is_a_noop(repo: ButlerRepo, four_raws: list[RawRecord]) -> None:
    first = repo.ingest_raws(four_raws)
    again = repo.ingest_raws(four_raws)
    assert [r.id for r in again] == [r.id for r in first]
    assert len(repo.query_raws("LSSTCam")) == 4
    # A second repository (another site) derives the same dataset ids.


def test_reingest_with_different_metadata_conflicts(
    repo: ButlerRepo, four_raws: list[RawRecord]
) -> None:
    repo.ingest_raws(four_raws[:1])
    changed = dataclasses.replace(four_raws[0], exp_time_s=15.0)
    with pytest.raises(UserInputError, match="conflicts with the repository"):
        repo.ingest_raws([changed])
    repo.ingest_raws([changed], update_records=True)
    (row,) = repo.query_raws("LSSTCam", exposure=exp_id(1))
    assert row["exp_time_s"] == 15.0


def test_ingest_rejects_bad_input(
    repo: ButlerRepo, four_raws: list[RawRecord], tmp_path: Path
) -> None:
    with pytest.raises(UserInputError, match="no detector 'R99_S99'"):
        repo.ingest_raws([dataclasses.replace(four_raws[0], detector="R99_S99")])
    with pytest.raises(UserInputError, match="two files for LSSTCam exposure"):
        repo.ingest_raws([four_raws[0], dataclasses.replace(four_raws[0], path="/other.fits")])
    missing = dataclasses.replace(four_raws[0], path=str(tmp_path / "gone.fits"))
    with pytest.raises(NotFoundError, match=r"gone\.fits"):
        repo.ingest_raws([missing])
    assert repo.query_raws("LSSTCam") == []
    assert repo.ingest_raws([]) == []


def test_other_run_and_copy_transfer(repo: ButlerRepo, four_raws: list[RawRecord]) -> None:
    refs = repo.ingest_raws(four_raws[:2], transfer="copy", run="LSSTCam/raw/copied")
    assert {r.run for r in refs} == {"LSSTCam/raw/copied"}
    assert repo.query_raws("LSSTCam") == []
    rows = repo.query_raws("LSSTCam", collections="LSSTCam/raw/copied", with_paths=True)
    assert len(rows) == 2
    assert all(Path(r["path"]).is_relative_to(Path(repo.root)) for r in rows)
    assert all(Path(r["path"]).exists() for r in rows)
    # Files the datastore owns are deleted with their datasets.
    assert repo.remove_raws("LSSTCam", exp_id(1), collections="LSSTCam/raw/copied") == 2
    assert not any(Path(r["path"]).exists() for r in rows)
    assert all(Path(rec.path).exists() for rec in four_raws[:2])


def test_latiss_raws(repo: ButlerRepo, write_raw: WriteRaw) -> None:
    rec = RawRecord.from_file(write_raw(7, "RXX_S00", instrument="LATISS", GRATING="holo4_003"))
    (ref,) = repo.ingest_raws([rec])
    assert ref.run == "LATISS/raw/all"
    (row,) = repo.query_raws("LATISS")
    assert (row["physical_filter"], row["band"]) == ("SDSSr_65mm~holo4_003", "r")
    assert repo.get_raw("LATISS", exp_id(7), "RXX_S00").metadata["OBSID"] == rec.obs_id


def test_unknown_physical_filter_is_registered(repo: ButlerRepo, write_raw: WriteRaw) -> None:
    dark = RawRecord.from_file(write_raw(9, "R22_S11", IMGTYPE="DARK", FILTER="", FILTBAND=""))
    assert (dark.physical_filter, dark.band, dark.obs_type) == ("unknown", None, "dark")
    repo.ingest_raws([dark])
    (row,) = repo.query_raws("LSSTCam", obs_type="dark")
    assert (row["physical_filter"], row["band"]) == ("unknown", "unknown")


def test_remove_raws_keeps_direct_files(repo: ButlerRepo, four_raws: list[RawRecord]) -> None:
    repo.ingest_raws(four_raws)
    assert repo.remove_raws("LSSTCam", exp_id(1), ["R22_S12"]) == 1
    assert [r["detector"] for r in repo.query_raws("LSSTCam", exposure=exp_id(1))] == ["R22_S11"]
    assert repo.remove_raws("LSSTCam", exp_id(2)) == 2
    assert repo.remove_raws("LSSTCam", exp_id(2)) == 0
    assert repo.remove_raws("LSSTCam", exp_id(1), []) == 0
    assert len(repo.query_raws("LSSTCam")) == 1
    assert all(Path(rec.path).exists() for rec in four_raws)
    with pytest.raises(NotFoundError):
        repo.get_raw("LSSTCam", exp_id(2), "R22_S11")
    # Removed raws can be ingested again.
    assert len(repo.ingest_raws(four_raws)) == 4
    assert len(repo.query_raws("LSSTCam")) == 4


def test_read_only_repository(
    repo_root: Path, repo: ButlerRepo, four_raws: list[RawRecord]
) -> None:
    repo.ingest_raws(four_raws[:1])
    with ButlerRepo.open(repo_root, writeable=False) as ro:
        assert len(ro.query_raws("LSSTCam")) == 1
        with pytest.raises(StateError, match="read-only"):
            ro.ingest_raws(four_raws[1:2])
        with pytest.raises(StateError, match="read-only"):
            ro.remove_raws("LSSTCam", exp_id(1))


def test_creator_waits_for_another_creators_lock(tmp_path: Path) -> None:
    """Two archivers creating the OODS Butler at once: the second waits until the first has
    finished (makeRepo writes butler.yaml before the registry; opening in between fails)."""
    import threading

    from lsst.resources import ResourcePath

    from ldf.butler.repo import _creation_lock

    root = tmp_path / "shared-butler"
    done = threading.Event()

    def create() -> None:
        ButlerRepo.create(root).close()
        done.set()

    with _creation_lock(ResourcePath(str(root), forceDirectory=True)):
        t = threading.Thread(target=create)
        t.start()
        assert not done.wait(1.0)  # blocked behind the lock held here
    t.join(timeout=60)
    assert done.is_set()
