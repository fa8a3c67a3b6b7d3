"""Shared fixtures: every test gets its own LDF_HOME and no stray LDF_* settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for key in list(os.environ):
        if key.startswith("LDF_") and key != "LDF_REQUIRE_ENGINES":
            monkeypatch.delenv(key)
    home = tmp_path / "ldf-home"
    monkeypatch.setenv("LDF_HOME", str(home))
    return home


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); skips when the server is absent."""
    from tests.engines import scratch_postgres

    with scratch_postgres() as url:
        yield url
