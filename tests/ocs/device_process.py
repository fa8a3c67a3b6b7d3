"""Run a device on the embedded bus in its own process (used by the cross-process tests).

Usage: ``python device_process.py HOME DEVICE [publish N]``. Without ``publish`` it serves
the device until ``exitControl``; with ``publish N`` it publishes N telemetry messages on
``ocs.DEVICE.tel.counter`` and exits.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.device import Device


async def main(home: Path, device: str, args: list[str]) -> None:
    async with EmbeddedBus(home / "bus" / "ocs.sqlite3") as bus:
        if args and args[0] == "publish":
            for i in range(int(args[1])):
                await bus.publish_telemetry(device, "counter", {"i": i})
            return
        await Device(
            device, bus, configurations=("default", "night"), heartbeat_interval_s=0.1
        ).serve()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]))
