"""Devices on the bus: commands, refusals, failing hooks, faults, heartbeats (both backends)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ldf.errors import CommandRefusedError, UserInputError
from ldf.ocs.bus import Bus, CommandFailedError
from ldf.ocs.device import Device
from ldf.ocs.models import AckCode, State

BusFactory = Callable[[], Awaitable[Bus]]
WAIT = 5.0


class Camera(Device):
    """A device that records its hooks and can be told to fail one."""

    def __init__(self, bus: Bus, **kwargs: Any) -> None:
        super().__init__("MTCamera", bus, configurations=("default", "fast"), **kwargs)
        self.calls: list[str] = []
        self.fail_on: str | None = None
        self.policy = "none"
        self.register_command("setPolicy", self.set_policy, allowed=(State.DISABLED, State.ENABLED))

    async def set_policy(self, params: dict[str, Any]) -> str:
        self.policy = str(params["policy"])
        return f"policy {self.policy}"

    def _hook(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_on == name:
            raise RuntimeError(f"{name} went wrong")

    async def handle_start(self, configuration: str) -> None:
        self._hook(f"start:{configuration}")

    async def handle_enable(self) -> None:
        self._hook("enable")

    async def handle_disable(self) -> None:
        self._hook("disable")

    async def handle_standby(self) -> None:
        self._hook("standby")

    async def handle_exit_control(self) -> None:
        self._hook("exitControl")


@pytest.fixture
async def setup(bus_factory: BusFactory) -> AsyncIterator[tuple[Camera, Bus]]:
    """A camera on one bus, a controller bus, heartbeats fast."""
    device_bus, controller = await bus_factory(), await bus_factory()
    async with Camera(device_bus, heartbeat_interval_s=0.05) as camera:
        yield camera, controller


async def test_full_cycle(setup: tuple[Camera, Bus]) -> None:
    camera, ctl = setup
    async with ctl.subscribe("ocs.MTCamera.evt.summaryState") as states:
        await ctl.command("MTCamera", "start", {"configuration": "fast"}, timeout=WAIT)
        assert camera.configuration == "fast"
        for name in ("enable", "disable", "standby", "exitControl"):
            ack = await ctl.command("MTCamera", name, timeout=WAIT)
            assert ack.code is AckCode.COMPLETE
        seen = [State((await states.get(WAIT)).payload["summaryState"]) for _ in range(5)]
    assert seen == [State.DISABLED, State.ENABLED, State.DISABLED, State.STANDBY, State.OFFLINE]
    assert camera.calls == ["start:fast", "enable", "disable", "standby", "exitControl"]
    assert camera.state is State.OFFLINE


async def test_start_uses_default_configuration(setup: tuple[Camera, Bus]) -> None:
    camera, ctl = setup
    ack = await ctl.command("MTCamera", "start", timeout=WAIT)
    assert ack.result == "MTCamera is DISABLED"
    assert camera.configuration == "default"


async def test_illegal_command_refused_and_changes_nothing(setup: tuple[Camera, Bus]) -> None:
    camera, ctl = setup
    with pytest.raises(CommandRefusedError) as info:
        await ctl.command("MTCamera", "enable", timeout=WAIT)
    assert str(info.value) == "MTCamera: cannot enable in state STANDBY; allowed in DISABLED"
    assert camera.state is State.STANDBY
    assert camera.calls == []


async def test_unknown_configuration_refused(setup: tuple[Camera, Bus]) -> None:
    camera, ctl = setup
    with pytest.raises(
        CommandRefusedError, match="unknown configuration 'slow'; known: default, fast"
    ):
        await ctl.command("MTCamera", "start", {"configuration": "slow"}, timeout=WAIT)
    assert camera.state is State.STANDBY


async def test_unknown_command_refused(setup: tuple[Camera, Bus]) -> None:
    _, ctl = setup
    with pytest.raises(CommandRefusedError, match="unknown command 'reboot'; known: start"):
        await ctl.command("MTCamera", "reboot", timeout=WAIT)


async def test_failing_hook_fails_command_and_logs(setup: tuple[Camera, Bus]) -> None:
    camera, ctl = setup
    await ctl.command("MTCamera", "start", timeout=WAIT)
    camera.fail_on = "enable"
    async with ctl.subscribe("ocs.MTCamera.evt.logMessage") as logs:
        with pytest.raises(CommandFailedError, match="MTCamera: enable failed: enable went wrong"):
            await ctl.command("MTCamera", "enable", timeout=WAIT)
        log = await logs.get(WAIT)
    assert camera.state is State.DISABLED
    assert log.payload["level"] == logging.ERROR
    assert "enable went wrong" in log.payload["message"]


async def test_registered_command(setup: tuple[Camera, Bus]) -> None:
    camera, ctl = setup
    with pytest.raises(
        CommandRefusedError,
        match="cannot setPolicy in state STANDBY; allowed in DISABLED, ENABLED",
    ):
        await ctl.command("MTCamera", "setPolicy", {"policy": "fast"}, timeout=WAIT)
    await ctl.command("MTCamera", "start", timeout=WAIT)
    ack = await ctl.command("MTCamera", "setPolicy", {"policy": "fast"}, timeout=WAIT)
    assert ack.result == "policy fast"
    assert camera.policy == "fast"


async def test_fault_then_standby(setup: tuple[Camera, Bus]) -> None:
    camera, ctl = setup
    await ctl.command("MTCamera", "start", timeout=WAIT)
    await ctl.command("MTCamera", "enable", timeout=WAIT)
    async with ctl.subscribe("ocs.MTCamera.evt.*") as events:
        await camera.fault(42, "cryostat too warm")
        names: list[str] = []
        # The bus orders messages per topic, not across topics: wait for both.
        while not {"errorCode", "summaryState"} <= set(names):
            message = await events.get(WAIT)
            if message.name != "heartbeat":
                names.append(message.name)
                if message.name == "errorCode":
                    assert message.payload == {
                        "errorCode": 42,
                        "errorReport": "cryostat too warm",
                        "traceback": "",
                    }
    assert sorted(names) == ["errorCode", "summaryState"]
    assert camera.health()["ok"] is False
    for name in ("enable", "disable", "start", "exitControl"):
        with pytest.raises(CommandRefusedError, match=f"cannot {name} in state FAULT"):
            await ctl.command("MTCamera", name, timeout=WAIT)
    await ctl.command("MTCamera", "standby", timeout=WAIT)
    assert camera.state is State.STANDBY
    assert camera.health()["errorCode"] == 0


async def test_heartbeats(setup: tuple[Camera, Bus]) -> None:
    camera, ctl = setup
    async with ctl.subscribe("ocs.MTCamera.evt.heartbeat") as beats:
        first, second = await beats.get(WAIT), await beats.get(WAIT)
    assert second.seq == first.seq + 1
    assert camera.last_heartbeat is not None


async def test_execute_in_process(bus: Bus) -> None:
    camera = Camera(bus)
    assert await camera.execute("start", {"configuration": "fast"}) == "MTCamera is DISABLED"
    with pytest.raises(CommandRefusedError):
        await camera.execute("start")
    camera.fail_on = "enable"
    with pytest.raises(RuntimeError, match="enable went wrong"):
        await camera.execute("enable")
    assert camera.state is State.DISABLED


async def test_serve_returns_after_exit_control(bus_factory: BusFactory) -> None:
    device_bus, ctl = await bus_factory(), await bus_factory()
    camera = Camera(device_bus)
    async with ctl.subscribe("ocs.MTCamera.evt.summaryState") as states:
        served = asyncio.create_task(camera.serve())
        await states.get(WAIT)  # STANDBY: it listens
        await ctl.command("MTCamera", "exitControl", timeout=WAIT)
        await asyncio.wait_for(served, WAIT)
    assert camera.state is State.OFFLINE


async def test_register_command_twice_refused(bus: Bus) -> None:
    camera = Camera(bus)
    with pytest.raises(UserInputError, match="already exists"):
        camera.register_command("setPolicy", camera.set_policy, allowed=[State.ENABLED])
    with pytest.raises(UserInputError, match="already exists"):
        camera.register_command("enable", camera.set_policy, allowed=[State.ENABLED])
