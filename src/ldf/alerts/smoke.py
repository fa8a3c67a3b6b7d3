"""``ldf alerts smoke``: the end-to-end smoke test, with the validation endpoint (LDM-230 4.3.2.3).

A scratch alert service (its own directory and SQLite) is served over HTTP; a producer hands
over synthetic ~80 KB alerts for a few visits through the ingest API (and one batch twice, to
exercise idempotence) and closes each visit; the validation endpoint consumes a full feed and a
notification feed exactly once and checks what arrived against the archive and the manifests.
It passes when every feed has every alert, no duplicate, and every manifest verifies.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldf.alerts.auth import Credentials, Role
from ldf.alerts.client import AlertClient, HttpFeedSource
from ldf.alerts.daemon import ServerThread
from ldf.alerts.service import AlertService
from ldf.alerts.storage import AlertStore
from ldf.alerts.synthetic import make_packets
from ldf.alerts.validation import ValidationEndpoint

__all__ = ["run_smoke"]

FEEDS = {"validation-full": "full", "validation-lite": "notification"}


def run_smoke(
    *,
    visits: int = 3,
    alerts: int = 200,
    batch: int = 50,
    timeout_s: float = 120.0,
    root: Path | None = None,
    status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the smoke test; returns the report (``passed`` says whether it passed)."""
    with tempfile.TemporaryDirectory(prefix="ldf-alerts-smoke-") as tmp:
        base = root or Path(tmp)
        service = AlertService(
            AlertStore.open(f"sqlite:///{base / 'alerts.sqlite3'}"), base / "alerts"
        )
        creds = Credentials(base / "credentials.yaml")
        producer = creds.add("smoke-producer", Role.PRODUCER)
        broker = creds.add("validation", Role.BROKER)
        try:
            with ServerThread(service, creds, background=False) as server:
                return _run(server.url, producer, broker, base, visits, alerts, batch,
                            timeout_s, status)  # fmt: skip
        finally:
            service.close()


def _run(
    url: str,
    producer_token: str,
    broker_token: str,
    base: Path,
    visits: int,
    alerts: int,
    batch: int,
    timeout_s: float,
    status: Callable[[str], None] | None,
) -> dict[str, Any]:
    say = status or (lambda _msg: None)
    with AlertClient(url, broker_token) as broker:
        for name, fmt in FEEDS.items():
            broker.create_feed(name=name, broker="validation", format=fmt)
    endpoints = {
        name: ValidationEndpoint(HttpFeedSource(url, broker_token, name), base / f"{name}.sqlite3")
        for name in FEEDS
    }
    produced: dict[int, list[int]] = {}
    t0 = time.time()
    say(f"producing {visits} visits × {alerts} alerts")
    with AlertClient(url, producer_token) as prod:
        for v in range(visits):
            visit = 2026_1122_00001 + v
            packets = make_packets(visit, alerts)
            for i in range(0, len(packets), batch):
                prod.ingest(packets[i : i + batch])
            prod.ingest(packets[:batch])  # again: must be duplicates, not new alerts
            prod.close_visit(visit)
            produced[visit] = prod.visit_alert_ids(visit)
    produced_s = time.time() - t0
    say("consuming with the validation endpoint")
    reports: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    for name, endpoint in endpoints.items():

        def done(ep: ValidationEndpoint = endpoint) -> bool:
            return set(ep.manifests()) >= set(produced) or time.monotonic() > deadline

        try:
            endpoint.run(done, wait_s=0.5)
            reports[name] = endpoint.report(produced)
        finally:
            endpoint.close()
    passed = all(
        r["duplicates"] == 0 and r["missing"] == 0 and not r["manifests_unverified"]
        for r in reports.values()
    )
    return {
        "passed": passed,
        "visits": visits,
        "alerts_per_visit": alerts,
        "produce_s": round(produced_s, 2),
        "total_s": round(time.time() - t0, 2),
        "feeds": reports,
    }
