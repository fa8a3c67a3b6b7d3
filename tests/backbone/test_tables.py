"""Table snapshots for replication: SQLite backups under load, PostgreSQL dump and restore."""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url
from tests.engines import scratch_postgres

from ldf.backbone import tables
from ldf.backbone.tables import (
    dump_postgres,
    replicate_table_snapshot,
    restore_postgres,
    snapshot_sqlite,
)
from ldf.errors import NotFoundError, StorageError, TransportError, UserInputError


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


# -- SQLite ------------------------------------------------------------------------------------


def make_db(path: Path, *, wal: bool = True) -> None:
    with sqlite3.connect(path) as db:
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE replica (id INTEGER PRIMARY KEY, lfn TEXT NOT NULL)")
        db.execute("CREATE TABLE site (name TEXT PRIMARY KEY)")
        db.execute("CREATE VIEW n AS SELECT count(*) FROM replica")
        db.execute("INSERT INTO site VALUES ('summit'), ('base')")
    db.close()


def test_snapshot_while_a_writer_is_active(tmp_path: Path) -> None:
    source = tmp_path / "catalog.sqlite3"
    make_db(source)
    stop = threading.Event()
    batches = 0

    def writer() -> None:
        nonlocal batches
        db = sqlite3.connect(source, timeout=30)
        try:
            while not stop.is_set():
                with db:  # one transaction of 10 rows
                    db.executemany(
                        "INSERT INTO replica (lfn) VALUES (?)",
                        [(f"raw/{batches}/{i}.fits",) for i in range(10)],
                    )
                batches += 1
        finally:
            db.close()

    thread = threading.Thread(target=writer)
    thread.start()
    counts = []
    try:
        while batches < 5:
            stop.wait(0.001)
        for k in range(5):
            dest = snapshot_sqlite(source, tmp_path / "snaps" / f"snap{k}.sqlite3")
            snap = sqlite3.connect(dest)
            try:
                assert snap.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                assert snap.execute("PRAGMA journal_mode").fetchone() == ("delete",)
                (count,) = snap.execute("SELECT count(*) FROM replica").fetchone()
                assert snap.execute("SELECT count(*) FROM site").fetchone() == (2,)
            finally:
                snap.close()
            counts.append(count)
    finally:
        stop.set()
        thread.join(30)
    # Every snapshot is a committed state: whole batches only, never a half transaction.
    assert all(c % 10 == 0 for c in counts)
    assert counts == sorted(counts)
    assert counts[-1] > 0
    assert leftovers(tmp_path / "snaps") == []


def test_snapshot_replaces_an_older_one_and_keeps_only_designated_tables(tmp_path: Path) -> None:
    source = tmp_path / "catalog.sqlite3"
    make_db(source, wal=False)
    dest = tmp_path / "out" / "snap.sqlite3"
    dest.parent.mkdir()
    dest.write_bytes(b"old snapshot")
    snapshot_sqlite(source, dest, tables=["site"])
    snap = sqlite3.connect(dest)
    try:
        names = {r[0] for r in snap.execute("SELECT name FROM sqlite_master")}
        assert "site" in names
        assert "replica" not in names
        assert "n" not in names
        assert snap.execute("SELECT name FROM site ORDER BY name").fetchall() == [
            ("base",),
            ("summit",),
        ]
    finally:
        snap.close()
    assert leftovers(dest.parent) == []


def test_snapshot_errors_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such database"):
        snapshot_sqlite(tmp_path / "missing.sqlite3", tmp_path / "out.sqlite3")
    source = tmp_path / "catalog.sqlite3"
    make_db(source)
    with pytest.raises(NotFoundError, match="no table"):
        snapshot_sqlite(source, tmp_path / "out" / "s.sqlite3", tables=["nope"])
    assert leftovers(tmp_path / "out") == []
    notdb = tmp_path / "not.sqlite3"
    notdb.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="cannot snapshot"):
        snapshot_sqlite(notdb, tmp_path / "out" / "s.sqlite3")
    assert list((tmp_path / "out").iterdir()) == []


def test_replicate_table_snapshot_dispatches_on_the_url(tmp_path: Path) -> None:
    source = tmp_path / "backbone.sqlite3"
    make_db(source)
    out = replicate_table_snapshot(f"sqlite:///{source}", tmp_path / "out")
    assert out.parent == tmp_path / "out"
    assert out.name.startswith("backbone-")
    assert out.suffix == ".sqlite3"
    with sqlite3.connect(out) as snap:
        assert snap.execute("SELECT count(*) FROM site").fetchone() == (2,)
    snap.close()
    with pytest.raises(UserInputError, match="mysql"):
        replicate_table_snapshot("mysql://u@h/db", tmp_path / "out")
    with pytest.raises(UserInputError, match="in-memory"):
        replicate_table_snapshot("sqlite://", tmp_path / "out")
    with pytest.raises(UserInputError, match="not a database URL"):
        replicate_table_snapshot("::nonsense::", tmp_path / "out")


# -- PostgreSQL without a server ---------------------------------------------------------------


def test_missing_pg_dump_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(tables, "_FALLBACK_BIN", tmp_path)
    with pytest.raises(StorageError, match="pg_dump not found"):
        dump_postgres("postgresql://u@127.0.0.1/db", tmp_path / "d.pgdump")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_a_transport_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://u:s3cret@127.0.0.1:{port}/db"
    with pytest.raises(TransportError, match=r"pg_dump of .* failed: .*") as info:
        dump_postgres(url, tmp_path / "out" / "d.pgdump", timeout_s=30)
    assert "s3cret" not in str(info.value)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_restore_of_missing_dump(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        restore_postgres(tmp_path / "none.pgdump", "postgresql://u@127.0.0.1/db")
    with pytest.raises(UserInputError, match="not a PostgreSQL URL"):
        dump_postgres("sqlite:///x.db", tmp_path / "d")


# -- PostgreSQL --------------------------------------------------------------------------------


def _conninfo(url: str) -> str:
    """A libpq URI psycopg accepts, from a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def scratch_databases() -> Iterator[tuple[str, str]]:
    """Two fresh databases (source, target) as SQLAlchemy URLs, dropped afterwards."""
    with scratch_postgres() as source, scratch_postgres() as target:
        yield source, target


@pytest.mark.postgres
def test_postgres_dump_and_restore_round_trip(
    scratch_databases: tuple[str, str], tmp_path: Path
) -> None:
    source, target = scratch_databases
    with psycopg.connect(_conninfo(source)) as db:
        db.execute("CREATE TABLE replica (id int PRIMARY KEY, lfn text NOT NULL, size bigint)")
        db.execute("CREATE TABLE scratch (x int)")
        db.execute(
            "INSERT INTO replica SELECT i, 'raw/' || i || '.fits', i * 1000 "
            "FROM generate_series(1, 500) i"
        )
    dump = dump_postgres(source, tmp_path / "out" / "replica.pgdump", tables=["replica"])
    assert dump.read_bytes()[:5] == b"PGDMP"  # custom format
    assert leftovers(dump.parent) == []
    restore_postgres(dump, target)
    restore_postgres(dump, target)  # --clean: restoring again replaces, no duplicates
    with psycopg.connect(_conninfo(target)) as db:
        assert db.execute("SELECT count(*), sum(size) FROM replica").fetchone() == (
            500,
            sum(i * 1000 for i in range(1, 501)),
        )
        assert db.execute("SELECT to_regclass('public.scratch')").fetchone() == (None,)
    # The dispatching entry point gives a dump too.
    out = replicate_table_snapshot(source, tmp_path / "out2", tables=["replica"])
    assert out.suffix == ".pgdump"
    assert out.name.startswith(make_url(source).database or "")


@pytest.mark.postgres
def test_postgres_errors(scratch_databases: tuple[str, str], tmp_path: Path) -> None:
    source, _ = scratch_databases
    with pytest.raises(StorageError, match=r"pg_dump of .* failed: .*no matching tables"):
        dump_postgres(source, tmp_path / "d.pgdump", tables=["no_such_table"])
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "bad.pgdump"
    bad.write_bytes(b"not a dump")
    with pytest.raises(StorageError, match=r"pg_restore of .* failed"):
        restore_postgres(bad, source)
