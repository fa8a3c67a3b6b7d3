"""``ldf oods`` through typer's CliRunner on the real root command."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.butler.rawfiles import DAY_OBS, exp_id
from tests.oods.conftest import install_butler, write_raw
from typer.testing import CliRunner

from ldf.cli import app
from ldf.config import load_settings
from ldf.db import utcnow
from ldf.oods.models import OodsEntry
from ldf.oods.service import Oods

runner = CliRunner()


@pytest.fixture
def cached(_isolated_home: Path, butler_template: Path) -> list[OodsEntry]:
    """Three raws in the OODS of $LDF_HOME (what the CLI opens): two of them 10 days old."""
    install_butler(butler_template, _isolated_home)
    old = utcnow() - timedelta(days=10)
    with Oods.open(load_settings()) as oods:
        out = []
        for seq, det, when in ((1, "R22_S11", old), (1, "R22_S12", old), (2, "R22_S11", None)):
            kw = write_raw(oods, seq, det)
            out.append(oods.add(kw.pop("path"), arrived_at=when, **kw))
    return out


def _json(*args: str) -> Any:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_ls_and_find(cached: list[OodsEntry]) -> None:
    rows = _json("oods", "ls")
    assert [(r["exposure_id"], r["files"]) for r in rows] == [(exp_id(2), 1), (exp_id(1), 2)]
    found = _json("oods", "find", "--exposure", str(exp_id(1)))
    assert [e["detector"] for e in found] == ["R22_S11", "R22_S12"]
    found = _json("oods", "find", "--day-obs", str(DAY_OBS), "--detector", "R22_S11", "-n", "1")
    assert [e["id"] for e in found] == [cached[0].id]
    result = runner.invoke(app, ["oods", "find"])
    assert result.exit_code == 0
    assert "R22_S12" in result.output


def test_pin_expire_status(cached: list[OodsEntry]) -> None:
    pin = _json("oods", "pin", "--obs-id", cached[0].obs_id, "--reason", "look", "--by", "ops")
    assert pin["files"] == 2
    dry = _json("oods", "expire", "--dry-run")
    assert (dry["removed"], dry["kept_pinned"]) == (0, 2)
    assert _json("oods", "unpin", "--obs-id", cached[0].obs_id) == {"removed": 1}
    report = _json("oods", "expire")
    assert (report["removed"], report["butler_removed"]) == (2, 2)
    future = (utcnow() + timedelta(days=30)).isoformat()
    assert _json("oods", "expire", "--now", future, "--dry-run")["removed"] == 1
    st = _json("oods", "status")
    assert (st["files"], st["pins"]) == (1, 0)
    result = runner.invoke(app, ["oods", "status"])
    assert result.exit_code == 0
    assert "LSSTCam" in result.output


def test_get_copies_verified(cached: list[OodsEntry], tmp_path: Path) -> None:
    e = cached[2]
    got = _json("oods", "get", "LSSTCam", e.obs_id, "R22_S11", str(tmp_path))
    assert got["checksum"] == e.checksum
    assert (tmp_path / e.filename).stat().st_size == e.size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["oods", "pin"], "exactly one of obs_id"),
        (["oods", "pin", "--obs-id", "../x"], "invalid obs_id"),
        (["oods", "find", "--since", "yesterday"], "--since takes an ISO time"),
        (["oods", "unpin", "--day-obs", "20261121"], "no such pin"),
        (["oods", "get", "LSSTCam", "MC_O_20261121_000009", "R22_S11"], "not in the OODS cache"),
        (["oods", "expire", "--now", "soon"], "--now takes an ISO time"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    cached: list[OodsEntry], args: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    # ldf.cli reports errors as JSON when the process's own command line has --json.
    monkeypatch.setattr("sys.argv", ["ldf", *args, "--json"])
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 2
    assert message in json.loads(result.stdout)["error"]["message"]
