"""Backbone: Butler registration of raws, table snapshots, the daemon, and the CLI."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from astropy.io import fits
from tests.butler.rawfiles import DAY_OBS, amp_pixels, exp_id, raw_header
from typer.testing import CliRunner

from ldf.backbone import integrity
from ldf.backbone.daemon import run_daemon
from ldf.backbone.models import ReplicaState, Rule
from ldf.backbone.service import Backbone
from ldf.backbone.tablesync import replicate_tables
from ldf.butler import ButlerRepo
from ldf.cli import app
from ldf.config import load_settings
from ldf.errors import ChecksumMismatchError

runner = CliRunner()


def _raw(path: Path, seq: int, detector: str) -> Path:
    hdus = [fits.PrimaryHDU(header=raw_header("LSSTCam", DAY_OBS, seq, detector))]
    for k, amp in enumerate(("C10", "C11")):
        hdus.append(fits.ImageHDU(amp_pixels(seq, detector, k), name=f"Segment{amp[1:]}"))
    fits.HDUList(hdus).writeto(path, checksum=True)
    return path


def _meta(seq: int, detector: str) -> dict[str, object]:
    return {
        "dataset_type": "raw",
        "instrument": "LSSTCam",
        "day_obs": DAY_OBS,
        "exposure": exp_id(seq),
        "detector": detector,
    }


def test_raws_registered_in_each_sites_butler_and_removed_on_deletion(
    make_backbone: Callable[..., Backbone], tmp_path: Path
) -> None:
    bb = make_backbone(butler=True)
    bb.add_rule(Rule(name="raws", expression="dataset_type == 'raw'", copies=1, sites=["archive"]))
    for seq, det in [(1, "R22_S11"), (1, "R22_S12"), (2, "R22_S11")]:
        src = _raw(tmp_path / f"{seq}_{det}.fits", seq, det)
        lfn = f"raw/LSSTCam/{DAY_OBS}/{seq}/{det}.fits"
        assert bb.ingest(src, lfn, site="base", metadata=_meta(seq, det)).butler
    assert bb.run_transfers().done == 3
    for site in ("base", "archive"):
        with ButlerRepo.open(tmp_path / "home" / "butler" / site) as repo:
            rows = repo.query_raws("LSSTCam", with_paths=True)
            assert len(rows) == 3
            assert all(f"/sites/{site}/disk/raw/" in str(r["path"]) for r in rows)
            img = repo.get_raw("LSSTCam", exp_id(2), "R22_S11")
            assert (img.amplifiers["C10"] == amp_pixels(2, "R22_S11", 0)).all()
    req = integrity.request_deletion(bb, "exposure == 2026112100001", "test data", "alice")
    integrity.approve_deletion(bb, req.id or 0, "bob")
    integrity.execute_deletion(bb, req.id or 0)
    for site in ("base", "archive"):
        with ButlerRepo.open(tmp_path / "home" / "butler" / site) as repo:
            assert [r["exposure"] for r in repo.query_raws("LSSTCam")] == [exp_id(2)]


def test_file_catalogued_only_after_verified_copy(
    bb: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"x" * 5000)
    import ldf.backbone.service as service

    real = service.checksum_file

    def lying_checksum(path: Path) -> object:  # the source changed under us
        sums = real(path)
        return sums.__class__(size=sums.size, adler32="00000001", blake3=sums.blake3)

    monkeypatch.setattr(service, "checksum_file", lying_checksum)
    with pytest.raises(ChecksumMismatchError):
        bb.ingest(src, "a", site="base")
    assert bb.store.get_file("a") is None
    assert list(bb.endpoint("base").walk()) == []


def test_catalog_tables_snapshot_replicated(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path / "home",
        policies={
            "backbone": {"butler": False, "tables": [{"role": "catalog", "sites": ["base", "dr"]}]}
        },
    )
    bb = Backbone.open(settings)
    src = tmp_path / "f"
    src.write_bytes(b"data")
    bb.ingest(src, "some/file", site="base")
    [done] = replicate_tables(bb)
    assert done["sites"] == ["base", "dr"]
    snap = Path(bb.endpoint("dr").uri(done["lfn"]).removeprefix("file://"))
    import sqlite3

    with sqlite3.connect(snap) as db:  # a consistent, usable copy of the catalog
        assert db.execute("select lfn from backbone_file").fetchall() == [("some/file",)]
    assert bb.store.get_file(done["lfn"]).retention.value == "scratch"  # type: ignore[union-attr]
    bb.close()


def test_daemon_replicates_new_files_and_audits(
    make_backbone: Callable[..., Backbone], tmp_path: Path
) -> None:
    # A real grace period: with 0 the daemon's audit may quarantine a file caught between its
    # copy and its catalog entry, the very race the grace period exists for.
    policy = {"poll_s": 0.05, "audit_interval_s": 3600, "dark_grace_s": 600}
    bb = make_backbone(**policy)
    bb.add_rule(Rule(name="r", expression="true", copies=1, sites=["archive"]))
    stop = threading.Event()
    rounds: list[dict[str, object]] = []
    daemon = threading.Thread(
        target=run_daemon, args=(make_backbone(**policy), stop), kwargs={"on_round": rounds.append}
    )
    daemon.start()
    try:
        src = tmp_path / "late"
        src.write_bytes(b"y" * 3000)
        bb.ingest(src, "late/file", site="base")  # arrives while the daemon runs
        for _ in range(200):
            states = {r.site: r.state for r in bb.store.replicas("late/file")}
            if states.get("archive") is ReplicaState.AVAILABLE:
                break
            threading.Event().wait(0.05)
        assert states == {"base": ReplicaState.AVAILABLE, "archive": ReplicaState.AVAILABLE}
    finally:
        stop.set()
        daemon.join(30)
    assert not daemon.is_alive()
    assert rounds
    assert set(rounds[0]["audits"]) == {"summit", "base", "archive", "dr"}  # type: ignore[arg-type]


def test_cli_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text("policies:\n  backbone:\n    butler: false\n    dark_grace_s: 0\n")
    base = ["--config", str(cfg), "backbone"]

    def ok(*args: str) -> object:
        result = runner.invoke(app, [*base, *args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    src = tmp_path / "a.fits"
    src.write_bytes(b"z" * 4096)
    rule = ok(
        "rules", "add", "to-archive", "--expr", "instrument == 'LSSTCam'", "--sites", "archive"
    )
    assert rule["transfers_queued"] == 0
    [res] = ok(
        "ingest",
        str(src),
        "--prefix",
        "raw/2026",
        "--site",
        "base",
        "-m",
        "instrument=LSSTCam",
        "-m",
        "day_obs=20261121",
    )  # type: ignore[misc]
    assert (res["lfn"], res["transfers_queued"]) == ("raw/2026/a.fits", 1)
    assert ok("replicate")["transfers"]["done"] == 1  # type: ignore[index]
    stat = ok("stat", "raw/2026/a.fits")
    assert {r["site"]: r["state"] for r in stat["replicas"]} == {
        "base": "available",
        "archive": "available",
    }  # type: ignore[index]
    assert stat["metadata"]["day_obs"] == 20261121  # type: ignore[index]
    assert [f["lfn"] for f in ok("find", "day_obs >= 20261121")] == ["raw/2026/a.fits"]  # type: ignore[index]
    assert [f["lfn"] for f in ok("ls", "raw/")] == ["raw/2026/a.fits"]  # type: ignore[index]
    got = ok("get", "raw/2026/a.fits", str(tmp_path))
    assert Path(got["path"]).read_bytes() == src.read_bytes()  # type: ignore[index]
    audit = ok("audit", "archive", "--checksums")
    assert (audit["checked"], audit["lost"], audit["corrupt"], audit["dark"]) == (1, 0, 0, 0)  # type: ignore[index]
    assert ok("repair")["repaired"] == 0  # type: ignore[index]
    status = ok("status")
    assert status["files"] == {"active": 1}  # type: ignore[index]
    sites = ok("sites")
    assert {(s["site"], s["endpoint"]) for s in sites} >= {("archive", "tape"), ("base", "disk")}  # type: ignore[union-attr]
    req = ok("delete", "request", "lfn like 'raw/*'", "--reason", "test", "--by", "alice")
    assert req["files"] == 1  # type: ignore[index]
    refused = runner.invoke(app, [*base, "delete", "approve", str(req["id"]), "--by", "alice"])  # type: ignore[index]
    assert refused.exit_code == 1
    assert "someone other than its requester" in refused.stderr
    ok("delete", "approve", str(req["id"]), "--by", "bob")  # type: ignore[index]
    assert ok("delete", "execute", str(req["id"]), "--dry-run")["executed"] is False  # type: ignore[index]
    assert ok("delete", "execute", str(req["id"]))["files"] == 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "/nonexistent/file", "--site", "base"], "no such file"),
        (["ingest", "{src}", "--lfn", "../escape", "--site", "base"], "'..'"),
        (["ingest", "{src}", "--lfn", "/abs", "--site", "base"], "absolute"),
        (["ingest", "{src}", "--site", "mars"], "unknown site 'mars'"),
        (["rules", "add", "r", "--expr", "x ==", "--sites", "base"], "bad expression"),
        (["rules", "add", "r", "--expr", "true", "--sites", "venus"], "unknown site 'venus'"),
        (["stat", "not/there"], "not in the catalog"),
        (["audit", "pluto"], "unknown site 'pluto'"),
        (["ingest", "{src}", "-m", "novalue", "--site", "base"], "key=value"),
    ],
)
def test_cli_bad_input_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"1")
    result = runner.invoke(app, ["backbone", *[a.format(src=src) for a in args]])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output
