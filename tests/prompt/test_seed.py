"""Survey seeding: templates of several bands built in worker processes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ldf.config import Settings
from ldf.prompt.inputs import InputPaths
from tests.prompt.conftest import SEED, _plan

SCALE = 0.1
DETECTORS = ["R22_S11"]


def _files(root: Path) -> dict[Path, Path]:
    return {p.relative_to(root): p for p in root.rglob("*.fits")}


@pytest.mark.slow  # ~20 s: seeds a survey, then builds its templates again (make test-all)
def test_templates_of_two_bands_in_two_processes_equal_those_of_one(tmp_path: Path) -> None:
    from ldf.prompt.seed import _build_templates, _field_radius_deg, fields_of_plan, seed_survey
    from ldf.sim.instruments import get_instrument

    settings = Settings.model_validate(
        {
            "home": str(tmp_path / "home"),
            "sim": {"scale": SCALE, "seed": SEED, "detectors": len(DETECTORS)},
            "batch": {"workers": 2},
        }
    )
    first = _plan()[0][0]
    other = "i" if first.band != "i" else "r"
    # Two fields in two bands: a worker process each.
    visits = [first, first.model_copy(update={"band": other, "ra_deg": first.ra_deg + 1.0})]
    said: list[str] = []
    report = seed_survey(
        settings, visits, detectors=DETECTORS, scale=SCALE, seed=SEED, status=said.append
    )
    assert any("in 2 processes" in s for s in said)
    # Each field's line, said in the parent as one process says it.
    assert sum(" template patch(es) from " in s for s in said) == 2
    root = InputPaths(settings.home).templates
    two = tmp_path / "two-processes"
    shutil.move(root, two)
    files_two = _files(two)
    assert report["templates"] == len(files_two) > 0
    assert len({f.parts[0] for f in files_two}) == 2  # both bands

    # The same fields built again from the same archive by one process.
    one = settings.model_copy(update={"batch": settings.batch.model_copy(update={"workers": 1})})
    radius = _field_radius_deg(get_instrument("LSSTCam", SCALE), DETECTORS)
    made = _build_templates(one, "LSSTCam", fields_of_plan(visits), radius, SCALE, said.append)
    files_one = _files(root)
    assert made == len(files_one)
    assert sorted(files_one) == sorted(files_two)
    for name, path in files_one.items():
        with fits.open(path) as a, fits.open(files_two[name]) as b:
            assert len(a) == len(b)
            for ha, hb in zip(a, b, strict=True):
                if ha.data is not None:
                    np.testing.assert_array_equal(ha.data, hb.data)


@pytest.fixture(autouse=True)
def _no_env_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LDF_HOME", raising=False)
