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


def _fmt(value: float | None, unit: str = " s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


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
    for col in (
        "exposure",
        "type",
        "det",
        "done",
        "failed",
        "late",
        "alerts",
        "p50",
        "p98",
        "≤OTT1",
    ):
        table.add_column(col, justify="left" if col in ("exposure", "type") else "right")
    for r in reports:
        table.add_row(
            str(r.exposure_id),
            r.obs_type,
            str(r.detectors),
            str(r.done),
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
