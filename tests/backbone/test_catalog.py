"""The Backbone contract, run on SQLite and PostgreSQL catalogs: ingest, rules, transfers,
access, integrity and retention."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from ldf.backbone import integrity
from ldf.backbone.models import (
    DeletionState,
    FileState,
    FindingKind,
    ReplicaState,
    Retention,
    Rule,
    TransferState,
)
from ldf.backbone.service import Backbone
from ldf.config import Tier
from ldf.errors import (
    NotFoundError,
    StagingRequiredError,
    StateError,
    StorageFullError,
    UserInputError,
)

MakeFile = Callable[..., Path]

RAW = {"instrument": "LSSTCam", "dataset_type": "raw", "day_obs": 20261121}


def _states(bb: Backbone, lfn: str) -> dict[str, str]:
    return {f"{r.site}/{r.endpoint}": r.state.value for r in bb.store.replicas(lfn)}


def test_ingest_catalogues_verified_replica_and_is_idempotent(
    bb: Backbone, make_file: MakeFile
) -> None:
    src = make_file("a.fits", 50_000)
    r = bb.ingest(src, "raw/a.fits", site="base", metadata=RAW, producer="archiver")
    assert r.created
    assert r.size == 50_000
    f = bb.store.get_file("raw/a.fits")
    assert f is not None
    assert f.metadata["instrument"] == "LSSTCam"
    assert _states(bb, "raw/a.fits") == {"base/disk": "available"}
    assert bb.endpoint("base").checksum("raw/a.fits").blake3 == f.blake3
    again = bb.ingest(src, "raw/a.fits", site="base", metadata=RAW)
    assert not again.created
    assert len(bb.store.replicas("raw/a.fits")) == 1


def test_same_lfn_different_content_refused(bb: Backbone, make_file: MakeFile) -> None:
    bb.ingest(make_file("a", 100, seed=1), "x/a", site="base")
    with pytest.raises(UserInputError, match="already catalogued with different content"):
        bb.ingest(make_file("b", 100, seed=2), "x/a", site="base")
    assert bb.endpoint("base").checksum("x/a").blake3 == bb.store.get_file("x/a").blake3  # type: ignore[union-attr]


@pytest.mark.parametrize("lfn", ["../etc/passwd", "/abs/file", "a/../../b", "a//b", ""])
def test_bad_lfn_refused_and_nothing_written(bb: Backbone, make_file: MakeFile, lfn: str) -> None:
    with pytest.raises(UserInputError):
        bb.ingest(make_file("a"), lfn, site="base")
    assert list(bb.endpoint("base").walk()) == []
    assert bb.store.file_counts() == {}


def test_unknown_site_and_bad_rules(bb: Backbone, make_file: MakeFile) -> None:
    with pytest.raises(
        UserInputError, match="unknown site 'moon'; known sites: archive, base, dr, summit"
    ):
        bb.ingest(make_file("a"), "a", site="moon")
    with pytest.raises(UserInputError, match="unknown site 'moon'"):
        bb.add_rule(Rule(name="r", expression="instrument == 'LSSTCam'", copies=1, sites=["moon"]))
    with pytest.raises(UserInputError, match="3 copies cannot be kept on 2"):
        bb.add_rule(Rule(name="r", expression="true", copies=3, sites=["base", "archive"]))
    with pytest.raises(UserInputError, match="bad expression"):
        bb.add_rule(Rule(name="r", expression="instrument ==", copies=1, sites=["base"]))
    with pytest.raises(UserInputError, match="no nearline endpoint"):
        bb.add_rule(Rule(name="r", expression="true", copies=1, sites=["base"], tier=Tier.NEARLINE))
    assert bb.store.rules() == []


def test_rules_apply_on_arrival_file_by_file(bb: Backbone, make_file: MakeFile) -> None:
    bb.add_rule(
        Rule(
            name="raw-to-archive",
            expression="dataset_type == 'raw'",
            copies=2,
            sites=["archive", "dr"],
        )
    )
    # A night's dataset that keeps growing: every file replicates as it arrives.
    for k in range(3):
        r = bb.ingest(make_file(f"f{k}", 20_000 + k), f"raw/f{k}", site="base", metadata=RAW)
        assert r.transfers_queued == 2
        assert _states(bb, f"raw/f{k}")["archive/disk"] == "pending"
        report = bb.run_transfers(workers=2)
        assert report.done == 2, report.errors
        assert _states(bb, f"raw/f{k}") == {
            "base/disk": "available",
            "archive/disk": "available",
            "dr/disk": "available",
        }
    other = bb.ingest(
        make_file("calexp"), "calexp/c", site="base", metadata={"dataset_type": "calexp"}
    )
    assert other.transfers_queued == 0
    for ep in (bb.endpoint("archive"), bb.endpoint("dr")):
        assert sorted(lfn for lfn, _ in ep.walk()) == ["raw/f0", "raw/f1", "raw/f2"]
        assert ep.checksum("raw/f1").blake3 == bb.store.get_file("raw/f1").blake3  # type: ignore[union-attr]


def test_rule_added_later_applies_to_existing_files(bb: Backbone, make_file: MakeFile) -> None:
    for k in range(4):
        bb.ingest(
            make_file(f"f{k}"), f"raw/f{k}", site="base", metadata={**RAW, "day_obs": 20261120 + k}
        )
    rule, queued = bb.add_rule(
        Rule(
            name="recent",
            expression="day_obs >= 20261122",
            copies=1,
            sites=["archive"],
            tier=Tier.NEARLINE,
        )
    )
    assert queued == 2
    assert bb.run_transfers().done == 2
    tape = bb.endpoint("archive", "tape")
    assert sorted(lfn for lfn, _ in tape.walk()) == ["raw/f2", "raw/f3"]
    assert rule.id is not None
    # Rules are enforced again only if a copy goes missing: nothing more to do now.
    assert (
        bb.add_rule(
            Rule(
                name="again",
                expression="day_obs >= 20261122",
                copies=1,
                sites=["archive"],
                tier=Tier.NEARLINE,
            )
        )[1]
        == 0
    )


def test_full_destination_keeps_rule_pending_then_completes(
    make_backbone: Callable[..., Backbone], make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    bb = make_backbone(retry_base_s=0.5)  # one attempt per pass, however slow the machine
    bb.add_rule(Rule(name="r", expression="true", copies=1, sites=["archive"]))
    archive = bb.endpoint("archive")
    real_put = archive.put

    def full(*args: object, **kwargs: object) -> object:
        raise StorageFullError("archive/disk: no space left on device")

    monkeypatch.setattr(archive, "put", full)
    bb.ingest(make_file("a"), "a", site="base")
    report = bb.run_transfers()
    assert report.done == 0
    assert report.retried == 1
    assert "no space left" in report.errors[0]
    assert _states(bb, "a")["archive/disk"] == "pending"
    [t] = bb.store.transfers()
    assert t.state is TransferState.QUEUED
    assert "StorageFullError" in (t.last_error or "")
    # Space returns: the retry completes it.
    monkeypatch.setattr(archive, "put", real_put)
    import time

    time.sleep(0.6)
    assert bb.run_transfers().done == 1
    assert _states(bb, "a")["archive/disk"] == "available"


def test_transfer_gives_up_after_max_attempts(
    make_backbone: Callable[..., Backbone], make_file: MakeFile
) -> None:
    bb = make_backbone(max_attempts=2, retry_base_s=0.001)
    bb.add_rule(Rule(name="r", expression="true", copies=1, sites=["archive"]))
    bb.ingest(make_file("a"), "a", site="base")
    bb.endpoint("base").delete("a")  # the only source vanished
    import time

    for _ in range(3):
        bb.run_transfers()
        time.sleep(0.01)
    [t] = bb.store.transfers()
    assert t.state is TransferState.FAILED
    assert t.attempts == 2
    assert bb.store.retry_failed() == 1


def test_no_transfer_claimed_twice(
    make_backbone: Callable[..., Backbone], make_file: MakeFile
) -> None:
    bb = make_backbone()
    bb.add_rule(Rule(name="r", expression="true", copies=2, sites=["archive", "dr"]))
    for k in range(20):
        bb.ingest(make_file(f"f{k}", 2000 + k), f"f{k}", site="base")
    others = [make_backbone() for _ in range(3)]
    claimed: list[list[int]] = [[] for _ in others]

    def claim(i: int) -> None:
        while batch := others[i].store.claim(f"w{i}", 3, 60):
            claimed[i].extend(t.id for t in batch)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for c in claimed for i in c]
    assert len(ids) == 40
    assert len(set(ids)) == 40


def test_get_best_replica_and_nearline_staging(
    bb: Backbone, make_file: MakeFile, tmp_path: Path
) -> None:
    bb.add_rule(
        Rule(name="tape", expression="true", copies=1, sites=["archive"], tier=Tier.NEARLINE)
    )
    src = make_file("a", 30_000)
    bb.ingest(src, "d/a", site="base")
    bb.run_transfers()
    out = tmp_path / "out"
    out.mkdir()
    path, rep = bb.get("d/a", out)
    assert rep.site == "base"
    assert path.read_bytes() == src.read_bytes()
    # Only the tape copy left: reading needs staging.
    bb.endpoint("base").delete("d/a")
    base_rep = next(r for r in bb.store.replicas("d/a") if r.site == "base")
    bb.store.set_replica(base_rep.model_copy(update={"state": ReplicaState.LOST}))
    with pytest.raises(StagingRequiredError, match="staging requested, ready at"):
        bb.get("d/a", out / "b")
    path, rep = bb.get("d/a", out / "c", wait_s=10)
    assert (rep.site, rep.tier) == ("archive", Tier.NEARLINE)
    assert path.read_bytes() == src.read_bytes()
    with pytest.raises(NotFoundError):
        bb.get("nope", out)


def test_audit_finds_lost_corrupt_dark_and_repair_restores(
    bb: Backbone, make_file: MakeFile
) -> None:
    bb.add_rule(Rule(name="r", expression="true", copies=1, sites=["archive"]))
    for name in ("lost", "corrupt", "resized", "fine"):
        bb.ingest(make_file(name, 8000), f"d/{name}", site="base")
    bb.run_transfers()
    base = bb.endpoint("base")
    base.delete("d/lost")
    root = Path(base.uri("d/corrupt").removeprefix("file://"))
    data = bytearray(root.read_bytes())
    data[100] ^= 0xFF  # same size, other content: only a checksum audit sees it
    root.write_bytes(bytes(data))
    Path(base.uri("d/resized").removeprefix("file://")).write_bytes(b"short")
    dark = Path(base.uri("d/stray").removeprefix("file://"))
    dark.write_bytes(b"nobody catalogued me")

    quick = integrity.audit(bb, "base")
    kinds = {(f.kind, f.lfn) for f in quick.findings}
    assert (FindingKind.LOST, "d/lost") in kinds
    assert (FindingKind.CORRUPT, "d/resized") in kinds
    assert (FindingKind.CORRUPT, "d/corrupt") not in kinds  # sizes only
    assert (FindingKind.DARK, "d/stray") in kinds
    assert not dark.exists()  # quarantined
    full = integrity.audit(bb, "base", checksums=True)
    assert {(f.kind, f.lfn) for f in full.findings} == {
        (FindingKind.LOST, "d/lost"),
        (FindingKind.CORRUPT, "d/corrupt"),
        (FindingKind.CORRUPT, "d/resized"),
    }
    assert [a.id for a in bb.store.audits(site="base")] == [full.id, quick.id]

    report = integrity.repair(bb, "base")
    assert len(report.repaired) == 3, report.as_dict()
    for name in ("lost", "corrupt", "resized"):
        assert base.checksum(f"d/{name}").blake3 == bb.store.get_file(f"d/{name}").blake3  # type: ignore[union-attr]
        assert _states(bb, f"d/{name}")["base/disk"] == "available"
    clean = integrity.audit(bb, "base", checksums=True)
    assert clean.findings == []
    assert clean.checked == 4


def test_repair_without_good_copy_marks_defective(bb: Backbone, make_file: MakeFile) -> None:
    bb.ingest(make_file("a"), "a", site="base")
    bb.endpoint("base").delete("a")
    integrity.audit(bb, "base")
    report = integrity.repair(bb)
    assert report.unrepairable == ["a"]
    assert bb.store.get_file("a").state is FileState.DEFECTIVE  # type: ignore[union-attr]


def test_deletion_needs_approval_by_someone_else(bb: Backbone, make_file: MakeFile) -> None:
    bb.add_rule(Rule(name="r", expression="true", copies=1, sites=["archive"]))
    for k in range(3):
        bb.ingest(make_file(f"f{k}"), f"bad/f{k}", site="base", metadata={"campaign": "w42"})
    bb.ingest(make_file("keep"), "good/keep", site="base")
    bb.run_transfers()
    req = integrity.request_deletion(bb, "campaign == 'w42'", "faulty campaign w42", "alice")
    assert (req.files, req.state) == (3, DeletionState.REQUESTED)
    with pytest.raises(StateError, match="only an approved request"):
        integrity.execute_deletion(bb, req.id or 0)
    with pytest.raises(StateError, match="someone other than its requester"):
        integrity.approve_deletion(bb, req.id or 0, "alice")
    dry = integrity.execute_deletion(bb, req.id or 0, dry_run=True)
    assert (len(dry.files), dry.replicas_per_site) == (3, {"base": 3, "archive": 3})
    assert bb.endpoint("base").exists("bad/f0")  # a dry run changes nothing
    integrity.approve_deletion(bb, req.id or 0, "bob")
    done = integrity.execute_deletion(bb, req.id or 0)
    assert done.executed
    for site in ("base", "archive"):
        assert [lfn for lfn, _ in bb.endpoint(site).walk()] == ["good/keep"]
    assert bb.store.get_file("bad/f1").state is FileState.DELETED  # type: ignore[union-attr]
    assert bb.store.get_deletion(req.id or 0).state is DeletionState.EXECUTED
    with pytest.raises(UserInputError, match="no active file matches"):
        integrity.request_deletion(bb, "campaign == 'w42'", "again", "alice")


def test_scratch_expires_permanent_never(bb: Backbone, make_file: MakeFile) -> None:
    bb.ingest(
        make_file("s"), "scratch/s", site="base", retention=Retention.SCRATCH, lifetime_s=0.01
    )
    bb.ingest(make_file("p"), "raw/p", site="base")
    import time

    time.sleep(0.05)
    dry = integrity.expire(bb, dry_run=True)
    assert dry.files == ["scratch/s"]
    plan = integrity.expire(bb)
    assert plan.executed
    assert [lfn for lfn, _ in bb.endpoint("base").walk()] == ["raw/p"]
    assert bb.store.deletions()[0].requested_by == "retention-policy"


def test_status_summaries(bb: Backbone, make_file: MakeFile) -> None:
    bb.add_rule(Rule(name="r", expression="true", copies=1, sites=["archive"]))
    bb.ingest(make_file("a", 1000), "a", site="base")
    assert bb.store.queue_counts() == {"queued": 1}
    bb.run_transfers()
    summary = {
        (s["site"], s["state"]): (s["replicas"], s["bytes"]) for s in bb.store.replica_summary()
    }
    assert summary == {("archive", "available"): (1, 1000), ("base", "available"): (1, 1000)}
    assert bb.store.file_counts() == {"active": 1}


def test_datasets_and_provenance(bb: Backbone, make_file: MakeFile) -> None:
    src = make_file("a")
    bb.ingest(src, "d/a", site="base", datasets=["night-20261121"], producer="archiver")
    bb.ingest(
        make_file("calexp"),
        "d/calexp",
        site="base",
        inputs=["d/a"],
        producer="w42",
        datasets=["w42"],
    )
    # The same file joins a second dataset: ingest stays a no-op for the content.
    again = bb.ingest(src, "d/a", site="base", datasets=["dr1-input"])
    assert not again.created
    assert bb.store.get_file("d/a").datasets == ["dr1-input", "night-20261121"]  # type: ignore[union-attr]
    assert bb.store.dataset_files("night-20261121") == ["d/a"]
    assert bb.store.dataset_files("dr1-input") == ["d/a"]
    calexp = bb.store.get_file("d/calexp")
    assert calexp is not None
    assert (calexp.inputs, calexp.producer) == (["d/a"], "w42")
