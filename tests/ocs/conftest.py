"""Fixtures of the OCS tests: buses of both backends.

``bus_factory`` opens buses that share one bus: the same log file (embedded) or the same
stream prefix on the NATS server (a fresh prefix per test, deleted afterwards). Two buses
from one factory stand for two processes, e.g. a device and a controller.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from tests.engines import NATS_URL, require_nats

from ldf.ocs.bus import Bus
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.bus_nats import NatsBus

BusFactory = Callable[[], Awaitable[Bus]]


@pytest.fixture(params=["embedded", pytest.param("nats", marks=pytest.mark.nats)])
async def bus_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BusFactory]:
    """Open buses sharing one backend instance; all are closed (and NATS streams deleted)."""
    opened: list[Bus] = []
    prefix = f"T{uuid.uuid4().hex[:12]}"
    if request.param == "nats":
        require_nats()

    async def make() -> Bus:
        bus: Bus
        if request.param == "embedded":
            bus = EmbeddedBus(tmp_path / "bus" / "ocs.sqlite3", command_timeout_s=5.0)
        else:
            bus = await NatsBus.connect(NATS_URL, stream_prefix=prefix, command_timeout_s=5.0)
        opened.append(bus)
        return bus

    yield make
    for bus in opened:
        await bus.close()
    if request.param == "nats":
        cleaner = await NatsBus.connect(NATS_URL, stream_prefix=prefix)
        await cleaner.js.delete_stream(cleaner.stream)
        await cleaner.close()


@pytest.fixture
async def bus(bus_factory: BusFactory) -> Bus:
    """One bus of each backend."""
    return await bus_factory()
