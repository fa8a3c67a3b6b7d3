"""Run the OODS: its HTTP API under uvicorn, and expiry on a schedule, in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from ldf.netutil import listen as _listen
from ldf.netutil import serve_app
from ldf.oods.handlers import create_app
from ldf.oods.models import ExpiryReport
from ldf.oods.service import Oods

__all__ = ["expire_periodically", "listen", "run", "serve_oods"]

_log = logging.getLogger(__name__)


def listen(host: str, port: int) -> socket.socket:
    """The OODS's listening socket (see `ldf.netutil.listen`)."""
    return _listen(host, port, what="the OODS")


@contextlib.asynccontextmanager
async def serve_oods(
    oods: Oods, *, host: str = "127.0.0.1", port: int = 0, **app_options: Any
) -> AsyncIterator[str]:
    """Serve the OODS app over HTTP while the context is open; yields the base URL.

    Runs uvicorn in this event loop (no extra process). ``port=0`` picks a free port;
    ``app_options`` go to `create_app`.

    Raises
    ------
    TransportError
        The address cannot be bound (e.g. the port is taken).
    """
    async with serve_app(
        create_app(oods, **app_options), host=host, port=port, what="the OODS", force_exit=True
    ) as url:
        yield url


async def expire_periodically(
    oods: Oods, interval_s: float, on_report: Callable[[ExpiryReport], None] | None = None
) -> None:
    """Run `Oods.expire` every ``interval_s`` seconds (first run at once) until cancelled."""
    while True:
        try:
            report = await asyncio.to_thread(oods.expire)
            if on_report is not None:
                on_report(report)
        except Exception:  # a failed round must not stop the next one
            _log.exception("OODS expiry failed")
        await asyncio.sleep(interval_s)


async def run(
    oods: Oods,
    *,
    host: str,
    port: int,
    expire_interval_s: float,
    on_start: Callable[[str], None] | None = None,
    on_report: Callable[[ExpiryReport], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's handlers), expiring periodically."""
    import uvicorn

    sock = listen(host, port)
    # Followers of the arrival stream never hang up by themselves: give them 5 s at shutdown.
    config = uvicorn.Config(
        create_app(oods), log_level="info", lifespan="off", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    expiry = asyncio.create_task(expire_periodically(oods, expire_interval_s, on_report))
    try:
        if on_start is not None:
            on_start(f"http://{host}:{sock.getsockname()[1]}")
        await server.serve(sockets=[sock])
    finally:
        expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expiry
        sock.close()
