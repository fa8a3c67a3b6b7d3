"""The Telemetry Gateway as an OCS-commandable device (``TelemetryGateway`` by default).

ENABLED
    Accepts messages over HTTP and injects the buffer into the OCS bus.
DISABLED, STANDBY, FAULT, OFFLINE
    Refuses new messages (HTTP 503 with the state in the reason) and injects nothing: what
    is buffered stays buffered until the device is ENABLED again.

Besides the standard events the device publishes ``gatewayStatus`` (state, backlog,
accepted, injected, producers failing to inject) after every transition and every
``status_interval_s``. Its commands beyond the standard ones: ``purge`` (forget injected
messages and audit rows older than the retention window).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Self

from ldf.errors import LdfError
from ldf.ocs.bus import Bus
from ldf.ocs.device import Device
from ldf.ocs.models import State
from ldf.telemetry.service import Injector, TelemetryGateway

__all__ = ["TelemetryGatewayDevice"]

_log = logging.getLogger(__name__)


class TelemetryGatewayDevice(Device):
    """The gateway on the OCS bus; its injector publishes on the same bus.

    Parameters
    ----------
    gateway
        The service (its ``state`` follows the device's).
    bus
        The OCS bus.
    heartbeat_interval_s
        Seconds between heartbeats.
    status_interval_s
        Seconds between ``gatewayStatus`` events.
    poll_s
        The injector's look at the buffer when not woken (see `Injector`).
    """

    def __init__(
        self,
        gateway: TelemetryGateway,
        bus: Bus,
        *,
        heartbeat_interval_s: float = 1.0,
        status_interval_s: float = 10.0,
        poll_s: float = 1.0,
    ) -> None:
        super().__init__(gateway.device_name, bus, heartbeat_interval_s=heartbeat_interval_s)
        self.gateway = gateway
        self.status_interval_s = status_interval_s
        self.injector = Injector(gateway, bus, poll_s=poll_s)
        self._injecting: asyncio.Task[None] | None = None
        self._reporting: asyncio.Task[None] | None = None
        gateway.state = self.state
        self.register_command(
            "purge", self._purge, allowed=(State.DISABLED, State.ENABLED, State.STANDBY)
        )

    # -- transitions -------------------------------------------------------------------------

    async def handle_start(self, configuration: str) -> None:
        self.gateway.state = State.DISABLED

    async def handle_enable(self) -> None:
        self._injecting = asyncio.create_task(self.injector.run(), name=f"{self.name} injector")
        self.gateway.state = State.ENABLED

    async def handle_disable(self) -> None:
        self.gateway.state = State.DISABLED
        await self._stop_injecting()

    async def handle_standby(self) -> None:
        self.gateway.state = State.STANDBY

    async def handle_exit_control(self) -> None:
        self.gateway.state = State.OFFLINE

    async def fault(self, code: int, report: str) -> None:
        self.gateway.state = State.FAULT
        await self._stop_injecting()
        await super().fault(code, report)

    async def publish_summary_state(self) -> None:
        await super().publish_summary_state()
        await self.publish_status()

    # -- events ------------------------------------------------------------------------------

    def status_event(self) -> dict[str, Any]:
        """The ``gatewayStatus`` payload: state, totals and producers failing to inject."""
        status = self.gateway.status()
        return {
            "state": status.state,
            "accepting": status.accepting,
            "backlog": status.backlog,
            "accepted": sum(p.accepted for p in status.producers),
            "injected": sum(p.injected for p in status.producers),
            "duplicates": sum(p.duplicates for p in status.producers),
            "rejected": sum(p.rejected for p in status.producers) + status.rejected_unauthenticated,
            "producers": len(status.producers),
            "failing": [p.producer for p in status.producers if p.failing],
            "lastError": self.injector.last_error or "",
        }

    async def publish_status(self) -> None:
        """Publish ``gatewayStatus`` (logged, never raised, when the bus or database fails)."""
        try:
            payload = await asyncio.to_thread(self.status_event)
            await self.bus.publish_event(self.name, "gatewayStatus", payload)
        except Exception as exc:
            _log.warning("%s: status not published: %s", self.name, exc)

    async def _purge(self, params: dict[str, Any]) -> str:
        messages, audits = await asyncio.to_thread(self.gateway.purge)
        return json.dumps({"messages": messages, "audit": audits})

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> Self:
        await super().open()
        if self._reporting is None:
            self._reporting = asyncio.create_task(self._report_loop(), name=f"{self.name} status")
        return self

    async def close(self) -> None:
        await self._stop_injecting()
        if self._reporting is not None:
            self._reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporting
            self._reporting = None
        await super().close()

    async def _stop_injecting(self) -> None:
        task, self._injecting = self._injecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval_s)
            with contextlib.suppress(LdfError):
                await self.publish_status()
