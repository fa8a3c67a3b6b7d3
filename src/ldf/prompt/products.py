"""Building Prompt Processing's inputs: templates from archived visits, master calibrations.

``ldf templates build`` and ``ldf calibs build`` run these. Both read raws from the archive's
Butler (the Data Backbone site's repository, where the archiver registers every raw), so
what they make is reproducible from archived data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ldf.config import Settings
from ldf.errors import NotFoundError, UserInputError
from ldf.prompt.inputs import InputPaths

__all__ = ["build_calibs", "build_templates", "template_coverage"]


def template_coverage(
    settings: Settings, instrument: str, field: Any, detectors: list[str], scale: float
) -> bool:
    """Whether every detector of a pointing (``field``: ra/dec/rot/band) has its templates."""
    from ldf.pipelines.templates import TemplateStore
    from ldf.sim.instruments import get_instrument
    from ldf.sim.wcs import detector_wcs

    camera = get_instrument(instrument, scale)
    store = TemplateStore(InputPaths(settings.home).templates)
    for name in detectors:
        det = camera.detector(name)
        wcs = detector_wcs(camera, det, field.ra_deg, field.dec_deg, field.rot_sky_deg)
        needed = store.skymap.patches_overlapping(wcs, (det.ny, det.nx))
        if not needed or not all(store.has(field.band, p) for p in needed):
            return False
    return True


def _archive_repo(settings: Settings, site: str | None) -> Any:
    from ldf.backbone.butler import repo_for
    from ldf.backbone.service import Backbone

    bb = Backbone.open(settings)
    site = site or bb.policy.ingest_site
    bb.check_site(site)
    return bb, repo_for(bb, site)


def build_templates(
    settings: Settings,
    instrument: str,
    band: str,
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    *,
    scale: float,
    site: str | None = None,
    max_visits: int = 10,
    status: Callable[[str], None] | None = None,
) -> int:
    """Build the templates of a sky region in a band from archived science visits.

    Every archived science raw in ``band`` whose boresight is within ``radius_deg`` (+ half
    the field) of the centre is calibrated (ISR → characterization → astrometry →
    photometry with the facility's master calibrations and reference catalogue); per
    detector footprint the ``max_visits`` best-seeing visits are kept; each skymap patch
    they touch is coadded (:func:`ldf.pipelines.templates.build_template`) and saved.

    Returns
    -------
    int
        Number of templates (patches) written.

    Raises
    ------
    NotFoundError
        No archived visit in the band covers the region.
    """
    from ldf.pipelines.calibs import CalibSet, MasterCalib
    from ldf.pipelines.isr import read_raw
    from ldf.pipelines.refcat import RefcatStore, angular_separation_deg
    from ldf.pipelines.singleframe import single_frame
    from ldf.pipelines.templates import TemplateStore, build_template
    from ldf.pipelines.types import DetectorError
    from ldf.sim.instruments import get_instrument

    say = status or (lambda _m: None)
    if not 0 < radius_deg <= 10:
        raise UserInputError(f"radius must be in (0, 10] degrees, got {radius_deg}")
    home = InputPaths(settings.home)
    camera = get_instrument(instrument, scale)
    bb, repo = _archive_repo(settings, site)
    try:
        rows = repo.query_raws(instrument, obs_type="science", band=band, with_paths=True)
    finally:
        bb.close()
    from ldf.butler.formatters import read_primary_header

    chosen = []
    for row in rows:
        header = read_primary_header(row["path"])
        ra, dec = header.get("RA"), header.get("DEC")
        if not isinstance(ra, float | int) or not isinstance(dec, float | int):
            continue
        if angular_separation_deg(float(ra), float(dec), ra_deg, dec_deg) <= radius_deg:
            chosen.append(row)
    if not chosen:
        raise NotFoundError(
            f"no archived {instrument} science visit in band {band} within {radius_deg:g}° of "
            f"({ra_deg:.4f}, {dec_deg:.4f})"
        )
    refcat = RefcatStore(home.refcat)
    frames = []
    for row in chosen:
        det = row["detector"]
        try:
            calibs = CalibSet(
                bias=MasterCalib.load(home.calib(instrument, det, "bias")),
                dark=MasterCalib.load(home.calib(instrument, det, "dark")),
                flat=MasterCalib.load(home.calib(instrument, det, "flat", band)),
            )
            frame = single_frame(read_raw(row["path"]), camera, calibs, refcat)
        except DetectorError as exc:
            say(f"skipping {row['obs_id']} {det}: {exc}")
            continue
        frames.append(frame)
    # Best seeing first, at most max_visits per detector footprint.
    frames.sort(key=lambda f: f.characterization.seeing_arcsec)
    per_det: dict[str, int] = {}
    exposures = []
    for f in frames:
        n = per_det.get(f.exposure.info.detector, 0)
        if n < max_visits:
            per_det[f.exposure.info.detector] = n + 1
            exposures.append(f.exposure)
    store = TemplateStore(home.templates)
    patches = sorted(
        {p for e in exposures for p in store.skymap.patches_overlapping(e.wcs, e.shape)}
    )
    written = 0
    for patch in patches:
        try:
            template = build_template(exposures, store.skymap, patch, band)
        except DetectorError as exc:
            say(f"patch {patch}: {exc}")
            continue
        store.save(template)
        written += 1
    say(f"{band}: {written} template patch(es) from {len(exposures)} calibrated detector-visits")
    return written


def build_calibs(
    settings: Settings,
    instrument: str,
    day_obs: int,
    *,
    scale: float,
    site: str | None = None,
    status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Master bias, dark and flats (per band) for every detector from a day's archived
    calibration exposures; saved where Prompt Processing reads them.

    Returns
    -------
    dict
        ``{"detectors": n, "written": [paths…], "skipped": {detector: reason}}``.

    Raises
    ------
    NotFoundError
        No archived bias exposures that day.
    """
    from ldf.pipelines.calibs import make_master_bias, make_master_dark, make_master_flat
    from ldf.pipelines.isr import read_raw
    from ldf.pipelines.types import DetectorError
    from ldf.sim.instruments import get_instrument

    say = status or (lambda _m: None)
    home = InputPaths(settings.home)
    camera = get_instrument(instrument, scale)
    bb, repo = _archive_repo(settings, site)
    try:
        rows = [
            r
            for kind in ("bias", "dark", "flat")
            for r in repo.query_raws(instrument, day_obs=day_obs, obs_type=kind, with_paths=True)
        ]
    finally:
        bb.close()
    if not any(r["obs_type"] == "bias" for r in rows):
        raise NotFoundError(f"no archived {instrument} bias exposures on {day_obs}")
    by_det: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_det.setdefault(r["detector"], []).append(r)
    report: dict[str, Any] = {"detectors": len(by_det), "written": [], "skipped": {}}
    for det, det_rows in sorted(by_det.items()):
        try:
            biases = [read_raw(r["path"]) for r in det_rows if r["obs_type"] == "bias"]
            bias = make_master_bias(biases, camera)
            darks = [read_raw(r["path"]) for r in det_rows if r["obs_type"] == "dark"]
            dark = make_master_dark(darks, camera, bias)
            for calib, kind in ((bias, "bias"), (dark, "dark")):
                path = home.calib(instrument, det, kind)
                calib.save(path)
                report["written"].append(str(path))
            bands = sorted({r["band"] for r in det_rows if r["obs_type"] == "flat" and r["band"]})
            for band in bands:
                flats = [
                    read_raw(r["path"])
                    for r in det_rows
                    if r["obs_type"] == "flat" and r["band"] == band
                ]
                flat = make_master_flat(flats, camera, bias, dark)
                path = home.calib(instrument, det, "flat", band)
                flat.save(path)
                report["written"].append(str(path))
        except DetectorError as exc:
            report["skipped"][det] = exc.reason
            say(f"{det}: {exc.reason}")
    return report
