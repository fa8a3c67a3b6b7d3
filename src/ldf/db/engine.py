"""Engines for the two database backends."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ldf.errors import UserInputError

__all__ = ["make_engine", "utcnow"]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def make_engine(url: str, *, writer: bool = True, **kwargs: Any) -> Engine:
    """Create an engine for a SQLAlchemy URL (SQLite or PostgreSQL).

    SQLite gets WAL journaling (readers never block the writer), foreign keys, a busy timeout
    so several processes can share a file, and ``BEGIN IMMEDIATE`` transactions so a writer
    takes the lock up front instead of failing half-way. With ``writer=False`` SQLite
    transactions are deferred instead: in WAL mode such readers never wait for the writer
    and never hold its lock (use one engine of each kind: see `ldf.backbone.storage`).
    PostgreSQL URLs without a driver use psycopg 3.

    Raises
    ------
    UserInputError
        The URL is malformed or names an unsupported backend.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserInputError(f"not a database URL: {url!r}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, **kwargs)
    if backend != "sqlite":
        raise UserInputError(f"unsupported database {backend!r}: use sqlite or postgresql")
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": 30}, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see the
        # "Serializable isolation / Savepoints" notes in SQLAlchemy's SQLite dialect docs).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    if not writer:

        @event.listens_for(engine, "begin")
        def _begin_read(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

        return engine

    # Writers of one file in this process take turns on a Python lock before BEGIN IMMEDIATE.
    # SQLite's own busy handler polls a held lock with sleeps of up to 100 ms, so threads
    # of one service that write the same database (ingest, acknowledgements, audits) waited
    # up to a sleep past every release: measured by benchmarks/alerts.py (acks averaging
    # 22 ms, the longest 260 ms, behind ingest transactions of 0.2 s). The lock is released
    # when the transaction ends (commit or rollback); other processes still meet SQLite's.
    turn = _writer_lock(parsed.database or "", engine)

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        turn.acquire()
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            turn.release()
            raise

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _end(_conn: Any) -> None:
        turn.release()

    return engine


_WRITER_LOCKS: dict[str, threading.RLock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(database: str, engine: Engine) -> threading.RLock:
    """The lock of this process's writers of one SQLite file (a private one in memory).

    Re-entrant: a thread that opens a second writing transaction on the same file while
    holding one gets past it (and meets SQLite's lock and busy timeout, as before)."""
    key = str(Path(database).resolve()) if database and database != ":memory:" else str(id(engine))
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(key, threading.RLock())
