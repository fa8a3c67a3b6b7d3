"""Fixtures of the Backbone tests: a Backbone on each catalog engine, files to ingest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ldf.backbone.service import Backbone
from ldf.config import load_settings


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The catalog database: SQLite in tmp_path, or a scratch PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
        return
    from tests.engines import scratch_postgres

    with scratch_postgres() as url:
        yield url


BackboneFactory = Callable[..., Backbone]


@pytest.fixture
def make_backbone(tmp_path: Path, catalog_url: str) -> Iterator[BackboneFactory]:
    """Build Backbones on one catalog (several stand for several processes)."""
    made: list[Backbone] = []

    def make(**policy: Any) -> Backbone:
        backbone = {"dark_grace_s": 0, "retry_base_s": 0.01, "butler": False, **policy}
        settings = load_settings(
            home=tmp_path / "home",
            databases={"catalog": catalog_url},
            policies={"backbone": backbone},
        )
        bb = Backbone.open(settings)
        made.append(bb)
        return bb

    yield make
    for bb in made:
        bb.close()


@pytest.fixture
def bb(make_backbone: BackboneFactory) -> Backbone:
    """One Backbone over the default sites (summit, base, archive with tape, dr)."""
    return make_backbone()


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a source file with deterministic content."""
    src = tmp_path / "src"
    src.mkdir()

    def make(name: str, size: int = 10_000, seed: int = 0) -> Path:
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes((i * 31 + seed) % 251 for i in range(size)))
        return path

    return make
