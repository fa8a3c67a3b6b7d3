"""Controller-side operations on the bus: status of every device, commands, event history.

Plain async functions over a `Bus`; the CLI (`ldf.ocs.cli`) is a thin layer over them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ldf.errors import UserInputError
from ldf.ocs.bus import Bus
from ldf.ocs.models import DeviceStatus, Message, State

__all__ = ["device_events", "device_status", "parse_params"]


async def device_status(bus: Bus, now: float | None = None) -> list[DeviceStatus]:
    """What the bus knows about every device that ever published an event.

    Parameters
    ----------
    bus
        The bus to read (latest message per topic; no subscriber needs to be running).
    now
        Time to compute heartbeat ages from (default: the current time).

    Returns
    -------
    list[DeviceStatus]
        One per device, sorted by name.
    """
    now = time.time() if now is None else now
    latest = await bus.latest("ocs.*.evt.*")
    by_device: dict[str, dict[str, Message]] = {}
    for message in latest:
        by_device.setdefault(message.device, {})[message.name] = message
    out = []
    for name in sorted(by_device):
        events = by_device[name]
        state: State | None = None
        if "summaryState" in events:
            state = State(int(events["summaryState"].payload["summaryState"]))
        beat = events.get("heartbeat")
        error = events.get("errorCode")
        in_fault = state is State.FAULT and error is not None
        out.append(
            DeviceStatus(
                name=name,
                state=None if state is None else state.name,
                summary_state=None if state is None else int(state),
                last_heartbeat=None if beat is None else beat.timestamp,
                heartbeat_age_s=None if beat is None else max(0.0, now - beat.timestamp),
                error_code=int(error.payload.get("errorCode", 0)) if in_fault and error else 0,
                error_report=str(error.payload.get("errorReport", ""))
                if in_fault and error
                else "",
            )
        )
    return out


async def device_events(bus: Bus, device: str) -> list[Message]:
    """The latest message of each event of a device, sorted by time."""
    found = await bus.latest(f"ocs.{device}.evt.*")
    return sorted(found, key=lambda m: m.timestamp)


def parse_params(items: list[str]) -> dict[str, Any]:
    """Turn ``key=value`` strings into command parameters (values parsed as JSON if they can).

    Raises
    ------
    UserInputError
        An item has no ``=``.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"invalid parameter {item!r}: expected key=value")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params
