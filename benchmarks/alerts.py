"""Benchmark: one peak visit of alerts through alert distribution to six feeds, one stalled.

A producer (this process) hands ``--alerts`` realistic ~80 KB packets (DMTN-102's size; FITS
noise cutouts, so they compress as real ones do) to the alert service over its ingest API in
batches, then closes the visit. The service runs in its own process (SQLite, the embedded
transport: HTTP long-poll with explicit acknowledgement). Six feeds read it: five brokers and
the validation endpoint. One broker's feed is *stalled* (never read). The healthy ones run in
their own processes, each an exactly-once consumer (``DurableConsumer``: every batch and its
position committed to the consumer's SQLite before the acknowledgement):

* ``validation`` (full packets), ``alerce`` (full), ``fink`` (full), ``lasair``
  (no cutouts), ``antares`` (notifications); ``ampel`` (full) is stalled.

Figures: the time from the first packet handed over until the last healthy feed has every
alert (requirement: well inside OTT1, 60 s), ingest time, alerts/s and MB/s per feed, whether
the stalled feed's lag alarm fired. Baseline in the same run: the same framed bytes served by
a bare Starlette app under the same uvicorn (no database, no log, no auth) to the same number
of consumer processes reading and unframing them — the raw transport without ldf — and the
ratio. With ``--telemetry`` the Telemetry Gateway's figures (``benchmarks/telemetry.py``) are
added.

Usage: python benchmarks/alerts.py [--alerts N] [--batch N] [--no-telemetry]
"""

from __future__ import annotations

import argparse
import json
import os
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- roles run as subprocesses ------------------------------------------------------------------


def role_server(home: str, url_file: str) -> None:
    """Serve the alert service from ``home`` until killed."""
    from ldf.alerts.auth import Credentials
    from ldf.alerts.daemon import ServerThread
    from ldf.alerts.service import AlertService
    from ldf.alerts.storage import AlertStore
    from ldf.config.models import AlertsPolicy

    base = Path(home)
    policy = AlertsPolicy(lag_check_s=1.0, archive_delay_s=3600.0)
    service = AlertService(AlertStore.open(f"sqlite:///{base / 'alerts.sqlite3'}"),
                           base / "alerts", policy)  # fmt: skip
    with ServerThread(service, Credentials(base / "creds.yaml")) as server:
        Path(url_file + ".tmp").write_text(server.url)
        Path(url_file + ".tmp").replace(url_file)
        while True:
            time.sleep(1)


def _ready_then_go(out: str) -> None:
    """Say this consumer is ready (imports done), then wait for the start signal."""
    Path(out + ".ready").touch()
    go = Path(out).parent / "go"
    while not go.exists():
        time.sleep(0.005)


def role_consumer(url: str, token: str, feed: str, expected: int, out: str, raw: bool) -> None:
    """Consume a feed until ``expected`` alerts arrived; write figures to ``out``."""
    import httpx

    from ldf.alerts.client import DurableConsumer, HttpFeedSource
    from ldf.alerts.formats import unframe

    _ready_then_go(out)

    count = 0
    nbytes = 0
    first = last = None
    if raw:
        with httpx.Client(base_url=url, timeout=120) as http:
            chunk = 0
            while count < expected:
                body = http.get(f"/chunk/{chunk}").content
                chunk += 1
                for header, data in unframe(body):
                    if header["kind"] == "alert":
                        count += 1
                        nbytes += len(data)
                now = time.time()
                first = first or now
                last = now
    else:
        consumer = DurableConsumer(HttpFeedSource(url, token, feed), Path(out + ".db"))

        def handle(entries: list[Any], db: Any) -> None:
            nonlocal count, nbytes
            rows = []
            for e in entries:
                if e.kind == "alert":
                    count += 1
                    nbytes += len(e.body)
                    rows.append((e.alert_id, e.position))
            db.executemany("INSERT INTO got VALUES (?, ?)", rows)

        consumer.db.execute("CREATE TABLE IF NOT EXISTS got (alert_id INTEGER, position INTEGER)")
        while count < expected:
            if consumer.poll(handle, wait_s=5.0):
                now = time.time()
                first = first or now
                last = now
        consumer.close()
    Path(out).write_text(json.dumps({"count": count, "bytes": nbytes, "first": first,
                                     "last": last}))  # fmt: skip


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


def run(alerts: int, batch: int, producers: int, telemetry: bool) -> dict[str, Any]:
    from ldf.alerts.auth import Credentials, Role
    from ldf.alerts.client import AlertClient
    from ldf.alerts.formats import frame
    from ldf.alerts.models import Delivery
    from ldf.alerts.synthetic import fast_packets

    with tempfile.TemporaryDirectory(prefix="ldf-bench-alerts-") as tmp:
        base = Path(tmp)
        log(f"making {alerts} packets…")
        packets = fast_packets(VISIT, alerts)
        packet_bytes = sum(map(len, packets)) / len(packets)
        creds = Credentials(base / "creds.yaml")
        producer = creds.add("prompt", Role.PRODUCER)
        tokens = {name: creds.add(name, Role.BROKER) for name in [*HEALTHY, *STALLED]}
        server = _spawn("--role", "server", str(base), str(base / "url"))
        procs: list[subprocess.Popen[bytes]] = [server]
        try:
            url = _wait_file(base / "url", server)
            for name, fmt in {**HEALTHY, **STALLED}.items():
                # The stalled feed's alarm: half the visit unread, or 5 s behind.
                with AlertClient(url, tokens[name]) as c:
                    c.create_feed(
                        name=f"{name}-{fmt}",
                        broker=name,
                        format=fmt,
                        lag_alarm_s=5.0,
                        lag_alarm_entries=max(1, alerts // 2),
                    )
            outs = {name: base / f"{name}.json" for name in HEALTHY}
            for name, fmt in HEALTHY.items():
                procs.append(_spawn("--role", "consumer", url, tokens[name], f"{name}-{fmt}",
                                    str(alerts), str(outs[name])))  # fmt: skip
            for name in HEALTHY:
                _wait_file(Path(str(outs[name]) + ".ready"), procs[-1])
            (base / "go").touch()
            time.sleep(0.5)  # consumers long-polling
            log("ingesting…")
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
            for p in procs[1:]:
                p.wait(timeout=600)
            results = {name: json.loads(outs[name].read_text()) for name in HEALTHY}
            time.sleep(1.5)  # one lag check
            with AlertClient(url, tokens["ampel"]) as c:
                stalled = c.feed_status("ampel-full")
        finally:
            for p in procs:
                p.kill()
                p.wait()
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

        # Baseline: the same framed bytes (full feeds' batches) through bare uvicorn.
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
        packets = []
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
            for out in raw_outs:
                _wait_file(Path(str(out) + ".ready"), procs[-1])
            t1 = time.time()
            (raw_dir / "go").touch()
            for p in procs[1:]:
                p.wait(timeout=600)
            raw_s = max(json.loads(o.read_text())["last"] for o in raw_outs) - t1
        finally:
            for p in procs:
                p.kill()
                p.wait()
    result: dict[str, Any] = {
        "benchmark": "alerts",
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
        "baseline": "bare Starlette/uvicorn serving the same framed bytes from memory to "
        f"{len(HEALTHY)} consumer processes (all full packets)",
        "baseline_s": round(raw_s, 2),
        "ratio": round(last_healthy / raw_s, 2),
    }
    if telemetry:
        try:
            sys.path.insert(0, str(Path(__file__).parent))
            import telemetry as telemetry_bench  # type: ignore[import-not-found]

            result["telemetry_gateway"] = telemetry_bench.run()
        except Exception as exc:  # the alert figures stand on their own
            result["telemetry_gateway"] = {"error": str(exc).splitlines()[0]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=40_000, help="Alerts in the visit.")
    parser.add_argument("--batch", type=int, default=500, help="Packets per ingest request.")
    parser.add_argument("--producers", type=int, default=2, help="Concurrent producers.")
    parser.add_argument("--no-telemetry", action="store_true", help="Skip the gateway figures.")
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.role == "server":
        role_server(*rest)
    elif args.role == "consumer":
        role_consumer(rest[0], rest[1], rest[2], int(rest[3]), rest[4], raw=False)
    elif args.role == "raw-server":
        role_raw_server(*rest)
    elif args.role == "raw-consumer":
        role_consumer(rest[0], rest[1], rest[2], int(rest[3]), rest[4], raw=True)
    else:
        if args.alerts < 1 or args.batch < 1:
            parser.error("--alerts and --batch must be at least 1")
        os.environ.setdefault("LDF_HOME", tempfile.mkdtemp(prefix="ldf-bench-home-"))
        print(
            json.dumps(
                run(args.alerts, args.batch, args.producers, not args.no_telemetry), indent=2
            )
        )


if __name__ == "__main__":
    main()
