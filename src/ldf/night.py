"""``ldf night``: an observing night through the whole facility, the main job.

The simulated observatory (scheduler, cameras, DAQ) → the archivers (one OCS device per
instrument) → the OODS (raw FITS at predictable paths, its Butler, HTTP) → the Data Backbone
(catalogued at the base, replicated by rule to the archive and the DR site), and LSSTCam
Prompt Processing (``MTPrompt``: preload on nextVisit, every detector processed on arrival in
the OODS, alerts to the local sink, QA as telemetry). Before the first night the survey so
far is seeded (reference catalogue, master calibrations, templates from archived earlier
visits). The summary reports, per instrument, exposures and files archived, bytes, the
readout → in-OODS latency (p50/p99) of every detector file; and per visit the readout →
alerts latency (p50/p98 against OTT1), alerts, the recovery of injected transients, false
DiaSources and image quality against the simulator's truth. Later services extend it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from ldf.cliutil import console, err_console, print_json, settings_from
from ldf.config import Settings
from ldf.sim.cli import DayObs, Detectors, HttpPort, Json, Scale, Seed, Visits

__all__ = ["DEFAULT_RULES", "night", "run_facility_night"]

DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {
        "name": "raw-to-archive-and-dr",
        "expression": "dataset_type == 'raw'",
        "copies": 2,
        "sites": ["archive", "dr"],
        "priority": 1,
    },
)
"""Replication rules a fresh facility starts with: every raw at the archive and the DR site."""


def _ensure_rules(bb: Any) -> None:
    from ldf.backbone.models import Rule

    existing = {r.name for r in bb.store.rules(active_only=False)}
    for spec in DEFAULT_RULES:
        if spec["name"] not in existing and all(s in bb.settings.sites for s in spec["sites"]):
            bb.add_rule(Rule.model_validate(spec))


async def run_facility_night(
    settings: Settings,
    options: Any,
    *,
    progress: Any = None,
    http_port: int | None = None,
    on_status: Any = None,
) -> dict[str, Any]:
    """Run a simulated night through archivers, OODS and Backbone; return the summary."""
    from ldf.alerts.nightly import NightAlerts
    from ldf.archiver.device import ArchiverDevice
    from ldf.archiver.service import Archiver
    from ldf.backbone.service import Backbone
    from ldf.ocs.health import serve_health
    from ldf.prompt.device import PromptDevice
    from ldf.prompt.nightly import prepare_prompt, summarize_prompt
    from ldf.prompt.service import PromptService
    from ldf.sim.daq import DaqStore
    from ldf.sim.devices import Observatory
    from ldf.sim.night import run_night
    from ldf.telemetry.client import TelemetryClient
    from ldf.telemetry.daemon import serve_gateway
    from ldf.telemetry.service import TelemetryGateway

    do_prompt = "LSSTCam" in options.instruments and options.visits > 0
    seeded: dict[str, Any] = {}
    if do_prompt:
        seeded = await asyncio.to_thread(prepare_prompt, settings, options, status=on_status)
    bb = Backbone.open(settings)
    _ensure_rules(bb)
    stop_transfers = threading.Event()
    transfers = threading.Thread(
        target=bb.run_transfers,
        kwargs={"until_idle": False, "stop": stop_transfers},
        name="backbone-transfers",
        daemon=True,
    )
    transfers.start()
    archivers: list[ArchiverDevice] = []
    prompt: PromptDevice | None = None
    alerts: NightAlerts | None = None
    gateway: TelemetryGateway | None = None
    telemetry_summary: dict[str, Any] | None = None
    alerts_summary: dict[str, Any] | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            obs = await stack.enter_async_context(Observatory.open(settings, options.instruments))
            before: dict[str, int] = {}
            for inst in options.instruments:
                dev = ArchiverDevice(
                    Archiver.open(inst, settings), obs.bus,
                    heartbeat_interval_s=settings.bus.heartbeat_interval_s,
                )  # fmt: skip
                before[inst] = dev.archiver.status(options.day_obs)["files_in_oods"]
                await dev.open()
                await dev.execute("start")
                await dev.execute("enable")
                archivers.append(dev)
            if do_prompt:
                service = PromptService.open(settings, "LSSTCam")
                service.detectors = seeded["detectors"]
                service.camera_scale = options.scale
                prompt = PromptDevice(
                    service, obs.bus, heartbeat_interval_s=settings.bus.heartbeat_interval_s
                )
                # QA goes to the observatory through the Telemetry Gateway (LDM-230 2.7).
                gateway = TelemetryGateway.open(settings)
                stack.callback(gateway.close)
                served = await stack.enter_async_context(
                    serve_gateway(
                        gateway, obs.bus, heartbeat_interval_s=settings.bus.heartbeat_interval_s
                    )
                )
                telemetry = TelemetryClient(served.url, _gateway_token(gateway))
                stack.callback(telemetry.close)
                service.publish_telemetry = telemetry
                if on_status:
                    on_status(f"telemetry gateway: {served.url}")
                await prompt.open()
                await prompt.execute("start")
                await prompt.execute("enable")
                alerts = NightAlerts(settings, service)
                url = await alerts.start(obs.bus, settings.bus.heartbeat_interval_s)
                if on_status:
                    on_status(f"alert distribution: {url}/alerts/status")
            if http_port is not None:
                devices = [*obs.devices.values(), *archivers, *([prompt] if prompt else [])]
                url = await stack.enter_async_context(serve_health(devices, port=http_port))
                if on_status:
                    on_status(f"health: {url}/health · metrics: {url}/metrics")
            by_instrument = {dev.archiver.instrument: dev for dev in archivers}

            async def pace(instrument: str) -> None:
                # Fast mode: hold the camera while its archiver is more than one exposure
                # behind, so latency measures the facility, not a queue the sky never makes.
                dev = by_instrument.get(instrument)
                if dev is not None:
                    await dev.wait_backlog(max_exposures=1, timeout_s=120.0)
                if prompt is not None and instrument == "LSSTCam":
                    await prompt.wait_backlog(max_visits=1, timeout_s=120.0)

            sim = await run_night(
                options,
                DaqStore(settings.home / "daq"),
                settings.home / "sim",
                sink=obs.publish,
                pace=pace,
                **(progress or {}),
            )
            if on_status:
                on_status("archiving the last exposures…")
            for dev in archivers:
                expected = sim.instruments[dev.archiver.instrument].exposures
                if not await dev.drain(exposures=expected) and on_status:
                    on_status(f"{dev.name}: still busy after the drain timeout")
            prompt_summary: dict[str, Any] | None = None
            if prompt is not None:
                if on_status:
                    on_status("prompt processing the last visits…")
                await prompt.drain(timeout_s=600.0)
                if gateway is not None:
                    telemetry_summary = await _gateway_drained(gateway)
                if alerts is not None:
                    if on_status:
                        on_status("delivering the last alerts to the brokers…")
                    if not await asyncio.to_thread(alerts.drain) and on_status:
                        on_status("alert distribution: still delivering after the drain timeout")
                    alerts_summary = await alerts.stop()
                    alerts = None
                prompt_summary = await asyncio.to_thread(
                    summarize_prompt,
                    settings,
                    prompt.service,
                    options.day_obs,
                    sim.instruments["LSSTCam"].truth_table,
                )
                await prompt.execute("disable")
                await prompt.close()
                prompt.service.close()
                prompt = None
            archive = {
                dev.archiver.instrument: dev.archiver.status(options.day_obs) for dev in archivers
            }
            for name, st in archive.items():
                st["new_files"] = st["files_in_oods"] - before.get(name, 0)
            for dev in archivers:
                await dev.execute("disable")
                await dev.execute("standby")
                await dev.execute("exitControl")
                await dev.close()
                dev.archiver.close()
            archivers = []
        # Replication of the night's raws to the archive and DR sites finishes here.
        if on_status:
            on_status("replicating to the archive and DR sites…")
        await asyncio.to_thread(_wait_transfers, bb)
        return {
            "sim": sim.model_dump(mode="json"),
            "archive": archive,
            "prompt": prompt_summary,
            "alerts": alerts_summary,
            "telemetry": telemetry_summary,
            "seeded": {k: v for k, v in seeded.items() if k != "detectors"},
            "backbone": {
                "files": bb.store.file_counts(),
                "replicas": bb.store.replica_summary(),
                "queue": bb.store.queue_counts(),
            },
        }
    finally:
        if alerts is not None:
            with contextlib.suppress(Exception):
                await alerts.stop()
        if prompt is not None:
            with contextlib.suppress(Exception):
                await prompt.close()
                prompt.service.close()
        for dev in archivers:
            with contextlib.suppress(Exception):
                await dev.close()
                dev.archiver.close()
        stop_transfers.set()
        transfers.join()
        bb.close()


async def _gateway_drained(gateway: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    """The gateway's status once everything it accepted is on the bus (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await asyncio.to_thread(gateway.status)
        if status.backlog == 0 or time.monotonic() > deadline:
            return dict(status.model_dump(mode="json"))
        await asyncio.sleep(0.1)


def _gateway_token(gateway: Any) -> str:
    """A fresh token for Prompt Processing's producer of the gateway (only hashes are kept)."""
    from ldf.errors import NotFoundError

    name = "prompt-lsstcam"
    try:
        gateway.producers.get(name)
    except NotFoundError:
        return str(
            gateway.producers.add(name, device="MTPrompt", topics=["imageQuality", "calibrationQA"])
        )
    return str(gateway.producers.rotate(name))


def _wait_transfers(bb: Any, timeout_s: float = 600.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = bb.store.queue_counts()
        if not counts.get("queued") and not counts.get("active"):
            return
        time.sleep(0.1)


def night(
    ctx: typer.Context,
    visits: Visits = None,
    detectors: Detectors = None,
    scale: Scale = None,
    seed: Seed = None,
    day_obs: DayObs = None,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="Run on the simulated clock.")
    ] = False,
    speed: Annotated[float, typer.Option("--speed", help="Real-time acceleration.")] = 1.0,
    http_port: HttpPort = None,
    as_json: Json = False,
) -> None:
    """Run an observing night through the facility: camera → archivers → OODS → Backbone,
    and Prompt Processing of every LSSTCam visit (alerts, APDB, image quality)."""
    from ldf.sim.cli import night_progress, options_from, print_summary

    settings = settings_from(ctx)
    options = options_from(
        settings, visits, detectors, scale, seed, day_obs, realtime=realtime, speed=speed
    )
    progress, callbacks = night_progress(as_json)

    async def main() -> dict[str, Any]:
        with progress:
            return await run_facility_night(
                settings,
                options,
                progress=callbacks,
                http_port=http_port,
                on_status=None if as_json else err_console.print,
            )

    summary = asyncio.run(main())
    if as_json:
        print_json(summary)
        return
    from ldf.sim.night import NightSummary

    print_summary(NightSummary.model_validate(summary["sim"]))
    table = Table(title="Archiving")
    table.caption = "latency: end of readout → file in the OODS"
    for col in ("", "exposures", "in OODS", "archived", "flagged", "MB", "lat p50", "lat p99"):
        table.add_column(col, justify="right" if col else "left")
    for name, st in summary["archive"].items():
        lat = st["latency_s"]
        table.add_row(
            name,
            f"{st['exposures_complete']}/{st['exposures']}",
            str(st["files_in_oods"]),
            str(st["files_archived"]),
            str(st["flagged"]),
            f"{st['bytes'] / 1e6:.1f}",
            f"{lat['p50']:.2f} s" if lat["p50"] is not None else "-",
            f"{lat['p99']:.2f} s" if lat["p99"] is not None else "-",
        )
    console.print(table)
    if not options.realtime:
        console.print(
            "[dim]fast mode: each exposure starts once the archivers are at most one exposure "
            "behind (--realtime paces the night on the simulated clock instead)[/]"
        )
    if not any(st["new_files"] for st in summary["archive"].values()):
        console.print(
            f"[yellow]night {options.day_obs} (seed {options.seed}) was already archived in "
            f"{settings.home}: nothing new. Choose another --day-obs, or a fresh LDF_HOME.[/]"
        )
    if summary.get("prompt"):
        from ldf.prompt.nightly import print_prompt_summary

        print_prompt_summary(summary["prompt"], console)
    if summary.get("alerts"):
        from ldf.alerts.nightly import print_alerts_summary

        print_alerts_summary(summary["alerts"], console)
    if summary.get("telemetry"):
        for p in summary["telemetry"]["producers"]:
            console.print(
                f"[bold]Telemetry gateway[/]: {p['producer']} → {p['device']}: accepted "
                f"{p['accepted']}, rejected {p['rejected']}, injected into the OCS bus "
                f"{p['injected']}, backlog {p['backlog']}"
            )
    reps: dict[str, int] = {}
    for r in summary["backbone"]["replicas"]:
        if r["state"] == "available":
            reps[r["site"]] = reps.get(r["site"], 0) + r["replicas"]
    console.print(
        "Backbone: "
        + ", ".join(f"{site} {n} files" for site, n in sorted(reps.items()))
        + f" · queue {summary['backbone']['queue']}"
    )
