"""The alert distribution HTTP API (FastAPI): the embedded transport and everything else.

Routes (under ``/alerts/v1``; all but schemas, health and the status page need
``Authorization: Bearer <token>``, see :mod:`ldf.alerts.auth`):

==========================================  =============================================
``POST /ingest``                            producers: packets, each 4-byte length + bytes
``POST /visits/{visit}/close``              producers: publish the visit's manifest
``GET  /visits/{visit}/manifest``           the latest manifest
``GET  /visits/{visit}/alerts``             alertIds of a visit
``GET  /objects/{diaObjectId}/alerts``      alertIds of a DiaObject
``GET  /alerts/{alertId}``                  one packet (``?format=nocutouts``)
``GET  /feeds`` · ``POST /feeds``           the caller's feeds · create one
``GET  /feeds/{feed}`` · ``DELETE``         a feed's status · remove it
``GET  /feeds/{feed}/entries``              long-poll: ``after``, ``max``, ``max_bytes``,
                                            ``wait``; a framed batch (`formats.frame`)
``POST /feeds/{feed}/ack``                  ``{"position": n}``: move the cursor
``POST /replays``                           a `ReplaySpec`
``GET  /schemas`` · ``/schemas/ids/{id}``   the alert schemas (Confluent registry shape)
``GET  /status``                            per feed: delivered, lag, rate, errors (JSON)
``GET  /alerts/status`` (no prefix)         the same as a public HTML page
==========================================  =============================================

A broker sees and reads only its own feeds (403 otherwise); operators see everything. Errors
are JSON ``{"error": {"code", "message"}}``: 400 bad input, 401 no or bad token, 403 not
yours, 404 unknown, 409 conflict, 413 body too large, 422 not an alert packet.
"""

from __future__ import annotations

import contextlib
import html
import json
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldf.alerts import formats
from ldf.alerts.auth import Credentials, Principal, Role
from ldf.alerts.models import Feed, FeedFormat, FeedSpec, ReplaySpec
from ldf.alerts.service import AlertService
from ldf.errors import (
    LdfError,
    NotFoundError,
    StateError,
    UserInputError,
    http_status,
)
from ldf.pipelines.alertpacket import AlertPacketError

__all__ = ["BATCH_MEDIA_TYPE", "create_app"]

BATCH_MEDIA_TYPE = "application/x-ldf-alert-batch"
PACKETS_MEDIA_TYPE = "application/x-ldf-alert-packets"
PREFIX = "/alerts/v1"


class _HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _status(exc: LdfError) -> int:
    """422 for a body that is not an alert packet; otherwise as every ldf HTTP API."""
    return 422 if isinstance(exc, AlertPacketError) else http_status(exc)


def _error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="alerts"'} if status == 401 else None
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The caller, from its bearer token."""
    if not authorization:
        raise _HttpError(401, "unauthorized", "missing bearer token")
    scheme, _, token = authorization.partition(" ")
    credentials: Credentials = request.app.state.credentials
    found = credentials.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise _HttpError(401, "unauthorized", "invalid bearer token")
    return found


Who = Annotated[Principal, Depends(_principal)]
"""A route parameter: the authenticated caller."""


def create_app(service: AlertService, credentials: Credentials) -> FastAPI:
    """The alert distribution web app over one service."""
    app = FastAPI(title="ldf alert distribution", summary="Feeds to brokers (LDM-230 4.3)")
    app.state.credentials = credentials
    policy = service.policy
    from ldf.alerts.minibroker import MiniBroker, router  # imports this module's Who

    app.include_router(router(MiniBroker(service)))

    @app.exception_handler(LdfError)
    async def _ldf_error(_request: Request, exc: LdfError) -> JSONResponse:
        return _error(_status(exc), exc.code, str(exc).splitlines()[0])

    @app.exception_handler(_HttpError)
    async def _http_error(_request: Request, exc: _HttpError) -> JSONResponse:
        return _error(exc.status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, "invalid_input", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return _error(exc.status_code, code, str(exc.detail))

    def require(who: Principal, *roles: Role) -> None:
        if who.role not in roles and who.role is not Role.OPERATOR:
            allowed = ", ".join(r.value for r in roles)
            raise _HttpError(
                403, "forbidden", f"{who.name} ({who.role}) may not do this; needs {allowed}"
            )

    def own_feed(who: Principal, name: str) -> Feed:
        feed = service.feed(name)
        if who.role is not Role.OPERATOR and feed.broker != who.name:
            raise _HttpError(403, "forbidden", f"feed {name!r} is not {who.name}'s")
        return feed

    # -- health, schemas, public status ---------------------------------------------------

    @app.get("/health")
    def health() -> JSONResponse:
        try:
            head = service.store.head()
        except Exception as exc:  # the health check reports, never raises
            return JSONResponse({"ok": False, "error": str(exc).splitlines()[0]}, 503)
        return JSONResponse({"ok": True, "service": "alerts", "head": head})

    @app.get(f"{PREFIX}/schemas")
    def schemas() -> list[dict[str, Any]]:
        return [
            {"id": sid, "version": s.version, "url": f"{PREFIX}/schemas/ids/{sid}"}
            for sid, s in sorted(formats.supported_schemas().items())
        ]

    @app.get(f"{PREFIX}/schemas/ids/{{schema_id}}")
    def schema(schema_id: int) -> dict[str, Any]:
        try:
            s = formats.schema_for_id(schema_id)
        except AlertPacketError as exc:
            raise NotFoundError(str(exc)) from None
        return {"schema": json.dumps(_plain_schema(s.parsed)), "version": s.version}

    @app.get("/alerts/status", response_class=HTMLResponse)
    def status_page() -> HTMLResponse:
        return HTMLResponse(_status_page(service.status()))

    # -- producers ------------------------------------------------------------------------

    @app.post(f"{PREFIX}/ingest")
    async def ingest(request: Request, who: Who) -> dict[str, Any]:
        require(who, Role.PRODUCER)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > policy.max_ingest_bytes:
            raise _HttpError(
                413,
                "too_large",
                f"body of {length} bytes is over the limit of {policy.max_ingest_bytes}",
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > policy.max_ingest_bytes:
                raise _HttpError(
                    413, "too_large", f"body is over the limit of {policy.max_ingest_bytes} bytes"
                )
            chunks.append(chunk)
        # Views into the body, not copies: the service writes them and keeps none.
        packets = formats.unpack_packets(b"".join(chunks), views=True)
        if not packets:
            raise UserInputError("no packets in the request body")
        result = await run_in_threadpool(service.ingest, packets, who.name)
        return result.model_dump()

    @app.post(f"{PREFIX}/visits/{{visit}}/close")
    def close_visit(visit: int, who: Who) -> dict[str, Any]:
        require(who, Role.PRODUCER)
        return service.close_visit(visit).model_dump()

    # -- the archive ----------------------------------------------------------------------

    @app.get(f"{PREFIX}/visits/{{visit}}/manifest")
    def manifest(visit: int, who: Who) -> dict[str, Any]:
        return service.store.manifest(visit).model_dump()

    @app.get(f"{PREFIX}/visits/{{visit}}/alerts")
    def visit_alerts(visit: int, who: Who) -> dict[str, Any]:
        return {"visit": visit, "alert_ids": service.store.alert_ids(visit=visit)}

    @app.get(f"{PREFIX}/objects/{{dia_object_id}}/alerts")
    def object_alerts(dia_object_id: int, who: Who) -> dict[str, Any]:
        ids = service.store.alert_ids(dia_object_id=dia_object_id)
        return {"dia_object_id": dia_object_id, "alert_ids": ids}

    @app.get(f"{PREFIX}/alerts/{{alert_id}}")
    def alert(alert_id: int, who: Who, format: str = "full") -> Response:
        fmt = formats.format_of(format)
        packet = service.get_alert(alert_id)
        if fmt is FeedFormat.NOTIFICATION:
            body = formats.notification(service.alert_info(alert_id), fetch_url=policy.fetch_url)
            return Response(body, media_type="application/json")
        if fmt is FeedFormat.NO_CUTOUTS:
            packet = formats.convert(packet, cutouts=False)
        return Response(packet, media_type="application/vnd.kafka.avro.v2+octet-stream")

    # -- feeds ----------------------------------------------------------------------------

    @app.get(f"{PREFIX}/feeds")
    def feeds(who: Who) -> list[dict[str, Any]]:
        broker = None if who.role is Role.OPERATOR else who.name
        return [f.model_dump(mode="json") for f in service.feeds(broker)]

    @app.post(f"{PREFIX}/feeds", status_code=201)
    def create_feed(spec: FeedSpec, who: Who) -> dict[str, Any]:
        require(who, Role.BROKER)
        if who.role is not Role.OPERATOR and spec.broker != who.name:
            raise _HttpError(403, "forbidden", f"{who.name} may create feeds only for itself")
        return service.create_feed(spec, who.name).model_dump(mode="json")

    @app.get(f"{PREFIX}/feeds/{{name}}")
    def feed_status(name: str, who: Who) -> dict[str, Any]:
        feed = own_feed(who, name)
        return service.feed_status(feed).model_dump(mode="json")

    @app.delete(f"{PREFIX}/feeds/{{name}}", status_code=204)
    def delete_feed(name: str, who: Who) -> Response:
        own_feed(who, name)
        service.delete_feed(name, who.name)
        return Response(status_code=204)

    @app.get(f"{PREFIX}/feeds/{{name}}/entries")
    async def entries(
        name: str,
        who: Who,
        after: Annotated[int | None, Query(ge=0)] = None,
        max: Annotated[int | None, Query(ge=1)] = None,
        max_bytes: Annotated[int | None, Query(ge=1)] = None,
        wait: Annotated[float, Query(ge=0)] = 0.0,
    ) -> Response:
        feed = await run_in_threadpool(own_feed, who, name)
        _http_feed(feed)
        start = feed.cursor if after is None else after
        body, count, last = await run_in_threadpool(
            service.fetch_framed, name, after=start, max_entries=max, max_bytes=max_bytes,
            feed=feed,
        )  # fmt: skip
        if not count and wait > 0 and await service.wait(name, start, wait, feed):
            # Read the feed again: it may have been paused or deleted during the wait.
            body, count, last = await run_in_threadpool(
                service.fetch_framed, name, after=start, max_entries=max, max_bytes=max_bytes
            )
        headers = {
            "X-Ldf-Count": str(count),
            "X-Ldf-Last-Position": str(last if last is not None else start),
        }
        return Response(memoryview(body), media_type=BATCH_MEDIA_TYPE, headers=headers)

    @app.post(f"{PREFIX}/feeds/{{name}}/ack")
    def ack(name: str, body: dict[str, int], who: Who) -> dict[str, Any]:
        feed = own_feed(who, name)
        _http_feed(feed)
        if set(body) != {"position"}:
            raise UserInputError('ack body must be {"position": <int>}')
        feed = service.ack(name, int(body["position"]), feed)
        return {"feed": name, "cursor": feed.cursor, "delivered": feed.delivered}

    @app.post(f"{PREFIX}/replays", status_code=201)
    def replay(spec: ReplaySpec, who: Who) -> dict[str, Any]:
        require(who, Role.BROKER)
        if who.role is not Role.OPERATOR:
            with contextlib.suppress(NotFoundError):
                own_feed(who, spec.feed)
            if spec.broker not in (None, who.name):
                raise _HttpError(403, "forbidden", f"{who.name} may replay only into its own feeds")
        actor = "operator" if who.role is Role.OPERATOR else who.name
        return service.replay(spec, actor)

    @app.get(f"{PREFIX}/status")
    def status(who: Who) -> dict[str, Any]:
        broker = None if who.role is Role.OPERATOR else who.name
        return service.status(broker)

    @app.get(f"{PREFIX}/audit")
    def audit(
        who: Who, feed: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> list[dict[str, Any]]:
        require(who, Role.OPERATOR)
        return service.store.audit_trail(feed, limit)

    return app


def _http_feed(feed: Feed) -> None:
    """Refuse HTTP reads and acks of a NATS feed: its cursor means "safely in JetStream"."""
    if feed.transport != "http":
        raise StateError(
            f"feed {feed.name!r} is delivered over {feed.transport}: read it there "
            "(ldf.alerts.nats.NatsFeedSource)"
        )


def _plain_schema(parsed: Any) -> Any:
    """A fastavro-parsed schema without fastavro's private keys."""
    if isinstance(parsed, dict):
        return {k: _plain_schema(v) for k, v in parsed.items() if not k.startswith("__")}
    if isinstance(parsed, list):
        return [_plain_schema(v) for v in parsed]
    return parsed


def _status_page(status: dict[str, Any]) -> str:
    """The public status page: one row per feed."""
    rows = []
    now = time.time()
    for f in status["feeds"]:
        last = f["last_ack_unix"]
        ago = "never" if last is None else f"{now - last:.0f} s ago"
        state = "LAGGING" if f["lagging"] else "ok"
        cells = [
            f["name"], f["broker"], f["format"], f["transport"], f"{f['delivered']:,}",
            f"{f['lag_entries']:,}", f"{f['lag_s']:.1f} s", f"{f['rate_per_s']:.0f}/s", ago,
            str(f["errors"]), state,
        ]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    heads = ["feed", "broker", "format", "transport", "delivered", "lag", "lag age", "rate",
             "last ack", "errors", "state"]  # fmt: skip
    store = status["store"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' "
        "content='10'><title>ldf alert distribution</title><style>body{font-family:sans-serif}"
        "td,th{padding:2px 8px;text-align:right}</style></head><body>"
        "<h1>Alert distribution</h1>"
        f"<p>{store['alerts']:,} alerts from {store['visits']:,} visits; "
        f"{store['manifests']:,} manifests; log head {status['head']:,}.</p>"
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"
        + "".join(rows) + "</table></body></html>"
    )  # fmt: skip
