"""Quick-look PNGs of exposures, and the night's health/metrics endpoint."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from ldf.cli import app
from ldf.config import load_settings
from ldf.errors import NotFoundError, TransportError, UserInputError
from ldf.ocs.health import serve_health
from ldf.sim.daq import DaqStore
from ldf.sim.devices import Observatory
from ldf.sim.instruments import get_instrument
from ldf.sim.night import NightOptions, run_night
from ldf.sim.quicklook import quicklook

NIGHT = NightOptions(
    day_obs=20261121, visits=1, seed=5, scale=0.1, detectors=2, latiss_visits=0,
    instruments=("LSSTCam",), calibrations=False, workers=0,
)  # fmt: skip

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def night(tmp_path: Path) -> tuple[DaqStore, Path]:
    daq = DaqStore(tmp_path / "daq")
    summary = asyncio.run(run_night(NIGHT, daq, tmp_path / "sim"))
    return daq, Path(summary.instruments["LSSTCam"].truth_table or "")


def test_mosaic_and_single_detector_png(night: tuple[DaqStore, Path], tmp_path: Path) -> None:
    daq, truth = night
    inst = get_instrument("LSSTCam", scale=0.1)
    mosaic = quicklook(
        daq, inst, 20261121, "MC_O_20261121_000001", tmp_path / "m.png", truth_table=truth
    )
    one = quicklook(
        daq, inst, 20261121, "MC_O_20261121_000001", tmp_path / "d.png", detector="R22_S11"
    )
    for p in (mosaic, one):
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert p.stat().st_size > 10_000  # a picture, not an empty canvas
    assert not list(tmp_path.glob(".*.tmp.png"))


def test_quicklook_errors(night: tuple[DaqStore, Path], tmp_path: Path) -> None:
    daq, _ = night
    inst = get_instrument("LSSTCam", scale=0.1)
    with pytest.raises(NotFoundError, match="was not read out"):
        quicklook(
            daq, inst, 20261121, "MC_O_20261121_000001", tmp_path / "x.png", detector="R01_S00"
        )
    with pytest.raises(NotFoundError, match="no completed readout"):
        quicklook(daq, inst, 20261121, "MC_O_20261121_000099", tmp_path / "x.png")
    with pytest.raises(UserInputError, match="PNG"):
        quicklook(daq, inst, 20261121, "MC_O_20261121_000001", tmp_path / "x.jpg")


def test_quicklook_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    runner = CliRunner()
    home = tmp_path / "home"
    monkeypatch.setenv("LDF_HOME", str(home))
    result = runner.invoke(
        app,
        [
            "sim",
            "night",
            "--visits",
            "1",
            "--detectors",
            "1",
            "--scale",
            "0.1",
            "--no-calibs",
            "--latiss",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "ql.png"
    result = runner.invoke(
        app,
        ["sim", "quicklook", "MC_O_20261121_000001", "--scale", "0.1", "-o", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["png"] == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    bad = runner.invoke(app, ["sim", "quicklook", "nonsense"])
    assert bad.exit_code == 2
    assert "not an obs_id" in bad.stderr


async def test_health_and_metrics_served_over_http(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path / "home")
    async with (
        Observatory.open(settings, ("LSSTCam",)) as obs,
        serve_health(list(obs.devices.values())) as url,
        httpx.AsyncClient() as client,
    ):
        health = await client.get(f"{url}/health")
        metrics = await client.get(f"{url}/metrics")
        assert health.status_code == 200
        states = {d["name"]: d["state"] for d in health.json()["devices"]}
        assert states == {"MTScheduler": "ENABLED", "MTCamera": "ENABLED"}
        assert metrics.status_code == 200
        assert 'device="MTCamera"' in metrics.text
        await obs.devices["MTCamera"].fault(42, "shutter stuck")
        sick = await client.get(f"{url}/health")
        assert sick.status_code == 503
        assert any(d["errorCode"] == 42 for d in sick.json()["devices"] if d["name"] == "MTCamera")


async def test_health_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    async with serve_health([]) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(TransportError, match=f"cannot serve health on 127.0.0.1:{port}"):
            async with serve_health([], port=port):
                pass


def test_night_options_reject_too_many_detectors() -> None:
    with pytest.raises(UserInputError):
        replace(NIGHT, detectors=190)
