"""Prompt Processing end to end on a seeded facility: yield, latency, faults, policies."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ldf.pipelines.alertpacket import AlertSchema, LocalAlertSink
from ldf.pipelines.apdb import PromptApdb
from ldf.prompt.inputs import InputPaths
from ldf.prompt.models import JobState
from tests.prompt.conftest import DETECTORS, Facility, announce, write_raws


def _states(svc: Any, exposure_id: int) -> dict[str, str]:
    return {j["detector"]: j["state"] for j in svc.store.jobs(exposure_id)}


def test_visit_is_processed_into_alerts_apdb_and_qa(facility: Facility, make_service: Any) -> None:
    svc = make_service()
    sent: list[tuple[str, dict[str, Any]]] = []
    svc.publish_telemetry = lambda name, payload: sent.append((name, payload)) or True
    visit = facility.visits[0]
    announce(svc, visit)
    assert svc.run(until_idle=True) == len(DETECTORS)
    jobs = svc.store.jobs(visit.exposure_id)
    assert {j["state"] for j in jobs} == {"done"}, [j["reason"] for j in jobs]
    home = InputPaths(facility.settings.home)
    schema = AlertSchema.latest()
    total = 0
    for j in jobs:
        assert set(j["stage_s"]) >= {
            "isr",
            "characterize",
            "diffim",
            "dia",
            "association",
            "alerts",
        }
        assert j["apdb_store"] == "stored"
        packets = LocalAlertSink(home.alerts).read(visit.exposure_id, j["detector"])
        assert len(packets) == j["n_alerts"] == j["n_dia_sources"]
        for p in packets:
            alert = schema.deserialize(p)
            assert alert["diaSource"]["visit"] == visit.exposure_id
            assert alert["cutoutDifference"]
        total += len(packets)
    assert total > 0
    db = PromptApdb.open(home.apdb_config)
    assert db.counts()["DiaSource"] == total
    stored = db.visit_sources([visit.exposure_id, visit.exposure_id + 1])
    assert len(stored) == total
    assert set(stored["visit"]) == {visit.exposure_id}
    assert stored["diaObjectId"].notna().all()
    # Image quality reached the observatory: measured seeing and pointing near the truth.
    quality = [p for n, p in sent if n == "imageQuality"]
    assert len(quality) == len(DETECTORS)
    cond = visit.conditions
    assert cond is not None
    for q in quality:
        assert q["seeing_arcsec"] == pytest.approx(cond.seeing_fwhm_arcsec, rel=0.05)
        assert q["pointing_offset_east_arcsec"] == pytest.approx(cond.pointing_dra_arcsec, abs=0.3)
        assert q["pointing_offset_north_arcsec"] == pytest.approx(
            cond.pointing_ddec_arcsec, abs=0.3
        )
    assert svc.store.unsent_telemetry() == []
    (report,) = svc.reports()
    assert report.done == len(DETECTORS)
    assert report.alerts == total
    assert report.latency_p50_s is not None
    assert 0 < report.latency_p50_s <= report.latency_p98_s  # type: ignore[operator]
    assert report.within_ott1 == 1.0
    # The preloaded scratch copy is removed once the visit is done.
    assert not svc.preloader.scratch_for(visit.exposure_id).exists()


def test_missing_calibration_fails_one_detector_with_its_reason(
    facility: Facility, make_service: Any
) -> None:
    visit = facility.visits[0]
    flat = InputPaths(facility.settings.home).calib("LSSTCam", DETECTORS[1], "flat", visit.band)
    flat.unlink()
    svc = make_service()
    announce(svc, visit)
    svc.run(until_idle=True)
    jobs = {j["detector"]: j for j in svc.store.jobs(visit.exposure_id)}
    assert jobs[DETECTORS[0]]["state"] == "done"
    bad = jobs[DETECTORS[1]]
    assert bad["state"] == "failed"
    assert bad["failed_stage"] == "preload"
    assert f"{visit.band}-band flat" in bad["reason"]
    assert "ldf calibs build" in bad["reason"]


def test_missing_template_fails_clearly(facility: Facility, make_service: Any) -> None:
    import shutil

    visit = facility.visits[0]
    shutil.rmtree(InputPaths(facility.settings.home).templates / str(visit.band))
    svc = make_service()
    announce(svc, visit)
    svc.run(until_idle=True)
    for j in svc.store.jobs(visit.exposure_id):
        assert j["state"] == "failed"
        assert "template" in j["reason"]


def test_corrupt_raw_fails_that_detector_only(facility: Facility, make_service: Any) -> None:
    svc = make_service()
    visit = facility.visits[0]
    raws = announce(svc, visit)
    path = raws[DETECTORS[0]]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    svc.run(until_idle=True)
    jobs = {j["detector"]: j for j in svc.store.jobs(visit.exposure_id)}
    assert jobs[DETECTORS[0]]["state"] == "failed"
    assert jobs[DETECTORS[0]]["failed_stage"] == "isr"
    assert "truncated" in jobs[DETECTORS[0]]["reason"] or "damaged" in jobs[DETECTORS[0]]["reason"]
    assert jobs[DETECTORS[1]]["state"] == "done"


def test_worker_killed_mid_detector_is_retried(facility: Facility, make_service: Any) -> None:
    svc = make_service()
    visit = facility.visits[0]
    announce(svc, visit)
    svc.start()
    pool = svc.pool
    assert pool is not None
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if svc.store.counts().get("running"):
                for pid in pool.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.005)

    t = threading.Thread(target=killer)
    t.start()
    svc.run(until_idle=True)
    t.join()
    assert killed.is_set()
    jobs = svc.store.jobs(visit.exposure_id)
    assert {j["state"] for j in jobs} == {"done"}, [j["reason"] for j in jobs]
    assert max(j["attempts"] for j in jobs) == 2
    assert pool.restarts >= 1


def test_worker_dying_every_time_is_reported_not_retried_forever(
    facility: Facility, make_service: Any
) -> None:
    svc = make_service(max_attempts=1)
    visit = facility.visits[0]
    announce(svc, visit)
    svc.start()
    pool = svc.pool
    assert pool is not None

    def killer() -> None:
        while not svc.store.counts().get("running"):
            time.sleep(0.005)
        for pid in pool.worker_pids():
            os.kill(pid, signal.SIGKILL)

    t = threading.Thread(target=killer)
    t.start()
    svc.run(until_idle=True)
    t.join()
    states = [j for j in svc.store.jobs(visit.exposure_id) if j["state"] == "failed"]
    assert states
    assert all("worker process died" in j["reason"] for j in states)


def test_timeout_hands_detectors_to_offline_catchup(facility: Facility, make_service: Any) -> None:
    svc = make_service(science_timeout_s=5.0)
    visit = facility.visits[0]
    announce(svc, visit, readout_unix=time.time() - 60)  # readout a minute ago: too late
    svc.run(until_idle=True)
    assert set(_states(svc, visit.exposure_id).values()) == {"timeout"}
    (report,) = svc.reports()
    assert report.timeout == len(DETECTORS)
    assert report.alerts == 0
    # Offline catch-up: same code, APDB updated, no alerts, QA kept (late, not sent).
    sent: list[Any] = []
    svc.publish_telemetry = lambda name, payload: sent.append(name) or True
    assert svc.run_offline() == len(DETECTORS)
    jobs = svc.store.jobs(visit.exposure_id)
    assert {j["state"] for j in jobs} == {"done"}
    assert all(j["n_alerts"] == 0 and j["n_dia_sources"] > 0 for j in jobs)
    home = InputPaths(facility.settings.home)
    assert PromptApdb.open(home.apdb_config).counts()["DiaSource"] == sum(
        j["n_dia_sources"] for j in jobs
    )
    assert not list(home.alerts.glob("*/*.alerts"))
    late = svc.store.unsent_telemetry()
    assert len(late) == len(DETECTORS)
    assert all(m["late"] for m in late)
    assert sent == []


def test_backlog_skip_to_newest(facility: Facility, make_service: Any) -> None:
    svc = make_service(backlog="skip-to-newest")
    old, new = facility.visits[0], facility.visits[1]
    announce(svc, old)
    announce(svc, new)
    svc.run(until_idle=True)
    assert set(_states(svc, old.exposure_id).values()) == {"skipped"}
    assert set(_states(svc, new.exposure_id).values()) == {"done"}


def test_policy_changes_are_validated(make_service: Any) -> None:
    from ldf.errors import UserInputError

    svc = make_service()
    assert svc.set_policy(qa_first=False, science_timeout_s=30).science_timeout_s == 30
    with pytest.raises(UserInputError, match="unknown prompt policy"):
        svc.set_policy(nonsense=1)
    with pytest.raises(UserInputError, match="invalid prompt policy"):
        svc.set_policy(backlog="whenever")


@pytest.mark.parametrize("qa_first", [True, False])
def test_qa_first_sends_quality_even_when_science_times_out(
    facility: Facility, qa_first: bool
) -> None:
    import multiprocessing as mp

    from ldf.prompt.models import DetectorJob, DetectorOutcome
    from ldf.prompt.worker import init_worker, process_detector

    visit = facility.visits[0]
    raws = write_raws(facility, visit, [DETECTORS[0]])
    q = mp.get_context("spawn").Queue()
    init_worker(q)
    try:
        job = DetectorJob(
            instrument="LSSTCam",
            exposure_id=visit.exposure_id,
            detector=DETECTORS[0],
            raw_path=str(raws[DETECTORS[0]]),
            scratch=str(facility.settings.home / "none"),
            home=str(facility.settings.home),
            camera_scale=facility.settings.sim.scale,
            qa_first=qa_first,
            deadline_unix=time.time() - 1,  # the visit's timeout has already passed
        )
        outcome = DetectorOutcome.model_validate_json(process_detector(job.model_dump_json()))
    finally:
        init_worker(None)
    assert outcome.state is JobState.TIMEOUT
    assert outcome.qa["seeing_arcsec"] > 0
    messages = []
    while True:
        try:
            messages.append(q.get(timeout=0.5))
        except Exception:
            break
    assert len(messages) == (1 if qa_first else 0)


def test_calibration_exposure_gets_calibration_qa(facility: Facility, make_service: Any) -> None:
    svc = make_service()
    sent: list[tuple[str, dict[str, Any]]] = []
    svc.publish_telemetry = lambda name, payload: sent.append((name, payload)) or True
    bias = next(v for v in facility.calib_visits if v.obs_type == "bias")
    svc.on_next_visit(bias.model_dump(mode="json"), detectors=DETECTORS)
    raws = write_raws(facility, bias)
    for det, path in raws.items():
        svc.on_image(bias.exposure_id, det, path)
    svc.run(until_idle=True)
    assert set(_states(svc, bias.exposure_id).values()) == {"done"}
    qa = [p for n, p in sent if n == "calibrationQA"]
    assert len(qa) == len(DETECTORS)
    assert all(p["obs_type"] == "bias" and p["ok"] for p in qa)


_KILL_SCRIPT = """
import sys, time, threading
from ldf.config import Settings
from ldf.prompt.service import PromptService
svc = PromptService.open(Settings(), "LSSTCam")
svc.set_policy(workers=1)
threading.Thread(target=svc.run, daemon=True).start()
while not svc.store.counts().get("running"):
    time.sleep(0.01)
print("running", flush=True)
time.sleep(60)
"""


def test_service_killed_with_kill_9_resumes_its_queue(
    facility: Facility, make_service: Any
) -> None:
    svc = make_service()
    visit = facility.visits[0]
    announce(svc, visit)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "LDF_HOME": str(facility.settings.home), "LDF_SIM__SCALE": "0.15"},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert svc.store.counts().get("running") == 1  # left behind by the dead service
    svc.run(until_idle=True)  # start() recovers it
    jobs = svc.store.jobs(visit.exposure_id)
    assert {j["state"] for j in jobs} == {"done"}
    assert max(j["attempts"] for j in jobs) == 2


def _apdb_elsewhere(facility: Facility) -> Path:
    """Recreate the facility's APDB in its own directory (the config and buffer stay in
    ``apdb/``), so the database alone can be taken away."""
    home = InputPaths(facility.settings.home)
    db_dir = facility.settings.home / "apdb-db"
    db_dir.mkdir()
    PromptApdb.create(f"sqlite:///{db_dir / 'apdb.sqlite3'}", config_path=home.apdb_config)
    return db_dir


@contextlib.contextmanager
def _apdb_down(db_dir: Path) -> Iterator[None]:
    hidden = db_dir.with_name("apdb-db.hidden")
    db_dir.rename(hidden)
    db_dir.mkdir(mode=0o500)  # SQLite cannot create a database here: the APDB is down
    try:
        yield
    finally:
        db_dir.rmdir()
        hidden.rename(db_dir)


@pytest.mark.parametrize("snapshot", [True, False])
def test_apdb_down_loses_no_diasources(
    facility: Facility, make_service: Any, snapshot: bool
) -> None:
    """With the nextVisit snapshot of the APDB history, association goes on and the store is
    buffered, then replayed; without it, detectors wait for catch-up. Nothing is lost."""
    import shutil

    from ldf.prompt.inputs import HISTORY_DIR

    home = InputPaths(facility.settings.home)
    db_dir = _apdb_elsewhere(facility)
    svc = make_service()
    visit = facility.visits[0]
    announce(svc, visit)
    if not snapshot:
        shutil.rmtree(svc.preloader.scratch_for(visit.exposure_id) / HISTORY_DIR)
    with _apdb_down(db_dir):
        svc.run(until_idle=True)
        assert svc.flush_apdb()["stored"] == 0  # still down: stays buffered
    jobs = svc.store.jobs(visit.exposure_id)
    if snapshot:
        assert {j["state"] for j in jobs} == {"done"}, [j["reason"] for j in jobs]
        assert {j["apdb_store"] for j in jobs} == {"buffered"}
        assert all(j["n_alerts"] == j["n_dia_sources"] > 0 for j in jobs)
        assert svc.flush_apdb() == {"stored": len(DETECTORS), "skipped": 0, "remaining": 0}
        assert svc.flush_apdb()["stored"] == 0  # idempotent
    else:
        assert {j["state"] for j in jobs} == {"offline"}, [j["reason"] for j in jobs]
        assert all("APDB unavailable" in j["reason"] for j in jobs)
        svc.run_offline()
        jobs = svc.store.jobs(visit.exposure_id)
        assert {j["state"] for j in jobs} == {"done"}
    n = sum(j["n_dia_sources"] for j in jobs)
    assert n > 0
    assert PromptApdb.open(home.apdb_config).counts()["DiaSource"] == n


def test_quality_is_kept_while_telemetry_is_down_and_sent_after(
    facility: Facility, make_service: Any
) -> None:
    svc = make_service()
    up = False
    sent: list[dict[str, Any]] = []

    def publish(name: str, payload: dict[str, Any]) -> bool:
        if not up:
            raise ConnectionError("telemetry gateway unreachable")
        sent.append(payload)
        return True

    svc.publish_telemetry = publish
    visit = facility.visits[0]
    announce(svc, visit)
    svc.run(until_idle=True)
    svc.stop()  # the QA listener has stored every message
    assert sent == []
    assert len(svc.store.unsent_telemetry()) == len(DETECTORS)
    up = True
    assert svc.flush_telemetry() == len(DETECTORS)
    assert sorted(p["detector"] for p in sent) == sorted(DETECTORS)
    assert all(p["exposure_id"] == visit.exposure_id for p in sent)
    assert svc.store.unsent_telemetry() == []


def test_history_preloaded_on_next_visit_is_used_only_while_current(
    facility: Facility, make_service: Any
) -> None:
    """A revisit of a field announced before the first visit's DiaSources were stored must
    not associate against the stale snapshot: it would duplicate every DiaObject."""
    from ldf.prompt.inputs import HISTORY_DIR

    first = facility.visits[0]
    revisit = first.model_copy(
        update={"seq_num": first.seq_num + 50, "start_tai_mjd": first.start_tai_mjd + 40 / 86400}
    )
    svc = make_service()
    svc.on_next_visit(first.model_dump(mode="json"), detectors=DETECTORS)
    svc.on_next_visit(revisit.model_dump(mode="json"), detectors=DETECTORS)
    for v in (first, revisit):
        snapshot = svc.preloader.scratch_for(v.exposure_id) / HISTORY_DIR / "snapshot.json"
        assert snapshot.exists()
    # The first visit is processed; its snapshot was current.
    raws = write_raws(facility, first)
    svc.on_end_readout(first.exposure_id, time.time())
    for det, path in raws.items():
        svc.on_image(first.exposure_id, det, path)
    job = svc.store.claim()
    visit = svc.store.visit(first.exposure_id)
    assert svc._current_snapshot(job, visit, offline=False) is not None
    svc.store.requeue(job["exposure_id"], job["detector"], reason="test")
    svc.run(until_idle=True)
    n_first = sum(j["n_dia_sources"] for j in svc.store.jobs(first.exposure_id))
    assert n_first > 0
    # The revisit's snapshot predates those DiaObjects: it is not used, and the revisit's
    # sources associate with them instead of creating new objects.
    raws = write_raws(facility, revisit)
    svc.on_end_readout(revisit.exposure_id, time.time())
    for det, path in raws.items():
        svc.on_image(revisit.exposure_id, det, path)
    svc.run(until_idle=True)
    jobs = svc.store.jobs(revisit.exposure_id)
    assert {j["state"] for j in jobs} == {"done"}
    n_sources = sum(j["n_dia_sources"] for j in jobs)
    n_new = sum(j["n_new_objects"] for j in jobs)
    assert n_new < 0.7 * n_sources  # most revisit sources are the same objects


def test_cli_reports_visits_and_detectors(facility: Facility, make_service: Any) -> None:
    from typer.testing import CliRunner

    from ldf.cli import app

    svc = make_service()
    visit = facility.visits[0]
    announce(svc, visit)
    svc.run(until_idle=True)
    svc.close()
    runner = CliRunner()
    out = runner.invoke(app, ["prompt", "visits", "--json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)
    assert row["exposure_id"] == visit.exposure_id
    assert row["done"] == len(DETECTORS)
    assert row["latency_p98_s"] >= row["latency_p50_s"] > 0
    out = runner.invoke(app, ["prompt", "detectors", str(visit.exposure_id), "--json"])
    assert out.exit_code == 0, out.output
    assert {j["detector"] for j in json.loads(out.stdout)} == set(DETECTORS)
    out = runner.invoke(app, ["prompt", "detectors", "1"])
    assert out.exit_code == 2
    assert out.stderr.strip() == "error: no detectors of exposure 1 in Prompt Processing"


def test_idle_workers_prewarp_templates_the_detectors_then_use(
    facility: Facility, make_service: Any
) -> None:
    from tests.prompt.conftest import write_raws

    svc = make_service()
    visit = facility.visits[0]
    assert visit.band
    svc.on_next_visit(visit.model_dump(mode="json"), detectors=DETECTORS)
    # During the exposure: no detector to run, so the idle workers prewarp the templates.
    assert svc.run(until_idle=True) == 0
    assert svc.prewarp_counts == {"done": len(DETECTORS), "failed": 0, "skipped": 0}
    scratch = InputPaths(svc.preloader.scratch_for(visit.exposure_id))
    for det in DETECTORS:
        assert (scratch.prewarped(det, visit.band) / "meta.json").exists()
    raws = write_raws(facility, visit)
    svc.on_end_readout(visit.exposure_id, time.time())
    for det, path in raws.items():
        svc.on_image(visit.exposure_id, det, path)
    assert svc.run(until_idle=True) == len(DETECTORS)
    jobs = svc.store.jobs(visit.exposure_id)
    assert {j["state"] for j in jobs} == {"done"}, [j["reason"] for j in jobs]
    assert all(j["template_prewarped"] for j in jobs)
    assert all("template" in j["stage_s"] and j["n_alerts"] > 0 for j in jobs)
    (report,) = svc.reports()
    assert report.templates_prewarped == len(DETECTORS)
    assert not scratch.root.exists()  # the visit's scratch, prewarps included, is removed

    # A visit whose raws arrive before any worker is free skips its prewarps.
    second = facility.visits[1]
    announce(svc, second)
    assert svc.run(until_idle=True) == len(DETECTORS)
    assert svc.prewarp_counts["skipped"] == len(DETECTORS)
    assert not any(j["template_prewarped"] for j in svc.store.jobs(second.exposure_id))
