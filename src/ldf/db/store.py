"""The base of every SQL store: one writer engine, one reader engine, schema migrated on open."""

from __future__ import annotations

from typing import ClassVar, Self

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ldf.db.engine import make_engine
from ldf.db.migrate import migrate

__all__ = ["SqlStore"]


class SqlStore:
    """A store over one database.

    Writes go through ``engine`` (on SQLite, ``BEGIN IMMEDIATE`` transactions); reads through
    ``read_engine`` (on SQLite, deferred transactions that never hold the writer's lock, so a
    long scan never blocks writers); on PostgreSQL both are the same engine.

    Parameters
    ----------
    engine
        Engine for transactions that write.
    read_engine
        Engine for read-only queries; default ``engine``.
    """

    package: ClassVar[str]
    """The service package whose ``migrations`` folder holds this store's schema."""

    def __init__(self, engine: Engine, read_engine: Engine | None = None) -> None:
        self.engine = engine
        self.read_engine = read_engine or engine

    @classmethod
    def open(cls, url: str) -> Self:
        """Open the store at a database URL, creating or migrating its schema as needed."""
        engine = make_engine(url)
        migrate(cls.package, engine)
        reader = make_engine(url, writer=False) if engine.dialect.name == "sqlite" else None
        return cls(engine, reader)

    def close(self) -> None:
        """Release the connection pools."""
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()

    def _session(self) -> Session:
        """A session for one writing transaction."""
        return Session(self.engine, expire_on_commit=False)

    def _reader(self) -> Session:
        """A session for reading."""
        return Session(self.read_engine, expire_on_commit=False)
