"""Snapshots of designated database tables, for replication between sites (LDM-230 5.1).

The Data Backbone replicates files and also a few designated database tables (catalogs of
the backbone itself, registries). A table snapshot is one file — a SQLite database, or a
PostgreSQL custom-format dump — that is then replicated like any other file and restored at
the receiving site. Snapshots are consistent while writers keep writing, and appear under
their final name only when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ldf.errors import NotFoundError, StorageError, TransportError, UserInputError

__all__ = [
    "dump_postgres",
    "replicate_table_snapshot",
    "restore_postgres",
    "snapshot_sqlite",
]

_TEMP_PREFIX = ".tmp-"
_CONNECT_FAILURES = (
    "could not connect",
    "connection refused",
    "could not translate host",
    "timeout expired",
    "no route to host",
    "network is unreachable",
)
"""Phrases of libpq errors that mean the server was not reached (not that it refused us)."""
_FALLBACK_BIN = Path("/usr/bin")
"""Where the PostgreSQL client tools are looked for when they are not on PATH."""


def _temp_for(dest: Path) -> Path:
    return dest.with_name(f"{_TEMP_PREFIX}{dest.name}-{uuid.uuid4().hex}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temp: Path, dest: Path) -> None:
    """Flush ``temp`` to disk and rename it to ``dest`` (replacing an older snapshot)."""
    _fsync_file(temp)
    temp.replace(dest)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def snapshot_sqlite(source: Path, dest: Path, *, tables: list[str] | None = None) -> Path:
    """Write a consistent copy of the SQLite database ``source`` to ``dest``.

    Uses SQLite's online backup API in one step, so the copy is one committed state of the
    database even while other connections write to it. The copy is written under a temp name
    and renamed, and is a self-contained file (rollback journal, not WAL).

    Parameters
    ----------
    source
        Database file to copy.
    dest
        File to write (replaced if it exists).
    tables
        Keep only these tables in the copy (default: the whole database).

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    NotFoundError
        ``source`` does not exist, or a table in ``tables`` does not.
    StorageError
        SQLite or the filesystem failed.
    """
    if not Path(source).is_file():
        raise NotFoundError(f"cannot snapshot {source}: no such database file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_for(dest)
    try:
        src = sqlite3.connect(f"{Path(source).absolute().as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(temp)
            try:
                src.backup(dst)  # pages=-1: all in one step, one consistent state
                if tables is not None:
                    _keep_only(dst, tables, source)
                dst.execute("PRAGMA journal_mode=DELETE")
                dst.commit()
            finally:
                dst.close()
        finally:
            src.close()
        _publish(temp, dest)
    except sqlite3.Error as exc:
        _remove(temp)
        raise StorageError(f"cannot snapshot {source}: {exc}") from exc
    except BaseException:
        _remove(temp)
        raise
    return dest


def _keep_only(db: sqlite3.Connection, tables: list[str], source: Path) -> None:
    present = {
        r[0]
        for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    missing = sorted(set(tables) - present)
    if missing:
        raise NotFoundError(f"cannot snapshot {source}: no table(s) {', '.join(missing)}")
    for kind in ("view", "table"):
        names = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = ? AND name NOT LIKE 'sqlite_%'",
                (kind,),
            )
        ]
        for name in names:
            if kind == "view" or name not in tables:
                quoted = '"' + name.replace('"', '""') + '"'
                db.execute(f"DROP {kind.upper()} {quoted}")
    db.commit()
    db.execute("VACUUM")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise UserInputError(f"not a database URL: {exc}") from exc


def _libpq(url: str) -> tuple[str, dict[str, str], str]:
    """Split a SQLAlchemy PostgreSQL URL into (libpq URI without password, env, safe text)."""
    parsed = _parse_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise UserInputError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
    env = dict(os.environ)
    if parsed.password is not None:
        # Through the environment, not the command line, where `ps` would show it.
        env["PGPASSWORD"] = str(parsed.password)
    plain = parsed.set(drivername="postgresql", password=None)
    return (
        plain.render_as_string(hide_password=False),
        env,
        parsed.render_as_string(hide_password=True),
    )


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None and (_FALLBACK_BIN / name).is_file():
        found = str(_FALLBACK_BIN / name)  # PATH may be trimmed (systemd units, cron)
    if found is None:
        raise StorageError(f"{name} not found; install the PostgreSQL client tools")
    return found


def _run(cmd: list[str], env: dict[str, str], what: str, timeout_s: float | None) -> None:
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise TransportError(f"{what} timed out after {timeout_s} s") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        # libpq adds hints after the error line ("Is the server running…?"); show the error.
        errors = [ln for ln in lines if "error:" in ln]
        last = (errors or lines or [f"exit status {proc.returncode}"])[-1]
        text = proc.stderr.lower()
        error = TransportError if any(s in text for s in _CONNECT_FAILURES) else StorageError
        raise error(f"{what} failed: {last}")


def dump_postgres(
    url: str,
    dest: Path,
    *,
    tables: list[str] | None = None,
    schema: str | None = None,
    timeout_s: float | None = None,
) -> Path:
    """Dump a PostgreSQL database (or some of its tables) with ``pg_dump -Fc``.

    ``pg_dump`` takes a consistent snapshot even while others write. The dump is written under
    a temp name and renamed to ``dest``.

    Parameters
    ----------
    url
        SQLAlchemy or libpq URL of the database (``postgresql[+driver]://…``).
    dest
        File to write (replaced if it exists).
    tables
        Tables to dump (``pg_dump -t`` patterns); default: all. Qualified by ``schema``
        when given and not already qualified.
    schema
        Schema to dump (``pg_dump -n``).
    timeout_s
        Give up after this many seconds.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    TransportError
        The server could not be reached.
    StorageError
        ``pg_dump`` is missing or failed (its last line of error output is in the message).
    """
    conninfo, env, safe = _libpq(url)
    cmd = [_tool("pg_dump"), "--format=custom", f"--dbname={conninfo}"]
    if tables:
        for table in tables:
            qualified = f"{schema}.{table}" if schema and "." not in table else table
            cmd.append(f"--table={qualified}")
    elif schema:
        cmd.append(f"--schema={schema}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_for(dest)
    cmd.append(f"--file={temp}")
    try:
        _run(cmd, env, f"pg_dump of {safe}", timeout_s)
        _publish(temp, dest)
    except BaseException:
        _remove(temp)
        raise
    return dest


def restore_postgres(
    dump: Path, url: str, *, clean: bool = True, timeout_s: float | None = None
) -> None:
    """Restore a ``pg_dump -Fc`` file into the database at ``url``, in one transaction.

    Ownership and privileges are not restored: roles differ between sites.

    Parameters
    ----------
    dump
        Custom-format dump file.
    url
        SQLAlchemy or libpq URL of the target database (which must exist).
    clean
        Drop the dumped objects before recreating them (``--clean --if-exists``).
    timeout_s
        Give up after this many seconds.

    Raises
    ------
    NotFoundError
        ``dump`` does not exist.
    TransportError
        The server could not be reached.
    StorageError
        ``pg_restore`` is missing or failed; nothing was changed (single transaction).
    """
    if not Path(dump).is_file():
        raise NotFoundError(f"cannot restore {dump}: no such file")
    conninfo, env, safe = _libpq(url)
    cmd = [
        _tool("pg_restore"),
        f"--dbname={conninfo}",
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        "--no-privileges",
    ]
    if clean:
        cmd += ["--clean", "--if-exists"]
    cmd.append(str(dump))
    _run(cmd, env, f"pg_restore of {dump} into {safe}", timeout_s)


def replicate_table_snapshot(url: str, dest_dir: Path, *, tables: list[str] | None = None) -> Path:
    """Snapshot the database at ``url`` into a new file in ``dest_dir``; return its path.

    SQLite databases are copied with `snapshot_sqlite` (``<name>-<UTC time>.sqlite3``),
    PostgreSQL ones dumped with `dump_postgres` (``<name>-<UTC time>.pgdump``).

    Raises
    ------
    UserInputError
        The URL names another engine, or an in-memory SQLite database.
    """
    parsed = _parse_url(url)
    backend = parsed.get_backend_name()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise UserInputError("cannot snapshot an in-memory SQLite database")
        source = Path(parsed.database)
        return snapshot_sqlite(source, dest_dir / f"{source.stem}-{stamp}.sqlite3", tables=tables)
    if backend == "postgresql":
        name = parsed.database or "postgres"
        return dump_postgres(url, dest_dir / f"{name}-{stamp}.pgdump", tables=tables)
    raise UserInputError(
        f"cannot snapshot tables of a '{backend}' database; supported: sqlite, postgresql"
    )
