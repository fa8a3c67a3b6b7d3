"""Fixtures of the archiver tests: a tiny simulated night in the DAQ, archivers wired to a
real OODS and Data Backbone under a temporary LDF_HOME."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ldf.archiver.service import Archiver
from ldf.config import Settings, load_settings
from ldf.sim.daq import DaqStore
from ldf.sim.night import NightOptions, run_night

DAY_OBS = 20261121

NIGHT = NightOptions(
    day_obs=DAY_OBS, visits=2, seed=11, scale=0.06, detectors=2, latiss_visits=1,
    calibrations=False, workers=0,
)  # fmt: skip
"""Two LSSTCam science visits of two CCDs and one LATISS spectrum, tiny pixels."""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        home=tmp_path / "home",
        policies={
            "backbone": {"butler": False, "dark_grace_s": 0},
            "archiver": {"missing_detector_timeout_s": 0.0},
        },
    )


@pytest.fixture
def night(settings: Settings) -> DaqStore:
    """The tiny night, read out into the DAQ."""
    daq = DaqStore(settings.home / "daq")
    asyncio.run(run_night(NIGHT, daq, settings.home / "sim"))
    return daq


Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def make_archiver(settings: Settings) -> Iterator[Callable[..., tuple[Archiver, Events]]]:
    made: list[Archiver] = []

    def make(instrument: str = "LSSTCam", **policy: Any) -> tuple[Archiver, Events]:
        events: Events = []
        arch = Archiver.open(instrument, settings, publish=lambda n, p: events.append((n, p)))
        if policy:
            arch.set_policy(**policy)
        made.append(arch)
        return arch, events

    yield make
    for arch in made:
        arch.close()


def end_readouts(daq: DaqStore, instrument: str) -> list[dict[str, Any]]:
    """The endReadout payloads the camera published for the night's exposures."""
    return [
        {
            "imageName": m.visit.obs_id,
            "detectors": list(m.detectors),
            "visit": m.visit.model_dump(mode="json"),
        }
        for m in daq.exposures(instrument, DAY_OBS)
    ]
