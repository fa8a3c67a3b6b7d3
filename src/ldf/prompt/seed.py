"""The survey so far: what Prompt Processing needs before the first night of the simulator.

A real facility starts a night with master calibrations from the calibration products
pipeline, a reference catalogue (Gaia), and difference-imaging templates built from earlier
visits of the same fields. The simulator's first night has no past, so :func:`seed_survey`
makes one, each part only when it is missing:

* **Reference catalogue**: the simulated sky's stars ingested for each field
  (:meth:`ldf.pipelines.refcat.RefcatStore.ingest_region`: that is "ingesting Gaia" here).
* **Master calibrations**: the camera takes a calibration block (biases, darks, flats in the
  night's bands) the day before; the masters are built from those raws
  (:mod:`ldf.pipelines.calibs`).
* **Templates**: the camera observes each of the night's fields in its band on
  :data:`TEMPLATE_EPOCHS` nights a year earlier in good seeing; those raws are *archived*
  (Data Backbone + Butler, as the archiver does) and ``ldf templates build`` then makes the
  templates from the archive (:func:`ldf.prompt.products.build_templates`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldf.config import Settings
from ldf.prompt.inputs import InputPaths

__all__ = ["TEMPLATE_EPOCHS", "Field", "fields_of_plan", "seed_survey"]

TEMPLATE_EPOCHS = 3
"""Earlier visits per field and band that go into a template (clipped mean needs ≥ 3)."""

TEMPLATE_LOOKBACK_DAYS = 365.0
"""How long before the night the first template visit was taken (transients differ by then)."""

TEMPLATE_SPACING_DAYS = 310
"""Days between the template visits: longer than any simulated transient shines (rise ≤ 48 d,
fall ≤ 260 d), so a transient is in at most one of them and the coadd's clipping removes it
(three visits days apart would bake a transient into the template, and its fading would
then look like a negative source)."""

_CALIB_COUNTS = {"bias": 5, "dark": 3, "flat": 3}


@dataclass(frozen=True)
class Field:
    """One pointing of the night in one band."""

    ra_deg: float
    dec_deg: float
    rot_sky_deg: float
    band: str


def fields_of_plan(visits: Iterable[Any]) -> list[Field]:
    """The distinct (pointing, band) of a night's science visits (VisitSpecs)."""
    seen: dict[tuple[float, float, str], Field] = {}
    for v in visits:
        if str(v.obs_type) != "science" or not v.band:
            continue
        key = (round(v.ra_deg, 4), round(v.dec_deg, 4), v.band)
        seen.setdefault(key, Field(v.ra_deg, v.dec_deg, v.rot_sky_deg, v.band))
    return list(seen.values())


def _field_radius_deg(camera: Any, detectors: list[str]) -> float:
    """Radius around the boresight that covers the given detectors (+ a margin)."""
    pix_mm = camera.pixel_size_um / 1000.0
    mm_per_deg = 3600.0 / camera.pixel_scale_arcsec * pix_mm
    r = 0.0
    for name in detectors:
        d = camera.detector(name)
        half = math.hypot(d.nx, d.ny) / 2 * pix_mm
        r = max(r, math.hypot(d.fp_x_mm, d.fp_y_mm) + half)
    return r / mm_per_deg + 0.02


def seed_survey(
    settings: Settings,
    visits: list[Any],
    *,
    instrument: str = "LSSTCam",
    detectors: list[str],
    scale: float,
    seed: int,
    status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Make whatever of refcat, master calibrations and templates the night lacks.

    Parameters
    ----------
    visits
        The night's planned VisitSpecs (its science fields and bands decide what is needed).
    detectors
        The detectors the night reads out.
    scale, seed
        The simulator's detector scale and seed.

    Returns
    -------
    dict
        What was made: ``refcat_shards``, ``calibs``, ``template_visits``, ``templates``.
    """
    from ldf.sim.instruments import get_instrument

    say = status or (lambda _msg: None)
    camera = get_instrument(instrument, scale)
    home = InputPaths(settings.home)
    fields = fields_of_plan(visits)
    # Master flats for every band the night observes or takes flats in (flat QA needs one).
    flat_bands = {v.band for v in visits if str(v.obs_type) == "flat" and v.band}
    bands = sorted({f.band for f in fields} | flat_bands)
    sky = night_sky(seed, settings.sim.sky(scale))
    report: dict[str, Any] = {"refcat_shards": 0, "calibs": 0, "template_visits": 0, "templates": 0}
    if not fields:
        return report

    from ldf.pipelines.refcat import RefcatStore

    radius = _field_radius_deg(camera, detectors)
    store = RefcatStore(home.refcat)
    for f in fields:
        report["refcat_shards"] += len(store.ingest_region(sky, f.ra_deg, f.dec_deg, radius))

    day_obs = min(v.day_obs for v in visits)
    missing = [
        (det, kind, band)
        for det in detectors
        for kind, band in [("bias", None), ("dark", None), *[("flat", b) for b in bands]]
        if not home.calib(instrument, det, kind, band).exists()
    ]
    if missing:
        say(f"seeding master calibrations for {len(detectors)} detector(s), bands {bands}…")
        report["calibs"] = _seed_calibs(
            settings, camera, detectors, bands, day_obs=day_obs, seed=seed, sky=sky
        )

    from ldf.prompt.products import template_coverage

    todo = [f for f in fields if not template_coverage(settings, instrument, f, detectors, scale)]
    if todo:
        say(f"seeding templates: {len(todo)} field(s) × {TEMPLATE_EPOCHS} earlier visits…")
        report["template_visits"] = _archive_template_visits(
            settings, camera, todo, detectors, day_obs=day_obs, seed=seed, sky=sky
        )
        report["templates"] = _build_templates(settings, instrument, todo, radius, scale, say)
    return report


def _build_templates(
    settings: Settings,
    instrument: str,
    fields: list[Field],
    radius: float,
    scale: float,
    say: Callable[[str], None],
) -> int:
    """The fields' templates, a band per worker process (``settings.batch.workers``).

    A band's fields are built in order by one worker, as one process would: two fields of
    a band may share a patch, and the later one's template is the one kept. Bands write
    different files. Returns the number of templates written.
    """
    by_band: dict[str, list[Field]] = {}
    for f in fields:
        by_band.setdefault(f.band, []).append(f)
    groups = sorted(by_band.values(), key=len, reverse=True)  # the longest starts first
    workers = min(len(groups), settings.batch.workers)
    if workers <= 1:
        return sum(_band_templates(settings, instrument, g, radius, scale, say)[0] for g in groups)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    say(f"building templates of {len(groups)} band(s) in {workers} processes…")
    total = 0
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [
            pool.submit(_band_templates, settings, instrument, g, radius, scale) for g in groups
        ]
        for future in as_completed(futures):
            made, lines = future.result()
            for line in lines:
                say(line)
            total += made
    return total


def _band_templates(
    settings: Settings,
    instrument: str,
    fields: list[Field],
    radius: float,
    scale: float,
    say: Callable[[str], None] | None = None,
) -> tuple[int, list[str]]:
    """Build the templates of fields in order (a worker's task): how many, and what was said
    (a worker cannot print to the parent's console)."""
    from ldf.prompt.products import build_templates

    lines: list[str] = []
    status = say if say is not None else lines.append
    made = 0
    for f in fields:
        made += build_templates(
            settings, instrument, f.band, f.ra_deg, f.dec_deg, radius, scale=scale, status=status
        )
    return made, lines


def night_sky(seed: int, params: tuple[float, float, float] = (1.0, 20.0, 50.0)) -> Any:
    """The simulated sky of a night (the same the camera renders: see NightOptions.sky)."""
    from ldf.sim.night import _sky

    return _sky(seed, tuple(params))


def _render_raws(
    camera: Any, visit: Any, detectors: list[str], sky: Any, seed: int, directory: Path
) -> list[Path]:
    from ldf.archiver.rawfits import build_hdulist, raw_filename, write_raw
    from ldf.sim.camera import render_detector

    paths = []
    for name in detectors:
        det = camera.detector(name)
        readout = render_detector(camera, det, visit, sky, seed=seed)
        hdul = build_hdulist(camera, det, visit, readout.amps)
        path = directory / raw_filename(visit, name)
        write_raw(path, hdul, fsync=False)
        paths.append(path)
    return paths


def _prev_day(day_obs: int, days: int) -> tuple[int, float]:
    """(day_obs, an afternoon TAI MJD) ``days`` before ``day_obs``."""
    import astropy.units as u
    from astropy.time import Time

    s = str(day_obs)
    t = Time(f"{s[:4]}-{s[4:6]}-{s[6:]}T19:00:00", scale="utc") - days * u.day
    return int(t.strftime("%Y%m%d")), float(t.tai.mjd)


def _seed_calibs(
    settings: Settings,
    camera: Any,
    detectors: list[str],
    bands: list[str],
    *,
    day_obs: int,
    seed: int,
    sky: Any,
) -> int:
    from ldf.butler.formatters import RawImage
    from ldf.pipelines.calibs import make_master_bias, make_master_dark, make_master_flat
    from ldf.sim.models import ObsType, VisitSpec

    home = InputPaths(settings.home)
    calib_day, mjd = _prev_day(day_obs, 1)
    filters = {b: camera.physical_filter(b) for b in bands}
    specs: list[tuple[str, str | None, list[VisitSpec]]] = []
    seq = 90000
    for kind, band in [("bias", None), ("dark", None), *[("flat", b) for b in bands]]:
        group = []
        for _ in range(_CALIB_COUNTS[kind]):
            seq += 1
            exp = {"bias": 0.0, "dark": 30.0, "flat": 15.0}[kind]
            group.append(
                VisitSpec(
                    instrument=camera.name,
                    day_obs=calib_day,
                    seq_num=seq,
                    obs_type=ObsType(kind),
                    reason="calibration",
                    group_id=f"{calib_day}-seed-{kind}{'-' + band if band else ''}",
                    band=band,
                    physical_filter=filters.get(band) if band else None,
                    ra_deg=0.0,
                    dec_deg=-30.0,
                    exp_time_s=exp,
                    dark_time_s=exp + 1.0 if exp else 0.0,
                    start_tai_mjd=mjd + seq * 60 / 86400,
                )
            )
        specs.append((kind, band, group))
    made = 0
    with tempfile.TemporaryDirectory(prefix="ldf-calib-seed-") as tmp:
        for name in detectors:
            raws: dict[tuple[str, str | None], list[RawImage]] = {}
            for kind, band, group in specs:
                paths = [_render_raws(camera, v, [name], sky, seed, Path(tmp))[0] for v in group]
                raws[(kind, band)] = [RawImage.read(p) for p in paths]
                for p in paths:
                    p.unlink()
            bias = make_master_bias(raws[("bias", None)], camera)
            dark = make_master_dark(raws[("dark", None)], camera, bias)
            bias.save(home.calib(camera.name, name, "bias"))
            dark.save(home.calib(camera.name, name, "dark"))
            made += 2
            for band in bands:
                flat = make_master_flat(raws[("flat", band)], camera, bias, dark)
                flat.save(home.calib(camera.name, name, "flat", band))
                made += 1
    return made


def _archive_template_visits(
    settings: Settings,
    camera: Any,
    fields: list[Field],
    detectors: list[str],
    *,
    day_obs: int,
    seed: int,
    sky: Any,
) -> int:
    """Observe each field on earlier nights in good seeing and archive the raws."""
    from ldf.archiver.service import lfn_for
    from ldf.backbone.service import Backbone
    from ldf.sim.conditions import conditions_for
    from ldf.sim.models import ObsType, VisitSpec

    n = 0
    bb = Backbone.open(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="ldf-template-seed-") as tmp:
            for epoch in range(TEMPLATE_EPOCHS):
                t_day, mjd0 = _prev_day(
                    day_obs, int(TEMPLATE_LOOKBACK_DAYS) + TEMPLATE_SPACING_DAYS * epoch
                )
                for i, f in enumerate(fields):
                    mjd = mjd0 + 5.0 / 24 + i * 40 / 86400  # a night-time visit
                    cond = conditions_for(
                        seed, mjd, f.band, 1.1, ra_deg=f.ra_deg, dec_deg=f.dec_deg
                    )
                    # Templates are made of the best-seeing visits: take this one at ≤ 0.7″.
                    cond = cond.model_copy(
                        update={
                            "seeing_fwhm_arcsec": min(cond.seeing_fwhm_arcsec, 0.6 + 0.05 * epoch),
                            "transparency": max(cond.transparency, 0.95),
                        }
                    )
                    visit = VisitSpec(
                        instrument=camera.name,
                        day_obs=t_day,
                        seq_num=80001 + i,
                        obs_type=ObsType.SCIENCE,
                        reason="template-seed",
                        group_id=f"{t_day}-template-{i}",
                        band=f.band,
                        physical_filter=camera.physical_filter(f.band),
                        ra_deg=f.ra_deg,
                        dec_deg=f.dec_deg,
                        rot_sky_deg=f.rot_sky_deg,
                        airmass=1.1,
                        exp_time_s=30.0,
                        dark_time_s=31.0,
                        start_tai_mjd=mjd,
                        conditions=cond,
                    )
                    paths = _render_raws(camera, visit, detectors, sky, seed, Path(tmp))
                    for det, path in zip(detectors, paths, strict=True):
                        bb.ingest(
                            path,
                            lfn_for(visit, det),
                            metadata={
                                "dataset_type": "raw",
                                "instrument": camera.name,
                                "day_obs": visit.day_obs,
                                "seq_num": visit.seq_num,
                                "exposure": visit.exposure_id,
                                "obs_id": visit.obs_id,
                                "detector": det,
                                "obs_type": "science",
                                "band": visit.band,
                                "physical_filter": visit.physical_filter,
                                "flagged": False,
                            },
                            producer="survey seed",
                            datasets=[f"raw/{camera.name}/{visit.day_obs}"],
                        )
                        path.unlink()
                    n += 1
    finally:
        bb.close()
    return n
