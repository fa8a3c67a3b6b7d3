"""Prompt Processing as OCS-commandable devices: ``MTPrompt`` (LSSTCam), ``ATPrompt`` (LATISS).

While ENABLED a device listens to its scheduler's ``nextVisit`` (preload), its camera's
``endReadout`` (the latency clock) and its archiver's ``imageInOODS`` (a raw to process), and
dispatches detectors to the warm pool in a background thread. QA parameters go out as the
device's telemetry (``ocs.MTPrompt.tel.imageQuality``, ``…tel.calibrationQA``). ``setPolicy``
selects QA-first, the science timeout and the backlog policy (LDM-230 2.1.3.2.1);
``catchUp`` runs offline catch-up of everything waiting for it (LDM-230 2.1.3.2.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from ldf.ocs.bus import Bus
from ldf.ocs.device import Device
from ldf.ocs.models import State
from ldf.prompt.service import PromptService

__all__ = ["DEVICE_NAMES", "PromptDevice", "parse_obs_id"]

_log = logging.getLogger(__name__)

DEVICE_NAMES = {
    "LSSTCam": ("MTPrompt", "MTScheduler", "MTCamera", "MTArchiver"),
    "LATISS": ("ATPrompt", "ATScheduler", "ATCamera", "ATArchiver"),
}
"""Each instrument's prompt device, and the scheduler, camera and archiver it listens to."""


def parse_obs_id(obs_id: str) -> tuple[int, int]:
    """(day_obs, seq_num) of an obs_id such as 'MC_O_20261121_000123'.

    Raises
    ------
    ValueError
        Not an obs_id.
    """
    parts = obs_id.split("_")
    if len(parts) != 4 or not (parts[2].isdigit() and parts[3].isdigit()):
        raise ValueError(f"not an obs_id: {obs_id!r}")
    return int(parts[2]), int(parts[3])


class PromptDevice(Device):
    """Prompt Processing of one instrument on the OCS bus."""

    def __init__(
        self, service: PromptService, bus: Bus, *, heartbeat_interval_s: float = 1.0
    ) -> None:
        name, scheduler, camera, archiver = DEVICE_NAMES[service.instrument]
        super().__init__(
            name, bus, configurations=("default",), heartbeat_interval_s=heartbeat_interval_s
        )
        self.service = service
        self.sources = (scheduler, camera, archiver)
        oods_root = service.settings.policies.oods.root
        self.oods_root = Path(oods_root) if oods_root else service.settings.home / "oods"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[asyncio.Task[None]] = []
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        service.publish_telemetry = self._publish_telemetry_threadsafe
        self.register_command(
            "setPolicy", self._set_policy, allowed=(State.DISABLED, State.ENABLED)
        )
        self.register_command("catchUp", self._catch_up, allowed=(State.DISABLED,))

    def _publish_telemetry_threadsafe(self, name: str, payload: dict[str, Any]) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        future = asyncio.run_coroutine_threadsafe(
            self.bus.publish_telemetry(self.name, name, payload), loop
        )
        try:
            future.result(timeout=5.0)
        except Exception as exc:
            _log.warning("%s: telemetry not published: %s", self.name, exc)
            return False
        return True

    async def _set_policy(self, params: dict[str, Any]) -> str:
        policy = self.service.set_policy(**params)
        await self.log(logging.INFO, f"{self.name} policy now {policy.model_dump()}")
        return json.dumps(policy.model_dump())

    async def _catch_up(self, params: dict[str, Any]) -> str:
        n = await asyncio.to_thread(self.service.run_offline)
        return json.dumps({"processed": n})

    async def handle_enable(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.service.start)
        scheduler, camera, archiver = self.sources
        for topic, handler in (
            (f"ocs.{scheduler}.evt.nextVisit", self._on_next_visit),
            (f"ocs.{camera}.evt.endReadout", self._on_end_readout),
            (f"ocs.{archiver}.evt.imageInOODS", self._on_image),
        ):
            sub = await self.bus.subscribe(topic).start()
            self._listeners.append(
                asyncio.create_task(self._listen(sub, handler), name=f"{self.name} {topic}")
            )
        self._stop.clear()
        self._worker = threading.Thread(
            target=self.service.run,
            kwargs={"stop": self._stop},
            name=f"{self.name} dispatcher",
            daemon=True,
        )
        self._worker.start()
        await asyncio.to_thread(self.service.flush_telemetry)

    async def _listen(self, sub: Any, handler: Any) -> None:
        try:
            async for message in sub:
                try:
                    await asyncio.to_thread(handler, message)
                except Exception as exc:  # one bad event must not stop the device
                    await self.log(logging.WARNING, f"{self.name}: {message.name}: {exc}")
        finally:
            await sub.close()

    def _on_next_visit(self, message: Any) -> None:
        self.service.on_next_visit(message.payload)

    def _on_end_readout(self, message: Any) -> None:
        payload = message.payload
        visit = payload.get("visit") or {}
        day_obs, seq = parse_obs_id(str(payload["imageName"]))
        if visit.get("instrument", self.service.instrument) != self.service.instrument:
            return
        self.service.on_end_readout(day_obs * 100000 + seq, message.timestamp)

    def _on_image(self, message: Any) -> None:
        payload = message.payload
        obs_id = str(payload["obs_id"])
        day_obs, seq = parse_obs_id(obs_id)
        filename = Path(str(payload["filename"])).name  # never a path from the bus
        path = self.oods_root / self.service.instrument / str(day_obs) / obs_id / filename
        self.service.on_image(
            day_obs * 100000 + seq, str(payload["detector"]), path, arrived_unix=time.time()
        )

    async def _stop_work(self) -> None:
        for task in self._listeners:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._listeners = []
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
        await asyncio.to_thread(self.service.stop)
        await super().close()

    async def wait_backlog(self, *, max_visits: int = 1, timeout_s: float = 120.0) -> bool:
        """Wait until at most ``max_visits`` visits have detectors queued or running.

        Returns False if the timeout passed first (the caller goes on regardless).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            behind = await asyncio.to_thread(self.service.store.busy_exposures)
            if behind <= max_visits:
                return True
            await asyncio.sleep(0.05)
        return False

    async def drain(self, *, timeout_s: float = 600.0) -> bool:
        """Wait until nothing is queued or running."""
        return await asyncio.to_thread(self.service.wait_idle, timeout_s)
