"""Run the Telemetry Gateway: its device on the OCS bus and its HTTP API, in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import uvicorn

from ldf.config import Settings
from ldf.netutil import QuietServer, listen
from ldf.ocs.bus import Bus, open_bus
from ldf.telemetry.device import TelemetryGatewayDevice
from ldf.telemetry.handlers import create_app
from ldf.telemetry.service import TelemetryGateway

__all__ = ["Served", "run", "serve_gateway"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """A gateway being served."""

    url: str
    """Base URL of the HTTP API (``http://host:port``)."""
    device: TelemetryGatewayDevice
    """Its OCS device."""


@contextlib.asynccontextmanager
async def serve_gateway(
    gateway: TelemetryGateway,
    bus: Bus,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    enable: bool = True,
    heartbeat_interval_s: float = 1.0,
    status_interval_s: float = 10.0,
    poll_s: float = 1.0,
) -> AsyncIterator[Served]:
    """Serve a gateway while the context is open: its device on ``bus`` and its HTTP API.

    Parameters
    ----------
    gateway
        The service.
    bus
        The OCS bus (not closed here).
    host, port
        Listen address (``port=0``: any free port).
    enable
        Take the device to ENABLED at once (else it waits in STANDBY for commands).
    heartbeat_interval_s, status_interval_s, poll_s
        See `TelemetryGatewayDevice`.

    Raises
    ------
    TransportError
        The address cannot be bound.
    """
    device = TelemetryGatewayDevice(
        gateway,
        bus,
        heartbeat_interval_s=heartbeat_interval_s,
        status_interval_s=status_interval_s,
        poll_s=poll_s,
    )
    sock = listen(host, port, what="the telemetry gateway")
    await device.open()
    server = QuietServer(
        uvicorn.Config(
            create_app(gateway, device=device),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="telemetry http")
    try:
        if enable:
            await device.execute("start")
            await device.execute("enable")
        while not server.started:
            if task.done():
                task.result()  # raises what stopped the server
            await asyncio.sleep(0.01)
        yield Served(f"http://{host}:{sock.getsockname()[1]}", device)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
        await device.close()


async def _purge_periodically(gateway: TelemetryGateway, interval_s: float) -> None:
    while True:
        try:
            messages, audits = await asyncio.to_thread(gateway.purge)
            if messages or audits:
                _log.info("purged %d injected messages and %d audit rows", messages, audits)
        except Exception:  # a failed round must not stop the next one
            _log.exception("telemetry purge failed")
        await asyncio.sleep(interval_s)


async def run(
    settings: Settings,
    *,
    host: str,
    port: int,
    enable: bool = True,
    purge_interval_s: float = 3600.0,
    on_start: Callable[[Served], None] | None = None,
) -> None:
    """``ldf serve telemetry``: serve until SIGINT, SIGTERM or ``exitControl``."""
    bus = await open_bus(settings.bus, settings.home)
    gateway = TelemetryGateway.open(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    purging = asyncio.create_task(_purge_periodically(gateway, purge_interval_s))
    try:
        async with serve_gateway(
            gateway,
            bus,
            host=host,
            port=port,
            enable=enable,
            heartbeat_interval_s=settings.bus.heartbeat_interval_s,
        ) as served:
            if on_start is not None:
                on_start(served)
            offline = asyncio.create_task(served.device.serve())  # returns at exitControl
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([offline, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in (offline, stopped):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        purging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await purging
        gateway.close()
        await bus.close()
