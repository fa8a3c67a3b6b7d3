"""False DiaSources and recovery on the chain Prompt Processing runs, against the simulator's truth.

The scenario is the facility's (``ldf.prompt.seed`` + ``ldf.prompt.worker``) on the sky the
facility simulates by default (``SimSettings``: stars at the density a full-size CCD sees), with
transients and variables as many per CCD as a full-size one too: master calibrations from
rendered calibration raws; a template per patch coadded from three visits of the field a year
earlier at 0.60–0.70″, each a raw
through ISR (cosmic rays masked) → characterization → astrometry → photometry; science visits
of the same field rendered as raws and run through the same front end, the template warped
onto them, subtracted, DiaSources detected at 5σ. Two science seeings: 0.40″ (sharper than
the template: convolveScience, the simulator's usual z-band night) and 0.90″
(convolveTemplate).

Scoring as ``benchmarks/prompt.py`` does (:mod:`ldf.prompt.validation`: a match is within 1″,
recovery counts injected transients of expected S/N ≥ 10) with two differences. Recovery
counts only transients that can be measured (no EDGE, NO_DATA or SAT pixel within 3 pixels:
on a quarter-size CCD the template's coverage gap along the edges, from the visits' different
pointing errors, is several per cent of the area). And a DiaSource is false only if it is
near neither the science visit's injected sources **nor** the transients that shone in the
template visits: a transient in all three template visits is in the coadd (no clipping can
remove it), so where it has since faded the difference is truly negative — a real flux change.

What a false rate of "≤ 5 per full-size detector" means at a 5σ threshold: Gaussian noise alone
gives 2–3.5 peaks of each sign above 5σ per full-size detector with these PSFs (the matched
filter's noise field has ``λ₂ ≈ 0.11–0.19 px⁻²``; expected peaks above ``u`` per sign
``A λ₂ (2π)^-3/2 u e^{-u²/2}``, Adler's Euler-characteristic density), so the limit is the
noise floor. A quarter-size detector has 1/16 of its area: the false counts here are small
numbers and are tested as such (Poisson), while artefacts — DiaSources at |S/N| ≥ 6, where
noise gives ~0.03 per full-size detector — must be absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.stats import poisson

from ldf.config.models import SimSettings
from ldf.pipelines import isr
from ldf.pipelines.calibs import CalibSet, make_master_bias, make_master_dark, make_master_flat
from ldf.pipelines.dia import detect_dia_sources
from ldf.pipelines.diffim import CONVOLVE_SCIENCE, CONVOLVE_TEMPLATE, subtract
from ldf.pipelines.refcat import RefcatStore
from ldf.pipelines.singleframe import single_frame
from ldf.pipelines.templates import TemplateStore, build_template
from ldf.pipelines.types import Mask
from ldf.prompt.validation import MATCH_RADIUS_ARCSEC, RECOVERY_SNR, expected_snr
from ldf.sim.conditions import conditions_for
from ldf.sim.instruments import Instrument, get_instrument
from ldf.sim.models import VisitSpec
from ldf.sim.sky import Sky, light_curve_mag
from tests.pipelines.conftest import make_visit, write_sim_raw
from tests.pipelines.test_calibs import bias_visit, dark_visit, flat_visit, raw_image

SEED = 20261121
"""The simulator's default seed (the benchmark's)."""
BAND = "r"
FIELD = (52.5, -27.8)
SCIENCE_MJD = 61001.25
TEMPLATE_SEEING = (0.60, 0.65, 0.70)
"""``seed_survey``'s template visits: ≤ 0.6 + 0.05·epoch arcsec, two nights apart, a year ago."""
SCIENCE_SEEING = {CONVOLVE_SCIENCE: 0.40, CONVOLVE_TEMPLATE: 0.90}
THRESHOLD = 5.0
ARTEFACT_SNR = 6.0
"""|S/N| above which a false DiaSource is not noise (~0.03 per full-size detector)."""
FALSE_PER_FULL_DETECTOR = 5.0
QUARTER = ("R22_S11", "R22_S01", "R22_S10")


@dataclass
class Run:
    """One science visit of one detector through the whole chain, scored against truth."""

    detector: str
    mode: str
    sources: pd.DataFrame
    recoverable: int
    """Injected transients of expected S/N ≥ 10 with no EDGE, NO_DATA or SAT pixel within 3."""
    recovered: int
    flux_ratio: np.ndarray
    """psfFlux / true flux of the recovered ones."""
    false: pd.DataFrame
    """DiaSources near no injected source (science visit or template visits)."""
    template_only: pd.DataFrame
    """DiaSources near a template-epoch transient only."""
    area_full: float
    """Detector area as a fraction of a full-size one."""


def _sky(scale: float) -> Sky:
    # Transients and variables as many per CCD as a full-size one has (the facility's default
    # scales them by 1/scale only): the statistics of recovery, and a crowded stress test.
    k, transients, variables = SimSettings(injected_density_scale=min(50.0, scale**-2)).sky(scale)
    return Sky(
        SEED, star_density_scale=k, transient_rate_deg2=transients, variable_density_deg2=variables
    )


def _visit(seq: int, mjd: float, seeing: float, *, template: bool = False) -> VisitSpec:
    cond = conditions_for(SEED, mjd, BAND, 1.1, ra_deg=FIELD[0], dec_deg=FIELD[1])
    update: dict[str, float] = {"seeing_fwhm_arcsec": seeing}
    if template:
        update["transparency"] = max(cond.transparency, 0.95)
    visit = make_visit(
        seq_num=seq,
        band=BAND,
        ra_deg=FIELD[0],
        dec_deg=FIELD[1],
        airmass=1.1,
        conditions=cond.model_copy(update=update),
    )
    return visit.model_copy(update={"start_tai_mjd": mjd})


def _template_visits() -> list[VisitSpec]:
    return [
        _visit(80001 + e, SCIENCE_MJD - 365.0 - 2.0 * e, s, template=True)
        for e, s in enumerate(TEMPLATE_SEEING)
    ]


def _calibs(camera: Instrument, detector: str) -> CalibSet:
    """Master bias, dark and flat (in BAND) from rendered calibration raws."""
    det = camera.detector(detector)
    bias = make_master_bias([raw_image(camera, det, bias_visit(k))[0] for k in range(5)], camera)
    darks = [raw_image(camera, det, dark_visit(k))[0] for k in range(3)]
    dark = make_master_dark(darks, camera, bias)
    flats = [raw_image(camera, det, flat_visit(k, BAND))[0] for k in range(3)]
    return CalibSet(bias=bias, dark=dark, flat=make_master_flat(flats, camera, bias, dark))


def _template_truth(sky: Sky, ra: float, dec: float, radius: float) -> list[dict[str, Any]]:
    """Transients shining in any template visit (kind 'template': never in the recovery)."""
    mids = [v.start_tai_mjd + v.exp_time_s / 2 / 86400 for v in _template_visits()]
    found = sky.transients(ra, dec, radius, min(mids), max(mids))
    mags = np.array([light_curve_mag(found, BAND, m) for m in mids])
    shining = np.isfinite(mags).any(axis=0)
    return [
        {"kind": "template", "ra_deg": float(s["ra"]), "dec_deg": float(s["dec"]), "flux_e": 0.0}
        for s in found[shining]
    ]


def _separation(src: pd.DataFrame, rows: list[dict[str, Any]]) -> np.ndarray:
    """(n_sources, n_rows) angular distances, arcsec."""
    ra = np.radians([r["ra_deg"] for r in rows])
    dec = np.radians([r["dec_deg"] for r in rows])
    sra, sdec = np.radians(src["ra"].to_numpy()), np.radians(src["dec"].to_numpy())
    cos_d = np.sin(sdec[:, None]) * np.sin(dec[None]) + np.cos(sdec[:, None]) * np.cos(
        dec[None]
    ) * np.cos(sra[:, None] - ra[None])
    return np.asarray(np.degrees(np.arccos(np.clip(cos_d, -1.0, 1.0))) * 3600.0)


def _near(src: pd.DataFrame, rows: list[dict[str, Any]]) -> np.ndarray:
    """Which DiaSources lie within the match radius of any of ``rows``."""
    if not len(src) or not rows:
        return np.zeros(len(src), bool)
    return np.asarray((_separation(src, rows) <= MATCH_RADIUS_ARCSEC).any(axis=1))


def _nearest(rows: list[dict[str, Any]], src: pd.DataFrame) -> np.ndarray:
    """Index of the nearest DiaSource within the match radius of each row, or −1."""
    if not len(src) or not rows:
        return np.full(len(rows), -1)
    sep = _separation(src, rows)
    best = sep.argmin(axis=0)
    return np.where(sep.min(axis=0) <= MATCH_RADIUS_ARCSEC, best, -1)


def _score(
    camera: Instrument,
    detector: str,
    mode: str,
    frame: Any,
    difference: Any,
    src: pd.DataFrame,
    truth: list[dict[str, Any]],
    template_truth: list[dict[str, Any]],
) -> Run:
    """Recovery (measurable transients of expected S/N ≥ 10), flux ratio, false DiaSources."""
    science, qa = frame.exposure, frame.quality()
    transients = [t for t in truth if t["kind"] == "transient"]
    snr = expected_snr(
        np.array([t["flux_e"] for t in transients]),
        sky_e=float(qa["sky_e_per_pixel"]),
        read_noise_e=float(np.mean([a.read_noise for a in camera.detector(detector).amplifiers])),
        fwhm_px=float(qa["seeing_arcsec"]) / camera.pixel_scale_arcsec,
    )
    # Measurable: no EDGE, NO_DATA (template coverage) or SAT pixel within 3 pixels.
    unmeasurable = np.uint16(Mask.EDGE | Mask.NO_DATA | Mask.SAT)
    good = []
    for t, s in zip(transients, snr, strict=True):
        ix, iy = round(t["x"]), round(t["y"])
        box = difference.mask[max(0, iy - 3) : iy + 4, max(0, ix - 3) : ix + 4]
        if s >= RECOVERY_SNR and not (box & unmeasurable).any():
            good.append(t)
    hit = _nearest(good, src)
    found = hit >= 0
    true_njy = np.array([t["flux_e"] for t in good]) * science.njy_per_electron()
    in_science, in_template = _near(src, truth), _near(src, template_truth)
    return Run(
        detector=detector,
        mode=mode,
        sources=src,
        recoverable=len(good),
        recovered=int(found.sum()),
        flux_ratio=src["psfFlux"].to_numpy()[hit[found]] / true_njy[found],
        false=src[~in_science & ~in_template],
        template_only=src[~in_science & in_template],
        area_full=camera.scale**2,
    )


def run_chain(camera: Instrument, detectors: tuple[str, ...], root: Path) -> list[Run]:
    """Seed (calibs, refcat, templates) and process both science seeings on each detector."""
    sky = _sky(camera.scale)
    refcat = RefcatStore(root / "refcat")
    det0 = camera.detector(detectors[0])
    radius = math.hypot(det0.nx, det0.ny) * camera.pixel_scale_arcsec / 3600.0 * 3 + 0.05
    refcat.ingest_region(sky, FIELD[0], FIELD[1], radius)
    runs = []
    for name in detectors:
        det = camera.detector(name)
        calibs = _calibs(camera, name)
        work = root / name

        def calibrate(visit: VisitSpec) -> tuple[Any, list[dict[str, Any]]]:
            path, readout = write_sim_raw(work, camera, det, visit, sky, seed=SEED)  # noqa: B023
            frame = single_frame(isr.read_raw(path), camera, calibs, refcat)  # noqa: B023
            return frame, [t.model_dump(mode="json") for t in readout.truth]

        store = TemplateStore(work / "templates")
        inputs = [calibrate(v)[0].exposure for v in _template_visits()]
        for patch in store.skymap.patches_overlapping(inputs[0].wcs, inputs[0].shape):
            store.save(build_template(inputs, store.skymap, patch, BAND))
        for k, (mode, seeing) in enumerate(SCIENCE_SEEING.items()):
            frame, truth = calibrate(_visit(1 + k, SCIENCE_MJD, seeing))
            science = frame.exposure
            template = store.warp_to(BAND, science.wcs, science.shape, info=science.info)
            diff = subtract(science, template, sources=frame.characterization.sources)
            assert diff.mode == mode
            src = detect_dia_sources(diff.difference, science, diff.template, threshold=THRESHOLD)
            ny, nx = science.shape
            ra, dec = (float(v) for v in science.wcs.wcs_pix2world(nx / 2, ny / 2, 0))
            radius = math.hypot(nx, ny) / 2 * camera.pixel_scale_arcsec / 3600 + 0.002
            extra = _template_truth(sky, ra, dec, radius)
            runs.append(_score(camera, name, mode, frame, diff.difference, src, truth, extra))
    return runs


@pytest.fixture(scope="module")
def quarter_runs(small_camera: Instrument, tmp_path_factory: pytest.TempPathFactory) -> list[Run]:
    return run_chain(small_camera, QUARTER, tmp_path_factory.mktemp("fp"))


def _summary(runs: list[Run], mode: str) -> tuple[int, float, int, int, float]:
    sel = [r for r in runs if r.mode == mode]
    false = sum(len(r.false) for r in sel)
    area = sum(r.area_full for r in sel)
    bright = sum(r.recoverable for r in sel)
    found = sum(r.recovered for r in sel)
    ratios = np.concatenate([r.flux_ratio for r in sel])
    print(
        f"\n{mode}: {len(sel)} detector-visits ({area:.3g} full-size), recovered {found}/{bright}"
        f" S/N≥10 transients, {false} false ({false / area:.2f} per full-size detector), "
        f"{sum(len(r.template_only) for r in sel)} at template-epoch transients, "
        f"flux ratio {np.median(ratios):.4f}"
    )
    for r in sel:
        if len(r.false):
            print(r.false[["x", "y", "snr", "psfFlux", "reliability", "scienceFlux"]].round(2))
    return false, area, bright, found, float(np.median(ratios))


def _check(runs: list[Run], mode: str) -> None:
    false, area, bright, found, ratio = _summary(runs, mode)
    assert bright >= 20 * sum(r.mode == mode for r in runs)
    assert found / bright >= 0.95
    assert abs(ratio - 1.0) < 0.03
    # No artefacts: a false DiaSource this significant is not noise.
    strong = [r.false[np.abs(r.false["snr"]) >= ARTEFACT_SNR] for r in runs if r.mode == mode]
    assert sum(len(s) for s in strong) == 0, pd.concat(strong)
    # The false count is consistent with ≤ 5 per full-size detector (one-sided Poisson, 5 %).
    assert poisson.sf(false - 1, FALSE_PER_FULL_DETECTOR * area) > 0.05, (false, area)


def test_convolve_science_false_positives_and_recovery(quarter_runs: list[Run]) -> None:
    _check(quarter_runs, CONVOLVE_SCIENCE)


def test_convolve_template_false_positives_and_recovery(quarter_runs: list[Run]) -> None:
    _check(quarter_runs, CONVOLVE_TEMPLATE)


def test_faded_template_transients_are_negative(quarter_runs: list[Run]) -> None:
    """DiaSources only a template-epoch transient explains: negative, flux gone from the science."""
    rows = pd.concat([r.template_only for r in quarter_runs])
    print(f"\n{len(rows)} DiaSources at transients of the template epoch")
    assert len(rows) >= 5
    ok = rows["isNegative"] & (rows["templateFlux"] > 0)
    assert ok.mean() >= 0.9, rows[~ok]
    assert (rows["scienceFlux"].abs() < 0.5 * rows["templateFlux"]).mean() >= 0.9


@pytest.mark.slow
def test_full_size_detector(tmp_path: Path) -> None:
    """The same on one full-size LSSTCam detector (both modes)."""
    runs = run_chain(get_instrument("LSSTCam", 1.0), ("R22_S11",), tmp_path)
    for mode in (CONVOLVE_SCIENCE, CONVOLVE_TEMPLATE):
        _check(runs, mode)
