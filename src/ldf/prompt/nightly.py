"""Prompt Processing in ``ldf night``: preparation before the night, summary after it.

Before: the survey so far is seeded where it is missing (:func:`ldf.prompt.seed.seed_survey`:
reference catalogue, master calibrations, templates from archived earlier visits) and the
APDB is created. After: per-visit latency against OTT1, alerts per visit, the recovery of
the simulator's injected transients and the false DiaSources (:mod:`ldf.prompt.validation`),
and the image-quality parameters measured against the simulator's truth.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ldf.config import Settings
from ldf.prompt.inputs import InputPaths

__all__ = ["prepare_prompt", "print_prompt_summary", "summarize_prompt"]


def prepare_prompt(
    settings: Settings, options: Any, *, status: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Seed what the night's Prompt Processing needs; create the APDB. Returns a report."""
    from ldf.pipelines.apdb import PromptApdb
    from ldf.prompt.seed import seed_survey
    from ldf.sim.night import _conditions_model, detectors_for
    from ldf.sim.scheduler import plan_night

    plan = plan_night(
        "LSSTCam",
        day_obs=options.day_obs,
        science_visits=options.visits,
        seed=options.seed,
        calibrations=options.calibrations,
        conditions=_conditions_model,
    )
    detectors = detectors_for("LSSTCam", options.scale, options.detectors)
    report = seed_survey(
        settings,
        [p.visit for p in plan.exposures],
        detectors=detectors,
        scale=options.scale,
        seed=options.seed,
        status=status,
    )
    home = InputPaths(settings.home)
    if not home.apdb_config.exists():
        url = (
            settings.databases.get("apdb") or f"sqlite:///{(home.apdb / 'apdb.sqlite3').resolve()}"
        )
        home.apdb.mkdir(parents=True, exist_ok=True)
        PromptApdb.create(url, config_path=home.apdb_config)
    report["detectors"] = detectors
    return report


def _truth_rows(path: str | None) -> list[dict[str, Any]]:
    if not path or not Path(path).exists():
        return []
    from astropy.table import Table

    table = Table.read(path, format="ascii.ecsv")
    return [
        {c: row[c].item() if hasattr(row[c], "item") else row[c] for c in table.colnames}
        for row in table
    ]


def _plan_conditions(path: str | None) -> dict[int, dict[str, Any]]:
    if not path:
        return {}
    plan = Path(path).with_name("plan.json")
    if not plan.exists():
        return {}
    out = {}
    for v in json.loads(plan.read_text()):
        visit = v.get("visit", v)
        if visit.get("conditions"):
            out[int(visit["exposure_id"])] = {
                **visit["conditions"],
                "airmass": visit.get("airmass"),
                "band": visit.get("band"),
            }
    return out


def summarize_prompt(
    settings: Settings, service: Any, day_obs: int, truth_table: str | None
) -> dict[str, Any]:
    """Per-visit service level, validation against truth and QA (JSON-ready)."""
    from ldf.pipelines.apdb import PromptApdb
    from ldf.prompt.validation import (
        coverage_path,
        expected_zero_point,
        load_coverage,
        score_detector,
        summarize,
    )
    from ldf.sim.instruments import get_instrument

    reports = service.reports(day_obs)
    jobs = service.store.jobs(day_obs=day_obs)
    camera = get_instrument(service.instrument, service.camera_scale)
    truth = _truth_rows(truth_table)
    by_det: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in truth:
        by_det.setdefault((int(row["exposure_id"]), str(row["detector"])), []).append(row)
    science = [r.exposure_id for r in reports if r.obs_type == "science"]
    sources = PromptApdb.open(InputPaths(settings.home).apdb_config).visit_sources(science)
    scores = []
    qa_rows = []
    cond = _plan_conditions(truth_table)
    for j in jobs:
        if j["exposure_id"] not in science or j["state"] != "done" or not j["qa"]:
            continue
        qa = j["qa"]
        det = camera.detector(j["detector"])
        rn = float(np.mean([a.read_noise for a in det.amplifiers]))
        fwhm_px = (qa.get("seeing_arcsec") or 0.7) / camera.pixel_scale_arcsec
        dia = sources[(sources["visit"] == j["exposure_id"]) & (sources["detector"] == det.id)]
        scores.append(
            score_detector(
                dia,
                by_det.get((j["exposure_id"], j["detector"]), []),
                sky_e=float(qa.get("sky_e_per_pixel") or 0.0),
                read_noise_e=rn,
                fwhm_px=fwhm_px,
                coverage=load_coverage(
                    coverage_path(settings.home, j["exposure_id"], j["detector"])
                ),
            )
        )
        truth_cond = cond.get(j["exposure_id"], {})
        qa_rows.append(
            {
                "exposure_id": j["exposure_id"],
                "detector": j["detector"],
                **qa,
                "truth": truth_cond,
                "zero_point_expected": expected_zero_point(camera, det, truth_cond),
            }
        )
    return {
        "visits": [r.model_dump(mode="json") for r in reports],
        "validation": summarize(scores),
        "quality": _quality_summary(qa_rows),
        "failures": [
            {k: j[k] for k in ("exposure_id", "detector", "state", "failed_stage", "reason")}
            for j in jobs
            if j["state"] not in ("done",)
        ],
    }


def _quality_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per visit (median over its detectors, as the observatory would use them): measured
    seeing and pointing offset against the simulated values; zero points."""
    if not rows:
        return {}
    visits: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        visits.setdefault(r["exposure_id"], []).append(r)
    seeing_err: list[float] = []
    pointing_err: list[float] = []
    for vrows in visits.values():
        t = vrows[0]["truth"]
        seeing = [r["seeing_arcsec"] for r in vrows if r.get("seeing_arcsec")]
        if t.get("seeing_fwhm_arcsec") and seeing:
            seeing_err.append(abs(float(np.median(seeing)) / t["seeing_fwhm_arcsec"] - 1.0))
        east = [r["pointing_offset_east_arcsec"] for r in vrows
                if r.get("pointing_offset_east_arcsec") is not None]  # fmt: skip
        north = [r["pointing_offset_north_arcsec"] for r in vrows
                 if r.get("pointing_offset_north_arcsec") is not None]  # fmt: skip
        if east and north and "pointing_dra_arcsec" in t:
            pointing_err.append(
                math.hypot(
                    float(np.median(east)) - t["pointing_dra_arcsec"],
                    float(np.median(north)) - t["pointing_ddec_arcsec"],
                )
            )
    out: dict[str, Any] = {"visits": len(visits), "detector_visits": len(rows)}
    if seeing_err:
        out["seeing_rel_err_median"] = round(float(np.median(seeing_err)), 4)
        out["seeing_rel_err_max"] = round(float(np.max(seeing_err)), 4)
    if pointing_err:
        out["pointing_err_arcsec_median"] = round(float(np.median(pointing_err)), 3)
        out["pointing_err_arcsec_max"] = round(float(np.max(pointing_err)), 3)
    zps = [r["zero_point"] for r in rows if r.get("zero_point")]
    if zps:
        out["zero_point_median"] = round(float(np.median(zps)), 3)
    dz = [
        abs(r["zero_point"] - r["zero_point_expected"])
        for r in rows
        if r.get("zero_point") and r.get("zero_point_expected") is not None
    ]
    if dz:
        out["zero_point_err_mag_median"] = round(float(np.median(dz)), 4)
        out["zero_point_err_mag_max"] = round(float(np.max(dz)), 4)
    return out


def print_prompt_summary(summary: dict[str, Any], console: Any) -> None:
    """Rich tables of :func:`summarize_prompt`'s result."""
    from rich.table import Table

    from ldf.prompt.service import OTT1_S

    table = Table(title="Prompt Processing (LSSTCam)")
    table.caption = (
        f"latency: end of readout → alerts handed to distribution; OTT1 = {OTT1_S:g} s for 98 %"
    )
    for col in ("seq", "type", "done", "failed", "late", "alerts", "p50", "p98", "≤OTT1"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for r in summary["visits"]:
        table.add_row(
            str(r["exposure_id"] % 100000),
            r["obs_type"],
            f"{r['done']}/{r['detectors']}",
            str(r["failed"]),
            str(r["timeout"] + r["offline"] + r["skipped"]),
            str(r["alerts"]),
            "-" if r["latency_p50_s"] is None else f"{r['latency_p50_s']:.1f} s",
            "-" if r["latency_p98_s"] is None else f"{r['latency_p98_s']:.1f} s",
            "-" if r["within_ott1"] is None else f"{100 * r['within_ott1']:.0f}%",
        )
    console.print(table)
    science = [r for r in summary["visits"] if r["obs_type"] == "science"]
    if science:
        done = sum(r["done"] for r in science)
        pre = sum(r.get("templates_prewarped", 0) for r in science)
        console.print(
            f"Templates prewarped on nextVisit: {pre} of {done} science detectors "
            "(the rest warped theirs after the raw arrived)"
        )
    v = summary["validation"]
    if v.get("detector_visits"):
        rec = "-" if v["recovery"] is None else f"{100 * v['recovery']:.1f} %"
        area = "on the usable area " if v.get("usable_area") else ""
        left = v.get("excluded_outside", 0) + v.get("excluded_saturated", 0)
        console.print(
            f"Injected transients with S/N ≥ 10 {area}recovered: {rec} "
            f"({v['recovered_snr10']}/{v['transients_snr10']}"
            + (
                f"; {v.get('excluded_outside', 0)} off the usable area and "
                f"{v.get('excluded_saturated', 0)} on saturated pixels not counted"
                if left
                else ""
            )
            + f") · false DiaSources: {v['false_per_detector']} per detector-visit "
            f"({v['false']} in {v['detector_visits']})"
        )
    q = summary["quality"]
    if q:
        console.print(
            "Image quality vs the simulator (per visit): seeing within "
            f"{100 * q.get('seeing_rel_err_median', float('nan')):.1f} % (median; worst "
            f"{100 * q.get('seeing_rel_err_max', float('nan')):.1f} %), pointing offset within "
            f"{q.get('pointing_err_arcsec_median', float('nan')):.2f}″ (worst "
            f"{q.get('pointing_err_arcsec_max', float('nan')):.2f}″), zero point within "
            f"{q.get('zero_point_err_mag_median', float('nan')):.3f} mag (worst "
            f"{q.get('zero_point_err_mag_max', float('nan')):.3f}; per detector)"
        )
    for f in summary["failures"][:10]:
        console.print(
            f"[yellow]{f['exposure_id']} {f['detector']}: {f['state']}"
            f"{' at ' + f['failed_stage'] if f['failed_stage'] else ''}: {f['reason']}[/]"
        )
