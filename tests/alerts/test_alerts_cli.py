"""``ldf alerts`` through typer's CliRunner on the real root command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ldf.alerts.service import AlertService
from ldf.alerts.synthetic import alert_id_for
from ldf.cli import app
from ldf.config import load_settings
from tests.alerts.conftest import VISIT, packets

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_credentials_feeds_status_replay_get(_isolated_home: Path, tmp_path: Path) -> None:  # noqa: PT019
    code, out, _ = invoke("alerts", "credentials", "add", "fink", "--role", "broker", "--json")
    assert code == 0
    token = json.loads(out)["token"]
    assert len(token) > 30
    creds = (_isolated_home / "secrets" / "alerts-credentials.yaml").read_text()
    assert token not in creds  # only its hash is kept
    code, _, err = invoke("alerts", "credentials", "add", "fink")
    assert code == 1
    assert "exists" in err
    code, _, err = invoke("alerts", "credentials", "add", "x", "--role", "king")
    assert code == 2
    assert "unknown role" in err
    code, out, _ = invoke("alerts", "credentials", "list", "--json")
    assert json.loads(out) == [{"name": "fink", "role": "broker"}]

    code, out, _ = invoke("alerts", "feeds", "create", "fink-full", "--broker", "fink", "--json")
    assert code == 0, out
    assert json.loads(out)["cursor"] == 0
    code, _, err = invoke("alerts", "feeds", "create", "bad name", "--broker", "fink")
    assert code == 2
    assert "feed name" in err
    code, _, err = invoke("alerts", "feeds", "create", "f2", "--broker", "fink", "--format", "x")
    assert code == 2

    svc = AlertService.open(load_settings())
    try:
        svc.ingest(packets(VISIT, 4))
        svc.close_visit(VISIT)
    finally:
        svc.close()
    code, out, _ = invoke("alerts", "status", "--json")
    st = json.loads(out)
    assert st["store"]["alerts"] == 4
    assert st["feeds"][0]["lag_entries"] == 5  # 4 alerts + the manifest
    code, out, _ = invoke("alerts", "replay", "again", "--visits", str(VISIT), "--broker",
                          "fink", "--json")  # fmt: skip
    assert json.loads(out)["alerts"] == 4
    code, _, err = invoke("alerts", "replay", "again", "--alert-ids", "12")
    assert code == 2
    assert "A-B" in err
    code, _, err = invoke("alerts", "replay", "again")
    assert code == 2
    assert "exactly one" in err
    target = tmp_path / "a.avro"
    code, out, _ = invoke("alerts", "get", str(alert_id_for(VISIT, 1)), "-o", str(target), "--json")
    assert json.loads(out)["visit"] == VISIT
    assert target.read_bytes() == packets(VISIT, 4)[1]
    code, _, err = invoke("alerts", "get", "1")
    assert code == 2
    assert err.strip() == "error: no alert 1"
    code, out, _ = invoke("alerts", "visit", str(VISIT), "--json")
    assert json.loads(out)["manifest"]["count"] == 4
    code, out, _ = invoke("alerts", "audit", "--json")
    assert {r["event"] for r in json.loads(out)} >= {"feed_created", "replay"}


@pytest.mark.usefixtures("_isolated_home")
def test_smoke_passes() -> None:
    code, out, _ = invoke("alerts", "smoke", "--visits", "2", "--alerts", "30", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["passed"]
    for feed in report["feeds"].values():
        assert feed["delivered"] == 60
        assert feed["duplicates"] == feed["missing"] == 0
        assert feed["manifests_verified"] == 2


@pytest.mark.usefixtures("_isolated_home")
def test_filters_commands() -> None:
    code, _, err = invoke("alerts", "filters", "check", "snr > 10 and bnad in ('g')")
    assert code == 2
    assert "did you mean 'band'" in err
    code, out, _ = invoke("alerts", "filters", "add", "jdoe", "bright", "snr > 10", "--json")
    assert code == 0, out
    assert json.loads(out)["feed"] == "user-jdoe-bright"
    code, out, _ = invoke("alerts", "filters", "list", "--json")
    assert [f["name"] for f in json.loads(out)] == ["bright"]
    code, _, _ = invoke("alerts", "filters", "delete", "jdoe", "bright")
    assert code == 0
    code, out, _ = invoke("alerts", "filters", "list", "--json")
    assert all(not f["active"] for f in json.loads(out))


def test_nats_config_is_a_valid_server_config(tmp_path: Path) -> None:
    import shutil
    import stat
    import subprocess

    out = tmp_path / "auth.conf"
    code, stdout, _ = invoke("alerts", "nats-config", "-o", str(out), "-b", "fink", "-b",
                             "lasair", "--json")  # fmt: skip
    assert code == 0, stdout
    result = json.loads(stdout)
    assert set(result["brokers"]) == {"fink", "lasair"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert result["brokers"]["fink"] in out.read_text()
    server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if Path(server).exists():
        check = subprocess.run([server, "-c", str(out), "-t"], capture_output=True, text=True)
        assert "is valid" in check.stdout + check.stderr
