"""Engines for the two database backends."""

from __future__ import annotations

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

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine
