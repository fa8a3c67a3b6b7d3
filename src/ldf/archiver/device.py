"""The archivers as OCS-commandable devices: ``MTArchiver`` (LSSTCam) and ``ATArchiver`` (LATISS).

While ENABLED a device listens for its camera's ``endReadout`` events and archives in a
background thread; DISABLED it stops taking new work (the queue persists). On enable it first
rescans the DAQ for readouts it missed while it was down, so an outage ends in a catch-up.
``setPolicy`` changes archiving policies (designation, backlog order, catch-up factor,
bandwidth limit...) in DISABLED or ENABLED; each device's policies are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import Any

from ldf.archiver.service import Archiver
from ldf.ocs.bus import Bus
from ldf.ocs.device import Device
from ldf.ocs.models import State

__all__ = ["DEVICE_NAMES", "ArchiverDevice"]

_log = logging.getLogger(__name__)

DEVICE_NAMES = {"LSSTCam": ("MTArchiver", "MTCamera"), "LATISS": ("ATArchiver", "ATCamera")}
"""Each instrument's archiver device and the camera device it listens to."""


class ArchiverDevice(Device):
    """An archiver on the OCS bus."""

    def __init__(self, archiver: Archiver, bus: Bus, *, heartbeat_interval_s: float = 1.0) -> None:
        name, camera = DEVICE_NAMES[archiver.instrument]
        super().__init__(
            name, bus, configurations=("default",), heartbeat_interval_s=heartbeat_interval_s
        )
        self.archiver = archiver
        self.camera = camera
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Task[None] | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        archiver.publish = self._publish_threadsafe
        self.register_command(
            "setPolicy", self._set_policy, allowed=(State.DISABLED, State.ENABLED)
        )

    def _publish_threadsafe(self, name: str, payload: dict[str, Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(
            self.bus.publish_event(self.name, name, payload), loop
        )
        future.add_done_callback(_log_failure)

    async def _set_policy(self, params: dict[str, Any]) -> str:
        policy = self.archiver.set_policy(**params)
        await self.log(logging.INFO, f"{self.name} policy now {policy.model_dump()}")
        return json.dumps(policy.model_dump())

    async def handle_enable(self) -> None:
        self._loop = asyncio.get_running_loop()
        found = await asyncio.to_thread(self.archiver.rescan_daq)
        if found:
            await self.log(logging.WARNING, f"{self.name}: catching up {found} missed exposure(s)")
        sub = await self.bus.subscribe(f"ocs.{self.camera}.evt.endReadout").start()
        self._listener = asyncio.create_task(self._listen(sub), name=f"{self.name} endReadout")
        self._stop.clear()
        self._worker = threading.Thread(
            target=self.archiver.run,
            kwargs={"until_idle": False, "stop": self._stop},
            name=f"{self.name} worker",
            daemon=True,
        )
        self._worker.start()

    async def _listen(self, sub: Any) -> None:
        try:
            async for message in sub:
                await asyncio.to_thread(self.archiver.on_end_readout, message.payload)
        finally:
            await sub.close()

    async def _stop_work(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
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

    async def wait_backlog(self, *, max_exposures: int = 1, timeout_s: float = 120.0) -> bool:
        """Wait until at most ``max_exposures`` exposures have files not yet in the OODS.

        Returns False if the timeout passed first (the caller goes on regardless).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            behind = await asyncio.to_thread(self.archiver.exposures_behind)
            if behind <= max_exposures:
                return True
            await asyncio.sleep(0.05)
        return False

    async def drain(self, *, exposures: int = 0, timeout_s: float = 600.0) -> bool:
        """Wait until at least ``exposures`` are recorded and nothing is left to do.

        Returns False if the timeout passed first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            seen = len(
                await asyncio.to_thread(self.archiver.store.exposures, self.archiver.instrument)
            )
            if seen >= exposures and await asyncio.to_thread(self.archiver.idle):
                return True
            await asyncio.sleep(0.1)
        return False


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        _log.warning("event not published: %s", future.exception())
