"""/health and /metrics for devices, driven in-process."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, Counter

from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.device import Device
from ldf.ocs.health import health_app


async def test_health_and_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with EmbeddedBus(tmp_path / "ocs.sqlite3") as bus:
        camera = Device("MTCamera", bus, registry=registry)
        archiver = Device("Archiver", bus, registry=registry)
        other = Device("Oods", bus)  # its own registry
        files = Counter("ldf_archiver_files", "Files archived.", registry=registry)
        files.inc(3)
        await camera.execute("start")
        await camera.execute("enable")
        app = health_app([camera, archiver, other])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/health")
            assert response.status_code == 200
            body = response.json()
            assert body["ok"] is True
            assert [(d["name"], d["state"]) for d in body["devices"]] == [
                ("MTCamera", "ENABLED"),
                ("Archiver", "STANDBY"),
                ("Oods", "STANDBY"),
            ]

            await archiver.fault(7, "disk full")
            response = await client.get("/health")
            assert response.status_code == 503
            faulty = response.json()["devices"][1]
            assert faulty["ok"] is False
            assert (faulty["errorCode"], faulty["errorReport"]) == (7, "disk full")

            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            text = response.text
    lines = set(text.splitlines())
    assert 'ldf_ocs_summary_state{device="MTCamera"} 2.0' in lines
    assert 'ldf_ocs_summary_state{device="Archiver"} 3.0' in lines
    assert 'ldf_ocs_summary_state{device="Oods"} 5.0' in lines
    assert (
        'ldf_ocs_commands_total{command="enable",device="MTCamera",result="complete"} 1.0' in lines
    )
    assert "ldf_archiver_files_total 3.0" in lines
    # One family per name even though two registries carry it.
    assert sum(1 for line in lines if line.startswith("# TYPE ldf_ocs_summary_state ")) == 1


async def test_heartbeat_metric_counts(tmp_path: Path) -> None:
    async with EmbeddedBus(tmp_path / "ocs.sqlite3") as bus:
        camera = Device("MTCamera", bus, heartbeat_interval_s=0.01)
        async with bus.subscribe("ocs.MTCamera.evt.heartbeat") as beats, camera:
            for _ in range(3):
                await beats.get(5.0)
        value = camera.metrics.registry.get_sample_value(
            "ldf_ocs_heartbeats_total", {"device": "MTCamera"}
        )
    assert value is not None
    assert value >= 3
    assert camera.health()["last_heartbeat"] is not None
