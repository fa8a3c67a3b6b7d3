"""Embedded backend only: several processes share the log; the log is trimmed."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from ldf.config.models import BusSettings
from ldf.errors import StorageError
from ldf.ocs.bus import open_bus
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.models import State

SCRIPT = Path(__file__).with_name("device_process.py")
WAIT = 10.0


async def test_open_bus_embedded_uses_home(tmp_path: Path) -> None:
    async with await open_bus(BusSettings(), tmp_path) as bus:
        assert isinstance(bus, EmbeddedBus)
        await bus.publish_event("Cam", "heartbeat", {})
    assert (tmp_path / "bus" / "ocs.sqlite3").is_file()


def test_unwritable_log_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "bus").write_text("not a directory")
    with pytest.raises(StorageError, match="cannot open the bus log"):
        EmbeddedBus(tmp_path / "bus" / "ocs.sqlite3")


async def test_messages_from_another_process(tmp_path: Path) -> None:
    async with EmbeddedBus(tmp_path / "bus" / "ocs.sqlite3") as bus:
        async with bus.subscribe("ocs.Remote.tel.counter") as sub:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(SCRIPT), str(tmp_path), "Remote", "publish", "20"
            )
            assert await proc.wait() == 0
            got = [await sub.get(WAIT) for _ in range(20)]
        assert [m.payload["i"] for m in got] == list(range(20))
        last = await bus.last("ocs.Remote.tel.counter")
        assert last is not None
        assert last.payload == {"i": 19}


async def test_command_a_device_in_another_process(tmp_path: Path) -> None:
    async with EmbeddedBus(tmp_path / "bus" / "ocs.sqlite3") as bus:
        async with bus.subscribe("ocs.Night.evt.summaryState") as states:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(SCRIPT), str(tmp_path), "Night"
            )
            try:
                assert (await states.get(WAIT)).payload["summaryState"] == State.STANDBY
                await bus.command("Night", "start", {"configuration": "night"}, timeout=WAIT)
                await bus.command("Night", "standby", timeout=WAIT)
                await bus.command("Night", "exitControl", timeout=WAIT)
                assert await asyncio.wait_for(proc.wait(), WAIT) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        states_seen = [m.payload["state"] for m in await bus.latest("ocs.Night.evt.summaryState")]
        assert states_seen == ["OFFLINE"]


async def test_trim_keeps_latest_per_topic(tmp_path: Path) -> None:
    async with EmbeddedBus(tmp_path / "ocs.sqlite3", retention_s=60.0) as bus:
        for i in range(10):
            await bus.publish_event("Cam", "heartbeat", {"i": i})
            await bus.publish_telemetry("Cam", "temperature", {"i": i})
        deleted = bus.trim(now=time.time() + 3600)
        assert deleted == 18
        latest = await bus.latest("ocs.Cam.>")
        assert [m.payload["i"] for m in latest] == [9, 9]
        assert bus.trim() == 0


async def test_trim_runs_while_publishing(tmp_path: Path) -> None:
    async with EmbeddedBus(tmp_path / "ocs.sqlite3", retention_s=0.0, trim_every=5) as bus:
        for i in range(12):
            await bus.publish_event("Cam", "heartbeat", {"i": i})
        rows = bus._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    assert rows <= 3
