"""``ldf ocs``: status, command and events against a device running in another process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from ldf.config import Settings
from ldf.errors import CommandRefusedError, CommandTimeoutError, UserInputError
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.cli import app

SCRIPT = Path(__file__).with_name("device_process.py")
runner = CliRunner()


async def _wait_for_device(home: Path, device: str) -> None:
    async with EmbeddedBus(home / "bus" / "ocs.sqlite3") as bus:
        beats = await bus.subscribe(f"ocs.{device}.evt.heartbeat").start()
        await beats.get(10.0)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """$LDF_HOME with the device ``Night`` serving in another process."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "Night"])
    try:
        asyncio.run(_wait_for_device(tmp_path, "Night"))
        yield tmp_path
    finally:
        proc.kill()
        proc.wait()


def invoke(home: Path, *args: str) -> Result:
    """Run ``ldf ocs ARGS`` with embedded settings under ``home``."""
    settings = Settings(home=home)
    return runner.invoke(app, list(args), obj={"settings": settings})


def test_status(home: Path) -> None:
    result = invoke(home, "status", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["name"], r["state"], r["summary_state"]) for r in rows] == [("Night", "STANDBY", 5)]
    assert rows[0]["heartbeat_age_s"] >= 0
    table = invoke(home, "status")
    assert table.exit_code == 0
    assert "Night" in table.stdout
    assert "STANDBY" in table.stdout


def test_command_cycle(home: Path) -> None:
    result = invoke(home, "command", "Night", "start", "--configuration", "night", "--json")
    assert result.exit_code == 0, result.output
    ack = json.loads(result.stdout)
    assert (ack["code"], ack["result"]) == ("COMPLETE", "Night is DISABLED")
    result = invoke(home, "command", "Night", "enable")
    assert result.exit_code == 0
    assert "Night enable: done. Night is ENABLED" in result.stdout
    rows = json.loads(invoke(home, "status", "--json").stdout)
    assert rows[0]["state"] == "ENABLED"


def test_refused_command_raises_ldf_error(home: Path) -> None:
    result = invoke(home, "command", "Night", "enable")
    assert isinstance(result.exception, CommandRefusedError)
    assert str(result.exception) == "Night: cannot enable in state STANDBY; allowed in DISABLED"


def test_command_to_nobody_times_out(home: Path) -> None:
    result = invoke(home, "command", "Nobody", "start", "--timeout", "0.2")
    assert isinstance(result.exception, CommandTimeoutError)
    assert "no acknowledgement from Nobody within 0.2 s — is it running?" in str(result.exception)


def test_bad_param(home: Path) -> None:
    result = invoke(home, "command", "Night", "start", "--param", "oops")
    assert isinstance(result.exception, UserInputError)


def test_events(home: Path) -> None:
    result = invoke(home, "events", "Night", "--json")
    assert result.exit_code == 0, result.output
    names = {json.loads(line)["name"] for line in result.stdout.splitlines()}
    assert names == {"summaryState", "heartbeat"}
    follow = invoke(home, "events", "Night", "--follow", "--limit", "2")
    assert follow.exit_code == 0
    assert follow.stdout.count("Night heartbeat") == 2


def test_status_empty_bus(tmp_path: Path) -> None:
    result = invoke(tmp_path, "status")
    assert result.exit_code == 0
    assert "no device" in result.stdout
