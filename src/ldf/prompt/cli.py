"""``ldf prompt``: Prompt Processing's per-visit service level, detectors, catch-up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.table import Table

from ldf.cliutil import console, print_json, settings_from
from ldf.errors import NotFoundError

app = typer.Typer(
    help="Prompt Processing: per-visit latency, detector outcomes, offline catch-up.",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Instrument = Annotated[str, typer.Option("--instrument", "-i", help="LSSTCam or LATISS.")]
DayObs = Annotated[int | None, typer.Option("--day-obs", help="Observing day YYYYMMDD.")]


@contextmanager
def _service(ctx: typer.Context, instrument: str) -> Iterator[object]:
    from ldf.prompt.service import PromptService

    service = PromptService.open(settings_from(ctx), instrument)
    try:
        yield service
    finally:
        service.close()


def _fmt(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


@app.command()
def visits(
    ctx: typer.Context,
    instrument: Instrument = "LSSTCam",
    day_obs: DayObs = None,
    as_json: Json = False,
) -> None:
    """Per visit: detectors done/failed, alerts, latency p50/p98 against OTT1 (60 s)."""
    from ldf.prompt.service import OTT1_S, PromptService

    with _service(ctx, instrument) as svc:
        assert isinstance(svc, PromptService)
        reports = svc.reports(day_obs)
    if as_json:
        print_json([r.model_dump(mode="json") for r in reports])
        return
    table = Table(title=f"Prompt Processing · {instrument}")
    table.caption = f"latency: end of readout → alerts handed to distribution (OTT1 {OTT1_S:g} s)"
    for col in ("exposure", "type", "done", "fail", "late", "alerts", "p50", "p98", "≤OTT1"):
        table.add_column(
            col, justify="left" if col in ("exposure", "type") else "right", no_wrap=True
        )
    for r in reports:
        table.add_row(
            str(r.exposure_id),
            r.obs_type,
            f"{r.done}/{r.detectors}",
            str(r.failed),
            str(r.timeout + r.offline + r.skipped),
            str(r.alerts),
            _fmt(r.latency_p50_s),
            _fmt(r.latency_p98_s),
            "-" if r.within_ott1 is None else f"{100 * r.within_ott1:.0f}%",
        )
    console.print(table)


@app.command()
def detectors(
    ctx: typer.Context,
    exposure: Annotated[int, typer.Argument(help="Exposure id.")],
    instrument: Instrument = "LSSTCam",
    as_json: Json = False,
) -> None:
    """One visit's detectors: state, reason, per-stage seconds, QA."""
    from ldf.prompt.service import PromptService

    with _service(ctx, instrument) as svc:
        assert isinstance(svc, PromptService)
        jobs = svc.store.jobs(exposure)
    if not jobs:
        raise NotFoundError(f"no detectors of exposure {exposure} in Prompt Processing")
    if as_json:
        print_json(jobs)
        return
    table = Table(title=f"exposure {exposure}")
    for col in ("detector", "state", "stage", "reason", "DIA", "alerts", "seconds"):
        table.add_column(col)
    for j in jobs:
        table.add_row(
            j["detector"],
            j["state"],
            j["failed_stage"] or "",
            (j["reason"] or "")[:80],
            str(j["n_dia_sources"]),
            str(j["n_alerts"]),
            f"{sum((j['stage_s'] or {}).values()):.2f}",
        )
    console.print(table)


@app.command()
def catchup(
    ctx: typer.Context,
    instrument: Instrument = "LSSTCam",
    as_json: Json = False,
) -> None:
    """Offline catch-up: process every detector waiting for it (APDB updated, no alerts)."""
    from ldf.prompt.service import PromptService

    with _service(ctx, instrument) as svc:
        assert isinstance(svc, PromptService)
        n = svc.run_offline()
        counts = svc.store.counts()
    if as_json:
        print_json({"processed": n, "states": counts})
        return
    console.print(f"processed {n} detector(s) offline · states {counts}")


templates_app = typer.Typer(help="Difference-imaging templates.", no_args_is_help=True)
calibs_app = typer.Typer(help="Master calibrations for Prompt Processing.", no_args_is_help=True)
refcat_app = typer.Typer(
    help="The reference catalogue (astrometry, photometry).", no_args_is_help=True
)

Band = Annotated[str, typer.Option("--band", "-b", help="Band (ugrizy).")]
Ra = Annotated[float, typer.Option("--ra", help="Centre right ascension, degrees.")]
Dec = Annotated[float, typer.Option("--dec", help="Centre declination, degrees.")]
Radius = Annotated[float, typer.Option("--radius", help="Radius, degrees.")]
Scale = Annotated[
    float | None, typer.Option("--scale", help="Simulator detector scale (default: config).")
]


@templates_app.command("build")
def templates_build(
    ctx: typer.Context,
    band: Band,
    ra: Ra,
    dec: Dec,
    radius: Radius = 0.3,
    instrument: Instrument = "LSSTCam",
    scale: Scale = None,
    max_visits: Annotated[int, typer.Option(help="Best-seeing visits per detector.")] = 10,
    as_json: Json = False,
) -> None:
    """Build the templates of a sky region from archived visits (ISR → calibration → coadd)."""
    from ldf.cliutil import err_console
    from ldf.prompt.products import build_templates

    settings = settings_from(ctx)
    n = build_templates(
        settings,
        instrument,
        band,
        ra,
        dec,
        radius,
        scale=scale or settings.sim.scale,
        max_visits=max_visits,
        status=None if as_json else err_console.print,
    )
    if as_json:
        print_json({"templates": n, "band": band})
    else:
        console.print(f"{n} {band}-band template patch(es) written")


@calibs_app.command("build")
def calibs_build(
    ctx: typer.Context,
    day_obs: Annotated[int, typer.Option("--day-obs", help="Day of the calibration block.")],
    instrument: Instrument = "LSSTCam",
    scale: Scale = None,
    as_json: Json = False,
) -> None:
    """Master bias, dark and flats from a day's archived calibration exposures."""
    from ldf.cliutil import err_console
    from ldf.prompt.products import build_calibs

    settings = settings_from(ctx)
    report = build_calibs(
        settings,
        instrument,
        day_obs,
        scale=scale or settings.sim.scale,
        status=None if as_json else err_console.print,
    )
    if as_json:
        print_json(report)
    else:
        console.print(
            f"{len(report['written'])} master calibration(s) for {report['detectors']} "
            f"detector(s); {len(report['skipped'])} detector(s) skipped"
        )


@refcat_app.command("ingest")
def refcat_ingest(
    ctx: typer.Context,
    ra: Ra,
    dec: Dec,
    radius: Radius = 1.0,
    mag_limit: Annotated[float, typer.Option(help="Faintest r magnitude kept.")] = 21.0,
    seed: Annotated[int | None, typer.Option(help="Simulated sky seed (default: config).")] = None,
    as_json: Json = False,
) -> None:
    """Ingest the reference catalogue of a region (the simulated sky stands in for Gaia)."""
    from ldf.pipelines.refcat import RefcatStore
    from ldf.prompt.inputs import InputPaths
    from ldf.prompt.seed import night_sky

    settings = settings_from(ctx)
    store = RefcatStore(InputPaths(settings.home).refcat)
    shards = store.ingest_region(
        night_sky(seed if seed is not None else settings.sim.seed, settings.sim.sky()),
        ra,
        dec,
        radius,
        mag_limit=mag_limit,
    )
    if as_json:
        print_json({"new_shards": shards})
    else:
        console.print(f"{len(shards)} new shard(s) in {store.root}")
