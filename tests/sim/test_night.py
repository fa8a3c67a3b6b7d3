"""A simulated night end to end: plan → OCS events → DAQ → truth table."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from astropy.table import Table
from typer.testing import CliRunner

from ldf.cli import app
from ldf.config import load_settings
from ldf.ocs.models import State
from ldf.sim.daq import DaqStore
from ldf.sim.devices import Observatory
from ldf.sim.models import ObsType
from ldf.sim.night import NightOptions, detectors_for, run_night

OPTS = NightOptions(
    day_obs=20261121, visits=4, seed=42, scale=0.12, detectors=2, latiss_visits=1, workers=0
)
TINY = NightOptions(
    day_obs=20261121, visits=1, seed=7, scale=0.1, detectors=1, latiss_visits=0,
    instruments=("LSSTCam",), calibrations=False, workers=0,
)  # fmt: skip
"""One LSSTCam CCD, no calibrations: the smallest night."""


def _night(tmp: Path, options: NightOptions = OPTS, sink: Any = None) -> Any:
    return asyncio.run(run_night(options, DaqStore(tmp / "daq"), tmp / "sim", sink=sink))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.raw")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_night_fills_the_daq_and_emits_events_in_order(tmp_path: Path) -> None:
    events: list[tuple[str, str, dict[str, Any]]] = []

    async def sink(device: str, name: str, payload: dict[str, Any]) -> None:
        events.append((device, name, payload))

    summary = _night(tmp_path, sink=sink)
    lsst = summary.instruments["LSSTCam"]
    assert lsst.by_type == {"bias": 5, "dark": 3, "flat": 4, "science": 4}
    assert lsst.detector_files == lsst.exposures * 2
    assert summary.instruments["LATISS"].by_type["science"] == 1
    daq = DaqStore(tmp_path / "daq")
    done = list(daq.exposures("LSSTCam", 20261121))
    assert len(done) == lsst.exposures
    assert all(len(e.detectors) == 2 for e in done)
    # Every exposure: nextVisit, then startIntegration, then endReadout, and the pixels
    # are in the DAQ by the time endReadout is out.
    seen: dict[str, list[str]] = {}
    for device, name, payload in events:
        obs = payload.get("obs_id") or payload.get("imageName")
        seen.setdefault(obs, []).append(f"{device}.{name}")
    assert len(seen) == lsst.exposures + summary.instruments["LATISS"].exposures
    for obs, names in seen.items():
        prefix = "MT" if obs.startswith("MC_") else "AT"
        assert names == [
            f"{prefix}Scheduler.nextVisit",
            f"{prefix}Camera.startIntegration",
            f"{prefix}Camera.endReadout",
        ], obs
    end = next(p for d, n, p in events if n == "endReadout" and p["imageName"].startswith("MC"))
    assert Path(end["daqPath"], "exposure.json").exists()
    assert end["visit"]["obs_id"] == end["imageName"]
    # Science visits carry observing conditions for the header.
    nv = [p for d, n, p in events if n == "nextVisit" and p["obs_type"] == "science"]
    assert all(p["conditions"]["seeing_fwhm_arcsec"] > 0 for p in nv)


def test_truth_table_and_plan_written(tmp_path: Path) -> None:
    summary = _night(tmp_path)
    path = Path(summary.instruments["LSSTCam"].truth_table)
    table = Table.read(path, format="ascii.ecsv")
    assert table.meta["instrument"] == "LSSTCam"
    assert len(table) == summary.instruments["LSSTCam"].truth_rows
    plan = json.loads((path.parent / "plan.json").read_text())
    assert [p["obs_type"] for p in plan].count("science") == 4
    if len(table):
        assert set(table["detector"]) <= set(detectors_for("LSSTCam", 0.12, 2))


def test_same_seed_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    opts = replace(TINY, visits=1, seed=7, detectors=1)
    _night(tmp_path / "a", opts)
    _night(tmp_path / "b", opts)
    _night(tmp_path / "c", replace(opts, seed=8))
    a, b, c = (_digest(tmp_path / x / "daq") for x in "abc")
    assert a == b
    assert a != c


def test_worker_pool_gives_the_same_bytes_as_in_process(tmp_path: Path) -> None:
    opts = replace(TINY, visits=2, seed=9, detectors=2)
    _night(tmp_path / "serial", opts)
    _night(tmp_path / "pool", replace(opts, workers=2))
    assert _digest(tmp_path / "serial" / "daq") == _digest(tmp_path / "pool" / "daq")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale": 0}, "--scale"),
        ({"scale": 1.5}, "--scale"),
        ({"detectors": 500}, "--detectors must be between 1 and 189"),
        ({"instruments": ("HSC",)}, "unknown instrument"),
        ({"speed": 0}, "--speed"),
    ],
)
def test_bad_options(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    from ldf.errors import UserInputError

    with pytest.raises(UserInputError, match=message):
        _night(tmp_path, replace(OPTS, **change))


async def test_disabled_camera_pauses_the_night(tmp_path: Path) -> None:
    """An operator disabling the camera stops exposures until it is enabled again."""
    settings = load_settings(home=tmp_path / "home")
    opts = replace(TINY, visits=2, seed=3, detectors=1)
    async with Observatory.open(settings, ("LSSTCam",)) as obs:
        camera = obs.devices["MTCamera"]
        await camera.execute("disable")
        night = asyncio.create_task(
            run_night(opts, DaqStore(tmp_path / "daq"), tmp_path / "sim", sink=obs.publish)
        )
        await asyncio.sleep(1.0)
        assert not night.done()
        assert list(DaqStore(tmp_path / "daq").exposures("LSSTCam", 20261121)) == []
        await camera.execute("enable")
        summary = await asyncio.wait_for(night, timeout=60)
        assert summary.instruments["LSSTCam"].exposures == 2
    assert camera.state is State.OFFLINE  # the observatory goes offline after the night


def test_ldf_night_cli_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["night", "--visits", "2", "--detectors", "1", "--scale", "0.1", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sim"]["instruments"]["LSSTCam"]["by_type"]["science"] == 2
    assert data["sim"]["events"] > 0
    # Prompt Processing ran on every LSSTCam exposure: science visits made alerts. (Whether
    # in time is wall time, which tests do not assert on: the night's summary and
    # benchmarks/prompt.py report it. On a host stealing a third of the CPU a visit of this
    # test once took longer than OTT1.)
    prompt = data["prompt"]
    science = [v for v in prompt["visits"] if v["obs_type"] == "science"]
    assert len(science) == 2
    assert all(v["done"] == v["detectors"] == 1 for v in prompt["visits"]), prompt["failures"]
    assert all(v["alerts"] > 0 and 0.0 <= v["within_ott1"] <= 1.0 for v in science)
    assert prompt["quality"]["seeing_rel_err_max"] < 0.05
    assert prompt["quality"]["pointing_err_arcsec_max"] < 0.3
    assert data["seeded"]["templates"] > 0
    # Alert distribution delivered every alert exactly once to each broker feed.
    alerts = data["alerts"]
    assert alerts["visits_closed"] == 2
    assert alerts["alerts"] == sum(v["alerts"] for v in science)
    assert set(alerts["feeds"]) == {"validation-full", "alerce-full", "antares-lite"}
    for feed in alerts["feeds"].values():
        assert feed["delivered"] == alerts["alerts"]
        assert feed["duplicates"] == feed["missing"] == 0
        assert feed["manifests_verified"] == 2
        assert 0.0 < feed["latency_s"]["p50"] <= feed["latency_s"]["p98"]
    # Image-quality and calibration QA reached the OCS bus through the Telemetry Gateway.
    (producer,) = data["telemetry"]["producers"]
    assert producer["device"] == "MTPrompt"
    assert producer["rejected"] == 0
    assert producer["injected"] == producer["accepted"] == len(prompt["visits"])


def test_sim_night_cli_bad_scale_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sim", "night", "--scale", "3"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --scale must be in (0, 1], got 3.0"]


def test_science_visits_have_science_obs_type(tmp_path: Path) -> None:
    summary = _night(tmp_path)
    daq = DaqStore(tmp_path / "daq")
    science = [e for e in daq.exposures("LSSTCam", 20261121) if e.visit.obs_type is ObsType.SCIENCE]
    assert len(science) == summary.instruments["LSSTCam"].by_type["science"]


@pytest.mark.nats
async def test_night_over_nats_jetstream(tmp_path: Path) -> None:
    """The same night on the scale-out bus: a subscriber sees every camera event."""
    import uuid

    from tests.engines import NATS_URL, require_nats

    from ldf.ocs.bus import open_bus

    require_nats()
    prefix = f"T{uuid.uuid4().hex[:12]}"
    settings = load_settings(home=tmp_path / "home", bus={"url": NATS_URL, "stream_prefix": prefix})
    opts = replace(TINY, visits=2, seed=3, detectors=1)
    listener = await open_bus(settings.bus, settings.home)
    try:
        async with listener.subscribe("ocs.MTCamera.evt.endReadout") as sub:
            async with Observatory.open(settings, ("LSSTCam",)) as obs:
                summary = await run_night(
                    opts, DaqStore(tmp_path / "daq"), tmp_path / "sim", sink=obs.publish
                )
            got = [await sub.get(timeout=10) for _ in range(2)]
        assert [m.payload["imageName"] for m in got] == [
            "MC_O_20261121_000001",
            "MC_O_20261121_000002",
        ]
        assert summary.instruments["LSSTCam"].exposures == 2
        status = await listener.last("ocs.MTCamera.evt.summaryState")
        assert status is not None
        assert status.payload["state"] == "OFFLINE"
    finally:
        await listener.js.delete_stream(listener.stream)  # type: ignore[attr-defined]
        await listener.close()
