"""The gateway as its own process: kill -9 in the middle of a drain, ``ldf serve telemetry``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ldf.config import Settings
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.ocs.models import Message, State
from ldf.telemetry.client import TelemetryClient
from ldf.telemetry.service import TelemetryGateway
from tests.telemetry.conftest import Tokens, image_quality

# The real serving code (`ldf serve telemetry` runs `ldf.telemetry.daemon.run`), with an OCS
# side slow enough (4 ms a message) that the kill lands in the middle of the drain.
_SCRIPT = """
import asyncio
from ldf.config import load_settings
from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.telemetry.daemon import run

_send = EmbeddedBus._send

async def slow_send(self, message):
    await asyncio.sleep(0.004)
    await _send(self, message)

EmbeddedBus._send = slow_send
asyncio.run(run(load_settings(), host="127.0.0.1", port=0,
                on_start=lambda s: print(s.url, flush=True)))
"""

N = 300
"""Messages per producer buffered before the gateway process starts."""


def start(home: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT],
        env={**os.environ, "LDF_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("http://"), (line, proc.stderr.read() if proc.stderr else "")
    return proc


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.asynccontextmanager
async def recording(bus: EmbeddedBus, out: list[Message]) -> AsyncIterator[None]:
    async with bus.subscribe("ocs.*.tel.*") as sub:

        async def record() -> None:
            async for m in sub:
                out.append(m)

        task = asyncio.create_task(record())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(check: Callable[[], bool], within: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def fill(gateway: TelemetryGateway) -> None:
    """Buffer ``N`` imageQuality messages of 'prompt' and ``N`` batchJobResults of 'batch'."""
    gateway.state = State.ENABLED
    prompt = gateway.producers.get("prompt")
    batch = gateway.producers.get("batch")
    for start_at in range(0, N, 100):
        iq = [
            (f"iq-{i:04d}", image_quality(detector=f"R{i:04d}"))
            for i in range(start_at, start_at + 100)
        ]
        jobs = [
            (f"job-{i:04d}", {"job_id": f"j{i}", "name": "isr", "status": "running"})
            for i in range(start_at, start_at + 100)
        ]
        for producer, topic, items in (
            (prompt, "imageQuality", iq),
            (batch, "batchJobResult", jobs),
        ):
            body = {"messages": [{"message_id": m, "payload": p} for m, p in items]}
            gateway.accept(producer, topic, gateway.parse(topic, json.dumps(body), batch=True))
    gateway.state = State.STANDBY


async def test_kill_9_in_the_middle_of_a_drain_loses_nothing(
    settings: Settings, tokens: Tokens
) -> None:
    with TelemetryGateway.open(settings) as gateway:
        fill(gateway)
        assert gateway.status().backlog == 2 * N
        seen: list[Message] = []
        bus = EmbeddedBus(settings.home / "bus" / "ocs.sqlite3")
        try:
            async with recording(bus, seen):
                first = start(settings.home)
                try:
                    # Kill once some messages are marked injected and more are on the bus
                    # but not yet marked: in flight, as a crash would leave them.
                    def in_flight() -> bool:
                        marked = sum(p.injected for p in gateway.status().producers)
                        return marked > 0 and len(seen) > marked + 20

                    await until(in_flight)
                    first.kill()
                    first.wait(timeout=30)
                finally:
                    stop(first, signal.SIGKILL)
                at_kill = gateway.status()
                assert 0 < sum(p.injected for p in at_kill.producers) < 2 * N
                assert at_kill.backlog > 0

                second = start(settings.home)
                try:
                    await until(lambda: gateway.status().backlog == 0)
                    await until(lambda: {m.id for m in seen} >= set(expected_ids()))
                finally:
                    assert stop(second) == 0  # SIGTERM: a clean stop
        finally:
            await bus.close()
        # Nothing lost: every message reached the bus; in each producer's order (counting
        # each message's first appearance); repeats only of what was in flight at the kill.
        assert {m.id for m in seen} == set(expected_ids())
        repeated = 0
        for producer, prefix in (("prompt", "iq"), ("batch", "job")):
            ids = [m.id for m in seen if m.id.startswith(producer + "/")]
            firsts = list(dict.fromkeys(ids))
            assert firsts == [f"{producer}/{prefix}-{i:04d}" for i in range(N)]
            repeats = len(ids) - len(firsts)
            injected_at_kill = next(p.injected for p in at_kill.producers if p.producer == producer)
            assert repeats <= N - injected_at_kill
            repeated += repeats
        assert repeated > 0  # at least once: what was in flight at the kill went out again
        st = gateway.status()
        assert (st.backlog, sum(p.injected for p in st.producers)) == (0, 2 * N)


def expected_ids() -> list[str]:
    return [f"prompt/iq-{i:04d}" for i in range(N)] + [f"batch/job-{i:04d}" for i in range(N)]


async def test_ldf_serve_telemetry(tmp_path: Path, settings: Settings, tokens: Tokens) -> None:
    proc = subprocess.Popen(  # noqa: ASYNC220 - a server process for the whole test
        [str(Path(sys.executable).with_name("ldf")), "serve", "telemetry", "--port", "0"],
        env={**os.environ, "LDF_HOME": str(settings.home), "COLUMNS": "200"},
        stderr=subprocess.PIPE,
        text=True,
    )
    bus = EmbeddedBus(settings.home / "bus" / "ocs.sqlite3")
    try:
        assert proc.stderr is not None
        line = await asyncio.to_thread(proc.stderr.readline)
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, line
        assert "TelemetryGateway" in line
        assert "ENABLED" in line
        url = found.group(0)
        async with bus.subscribe("ocs.MTPrompt.tel.imageQuality") as sub:
            with TelemetryClient(url, tokens.prompt) as client:
                assert await asyncio.to_thread(client.send, "imageQuality", image_quality())
                got = await sub.get(timeout=10)
                assert got.payload == image_quality()
                await bus.command("TelemetryGateway", "disable", timeout=10)
                assert not await asyncio.to_thread(
                    client.send, "imageQuality", image_quality(detector="R1")
                )
                await bus.command("TelemetryGateway", "enable", timeout=10)
                assert await asyncio.to_thread(
                    client.send, "imageQuality", image_quality(detector="R1")
                )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        await bus.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
