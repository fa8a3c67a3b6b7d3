"""Injection into the OCS bus: order per producer, the OCS side down for a while, the device."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from ldf.ocs.bus import Bus, Subscription
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.models import Message, State
from ldf.telemetry.device import TelemetryGatewayDevice
from ldf.telemetry.models import EXAMPLES
from ldf.telemetry.service import Injector, TelemetryGateway, bus_message
from tests.engines import NATS_URL, require_nats
from tests.telemetry.conftest import FlakyBus, Http, Tokens, image_quality, message

IQ = "/topics/imageQuality/messages"


async def collect(sub: Subscription, n: int, within: float = 10.0) -> list[Message]:
    """The next ``n`` messages of a subscription (fails the test if they do not come)."""
    out = []
    for _ in range(n):
        out.append(await sub.get(timeout=within))
    return out


async def nothing_more(sub: Subscription, wait: float = 0.2) -> None:
    try:
        extra = await sub.get(timeout=wait)
    except TimeoutError:
        return
    pytest.fail(f"unexpected message {extra.id}")


async def wait_for(check: Callable[[], bool], within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(injector: Injector) -> AsyncIterator[Injector]:
    task = asyncio.create_task(injector.run())
    try:
        yield injector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def send_interleaved(http: Http, tokens: Tokens, n: int, prefix: str = "") -> None:
    """``n`` imageQuality messages of 'prompt' and ``n`` batchJobResults of 'batch', interleaved."""
    prompt, batch = http(tokens.prompt), http(tokens.batch)
    job = dict(EXAMPLES["batchJobResult"])
    for i in range(n):
        r = await prompt.post(
            IQ, json=message(f"{prefix}iq-{i}", image_quality(detector=f"R{i:02d}"))
        )
        assert r.status_code == 201, r.text
        r = await batch.post(
            "/topics/batchJobResult/messages",
            json=message(f"{prefix}job-{i}", {**job, "job_id": f"job-{i}", "message": prefix}),
        )
        assert r.status_code == 201, r.text


def by_producer(messages: list[Message]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in messages:
        producer, _, mid = m.id.partition("/")
        out.setdefault(producer, []).append(mid)
    return out


async def test_injects_each_producer_in_order(
    http: Http, tokens: Tokens, gateway: TelemetryGateway, bus: EmbeddedBus
) -> None:
    async with bus.subscribe("ocs.*.tel.*") as sub, running(Injector(gateway, bus)) as inj:
        await send_interleaved(http, tokens, 20)
        got = await collect(sub, 40)
        await nothing_more(sub)
    assert by_producer(got) == {
        "prompt": [f"iq-{i}" for i in range(20)],
        "batch": [f"job-{i}" for i in range(20)],
    }
    iq = next(m for m in got if m.id == "prompt/iq-3")
    assert (iq.topic, iq.device, iq.name) == (
        "ocs.MTPrompt.tel.imageQuality",
        "MTPrompt",
        "imageQuality",
    )
    assert iq.payload == image_quality(detector="R03")
    job = next(m for m in got if m.id == "batch/job-0")
    assert job.topic == "ocs.OCSBatch.tel.batchJobResult"
    assert job.payload["started_at"] == "2026-11-22T10:00:00Z"
    assert inj.injected == 40
    st = gateway.status()
    assert st.backlog == 0
    assert {p.producer: p.injected for p in st.producers} == {"batch": 20, "prompt": 20}
    assert all(a.injected_at is not None for a in gateway.audit(outcome="accepted"))


async def test_ocs_side_down_buffers_then_drains_in_order(
    http: Http, tokens: Tokens, gateway: TelemetryGateway, bus: EmbeddedBus
) -> None:
    flaky = FlakyBus(bus)
    flaky.down = True
    async with bus.subscribe("ocs.*.tel.*") as sub, running(Injector(gateway, flaky)) as inj:
        await send_interleaved(http, tokens, 15, prefix="a-")
        # The gateway keeps trying (with backoff) and keeps accepting meanwhile.
        await wait_for(lambda: flaky.failures >= 6)
        await send_interleaved(http, tokens, 15, prefix="b-")
        await nothing_more(sub)
        st = gateway.status()
        assert st.backlog == 60
        assert all(p.failing for p in st.producers)
        assert {p.last_error for p in st.producers} == {
            "TransportError: the OCS bus is unreachable (test)"
        }
        assert inj.failures.keys() == {"prompt", "batch"}
        assert gateway.store.counts() == {"pending": 60}

        flaky.down = False  # the OCS side comes back
        got = await collect(sub, 60)
        await nothing_more(sub)
    expected = {
        "prompt": [f"{p}iq-{i}" for p in ("a-", "b-") for i in range(15)],
        "batch": [f"{p}job-{i}" for p in ("a-", "b-") for i in range(15)],
    }
    assert by_producer(got) == expected  # all of them, once each, in each producer's order
    st = gateway.status()
    assert st.backlog == 0
    assert not any(p.failing for p in st.producers)
    assert all(p.injection_errors >= 3 for p in st.producers)
    assert inj.failures == {}


async def test_a_failure_in_the_middle_of_a_drain_keeps_the_order(
    http: Http, tokens: Tokens, gateway: TelemetryGateway, bus: EmbeddedBus
) -> None:
    flaky = FlakyBus(bus)
    flaky.fail_after = 4  # four publishes go through, then the bus goes away
    prompt = http(tokens.prompt)
    batch = {"messages": [message(f"m{i}", image_quality(detector=f"R{i:02d}")) for i in range(10)]}
    assert (await prompt.post("/topics/imageQuality/batches", json=batch)).status_code == 201
    async with bus.subscribe("ocs.*.tel.*") as sub, running(Injector(gateway, flaky)):
        first = await collect(sub, 4)
        await wait_for(lambda: flaky.failures >= 2)
        assert [m.message_id for m in gateway.store.pending("prompt")] == [
            f"m{i}" for i in range(4, 10)
        ]
        flaky.down = False
        rest = await collect(sub, 6)
        await nothing_more(sub)
    assert [m.id for m in first + rest] == [f"prompt/m{i}" for i in range(10)]


async def test_bus_messages_carry_the_gateway_id(
    http: Http, tokens: Tokens, gateway: TelemetryGateway
) -> None:
    await http(tokens.prompt).post(IQ, json=message("iq-9", image_quality()))
    (stored,) = gateway.store.pending("prompt")
    msg = bus_message(stored)
    assert (msg.id, msg.topic, msg.kind) == ("prompt/iq-9", "ocs.MTPrompt.tel.imageQuality", "tel")


# -- the device ------------------------------------------------------------------------------


@pytest.fixture
async def device(
    gateway: TelemetryGateway, bus: EmbeddedBus
) -> AsyncIterator[TelemetryGatewayDevice]:
    dev = TelemetryGatewayDevice(gateway, bus, heartbeat_interval_s=0.2, status_interval_s=0.2)
    await dev.open()
    yield dev
    await dev.close()


async def post_status(http: Http, tokens: Tokens, mid: str) -> int:
    return (await http(tokens.prompt).post(IQ, json=message(mid, image_quality()))).status_code


async def test_device_states_decide_acceptance_and_injection(
    http: Http, tokens: Tokens, gateway: TelemetryGateway, bus: EmbeddedBus,
    device: TelemetryGatewayDevice,
) -> None:  # fmt: skip
    assert device.state is State.STANDBY
    assert await post_status(http, tokens, "s0") == 503
    async with bus.subscribe("ocs.*.tel.*") as sub:
        await bus.command(device.name, "start")
        assert gateway.state is State.DISABLED
        assert await post_status(http, tokens, "d0") == 503
        await bus.command(device.name, "enable")
        assert gateway.accepting
        assert await post_status(http, tokens, "e0") == 201
        (got,) = await collect(sub, 1)
        assert got.id == "prompt/e0"
        await bus.command(device.name, "disable")
        assert await post_status(http, tokens, "d1") == 503
        # While DISABLED nothing is injected, even what is in the buffer.
        gateway.state = State.ENABLED  # (sneak one in, as if accepted just before disable)
        assert await post_status(http, tokens, "e1") == 201
        gateway.state = State.DISABLED
        await nothing_more(sub, 0.3)
        await bus.command(device.name, "enable")
        (got,) = await collect(sub, 1)
        assert got.id == "prompt/e1"
    refused = [a.status for a in gateway.audit(outcome="rejected")]
    assert refused == [503, 503, 503]


async def test_device_publishes_gateway_status(
    http: Http, tokens: Tokens, bus: EmbeddedBus, device: TelemetryGatewayDevice
) -> None:
    async with bus.subscribe(f"ocs.{device.name}.evt.gatewayStatus") as sub:
        await device.execute("start")
        await device.execute("enable")
        assert await post_status(http, tokens, "x") == 201
        for _ in range(50):
            event = await sub.get(timeout=5)
            if event.payload["injected"] == 1:
                break
    assert event.payload["state"] == "ENABLED"
    assert event.payload["accepting"] is True
    assert (event.payload["accepted"], event.payload["backlog"]) == (1, 0)
    ack = await bus.command(device.name, "purge")
    assert ack.result == '{"messages": 0, "audit": 0}'


async def test_fault_stops_injection_and_refuses(
    http: Http, tokens: Tokens, gateway: TelemetryGateway, device: TelemetryGatewayDevice
) -> None:
    await device.execute("start")
    await device.execute("enable")
    await device.fault(1, "database lost")
    assert gateway.state is State.FAULT
    assert await post_status(http, tokens, "f") == 503
    assert device.health()["ok"] is False


# -- NATS JetStream --------------------------------------------------------------------------


@pytest.mark.nats
async def test_injects_into_nats_jetstream(
    http: Http, tokens: Tokens, gateway: TelemetryGateway
) -> None:
    require_nats()
    from ldf.ocs.bus_nats import NatsBus

    prefix = f"T{uuid.uuid4().hex[:12]}"
    bus: Bus = await NatsBus.connect(NATS_URL, stream_prefix=prefix)
    assert isinstance(bus, NatsBus)
    try:
        async with bus.subscribe("ocs.*.tel.*") as sub, running(Injector(gateway, bus)):
            await send_interleaved(http, tokens, 10)
            got = await collect(sub, 20)
        assert by_producer(got) == {
            "prompt": [f"iq-{i}" for i in range(10)],
            "batch": [f"job-{i}" for i in range(10)],
        }
        # Stored by JetStream, not only delivered live.
        last = await bus.last("ocs.MTPrompt.tel.imageQuality")
        assert last is not None
        assert last.id == "prompt/iq-9"
        info = await bus.js.stream_info(bus.stream)
        assert info.state.messages == 20
        # At-least-once, deduplicated: injecting a message again (as after a crash between
        # publish and mark) does not store it twice (the bus id is JetStream's Nats-Msg-Id).
        again = gateway.store.messages("prompt", limit=1)[0]
        await bus.publish(bus_message(again))
        info = await bus.js.stream_info(bus.stream)
        assert info.state.messages == 20
    finally:
        await bus.js.delete_stream(bus.stream)
        await bus.close()
