"""The archiver's durable queue: one contract on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ldf.archiver.models import Designation, ExposureRecord, JobState
from ldf.archiver.storage import QueueStore
from ldf.db import utcnow


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueStore]:
    if request.param == "sqlite":
        s = QueueStore.open(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
        yield s
        s.close()
        return
    from tests.engines import scratch_postgres

    with scratch_postgres() as url:
        s = QueueStore.open(url)
        yield s
        s.close()


def _exposure(seq: int, obs_type: str = "science") -> ExposureRecord:
    return ExposureRecord(
        instrument="LSSTCam", obs_id=f"MC_O_20261121_{seq:06d}", day_obs=20261121, seq_num=seq,
        exposure_id=2026112100000 + seq, obs_type=obs_type, designation=Designation.ARCHIVE,
        visit={"seq_num": seq}, expected=["R22_S11", "R22_S12"], received_at=utcnow(),
    )  # fmt: skip


def test_idempotent_intake_and_backlog_orders(store: QueueStore) -> None:
    for seq, kind in [(1, "bias"), (2, "science"), (3, "bias")]:
        _, queued = store.add_exposure(_exposure(seq, kind), ["R22_S11", "R22_S12"])
        assert queued == 2
    assert store.add_exposure(_exposure(2), ["R22_S11", "R22_S12"])[1] == 0
    assert store.counts("LSSTCam") == {"queued": 6}

    def first(order: str) -> str:
        [job] = store.claim("LSSTCam", f"w-{order}", 1, 0.0, order)  # lease expires at once
        return job.obs_id

    assert first("oldest-first").endswith("000001")
    assert first("newest-first").endswith("000003")
    assert first("science-first").endswith("000002")


def test_steps_leases_and_reclaim(store: QueueStore) -> None:
    store.add_exposure(_exposure(1), ["R22_S11", "R22_S12"])
    jobs = store.claim("LSSTCam", "a", 10, 60.0, "oldest-first")
    assert len(jobs) == 2
    assert store.claim("LSSTCam", "b", 10, 60.0, "oldest-first") == []  # leased to a
    assert not store.record(jobs[0].id, "b", state=JobState.ARCHIVED)  # not b's lease
    now = utcnow()
    assert store.record(jobs[0].id, "a", state=JobState.ACTIVE, oods_at=now, checksum="0000abcd")
    # "a" dies: the next archiver reclaims both, each at the step it had reached.
    assert store.reclaim("LSSTCam") == 2
    states = {j.detector: j.state for j in store.jobs("LSSTCam")}
    assert states == {jobs[0].detector: JobState.IN_OODS, jobs[1].detector: JobState.QUEUED}
    again = store.claim("LSSTCam", "c", 10, 60.0, "oldest-first")
    assert {j.detector for j in again} == {"R22_S11", "R22_S12"}
    for j in again:
        assert store.record(j.id, "c", state=JobState.ARCHIVED)
    assert store.mark_complete_if_done("LSSTCam", "MC_O_20261121_000001") is not None
    assert store.mark_complete_if_done("LSSTCam", "MC_O_20261121_000001") is None  # once


def test_concurrent_claims_never_share_a_job(store: QueueStore) -> None:
    for seq in range(1, 21):
        store.add_exposure(_exposure(seq), ["R22_S11", "R22_S12"])
    got: list[list[int]] = [[], [], []]

    def worker(i: int) -> None:
        while batch := store.claim("LSSTCam", f"w{i}", 3, 60.0, "oldest-first"):
            got[i].extend(j.id for j in batch)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for g in got for i in g]
    assert len(ids) == len(set(ids)) == 40


def test_missing_detectors_and_late_arrival(store: QueueStore) -> None:
    store.add_exposure(_exposure(1), ["R22_S11"])
    [(exp, missing)] = store.incomplete("LSSTCam")
    assert missing == ["R22_S12"]
    assert store.add_late("LSSTCam", exp.obs_id, ["R22_S12"]) == 1
    assert store.incomplete("LSSTCam")[0][1] == []
