"""Health and metrics endpoints every service serves for its devices.

``health_app(devices)`` is a FastAPI app with ``/health`` (JSON; HTTP 503 when any device
is in FAULT) and ``/metrics`` (Prometheus text, the metrics of every device's registry
merged). Services mount it in their own app, or run it with `serve_health` beside their
work (``ldf night --http-port``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ldf.netutil import serve_app
from ldf.ocs.device import Device

__all__ = ["health_app", "health_report", "metrics_text", "serve_health"]


class _Merged(Collector):
    """Every metric family of several registries, families with one name merged."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        self.registries = registries

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for registry in self.registries:
            for family in registry.collect():
                if family.name not in families:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                families[family.name].samples.extend(family.samples)
        yield from families.values()


def metrics_text(devices: Iterable[Device]) -> bytes:
    """Prometheus exposition text of every device's registry (shared registries once)."""
    registries: dict[int, CollectorRegistry] = {}
    for device in devices:
        registries.setdefault(id(device.metrics.registry), device.metrics.registry)
    out = CollectorRegistry(auto_describe=False)
    out.register(_Merged(list(registries.values())))
    return bytes(generate_latest(out))


def health_report(devices: Iterable[Device]) -> dict[str, Any]:
    """``{"ok": bool, "devices": [device.health(), ...]}``; ok when no device is in FAULT."""
    reports = [d.health() for d in devices]
    return {"ok": all(r["ok"] for r in reports), "devices": reports}


def health_app(devices: Iterable[Device], *, title: str = "ldf device health") -> FastAPI:
    """A FastAPI app serving ``/health`` and ``/metrics`` for some devices.

    Parameters
    ----------
    devices
        The devices to report on (kept as given: a list may grow later).
    title
        OpenAPI title.
    """
    devs = devices if isinstance(devices, list) else list(devices)
    app = FastAPI(title=title)

    @app.get("/health")
    async def health() -> JSONResponse:
        report = health_report(devs)
        return JSONResponse(report, status_code=200 if report["ok"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(metrics_text(devs), media_type=CONTENT_TYPE_LATEST)

    return app


@contextlib.asynccontextmanager
async def serve_health(
    devices: Iterable[Device], *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve `health_app` over HTTP while the context is open; yields the base URL.

    Runs uvicorn in this event loop (no extra process). ``port=0`` picks a free port.

    Raises
    ------
    TransportError
        The address cannot be bound (e.g. the port is taken).
    """
    async with serve_app(health_app(devices), host=host, port=port, what="health") as url:
        yield url
