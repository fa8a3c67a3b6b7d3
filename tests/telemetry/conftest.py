"""Fixtures of the Telemetry Gateway tests: a gateway on each engine, producers, buses.

``FlakyBus`` wraps a real bus (the embedded log, or NATS) and makes publishing fail while
``down`` is set: the OCS side unavailable, as the gateway sees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ldf.config import Settings
from ldf.errors import TransportError
from ldf.ocs.bus import Bus, Subscription
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.models import Message, State
from ldf.telemetry.handlers import create_app
from ldf.telemetry.models import EXAMPLES
from ldf.telemetry.service import TelemetryGateway, producers_path
from ldf.telemetry.tokens import ProducerFile


def image_quality(
    exposure_id: int = 2026112100042, detector: str = "R22_S11", **over: Any
) -> dict[str, Any]:
    """A realistic imageQuality payload."""
    return {**EXAMPLES["imageQuality"], "exposure_id": exposure_id, "detector": detector, **over}


@dataclass
class Tokens:
    """Bearer tokens of the test producers."""

    prompt: str
    """'prompt': device MTPrompt, topics imageQuality and calibrationQA."""
    batch: str
    """'batch': device OCSBatch, topic batchJobResult."""
    ops: str
    """'ops': an operator (no topics)."""


class FlakyBus(Bus):
    """A real bus whose publishing fails while ``down`` (or after ``fail_after`` more sends)."""

    def __init__(self, inner: Bus) -> None:
        super().__init__(command_timeout_s=inner.command_timeout_s)
        self.inner = inner
        self.down = False
        self.fail_after: int | None = None
        self.attempts = 0
        self.failures = 0

    async def _send(self, message: Message) -> None:
        self.attempts += 1
        if self.fail_after is not None:
            if self.fail_after <= 0:
                self.down = True
                self.fail_after = None
            else:
                self.fail_after -= 1
        if self.down:
            self.failures += 1
            raise TransportError("the OCS bus is unreachable (test)")
        await self.inner._send(message)

    async def _open_subscription(self, sub: Subscription) -> None:
        await self.inner._open_subscription(sub)

    async def _close_subscription(self, sub: Subscription) -> None:
        await self.inner._close_subscription(sub)

    async def latest(self, pattern: str) -> list[Message]:
        return await self.inner.latest(pattern)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def databases(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The gateway's database on each engine: SQLite under the home, or scratch PostgreSQL."""
    if request.param == "sqlite":
        yield {}
        return
    from tests.engines import scratch_postgres

    with scratch_postgres() as url:
        yield {"telemetry": url}


def make_settings(home: Path, databases: dict[str, str] | None = None) -> Settings:
    """Settings with short retry delays (tests wait for retries)."""
    return Settings.model_validate(
        {
            "home": str(home),
            "databases": databases or {},
            "policies": {"telemetry": {"retry_base_s": 0.02, "retry_max_s": 0.1}},
        }
    )


@pytest.fixture
def settings(_isolated_home: Path) -> Settings:
    """Settings over the test's home (SQLite)."""
    return make_settings(_isolated_home)


@pytest.fixture
def tokens(settings: Settings) -> Tokens:
    """The producers file with 'prompt', 'batch' and 'ops'."""
    pf = ProducerFile(producers_path(settings))
    return Tokens(
        prompt=pf.add("prompt", device="MTPrompt", topics=["imageQuality", "calibrationQA"]),
        batch=pf.add("batch", device="OCSBatch", topics=["batchJobResult"]),
        ops=pf.add("ops", device=None, topics=[], operator=True),
    )


@pytest.fixture
def gateway(settings: Settings, tokens: Tokens) -> Iterator[TelemetryGateway]:
    """An ENABLED gateway (no device: its state is set directly) on SQLite."""
    gw = TelemetryGateway.open(settings)
    gw.state = State.ENABLED
    yield gw
    gw.close()


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[EmbeddedBus]:
    """The embedded OCS bus (a log file under the test's directory)."""
    b = EmbeddedBus(tmp_path / "bus" / "ocs.sqlite3", command_timeout_s=5.0)
    yield b
    await b.close()


Http = Callable[[str | None], httpx.AsyncClient]
"""Make an in-process HTTP client of the gateway's app with a token."""


@pytest.fixture
async def http(gateway: TelemetryGateway) -> AsyncIterator[Http]:
    """Clients of the gateway's app in this event loop (no server), one per token."""
    app = create_app(gateway)
    made: list[httpx.AsyncClient] = []

    def make(token: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app, client=("10.0.0.7", 5555)),
            base_url="http://gateway/telemetry/v1",
            headers=headers,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def message(mid: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A request body."""
    return {"message_id": mid, "payload": payload}
