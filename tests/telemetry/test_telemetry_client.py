"""`TelemetryClient` against a real uvicorn server (the gateway's device on the embedded bus)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ldf.errors import UserInputError
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.telemetry.client import TelemetryClient, default_message_id
from ldf.telemetry.daemon import Served, serve_gateway
from ldf.telemetry.errors import TelemetryRejectedError
from ldf.telemetry.models import EXAMPLES
from ldf.telemetry.service import TelemetryGateway
from tests.telemetry.conftest import Tokens, image_quality


@pytest.fixture
async def served(gateway: TelemetryGateway, bus: EmbeddedBus) -> AsyncIterator[Served]:
    async with serve_gateway(gateway, bus, poll_s=0.05) as s:
        yield s


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client call off the event loop the server runs in."""
    return asyncio.to_thread(fn, *args, **kwargs)


async def test_send_is_true_once_held_and_the_message_reaches_the_bus(
    served: Served, tokens: Tokens, bus: EmbeddedBus, gateway: TelemetryGateway
) -> None:
    async with bus.subscribe("ocs.MTPrompt.tel.*") as sub:
        with TelemetryClient(served.url, tokens.prompt) as client:
            assert await call(client.send, "imageQuality", image_quality())
            assert await call(client.send, "imageQuality", image_quality())  # duplicate: True
            assert await call(client, "calibrationQA", dict(EXAMPLES["calibrationQA"]))
            assert await call(
                client.send_batch,
                "imageQuality",
                [
                    (None, image_quality(detector="R1")),
                    ("explicit-id", image_quality(detector="R2")),
                ],
            )
            got = [await sub.get(timeout=10) for _ in range(4)]
    mid = default_message_id("imageQuality", image_quality())
    assert [m.id for m in got] == [
        f"prompt/{mid}",
        f"prompt/{default_message_id('calibrationQA', dict(EXAMPLES['calibrationQA']))}",
        f"prompt/{default_message_id('imageQuality', image_quality(detector='R1'))}",
        "prompt/explicit-id",
    ]
    assert gateway.status().producers[0].duplicates == 1


def test_default_message_ids_are_deterministic() -> None:
    a = default_message_id("imageQuality", image_quality())
    assert a == default_message_id("imageQuality", dict(reversed(image_quality().items())))
    assert a.startswith("imageQuality-2026112100042-R22_S11-")
    assert len(a.rsplit("-", 1)[1]) == 12
    assert a != default_message_id("imageQuality", image_quality(seeing_arcsec=0.9))
    job = default_message_id("batchJobResult", dict(EXAMPLES["batchJobResult"]))
    assert job.startswith("batchJobResult-ocsbatch-20261122-0007-")
    bare = default_message_id("x", {"a": 1})
    assert len(bare) == len("x-") + 24


async def test_refusals_raise_and_unavailability_returns_false(
    served: Served, tokens: Tokens
) -> None:
    with TelemetryClient(served.url, tokens.prompt) as client:
        with pytest.raises(
            TelemetryRejectedError, match=r"\(422 schema_violation\).*seeing_arcsec"
        ) as e:
            await call(client.send, "imageQuality", image_quality(seeing_arcsec="bad"))
        assert (e.value.status, e.value.code) == (422, "schema_violation")
        with pytest.raises(TelemetryRejectedError, match="403 forbidden"):
            await call(client.send, "batchJobResult", dict(EXAMPLES["batchJobResult"]))
        with pytest.raises(TelemetryRejectedError, match="404 unknown_topic"):
            await call(client.send, "weather", {"t": 1})
        assert await call(client.send, "imageQuality", image_quality(), message_id="fixed")
        with pytest.raises(TelemetryRejectedError, match="409 duplicate_conflict"):
            await call(
                client.send, "imageQuality", image_quality(detector="R9"), message_id="fixed"
            )
        with pytest.raises(UserInputError, match="send null for a failed measurement"):
            await call(client.send, "imageQuality", image_quality(seeing_arcsec=float("nan")))
        await served.device.execute("disable")
        assert not await call(client.send, "imageQuality", image_quality(detector="R8"))
        await served.device.execute("enable")
        assert await call(client.send, "imageQuality", image_quality(detector="R8"))
    with (
        TelemetryClient(served.url, "wrong") as bad,
        pytest.raises(TelemetryRejectedError, match="401"),
    ):
        await call(bad.send, "imageQuality", image_quality())


def test_unreachable_gateway_returns_false(tokens: Tokens) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with TelemetryClient(f"http://127.0.0.1:{port}", tokens.prompt, timeout=1) as client:
        assert client.send("imageQuality", image_quality()) is False


async def test_reading_topics_status_and_audit(served: Served, tokens: Tokens) -> None:
    with TelemetryClient(served.url, tokens.ops) as ops:
        assert [t["name"] for t in await call(ops.topics)] == list(EXAMPLES)
        assert (await call(ops.schema, "imageQuality"))["title"] == "imageQuality"
        assert (await call(ops.status))["state"] == "ENABLED"
        assert await call(ops.audit, producer="prompt") == []
    with (
        TelemetryClient(served.url, tokens.prompt) as prompt,
        pytest.raises(TelemetryRejectedError, match="403"),
    ):
        await call(prompt.status)
    health = await call(httpx.get, served.url + "/health")
    assert health.json()["device"]["state"] == "ENABLED"
