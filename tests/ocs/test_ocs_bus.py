"""Contract of the OCS bus: every backend passes the same tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from ldf.errors import CommandRefusedError, CommandTimeoutError
from ldf.ocs.bus import Bus
from ldf.ocs.models import AckCode, Kind, Message

BusFactory = Callable[[], Awaitable[Bus]]

WAIT = 5.0
"""Upper bound on waiting for a message that must arrive (never reached when it works)."""


async def test_event_delivered_with_sender_and_sequence(bus_factory: BusFactory) -> None:
    sender, receiver = await bus_factory(), await bus_factory()
    async with receiver.subscribe("ocs.Cam.evt.summaryState") as sub:
        sent = await sender.publish_event("Cam", "summaryState", {"summaryState": 5})
        got = await sub.get(WAIT)
    assert got == sent
    assert got.topic == "ocs.Cam.evt.summaryState"
    assert (got.device, got.kind, got.name) == ("Cam", Kind.EVT, "summaryState")
    assert got.payload == {"summaryState": 5}
    assert got.sender == sender.sender
    assert got.seq == 1


async def test_publisher_sees_its_own_messages(bus: Bus) -> None:
    async with bus.subscribe("ocs.Cam.tel.temperature") as sub:
        await bus.publish_telemetry("Cam", "temperature", {"value": -100.5})
        got = await sub.get(WAIT)
    assert got.payload == {"value": -100.5}
    assert got.kind is Kind.TEL


async def test_order_per_topic(bus_factory: BusFactory) -> None:
    sender, receiver = await bus_factory(), await bus_factory()
    n = 60
    async with receiver.subscribe("ocs.Cam.tel.>") as sub:
        for i in range(n):
            await sender.publish_telemetry("Cam", "counter", {"i": i})
            await sender.publish_telemetry("Cam", "other", {"i": i})
        got = [await sub.get(WAIT) for _ in range(2 * n)]
    counter = [m for m in got if m.name == "counter"]
    assert [m.payload["i"] for m in counter] == list(range(n))
    assert [m.seq for m in counter] == list(range(1, n + 1))


async def test_wildcards(bus_factory: BusFactory) -> None:
    sender, receiver = await bus_factory(), await bus_factory()
    async with (
        receiver.subscribe("ocs.Cam.evt.*") as cam_events,
        receiver.subscribe("ocs.*.evt.summaryState") as states,
        receiver.subscribe("ocs.Cam.>") as everything_cam,
    ):
        await sender.publish_telemetry("Cam", "temperature", {"value": 1})
        await sender.publish_event("Cam", "summaryState", {"summaryState": 5})
        await sender.publish_event("Other", "heartbeat", {})
        await sender.publish_event("Other", "summaryState", {"summaryState": 1})
        await sender.publish_event("Cam", "heartbeat", {})
        cam = [await cam_events.get(WAIT) for _ in range(2)]
        state = [await states.get(WAIT) for _ in range(2)]
        every = [await everything_cam.get(WAIT) for _ in range(3)]
        # Nothing else matched: a marker published last arrives next on each subscription.
        await sender.publish_event("Cam", "summaryState", {"summaryState": 2})
        assert (await cam_events.get(WAIT)).payload == {"summaryState": 2}
        assert (await states.get(WAIT)).payload == {"summaryState": 2}
        assert (await everything_cam.get(WAIT)).payload == {"summaryState": 2}
    assert [m.name for m in cam] == ["summaryState", "heartbeat"]
    assert [m.device for m in state] == ["Cam", "Other"]
    assert [m.name for m in every] == ["temperature", "summaryState", "heartbeat"]


async def test_subscription_starts_live(bus: Bus) -> None:
    await bus.publish_event("Cam", "logMessage", {"message": "before"})
    async with bus.subscribe("ocs.Cam.evt.logMessage") as sub:
        await bus.publish_event("Cam", "logMessage", {"message": "after"})
        got = await sub.get(WAIT)
    assert got.payload == {"message": "after"}


async def test_subscription_ends_when_bus_closes(bus_factory: BusFactory) -> None:
    bus = await bus_factory()
    sub = await bus.subscribe("ocs.Cam.evt.*").start()
    await bus.close()
    assert [m async for m in sub] == []


async def _fake_device(
    bus: Bus, device: str, ready: asyncio.Event, *, refuse: bool = False, die: bool = False
) -> None:
    """Acknowledge one command: complete, refuse, or say in-progress and then vanish."""
    async with bus.commands(device) as commands:
        ready.set()
        command = await commands.get(WAIT)
        if refuse:
            await bus.ack(command, AckCode.NOPERM, f"{device}: cannot {command.name} now")
        elif die:
            await bus.ack(command, AckCode.IN_PROGRESS)
            await bus.close()
        else:
            await bus.ack(command, AckCode.IN_PROGRESS)
            await bus.ack(command, AckCode.COMPLETE, f"did {command.payload}")


async def _run_fake(bus: Bus, device: str, **how: bool) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(_fake_device(bus, device, ready, **how))
    await asyncio.wait_for(ready.wait(), WAIT)
    return task


async def test_command_round_trip(bus_factory: BusFactory) -> None:
    device_bus, controller = await bus_factory(), await bus_factory()
    task = await _run_fake(device_bus, "Cam")
    ack = await controller.command("Cam", "start", {"configuration": "fast"}, timeout=WAIT)
    await task
    assert ack.code is AckCode.COMPLETE
    assert ack.result == "did {'configuration': 'fast'}"
    assert (ack.device, ack.command) == ("Cam", "start")


async def test_command_refused(bus_factory: BusFactory) -> None:
    device_bus, controller = await bus_factory(), await bus_factory()
    task = await _run_fake(device_bus, "Cam", refuse=True)
    with pytest.raises(CommandRefusedError, match="Cam: cannot enable now"):
        await controller.command("Cam", "enable", timeout=WAIT)
    await task


async def test_command_timeout_when_nobody_listens(bus: Bus) -> None:
    with pytest.raises(CommandTimeoutError, match=r"no acknowledgement from Ghost within 0.3 s"):
        await bus.command("Ghost", "enable", timeout=0.3)


async def test_device_dies_mid_command(bus_factory: BusFactory) -> None:
    device_bus, controller = await bus_factory(), await bus_factory()
    task = await _run_fake(device_bus, "Cam", die=True)
    with pytest.raises(CommandTimeoutError, match="accepted enable but sent no final"):
        await controller.command("Cam", "enable", timeout=0.5)
    await task


async def test_acks_of_other_commands_are_ignored(bus_factory: BusFactory) -> None:
    device_bus, controller = await bus_factory(), await bus_factory()
    stranger = Message.build("Cam", Kind.CMD, "enable")
    async with device_bus.commands("Cam") as commands:
        pending = asyncio.create_task(controller.command("Cam", "enable", timeout=WAIT))
        command = await commands.get(WAIT)
        await device_bus.ack(stranger, AckCode.NOPERM, "not yours")
        await device_bus.ack(command, AckCode.COMPLETE, "yours")
        ack = await pending
    assert ack.result == "yours"


async def test_last_value_and_devices(bus_factory: BusFactory) -> None:
    sender, reader = await bus_factory(), await bus_factory()
    for state in (5, 1, 2):
        await sender.publish_event("Cam", "summaryState", {"summaryState": state})
    await sender.publish_event("Arch", "heartbeat", {})
    await sender.publish_telemetry("Tel", "temperature", {"value": 3})
    last = await reader.last("ocs.Cam.evt.summaryState")
    assert last is not None
    assert last.payload == {"summaryState": 2}
    assert last.seq == 3
    assert await reader.last("ocs.Cam.evt.errorCode") is None
    assert await reader.devices() == ["Arch", "Cam"]
    latest = await reader.latest("ocs.*.evt.*")
    assert [m.topic for m in latest] == ["ocs.Arch.evt.heartbeat", "ocs.Cam.evt.summaryState"]
