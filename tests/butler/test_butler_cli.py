"""The official ``butler`` command-line tool sees ldf's repositories and instruments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from tests.butler.rawfiles import exp_id

from ldf.butler import ButlerRepo, RawRecord
from ldf.butler.repo import seed_config

BUTLER = str(Path(sys.executable).with_name("butler"))
"""The ``butler`` script of the running virtual environment."""


def butler_cli(*args: str) -> str:
    """Run ``butler ARGS`` and return its standard output (fail on a non-zero exit)."""
    done = subprocess.run([BUTLER, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_lists_ingested_raws(tmp_path: Path, four_raws: list[RawRecord]) -> None:
    root = tmp_path / "cli-repo"
    with ButlerRepo.create(root) as repo:
        refs = repo.ingest_raws(four_raws)
    out = butler_cli("query-datasets", str(root), "raw", "--collections", "LSSTCam/raw/all")
    for ref in refs:
        assert str(ref.id) in out
    assert out.count("LSSTCam/raw/all") == 4
    assert str(exp_id(2)) in out

    out = butler_cli("query-dimension-records", str(root), "exposure")
    assert "MC_O_20261121_000001" in out
    assert "MC_O_20261121_000002" in out
    assert "BLOCK-365" in out


def test_cli_creates_repo_from_seed_and_registers_instrument(tmp_path: Path) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(yaml.safe_dump(seed_config()))
    root = tmp_path / "cli-created"
    butler_cli("create", str(root), "--seed-config", str(seed))
    butler_cli("register-instrument", str(root), "ldf.butler.instrument.LatissInstrument")
    out = butler_cli(
        "query-dimension-records", str(root), "detector", "--where", "instrument='LATISS'"
    )
    assert "RXX_S00" in out
    # ButlerRepo.create on a repository the CLI made adds LSSTCam and the raw dataset type.
    with ButlerRepo.create(root) as repo:
        assert repo.butler.registry.getDatasetType("raw").storageClass_name == "LdfRawImage"
        assert len(list(repo.butler.registry.queryDimensionRecords("detector"))) == 206
