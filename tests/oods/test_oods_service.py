"""The OODS service: indexing arrivals, the Butler in step, leases, pins and expiry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from tests.butler.rawfiles import DAY_OBS, exp_id
from tests.oods.conftest import AddRaw, write_raw

from ldf.db import utcnow
from ldf.errors import ChecksumMismatchError, NotFoundError, UserInputError
from ldf.oods.service import Oods


def test_path_for_is_the_predictable_hierarchy(oods: Oods) -> None:
    path = oods.path_for("LSSTCam", DAY_OBS, "MC_O_20261121_000001", "R22_S11")
    assert (
        path
        == oods.root / "LSSTCam/20261121/MC_O_20261121_000001/MC_O_20261121_000001_R22_S11.fits"
    )
    for bad in ("..", "R22/S11", "", ".hidden", "a b"):
        with pytest.raises(UserInputError):
            oods.path_for("LSSTCam", DAY_OBS, "MC_O_20261121_000001", bad)
    with pytest.raises(UserInputError, match="day_obs"):
        oods.path_for("LSSTCam", 2026, "MC_O_20261121_000001", "R22_S11")


def test_butler_lives_outside_the_tree(oods: Oods) -> None:
    assert not oods.butler_root.is_relative_to(oods.root)


def test_add_find_and_idempotent_add(oods: Oods, add_raw: AddRaw) -> None:
    a = add_raw(1, "R22_S11")
    b = add_raw(1, "R22_S12")
    c = add_raw(2, "R22_S11")
    assert a.path == "LSSTCam/20261121/MC_O_20261121_000001/MC_O_20261121_000001_R22_S11.fits"
    assert (a.exposure_id, a.detector, a.dataset_type, a.pinned) == (
        exp_id(1),
        "R22_S11",
        "raw",
        False,
    )
    assert [e.id for e in oods.find()] == [a.id, b.id, c.id]
    assert [e.id for e in oods.find(exposure=exp_id(1))] == [a.id, b.id]
    assert [e.id for e in oods.find(obs_id=c.obs_id)] == [c.id]
    assert [e.id for e in oods.find(detector="R22_S11", instrument="LSSTCam")] == [a.id, c.id]
    assert [e.id for e in oods.find(limit=1)] == [a.id]
    assert oods.find(day_obs=20261122) == []
    assert oods.find(since=c.arrived_at) == [c]
    # The same file again: same entry, no second arrival.
    last = oods.store.last_event_id()
    again = add_raw(1, "R22_S11")
    assert again == a
    assert oods.store.last_event_id() == last
    assert len(oods.find()) == 3
    assert oods.get("LSSTCam", a.obs_id, "R22_S11") == a
    with pytest.raises(NotFoundError):
        oods.get("LSSTCam", a.obs_id, "R01_S00")
    with pytest.raises(UserInputError, match="unknown filter"):
        oods.find(visit=1)


def test_rewritten_file_arrives_again(oods: Oods, add_raw: AddRaw) -> None:
    a = add_raw(1)
    kw = write_raw(oods, 1, "R22_S11")
    kw["path"].write_bytes(kw["path"].read_bytes() + b"\0" * 2880)
    last = oods.store.last_event_id()
    b = oods.add(kw.pop("path"), **{**kw, "size": kw["size"] + 2880, "checksum": "0badc0de"})
    assert b.id == a.id
    assert (b.size, b.checksum) == (a.size + 2880, "0badc0de")
    assert oods.store.last_event_id() == last + 1


def test_add_refuses_paths_outside_its_place(oods: Oods, tmp_path: Path) -> None:
    kw = write_raw(oods, 1, "R22_S11")
    path = kw.pop("path")
    outside = tmp_path / path.name
    outside.write_bytes(path.read_bytes())
    with pytest.raises(UserInputError, match="not where the OODS keeps"):
        oods.add(outside, **kw)
    sneaky = oods.root / "LSSTCam" / ".." / ".." / path.name
    with pytest.raises(UserInputError):
        oods.add(sneaky, **kw)
    with pytest.raises(UserInputError, match="bytes"):
        oods.add(path, **{**kw, "size": kw["size"] + 1})
    with pytest.raises(UserInputError, match="checksum"):
        oods.add(path, **{**kw, "checksum": "xyz"})
    # A symbolic link at the right place, pointing out of the tree.
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(UserInputError, match="symbolic link"):
        oods.add(path, **kw)
    path.unlink()
    with pytest.raises(NotFoundError):
        oods.add(path, **kw)
    assert oods.find() == []


def test_butler_in_step_with_the_cache(oods: Oods, add_raw: AddRaw) -> None:
    old = utcnow() - timedelta(days=10)
    add_raw(1, "R22_S11", arrived_at=old)
    add_raw(1, "R22_S12", arrived_at=old)
    add_raw(2, "R22_S11")
    rows = oods.butler().query_raws("LSSTCam", with_paths=True)
    assert [(r["exposure"], r["detector"]) for r in rows] == [
        (exp_id(1), "R22_S11"), (exp_id(1), "R22_S12"), (exp_id(2), "R22_S11"),
    ]  # fmt: skip
    # Butler points at the cached file itself (transfer='direct').
    assert Path(rows[0]["path"]) == oods.path_for("LSSTCam", DAY_OBS, rows[0]["obs_id"], "R22_S11")
    report = oods.expire()
    assert (report.removed, report.butler_removed) == (2, 2)
    assert [r["exposure"] for r in oods.butler().query_raws("LSSTCam")] == [exp_id(2)]
    # The exposure's directory went with its files; the day's stays for exposure 2.
    assert not (oods.root / "LSSTCam" / str(DAY_OBS) / "MC_O_20261121_000001").exists()
    assert (oods.root / "LSSTCam" / str(DAY_OBS)).is_dir()


def test_expiry_respects_the_window_per_class(oods: Oods, add_raw: AddRaw) -> None:
    now = utcnow()
    keep = add_raw(1, arrived_at=now - timedelta(days=6))
    gone = add_raw(2, arrived_at=now - timedelta(days=8))
    lat_keep = add_raw(1, "RXX_S00", instrument="LATISS", arrived_at=now - timedelta(days=1))
    lat_gone = add_raw(2, "RXX_S00", instrument="LATISS", arrived_at=now - timedelta(days=3))
    dry = oods.expire(now=now, dry_run=True)
    assert (dry.removed, dry.dry_run) == (2, True)
    assert sorted(dry.paths) == sorted([gone.path, lat_gone.path])
    assert len(oods.find()) == 4
    assert (oods.root / gone.path).exists()
    report = oods.expire(now=now)
    assert report.removed == 2
    assert report.bytes == gone.size + lat_gone.size
    assert {e.id for e in oods.find()} == {keep.id, lat_keep.id}
    assert not (oods.root / gone.path).exists()
    assert not (oods.root / lat_gone.path).exists()
    # Later, everything falls out of its window.
    assert oods.expire(now=now + timedelta(days=30)).removed == 2
    assert oods.find() == []
    # No empty directories left behind: the cache holds exactly its hierarchy.
    assert list(oods.root.iterdir()) == []


def test_unknown_dataset_types_are_kept(make_oods: Callable[..., Oods]) -> None:
    oods = make_oods(retention_days={"raw": 1.0})
    assert oods.retention_days("LSSTCam", "raw") == 1.0
    assert oods.retention_days("LSSTCam", "guider") is None
    oods2 = make_oods(retention_days={"*": 3.0, "LSSTCam/raw": 5.0})
    assert oods2.retention_days("LATISS", "raw") == 3.0
    assert oods2.retention_days("LSSTCam", "raw") == 5.0


def test_pins_protect_from_expiry(oods: Oods, add_raw: AddRaw) -> None:
    old = utcnow() - timedelta(days=30)
    a = add_raw(1, arrived_at=old)
    b = add_raw(2, arrived_at=old)
    c = add_raw(3, "R22_S11", day_obs=20261122, arrived_at=old)
    pin = oods.pin(obs_id=a.obs_id, reason="investigation", by="ops")
    assert (pin.files, pin.reason, pin.pinned_by) == (1, "investigation", "ops")
    assert oods.pin(obs_id=a.obs_id).id == pin.id  # the same pin again
    day = oods.pin(day_obs=20261122, instrument="LSSTCam")
    assert day.files == 1
    assert oods.get("LSSTCam", a.obs_id, "R22_S11").pinned
    report = oods.expire()
    assert (report.removed, report.kept_pinned) == (1, 2)
    assert {e.id for e in oods.find()} == {a.id, c.id}
    assert not (oods.root / b.path).exists()
    # A pin also protects what arrives after it.
    late = add_raw(4, "R22_S12", day_obs=20261122, arrived_at=old)
    assert late.pinned
    assert oods.unpin(day_obs=20261122, instrument="LSSTCam") == 1
    with pytest.raises(NotFoundError):
        oods.unpin(day_obs=20261122, instrument="LSSTCam")
    assert oods.expire().removed == 2
    assert [e.id for e in oods.find()] == [a.id]
    with pytest.raises(UserInputError, match="exactly one"):
        oods.pin(obs_id=a.obs_id, day_obs=DAY_OBS)
    with pytest.raises(UserInputError, match="exactly one"):
        oods.pin()


def test_pin_by_exposure(oods: Oods, add_raw: AddRaw) -> None:
    old = utcnow() - timedelta(days=30)
    add_raw(1, "R22_S11", arrived_at=old)
    add_raw(1, "R22_S12", arrived_at=old)
    add_raw(2, arrived_at=old)
    assert oods.pin(exposure=exp_id(1)).files == 2
    assert oods.expire().removed == 1
    assert {e.exposure_id for e in oods.find()} == {exp_id(1)}


def test_read_lease_protects_from_expiry(make_oods: Callable[..., Oods], add_raw: AddRaw) -> None:
    oods = make_oods(retention_days={"raw": 1.0})
    other = make_oods(retention_days={"raw": 1.0})  # another process expiring
    entry = add_raw(1, arrived_at=utcnow() - timedelta(days=2))
    with oods.open_for_read(entry) as path:
        report = other.expire()
        assert (report.removed, report.kept_leased) == (0, 1)
        assert path.read_bytes()[:6] == b"SIMPLE"
    assert oods.store.active_leases(utcnow()) == 0
    assert other.expire().removed == 1
    with pytest.raises(NotFoundError):
        oods.open_for_read(entry)


def test_lapsed_lease_does_not_protect(oods: Oods, add_raw: AddRaw) -> None:
    entry = add_raw(1, arrived_at=utcnow() - timedelta(days=30))
    lease = oods.open_for_read(entry)  # a reader that crashed: never released
    assert oods.expire().kept_leased == 1
    later = utcnow() + oods.lease_duration + timedelta(seconds=1)
    assert oods.expire(now=later).removed == 1
    lease.release()  # harmless after the fact


def test_open_for_read_refuses_a_symlink_out_of_the_tree(
    oods: Oods, add_raw: AddRaw, tmp_path: Path
) -> None:
    entry = add_raw(1)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    path = oods.root / entry.path
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(NotFoundError):
        oods.open_for_read(entry)
    assert oods.store.active_leases(utcnow()) == 0


def test_copy_to_verifies(oods: Oods, add_raw: AddRaw, tmp_path: Path) -> None:
    entry = add_raw(1)
    dest = tmp_path / "out"
    dest.mkdir()
    got = oods.copy_to(entry, dest)
    assert got == dest / entry.filename
    assert got.read_bytes() == (oods.root / entry.path).read_bytes()
    # Corrupt the cached copy: the copy is refused and nothing is left behind.
    cached = oods.root / entry.path
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        oods.copy_to(entry, tmp_path / "bad.fits")
    assert not (tmp_path / "bad.fits").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_status(oods: Oods, add_raw: AddRaw) -> None:
    a = add_raw(1)
    add_raw(2)
    add_raw(1, "RXX_S00", instrument="LATISS")
    oods.pin(obs_id=a.obs_id)
    st = oods.status()
    assert st["files"] == 3
    assert st["pinned_files"] == 1
    assert st["pins"] == 1
    by_class = {(c["instrument"], c["dataset_type"]): c["files"] for c in st["classes"]}
    assert by_class == {("LSSTCam", "raw"): 2, ("LATISS", "raw"): 1}
    assert st["bytes"] == sum(e.size for e in oods.find())
    assert st["free_bytes"] > 0
    assert st["oldest"] <= st["newest"]
    assert st["last_event_id"] == 3
    assert Path(st["root"]).samefile(oods.root)
