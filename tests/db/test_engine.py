"""The SQLite writer engine: writers of one file in a process take turns on a Python lock."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ldf.db.engine import _writer_lock, make_engine


def _free_elsewhere(lock: threading.RLock) -> bool:
    """Whether another thread could take the lock now."""
    got: list[bool] = []

    def probe() -> None:
        ok = lock.acquire(timeout=0.5)
        got.append(ok)
        if ok:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return got[0]


def test_lock_is_held_for_a_write_transaction_only(tmp_path: Path) -> None:
    db = tmp_path / "w.sqlite3"
    engine = make_engine(f"sqlite:///{db}")
    other = make_engine(f"sqlite:///{db}")  # a second engine on the same file: same lock
    lock = _writer_lock(str(db), engine)
    assert _writer_lock(str(db), other) is lock
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (x INTEGER)"))
        assert not _free_elsewhere(lock)
    assert _free_elsewhere(lock)
    with pytest.raises(OperationalError), engine.begin() as c:  # rolled back, released
        c.execute(text("INSERT INTO missing VALUES (1)"))
    assert _free_elsewhere(lock)
    s = Session(engine)
    s.execute(text("INSERT INTO t VALUES (1)"))
    assert not _free_elsewhere(lock)
    s.close()  # never committed: rolled back, released
    assert _free_elsewhere(lock)
    with Session(engine) as s, s.begin():
        s.execute(text("INSERT INTO t VALUES (2)"))
        with s.begin_nested():  # a savepoint neither takes nor releases it
            s.execute(text("INSERT INTO t VALUES (3)"))
        assert not _free_elsewhere(lock)
    assert _free_elsewhere(lock)
    reader = make_engine(f"sqlite:///{db}", writer=False)
    with reader.connect() as c:  # readers never take it
        assert c.execute(text("SELECT count(*) FROM t")).scalar() == 2
        assert _free_elsewhere(lock)
    for e in (engine, other, reader):
        e.dispose()


def test_concurrent_writers_all_commit(tmp_path: Path) -> None:
    """Eight threads on two engines, each inserting in its own transactions: every row
    arrives (none fails with "database is locked"), none twice."""
    db = tmp_path / "c.sqlite3"
    engines = [make_engine(f"sqlite:///{db}") for _ in range(2)]
    with engines[0].begin() as c:
        c.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(50):
                with engines[k % 2].begin() as c:
                    c.execute(text("INSERT INTO t VALUES (:x)"), {"x": k * 1000 + i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with engines[0].connect() as c:
        assert c.execute(text("SELECT count(DISTINCT x) FROM t")).scalar() == 400
    for e in engines:
        e.dispose()
