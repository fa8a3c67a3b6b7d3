"""DIA sources against the simulator's truth: recovery, photometry, false detections, artefacts.

The acceptance scenario of the issue: ``rich_sky`` (many injected transients), a template
coadded from five visits 300 days before the science visits (seeing 0.60–0.70″) and science
visits at 0.85″ and 0.95″ on three quarter-size detectors. Truth S/N of a source is its flux
change since the template epoch over the PSF-weighted noise of science and template (sky,
read noise and the source's own photons, from the simulator's sky brightness and zero points).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.spatial import cKDTree

from ldf.pipelines.dia import (
    DIA_SOURCE_COLUMNS,
    RELIABILITY_CUT,
    detect_dia_sources,
    forced_photometry,
)
from ldf.pipelines.diffim import CONVOLVE_SCIENCE, DifferenceResult, subtract
from ldf.pipelines.types import DetectorError, Exposure, Mask
from ldf.sim.camera import apply_saturation
from ldf.sim.instruments import Detector, Instrument
from ldf.sim.models import VisitSpec
from ldf.sim.psf import MoffatPsf, add_point_sources
from ldf.sim.sky import Sky
from tests.pipelines.test_templates import (
    SCIENCE_MJD,
    build_store,
    calibrated_copy,
    field_visit,
    injected_truth,
    isolated,
    psf_model,
    template_visits,
)

DETECTORS = ("R22_S11", "R22_S00", "R22_S22")
SCIENCE = ((1, SCIENCE_MJD, 0.85, 3.0, -2.0), (2, SCIENCE_MJD + 7.3, 0.95, -4.0, 3.0))
"""(seq, MJD, seeing ″, ΔRA ″, ΔDec ″) of the science visits."""
MATCH_PX = 5.0
"""1″: a DiaSource matches an injected source within this many pixels."""
FULL_SIZE_AREA = 16.0
"""A quarter-size detector is 1/16 of a full one."""


@dataclass
class Run:
    """One science visit of one detector, subtracted and searched."""

    detector: Detector
    visit: VisitSpec
    science: Exposure
    template: Exposure
    result: DifferenceResult
    sources: pd.DataFrame
    truth: dict[str, np.ndarray]
    """Injected sources (both epochs): x, y, ra, dec, id, f_sci, f_tmpl (nJy), d_flux, snr."""


def _sky_variance_e(instrument: Instrument, detector: Detector, visit: VisitSpec) -> float:
    """Per-pixel variance of the sky plus read noise (electrons²), from the simulator's model."""
    cond = visit.conditions
    assert cond is not None
    assert visit.band is not None
    zp, k = instrument.zero_points[visit.band], instrument.extinction[visit.band]
    sky_e = (
        10 ** (-0.4 * (cond.sky_mag_arcsec2 - zp - k))
        * instrument.pixel_scale_arcsec**2
        * visit.exp_time_s
    )
    return sky_e + float(np.mean([a.read_noise**2 for a in detector.amplifiers]))


def _truth(
    instrument: Instrument,
    detector: Detector,
    sky: Sky,
    visit: VisitSpec,
    science: Exposure,
    tvisits: list[VisitSpec],
) -> dict[str, np.ndarray]:
    mid = visit.start_tai_mjd + visit.exp_time_s / 2 / 86400
    tmids = [v.start_tai_mjd + v.exp_time_s / 2 / 86400 for v in tvisits]
    tr = injected_truth(sky, science, mid, tmids)
    assert science.psf is not None
    nj = science.njy_per_electron()
    var_s = (
        science.psf.noise_equivalent_area * _sky_variance_e(instrument, detector, visit)
        + np.maximum(tr["f_sci"], 0.0) / nj
    ) * nj**2
    # The template: the coadd of the visits with weights 1 / (sky variance in nJy²).
    weights, variances = [], []
    for tv in tvisits:
        exp, _ = calibrated_copy(instrument, detector, tv, sky)
        assert exp.psf is not None
        ntj = exp.njy_per_electron()
        sv = _sky_variance_e(instrument, detector, tv)
        weights.append(1.0 / (sv * ntj**2))
        variances.append(
            (exp.psf.noise_equivalent_area * sv + np.maximum(tr["f_tmpl"], 0.0) / ntj) * ntj**2
        )
    w = np.array(weights)
    var_t = np.sum(w[:, None] ** 2 * np.array(variances), axis=0) / w.sum() ** 2
    tr["d_flux"] = tr["f_sci"] - tr["f_tmpl"]
    tr["snr"] = np.abs(tr["d_flux"]) / np.sqrt(var_s + var_t)
    return tr


@pytest.fixture(scope="module")
def runs(
    small_camera: Instrument, rich_sky: Sky, tmp_path_factory: pytest.TempPathFactory
) -> list[Run]:
    tvisits = template_visits()
    out = []
    for name in DETECTORS:
        det = small_camera.detector(name)
        store = build_store(tmp_path_factory.mktemp(name), small_camera, det, rich_sky, tvisits)
        for seq, mjd, seeing, dra, ddec in SCIENCE:
            visit = field_visit(seq, mjd, seeing, dra, ddec)
            sci, _ = calibrated_copy(small_camera, det, visit, rich_sky)
            assert sci.wcs is not None
            tmpl = store.warp_to("r", sci.wcs, sci.shape, info=sci.info)
            res = subtract(sci, tmpl)
            src = detect_dia_sources(res.difference, sci, tmpl)
            truth = _truth(small_camera, det, rich_sky, visit, sci, tvisits)
            out.append(Run(det, visit, sci, tmpl, res, src, truth))
    return out


def _recoverable(run: Run, min_snr: float = 10.0) -> np.ndarray:
    """Truth sources with S/N ≥ min_snr on unmasked pixels and not blended.

    Excluded: within 3 px of EDGE, NO_DATA or SAT pixels of the difference (nothing can be
    measured there), and sources with a brighter-or-comparable change within 11 px (2.5
    FWHM: one blend, which a deblender would have to split).
    """
    tr = run.truth
    ny, nx = run.science.shape
    x, y = tr["x"], tr["y"]
    inside = (x > 3) & (x < nx - 4) & (y > 3) & (y < ny - 4)
    ix = np.clip(np.rint(x).astype(int), 3, nx - 4)
    iy = np.clip(np.rint(y).astype(int), 3, ny - 4)
    bad_bits = np.uint16(Mask.EDGE | Mask.NO_DATA | Mask.SAT)
    m = run.result.difference.mask
    masked = np.array(
        [
            bool(np.any(m[b - 3 : b + 4, a - 3 : a + 4] & bad_bits))
            for a, b in zip(ix, iy, strict=True)
        ]
    )
    blended = ~isolated(x, y, tr["d_flux"], 11.0)
    return inside & (tr["snr"] >= min_snr) & ~masked & ~blended


def _match(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Distance (px) from each truth source to the nearest DiaSource, and its row index."""
    src = run.sources
    if not len(src):
        n = run.truth["x"].size
        return np.full(n, np.inf), np.zeros(n, int)
    tree = cKDTree(np.stack([src["x"], src["y"]], axis=1))
    d, j = tree.query(np.stack([run.truth["x"], run.truth["y"]], axis=1))
    return d, j


def test_injected_transients_are_recovered(runs: list[Run]) -> None:
    n_sel = n_rec = 0
    for run in runs:
        sel = _recoverable(run)
        d, _ = _match(run)
        n_sel += int(sel.sum())
        n_rec += int((sel & (d < MATCH_PX)).sum())
        assert run.result.n_stamps >= 5
    frac = n_rec / n_sel
    print(f"\nrecovered {n_rec} of {n_sel} injected sources with true S/N >= 10: {frac:.1%}")
    assert n_sel > 500
    assert frac >= 0.95


def test_psf_flux_measures_the_true_flux_change(runs: list[Run]) -> None:
    pulls, rel = [], []
    for run in runs:
        sel = _recoverable(run)
        d, j = _match(run)
        ok = sel & (d < MATCH_PX)
        flux = run.sources["psfFlux"].to_numpy()[j[ok]]
        err = run.sources["psfFluxErr"].to_numpy()[j[ok]]
        true = run.truth["d_flux"][ok]
        pulls.append((flux - true) / err)
        bright = run.truth["snr"][ok] > 50
        rel.append((flux[bright] - true[bright]) / np.abs(true[bright]))
    p = np.concatenate(pulls)
    r = np.concatenate(rel)
    print(
        f"\npsfFlux − true change: median {np.median(p):+.2f}σ, mean {np.mean(p):+.2f}σ, "
        f"rms {np.std(p):.2f}σ over {p.size}; S/N > 50: median {100 * np.median(r):+.2f}% "
        f"({r.size} sources)"
    )
    assert abs(float(np.median(p))) < 0.5
    assert float(np.median(np.abs(p))) < 1.2
    assert np.mean(np.abs(p) < 3) > 0.9
    assert abs(float(np.median(r))) < 0.02


def test_few_false_detections_per_detector(runs: list[Run]) -> None:
    false = flagged = 0
    for run in runs:
        src = run.sources
        if not len(src):
            continue
        moved = np.abs(run.truth["d_flux"]) > 0
        tree = cKDTree(np.stack([run.truth["x"][moved], run.truth["y"][moved]], axis=1))
        d, _ = tree.query(np.stack([src["x"], src["y"]], axis=1))
        is_false = d >= MATCH_PX
        false += int(is_false.sum())
        flags = src[["pixelFlags_saturated", "pixelFlags_edge", "pixelFlags_nodata"]].any(axis=1)
        flagged += int((is_false & flags.to_numpy()).sum())
    per_full = false / len(runs) * FULL_SIZE_AREA
    print(
        f"\nfalse DiaSources: {false} in {len(runs)} quarter-size detectors ({flagged} flagged)"
        f" = {per_full:.1f} per full-size-equivalent detector"
    )
    assert per_full <= 5.0


def test_dia_source_columns_are_apdb_names(runs: list[Run]) -> None:
    text = resources.files("lsst.sdm.schemas").joinpath("apdb.yaml").read_text()
    schema = yaml.safe_load(text)
    table = next(t for t in schema["tables"] if t["name"] == "DiaSource")
    names = {c["name"] for c in table["columns"]}
    src = runs[0].sources
    assert list(src.columns) == list(DIA_SOURCE_COLUMNS)
    assert set(src.columns) <= names
    assert (src["reliability"] >= RELIABILITY_CUT).all()
    assert (src["band"] == "r").all()
    assert src["isNegative"].any()
    assert (~src["isNegative"]).any()
    assert np.allclose(src["isNegative"], src["psfFlux"] < 0)
    # ra/dec from the science WCS.
    wcs = runs[0].science.wcs
    assert wcs is not None
    ra, dec = wcs.all_pix2world(src["x"], src["y"], 0)
    assert np.allclose(src["ra"], ra)
    assert np.allclose(src["dec"], dec)
    # The science and template fluxes of a new transient: science ≈ psfFlux, template ≈ 0.
    tr = runs[0].truth
    d, j = _match(runs[0])
    new = _recoverable(runs[0], 30.0) & (d < MATCH_PX) & (tr["f_tmpl"] == 0)
    assert new.sum() >= 5
    rows = src.iloc[j[new]]
    assert np.median(np.abs(rows["scienceFlux"] - rows["psfFlux"]) / rows["psfFluxErr"]) < 3
    assert np.median(np.abs(rows["templateFlux"]) / rows["psfFluxErr"]) < 3


# -- artefacts ---------------------------------------------------------------------------------


def _clean_spot(run: Run, avoid: list[tuple[float, float]], half: int = 30) -> tuple[float, float]:
    """A position with no source and no mask within ``half`` pixels."""
    sci, diff = run.science, run.result.difference
    ny, nx = sci.shape
    tr = run.truth
    sigma = float(np.sqrt(np.median(sci.variance)))
    for y in range(80, ny - 80, 37):
        for x in range(80, nx - 80, 41):
            sl = (slice(y - half, y + half + 1), slice(x - half, x + half + 1))
            if np.abs(sci.image[sl]).max() > 6 * sigma or diff.mask[sl].any():
                continue
            if np.min(np.hypot(tr["x"] - x, tr["y"] - y)) < half:
                continue
            if any(math.hypot(ax - x, ay - y) < 3 * half for ax, ay in avoid):
                continue
            return x + 0.3, y + 0.2
    raise AssertionError("no clean spot")


def test_saturated_star_gives_flagged_sources_or_none(runs: list[Run]) -> None:
    run = runs[0]
    sci, tmpl = run.science.copy(), run.template.copy()
    assert sci.psf is not None
    assert tmpl.psf is not None
    x0, y0 = _clean_spot(run, [])
    f_njy = 10 ** (-0.4 * (11.5 - 31.4))
    # The science: the star, saturated with its bleed trail, as the camera records it.
    before = sci.image.copy()
    add_point_sources(
        sci.image, np.array([x0]), np.array([y0]), np.array([f_njy / sci.njy_per_electron()]),
        MoffatPsf(sci.psf.fwhm_px),
    )  # fmt: skip
    sci.image += np.float32(sci.background_level or 0.0)
    apply_saturation(sci.image, run.detector)
    sci.image -= np.float32(sci.background_level or 0.0)
    full_well = min(a.full_well for a in run.detector.amplifiers)
    sat = sci.image + (sci.background_level or 0.0) >= 0.98 * full_well - 1.0
    sci.mask[sat] |= np.uint16(Mask.SAT)
    sci.variance += np.maximum(sci.image - before, 0.0)
    assert sat.sum() > 50  # a real bleed trail
    # The template: the same star; where the inputs saturated, the coadd has no data.
    add_point_sources(
        tmpl.image, np.array([x0]), np.array([y0]), np.array([f_njy]), MoffatPsf(tmpl.psf.fwhm_px)
    )
    tsat = tmpl.image / sci.njy_per_electron() >= 0.98 * full_well
    tmpl.mask[tsat] |= np.uint16(Mask.SAT | Mask.NO_DATA)
    tmpl.image[tsat] = 0.0
    res = subtract(sci, tmpl)
    assert res.difference.mask[round(y0), round(x0)] & np.uint16(Mask.SAT)
    src = detect_dia_sources(res.difference, sci, tmpl)
    # DiaSources the star brought (none of the run's own within 3 px) must all be flagged.
    old = cKDTree(np.stack([run.sources["x"], run.sources["y"]], axis=1))
    d, _ = old.query(np.stack([src["x"], src["y"]], axis=1))
    new = src[d > 3]
    flagged = new[["pixelFlags_saturated", "pixelFlags_nodata"]].any(axis=1)
    print(f"\nsaturated star: {len(new)} new DiaSources, {int(flagged.sum())} flagged")
    assert flagged.all(), new[["x", "y", "snr", "pixelFlags_saturated"]]
    assert (np.hypot(new["x"] - x0, new["y"] - y0) < 150).all()


def test_shifted_star_is_one_dipole(runs: list[Run]) -> None:
    run = runs[0]
    sci, tmpl = run.science.copy(), run.template.copy()
    assert sci.psf is not None
    assert tmpl.psf is not None
    x0, y0 = _clean_spot(run, [])
    f_njy = 10 ** (-0.4 * (17.5 - 31.4))
    before = sci.image.copy()
    add_point_sources(
        sci.image, np.array([x0 + 0.5]), np.array([y0]), np.array([f_njy / sci.njy_per_electron()]),
        MoffatPsf(sci.psf.fwhm_px),
    )  # fmt: skip
    sci.variance += sci.image - before
    add_point_sources(
        tmpl.image, np.array([x0]), np.array([y0]), np.array([f_njy]), MoffatPsf(tmpl.psf.fwhm_px)
    )
    res = subtract(sci, tmpl)
    src = detect_dia_sources(res.difference, sci, tmpl)
    near = src[np.hypot(src["x"] - x0, src["y"] - y0) < 10]
    print(f"\ndipole: {near[['x', 'y', 'snr', 'psfFlux', 'dipoleMeanFlux', 'dipoleLength']]}")
    assert len(near) == 1
    row = near.iloc[0]
    assert row["isDipole"]
    assert row["dipoleFitAttempted"]
    assert abs(row["psfFlux"]) < 3 * row["psfFluxErr"]  # no net change of flux
    # For a shift much smaller than the PSF only lobe flux × separation is measured:
    # F · 0.1″ for a 0.5-pixel shift.
    moment = row["dipoleMeanFlux"] * row["dipoleLength"]
    assert moment == pytest.approx(f_njy * 0.5 * sci.pixel_scale_arcsec, rel=0.3)
    # From the negative to the positive lobe: +x, which is West (bearing 270°).
    assert abs(((row["dipoleAngle"] - 270.0) + 180.0) % 360.0 - 180.0) < 20.0
    assert abs(row["x"] - (x0 + 0.25)) < 1.5
    assert abs(row["y"] - y0) < 1.5


def test_cosmic_ray_and_hot_pixel_are_not_sources(runs: list[Run]) -> None:
    run = runs[0]
    sci = run.science.copy()
    (xa, ya) = _clean_spot(run, [])
    (xb, yb) = _clean_spot(run, [(xa, ya)])
    ia, ja = round(xa), round(ya)
    track = [(ja + k, ia + k // 2) for k in range(9)]  # a 9-pixel track, 1 pixel wide
    for r, c in track:
        sci.image[r, c] += 1500.0
        sci.variance[r, c] += 1500.0
    sci.image[round(yb), round(xb)] += 4000.0
    sci.variance[round(yb), round(xb)] += 4000.0
    res = subtract(sci, run.template)
    seen = detect_dia_sources(res.difference, sci, run.template, min_reliability=0.0)
    kept = detect_dia_sources(res.difference, sci, run.template)
    for x, y in ((xa + 2, ya + 4), (xb, yb)):
        close = np.hypot(seen["x"] - x, seen["y"] - y) < 6
        assert close.any()  # detected…
        assert (seen.loc[close, "reliability"] < RELIABILITY_CUT).all()  # …and rejected
        assert not (np.hypot(kept["x"] - x, kept["y"] - y) < 6).any()
    # Masked as CR (as ISR will), the hit is not even detected, and flagged if next to one.
    sci.mask[tuple(np.array(track).T)] |= np.uint16(Mask.CR)
    res = subtract(sci, run.template)
    seen = detect_dia_sources(res.difference, sci, run.template, min_reliability=0.0)
    assert not (np.hypot(seen["x"] - (xa + 2), seen["y"] - (ya + 4)) < 3).any()


def test_bright_star_residual_is_not_a_source(runs: list[Run]) -> None:
    """A subtraction leaves a fraction of a per cent of a bright star (kernel and PSF-model
    errors): that is no DiaSource, while a star that really changed by 20 % is one."""
    run = runs[0]
    x0, y0 = _clean_spot(run, [])
    f_njy = 10 ** (-0.4 * (17.0 - 31.4))
    found = {}
    for change in (0.012, 0.2):
        sci, tmpl = run.science.copy(), run.template.copy()
        assert sci.psf is not None
        assert tmpl.psf is not None
        flux_e = f_njy * (1.0 + change) / sci.njy_per_electron()
        before = sci.image.copy()
        add_point_sources(
            sci.image, np.array([x0]), np.array([y0]), np.array([flux_e]),
            MoffatPsf(sci.psf.fwhm_px),
        )  # fmt: skip
        sci.variance += sci.image - before
        add_point_sources(
            tmpl.image, np.array([x0]), np.array([y0]), np.array([f_njy]),
            MoffatPsf(tmpl.psf.fwhm_px),
        )  # fmt: skip
        res = subtract(sci, tmpl)
        src = detect_dia_sources(res.difference, sci, tmpl)
        found[change] = src[np.hypot(src["x"] - x0, src["y"] - y0) < 20]
        print(f"\n{change:.1%} brighter: {found[change][['x', 'y', 'snr', 'psfFlux']]}")
    assert len(found[0.012]) == 0
    assert len(found[0.2]) == 1
    assert found[0.2]["psfFlux"].iloc[0] == pytest.approx(0.2 * f_njy, rel=0.1)


def test_cosmic_ray_tracks_isr_missed_are_not_sources(
    small_camera: Instrument, rich_sky: Sky, tmp_path: Path
) -> None:
    """Faint cosmic-ray tracks (4 σ per pixel: below ISR's 6 σ threshold) in a sharp science
    image, smoothed into ridges by the convolveScience kernel: detected, and rejected —
    whether wholly unmasked, masked in part, or ending at the detection."""
    det = small_camera.detector("R22_S11")
    tvisits = template_visits(seeing=(0.9, 0.95, 0.92, 0.88, 0.97), first_seq=300)
    store = build_store(tmp_path, small_camera, det, rich_sky, tvisits)
    visit = field_visit(1, SCIENCE_MJD, 0.6, 3.0, -2.0)
    sci, _ = calibrated_copy(small_camera, det, visit, rich_sky)
    assert sci.wcs is not None
    tmpl = store.warp_to("r", sci.wcs, sci.shape, info=sci.info)
    base = subtract(sci, tmpl)
    run = Run(det, visit, sci, tmpl, base, pd.DataFrame({"x": [], "y": []}), {})
    run.truth = _truth(small_camera, det, rich_sky, visit, sci, tvisits)
    sigma = float(np.sqrt(np.median(sci.variance)))
    spots: list[tuple[float, float]] = []
    tracks: list[tuple[np.ndarray, float, float]] = []
    for length, slope, masked in ((24, 0.4, 0), (30, -1.7, 5), (14, 0.9, 0)):
        x0, y0 = _clean_spot(run, spots)
        spots.append((x0, y0))
        steps = np.arange(2 * length) / 2.0
        dx, dy = steps / math.hypot(1.0, slope), steps * slope / math.hypot(1.0, slope)
        cols = np.rint(x0 - dx.max() / 2 + dx).astype(int)
        rows = np.rint(y0 - dy.max() / 2 + dy).astype(int)
        track = sorted(set(zip(rows.tolist(), cols.tolist(), strict=True)))
        for r, c in track:
            sci.image[r, c] += 4.0 * sigma
            sci.variance[r, c] += 4.0 * sigma
        for r, c in track[:masked]:  # ISR found the brightest few pixels of this one
            sci.mask[r, c] |= np.uint16(Mask.CR | Mask.INTRP)
            sci.image[r, c] = 0.0
        tracks.append((np.array(track), x0, y0))
    res = subtract(sci, tmpl)
    assert res.mode == CONVOLVE_SCIENCE
    seen = detect_dia_sources(res.difference, sci, tmpl, min_reliability=0.0)
    kept = detect_dia_sources(res.difference, sci, tmpl)
    for pix, x0, y0 in tracks:
        d = np.min(np.hypot(seen["x"].to_numpy()[:, None] - pix[None, :, 1],
                            seen["y"].to_numpy()[:, None] - pix[None, :, 0]), axis=1)  # fmt: skip
        on_track = seen[d < 3]
        print(f"\ntrack at {x0:.0f},{y0:.0f}: {on_track[['x', 'y', 'snr', 'reliability']]}")
        assert len(on_track), "the track is not even detected: the test tests nothing"
        assert (on_track["reliability"] < RELIABILITY_CUT).all()
        dk = np.min(np.hypot(kept["x"].to_numpy()[:, None] - pix[None, :, 1],
                             kept["y"].to_numpy()[:, None] - pix[None, :, 0]), axis=1)  # fmt: skip
        assert not (dk < 3).any()


def test_transients_beside_stars_in_sharp_seeing_are_kept(
    small_camera: Instrument, rich_sky: Sky, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crowded field in sharp seeing: a star's core a few pixels from a transient is as
    narrow as a cosmic-ray track along a line through both. The star is in the template, a
    track is not: the transient is kept (and it was not, without that). (Closer to a
    brighter star the matching-error term of the S/N takes over: not tested here.)"""
    import ldf.pipelines.dia as dia

    det = small_camera.detector("R22_S11")
    tvisits = template_visits(seeing=(0.9, 0.95, 0.92, 0.88, 0.97), first_seq=300)
    store = build_store(tmp_path, small_camera, det, rich_sky, tvisits)
    visit = field_visit(1, SCIENCE_MJD, 0.5, 3.0, -2.0)
    sci, _ = calibrated_copy(small_camera, det, visit, rich_sky)
    assert sci.wcs is not None
    assert sci.psf is not None
    tmpl = store.warp_to("r", sci.wcs, sci.shape, info=sci.info)
    assert tmpl.psf is not None
    run = Run(det, visit, sci, tmpl, subtract(sci, tmpl), pd.DataFrame(), {})
    run.truth = _truth(small_camera, det, rich_sky, visit, sci, tvisits)
    before_s, before_t = sci.image.copy(), tmpl.image.copy()
    pairs = []  # (transient x, y): a star of r = 18–19.5 lies 5–8 pixels away
    spots: list[tuple[float, float]] = []
    for k, (mag, sep, angle) in enumerate(
        ((18.0, 6.0, 0.3), (18.5, 5.0, 1.9), (19.0, 7.0, 3.6), (19.5, 8.0, 5.0), (18.8, 6.5, 2.6))
    ):
        xs, ys = _clean_spot(run, spots)
        spots.append((xs, ys))
        xt, yt = xs + sep * math.cos(angle), ys + sep * math.sin(angle)
        star = 10 ** (-0.4 * (mag - 31.4))
        transient = 10 ** (-0.4 * (21.5 + 0.2 * k - 31.4))
        add_point_sources(
            sci.image, np.array([xs, xt]), np.array([ys, yt]),
            np.array([star, transient]) / sci.njy_per_electron(), MoffatPsf(sci.psf.fwhm_px),
        )  # fmt: skip
        add_point_sources(
            tmpl.image, np.array([xs]), np.array([ys]),
            np.array([star]) / tmpl.njy_per_electron(), MoffatPsf(tmpl.psf.fwhm_px),
        )  # fmt: skip
        pairs.append((xt, yt))
    sci.variance += np.maximum(sci.image - before_s, 0.0)
    tmpl.variance += np.maximum(tmpl.image - before_t, 0.0) * tmpl.njy_per_electron()
    res = subtract(sci, tmpl)
    assert res.mode == CONVOLVE_SCIENCE

    def kept(src: pd.DataFrame) -> list[bool]:
        return [bool((np.hypot(src["x"] - x, src["y"] - y) < 2).any()) for x, y in pairs]

    with_template = kept(detect_dia_sources(res.difference, sci, tmpl))
    monkeypatch.setattr(dia, "_TRACK_STATIC_SIGMA", math.inf)  # the template ignored
    without = kept(detect_dia_sources(res.difference, sci, tmpl))
    print(f"\nkept with the template's veto {with_template}, without {without}")
    assert all(with_template)
    assert not all(without), "no transient was at risk: the test tests nothing"


def test_convolve_science_path(small_camera: Instrument, rich_sky: Sky, tmp_path: Path) -> None:
    det = small_camera.detector("R22_S11")
    tvisits = template_visits(seeing=(0.9, 0.95, 0.92, 0.88, 0.97), first_seq=300)
    store = build_store(tmp_path, small_camera, det, rich_sky, tvisits)
    n_sel = n_rec = false = 0
    pulls = []
    specs = ((1, SCIENCE_MJD, 0.6, 3.0, -2.0), (2, SCIENCE_MJD + 7.3, 0.65, -4.0, 3.0))
    for seq, mjd, seeing, dra, ddec in specs:
        visit = field_visit(seq, mjd, seeing, dra, ddec)
        sci, _ = calibrated_copy(small_camera, det, visit, rich_sky)
        assert sci.wcs is not None
        tmpl = store.warp_to("r", sci.wcs, sci.shape, info=sci.info)
        res = subtract(sci, tmpl)
        assert res.mode == CONVOLVE_SCIENCE
        src = detect_dia_sources(res.difference, sci, tmpl)
        run = Run(
            det,
            visit,
            sci,
            tmpl,
            res,
            src,
            _truth(small_camera, det, rich_sky, visit, sci, tvisits),
        )
        sel = _recoverable(run)
        d, j = _match(run)
        ok = sel & (d < MATCH_PX)
        n_sel += int(sel.sum())
        n_rec += int(ok.sum())
        pulls.append(
            (src["psfFlux"].to_numpy()[j[ok]] - run.truth["d_flux"][ok])
            / src["psfFluxErr"].to_numpy()[j[ok]]
        )
        moved = np.abs(run.truth["d_flux"]) > 0
        tree = cKDTree(np.stack([run.truth["x"][moved], run.truth["y"][moved]], axis=1))
        dd, _ = tree.query(np.stack([src["x"], src["y"]], axis=1))
        false += int((dd >= MATCH_PX).sum())
    p = np.concatenate(pulls)
    print(
        f"\nconvolveScience: recovered {n_rec}/{n_sel} ({n_rec / n_sel:.1%}), pull median "
        f"{np.median(p):+.2f}σ, false {false} in {len(specs)} quarter-size detectors"
    )
    assert n_rec / n_sel >= 0.95
    assert abs(float(np.median(p))) < 0.5
    assert false <= len(specs)  # ≤ 1 per quarter-size detector (see the module report)


def test_forced_photometry_at_object_positions(runs: list[Run]) -> None:
    run = runs[1]
    tr = run.truth
    sel = _recoverable(run, 10.0)
    ids = np.arange(sel.sum()) + 1000
    objects = pd.DataFrame({"diaObjectId": ids, "ra": tr["ra"][sel], "dec": tr["dec"][sel]})
    off = pd.DataFrame({"diaObjectId": [1], "ra": [float(tr["ra"][0]) + 1.0], "dec": [0.0]})
    forced = forced_photometry(run.result.difference, run.science, pd.concat([objects, off]))
    apdb = {"diaObjectId", "ra", "dec", "psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr"}
    assert apdb <= set(forced.columns)
    assert 1 not in set(forced["diaObjectId"])  # off the detector
    assert sorted(forced["diaObjectId"]) == list(ids)
    pull = (forced["psfFlux"].to_numpy() - tr["d_flux"][sel]) / forced["psfFluxErr"].to_numpy()
    print(f"\nforced psfFlux − true change: median {np.median(pull):+.2f}σ over {pull.size}")
    assert abs(float(np.median(pull))) < 0.5
    assert np.mean(np.abs(pull) < 3) > 0.9
    assert (forced["band"] == "r").all()
    with pytest.raises(DetectorError, match="diaObjectId"):
        forced_photometry(run.result.difference, run.science, pd.DataFrame({"ra": [1.0]}))


def test_bad_inputs_are_detector_errors(runs: list[Run]) -> None:
    run = runs[0]
    diff = run.result.difference
    with pytest.raises(DetectorError, match="has no PSF") as info:
        detect_dia_sources(diff.copy(psf=None), run.science)
    assert info.value.stage == "dia"
    with pytest.raises(DetectorError, match="lacks a PSF, WCS or zero point"):
        detect_dia_sources(diff, run.science.copy(zero_point=None))
    small = diff.copy(image=diff.image[:100], variance=diff.variance[:100], mask=diff.mask[:100])
    with pytest.raises(DetectorError, match="differ in shape"):
        detect_dia_sources(small, run.science)
    # A blank difference: no sources, and still the APDB columns.
    blank = diff.copy()
    blank.image[:] = 0.0
    empty = detect_dia_sources(blank, run.science, psf_model_check(run))
    assert len(empty) == 0
    assert list(empty.columns) == list(DIA_SOURCE_COLUMNS)


def psf_model_check(run: Run) -> Exposure:
    """The run's template with a PSF model rebuilt from scratch (same FWHM)."""
    tmpl = run.template.copy()
    assert tmpl.psf is not None
    tmpl.psf = psf_model(tmpl.psf.fwhm_px)
    return tmpl
