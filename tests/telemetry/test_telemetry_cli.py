"""``ldf telemetry`` through typer's CliRunner on the real root command."""

from __future__ import annotations

import json
from typing import Any

import yaml
from typer.testing import CliRunner

from ldf.cli import app
from ldf.config import load_settings
from ldf.ocs.models import State
from ldf.telemetry.service import TelemetryGateway, producers_path
from ldf.telemetry.tokens import hash_token
from tests.telemetry.conftest import image_quality

runner = CliRunner()


def ok(*args: str) -> Any:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_producers_add_list_rotate_remove() -> None:
    added = ok("telemetry", "producers", "add", "prompt", "--device", "MTPrompt",
               "--topics", "imageQuality,calibrationQA")  # fmt: skip
    assert (added["device"], added["topics"]) == ("MTPrompt", ["imageQuality", "calibrationQA"])
    token = added["token"]
    path = producers_path(load_settings())
    text = path.read_text()
    assert token not in text  # only its hash is kept
    assert yaml.safe_load(text)["producers"][0]["token_sha256"] == hash_token(token)
    assert path.stat().st_mode & 0o777 == 0o600
    ok("telemetry", "producers", "add", "ops", "--operator")
    assert [p["name"] for p in ok("telemetry", "producers", "list")] == ["prompt", "ops"]

    plain = runner.invoke(
        app, ["telemetry", "producers", "add", "batch", "-d", "OCSBatch", "-t", "batchJobResult"]
    )
    assert plain.exit_code == 0
    assert len(plain.stdout.strip()) >= 40  # the token alone on stdout

    rotated = ok("telemetry", "producers", "rotate", "prompt")["token"]
    assert rotated != token
    assert hash_token(rotated) in path.read_text()
    assert ok("telemetry", "producers", "remove", "prompt") == {"removed": "prompt"}
    assert [p["name"] for p in ok("telemetry", "producers", "list")] == ["ops", "batch"]


def test_producers_add_refuses_bad_entries() -> None:
    ok(
        "telemetry",
        "producers",
        "add",
        "prompt",
        "--device",
        "MTPrompt",
        "--topics",
        "imageQuality",
    )
    for args, why in (
        (["prompt", "--device", "X", "--topics", "imageQuality"], "exists"),
        (["p2", "--device", "MTPrompt", "--topics", "weather"], "unknown topic 'weather'"),
        (["p2", "--topics", "imageQuality"], "needs a device"),
        (["p2", "--device", "MT.Prompt", "--topics", "imageQuality"], "device"),
        (["bad name", "--device", "MTPrompt"], "name"),
    ):
        result = runner.invoke(app, ["telemetry", "producers", "add", *args])
        assert result.exit_code == 2, (args, result.output)
        assert why in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback
    result = runner.invoke(app, ["telemetry", "producers", "rotate", "nobody"])
    assert result.exit_code == 2
    assert "no telemetry producer 'nobody'" in result.stderr


def test_topics_schema_status_audit_purge() -> None:
    assert [t["name"] for t in ok("telemetry", "topics")] == [
        "imageQuality", "calibrationQA", "batchJobResult",
    ]  # fmt: skip
    schema = json.loads(runner.invoke(app, ["telemetry", "schema", "calibrationQA"]).stdout)
    assert schema["title"] == "calibrationQA"
    missing = runner.invoke(app, ["telemetry", "schema", "weather"])
    assert missing.exit_code == 2
    assert "unknown topic 'weather'" in missing.stderr

    ok(
        "telemetry",
        "producers",
        "add",
        "prompt",
        "--device",
        "MTPrompt",
        "--topics",
        "imageQuality",
    )
    with TelemetryGateway.open(load_settings()) as gw:
        gw.state = State.ENABLED
        producer = gw.producers.get("prompt")
        gw.submit(producer, "imageQuality", image_quality(), "m1")
        gw.submit(producer, "imageQuality", image_quality(), "m1")
    st = ok("telemetry", "status")
    assert st["backlog"] == 1
    assert (st["producers"][0]["accepted"], st["producers"][0]["duplicates"]) == (1, 1)
    rows = ok("telemetry", "audit", "--producer", "prompt")
    assert [r["outcome"] for r in rows] == ["duplicate", "accepted"]
    assert ok("telemetry", "audit", "--outcome", "rejected") == []
    bad = runner.invoke(app, ["telemetry", "audit", "--outcome", "lost"])
    assert bad.exit_code == 2
    assert "unknown outcome 'lost'" in bad.stderr
    assert ok("telemetry", "purge") == {"messages": 0, "audit": 0}
    for args in (["status"], ["audit"], ["topics"]):
        assert runner.invoke(app, ["telemetry", *args]).exit_code == 0


def test_send_needs_a_token_and_a_gateway() -> None:
    result = runner.invoke(app, ["telemetry", "send", "imageQuality", "{}"])
    assert result.exit_code == 2
    assert "--token" in result.stderr
    result = runner.invoke(app, ["telemetry", "send", "imageQuality", "[1]", "--token", "t"])
    assert result.exit_code == 2
    assert "JSON object" in result.stderr
    result = runner.invoke(
        app,
        ["telemetry", "send", "imageQuality", json.dumps(image_quality()), "--token", "t",
         "--url", "http://127.0.0.1:9"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "cannot take messages now" in result.stderr
