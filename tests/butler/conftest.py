"""Fixtures of the Butler tests: tiny raw files and a repository on SQLite or PostgreSQL.

The PostgreSQL server and scratch databases come from ``tests/engines.py``.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.butler.rawfiles import DAY_OBS, WriteRaw, amp_pixels, raw_header
from tests.engines import POSTGRES_URL, require_postgres, scratch_postgres

from ldf.butler import ButlerRepo, RawImage, RawRecord
from ldf.sim.models import obs_id


def _psycopg_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _admin_execute(*statements: str) -> None:
    import psycopg

    with psycopg.connect(_psycopg_conninfo(POSTGRES_URL), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _database_url(name: str) -> str:
    return POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh, empty PostgreSQL database with ``btree_gist``, dropped afterwards (its URL)."""
    with scratch_postgres(("btree_gist",)) as url:
        yield url


# Creating a repository and registering 205 detectors takes 0.5 s on SQLite and 1.5-3 s on
# PostgreSQL, so each engine's repository is created once per session (by ButlerRepo.create,
# which is under test) and every test gets its own copy: the SQLite directory copied, the
# PostgreSQL database cloned with CREATE DATABASE ... TEMPLATE.


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository on SQLite with both instruments, to copy."""
    root = tmp_path_factory.mktemp("template") / "repo"
    ButlerRepo.create(root).close()
    return root


@pytest.fixture(scope="session")
def postgres_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A repository on PostgreSQL with both instruments: its root and database name."""
    require_postgres()
    name = f"ldf_tmpl_{secrets.token_hex(6)}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    try:
        import psycopg

        with psycopg.connect(_psycopg_conninfo(_database_url(name)), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
        root = tmp_path_factory.mktemp("pg-template") / "repo"
        ButlerRepo.create(root, db_url=_database_url(name)).close()
        yield root, name
    finally:
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def repo_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A new repository's root directory with both instruments registered, on each engine."""
    root = tmp_path / "repo"
    if request.param == "sqlite":
        shutil.copytree(request.getfixturevalue("sqlite_template"), root)
        yield root
        return
    template_root, template_db = request.getfixturevalue("postgres_template")
    name = f"ldf_test_{secrets.token_hex(6)}"
    _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        shutil.copytree(template_root, root)
        config = yaml.safe_load((root / "butler.yaml").read_text())
        config["registry"]["db"] = _database_url(name)
        (root / "butler.yaml").write_text(yaml.safe_dump(config))
        yield root
    finally:
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def repo(repo_root: Path) -> Iterator[ButlerRepo]:
    """The repository of ``repo_root``, open for writing."""
    with ButlerRepo.open(repo_root) as r:
        yield r


@pytest.fixture
def write_raw(tmp_path: Path) -> WriteRaw:
    """Write a tiny raw MEF FITS file (4 amplifiers) and return its path."""

    def write(
        seq_num: int,
        detector: str,
        *,
        instrument: str = "LSSTCam",
        day_obs: int = DAY_OBS,
        directory: Path | None = None,
        **extra: object,
    ) -> Path:
        directory = directory or tmp_path / "raws"
        directory.mkdir(parents=True, exist_ok=True)
        raw = RawImage(metadata=raw_header(instrument, day_obs, seq_num, detector, **extra))
        for i, amp in enumerate(("C10", "C11", "C12", "C13")):
            raw.amplifiers[amp] = amp_pixels(seq_num, detector, i)
        path = directory / f"{obs_id(instrument, day_obs, seq_num)}_{detector}.fits"
        raw.writeto(path, overwrite=True)
        return path

    return write


@pytest.fixture
def four_raws(write_raw: WriteRaw) -> list[RawRecord]:
    """Records of 2 exposures × 2 detectors of LSSTCam."""
    return [
        RawRecord.from_file(write_raw(seq, det)) for seq in (1, 2) for det in ("R22_S11", "R22_S12")
    ]
