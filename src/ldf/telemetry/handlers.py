"""The Telemetry Gateway's HTTP API (FastAPI), under ``/telemetry/v1``.

=======  ==================================  ====================================================
method   path                                what
=======  ==================================  ====================================================
POST     ``/topics/{topic}/messages``        one message ``{"message_id", "payload"}``
POST     ``/topics/{topic}/batches``         ``{"messages": [...]}``, stored in one transaction
GET      ``/topics``                         the topics
GET      ``/topics/{topic}/schema``          a topic's payload as JSON Schema
GET      ``/status``                         state, backlog, per-producer counts (operators)
GET      ``/audit?producer=&outcome=&limit=``  the audit trail, newest first (operators)
GET      ``/health`` (at the root)           no token needed
=======  ==================================  ====================================================

Every route but ``/health`` needs ``Authorization: Bearer <token>``. A message is answered
201 once it is stored durably (200 for a duplicate of one stored before). Refusals are JSON,
``{"error": {"code", "message"}}``, checked in this order: 401 missing or unknown token,
404 unknown topic, 403 topic outside the token's scope, 503 gateway not ENABLED, 413 body
over the limit (``Content-Length`` first, then the bytes actually read), 422 schema
violation (the message names the field path; ``errors`` lists them all), 409 a message id
used before with another payload. A refused message is never stored nor injected, and
every refusal is in the audit trail.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldf.errors import LdfError, UserInputError
from ldf.ocs.device import Device
from ldf.telemetry.errors import (
    PayloadTooLargeError,
    SchemaViolationError,
    http_status,
)
from ldf.telemetry.models import API_PREFIX, Producer
from ldf.telemetry.service import TelemetryGateway, guess_message_id

__all__ = ["PREFIX", "create_app", "read_body"]

_log = logging.getLogger(__name__)

PREFIX = API_PREFIX
"""Where the API lives."""

MAX_AUDIT = 10_000
"""Most audit rows one request returns."""


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="telemetry"'}
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes.

    Raises
    ------
    PayloadTooLargeError
        ``Content-Length`` says more than ``limit``, or more than ``limit`` bytes arrive.
    UserInputError
        ``Content-Length`` is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise UserInputError(f"Content-Length must be a number of bytes, got {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLargeError(f"body of {int(declared)} bytes; at most {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _gateway(request: Request) -> TelemetryGateway:
    gateway: TelemetryGateway = request.app.state.gateway
    return gateway


def producer_of(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Producer:
    """Dependency: the producer of the request's bearer token (401 otherwise)."""
    return _gateway(request).authenticate(authorization)


def operator_of(request: Request, producer: Annotated[Producer, Depends(producer_of)]) -> Producer:
    """Dependency: the producer, if an operator (403 otherwise)."""
    _gateway(request).require_operator(producer)
    return producer


def create_app(gateway: TelemetryGateway, *, device: Device | None = None) -> FastAPI:
    """The gateway's web app.

    Parameters
    ----------
    gateway
        The service.
    device
        Its OCS device, whose health ``/health`` reports (None: the gateway's state only).
    """
    app = FastAPI(title="ldf Telemetry Gateway", summary="Telemetry into the OCS (LDM-230 2.7)")
    app.state.gateway = gateway
    policy = gateway.policy

    @app.exception_handler(LdfError)
    async def _ldf_error(_request: Request, exc: LdfError) -> JSONResponse:
        status = http_status(exc)
        if status == 500:
            _log.error("telemetry request failed: %s", exc)
        extra = {"errors": exc.errors} if isinstance(exc, SchemaViolationError) else {}
        return _error(status, exc.code, str(exc).splitlines()[0], **extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, "invalid_input", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return _error(exc.status_code, code, str(exc.detail))

    @app.get("/health")
    def health() -> JSONResponse:
        try:
            counts = gateway.store.counts()
        except Exception as exc:  # the health check reports, never raises
            return JSONResponse({"ok": False, "error": str(exc).splitlines()[0]}, 503)
        body: dict[str, Any] = {
            "ok": gateway.state.name != "FAULT",
            "service": "telemetry",
            "state": gateway.state.name,
            "accepting": gateway.accepting,
            "backlog": counts.get("pending", 0),
        }
        if device is not None:
            body["device"] = device.health()
        return JSONResponse(body, 200 if body["ok"] else 503)

    @app.get(f"{PREFIX}/topics", dependencies=[Depends(producer_of)])
    def topics() -> list[dict[str, Any]]:
        return gateway.topics()

    @app.get(f"{PREFIX}/topics/{{topic}}/schema", dependencies=[Depends(producer_of)])
    def schema(topic: str) -> JSONResponse:
        return JSONResponse(gateway.topic(topic).schema(), media_type="application/schema+json")

    async def submit(request: Request, topic: str, *, batch: bool) -> JSONResponse:
        client = request.client.host if request.client else ""
        producer: Producer | None = None
        message_id: str | None = None
        try:
            producer = gateway.authenticate(request.headers.get("authorization"))
            gateway.authorize(producer, topic)
            gateway.check_accepting()
            body = await read_body(
                request, policy.max_batch_bytes if batch else policy.max_body_bytes
            )
            try:
                messages = gateway.parse(topic, body, batch=batch)
            except LdfError:
                message_id = None if batch else guess_message_id(body)
                raise
            if not batch:
                message_id = messages[0].message_id
            results = await run_in_threadpool(
                gateway.accept, producer, topic, messages, client=client
            )
        except LdfError as exc:
            await run_in_threadpool(
                gateway.reject,
                exc,
                producer=producer,
                topic=topic,
                message_id=message_id,
                client=client,
            )
            raise
        new = sum(1 for r in results if r.status == "accepted")
        status = 201 if new else 200
        if not batch:
            return JSONResponse(results[0].model_dump(mode="json"), status_code=status)
        return JSONResponse(
            {
                "accepted": new,
                "duplicates": len(results) - new,
                "results": [r.model_dump(mode="json") for r in results],
            },
            status_code=status,
        )

    @app.post(f"{PREFIX}/topics/{{topic}}/messages", status_code=201)
    async def post_message(request: Request, topic: str) -> JSONResponse:
        return await submit(request, topic, batch=False)

    @app.post(f"{PREFIX}/topics/{{topic}}/batches", status_code=201)
    async def post_batch(request: Request, topic: str) -> JSONResponse:
        return await submit(request, topic, batch=True)

    @app.get(f"{PREFIX}/status", dependencies=[Depends(operator_of)])
    def status() -> JSONResponse:
        return JSONResponse(gateway.status().model_dump(mode="json"))

    @app.get(f"{PREFIX}/audit", dependencies=[Depends(operator_of)])
    def audit(
        producer: str | None = None,
        outcome: str | None = None,
        before_id: int | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_AUDIT)] = 100,
    ) -> JSONResponse:
        rows = gateway.audit(producer=producer, outcome=outcome, before_id=before_id, limit=limit)
        return JSONResponse([r.model_dump(mode="json") for r in rows])

    return app
