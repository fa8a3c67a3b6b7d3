"""Run alert distribution: the HTTP API under uvicorn plus lag checks and archiving.

* :func:`serve_alerts` — the app in the caller's event loop while a context is open.
* :class:`ServerThread` — the same in a thread of its own (the main job, tests, the smoke
  test), with the background work (lag checks, archiving) in another.
* :func:`run` — ``ldf serve alerts``: until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType

from ldf.alerts.auth import Credentials
from ldf.alerts.handlers import create_app
from ldf.alerts.service import AlertService
from ldf.config.models import Settings
from ldf.errors import TransportError
from ldf.netutil import keep_heap, listen, serve_app

__all__ = ["ServerThread", "credentials_path", "run", "serve_alerts"]

_log = logging.getLogger(__name__)


def credentials_path(settings: Settings) -> Path:
    """The credentials file of a site configuration."""
    configured = settings.policies.alerts.credentials_file
    return Path(configured) if configured else settings.home / "secrets" / "alerts-credentials.yaml"


@contextlib.asynccontextmanager
async def serve_alerts(
    service: AlertService, credentials: Credentials, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the API in this event loop while the context is open; yields the base URL."""
    app = create_app(service, credentials)
    async with serve_app(
        app, host=host, port=port, what="alert distribution", force_exit=True
    ) as url:
        yield url


def _start_background(service: AlertService, stop: threading.Event) -> list[threading.Thread]:
    """Lag checks and archiving, and the mini-broker's matcher, in threads until ``stop``."""
    from ldf.alerts.minibroker import MiniBroker

    threads = [
        threading.Thread(target=service.run_background, args=(stop,), name="alerts-bg",
                         daemon=True),
        threading.Thread(target=MiniBroker(service).run, args=(stop,), name="alerts-matcher",
                         daemon=True),
    ]  # fmt: skip
    for t in threads:
        t.start()
    return threads


class ServerThread:
    """The API and the background work in threads of their own, as a context manager.

    Parameters
    ----------
    service, credentials
        What to serve.
    host, port
        Where (``port=0``: any free port; the URL is ``.url`` once entered).
    background
        Also run lag checks and archiving (`AlertService.run_background`).
    """

    def __init__(
        self,
        service: AlertService,
        credentials: Credentials,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        background: bool = True,
    ) -> None:
        self.service, self.credentials = service, credentials
        self.host, self.port = host, port
        self.background = background
        self.url = ""
        self._ready = threading.Event()
        self._stop_loop: Callable[[], None] | None = None
        self._error: BaseException | None = None
        self._stop_bg = threading.Event()
        self._threads: list[threading.Thread] = []

    def _serve(self) -> None:
        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()

            def stop_soon() -> None:
                loop.call_soon_threadsafe(stop.set)

            self._stop_loop = stop_soon
            async with serve_alerts(
                self.service, self.credentials, host=self.host, port=self.port
            ) as url:
                self.url = url
                self._ready.set()
                await stop.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the thread that entered the context
            self._error = exc
            self._ready.set()

    def __enter__(self) -> ServerThread:
        t = threading.Thread(target=self._serve, name="alerts-http", daemon=True)
        t.start()
        self._threads.append(t)
        self._ready.wait(30.0)
        if self._error is not None:
            raise TransportError(f"alert distribution did not start: {self._error}")
        if not self.url:
            raise TransportError("alert distribution did not start within 30 s")
        if self.background:
            self._threads += _start_background(self.service, self._stop_bg)
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._stop_bg.set()
        if self._stop_loop is not None:
            self._stop_loop()
        for t in self._threads:
            t.join(30.0)


async def run(
    service: AlertService,
    credentials: Credentials,
    *,
    host: str,
    port: int,
    on_start: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, with the background work; then stop it all cleanly
    (uvicorn's own handlers would re-raise the signal and end the process before that)."""
    import signal

    import uvicorn

    from ldf.netutil import QuietServer

    sock = listen(host, port, what="alert distribution")
    keep_heap()
    config = uvicorn.Config(
        create_app(service, credentials), log_level="info", lifespan="off",
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = QuietServer(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    stop = threading.Event()
    threads = _start_background(service, stop)
    if on_start is not None:
        on_start(f"http://{host}:{sock.getsockname()[1]}")
    try:
        await server.serve(sockets=[sock])
    finally:
        stop.set()
        for t in threads:
            t.join(10.0)
        sock.close()
