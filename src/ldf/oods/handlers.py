"""The OODS HTTP API (FastAPI): search, download with ranges, live arrivals, status.

Every route but ``/health`` needs ``Authorization: Bearer <token>`` with a token from the
token file (`ldf.oods.tokens`). Errors are JSON, ``{"error": {"code", "message"}}``, with the
status matching the error (400 bad input, 401 no or wrong token, 404 not cached, 416 range
beyond the file). A file is served only if the index holds it and it resolves to a regular
file inside the cache root; it is read under a read lease (renewed while streaming), so
expiry never removes a file being downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ldf.errors import (
    LdfError,
    NotFoundError,
    UserInputError,
    http_status,
)
from ldf.oods.models import OodsEntry
from ldf.oods.service import Oods, ReadLease
from ldf.oods.tokens import TokenFile

__all__ = ["create_app", "parse_range", "sse_event"]

_log = logging.getLogger(__name__)

MAX_LIMIT = 10_000
"""Most entries one search returns."""

_RANGE_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


class _HttpError(Exception):
    """An error that is only HTTP's (authentication, ranges)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def parse_range(header: str, size: int) -> list[tuple[int, int]]:
    """The byte ranges of a ``Range`` header as (start, end exclusive), as RFC 9110 reads it.

    Raises
    ------
    _HttpError
        400 for a malformed header; 416 when no range starts inside the file.
    """
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise _HttpError(400, "invalid_range", f"malformed Range header {header!r}")
    ranges = []
    for part in spec.split(","):
        m = _RANGE_RE.match(part)
        if m is None or (not m[1] and not m[2]):
            raise _HttpError(400, "invalid_range", f"malformed Range header {header!r}")
        if m[1]:
            start = int(m[1])
            end = min(int(m[2]) + 1, size) if m[2] else size
            if m[2] and int(m[2]) < start:
                raise _HttpError(400, "invalid_range", f"malformed Range header {header!r}")
        else:  # suffix: the last N bytes
            start, end = max(size - int(m[2]), 0), size
            if int(m[2]) == 0:
                continue
        if start < size:
            ranges.append((start, end))
    if not ranges:
        raise _HttpError(
            416,
            "range_not_satisfiable",
            f"Range {header!r} is beyond the file ({size} bytes)",
            {"Content-Range": f"bytes */{size}"},
        )
    return ranges


def sse_event(event_id: int, event: str, data: str) -> str:
    """One server-sent event (``data`` is one line of JSON)."""
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"


class _LeasedFile(FileResponse):
    """A file response that holds a read lease while it streams and releases it after."""

    chunk_size = 1 << 20
    """Bytes per read: starlette's 64 KiB costs a thread hop per chunk (benchmarks/oods.py)."""

    def __init__(self, lease: ReadLease, stat: os.stat_result, renew_s: float) -> None:
        entry = lease.entry
        super().__init__(
            lease.path,
            headers={"ETag": f'"{entry.checksum}"'},
            media_type="application/fits",
            filename=entry.filename,
            stat_result=stat,
        )
        self.lease = lease
        self.renew_s = renew_s

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.renew_s)
            await run_in_threadpool(self.lease.renew)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        renewer = asyncio.create_task(self._renew())
        try:
            await super().__call__(scope, receive, send)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await run_in_threadpool(self.lease.release)


def create_app(oods: Oods, *, heartbeat_s: float = 15.0, poll_s: float = 1.0) -> FastAPI:
    """The OODS web app over one `Oods`.

    Parameters
    ----------
    oods
        The service.
    heartbeat_s
        Seconds between heartbeat comments on an idle arrival stream.
    poll_s
        How often an idle stream looks in the index for arrivals indexed by other
        processes (arrivals through this process's `Oods.add` wake it at once).
    """
    app = FastAPI(title="ldf OODS", summary="Observatory Operations Data Service (LDM-230 2.6)")
    tokens = TokenFile(oods.token_path)

    @app.exception_handler(LdfError)
    async def _ldf_error(_request: Request, exc: LdfError) -> JSONResponse:
        return _error(http_status(exc), exc.code, str(exc).splitlines()[0])

    @app.exception_handler(_HttpError)
    async def _http_error(_request: Request, exc: _HttpError) -> JSONResponse:
        return _error(exc.status, exc.code, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, "invalid_input", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return _error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        challenge = {"WWW-Authenticate": 'Bearer realm="oods"'}
        if not authorization:
            raise _HttpError(401, "unauthorized", "missing bearer token", challenge)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not tokens.accepts(token.strip()):
            challenge["WWW-Authenticate"] += ', error="invalid_token"'
            raise _HttpError(401, "unauthorized", "invalid bearer token", challenge)

    auth = [Depends(authorized)]

    @app.get("/health")
    def health() -> JSONResponse:
        try:
            last = oods.store.last_event_id()
            ok = oods.root.is_dir()
        except Exception as exc:  # the health check reports, never raises
            return JSONResponse({"ok": False, "error": str(exc).splitlines()[0]}, 503)
        body = {"ok": ok, "service": "oods", "last_event_id": last}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/status", dependencies=auth)
    def status() -> JSONResponse:
        return JSONResponse(json.loads(json.dumps(oods.status(), default=str)))

    @app.get("/files", dependencies=auth)
    def files(
        instrument: str | None = None,
        day_obs: int | None = None,
        exposure: int | None = None,
        obs_id: str | None = None,
        detector: str | None = None,
        obs_type: str | None = None,
        dataset_type: str | None = None,
        since: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1000,
    ) -> list[OodsEntry]:
        return oods.find(
            instrument=instrument,
            day_obs=day_obs,
            exposure=exposure,
            obs_id=obs_id,
            detector=detector,
            obs_type=obs_type,
            dataset_type=dataset_type,
            since=since,
            limit=limit,
        )

    @app.get("/files/{instrument}/{day_obs}/{obs_id}/{filename}", dependencies=auth)
    def download(
        instrument: str,
        day_obs: str,
        obs_id: str,
        filename: str,
        range_: Annotated[str | None, Header(alias="range")] = None,
    ) -> FileResponse:
        shown = f"{instrument}/{day_obs}/{obs_id}/{filename}"
        if not day_obs.isdigit() or len(day_obs) != 8:
            raise NotFoundError(f"{shown} is not in the OODS cache")
        entry = oods.entry_for_file(instrument, int(day_obs), obs_id, filename)
        lease = oods.open_for_read(entry, holder="http")
        try:
            stat = lease.path.stat()
            if range_ is not None:
                parse_range(range_, stat.st_size)
        except BaseException:
            lease.release()
            raise
        return _LeasedFile(lease, stat, renew_s=oods.policy.read_lease_s / 3)

    @app.get("/stream", dependencies=auth)
    async def stream(
        instrument: str | None = None,
        last_event_id: Annotated[str | None, Header()] = None,
        after: Annotated[int | None, Query(description="Resume after this event id.")] = None,
    ) -> StreamingResponse:
        start: int
        if last_event_id is not None:
            if not last_event_id.strip().isdigit():
                raise UserInputError(f"Last-Event-ID must be an event id, got {last_event_id!r}")
            start = int(last_event_id)
        elif after is not None:
            start = after
        else:
            start = await run_in_threadpool(oods.store.last_event_id)
        return StreamingResponse(
            _events(oods, start, instrument, heartbeat_s, poll_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def _events(
    oods: Oods, last_id: int, instrument: str | None, heartbeat_s: float, poll_s: float
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    wake = oods.followers.subscribe()
    batch = 100
    try:
        yield f"retry: 2000\n: following arrivals after {last_id}\n\n"
        beat = loop.time()
        while True:
            wake.clear()  # before the query: an arrival during it wakes the next wait
            arrivals = await run_in_threadpool(
                oods.store.arrivals_after, last_id, limit=batch, instrument=instrument
            )
            for arrival in arrivals:
                last_id = arrival.event_id
                yield sse_event(last_id, "arrival", arrival.entry.model_dump_json())
            if len(arrivals) == batch:
                continue
            timeout = max(0.0, min(poll_s, beat + heartbeat_s - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)
            if loop.time() - beat >= heartbeat_s:
                beat = loop.time()
                yield ": heartbeat\n\n"
    finally:
        oods.followers.unsubscribe(wake)
