"""Network helpers shared by every HTTP server ldf runs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn

from ldf.errors import TransportError

__all__ = ["QuietServer", "keep_heap", "listen", "serve_app"]


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: whoever runs the server decides when to stop
    (uvicorn would also re-raise the signal after shutting down, killing the process before
    its own clean-up runs)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def keep_heap() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process (no-op elsewhere).

    By default a buffer of more than a few MB is a fresh ``mmap`` and is unmapped when freed:
    a server that builds an 8 MB batch per request then takes a page fault per 4 KB and
    zeroes every page, for every batch (perf: 5 % of the alert server's cycles). With the
    thresholds raised such buffers come from the heap and freed memory stays there. The
    prompt pool sets the same through ``MALLOC_*`` variables before its workers start.
    Returns whether the thresholds were set.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 31))


def listen(host: str, port: int, *, what: str = "HTTP") -> socket.socket:
    """A listening TCP socket whose accepted connections asyncio makes TCP_NODELAY.

    asyncio sets TCP_NODELAY only on sockets whose ``proto`` is ``IPPROTO_TCP``; those of
    ``socket.create_server`` have proto 0, so every keep-alive response waited for the
    client's delayed ACK (Nagle): 22 requests/s instead of ~1000 on loopback, measured by
    benchmarks/oods.py.

    Parameters
    ----------
    host, port
        Address to bind (``port=0``: any free port).
    what
        What is being served, for the error message.

    Raises
    ------
    TransportError
        The address cannot be bound (e.g. the port is taken).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot serve {what} on {host}:{port}: {exc.strerror}") from None
    return sock


@contextlib.asynccontextmanager
async def serve_app(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    what: str = "HTTP",
    force_exit: bool = False,
) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn in this event loop while the context is open.

    Yields the base URL (``port=0`` picks a free port). With ``force_exit`` open streaming
    responses (server-sent events never end by themselves) are cut at exit.

    Raises
    ------
    TransportError
        The address cannot be bound.
    """
    sock = listen(host, port, what=what)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"{what} http")
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped the server
            await asyncio.sleep(0.01)
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        server.force_exit = force_exit
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
