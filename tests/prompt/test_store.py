"""Contract of Prompt Processing's durable state, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ldf.prompt.models import DetectorOutcome, JobState, NextVisit
from ldf.prompt.storage import PromptStore


def _visit(seq: int = 1, **kw: object) -> NextVisit:
    values: dict[str, object] = {
        "instrument": "LSSTCam",
        "day_obs": 20261121,
        "seq_num": seq,
        "obs_type": "science",
        "band": "r",
        "ra_deg": 10.0,
        "dec_deg": -30.0,
    }
    values.update(kw)
    return NextVisit.model_validate(values)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PromptStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'prompt.sqlite3'}"
        s = PromptStore.open(url)
        yield s
        s.close()
    else:
        from tests.engines import scratch_postgres

        with scratch_postgres() as url:
            s = PromptStore.open(url)
            yield s
            s.close()


def test_announce_is_idempotent_and_arrivals_queue_in_exposure_order(store: PromptStore) -> None:
    assert store.announce(_visit(2), scratch="/s/2", detectors=["R22_S11", "R22_S12"])
    assert not store.announce(_visit(2), scratch="/s/2", detectors=["R22_S11", "R22_S12"])
    assert store.announce(_visit(1), scratch="/s/1", detectors=["R22_S11"])
    assert {j["state"] for j in store.jobs()} == {"waiting"}
    # Arrivals: the later visit's raw first; claims still go oldest exposure first.
    assert store.arrive("LSSTCam", 2026112100002, "R22_S12", "/raw/2-12")
    assert store.arrive("LSSTCam", 2026112100001, "R22_S11", "/raw/1-11")
    assert not store.arrive("LSSTCam", 2026112100001, "R22_S11", "/raw/1-11")  # again: no-op
    first = store.claim()
    second = store.claim()
    assert first is not None
    assert second is not None
    assert (first["exposure_id"], first["detector"]) == (2026112100001, "R22_S11")
    assert (second["exposure_id"], second["detector"]) == (2026112100002, "R22_S12")
    assert store.claim() is None
    assert first["attempts"] == 1
    assert first["state"] == "running"


def test_unannounced_raw_is_queued_anyway(store: PromptStore) -> None:
    assert store.arrive("LSSTCam", 2026112100009, "R22_S11", "/raw/x")
    job = store.claim()
    assert job is not None
    assert job["raw_path"] == "/raw/x"


def test_recover_requeues_running_and_finish_records_outcome(store: PromptStore) -> None:
    store.announce(_visit(1), scratch="/s", detectors=["A", "B"])
    store.arrive("LSSTCam", 2026112100001, "A", "/a")
    store.arrive("LSSTCam", 2026112100001, "B", "/b")
    assert store.claim() is not None
    assert store.claim() is not None
    assert store.recover() == 2  # the service was killed with both running
    assert store.counts() == {"queued": 2}
    job = store.claim()
    assert job is not None
    assert job["attempts"] == 2
    store.finish(
        DetectorOutcome(
            exposure_id=job["exposure_id"],
            detector=job["detector"],
            state=JobState.DONE,
            stage_s={"isr": 0.5},
            qa={"seeing_arcsec": 0.8},
            n_alerts=3,
            alerts_handed_unix=123.0,
        )
    )
    done = next(j for j in store.jobs(2026112100001) if j["detector"] == job["detector"])
    assert done["state"] == "done"
    assert done["stage_s"] == {"isr": 0.5}
    assert done["qa"] == {"seeing_arcsec": 0.8}
    assert done["n_alerts"] == 3
    assert store.unfinished(2026112100001) == 1


def test_timeout_and_offline_jobs_go_to_the_offline_queue(store: PromptStore) -> None:
    store.announce(_visit(1), scratch="/s", detectors=["A", "B"])
    store.arrive("LSSTCam", 2026112100001, "A", "/a")
    n = store.set_state(
        2026112100001, JobState.TIMEOUT, reason="science timeout", from_states=(JobState.QUEUED,)
    )
    assert n == 1
    assert store.claim() is None  # not in the prompt queue any more
    job = store.claim(offline=True)
    assert job is not None
    assert job["detector"] == "A"
    assert job["offline"] is True
    # B's raw arrives later: an announced visit's waiting job is queued normally.
    assert store.arrive("LSSTCam", 2026112100001, "B", "/b")
    assert store.counts().get("queued") == 1


def test_telemetry_outbox_keeps_messages_until_marked_sent(store: PromptStore) -> None:
    a = store.add_telemetry(1, "A", "imageQuality", {"seeing_arcsec": 0.7}, late=False)
    b = store.add_telemetry(1, "B", "imageQuality", {"seeing_arcsec": 0.9}, late=True)
    assert [m["id"] for m in store.unsent_telemetry()] == [a, b]
    store.mark_sent([a])
    unsent = store.unsent_telemetry()
    assert [m["id"] for m in unsent] == [b]
    assert unsent[0]["late"] is True
    assert unsent[0]["payload"] == {"seeing_arcsec": 0.9}


def test_endreadout_heard_before_nextvisit_keeps_the_readout_time(store: PromptStore) -> None:
    store.set_readout(2026112100001, 1000.0, instrument="LSSTCam")
    assert store.announce(_visit(1), scratch="/s", detectors=["A"])
    visit = store.visit(2026112100001)
    assert visit is not None
    assert visit["readout_unix"] == 1000.0
    assert visit["spec"]["band"] == "r"
    assert not store.announce(_visit(1), scratch="/s", detectors=["A"])
    store.set_readout(2026112100001, 2000.0, instrument="LSSTCam")  # first report wins
    assert store.visit(2026112100001)["readout_unix"] == 1000.0  # type: ignore[index]
