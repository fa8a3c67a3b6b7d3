"""``ldf serve SERVICE``: run one service as its own long-lived process."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Any

import typer

from ldf.cliutil import err_console, settings_from

app = typer.Typer(help="Run a service as a long-lived process.", no_args_is_help=True)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        err_console.print(
            f"{signal.Signals(signum).name}: finishing copies in flight, then stopping"
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@app.command("backbone")
def serve_backbone(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option("--once", help="One maintenance round, drain, exit.")
    ] = False,
) -> None:
    """Replicate continuously; audit, repair, expire and snapshot tables periodically."""
    from ldf.backbone.daemon import maintenance, run_daemon
    from ldf.backbone.service import Backbone

    bb = Backbone.open(settings_from(ctx))
    try:
        if once:
            report = bb.run_transfers()
            summary = maintenance(bb)
            err_console.print(f"transfers: {report.as_dict()}; maintenance: {summary}")
            return
        stop = _stop_on_signals()
        err_console.print(
            f"backbone daemon: {len(bb.endpoints())} endpoints at {len(bb.settings.sites)} sites; "
            f"polling every {bb.policy.poll_s} s, auditing every {bb.policy.audit_interval_s} s"
        )
        run_daemon(bb, stop, on_round=lambda s: err_console.print(f"maintenance: {s['audits']}"))
    finally:
        bb.close()


@app.command("oods")
def serve_oods(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (policy).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (policy; 0: any).")] = None,
    expire_every_s: Annotated[
        float, typer.Option("--expire-every", min=1.0, help="Seconds between expiry runs.")
    ] = 600.0,
) -> None:
    """Serve the OODS HTTP API (search, download, live arrivals) and expire periodically."""
    import asyncio

    from ldf.oods.daemon import run
    from ldf.oods.service import Oods
    from ldf.oods.tokens import ensure_token_file

    oods = Oods.open(settings_from(ctx))
    try:
        if ensure_token_file(oods.token_path):
            err_console.print(f"created an access token in {oods.token_path}")
        else:
            err_console.print(f"access tokens: {oods.token_path}")
        asyncio.run(
            run(
                oods,
                host=host or oods.policy.host,
                port=oods.policy.port if port is None else port,
                expire_interval_s=expire_every_s,
                on_start=lambda url: err_console.print(
                    f"OODS at {url}, cache {oods.root}; expiring every {expire_every_s:g} s"
                ),
                on_report=lambda r: (
                    err_console.print(
                        f"expiry: removed {r.removed} files, kept {r.kept_pinned} pinned, "
                        f"{r.kept_leased} being read"
                    )
                    if r.removed or r.errors
                    else None
                ),
            )
        )
    finally:
        oods.close()


@app.command("archiver")
def serve_archiver(
    ctx: typer.Context,
    instrument: Annotated[str, typer.Argument(help="LSSTCam or LATISS.")],
    enable: Annotated[
        bool, typer.Option("--enable/--standby", help="Go to ENABLED at once, or wait in STANDBY.")
    ] = True,
) -> None:
    """Run an instrument's archiver as an OCS device until exitControl or a signal."""
    import asyncio

    from ldf.archiver.device import ArchiverDevice
    from ldf.archiver.service import Archiver
    from ldf.errors import UserInputError
    from ldf.ocs.bus import open_bus

    if instrument not in ("LSSTCam", "LATISS"):
        raise UserInputError(f"unknown instrument {instrument!r}; expected LSSTCam or LATISS")
    settings = settings_from(ctx)

    async def main() -> None:
        bus = await open_bus(settings.bus, settings.home)
        archiver = Archiver.open(instrument, settings)
        dev = ArchiverDevice(archiver, bus, heartbeat_interval_s=settings.bus.heartbeat_interval_s)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await dev.open()
            if enable:
                await dev.execute("start")
                await dev.execute("enable")
            err_console.print(f"{dev.name} is {dev.state.name}; Ctrl-C or exitControl to stop")
            served = asyncio.create_task(dev.serve())  # returns at exitControl
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([served, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await dev.close()
            archiver.close()
            await bus.close()

    asyncio.run(main())


@app.command("prompt")
def serve_prompt(
    ctx: typer.Context,
    instrument: Annotated[str, typer.Argument(help="LSSTCam or LATISS.")] = "LSSTCam",
    enable: Annotated[
        bool, typer.Option("--enable/--standby", help="Go to ENABLED at once, or wait in STANDBY.")
    ] = True,
) -> None:
    """Run an instrument's Prompt Processing as an OCS device until exitControl or a signal."""
    import asyncio

    from ldf.ocs.bus import open_bus
    from ldf.prompt.device import PromptDevice
    from ldf.prompt.service import PromptService

    settings = settings_from(ctx)
    service = PromptService.open(settings, instrument)  # refuses an unknown instrument

    async def main() -> None:
        bus = await open_bus(settings.bus, settings.home)
        dev = PromptDevice(service, bus, heartbeat_interval_s=settings.bus.heartbeat_interval_s)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await dev.open()
            if enable:
                await dev.execute("start")
                await dev.execute("enable")
            err_console.print(f"{dev.name} is {dev.state.name}; Ctrl-C or exitControl to stop")
            served = asyncio.create_task(dev.serve())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([served, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await dev.close()
            service.close()
            await bus.close()

    asyncio.run(main())


@app.command("telemetry")
def serve_telemetry(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (policy).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (policy; 0: any).")] = None,
    enable: Annotated[
        bool, typer.Option("--enable/--standby", help="Go to ENABLED at once, or wait in STANDBY.")
    ] = True,
) -> None:
    """Run the Telemetry Gateway (HTTP API + OCS device) until exitControl or a signal."""
    import asyncio

    from ldf.telemetry.daemon import run

    settings = settings_from(ctx)
    policy = settings.policies.telemetry
    asyncio.run(
        run(
            settings,
            host=host or policy.host,
            port=policy.port if port is None else port,
            enable=enable,
            on_start=lambda s: err_console.print(
                f"{s.device.name} at {s.url} is {s.device.state.name}; "
                "Ctrl-C or exitControl to stop"
            ),
        )
    )


@app.command("alerts")
def serve_alerts(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (policy).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (policy; 0: any).")] = None,
) -> None:
    """Run alert distribution (HTTP API, lag checks, archiving) until a signal."""
    import asyncio

    from ldf.alerts.auth import Credentials
    from ldf.alerts.daemon import credentials_path, run
    from ldf.alerts.service import AlertService

    settings = settings_from(ctx)
    policy = settings.policies.alerts
    service = AlertService.open(settings)
    creds = Credentials(credentials_path(settings))
    err_console.print(f"credentials: {creds.path} (ldf alerts credentials add NAME --role ROLE)")
    publisher = None
    if policy.nats_url:
        from ldf.alerts.nats import NatsPublisher, PublisherThread

        publisher = PublisherThread(
            NatsPublisher(service, policy.nats_url, user=policy.nats_user,
                          password=policy.nats_password, max_backlog=policy.nats_max_backlog)
        ).__enter__()  # fmt: skip
        err_console.print(f"feeds with transport nats are published to {policy.nats_url}")
    try:
        asyncio.run(
            run(
                service, creds, host=host or policy.host,
                port=policy.port if port is None else port,
                on_start=lambda url: err_console.print(f"alert distribution at {url}"),
            )
        )  # fmt: skip
    finally:
        if publisher is not None:
            publisher.__exit__(None, None, None)
        service.close()
