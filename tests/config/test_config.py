"""Site configuration: defaults, YAML, environment overrides, errors with locations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ldf.cli import app
from ldf.config import Tier, load_settings
from ldf.config.loader import masked_dump
from ldf.errors import ConfigError

runner = CliRunner()


def test_defaults_name_four_sites_under_home(tmp_path: Path) -> None:
    s = load_settings()
    assert sorted(s.sites) == ["archive", "base", "dr", "summit"]
    assert s.home == tmp_path / "ldf-home"
    assert s.sites["dr"].endpoints[0].tier is Tier.DR
    tiers = {e.tier for e in s.sites["archive"].endpoints}
    assert tiers == {Tier.DISK, Tier.NEARLINE}
    assert s.database_url("catalog").startswith("sqlite:///")
    assert str(tmp_path) in s.database_url("catalog")
    assert s.bus_is_embedded


def test_yaml_file_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "bus:\n  url: nats://127.0.0.1:4222\n  command_timeout_s: 3\n"
        "sites:\n  base:\n    endpoints:\n      - {name: fast, root: /data/base}\n"
        "databases:\n  catalog: postgresql://ldf:hunter2@db.example:5432/ldf\n"
        "sim:\n  seed: 7\n"
    )
    monkeypatch.setenv("LDF_SIM__SEED", "11")
    s = load_settings(cfg)
    assert s.bus.url == "nats://127.0.0.1:4222"
    assert s.bus.command_timeout_s == 3
    assert list(s.sites) == ["base"]
    assert s.sim.seed == 11  # environment wins over the file
    dumped = masked_dump(s)
    assert "hunter2" not in json.dumps(dumped)
    assert dumped["databases"]["catalog"] == "postgresql://ldf:***@db.example:5432/ldf"


def test_every_error_has_its_location(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "bus:\n"
        "  url: http://nowhere\n"  # line 2: bad scheme
        "  command_timeout_s: -1\n"  # line 3: must be > 0
        "sites:\n"
        "  base:\n"
        "    endpoints:\n"
        "      - name: a\n"
        "        tier: floppy\n"  # line 8: bad tier
        "        root: /x\n"
        "colour: blue\n"  # line 10: unknown key
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert f"{cfg}:2:8: bus.url:" in text
    assert f"{cfg}:3:22: bus.command_timeout_s:" in text
    assert f"{cfg}:8:15: sites.base.endpoints.0.tier:" in text
    assert f"{cfg}:10:1: colour: unknown setting" in text


def test_yaml_syntax_error_located(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("bus:\n  url: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert info.value.problems[0].startswith(f"{cfg}:")
    assert "not valid YAML" in str(info.value)


def test_env_error_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDF_BUS__HEARTBEAT_INTERVAL_S", "soon")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "environment LDF_BUS__HEARTBEAT_INTERVAL_S: bus.heartbeat_interval_s" in str(info.value)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(cfg)


def test_nearline_only_staging_and_unique_endpoints(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "sites:\n  a:\n    endpoints:\n      - {name: x, root: /a, staging_delay_s: 5}\n"
    )
    with pytest.raises(ConfigError, match="staging_delay_s applies only to tier 'nearline'"):
        load_settings(cfg)
    cfg.write_text(
        "sites:\n  a:\n    endpoints:\n"
        "      - {name: x, root: /a}\n"
        "      - {name: x, root: /b, tier: nearline, staging_delay_s: 5}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert f"{cfg}:4:7: sites.a.endpoints:" in str(info.value)
    assert "repeated: x" in str(info.value)


def test_cli_validate_exit_code_and_lines(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("bus:\n  url: ftp://x\nsim:\n  scale: 3\n")
    result = runner.invoke(app, ["config", "validate", str(cfg)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ")
    assert lines[0].endswith("bad.yaml: 2 errors")
    assert any("bus.url" in line for line in lines[1:])
    assert any("sim.scale" in line for line in lines[1:])
    assert "Traceback" not in result.output
    good = tmp_path / "good.yaml"
    good.write_text("sim:\n  seed: 3\n")
    result = runner.invoke(app, ["config", "validate", str(good), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["valid"] is True


def test_cli_show_masks_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "bus:\n  url: nats://127.0.0.1:4222\n  credentials: s3cret-token\n"
        "databases:\n  apdb: postgresql://u:pw@127.0.0.1/apdb\n"
    )
    result = runner.invoke(app, ["--config", str(cfg), "config", "show", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["bus"]["credentials"] == "***"
    assert data["databases"]["apdb"] == "postgresql://u:***@127.0.0.1/apdb"
    assert "s3cret" not in result.stdout
    assert ":pw@" not in result.stdout
    assert set(data["sites"]) == {"summit", "base", "archive", "dr"}
