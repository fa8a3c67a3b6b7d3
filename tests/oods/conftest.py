"""Fixtures of the OODS tests: an OODS in a temporary home, tiny raws written into its tree."""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tests.butler.rawfiles import DAY_OBS, amp_pixels, exp_id, raw_header

from ldf.butler import ButlerRepo, RawImage
from ldf.config import load_settings
from ldf.oods.models import OodsEntry
from ldf.oods.service import Oods
from ldf.oods.tokens import ensure_token_file
from ldf.sim.models import obs_id

TOKEN = "test-token-0123456789"
"""The bearer token the HTTP tests use."""

AddRaw = Callable[..., OodsEntry]
"""The ``add_raw`` fixture: ``(seq_num, detector, *, instrument, day_obs, arrived_at, ...)``."""


@pytest.fixture(scope="session")
def butler_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OODS Butler repository with both instruments registered, to copy (0.5 s to make)."""
    root = tmp_path_factory.mktemp("oods-template") / "repo"
    ButlerRepo.create(root).close()
    return root


def install_butler(template: Path, home: Path) -> None:
    """Put a copy of the template where the OODS of ``home`` keeps its Butler."""
    shutil.copytree(template, home / "oods-butler")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def index_databases(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The OODS index on each engine: SQLite under the home, or a scratch PostgreSQL database."""
    if request.param == "sqlite":
        yield {}
        return
    from tests.engines import scratch_postgres

    with scratch_postgres() as url:
        yield {"oods": url}


@pytest.fixture
def make_oods(
    tmp_path: Path, butler_template: Path, index_databases: dict[str, str]
) -> Iterator[Callable[..., Oods]]:
    """Build OODS instances over one home (several stand for several processes)."""
    home = tmp_path / "home"
    install_butler(butler_template, home)
    made: list[Oods] = []

    def make(**policy: Any) -> Oods:
        settings = load_settings(home=home, databases=index_databases, policies={"oods": policy})
        oods = Oods.open(settings)
        made.append(oods)
        return oods

    yield make
    for o in made:
        o.close()


@pytest.fixture
def oods(make_oods: Callable[..., Oods]) -> Oods:
    """An OODS keeping raws 7 days, LATISS raws 2 days; its token file holds `TOKEN`."""
    o = make_oods(retention_days={"raw": 7.0, "LATISS/raw": 2.0})
    o.token_path.parent.mkdir(parents=True, exist_ok=True)
    o.token_path.write_text(f"# tokens\n{TOKEN}\n\nother-token\n")
    assert not ensure_token_file(o.token_path)
    return o


def write_raw(
    oods: Oods, seq: int, detector: str, *, instrument: str = "LSSTCam", day_obs: int = DAY_OBS
) -> dict[str, Any]:
    """Write a tiny raw at its place in the OODS tree, as the archiver does; the add() keywords."""
    oid = obs_id(instrument, day_obs, seq)
    path = oods.path_for(instrument, day_obs, oid, detector)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = RawImage(metadata=raw_header(instrument, day_obs, seq, detector))
    for i, amp in enumerate(("C10", "C11")):
        raw.amplifiers[amp] = amp_pixels(seq, detector, i)
    raw.writeto(path, overwrite=True)
    data = path.read_bytes()
    return {
        "path": path,
        "instrument": instrument,
        "day_obs": day_obs,
        "obs_id": oid,
        "exposure_id": exp_id(seq, day_obs),
        "detector": detector,
        "obs_type": "science",
        "size": len(data),
        "checksum": f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
    }


@pytest.fixture
def add_raw(oods: Oods) -> AddRaw:
    """Write a raw into the tree and add it to the OODS."""

    def add(
        seq: int,
        detector: str = "R22_S11",
        *,
        instrument: str = "LSSTCam",
        day_obs: int = DAY_OBS,
        arrived_at: datetime | None = None,
    ) -> OodsEntry:
        kw = write_raw(oods, seq, detector, instrument=instrument, day_obs=day_obs)
        return oods.add(kw.pop("path"), arrived_at=arrived_at, **kw)

    return add
