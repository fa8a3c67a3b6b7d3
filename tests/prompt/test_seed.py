"""Survey seeding: templates of several bands built in worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ldf.config import Settings
from ldf.prompt.inputs import InputPaths
from tests.prompt.conftest import SEED, _plan

SCALE = 0.1
DETECTORS = ["R22_S11"]


def _seed(home: Path, workers: int) -> tuple[dict, list[str], dict[Path, Path]]:
    from ldf.prompt.seed import seed_survey

    settings = Settings.model_validate(
        {
            "home": str(home),
            "sim": {"scale": SCALE, "seed": SEED, "detectors": len(DETECTORS)},
            "batch": {"workers": workers},
        }
    )
    first = _plan()[0][0]
    other = "i" if first.band != "i" else "r"
    # Two fields in two bands: a worker process each when there are two.
    visits = [first, first.model_copy(update={"band": other, "ra_deg": first.ra_deg + 1.0})]
    said: list[str] = []
    report = seed_survey(
        settings, visits, detectors=DETECTORS, scale=SCALE, seed=SEED, status=said.append
    )
    root = InputPaths(home).templates
    return report, said, {p.relative_to(root): p for p in root.rglob("*.fits")}


def test_templates_of_two_bands_in_two_processes_equal_those_of_one(tmp_path: Path) -> None:
    one, _, files_one = _seed(tmp_path / "one", workers=1)
    two, said, files_two = _seed(tmp_path / "two", workers=2)
    assert any("in 2 processes" in s for s in said)
    assert one["templates"] == two["templates"] == len(files_one) > 0
    assert len({f.parts[0] for f in files_one}) == 2  # both bands
    assert sorted(files_one) == sorted(files_two)
    for name, path in files_one.items():
        with fits.open(path) as a, fits.open(files_two[name]) as b:
            assert len(a) == len(b)
            for ha, hb in zip(a, b, strict=True):
                if ha.data is not None:
                    np.testing.assert_array_equal(ha.data, hb.data)
    # Each field's line, said in the parent as one process says it.
    assert sum(" template patch(es) from " in s for s in said) == 2


@pytest.fixture(autouse=True)
def _no_env_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LDF_HOME", raising=False)
