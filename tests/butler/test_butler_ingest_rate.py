"""How fast raws are registered in place (transfer='direct'): a measurement, not a limit."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pytest
from tests.butler.rawfiles import WriteRaw

from ldf.butler import ButlerRepo, RawRecord
from ldf.sim.instruments import get_instrument
from ldf.sim.models import exposure_id, obs_id

N_EXPOSURES = 25
"""Exposures in the measurement."""
N_DETECTORS = 20
"""Detectors per exposure (500 files in all)."""


def test_direct_ingest_rate(
    repo: ButlerRepo,
    write_raw: WriteRaw,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    detectors = [d.name for d in get_instrument("LSSTCam").science_detectors()[:N_DETECTORS]]
    # Writing 500 FITS files with astropy takes seconds; ingest reads no pixels, so copies of
    # one file under the records of 500 raws measure the same thing.
    template = RawRecord.from_file(write_raw(1, detectors[0]))
    records = []
    for seq in range(1, N_EXPOSURES + 1):
        for det in detectors:
            path = Path(template.path).with_name(f"raw_{seq:03d}_{det}.fits")
            shutil.copyfile(template.path, path)
            records.append(
                dataclasses.replace(
                    template,
                    path=str(path),
                    seq_num=seq,
                    exposure_id=exposure_id(template.day_obs, seq),
                    obs_id=obs_id("LSSTCam", template.day_obs, seq),
                    detector=det,
                    start_tai_mjd=template.start_tai_mjd + seq * 0.0005,
                    end_tai_mjd=template.end_tai_mjd + seq * 0.0005,
                )
            )
    start = time.perf_counter()
    refs = repo.ingest_raws(records, transfer="direct")
    elapsed = time.perf_counter() - start
    assert len(refs) == len(records) == N_EXPOSURES * N_DETECTORS
    assert len(repo.query_raws("LSSTCam")) == len(records)

    start = time.perf_counter()
    repo.ingest_raws(records, transfer="direct")
    again = time.perf_counter() - start
    engine = request.node.callspec.params["repo_root"]
    with capsys.disabled():
        print(
            f"\n[{engine}] direct ingest of {len(records)} raws: "
            f"{elapsed:.2f} s = {len(records) / elapsed:.0f} files/s "
            f"(re-ingest no-op {again:.2f} s)"
        )
