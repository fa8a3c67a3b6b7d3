"""Where the scale-out engines the tests use are, and what to do when one is missing.

A test of a scale-out backend skips with a reason when its engine is unreachable, except
under ``LDF_REQUIRE_ENGINES=1`` (set by ``.ci/run``), where it fails: CI always tests them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

NATS_URL = os.environ.get("LDF_TEST_NATS_URL", "nats://127.0.0.1:4222")
"""The NATS JetStream server the nats-marked tests use."""


def _reachable(url: str, default_port: int) -> bool:
    parts = urlparse(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require_nats() -> None:
    """Skip (or fail, with LDF_REQUIRE_ENGINES=1) when the NATS server is unreachable."""
    if _reachable(NATS_URL, 4222):
        return
    reason = f"NATS server not reachable at {NATS_URL}"
    if os.environ.get("LDF_REQUIRE_ENGINES") == "1":
        pytest.fail(reason + " (LDF_REQUIRE_ENGINES=1)")
    pytest.skip(reason)


POSTGRES_URL = os.environ.get(
    "LDF_TEST_POSTGRES_URL", "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres"
)
"""The PostgreSQL server the postgres-marked tests use (an administrative database on it)."""


def require_postgres() -> None:
    """Skip (or fail, with LDF_REQUIRE_ENGINES=1) when the PostgreSQL server is unreachable."""
    if _reachable(POSTGRES_URL, 5432):
        return
    reason = f"PostgreSQL server not reachable at {urlparse(POSTGRES_URL).netloc.split('@')[-1]}"
    if os.environ.get("LDF_REQUIRE_ENGINES") == "1":
        pytest.fail(reason + " (LDF_REQUIRE_ENGINES=1)")
    pytest.skip(reason)


def _conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def scratch_postgres(extensions: tuple[str, ...] = ()) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL."""
    require_postgres()
    import psycopg

    name = f"ldf_test_{secrets.token_hex(6)}"
    admin = _conninfo(POSTGRES_URL)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        if extensions:
            with psycopg.connect(_conninfo(url), autocommit=True) as conn:
                for ext in extensions:
                    conn.execute(f'CREATE EXTENSION IF NOT EXISTS "{ext}"')
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
