"""``ldf sim``: the simulated observatory; ``ldf night``: the main job."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ldf.cliutil import console, err_console, print_json, settings_from
from ldf.config import Settings

app = typer.Typer(
    help="The simulated observatory: instruments, sky, camera, scheduler.", no_args_is_help=True
)

Visits = Annotated[int | None, typer.Option("--visits", "-n", help="LSSTCam science visits.")]
Detectors = Annotated[
    int | None,
    typer.Option("--detectors", "-d", help="LSSTCam science CCDs per exposure (0: all 205)."),
]
Scale = Annotated[
    float | None, typer.Option("--scale", help="Shrink pixel counts (1 = full size).")
]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed of sky, plan and noise.")]
DayObs = Annotated[int | None, typer.Option("--day-obs", help="Observing day YYYYMMDD.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
HttpPort = Annotated[
    int | None,
    typer.Option("--http-port", help="Serve /health and /metrics of the devices (0: any port)."),
]


def options_from(
    settings: Settings,
    visits: int | None,
    detectors: int | None,
    scale: float | None,
    seed: int | None,
    day_obs: int | None,
    **extra: Any,
) -> Any:
    from ldf.sim.night import NightOptions

    sim = settings.sim
    dets = sim.detectors if detectors is None else (None if detectors == 0 else detectors)
    scale = sim.scale if scale is None else scale
    instruments = tuple(n for n, i in settings.instruments.items() if i.enabled)
    return NightOptions(
        day_obs=day_obs or sim.day_obs,
        visits=sim.visits if visits is None else visits,
        seed=sim.seed if seed is None else seed,
        scale=scale,
        detectors=dets,
        instruments=instruments,
        workers=settings.batch.workers,
        sky=sim.sky(scale),
        **extra,
    )


def night_progress(quiet: bool) -> tuple[Progress, dict[str, Any]]:
    """A progress bar over a night's detector files, and the callbacks that advance it."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[obs_id]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )
    task = progress.add_task("night", total=None, obs_id="planning…")

    def on_plan(exposures: int, files: int) -> None:
        progress.update(task, total=files, description=f"{exposures} exposures")

    def on_exposure(r: Any) -> None:
        progress.update(task, advance=r.detectors, obs_id=r.obs_id)

    return progress, {"on_plan": on_plan, "on_exposure": on_exposure}


async def _simulate(
    settings: Settings, options: Any, quiet: bool, http_port: int | None = None
) -> Any:
    from ldf.ocs.health import serve_health
    from ldf.sim.daq import DaqStore
    from ldf.sim.devices import Observatory
    from ldf.sim.night import run_night

    daq = DaqStore(settings.home / "daq")
    progress, callbacks = night_progress(quiet)

    async with contextlib.AsyncExitStack() as stack:
        obs = await stack.enter_async_context(Observatory.open(settings, options.instruments))
        if http_port is not None:
            url = await stack.enter_async_context(
                serve_health(list(obs.devices.values()), port=http_port)
            )
            err_console.print(f"health: {url}/health · metrics: {url}/metrics")
        with progress:
            return await run_night(
                options,
                daq,
                settings.home / "sim",
                sink=obs.publish,
                **callbacks,
            )


def print_summary(summary: Any) -> None:
    table = Table(
        title=f"Simulated night {summary.day_obs} (seed {summary.seed}, scale {summary.scale})"
    )
    for col in ("instrument", "exposures", "by type", "files", "MB", "truth rows"):
        table.add_column(col, justify="right" if col not in ("instrument", "by type") else "left")
    for name, s in summary.instruments.items():
        table.add_row(
            name,
            str(s.exposures),
            ", ".join(f"{k} {v}" for k, v in sorted(s.by_type.items())),
            str(s.detector_files),
            f"{s.nbytes / 1e6:.1f}",
            str(s.truth_rows),
        )
    console.print(table)
    console.print(
        f"{summary.events} OCS events · {summary.wall_s:.1f} s wall · "
        f"{summary.megabytes_per_s} MB/s · DAQ at {summary.daq_root}"
    )
    for name, s in summary.instruments.items():
        console.print(f"truth table ({name}): {s.truth_table}")


@app.command("night")
def sim_night(
    ctx: typer.Context,
    visits: Visits = None,
    detectors: Detectors = None,
    scale: Scale = None,
    seed: Seed = None,
    day_obs: DayObs = None,
    latiss: Annotated[int, typer.Option("--latiss", help="LATISS spectra.")] = 3,
    no_calibs: Annotated[
        bool, typer.Option("--no-calibs", help="Skip the calibration block.")
    ] = False,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="Run on the simulated clock.")
    ] = False,
    speed: Annotated[float, typer.Option("--speed", help="Real-time acceleration.")] = 1.0,
    http_port: HttpPort = None,
    as_json: Json = False,
) -> None:
    """Simulate a night of exposures into the camera DAQ, with its truth table."""
    settings = settings_from(ctx)
    options = options_from(
        settings,
        visits,
        detectors,
        scale,
        seed,
        day_obs,
        latiss_visits=latiss,
        calibrations=not no_calibs,
        realtime=realtime,
        speed=speed,
    )
    summary = asyncio.run(_simulate(settings, options, quiet=as_json, http_port=http_port))
    if as_json:
        print_json(summary.model_dump(mode="json"))
    else:
        print_summary(summary)


@app.command("plan")
def sim_plan(
    ctx: typer.Context,
    visits: Visits = None,
    seed: Seed = None,
    day_obs: DayObs = None,
    instrument: Annotated[str, typer.Option("--instrument", "-i")] = "LSSTCam",
    as_json: Json = False,
) -> None:
    """Show the scheduler's plan for a night without simulating pixels."""
    from ldf.sim.night import _conditions_model
    from ldf.sim.scheduler import plan_night

    settings = settings_from(ctx)
    plan = plan_night(
        instrument,
        day_obs=day_obs or settings.sim.day_obs,
        science_visits=settings.sim.visits if visits is None else visits,
        seed=settings.sim.seed if seed is None else seed,
        conditions=_conditions_model,
    )
    rows = [p.visit.model_dump(mode="json") for p in plan.exposures]
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{instrument} night {plan.day_obs}: {plan.by_type()}")
    for col in ("obs_id", "type", "reason", "band", "ra", "dec", "airmass", "seeing"):
        table.add_column(col)
    for p in plan.exposures:
        v = p.visit
        seeing = f"{v.conditions.seeing_fwhm_arcsec:.2f}″" if v.conditions else ""
        table.add_row(
            v.obs_id, v.obs_type.value, v.reason, v.band or "", f"{v.ra_deg:.2f}",
            f"{v.dec_deg:.2f}", f"{v.airmass:.3f}", seeing,
        )  # fmt: skip
    console.print(table)


@app.command("quicklook")
def sim_quicklook(
    ctx: typer.Context,
    obs_id: Annotated[str, typer.Argument(help="Exposure, e.g. MC_O_20261121_000013.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG to write.")] = None,
    detector: Annotated[
        str | None, typer.Option("--detector", help="One detector (default: the mosaic).")
    ] = None,
    scale: Scale = None,
    no_truth: Annotated[bool, typer.Option("--no-truth", help="Don't circle truth.")] = False,
    as_json: Json = False,
) -> None:
    """Draw an exposure from the camera DAQ as a PNG (truth sources circled)."""
    from ldf.errors import UserInputError
    from ldf.sim.daq import DaqStore
    from ldf.sim.instruments import get_instrument
    from ldf.sim.models import OBS_ID_PREFIX
    from ldf.sim.quicklook import quicklook

    settings = settings_from(ctx)
    parts = obs_id.split("_")
    codes = {code: name for name, code in OBS_ID_PREFIX.items()}
    if len(parts) != 4 or parts[0] not in codes or not parts[2].isdigit():
        raise UserInputError(f"not an obs_id: {obs_id!r} (expected e.g. MC_O_20261121_000013)")
    name, day_obs = codes[parts[0]], int(parts[2])
    inst = get_instrument(name, scale=settings.sim.scale if scale is None else scale)
    target = out or Path(f"{obs_id}{'_' + detector if detector else ''}.png")
    truth = None if no_truth else settings.home / "sim" / name / str(day_obs) / "truth.ecsv"
    path = quicklook(
        DaqStore(settings.home / "daq"), inst, day_obs, obs_id, target,
        detector=detector, truth_table=truth,
    )  # fmt: skip
    if as_json:
        print_json({"obs_id": obs_id, "png": str(path)})
    else:
        console.print(f"wrote {path}")
