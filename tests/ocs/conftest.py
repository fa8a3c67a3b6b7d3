"""Fixtures of the OCS tests: buses of both backends.

``bus_factory`` opens buses that share one bus: the same log file (embedded) or the same
stream prefix on the NATS server (a fresh prefix per test, deleted afterwards). Two buses
from one factory stand for two processes, e.g. a device and a controller.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

from ldf.ocs.bus import Bus
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.bus_nats import NatsBus

NATS_URL = os.environ.get("LDF_TEST_NATS_URL", "nats://127.0.0.1:4222")
"""The NATS JetStream server the nats-marked tests use."""

BusFactory = Callable[[], Awaitable[Bus]]


def _nats_reachable() -> bool:
    url = urlparse(NATS_URL)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 4222), 1):
            return True
    except OSError:
        return False


def require_nats() -> None:
    """Skip (or fail, with LDF_REQUIRE_ENGINES=1) when the NATS server is unreachable."""
    if _nats_reachable():
        return
    reason = f"NATS server not reachable at {NATS_URL}"
    if os.environ.get("LDF_REQUIRE_ENGINES") == "1":
        pytest.fail(reason + " (LDF_REQUIRE_ENGINES=1)")
    pytest.skip(reason)


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
