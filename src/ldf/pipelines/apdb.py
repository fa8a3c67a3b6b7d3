"""The Alert Production Database (APDB) of prompt processing, on Rubin's ``dax_apdb``.

The APDB holds every DiaObject (with its version history), DiaSource and DiaForcedSource of
prompt processing, in the schema of ``lsst-sdm-schemas`` ``apdb.yaml`` (LDM-230 §3.1 "Level 1
database"; Rubin's APDB design: Salnikov, DMTN-113/DMTN-156). This module is the facility's
thin, operable layer over :class:`lsst.dax.apdb.ApdbSql` — it does not re-implement the APDB:

* :meth:`PromptApdb.create` builds the schema with dax_apdb's own
  :meth:`~lsst.dax.apdb.ApdbSql.init_database` (SQLite or PostgreSQL), idempotently: an existing
  APDB whose schema dax_apdb accepts is reused. The dax_apdb YAML configuration is written
  atomically (temporary file, fsync, rename).
* :meth:`PromptApdb.load_history` is the per-detector read of association: DiaObjects in a
  circle (an ``lsst.sphgeom.Circle``, HTM-indexed by dax_apdb, then cut exactly), their
  DiaSources and DiaForcedSources of the last 365 days before the visit.
* :meth:`PromptApdb.store` writes one detector-visit in one transaction (dax_apdb's ``store``).

Never lose DiaSources. A database that cannot be reached raises :class:`ApdbUnavailableError`
(one-line reason, never a password). :meth:`PromptApdb.store_or_buffer` then appends the batch
to an :class:`ApdbBuffer`, a durable local SQLite queue (WAL, ``synchronous=FULL``; the tables
inside as Parquet), and :meth:`PromptApdb.flush` replays the queue in order once the APDB is
back. Replay is idempotent: a batch whose DiaSources (same ``diaSourceId``) are already in the
APDB — e.g. stored just before a crash, or by another worker — is dropped from the queue, not
stored twice. While anything is queued, later batches queue behind it, so DiaObject versions
are never written out of order.

APDBs are opened without a connection pool (dax_apdb's ``connection_pool: false``). With
SQLite, a pooled connection to a file whose directory has gone away keeps writing into the
unlinked file, which would lose DiaSources silently; with PostgreSQL a pooled connection
outlives a server restart and fails the next transaction. Without the pool every transaction
connects afresh (a few milliseconds) and an outage shows at once as
:class:`ApdbUnavailableError`; prompt-processing workers are also forked processes, where
dax_apdb advises against a pool.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import sqlalchemy
import sqlalchemy.exc
import yaml
from astropy.time import Time, TimeDelta

from ldf.errors import ConfigError, LdfError, NotFoundError, StorageError, UserInputError

if TYPE_CHECKING:
    from lsst.dax.apdb import ApdbSql, ApdbSqlConfig
    from lsst.dax.apdb.schema_model import Column

__all__ = [
    "DEFAULT_SCHEMA_FILE",
    "HISTORY_DAYS",
    "ApdbBuffer",
    "ApdbConflictError",
    "ApdbHistory",
    "ApdbUnavailableError",
    "BufferedBatch",
    "FlushReport",
    "PromptApdb",
    "apdb_columns",
    "default_buffer",
]

_LOG = logging.getLogger(__name__)

DEFAULT_SCHEMA_FILE = "resource://lsst.sdm.schemas/apdb.yaml"
"""The APDB schema (``lsst-sdm-schemas`` apdb.yaml) dax_apdb builds by default."""

_DEFAULT_SS_SCHEMA_FILE = "resource://lsst.sdm.schemas/sso.yaml"

HISTORY_DAYS = 365.0
"""How far back :meth:`PromptApdb.load_history` reads DiaSources and DiaForcedSources (days)."""

_TABLES = ("DiaObject", "DiaSource", "DiaForcedSource")

StoreOutcome = Literal["stored", "buffered", "already-stored"]


class ApdbUnavailableError(StorageError):
    """The APDB cannot be reached (connection refused, file gone, locked past the timeout)."""

    code = "apdb_unavailable"


class ApdbConflictError(StorageError):
    """The APDB refused a batch because rows with the same keys are already stored."""

    code = "apdb_conflict"


def history_within(history: ApdbHistory, ra: float, dec: float, radius_deg: float) -> ApdbHistory:
    """The part of a (larger) history snapshot in a smaller circle: its DiaObjects, and the
    sources and forced sources of those objects."""
    objects = history.objects[_within(history.objects, ra, dec, radius_deg)].reset_index(drop=True)
    ids = {int(i) for i in objects["diaObjectId"]}
    sources = history.sources[history.sources["diaObjectId"].isin(ids)].reset_index(drop=True)
    forced = history.forced[history.forced["diaObjectId"].isin(ids)].reset_index(drop=True)
    return ApdbHistory(objects, sources, forced)


class ApdbHistory(NamedTuple):
    """What association needs from the APDB for one detector-visit."""

    objects: pd.DataFrame
    """Latest versions of the DiaObjects inside the circle."""
    sources: pd.DataFrame
    """Their DiaSources in the history window, strictly before the visit."""
    forced: pd.DataFrame
    """Their DiaForcedSources in the history window, strictly before the visit."""


@dataclass(frozen=True)
class FlushReport:
    """What :meth:`PromptApdb.flush` did."""

    stored: int
    """Buffered batches written to the APDB."""
    skipped: int
    """Buffered batches found already in the APDB (dropped from the queue)."""
    remaining: int
    """Batches still queued (the APDB went away again)."""


@lru_cache(maxsize=8)
def _table_columns(schema_file: str, table: str) -> tuple[Column, ...]:
    from lsst.dax.apdb.apdbSchema import ApdbSchema, ApdbTables

    schema = ApdbSchema(schema_file, _DEFAULT_SS_SCHEMA_FILE)
    return tuple(schema.tableSchemas[ApdbTables[table]].columns)


def apdb_columns(table: str, schema_file: str = DEFAULT_SCHEMA_FILE) -> tuple[Column, ...]:
    """Column definitions (name, datatype, nullable, default) of one APDB table.

    Parameters
    ----------
    table
        ``'DiaObject'``, ``'DiaSource'`` or ``'DiaForcedSource'``.
    schema_file
        The felis schema dax_apdb builds (default: ``lsst-sdm-schemas`` apdb.yaml).
    """
    if table not in _TABLES:
        raise UserInputError(f"not an APDB table this facility writes: {table!r}")
    return _table_columns(schema_file, table)


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _safe_url(url: str) -> str:
    try:
        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<unparseable database URL>"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def _frame_to_bytes(frame: pd.DataFrame | None) -> bytes | None:
    if frame is None:
        return None
    buf = io.BytesIO()
    frame.reset_index(drop=True).to_parquet(buf, index=False)
    return buf.getvalue()


def _frame_from_bytes(data: bytes | None) -> pd.DataFrame | None:
    if data is None:
        return None
    return pd.read_parquet(io.BytesIO(data))


@dataclass(frozen=True)
class BufferedBatch:
    """One detector-visit waiting in an :class:`ApdbBuffer`."""

    seq: int
    """Position in the queue (replay order)."""
    visit: int
    detector: int
    visit_mjd_tai: float
    """The ``visit_time`` given to ``store`` (TAI MJD)."""
    objects: pd.DataFrame
    sources: pd.DataFrame | None
    forced: pd.DataFrame | None
    reason: str
    """Why it was buffered (the unavailability reason)."""
    buffered_at: float
    """Unix time it was (last) buffered."""

    @property
    def visit_time(self) -> Time:
        """``visit_mjd_tai`` as an astropy Time."""
        return Time(self.visit_mjd_tai, format="mjd", scale="tai")


class ApdbBuffer:
    """A durable local queue of detector-visit batches the APDB could not take.

    A SQLite file (WAL journal, ``synchronous=FULL``: a committed append survives a power cut)
    with one row per detector-visit; the three tables are stored as Parquet bytes. Appending a
    detector-visit that is already queued replaces its content in place (a re-run of the same
    detector-visit), keeping its position. The file is created by the first append; until
    then the queue is empty.

    Parameters
    ----------
    path
        The queue file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _connect(self, *, create: bool = False) -> Iterator[sqlite3.Connection | None]:
        """A connection, or None when the queue file does not exist (and ``create`` is off)."""
        if not create and not self.path.exists():
            yield None
            return
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"APDB buffer {self.path} unusable: {_one_line(exc)}") from exc
        try:
            conn.execute("PRAGMA synchronous=FULL")
            if create:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS pending ("
                    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                    " visit INTEGER NOT NULL, detector INTEGER NOT NULL,"
                    " visit_mjd_tai REAL NOT NULL, buffered_at REAL NOT NULL,"
                    " reason TEXT NOT NULL, objects BLOB NOT NULL, sources BLOB, forced BLOB,"
                    " UNIQUE (visit, detector))"
                )
            yield conn
        except sqlite3.Error as exc:
            raise StorageError(f"APDB buffer {self.path}: {_one_line(exc)}") from exc
        finally:
            conn.close()

    def append(
        self,
        visit: int,
        detector: int,
        visit_time: Time,
        objects: pd.DataFrame,
        sources: pd.DataFrame | None,
        forced: pd.DataFrame | None,
        *,
        reason: str,
    ) -> None:
        """Queue one detector-visit (replacing a queued one with the same key).

        Raises
        ------
        StorageError
            The queue could not be written: the batch is NOT safe; the caller must fail.
        """
        row = (
            int(visit),
            int(detector),
            float(visit_time.tai.mjd),
            time.time(),
            reason,
            _frame_to_bytes(objects),
            _frame_to_bytes(sources),
            _frame_to_bytes(forced),
        )
        try:
            with self._connect(create=True) as conn:
                assert conn is not None
                conn.execute(
                    "INSERT INTO pending (visit, detector, visit_mjd_tai, buffered_at, reason,"
                    " objects, sources, forced) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (visit, detector) DO UPDATE SET"
                    " visit_mjd_tai = excluded.visit_mjd_tai,"
                    " buffered_at = excluded.buffered_at, reason = excluded.reason,"
                    " objects = excluded.objects, sources = excluded.sources,"
                    " forced = excluded.forced",
                    row,
                )
        except StorageError as exc:
            raise StorageError(
                f"could not buffer visit {visit} detector {detector}: {exc} — its DiaSources "
                "are NOT stored"
            ) from exc

    def __len__(self) -> int:
        with self._connect() as conn:
            if conn is None:
                return 0
            return int(conn.execute("SELECT count(*) FROM pending").fetchone()[0])

    def keys(self) -> list[tuple[int, int]]:
        """(visit, detector) of the queued batches, in replay order."""
        with self._connect() as conn:
            if conn is None:
                return []
            rows = conn.execute("SELECT visit, detector FROM pending ORDER BY seq").fetchall()
        return [(int(v), int(d)) for v, d in rows]

    def batches(self) -> Iterator[BufferedBatch]:
        """The queued batches in replay order (read one at a time)."""
        with self._connect() as conn:
            if conn is None:
                return
            seqs = [int(r[0]) for r in conn.execute("SELECT seq FROM pending ORDER BY seq")]
        for seq in seqs:
            with self._connect() as conn:
                assert conn is not None
                row = conn.execute(
                    "SELECT visit, detector, visit_mjd_tai, buffered_at, reason, objects,"
                    " sources, forced FROM pending WHERE seq = ?",
                    (seq,),
                ).fetchone()
            if row is None:  # removed meanwhile (another flusher)
                continue
            objects = _frame_from_bytes(row[5])
            assert objects is not None
            yield BufferedBatch(
                seq=seq,
                visit=int(row[0]),
                detector=int(row[1]),
                visit_mjd_tai=float(row[2]),
                buffered_at=float(row[3]),
                reason=str(row[4]),
                objects=objects,
                sources=_frame_from_bytes(row[6]),
                forced=_frame_from_bytes(row[7]),
            )

    def remove(self, seq: int) -> None:
        """Drop one batch (after it is safely in the APDB)."""
        with self._connect() as conn:
            if conn is not None:
                conn.execute("DELETE FROM pending WHERE seq = ?", (int(seq),))


def default_buffer(config_path: str | Path) -> ApdbBuffer:
    """The buffer that goes with an APDB configuration: ``<config stem>-buffer.sqlite3``."""
    path = Path(config_path)
    return ApdbBuffer(path.with_name(f"{path.stem}-buffer.sqlite3"))


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _check_url(url: str) -> None:
    try:
        backend = sqlalchemy.make_url(url).get_backend_name()
    except sqlalchemy.exc.ArgumentError as exc:
        raise UserInputError(f"not a database URL: {_safe_url(url)}") from exc
    if backend not in ("sqlite", "postgresql"):
        raise UserInputError(f"APDB needs SQLite or PostgreSQL, got {backend!r}")
    if backend == "sqlite":
        database = sqlalchemy.make_url(url).database
        if not database or database.startswith(":"):
            raise UserInputError("an SQLite APDB needs a file path (sqlite:///path/apdb.sqlite3)")


def _no_create_url(url: str) -> str:
    """An SQLite URL that fails instead of creating an empty file (as dax_apdb writes them)."""
    if not _is_sqlite(url):
        return url
    parsed = sqlalchemy.make_url(url)
    database = parsed.database or ""
    if database.startswith("file:"):
        return url
    query = dict(parsed.query, mode="rw", uri="true")
    return parsed.set(database=f"file:{database}", query=query).render_as_string(
        hide_password=False
    )


def _cast_validity_end(engine: sqlalchemy.Engine) -> None:
    """Let dax_apdb store DiaObjects in PostgreSQL under pandas 3.

    dax_apdb (30.2026.4100) sets ``validityEndMjdTai`` to an all-``None`` object column before
    ``DataFrame.to_sql``; pandas types such a column as TEXT and SQLAlchemy's psycopg dialect
    binds it as ``%(validityEndMjdTai)s::VARCHAR``, which PostgreSQL refuses for a DOUBLE
    column. Rewrite that one cast (the value is always NULL). SQLite has no bind casts.
    """
    if engine.dialect.name != "postgresql":
        return

    def _fix(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        if "validityEndMjdTai)s::VARCHAR" in statement:
            statement = statement.replace(
                "%(validityEndMjdTai)s::VARCHAR", "%(validityEndMjdTai)s::DOUBLE PRECISION"
            )
        return statement, parameters

    sqlalchemy.event.listen(engine, "before_cursor_execute", _fix, retval=True)


def _has_apdb(url: str, timeout_s: int) -> bool:
    """Whether the database at ``url`` holds an APDB (its metadata table)."""
    args = {"timeout": timeout_s} if _is_sqlite(url) else {"connect_timeout": timeout_s}
    engine = sqlalchemy.create_engine(
        _no_create_url(url), poolclass=sqlalchemy.pool.NullPool, connect_args=args
    )
    try:
        return bool(sqlalchemy.inspect(engine).has_table("metadata"))
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        raise ApdbUnavailableError(f"APDB at {_safe_url(url)}: {_one_line(exc)}") from exc
    finally:
        engine.dispose()


def _sqlite_path(url: str) -> Path | None:
    database = sqlalchemy.make_url(url).database or ""
    if database.startswith("file:"):
        database = database[len("file:") :]
    return Path(database) if database else None


class PromptApdb:
    """One APDB (SQLite or PostgreSQL) as prompt processing uses it.

    Connects lazily: constructing or :meth:`open`-ing never touches the database, so a worker
    can start, and buffer, while the APDB is down.

    Parameters
    ----------
    config
        The dax_apdb SQL configuration.
    buffer
        Where :meth:`store_or_buffer` queues batches while the APDB is unavailable.
    config_path
        The configuration file this came from (for messages).
    """

    def __init__(
        self,
        config: ApdbSqlConfig,
        *,
        buffer: ApdbBuffer | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.buffer = buffer
        self.config_path = config_path
        self._apdb: ApdbSql | None = None
        self._engine: sqlalchemy.Engine | None = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        url: str,
        *,
        config_path: str | Path,
        connection_timeout_s: int = 5,
        buffer: ApdbBuffer | None = None,
    ) -> PromptApdb:
        """Create the APDB schema at ``url`` (or reuse the one there) and write its config.

        Parameters
        ----------
        url
            SQLAlchemy URL: ``sqlite:///path/apdb.sqlite3`` or
            ``postgresql+psycopg://user@host:port/db``.
        config_path
            Where to write the dax_apdb YAML configuration (atomically).
        connection_timeout_s
            Connect timeout (PostgreSQL) or lock wait (SQLite) before the APDB counts as
            unavailable, seconds.
        buffer
            The buffer for :meth:`store_or_buffer` (default: :func:`default_buffer`).

        Raises
        ------
        UserInputError
            ``url`` is not an SQLite file or PostgreSQL URL.
        ApdbUnavailableError
            The database cannot be reached.
        StorageError
            An APDB is there but its schema version is incompatible with this dax_apdb.
        """
        from lsst.dax.apdb import ApdbSql, ApdbSqlConfig
        from lsst.dax.apdb.versionTuple import IncompatibleVersionError

        _check_url(url)
        safe = _safe_url(url)
        sqlite_path = _sqlite_path(url) if _is_sqlite(url) else None
        if sqlite_path is not None:
            try:
                sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ApdbUnavailableError(f"APDB at {safe}: {_one_line(exc)}") from exc
        exists = (
            _has_apdb(url, connection_timeout_s)
            if sqlite_path is None
            else (sqlite_path.exists() and _has_apdb(url, connection_timeout_s))
        )
        if exists:
            config = ApdbSqlConfig(db_url=_no_create_url(url))
            config.connection_config.connection_timeout = connection_timeout_s
            config.connection_config.connection_pool = False
            try:
                # dax_apdb checks the schema and code versions when it opens an APDB.
                config = ApdbSql(config).getConfig().model_copy(deep=True)
            except IncompatibleVersionError as exc:
                raise StorageError(f"APDB at {safe} is incompatible: {exc}") from exc
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
                raise ApdbUnavailableError(f"APDB at {safe}: {_one_line(exc)}") from exc
            _LOG.info("reusing the APDB at %s", safe)
        else:
            try:
                with warnings.catch_warnings():
                    # init_database leaves the pooled connection of its schema-making engine
                    # to the garbage collector; collect it here, where psycopg's "deleted
                    # while still open" ResourceWarning is expected and harmless.
                    warnings.simplefilter("ignore", ResourceWarning)
                    config = ApdbSql.init_database(url, connection_timeout=connection_timeout_s)
                    gc.collect()
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
                raise ApdbUnavailableError(f"APDB at {safe}: {_one_line(exc)}") from exc
            _LOG.info("created the APDB schema at %s", safe)
        config.connection_config.connection_timeout = connection_timeout_s
        config.connection_config.connection_pool = False  # see the module docstring
        path = Path(config_path)
        dump = config.model_dump(mode="json", exclude_defaults=True)
        dump["implementation_type"] = "sql"
        _atomic_write(path, yaml.safe_dump(dump, sort_keys=True).encode())
        return cls(
            config, buffer=buffer if buffer is not None else default_buffer(path), config_path=path
        )

    @classmethod
    def open(cls, config_path: str | Path, *, buffer: ApdbBuffer | None = None) -> PromptApdb:
        """Read a dax_apdb configuration written by :meth:`create` (no connection is made).

        ``buffer`` defaults to :func:`default_buffer` of ``config_path``.

        Raises
        ------
        NotFoundError
            No such file.
        ConfigError
            The file is not a dax_apdb SQL configuration.
        """
        from lsst.dax.apdb import ApdbConfig, ApdbSqlConfig

        path = Path(config_path)
        if not path.is_file():
            raise NotFoundError(f"no APDB configuration at {path}")
        try:
            config = ApdbConfig.from_uri(str(path))
        except Exception as exc:  # dax_apdb raises TypeError/LookupError/ValidationError
            raise ConfigError(f"{path}: not a dax_apdb configuration: {_one_line(exc)}") from exc
        if not isinstance(config, ApdbSqlConfig):
            raise ConfigError(f"{path}: not an SQL APDB ({type(config).__name__})")
        return cls(
            config, buffer=buffer if buffer is not None else default_buffer(path), config_path=path
        )

    # -- connection ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database (an SQLite file's path, or the URL with its password hidden)."""
        if _is_sqlite(self.config.db_url):
            path = _sqlite_path(self.config.db_url)
            return f"sqlite:///{path}"
        return _safe_url(self.config.db_url)

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn database failures into :class:`ApdbUnavailableError` and friends."""
        try:
            yield
        except LdfError:
            raise
        except Exception as exc:
            kind, cause = _classify(exc)
            reason = _one_line(cause)
            if kind == "unavailable":
                self._reset()
                raise ApdbUnavailableError(
                    f"APDB at {self.url} unavailable ({action}): {reason}"
                ) from exc
            if kind == "conflict":
                raise ApdbConflictError(f"APDB at {self.url} refused {action}: {reason}") from exc
            if kind == "no-schema":
                raise StorageError(
                    f"APDB at {self.url} has no table {reason}: create it (PromptApdb.create)"
                ) from exc
            if kind == "incompatible":
                raise StorageError(f"APDB at {self.url} is incompatible: {reason}") from exc
            if kind == "database":
                raise StorageError(f"APDB at {self.url} failed {action}: {reason}") from exc
            raise

    def _reset(self) -> None:
        # dax_apdb's engine runs without a pool (see the module docstring): dropping the
        # instance leaves no connection open.
        self._apdb = None
        if self._engine is not None:
            self._engine.dispose()
        self._engine = None

    def _get(self) -> ApdbSql:
        if self._apdb is None:
            from lsst.dax.apdb import ApdbSql

            with self._guard("open"):
                apdb = ApdbSql(self.config)
            # dax_apdb keeps its engine private; the work-around below needs it.
            _cast_validity_end(apdb._engine)
            self._apdb = apdb
        return self._apdb

    def _sql(self) -> sqlalchemy.Engine:
        """A plain engine for the idempotence checks (no pool: a check is rare)."""
        if self._engine is None:
            timeout = self.config.connection_config.connection_timeout
            args: dict[str, Any] = {}
            if timeout is not None:
                key = "timeout" if _is_sqlite(self.config.db_url) else "connect_timeout"
                args[key] = timeout if _is_sqlite(self.config.db_url) else int(timeout)
            self._engine = sqlalchemy.create_engine(
                self.config.db_url, poolclass=sqlalchemy.pool.NullPool, connect_args=args
            )
        return self._engine

    def _table(self, name: str, *columns: str) -> sqlalchemy.TableClause:
        return sqlalchemy.table(
            self.config.prefix + name,
            *(sqlalchemy.column(c) for c in columns),
            schema=self.config.namespace,
        )

    def close(self) -> None:
        """Release database connections (the object stays usable; it reconnects)."""
        self._reset()

    # -- reading -------------------------------------------------------------------------

    def load_history(
        self,
        ra: float,
        dec: float,
        radius_deg: float,
        visit_time: Time,
        *,
        history_days: float = HISTORY_DAYS,
    ) -> ApdbHistory:
        """DiaObjects in a circle and their recent DiaSources and DiaForcedSources.

        Parameters
        ----------
        ra, dec
            Circle centre (ICRS), degrees — e.g. the detector centre.
        radius_deg
            Circle radius, degrees — the detector's half-diagonal plus a margin.
        visit_time
            The visit (mid-exposure, as stored in ``midpointMjdTai``).
        history_days
            History window before ``visit_time``, days.

        Returns
        -------
        ApdbHistory
            ``(objects, sources, forced)``; empty frames (with the APDB columns) when
            nothing is there.

        Raises
        ------
        ApdbUnavailableError
            The APDB cannot be reached.
        """
        from lsst.sphgeom import Angle, Circle, LonLat, UnitVector3d

        if not (np.isfinite(ra) and np.isfinite(dec) and -90.0 <= dec <= 90.0):
            raise UserInputError(f"not a sky position: ra={ra}, dec={dec}")
        if not (0.0 < radius_deg < 90.0):
            raise UserInputError(f"history radius must be in (0, 90) degrees, got {radius_deg}")
        region = Circle(UnitVector3d(LonLat.fromDegrees(ra, dec)), Angle.fromDegrees(radius_deg))
        start = visit_time - TimeDelta(history_days, format="jd")
        visit_mjd = float(visit_time.tai.mjd)
        apdb = self._get()
        with self._guard("read"):
            objects = apdb.getDiaObjects(region)
            objects = objects[_within(objects, ra, dec, radius_deg)].reset_index(drop=True)
            ids = [int(i) for i in objects["diaObjectId"]]
            sources = apdb.getDiaSources(region, ids, visit_time, start_time=start)
            forced = apdb.getDiaForcedSources(region, ids, visit_time, start_time=start)
        assert sources is not None
        assert forced is not None
        sources = sources[sources["midpointMjdTai"] < visit_mjd].reset_index(drop=True)
        forced = forced[forced["midpointMjdTai"] < visit_mjd].reset_index(drop=True)
        return ApdbHistory(objects, sources, forced)

    def counts(self) -> dict[str, int]:
        """Rows per table (DiaObject counts every version), plus ``buffered`` batches.

        Raises
        ------
        ApdbUnavailableError
            The APDB cannot be reached.
        """
        apdb = self._get()
        with self._guard("count"):
            out = dict(apdb.tableRowCount())
        out["buffered"] = len(self.buffer) if self.buffer is not None else 0
        return out

    def visit_sources(self, visits: Sequence[int]) -> pd.DataFrame:
        """The DiaSources of some visits (visit, detector, ra, dec, psfFlux, snr, diaObjectId):
        the night's reports and validation read them back from the APDB.

        Raises
        ------
        ApdbUnavailableError
            The APDB cannot be reached.
        """
        cols = ["visit", "detector", "ra", "dec", "psfFlux", "psfFluxErr", "snr", "diaObjectId"]
        if not visits:
            return pd.DataFrame(columns=cols)
        table = sqlalchemy.table("DiaSource", *(sqlalchemy.column(c) for c in cols))
        query = sqlalchemy.select(table).where(table.c.visit.in_([int(v) for v in visits]))
        with self._guard("read"), self._sql().connect() as conn:
            return pd.DataFrame(conn.execute(query).all(), columns=cols)

    def contains(self, visit: int, detector: int) -> bool:
        """Whether DiaSources or DiaForcedSources of this detector-visit are stored."""
        apdb = self._get()
        with self._guard("read"):
            return bool(apdb.containsVisitDetector(int(visit), int(detector)))

    # -- writing -------------------------------------------------------------------------

    def _prepare(self, frame: pd.DataFrame, table: str, visit_time: Time) -> pd.DataFrame:
        """Only the table's columns; the non-nullable ones present and filled."""
        columns = apdb_columns(table, self.config.schema_file)
        known = {c.name for c in columns}
        out = frame.reset_index(drop=True)
        # Columns that are all null are left to the database default (NULL): pandas would
        # bind them as text, which PostgreSQL refuses for a numeric or boolean column.
        keep = [c for c in out.columns if c in known and not (len(out) and out[c].isna().all())]
        out = out[keep].copy()
        if table == "DiaObject":
            # dax_apdb fills these itself from visit_time (see _store_prepared).
            out = out.drop(columns=["validityStartMjdTai", "validityEndMjdTai"], errors="ignore")
        problems = []
        for col in columns:
            if col.nullable or col.value is not None or col.name.startswith("validity"):
                continue
            if col.name not in out.columns:
                problems.append(f"{col.name} missing")
            elif len(out) and bool(out[col.name].isna().any()):
                problems.append(f"{col.name} has nulls")
        if problems:
            raise UserInputError(f"{table} rows not storable: " + ", ".join(problems))
        return out

    def _prepare_all(
        self,
        visit_time: Time,
        objects: pd.DataFrame,
        sources: pd.DataFrame | None,
        forced: pd.DataFrame | None,
    ) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
        return (
            self._prepare(objects, "DiaObject", visit_time),
            None if sources is None else self._prepare(sources, "DiaSource", visit_time),
            None if forced is None else self._prepare(forced, "DiaForcedSource", visit_time),
        )

    def store(
        self,
        visit_time: Time,
        objects: pd.DataFrame,
        sources: pd.DataFrame | None,
        forced: pd.DataFrame | None = None,
    ) -> None:
        """Store one detector-visit in one transaction (all of it or none of it).

        Parameters
        ----------
        visit_time
            The visit time; becomes the new DiaObject versions' ``validityStartMjdTai``.
        objects
            New and updated DiaObjects (every non-nullable column filled).
        sources, forced
            The visit's DiaSources (with ``diaObjectId``) and DiaForcedSources. Columns that
            are not in the APDB schema are not stored.

        Raises
        ------
        UserInputError
            A non-nullable APDB column is missing or null.
        ApdbUnavailableError
            The APDB cannot be reached: nothing was stored.
        ApdbConflictError
            Some rows are already stored (same keys): nothing was stored.
        """
        objs, srcs, frcd = self._prepare_all(visit_time, objects, sources, forced)
        self._store_prepared(visit_time, objs, srcs, frcd)

    def _store_prepared(
        self,
        visit_time: Time,
        objects: pd.DataFrame,
        sources: pd.DataFrame | None,
        forced: pd.DataFrame | None,
    ) -> None:
        apdb = self._get()
        with self._guard("store"), warnings.catch_warnings():
            # dax_apdb adds the validity columns with DataFrame.set_index(inplace=True),
            # deprecated in pandas 3.1 (PDEP-8). Passing the columns instead is worse: the
            # all-None validityEnd column then goes to PostgreSQL as VARCHAR and is refused.
            warnings.filterwarnings(
                "ignore", message="The inplace keyword", category=pd.errors.Pandas4Warning
            )
            apdb.store(visit_time, objects, sources, forced)

    def store_or_buffer(
        self,
        visit_time: Time,
        objects: pd.DataFrame,
        sources: pd.DataFrame | None,
        forced: pd.DataFrame | None = None,
        *,
        visit: int | None = None,
        detector: int | None = None,
    ) -> StoreOutcome:
        """Store one detector-visit, or queue it in the buffer if the APDB is unavailable.

        While earlier batches are queued and cannot be flushed (the APDB is still away, or a
        queued batch conflicts with the APDB — logged as an error for an operator), this one
        queues behind them, so the APDB sees detector-visits in order.

        Parameters
        ----------
        visit_time, objects, sources, forced
            As for :meth:`store`.
        visit, detector
            The detector-visit (default: from the ``visit``/``detector`` columns of
            ``sources`` or ``forced``).

        Returns
        -------
        str
            ``'stored'``, ``'buffered'`` or ``'already-stored'`` (the same DiaSources are in
            the APDB already: a re-run).

        Raises
        ------
        StateError
            No buffer was configured.
        UserInputError
            The batch is not storable (it is not buffered either: it would never store).
        StorageError
            The buffer itself could not be written: the DiaSources are not safe.
        """
        if self.buffer is None:
            from ldf.errors import StateError

            raise StateError("store_or_buffer needs an ApdbBuffer (PromptApdb(buffer=...))")
        key = _batch_key(sources, forced, visit, detector)
        objs, srcs, frcd = self._prepare_all(visit_time, objects, sources, forced)
        if len(self.buffer):
            try:
                report = self.flush()
            except StorageError as exc:  # a queued batch conflicts: an operator must look
                _LOG.error("APDB buffer %s cannot be flushed: %s", self.buffer.path, exc)
                report = FlushReport(0, 0, len(self.buffer))
            if report.remaining:
                self.buffer.append(*key, visit_time, objs, srcs, frcd, reason="queued behind")
                return "buffered"
        try:
            self._store_prepared(visit_time, objs, srcs, frcd)
        except ApdbUnavailableError as exc:
            _LOG.warning("buffering visit %s detector %s: %s", key[0], key[1], exc)
            self.buffer.append(*key, visit_time, objs, srcs, frcd, reason=str(exc))
            return "buffered"
        except ApdbConflictError:
            if self._already_stored(key, visit_time, objs, srcs, frcd):
                return "already-stored"
            raise
        return "stored"

    def flush(self) -> FlushReport:
        """Replay the buffered batches in order, as far as the APDB allows.

        Idempotent: a batch already in the APDB (same ``diaSourceId``; for a batch without
        DiaSources, the same detector-visit's forced sources or DiaObject versions) is
        dropped from the queue without storing it again.

        Returns
        -------
        FlushReport
            Batches stored, skipped as already stored, and still queued.

        Raises
        ------
        StorageError
            A batch conflicts with what the APDB holds (some but not all of its DiaSources
            are there): it stays queued for an operator.
        """
        if self.buffer is None:
            return FlushReport(0, 0, 0)
        stored = skipped = 0
        for batch in self.buffer.batches():
            key = (batch.visit, batch.detector)
            try:
                if self._already_stored(
                    key, batch.visit_time, batch.objects, batch.sources, batch.forced
                ):
                    skipped += 1
                else:
                    self._store_prepared(
                        batch.visit_time, batch.objects, batch.sources, batch.forced
                    )
                    stored += 1
            except ApdbUnavailableError as exc:
                _LOG.warning("APDB flush stopped: %s", exc)
                break
            self.buffer.remove(batch.seq)
        return FlushReport(stored, skipped, len(self.buffer))

    def _already_stored(
        self,
        key: tuple[int, int],
        visit_time: Time,
        objects: pd.DataFrame,
        sources: pd.DataFrame | None,
        forced: pd.DataFrame | None,
    ) -> bool:
        """Whether this batch is in the APDB (all of it); raises if only part of it is."""
        engine = self._sql()
        with self._guard("check"), engine.connect() as conn:
            if sources is not None and len(sources):
                ids = sorted({int(i) for i in sources["diaSourceId"]})
                table = self._table("DiaSource", "diaSourceId")
                found = 0
                for start in range(0, len(ids), 1000):
                    chunk = ids[start : start + 1000]
                    query = (
                        sqlalchemy.select(sqlalchemy.func.count())
                        .select_from(table)
                        .where(table.c.diaSourceId.in_(chunk))
                    )
                    found += int(conn.execute(query).scalar_one())
                if found and found != len(ids):
                    raise StorageError(
                        f"visit {key[0]} detector {key[1]}: {found} of {len(ids)} DiaSources "
                        f"are already in the APDB at {self.url}; resolve by hand"
                    )
                return found == len(ids)
            if forced is not None and len(forced):
                table = self._table("DiaForcedSource", "visit", "detector")
                query = (
                    sqlalchemy.select(sqlalchemy.func.count())
                    .select_from(table)
                    .where(table.c.visit == key[0], table.c.detector == key[1])
                )
                return int(conn.execute(query).scalar_one()) > 0
            if len(objects):
                ids = sorted({int(i) for i in objects["diaObjectId"]})[:1000]
                table = self._table("DiaObject", "diaObjectId", "validityStartMjdTai")
                mjd = float(visit_time.tai.mjd)
                query = (
                    sqlalchemy.select(sqlalchemy.func.count())
                    .select_from(table)
                    .where(
                        table.c.diaObjectId.in_(ids),
                        table.c.validityStartMjdTai.between(mjd - 1e-9, mjd + 1e-9),
                    )
                )
                return int(conn.execute(query).scalar_one()) > 0
        return True  # an empty batch is trivially stored


def _classify(exc: BaseException) -> tuple[str, BaseException]:
    """What a database failure means, looking through pandas' wrapping of it."""
    from lsst.dax.apdb.versionTuple import IncompatibleVersionError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.NoSuchTableError):
            return "no-schema", seen
        if isinstance(seen, IncompatibleVersionError):
            return "incompatible", seen
        if isinstance(seen, sqlalchemy.exc.IntegrityError | sqlite3.IntegrityError):
            return "conflict", seen
        if isinstance(
            seen,
            sqlalchemy.exc.OperationalError
            | sqlalchemy.exc.InterfaceError
            | sqlalchemy.exc.TimeoutError
            | sqlite3.OperationalError,
        ):
            return "unavailable", seen
        if isinstance(seen, sqlalchemy.exc.DBAPIError):
            return ("unavailable" if seen.connection_invalidated else "database"), seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, pd.errors.DatabaseError):
        return "database", exc
    if isinstance(exc, OSError):
        return "unavailable", exc
    return "other", exc


def _batch_key(
    sources: pd.DataFrame | None,
    forced: pd.DataFrame | None,
    visit: int | None,
    detector: int | None,
) -> tuple[int, int]:
    if visit is not None and detector is not None:
        return int(visit), int(detector)
    for frame in (sources, forced):
        if frame is not None and len(frame) and {"visit", "detector"} <= set(frame.columns):
            visits = pd.unique(frame["visit"])
            detectors = pd.unique(frame["detector"])
            if len(visits) != 1 or len(detectors) != 1:
                raise UserInputError(
                    "a batch is one detector-visit; got visits "
                    f"{sorted(int(v) for v in visits)} and detectors "
                    f"{sorted(int(d) for d in detectors)}"
                )
            return int(visits[0]), int(detectors[0])
    raise UserInputError("batch without DiaSources or DiaForcedSources: pass visit= and detector=")


def _within(objects: pd.DataFrame, ra: float, dec: float, radius_deg: float) -> np.ndarray:
    """Exact circle cut (dax_apdb returns a superset: the HTM envelope)."""
    if not len(objects):
        return np.zeros(0, bool)
    ra1 = np.radians(objects["ra"].to_numpy(np.float64))
    dec1 = np.radians(objects["dec"].to_numpy(np.float64))
    ra0, dec0 = np.radians(ra), np.radians(dec)
    # Haversine: well conditioned at the small separations of a detector.
    hav = (
        np.sin((dec1 - dec0) / 2) ** 2 + np.cos(dec0) * np.cos(dec1) * np.sin((ra1 - ra0) / 2) ** 2
    )
    sep = 2 * np.arcsin(np.sqrt(np.clip(hav, 0.0, 1.0)))
    return np.asarray(sep <= np.radians(radius_deg))
