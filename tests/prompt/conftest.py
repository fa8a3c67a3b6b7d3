"""A seeded facility for Prompt Processing tests: calibs, refcat, templates, APDB.

Seeding (simulating the template visits and building masters and templates) takes ~15 s, so
it is done once per session into a template directory; each test gets its own copy as
``$LDF_HOME``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ldf.config import Settings
from ldf.sim.models import VisitSpec

SCALE = 0.15
DETECTORS = ["R22_S11", "R22_S12"]
DAY_OBS = 20261121
SEED = 20261121


@dataclass
class Facility:
    """A seeded facility and the science visits it was seeded for."""

    settings: Settings
    visits: list[VisitSpec]
    """Science visits of the night (the first two share a field and band)."""
    calib_visits: list[VisitSpec]


def _plan() -> tuple[list[VisitSpec], list[VisitSpec]]:
    from ldf.sim.conditions import conditions_for
    from ldf.sim.scheduler import plan_night

    plan = plan_night("LSSTCam", day_obs=DAY_OBS, science_visits=2, seed=SEED)
    science, calib = [], []
    for p in plan.exposures:
        v = p.visit
        if v.obs_type == "science":
            mjd = v.start_tai_mjd + v.exp_time_s / 2 / 86400
            cond = conditions_for(
                SEED, mjd, v.band or "r", v.airmass, ra_deg=v.ra_deg, dec_deg=v.dec_deg
            )
            science.append(v.model_copy(update={"conditions": cond}))
        else:
            calib.append(v)
    return science, calib


def _settings(home: Path) -> Settings:
    return Settings.model_validate(
        {"home": str(home), "sim": {"scale": SCALE, "seed": SEED, "detectors": len(DETECTORS)}}
    )


@pytest.fixture(scope="session")
def seeded_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A facility home seeded once per session (do not modify: copy it)."""
    from ldf.pipelines.apdb import PromptApdb
    from ldf.prompt.inputs import InputPaths
    from ldf.prompt.seed import seed_survey

    home = tmp_path_factory.mktemp("prompt-seed") / "home"
    settings = _settings(home)
    science, _ = _plan()
    seed_survey(settings, science, detectors=DETECTORS, scale=SCALE, seed=SEED)
    paths = InputPaths(home)
    PromptApdb.create(f"sqlite:///{paths.apdb / 'apdb.sqlite3'}", config_path=paths.apdb_config)
    return home


@pytest.fixture
def facility(seeded_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Facility:
    """A private copy of the seeded facility, as ``$LDF_HOME``."""
    home = tmp_path / "facility"
    shutil.copytree(seeded_home, home, symlinks=True)
    # The APDB config names the database by absolute path: point it at the copy.
    from ldf.prompt.inputs import InputPaths

    cfg = InputPaths(home).apdb_config
    cfg.write_text(cfg.read_text().replace(str(seeded_home), str(home)))
    monkeypatch.setenv("LDF_HOME", str(home))
    science, calib = _plan()
    return Facility(_settings(home), science, calib)


def write_raws(
    facility: Facility, visit: VisitSpec, detectors: list[str] | None = None
) -> dict[str, Path]:
    """Render a visit's raws into the facility's OODS layout; detector → path."""
    from ldf.prompt.seed import _render_raws, night_sky
    from ldf.sim.instruments import get_instrument

    dets = detectors or DETECTORS
    directory = facility.settings.home / "oods" / "LSSTCam" / str(visit.day_obs) / visit.obs_id
    directory.mkdir(parents=True, exist_ok=True)
    camera = get_instrument("LSSTCam", SCALE)
    sky = night_sky(SEED, facility.settings.sim.sky(SCALE))
    paths = _render_raws(camera, visit, dets, sky, SEED, directory)
    return dict(zip(dets, paths, strict=True))


def announce(
    service: Any, visit: VisitSpec, *, readout_unix: float | None = None
) -> dict[str, Path]:
    """nextVisit, raws in the OODS, endReadout and imageInOODS for every detector."""
    service.on_next_visit(visit.model_dump(mode="json"), detectors=DETECTORS)
    raws = write_raws(_facility_of(service), visit)
    service.on_end_readout(visit.exposure_id, readout_unix or time.time())
    for det, path in raws.items():
        service.on_image(visit.exposure_id, det, path)
    return raws


def _facility_of(service: Any) -> Facility:
    return Facility(service.settings, [], [])


@pytest.fixture
def make_service(facility: Facility) -> Iterator[Callable[..., Any]]:
    """Factory of PromptServices on the facility (all closed at the end)."""
    from ldf.prompt.service import PromptService

    made: list[PromptService] = []

    def make(**policy: Any) -> PromptService:
        svc = PromptService.open(facility.settings, "LSSTCam")
        svc.detectors = list(DETECTORS)
        svc.set_policy(workers=1, **policy)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()
