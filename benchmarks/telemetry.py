"""Benchmark: Telemetry Gateway messages/s and p99 latency from POST to the OCS bus.

The gateway (``ldf.telemetry``: HTTP API under uvicorn, its OCS device ENABLED, the injector)
runs in this process's event loop on the embedded OCS bus (``--nats URL``: NATS JetStream)
with its buffer in SQLite (the embedded default: WAL, every message committed before its
201). A subscriber on the same bus records when each message arrives. A separate client
process runs ``--producers`` concurrent producers over HTTP (httpx, one keep-alive connection
each), each sending ``--messages / --producers`` realistic ``imageQuality`` payloads (the keys
Prompt Processing sends) one at a time, in order, waiting for each 201 — the way a producer
that needs the gateway's ordering sends. With ``--batch N`` they send batches of N instead.

Figures:

* ``messages_per_s``: messages accepted (durably stored, 201) per second over HTTP;
* ``end_to_end_messages_per_s``: from the first POST until the last message is on the bus;
* ``latency_to_bus_ms``: p50/p99/max from the start of a message's POST until the
  subscriber sees it on the bus (``time.monotonic``, one clock for both processes);
* ``http_latency_ms``: p50/p99 of POST → 201;
* checks: every message on the bus once, in each producer's order.

Baselines in the same run: the same payloads published straight to the same kind of bus
(``Bus.publish_telemetry`` in a loop, no HTTP, no validation, no database) until the
subscriber has them all (``ratio.gateway_vs_direct_bus``: end-to-end messages/s over
direct-bus messages/s); and the HTTP floor, the same client process against a bare Starlette
route under the same uvicorn (``ratio.gateway_vs_http_floor``). CPU milliseconds per message
of the gateway's process and of the client are reported too: on a shared machine they move
less than the rates do.

Requirement it answers: LDM-230 2.7 — producers outside the control enclave (Prompt
Processing's QA: up to 189 detectors per visit every ~36 s; calibration QA; OCS-driven batch
results) inject telemetry into the OCS with the gateway's checks and durability, fast
enough that it never lags the observatory. Loopback only. Progress goes to stderr; the result
is one JSON object on stdout. ``run(...)`` returns the same object for other benchmarks.

Usage: python benchmarks/telemetry.py [--messages N] [--producers P] [--batch N] [--nats URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the client process starts faster without them
    from ldf.config import Settings
    from ldf.ocs.bus import Bus
    from ldf.ocs.models import Message

DETECTORS = [f"R{r}{c}_S{s}{t}" for r in "01234" for c in "01234" for s in "012" for t in "012"]


def log(message: str) -> None:
    print(f"[telemetry bench] {message}", file=sys.stderr, flush=True)


def payload(producer: int, i: int) -> dict[str, Any]:
    """A realistic imageQuality payload (one detector of one visit)."""
    from ldf.telemetry.models import EXAMPLES

    base = dict(EXAMPLES["imageQuality"])
    visit, det = divmod(i, len(DETECTORS))
    base.update(
        exposure_id=2026112100000 + producer * 10000 + visit,
        detector=DETECTORS[det],
        seeing_arcsec=0.6 + (i % 50) / 100,
        n_sources=300 + i % 200,
    )
    return base


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


# -- the client process --------------------------------------------------------------------------


async def _client(
    url: str, tokens: list[str], per_producer: int, batch: int, prefix: str
) -> dict[str, Any]:
    import httpx

    sent: dict[str, float] = {}
    http_ms: list[float] = []

    async def produce(k: int, token: str) -> None:
        async with httpx.AsyncClient(
            base_url=f"{url}/telemetry/v1/topics/imageQuality",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ) as client:
            for start in range(0, per_producer, batch):
                numbers = range(start, min(start + batch, per_producer))
                ids = [f"{prefix}iq-{i:06d}" for i in numbers]
                bodies = [
                    {"message_id": m, "payload": payload(k, i)}
                    for m, i in zip(ids, numbers, strict=True)
                ]
                t0 = time.monotonic()
                if batch == 1:
                    r = await client.post("/messages", json=bodies[0])
                else:
                    r = await client.post("/batches", json={"messages": bodies})
                t1 = time.monotonic()
                if r.status_code != 201:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
                http_ms.append((t1 - t0) * 1000)
                for m in ids:
                    sent[f"p{k}/{m}"] = t0

    t_start, cpu_start = time.monotonic(), time.process_time()
    await asyncio.gather(*(produce(k, tok) for k, tok in enumerate(tokens)))
    return {
        "sent": sent,
        "http_ms": http_ms,
        "start": t_start,
        "end": time.monotonic(),
        "cpu_s": time.process_time() - cpu_start,
    }


def client_main(argv: list[str]) -> None:
    """``--client URL PER_PRODUCER BATCH PREFIX TOKEN...``: send, print send times as JSON."""
    url, per, batch, prefix, *tokens = argv
    prefix = "" if prefix == "-" else prefix
    print(json.dumps(asyncio.run(_client(url, tokens, int(per), int(batch), prefix))))


# -- the gateway side ----------------------------------------------------------------------------


class Recorder:
    """Arrival time of every telemetry message on the bus, by bus message id."""

    def __init__(self, bus: Bus, expected: int) -> None:
        self.bus = bus
        self.expected = expected
        self.seen: dict[str, float] = {}
        self.order: list[str] = []
        self.duplicates = 0
        self.done = asyncio.Event()
        self._sub = bus.subscribe("ocs.*.tel.*")
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        await self._sub.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for message in self._sub:
            self._record(message)

    def _record(self, message: Message) -> None:
        if "/warm-" in message.id:
            return
        if message.id in self.seen:
            self.duplicates += 1
            return
        self.seen[message.id] = time.monotonic()
        self.order.append(message.id)
        if len(self.seen) >= self.expected:
            self.done.set()

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _open_bus(settings: Settings, nats: str | None) -> Bus:
    from ldf.ocs.bus import open_bus

    if nats is None:
        return await open_bus(settings.bus, settings.home)
    from ldf.ocs.bus_nats import NatsBus

    return await NatsBus.connect(nats, stream_prefix=settings.bus.stream_prefix)


async def _cleanup_nats(bus: Bus) -> None:
    from ldf.ocs.bus_nats import NatsBus

    if isinstance(bus, NatsBus):
        with contextlib.suppress(Exception):
            await bus.js.delete_stream(bus.stream)


async def _bare_http(n: int, producers: int, batch: int) -> dict[str, float]:
    """The same client against a bare Starlette route under the same uvicorn: the HTTP floor."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ldf.netutil import listen

    async def post(request: Request) -> JSONResponse:
        body = json.loads(await request.body())  # parsed, as any endpoint must
        return JSONResponse({"accepted": len(body.get("messages", [body]))}, status_code=201)

    app = Starlette(
        routes=[Route("/telemetry/v1/topics/imageQuality/{kind}", post, methods=["POST"])]
    )

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event)
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        per = n // producers
        cpu0 = time.process_time()
        result = await _client_process(url, ["-"] * producers, per, batch, "")
        cpu = time.process_time() - cpu0
    finally:
        server.should_exit = True
        await task
        sock.close()
    sent = len(result["sent"])
    return {
        "messages_per_s": round(sent / (result["end"] - result["start"]), 1),
        "http_latency_p50_ms": round(percentile(result["http_ms"], 50), 2),
        "server_cpu_ms_per_message": round(cpu * 1000 / sent, 3),
    }


async def _direct(settings: Settings, nats: str | None, n: int, producers: int) -> float:
    """Messages/s of the same payloads published straight to the bus (no gateway)."""
    bus = await _open_bus(settings, nats)
    try:
        per = n // producers
        async with Recorder(bus, per * producers) as rec:
            t0 = time.monotonic()

            async def produce(k: int) -> None:
                for i in range(per):
                    await bus.publish_telemetry(f"Direct{k}", "imageQuality", payload(k, i))

            await asyncio.gather(*(produce(k) for k in range(producers)))
            await asyncio.wait_for(rec.done.wait(), 120)
            return per * producers / (time.monotonic() - t0)
    finally:
        await _cleanup_nats(bus)
        await bus.close()


async def _gateway_run(
    settings: Settings, nats: str | None, n: int, producers: int, batch: int
) -> dict[str, Any]:
    from ldf.telemetry.daemon import serve_gateway
    from ldf.telemetry.service import TelemetryGateway, producers_path
    from ldf.telemetry.tokens import ProducerFile

    pf = ProducerFile(producers_path(settings))
    tokens = [
        pf.add(f"p{k}", device=f"BenchProducer{k}", topics=["imageQuality"])
        for k in range(producers)
    ]
    per = n // producers
    bus = await _open_bus(settings, nats)
    try:
        with TelemetryGateway.open(settings) as gateway:
            async with serve_gateway(gateway, bus, status_interval_s=3600) as served:
                # Warm-up: one message per producer through the whole path (not timed).
                await _client_process(served.url, tokens, 1, 1, "warm-")
                while gateway.status().backlog:  # noqa: ASYNC110 (the database is the state)
                    await asyncio.sleep(0.01)
                async with Recorder(bus, per * producers) as rec:
                    log(f"{per * producers} messages from {producers} producers, batch {batch}")
                    cpu0 = time.process_time()
                    result = await _client_process(served.url, tokens, per, batch, "")
                    await asyncio.wait_for(rec.done.wait(), 300)
                    server_cpu_s = time.process_time() - cpu0
                    last_seen = max(rec.seen.values())
                    status = gateway.status()
    finally:
        await _cleanup_nats(bus)
        await bus.close()
    sent: dict[str, float] = result["sent"]
    latencies = [(rec.seen[k] - t) * 1000 for k, t in sent.items() if k in rec.seen]
    lost = len(sent) - len(latencies)
    out_of_order = 0
    for k in range(producers):
        mine = [m for m in rec.order if m.startswith(f"p{k}/")]
        out_of_order += sum(1 for a, b in itertools.pairwise(mine) if a > b)
    elapsed = result["end"] - result["start"]
    return {
        "messages": len(sent),
        "messages_per_s": round(len(sent) / elapsed, 1),
        "end_to_end_messages_per_s": round(len(sent) / (last_seen - result["start"]), 1),
        "latency_to_bus_ms": {
            "p50": round(percentile(latencies, 50), 2),
            "p99": round(percentile(latencies, 99), 2),
            "max": round(max(latencies), 2),
            "mean": round(statistics.fmean(latencies), 2),
        },
        "http_latency_ms": {
            "p50": round(percentile(result["http_ms"], 50), 2),
            "p99": round(percentile(result["http_ms"], 99), 2),
        },
        "cpu_ms_per_message": {
            "gateway": round(server_cpu_s * 1000 / len(sent), 3),
            "client": round(result["cpu_s"] * 1000 / len(sent), 3),
        },
        "lost": lost,
        "duplicates_on_bus": rec.duplicates,
        "out_of_order": out_of_order,
        "backlog_after": status.backlog,
    }


async def _client_process(
    url: str, tokens: list[str], per: int, batch: int, prefix: str
) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", url, str(per), str(batch), prefix or "-", *tokens,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"client failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def run(
    messages: int = 2000, producers: int = 4, batch: int = 1, nats: str | None = None
) -> dict[str, Any]:
    """Run the benchmark; returns the result object (see the module docstring)."""
    if messages < producers or producers < 1 or batch < 1:
        raise ValueError("need messages >= producers >= 1 and batch >= 1")
    from ldf.config import Settings

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ldf-bench-telemetry-"))
    try:
        settings = Settings.model_validate(
            {
                "home": str(tmp / "home"),
                "bus": {"stream_prefix": f"B{uuid.uuid4().hex[:10]}"},
                "policies": {"telemetry": {"max_batch_messages": max(500, batch)}},
            }
        )
        gw = asyncio.run(_gateway_run(settings, nats, messages, producers, batch))
        log("the same payloads straight to the bus")
        direct_settings = settings.model_copy(
            update={"home": tmp / "direct", "bus": settings.bus.model_copy(
                update={"stream_prefix": f"D{uuid.uuid4().hex[:10]}"})}
        )  # fmt: skip
        direct = asyncio.run(_direct(direct_settings, nats, messages, producers))
        log("the same client against a bare Starlette route")
        bare = asyncio.run(_bare_http(messages, producers, batch))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "benchmark": "telemetry",
        "requirement": "inject producers' telemetry into the OCS bus with validation, "
        "deduplication, durable buffering and per-producer order, without lagging the "
        "observatory (Telemetry Gateway, LDM-230 2.7)",
        "bus": "nats" if nats else "embedded",
        "database": "sqlite",
        "producers": producers,
        "batch": batch,
        **gw,
        "baseline": {
            "direct_bus_messages_per_s": round(direct, 1),
            "what": "the same payloads published with Bus.publish_telemetry in this process, "
            f"{producers} concurrent publishers, until the subscriber has them all",
        },
        "http_floor": {
            **bare,
            "what": "the same client process against a bare Starlette route under the same "
            "uvicorn (parses the JSON, answers 201; no auth, validation, database or bus)",
        },
        "ratio": {
            "gateway_vs_direct_bus": round(gw["end_to_end_messages_per_s"] / direct, 3),
            "gateway_vs_http_floor": round(gw["messages_per_s"] / bare["messages_per_s"], 3),
        },
        "client": f"separate process, {producers} httpx keep-alive connections, each waits "
        "for its 201 before the next message",
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "python": sys.version.split()[0],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="Messages in all.")
    parser.add_argument("--producers", type=int, default=4, help="Concurrent producers.")
    parser.add_argument("--batch", type=int, default=1, help="Messages per request.")
    parser.add_argument("--nats", default=None, help="NATS URL (default: the embedded bus).")
    args = parser.parse_args()
    if args.producers < 1:
        parser.error("--producers must be >= 1")
    if args.messages < args.producers:
        parser.error("--messages must be >= --producers")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    print(json.dumps(run(args.messages, args.producers, args.batch, args.nats), indent=2))


if __name__ == "__main__":
    main()
