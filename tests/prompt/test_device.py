"""MTPrompt on the OCS bus: events in, telemetry out, policies by command."""

from __future__ import annotations

import json
import time

import pytest

from ldf.errors import CommandFailedError, CommandRefusedError
from ldf.ocs.bus import open_bus
from ldf.prompt.device import PromptDevice, parse_obs_id
from ldf.prompt.service import PromptService
from tests.prompt.conftest import DETECTORS, Facility, write_raws


def test_parse_obs_id() -> None:
    assert parse_obs_id("MC_O_20261121_000123") == (20261121, 123)
    with pytest.raises(ValueError, match="not an obs_id"):
        parse_obs_id("../../etc/passwd")


async def test_device_processes_announced_visit_and_publishes_quality(
    facility: Facility,
) -> None:
    settings = facility.settings
    bus = await open_bus(settings.bus, settings.home)
    controller = await open_bus(settings.bus, settings.home)
    service = PromptService.open(settings, "LSSTCam")
    service.detectors = list(DETECTORS)
    dev = PromptDevice(service, bus)
    visit = facility.visits[0]
    try:
        async with controller.subscribe("ocs.MTPrompt.tel.*") as telemetry:
            await dev.open()
            with pytest.raises(CommandRefusedError):
                await controller.command("MTPrompt", "setPolicy", {"qa_first": False}, timeout=5)
            await controller.command("MTPrompt", "start", timeout=5)
            ack = await controller.command(
                "MTPrompt", "setPolicy", {"science_timeout_s": 90, "workers": 1}, timeout=5
            )
            assert json.loads(ack.result)["science_timeout_s"] == 90
            with pytest.raises(CommandFailedError, match="invalid prompt policy"):
                await controller.command("MTPrompt", "setPolicy", {"backlog": "x"}, timeout=5)
            await controller.command("MTPrompt", "enable", timeout=30)
            payload = visit.model_dump(mode="json")
            await bus.publish_event("MTScheduler", "nextVisit", payload)
            raws = write_raws(facility, visit)
            await bus.publish_event(
                "MTCamera", "endReadout", {"imageName": visit.obs_id, "visit": payload}
            )
            for det, path in raws.items():
                await bus.publish_event(
                    "MTArchiver",
                    "imageInOODS",
                    {"obs_id": visit.obs_id, "detector": det, "filename": path.name},
                )
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                jobs = service.store.jobs(visit.exposure_id)
                if len(jobs) == len(DETECTORS) and all(j["state"] == "done" for j in jobs):
                    break
                await dev.drain(timeout_s=1)
            names = []
            while True:
                try:
                    msg = await telemetry.get(timeout=1.0)
                except TimeoutError:
                    break
                names.append(msg.name)
                assert msg.payload["exposure_id"] == visit.exposure_id
        assert {j["state"] for j in service.store.jobs(visit.exposure_id)} == {"done"}
        assert names.count("imageQuality") == len(DETECTORS)
        (report,) = service.reports()
        assert report.latency_p98_s is not None
        await controller.command("MTPrompt", "disable", timeout=30)
    finally:
        await dev.close()
        service.close()
        await bus.close()
        await controller.close()
