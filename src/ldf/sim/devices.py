"""The simulated observatory's OCS devices: each instrument's scheduler and camera.

Rubin's scheduler and camera are CSCs; ours are `ldf.ocs.Device`s on the same bus as the
facility's services, so ``ldf ocs status`` shows them during a night and an operator can
command them. A camera or scheduler that is not ENABLED takes no exposures and announces no
visits: the night waits (and says so in a logMessage) until it is enabled again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

from ldf.config import Settings
from ldf.ocs.bus import Bus, open_bus
from ldf.ocs.device import Device
from ldf.ocs.models import State
from ldf.sim.night import DEVICES

__all__ = ["Observatory", "SimDevice"]

_log = logging.getLogger(__name__)


class SimDevice(Device):
    """A simulated camera or scheduler: publishes observing events only while ENABLED."""

    def __init__(self, name: str, bus: Bus, heartbeat_interval_s: float = 1.0) -> None:
        super().__init__(
            name,
            bus,
            configurations=("default", "fast"),
            heartbeat_interval_s=heartbeat_interval_s,
        )
        self._enabled = asyncio.Event()

    async def handle_enable(self) -> None:
        self._enabled.set()

    async def handle_disable(self) -> None:
        self._enabled.clear()

    async def fault(self, code: int, report: str) -> None:
        self._enabled.clear()
        await super().fault(code, report)

    async def publish_when_enabled(self, name: str, payload: dict[str, Any]) -> None:
        """Publish an observing event, first waiting for the device to be ENABLED."""
        if not self._enabled.is_set():
            await self.log(
                logging.WARNING, f"{self.name} is {self.state.name}: waiting to publish {name}"
            )
            await self._enabled.wait()
        await self.bus.publish_event(self.name, name, payload)


class Observatory:
    """The simulated observatory's devices on one bus, brought to ENABLED for a night."""

    def __init__(self, bus: Bus, devices: dict[str, SimDevice]) -> None:
        self.bus = bus
        self.devices = devices

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, settings: Settings, instruments: Iterable[str]
    ) -> AsyncIterator[Observatory]:
        """Open the bus, start and enable every device; on exit take them OFFLINE."""
        bus = await open_bus(settings.bus, settings.home)
        devices: dict[str, SimDevice] = {}
        try:
            for inst in instruments:
                for name in DEVICES[inst]:
                    devices[name] = SimDevice(name, bus, settings.bus.heartbeat_interval_s)
            for dev in devices.values():
                await dev.open()
                await dev.execute("start", {"configuration": "default"})
                await dev.execute("enable")
            yield cls(bus, devices)
        finally:
            for dev in devices.values():
                with contextlib.suppress(Exception):
                    if dev.state is State.ENABLED:
                        await dev.execute("disable")
                    if dev.state in (State.DISABLED, State.FAULT):
                        await dev.execute("standby")
                    if dev.state is State.STANDBY:
                        await dev.execute("exitControl")
                await dev.close()
            await bus.close()

    async def publish(self, device: str, name: str, payload: dict[str, Any]) -> None:
        """Publish an event of one of the observatory's devices (waits while it is disabled)."""
        await self.devices[device].publish_when_enabled(name, payload)
