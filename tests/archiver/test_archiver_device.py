"""Archivers on the OCS bus, and kill -9 in the middle of an exposure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from tests.archiver.conftest import end_readouts

from ldf.archiver.device import ArchiverDevice
from ldf.archiver.models import JobState
from ldf.archiver.service import Archiver
from ldf.config import Settings
from ldf.errors import CommandFailedError, CommandRefusedError
from ldf.ocs.bus import open_bus
from ldf.sim.daq import DaqStore


async def test_device_archives_endreadout_events_and_takes_policy(
    settings: Settings, night: DaqStore
) -> None:
    bus = await open_bus(settings.bus, settings.home)
    controller = await open_bus(settings.bus, settings.home)
    dev = ArchiverDevice(Archiver.open("LSSTCam", settings), bus)
    try:
        async with controller.subscribe("ocs.MTArchiver.evt.*") as events:
            await dev.open()
            with pytest.raises(CommandRefusedError, match="cannot setPolicy in state STANDBY"):
                await controller.command("MTArchiver", "setPolicy", {"compress": True}, timeout=5)
            await controller.command("MTArchiver", "start", timeout=5)
            ack = await controller.command(
                "MTArchiver", "setPolicy", {"backlog_order": "newest-first"}, timeout=5
            )
            assert json.loads(ack.result)["backlog_order"] == "newest-first"
            with pytest.raises(CommandFailedError, match="bad policy"):
                await controller.command(
                    "MTArchiver", "setPolicy", {"catchup_factor": 0.5}, timeout=5
                )
            await controller.command("MTArchiver", "enable", timeout=5)
            # Enabling caught up with the DAQ already; the camera's events are idempotent.
            for payload in end_readouts(night, "LSSTCam"):
                await bus.publish_event("MTCamera", "endReadout", payload)
            assert await dev.drain(exposures=2, timeout_s=60)
            names: list[str] = []
            while True:
                try:
                    names.append((await events.get(timeout=0.5)).name)
                except TimeoutError:
                    break
        assert names.count("imageInOODS") == 4
        assert names.count("imageArchived") == 4
        assert names.count("exposureArchived") == 2
        assert dev.archiver.policy.backlog_order == "newest-first"
        assert {j.state for j in dev.archiver.store.jobs("LSSTCam")} == {JobState.ARCHIVED}
    finally:
        await dev.close()
        dev.archiver.close()
        await bus.close()
        await controller.close()


def test_kill9_mid_exposure_then_exactly_once(settings: Settings, night: DaqStore) -> None:
    """A killed archiver, restarted, archives every file once: no loss, no duplicate."""
    env = {**os.environ, "LDF_HOME": str(settings.home)}
    code = textwrap.dedent(
        """
        from ldf.config import load_settings
        from ldf.archiver.service import Archiver
        s = load_settings(policies={"backbone": {"butler": False},
                                    "archiver": {"workers": 1, "rate_limit_mbps": 2.0}})
        a = Archiver.open("LSSTCam", s)
        a.rescan_daq()
        a.run()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    oods = settings.home / "oods" / "LSSTCam"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and not list(oods.rglob("*.fits")):
            assert proc.poll() is None, "the archiver ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(list(oods.rglob("*.fits")))
    assert 1 <= done_before < 4  # killed mid-way
    assert not [
        p
        for p in oods.rglob("*")
        if p.name.startswith(".") and p.is_file() and "tmp" in p.name and p.suffix == ".fits"
    ]
    arch = Archiver.open("LSSTCam", settings)
    try:
        report = arch.run()
        assert report.errors == []
        jobs = arch.store.jobs("LSSTCam")
        assert len(jobs) == 4
        assert {j.state for j in jobs} == {JobState.ARCHIVED}
        assert arch.backbone.store.file_counts() == {"active": 4}  # type: ignore[union-attr]
        lfns = [j.lfn for j in jobs]
        assert len(set(lfns)) == 4
        assert len(list(oods.rglob("*.fits"))) == 4
        for j in jobs:
            f = arch.backbone.store.get_file(j.lfn or "")  # type: ignore[union-attr]
            assert f is not None
            assert f.adler32 == j.checksum
    finally:
        arch.close()
