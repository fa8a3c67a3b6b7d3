"""AlertDistribution on the OCS bus: lag events, replay and closeVisit by command."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from ldf.alerts.device import AlertDevice
from ldf.alerts.models import FeedSpec
from ldf.alerts.service import AlertService
from ldf.config import Settings
from ldf.errors import CommandRefusedError
from ldf.ocs.bus import open_bus
from tests.alerts.conftest import VISIT, packets


async def test_device_publishes_lag_events_and_takes_commands(
    service: AlertService,
) -> None:
    settings = Settings()
    bus = await open_bus(settings.bus, settings.home)
    controller = await open_bus(settings.bus, settings.home)
    service.policy.lag_check_s = 0.05
    service.policy.archive_delay_s = 0.0
    dev = AlertDevice(service, bus)
    service.create_feed(FeedSpec(name="slow", broker="b", lag_alarm_entries=3))
    try:
        async with controller.subscribe("ocs.AlertDistribution.evt.*") as events:
            await dev.open()
            with pytest.raises(CommandRefusedError):
                await controller.command("AlertDistribution", "replay", {"feed": "x",
                                         "visits": [VISIT]}, timeout=5)  # fmt: skip
            await controller.command("AlertDistribution", "start", timeout=5)
            await controller.command("AlertDistribution", "enable", timeout=5)
            service.ingest(packets(VISIT, 5))
            ack = await controller.command(
                "AlertDistribution", "closeVisit", {"visit": VISIT}, timeout=5
            )
            assert json.loads(ack.result)["count"] == 5
            lagging = None
            while lagging is None:
                msg = await events.get(timeout=10)
                if msg.name == "feedLagging":
                    lagging = msg
            assert lagging.payload["name"] == "slow"
            assert lagging.payload["lag_entries"] >= 5
            ack = await controller.command(
                "AlertDistribution", "replay", {"feed": "again", "broker": "b",
                                                "visits": [VISIT]}, timeout=10,
            )  # fmt: skip
            assert json.loads(ack.result)["alerts"] == 5
            batch = service.fetch("slow")
            service.ack("slow", batch[-1].position)
            while True:
                msg = await events.get(timeout=10)
                if msg.name == "feedCaughtUp":
                    assert msg.payload["name"] == "slow"
                    break
            # The background work archives closed visits.
            deadline = time.monotonic() + 10
            while service.store.counts()["archived"] < 5 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert service.store.counts()["archived"] == 5
    finally:
        await dev.close()
        await bus.close()
        await controller.close()
