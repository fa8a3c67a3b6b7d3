"""Alert distribution as an OCS-commandable device: ``AlertDistribution``.

While ENABLED it runs the background work (lag checks, archiving) and publishes
``ocs.AlertDistribution.evt.feedLagging`` when a feed falls behind its thresholds and
``…evt.feedCaughtUp`` when it recovers. ``replay`` (a `ReplaySpec` as parameters) re-sends alerts
into a feed; ``closeVisit`` publishes a visit's manifest. The HTTP API runs beside it
(`ldf.alerts.daemon`), whatever the device's state, so brokers can always read what is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

from ldf.alerts.models import FeedStatus, ReplaySpec
from ldf.alerts.service import AlertService
from ldf.ocs.bus import Bus
from ldf.ocs.device import Device
from ldf.ocs.models import State

__all__ = ["DEVICE_NAME", "AlertDevice"]

_log = logging.getLogger(__name__)

DEVICE_NAME = "AlertDistribution"


class AlertDevice(Device):
    """Alert distribution on the OCS bus."""

    def __init__(
        self, service: AlertService, bus: Bus, *, heartbeat_interval_s: float = 1.0
    ) -> None:
        super().__init__(DEVICE_NAME, bus, heartbeat_interval_s=heartbeat_interval_s)
        self.service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.events: list[tuple[str, str]] = []
        """(event, feed) published so far (for the main job's summary)."""
        service.lag_listeners.append(self._on_lag)
        self.register_command("replay", self._replay, allowed=(State.ENABLED,))
        self.register_command(
            "closeVisit", self._close_visit, allowed=(State.DISABLED, State.ENABLED)
        )

    def _on_lag(self, feed: str, lagging: bool, status: FeedStatus) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        name = "feedLagging" if lagging else "feedCaughtUp"
        self.events.append((name, feed))
        future = asyncio.run_coroutine_threadsafe(
            self.bus.publish_event(self.name, name, status.model_dump(mode="json")), loop
        )
        try:
            future.result(timeout=5.0)
        except Exception as exc:
            _log.warning("%s: %s not published: %s", self.name, name, exc)

    async def _replay(self, params: dict[str, Any]) -> str:
        spec = ReplaySpec.model_validate(params)
        out = await asyncio.to_thread(self.service.replay, spec, "operator")
        return json.dumps(out)

    async def _close_visit(self, params: dict[str, Any]) -> str:
        manifest = await asyncio.to_thread(self.service.close_visit, int(params["visit"]))
        return manifest.model_dump_json()

    async def handle_enable(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._worker = threading.Thread(
            target=self.service.run_background, args=(self._stop,), name=f"{self.name} bg",
            daemon=True,
        )  # fmt: skip
        self._worker.start()

    async def _stop_work(self) -> None:
        self._stop.set()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
            self._worker = None

    async def handle_disable(self) -> None:
        await self._stop_work()

    async def fault(self, code: int, report: str) -> None:
        await self._stop_work()
        await super().fault(code, report)

    async def close(self) -> None:
        await self._stop_work()
        await super().close()
