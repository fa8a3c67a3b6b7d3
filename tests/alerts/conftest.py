"""Alert distribution fixtures: a service on SQLite or PostgreSQL, and synthetic packets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

from ldf.alerts.auth import Credentials, Role
from ldf.alerts.daemon import ServerThread
from ldf.alerts.service import AlertService
from ldf.alerts.storage import AlertStore
from ldf.alerts.synthetic import make_packets

VISIT = 2026112200011
"""A visit id (exposure id) the tests use."""


@lru_cache(maxsize=16)
def packets(visit: int, count: int, start: int = 0) -> tuple[bytes, ...]:
    """Small synthetic packets (cached: serializing costs more than the tests)."""
    return tuple(make_packets(visit, count, start=start, n_previous=2, cutout_side=30))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL on each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'alerts.sqlite3'}"
    else:
        from tests.engines import scratch_postgres

        with scratch_postgres() as url:
            yield url


@pytest.fixture
def service(store_url: str, tmp_path: Path) -> Iterator[AlertService]:
    """An alert service on each engine."""
    svc = AlertService(AlertStore.open(store_url), tmp_path / "alerts")
    yield svc
    svc.close()


@dataclass
class Served:
    """An alert service served over HTTP, with a producer, two brokers and an operator."""

    service: AlertService
    url: str
    tokens: dict[str, str]
    credentials: Credentials


@pytest.fixture
def served(service: AlertService, tmp_path: Path) -> Iterator[Served]:
    """The service over HTTP (on each engine) with credentials for prompt, fink, lasair, ops."""
    creds = Credentials(tmp_path / "secrets" / "creds.yaml")
    tokens = {
        "prompt": creds.add("prompt", Role.PRODUCER),
        "fink": creds.add("fink", Role.BROKER),
        "lasair": creds.add("lasair", Role.BROKER),
        "ops": creds.add("ops", Role.OPERATOR),
    }
    with ServerThread(service, creds, background=False) as server:
        yield Served(service, server.url, tokens, creds)
