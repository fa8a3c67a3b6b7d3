"""Benchmark: one peak visit of alerts through alert distribution to six feeds, one stalled.

A producer (this process) hands ``--alerts`` realistic ~80 KB packets (DMTN-102's size; FITS
noise cutouts, so they compress as real ones do) to the alert service over its ingest API in
batches, then closes the visit. The service runs in its own process (SQLite). Six feeds read
it: five brokers and the validation endpoint. One broker's feed is *stalled* (never read).
The healthy ones run in their own processes, each an exactly-once consumer
(``DurableConsumer``: every batch and its position committed to the consumer's SQLite before
the acknowledgement):

* ``validation`` (full packets), ``alerce`` (full), ``fink`` (full), ``lasair``
  (no cutouts), ``antares`` (notifications); ``ampel`` (full) is stalled.

Transports (``--transport``):

``http`` (default)
    The embedded transport: HTTP long-poll with explicit acknowledgement
    (``HttpFeedSource``). Baseline: the same framed bytes served by a bare Starlette app under
    the same uvicorn (no database, no log, no auth) to as many consumer processes reading
    them as ``HttpFeedSource`` does (keep-alive ``http.client``, one kept buffer) and
    unframing them. It has no ingest leg: its bytes are in the server's memory at the start.
``nats``
    NATS JetStream (``--nats-url``, 2.9 or later): the feeds are created with transport
    ``nats`` and the service's process runs the publisher as ``ldf serve alerts`` does when
    ``policies.alerts.nats_url`` is set (`ldf.alerts.nats.PublisherThread`: one stream per
    broker, one durable pull consumer per feed); the consumers read through
    ``NatsFeedSource``. Everything lives under a prefix of the run's own, whose streams are
    deleted at the end, failed or not. The stalled feed's JetStream backlog is bounded by the
    publisher's ``max_backlog`` (``--nats-max-backlog``; beyond it the rest waits in the
    service's log and the feed's lag alarm sees it). Baseline: plain nats-py, no ldf code:
    the same packets published once, one message each, into one stream (file storage,
    interest retention) and pulled by as many durable consumers in as many processes
    (explicit acknowledgement), timed from the first publish. Each packet is one message:
    JetStream's ``max_payload`` (1 MB by default) bounds the packet size (~80 KB here).

Figures: the time from the first packet handed over until the last healthy feed has every
alert (requirement: well inside OTT1, 60 s), ingest time, alerts/s and MB/s per feed, whether
the stalled feed's lag alarm fired, the baseline's time and the ratio, and the store floor:
the seconds the same filesystem takes just to append and sync the visit's bytes as ingest
does (durability, which the baseline does not pay). With ``--telemetry``
the Telemetry Gateway's figures (``benchmarks/telemetry.py``) are added.

Usage: python benchmarks/alerts.py [--alerts N] [--batch N] [--producers N] [--no-telemetry]
       [--transport http|nats] [--nats-url URL] [--nats-max-backlog N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

VISIT = 2026112200042
HEALTHY = {
    "validation": "full",
    "alerce": "full",
    "fink": "full",
    "lasair": "nocutouts",
    "antares": "notification",
}
STALLED = {"ampel": "full"}
NATS_URL = "nats://127.0.0.1:4222"
RAW_PULL = 100
"""Messages one raw NATS pull asks for: ~8 MB of full packets, as `NatsFeedSource` pulls them
(well below the 64 MB a server buffers for a client before dropping it as a slow consumer)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- roles run as subprocesses ------------------------------------------------------------------


def role_server(
    home: str, url_file: str, nats_url: str = "", prefix: str = "", max_backlog: str = "0"
) -> None:
    """Serve the alert service from ``home`` until killed; publish its NATS feeds if asked."""
    from ldf.alerts.auth import Credentials
    from ldf.alerts.daemon import ServerThread
    from ldf.alerts.service import AlertService
    from ldf.alerts.storage import AlertStore
    from ldf.config.models import AlertsPolicy
    from ldf.netutil import keep_heap

    keep_heap()  # as `ldf serve alerts` does
    base = Path(home)
    policy = AlertsPolicy(lag_check_s=1.0, archive_delay_s=3600.0, nats_url=nats_url or None)
    service = AlertService(AlertStore.open(f"sqlite:///{base / 'alerts.sqlite3'}"),
                           base / "alerts", policy)  # fmt: skip
    with contextlib.ExitStack() as stack:
        if policy.nats_url:
            from ldf.alerts.nats import NatsNames, NatsPublisher, PublisherThread

            # What `ldf serve alerts` starts when the policy has a nats_url, under this run's
            # prefix and with this run's bound on a feed's JetStream backlog.
            publisher = NatsPublisher(service, policy.nats_url, user=policy.nats_user,
                                      password=policy.nats_password, names=NatsNames(prefix),
                                      max_backlog=int(max_backlog))  # fmt: skip
            stack.enter_context(PublisherThread(publisher))
        server = stack.enter_context(ServerThread(service, Credentials(base / "creds.yaml")))
        Path(url_file + ".tmp").write_text(server.url)
        Path(url_file + ".tmp").replace(url_file)
        while True:
            time.sleep(1)


def _ready_then_go(out: str) -> None:
    """Say this consumer is ready (imports done, connected), then wait for the start signal."""
    Path(out + ".ready").touch()
    go = Path(out).parent / "go"
    while not go.exists():
        time.sleep(0.005)


def _write_figures(
    out: str, count: int, nbytes: int, first: float | None, last: float | None
) -> None:
    Path(out).write_text(json.dumps({"count": count, "bytes": nbytes, "first": first,
                                     "last": last}))  # fmt: skip


def _consume_durable(source: Any, expected: int, out: str) -> None:
    """Read ``source`` with a `DurableConsumer` until ``expected`` alerts came (after go)."""
    from ldf.alerts.client import DurableConsumer

    consumer = DurableConsumer(source, Path(out + ".db"))
    consumer.db.execute("CREATE TABLE IF NOT EXISTS got (alert_id INTEGER, position INTEGER)")
    _ready_then_go(out)
    count = 0
    nbytes = 0
    first = last = None

    def handle(entries: list[Any], db: Any) -> None:
        nonlocal count, nbytes
        rows = []
        for e in entries:
            if e.kind == "alert":
                count += 1
                nbytes += len(e.body)
                rows.append((e.alert_id, e.position))
        db.executemany("INSERT INTO got VALUES (?, ?)", rows)

    while count < expected:
        if consumer.poll(handle, wait_s=5.0):
            now = time.time()
            first = first or now
            last = now
    consumer.close()
    _write_figures(out, count, nbytes, first, last)


def role_consumer(url: str, token: str, feed: str, expected: int, out: str, raw: bool) -> None:
    """Consume a feed over HTTP until ``expected`` alerts arrived; write figures to ``out``."""
    import http.client
    import urllib.parse

    from ldf.alerts.client import HttpFeedSource
    from ldf.alerts.formats import unframe

    if not raw:
        _consume_durable(HttpFeedSource(url, token, feed), expected, out)
        return
    _ready_then_go(out)
    count = 0
    nbytes = 0
    first = last = None
    # The plainest fast client: a keep-alive http.client connection reading each body into
    # one kept buffer (as HttpFeedSource does; httpx would take twice the CPU per batch).
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    buffer = bytearray()
    try:
        chunk = 0
        while count < expected:
            conn.request("GET", f"/chunk/{chunk}")
            response = conn.getresponse()
            length = response.length or 0
            if len(buffer) < length:
                buffer = bytearray(length)
            body = memoryview(buffer)[:length]
            got = 0
            while got < length:
                n = response.readinto(body[got:])
                if not n:
                    raise RuntimeError("bare server closed the connection mid-body")
                got += n
            chunk += 1
            for header, data in unframe(body):
                if header["kind"] == "alert":
                    count += 1
                    nbytes += len(data)
            now = time.time()
            first = first or now
            last = now
    finally:
        conn.close()
    _write_figures(out, count, nbytes, first, last)


def role_nats_consumer(url: str, prefix: str, broker: str, feed: str, expected: int,
                       out: str) -> None:  # fmt: skip
    """Consume a NATS feed (once the publisher has set up its consumer); figures to ``out``."""
    from ldf.alerts.nats import NatsFeedSource, NatsNames
    from ldf.errors import NotFoundError

    deadline = time.monotonic() + 60.0
    while True:
        try:
            source = NatsFeedSource(url, broker, feed, names=NatsNames(prefix))
            break
        except NotFoundError:  # the publisher discovers new feeds every second
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    _consume_durable(source, expected, out)


def role_raw_server(frames_dir: str, url_file: str) -> None:
    """Serve pre-framed chunks from memory with a bare Starlette app under uvicorn."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from ldf.netutil import listen

    chunks = [p.read_bytes() for p in sorted(Path(frames_dir).glob("*.bin"))]

    async def chunk(request: Any) -> Response:
        i = int(request.path_params["i"])
        return Response(
            chunks[i] if i < len(chunks) else b"", media_type="application/octet-stream"
        )

    app = Starlette(routes=[Route("/chunk/{i}", chunk)])
    sock = listen("127.0.0.1", 0)
    Path(url_file + ".tmp").write_text(f"http://127.0.0.1:{sock.getsockname()[1]}")
    Path(url_file + ".tmp").replace(url_file)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])


def role_nats_raw_consumer(url: str, stream: str, durable: str, expected: int, out: str) -> None:
    """Pull ``expected`` messages from a durable consumer with plain nats-py (no ldf code)."""
    import nats
    import nats.errors

    async def main() -> None:
        nc = await nats.connect(url)
        sub = await nc.jetstream().pull_subscribe_bind(durable=durable, stream=stream)
        await asyncio.to_thread(_ready_then_go, out)
        count = 0
        nbytes = 0
        first = last = None
        while count < expected:
            try:
                msgs = await sub.fetch(RAW_PULL, timeout=5.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                count += 1
                nbytes += len(msg.data)
                await msg.ack()
            now = time.time()
            first = first or now
            last = now
        await nc.flush()
        await nc.close()
        _write_figures(out, count, nbytes, first, last)

    asyncio.run(main())


# -- NATS helpers of the main process (plain nats-py) -------------------------------------------


async def _nats_delete_streams(url: str, prefix: str) -> list[str]:
    """Delete every stream of this run's prefix; their names."""
    import nats

    nc = await nats.connect(url)
    deleted = []
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith(prefix.upper() + "_"):
                await js.delete_stream(name)
                deleted.append(name)
    finally:
        await nc.close()
    return deleted


def delete_streams(url: str, prefix: str) -> None:
    """Delete this run's streams, saying so (never raises: it runs in ``finally``)."""
    try:
        deleted = asyncio.run(_nats_delete_streams(url, prefix))
        log(f"deleted JetStream streams {', '.join(deleted) or '(none)'}")
    except Exception as exc:
        log(f"could not delete the JetStream streams of prefix {prefix}: {exc!r}")


async def _nats_consumers_pending(
    url: str, consumers: list[tuple[str, str]], wait_s: float = 0.0
) -> list[int]:
    """Messages each (stream, consumer) holds undelivered or unacknowledged.

    With ``wait_s``, wait up to that long for the consumers to exist.
    """
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + wait_s
        out = []
        for stream, name in consumers:
            while True:
                try:
                    info = await js.consumer_info(stream, name)
                    break
                except NotFoundError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            out.append((info.num_pending or 0) + (info.num_ack_pending or 0))
        return out
    finally:
        await nc.close()


async def _nats_raw_setup(url: str, stream: str, subject: str, consumers: list[str]) -> int:
    """The baseline's stream and durable pull consumers; the server's max_payload."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        # What ldf's publisher sets up per broker, minus its options (dedup window, max age).
        await js.add_stream(StreamConfig(name=stream, subjects=[subject],
                                         retention=RetentionPolicy.INTEREST,
                                         storage=StorageType.FILE))  # fmt: skip
        for name in consumers:
            config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT)
            await js.add_consumer(stream, config)
        return int(nc.max_payload)
    finally:
        await nc.close()


async def _nats_raw_publish(url: str, stream: str, subject: str, packets: list[bytes]) -> float:
    """Publish every packet (JetStream acknowledgements awaited); when the first went."""
    import nats

    nc = await nats.connect(url)
    try:
        # 500 in flight: the window ldf's publisher keeps per feed.
        js = nc.jetstream(publish_async_max_pending=500)
        t0 = time.time()
        futures = [await js.publish_async(subject, p, stream=stream) for p in packets]
        await asyncio.gather(*futures)
        return t0
    finally:
        await nc.close()


# -- the run -----------------------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args])


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: process did not start")
        time.sleep(0.05)
    return path.read_text()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float = 600.0) -> None:
    for p in procs:
        if p.wait(timeout=timeout) != 0:
            raise RuntimeError(f"a consumer process failed (exit status {p.returncode})")


def run(
    alerts: int,
    batch: int,
    producers: int,
    telemetry: bool,
    transport: str = "http",
    nats_url: str = NATS_URL,
    nats_max_backlog: int = 2000,
) -> dict[str, Any]:
    """Run the benchmark; the figures (see the module's docstring)."""
    from ldf.alerts.auth import Credentials, Role
    from ldf.alerts.client import AlertClient
    from ldf.alerts.synthetic import fast_packets

    nats = transport == "nats"
    # The run's own NATS names, so that runs sharing a server do not meet (and are cleaned up).
    prefix = "bench" + secrets.token_hex(4)
    with (
        tempfile.TemporaryDirectory(prefix="ldf-bench-alerts-") as tmp,
        contextlib.ExitStack() as cleanup,
    ):
        if nats:
            cleanup.callback(delete_streams, nats_url, prefix)
        base = Path(tmp)
        log(f"making {alerts} packets…")
        packets = fast_packets(VISIT, alerts)
        packet_bytes = sum(map(len, packets)) / len(packets)
        creds = Credentials(base / "creds.yaml")
        producer = creds.add("prompt", Role.PRODUCER)
        tokens = {name: creds.add(name, Role.BROKER) for name in [*HEALTHY, *STALLED]}
        server_args = ["--role", "server", str(base), str(base / "url")]
        if nats:
            server_args += [nats_url, prefix, str(nats_max_backlog)]
        server = _spawn(*server_args)
        procs: list[subprocess.Popen[bytes]] = [server]
        jetstream_pending = None
        try:
            url = _wait_file(base / "url", server)
            feeds = {name: f"{name}-{fmt}" for name, fmt in {**HEALTHY, **STALLED}.items()}
            for name, fmt in {**HEALTHY, **STALLED}.items():
                # The stalled feed's alarm: half the visit unread, or 5 s behind.
                with AlertClient(url, tokens[name]) as c:
                    c.create_feed(
                        name=feeds[name],
                        broker=name,
                        format=fmt,
                        lag_alarm_s=5.0,
                        lag_alarm_entries=max(1, alerts // 2),
                        transport=transport,
                    )
            outs = {name: base / f"{name}.json" for name in HEALTHY}
            consumers = []
            for name in HEALTHY:
                if nats:
                    args = ["--role", "nats-consumer", nats_url, prefix, name, feeds[name]]
                else:
                    args = ["--role", "consumer", url, tokens[name], feeds[name]]
                consumers.append(_spawn(*args, str(alerts), str(outs[name])))
            procs += consumers
            for name, proc in zip(HEALTHY, consumers, strict=True):
                _wait_file(Path(str(outs[name]) + ".ready"), proc)
            if nats:
                # The stalled feed's pump too must be running before the first alert comes
                # (else its first round could take the whole visit, and its alarm not fire).
                from ldf.alerts.nats import NatsNames

                names = NatsNames(prefix)
                stalled_consumer = [(names.stream(b), feeds[b]) for b in STALLED]
                asyncio.run(_nats_consumers_pending(nats_url, stalled_consumer, wait_s=60.0))
            (base / "go").touch()
            time.sleep(0.5)  # consumers long-polling
            log(f"ingesting ({transport})…")
            t0 = time.time()
            # Prompt Processing's detectors hand over alerts concurrently: so do producers here.
            starts = list(range(0, alerts, batch))

            def produce(k: int) -> None:
                with AlertClient(url, producer, timeout_s=300) as prod:
                    for i in starts[k::producers]:
                        prod.ingest(packets[i : i + batch])

            with ThreadPoolExecutor(producers) as pool:
                list(pool.map(produce, range(producers)))
            with AlertClient(url, producer) as prod:
                prod.close_visit(VISIT)
            ingest_s = time.time() - t0
            log(f"ingested in {ingest_s:.1f} s; waiting for the feeds…")
            _wait_all(consumers)
            results = {name: json.loads(outs[name].read_text()) for name in HEALTHY}
            if nats:
                # A NATS feed's lag in the service is what its pump has not yet put in
                # JetStream: the stalled one's, paused at max_backlog, ages past lag_alarm_s.
                deadline = t0 + ingest_s + 5.0 + 3.0
                while True:
                    with AlertClient(url, tokens["ampel"]) as c:
                        stalled = c.feed_status(feeds["ampel"])
                    if stalled["lagging"] or time.time() > deadline:
                        break
                    time.sleep(0.25)
                (jetstream_pending,) = asyncio.run(
                    _nats_consumers_pending(nats_url, stalled_consumer)
                )
            else:
                time.sleep(1.5)  # one lag check
                with AlertClient(url, tokens["ampel"]) as c:
                    stalled = c.feed_status(feeds["ampel"])
        finally:
            _stop(procs)
        done = {name: r["last"] - t0 for name, r in results.items()}
        per_feed = {
            name: {
                "format": HEALTHY[name],
                "done_s": round(done[name], 2),
                "alerts_per_s": round(alerts / done[name]),
                "MB_per_s": round(r["bytes"] / done[name] / 1e6, 1),
                "received": r["count"],
            }
            for name, r in results.items()
        }
        last_healthy = max(done.values())
        floor_s = _store_floor(base, packets, batch)
        if nats:
            cleanup.close()  # the ldf streams go before the baseline's come
            cleanup.callback(delete_streams, nats_url, prefix)
            raw_s, baseline, extra = _baseline_nats(base, packets, nats_url, prefix)
        else:
            raw_s, baseline, extra = _baseline_http(base, packets)
    result: dict[str, Any] = {
        "benchmark": "alerts",
        "transport": transport,
        "alerts": alerts,
        "packet_bytes": round(packet_bytes),
        "feeds": len(HEALTHY) + len(STALLED),
        "stalled_feeds": list(STALLED),
        "time_to_last_healthy_feed_s": round(last_healthy, 2),
        "requirement_s": 60.0,
        "producers": producers,
        "ingest_s": round(ingest_s, 2),
        "ingest_alerts_per_s": round(alerts / ingest_s),
        "per_feed": per_feed,
        "stalled_feed": {
            "lag_entries": stalled["lag_entries"],
            "lagging": stalled["lagging"],
        },
        "baseline": baseline,
        "baseline_s": round(raw_s, 2),
        "ratio": round(last_healthy / raw_s, 2),
        "store_floor": {
            "what": "the visit's packets appended to a new file on the service's filesystem, "
            f"{batch} per writev + fdatasync as ingest does, alone (no HTTP, no index): what "
            "durability alone costs the service here; the baseline stores nothing",
            "seconds": round(floor_s, 2),
            "MB_per_s": round(alerts * packet_bytes / floor_s / 1e6),
        },
    }
    if nats:
        # The stalled feed's entries not in the service's lag wait in JetStream.
        result["stalled_feed"]["jetstream_pending"] = jetstream_pending
        result["nats"] = {"url": nats_url, "prefix": prefix, "max_backlog": nats_max_backlog,
                          **extra}  # fmt: skip
    if telemetry:
        try:
            sys.path.insert(0, str(Path(__file__).parent))
            import telemetry as telemetry_bench  # type: ignore[import-not-found]

            result["telemetry_gateway"] = telemetry_bench.run()
        except Exception as exc:  # the alert figures stand on their own
            result["telemetry_gateway"] = {"error": str(exc).splitlines()[0]}
    return result


def _store_floor(base: Path, packets: list[bytes], batch: int) -> float:
    """Seconds to append the packets to a new file, ``batch`` per writev + fdatasync."""
    from ldf.alerts.segments import _write_all  # the service's own writev loop

    path = base / "store-floor.seg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        t = time.perf_counter()
        for i in range(0, len(packets), batch):
            _write_all(fd, packets[i : i + batch])
            os.fdatasync(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)
        path.unlink()


def _baseline_http(base: Path, packets: list[bytes]) -> tuple[float, str, dict[str, Any]]:
    """The same framed bytes (full feeds' batches) through bare uvicorn: seconds, what."""
    from ldf.alerts.formats import frame
    from ldf.alerts.models import Delivery

    alerts = len(packets)
    log("baseline: the same bytes through a bare Starlette app…")
    frames = base / "frames"
    frames.mkdir()
    step = 400  # ~32 MB, the service's default batch size in bytes
    for k, i in enumerate(range(0, alerts, step)):
        batch_d = [
            Delivery(
                position=j + 1,
                kind="alert",
                visit=VISIT,
                body=packets[j],
                alert_id=j,
                schema_id=1101,
            )
            for j in range(i, min(i + step, alerts))
        ]
        (frames / f"{k:06d}.bin").write_bytes(frame(batch_d))
    packets.clear()
    raw_server = _spawn("--role", "raw-server", str(frames), str(base / "raw-url"))
    procs = [raw_server]
    try:
        raw_url = _wait_file(base / "raw-url", raw_server)
        raw_dir = base / "raw"
        raw_dir.mkdir()
        raw_outs = [raw_dir / f"raw{k}.json" for k in range(len(HEALTHY))]
        for out in raw_outs:
            procs.append(_spawn("--role", "raw-consumer", raw_url, "-", "-", str(alerts),
                                str(out)))  # fmt: skip
        for out, proc in zip(raw_outs, procs[1:], strict=True):
            _wait_file(Path(str(out) + ".ready"), proc)
        t1 = time.time()
        (raw_dir / "go").touch()
        _wait_all(procs[1:])
        raw_s = max(json.loads(o.read_text())["last"] for o in raw_outs) - t1
    finally:
        _stop(procs)
    what = ("bare Starlette/uvicorn serving the same framed bytes from memory to "
            f"{len(HEALTHY)} consumer processes (all full packets)")  # fmt: skip
    return raw_s, what, {}


def _baseline_nats(
    base: Path, packets: list[bytes], url: str, prefix: str
) -> tuple[float, str, dict[str, Any]]:
    """The same packets through plain JetStream to as many plain pull consumers."""
    alerts = len(packets)
    log("baseline: the same packets through plain JetStream…")
    stream, subject = f"{prefix.upper()}_RAW", f"{prefix}.raw.packets"
    durables = [f"raw{k}" for k in range(len(HEALTHY))]
    max_payload = asyncio.run(_nats_raw_setup(url, stream, subject, durables))
    if max(map(len, packets)) > max_payload:
        raise RuntimeError(f"packets exceed the NATS server's max_payload ({max_payload} B)")
    raw_dir = base / "raw"
    raw_dir.mkdir()
    raw_outs = [raw_dir / f"{d}.json" for d in durables]
    procs = [
        _spawn("--role", "nats-raw-consumer", url, stream, d, str(alerts), str(out))
        for d, out in zip(durables, raw_outs, strict=True)
    ]
    try:
        for out, proc in zip(raw_outs, procs, strict=True):
            _wait_file(Path(str(out) + ".ready"), proc)
        (raw_dir / "go").touch()
        time.sleep(0.5)  # consumers pulling
        t1 = asyncio.run(_nats_raw_publish(url, stream, subject, packets))
        _wait_all(procs)
        raw_s = max(json.loads(o.read_text())["last"] for o in raw_outs) - t1
    finally:
        _stop(procs)
    what = ("plain nats-py: the same packets published once (one message each, acknowledged by "
            "JetStream, 500 in flight) into one stream (file storage, interest retention) and "
            f"pulled by {len(HEALTHY)} durable consumers in as many processes (explicit "
            "acknowledgement, all full packets), from the first publish")  # fmt: skip
    return raw_s, what, {"max_payload": max_payload}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=40_000, help="Alerts in the visit.")
    parser.add_argument("--batch", type=int, default=500, help="Packets per ingest request.")
    parser.add_argument("--producers", type=int, default=2, help="Concurrent producers.")
    parser.add_argument("--no-telemetry", action="store_true", help="Skip the gateway figures.")
    parser.add_argument("--transport", choices=["http", "nats"], default="http",
                        help="How the feeds are delivered.")  # fmt: skip
    parser.add_argument("--nats-url", default=NATS_URL, help="NATS JetStream server (nats).")
    parser.add_argument(
        "--nats-max-backlog", type=int, default=2000,
        help="Messages of one feed held in JetStream before its pump pauses (the publisher's "
        "max_backlog; its own default, 100,000, would let the stalled feed store the whole "
        "visit in JetStream).",
    )  # fmt: skip
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.role == "server":
        role_server(*rest)
    elif args.role == "consumer":
        role_consumer(rest[0], rest[1], rest[2], int(rest[3]), rest[4], raw=False)
    elif args.role == "nats-consumer":
        role_nats_consumer(rest[0], rest[1], rest[2], rest[3], int(rest[4]), rest[5])
    elif args.role == "raw-server":
        role_raw_server(*rest)
    elif args.role == "raw-consumer":
        role_consumer(rest[0], rest[1], rest[2], int(rest[3]), rest[4], raw=True)
    elif args.role == "nats-raw-consumer":
        role_nats_raw_consumer(rest[0], rest[1], rest[2], int(rest[3]), rest[4])
    else:
        if args.alerts < 1 or args.batch < 1 or args.nats_max_backlog < 1:
            parser.error("--alerts, --batch and --nats-max-backlog must be at least 1")
        from ldf.hoststat import CpuSample, steal_fraction

        os.environ.setdefault("LDF_HOME", tempfile.mkdtemp(prefix="ldf-bench-home-"))
        before = CpuSample.now()
        result = run(args.alerts, args.batch, args.producers, not args.no_telemetry,
                     args.transport, args.nats_url, args.nats_max_backlog)  # fmt: skip
        result["cpu_steal_fraction"] = steal_fraction(before, CpuSample.now())
        result["cpu_steal_meaning"] = (
            "share of the run's CPU demand the virtual machine's host took (/proc/stat "
            "steal): figures measured above ~0.1 are slower than the code"
        )
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
