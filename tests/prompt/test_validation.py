"""Science validation: the usable area, its coverage mask on disk, and the recovery it scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ldf.pipelines.types import Mask
from ldf.prompt.validation import (
    COVERAGE_OUTSIDE,
    COVERAGE_SATURATED,
    coverage_mask,
    coverage_path,
    load_coverage,
    save_coverage,
    score_detector,
    summarize,
)

SHAPE = (90, 101)
"""Odd width: the packed bit planes must not add columns."""
RA0, DEC0, PIX_DEG = 30.0, -10.0, 0.2 / 3600.0


def _masks() -> tuple[np.ndarray, np.ndarray]:
    diff = np.zeros(SHAPE, np.uint16)
    diff[:, :8] |= np.uint16(Mask.EDGE)  # the kernel's edge band
    diff[60:, 40:] |= np.uint16(Mask.NO_DATA)  # no template there
    diff[20:23, 50:53] |= np.uint16(Mask.CR | Mask.SAT)  # grown planes do not count…
    sci = np.zeros(SHAPE, np.uint16)
    sci[30:33, 70:73] |= np.uint16(Mask.SAT)  # …the science's own saturation does
    sci[5, 5] |= np.uint16(Mask.CR)
    return diff, sci


def _row(x: float, y: float, flux: float = 1e5, kind: str = "transient") -> dict[str, Any]:
    return {
        "kind": kind,
        "x": x,
        "y": y,
        "ra_deg": RA0 + x * PIX_DEG,
        "dec_deg": DEC0 + y * PIX_DEG,
        "flux_e": flux,
    }


def test_coverage_mask_bits() -> None:
    diff, sci = _masks()
    cov = coverage_mask(diff, sci)
    assert cov.dtype == np.uint8
    assert cov.shape == SHAPE
    assert cov[10, 3] == COVERAGE_OUTSIDE
    assert cov[70, 60] == COVERAGE_OUTSIDE
    assert cov[31, 71] == COVERAGE_SATURATED
    assert cov[21, 51] == 0  # SAT/CR grown into the difference only: usable area
    assert cov[5, 5] == COVERAGE_OUTSIDE  # in the edge band; the science's CR is no bit


def test_coverage_round_trip_is_atomic(tmp_path: Path) -> None:
    diff, sci = _masks()
    cov = coverage_mask(diff, sci)
    path = coverage_path(tmp_path, 2026112100013, "R22_S11")
    assert path == tmp_path / "prompt" / "coverage" / "2026112100013" / (
        "2026112100013_R22_S11.npz"
    )
    assert load_coverage(path) is None
    save_coverage(path, cov)
    np.testing.assert_array_equal(load_coverage(path), cov)
    save_coverage(path, np.zeros(SHAPE, np.uint8))  # rewritten in place (a retried detector)
    assert not load_coverage(path).any()  # type: ignore[union-attr]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_recovery_counts_the_usable_area_and_reports_the_rest() -> None:
    diff, sci = _masks()
    cov = coverage_mask(diff, sci)
    truth = [
        _row(20.0, 40.0),  # usable, found
        _row(30.0, 10.0),  # usable, missed: counts against recovery
        _row(51.0, 21.0),  # in a grown SAT/CR of the difference only: missed, counts
        _row(3.0, 40.0),  # edge band
        _row(80.0, 80.0),  # no template
        _row(73.4, 33.4),  # within 1 pixel of saturated science pixels
        _row(60.0, 40.0, flux=10.0),  # too faint to count anywhere
        _row(25.0, 25.0, kind="variable"),  # not a transient
    ]
    dia = pd.DataFrame(
        {
            "ra": [truth[0]["ra_deg"], truth[7]["ra_deg"]],
            "dec": [truth[0]["dec_deg"], truth[7]["dec_deg"]],
            "psfFlux": [1.0, 1.0],
        }
    )
    kwargs: dict[str, Any] = {"sky_e": 500.0, "read_noise_e": 6.0, "fwhm_px": 3.0}
    with_area = score_detector(dia, truth, coverage=cov, **kwargs)
    assert with_area["usable_area"] is True
    assert with_area["transients_snr10_on_detector"] == 6
    assert with_area["excluded_outside"] == 2
    assert with_area["excluded_saturated"] == 1
    assert (with_area["transients_snr10"], with_area["recovered_snr10"]) == (3, 1)
    assert with_area["false"] == 0

    everything = score_detector(dia, truth, **kwargs)
    assert everything["usable_area"] is False
    assert (everything["transients_snr10"], everything["recovered_snr10"]) == (6, 1)
    assert everything["excluded_outside"] == everything["excluded_saturated"] == 0

    total = summarize([with_area, with_area])
    assert total["recovery"] == pytest.approx(1 / 3, abs=1e-4)
    assert total["usable_area"] is True
    assert (total["transients_snr10_on_detector"], total["excluded_outside"]) == (12, 4)
    assert total["excluded_saturated"] == 2
    assert summarize([with_area, everything])["usable_area"] is False


def test_off_detector_position_is_outside() -> None:
    cov = np.zeros(SHAPE, np.uint8)
    truth = [_row(-2.0, 10.0), _row(SHAPE[1] + 0.7, 10.0), _row(50.0, 45.0)]
    out = score_detector(
        pd.DataFrame({"ra": [], "dec": [], "psfFlux": []}),
        truth,
        sky_e=500.0,
        read_noise_e=6.0,
        fwhm_px=3.0,
        coverage=cov,
    )
    assert out["excluded_outside"] == 2
    assert (out["transients_snr10"], out["recovered_snr10"]) == (1, 0)
