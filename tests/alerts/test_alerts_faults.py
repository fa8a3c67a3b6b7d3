"""Faults: the distribution service killed with SIGKILL mid-visit, while a producer hands over
alerts and a broker consumes them; after a restart nothing is lost and nothing duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldf.alerts.auth import Credentials, Role
from ldf.alerts.client import AlertClient, HttpFeedSource
from ldf.alerts.synthetic import alert_id_for
from ldf.alerts.validation import ValidationEndpoint
from ldf.errors import TransportError
from tests.alerts.conftest import VISIT, packets

ROOT = Path(__file__).resolve().parents[2]


def start_server(db: str, base: Path, creds: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = base / f"url-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.alerts.alert_server_process", db, str(base / "alerts"),
         str(creds), str(port_file)],
        cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("alert server did not start")
        time.sleep(0.05)
    return proc, port_file.read_text()


def ingest_retrying(url_box: list[str], token: str, batch: list[bytes]) -> None:
    """What a producer does: retry a batch until the service acknowledges it."""
    while True:
        try:
            with AlertClient(url_box[0], token, timeout_s=10) as c:
                c.ingest(batch)
            return
        except TransportError:
            time.sleep(0.1)


def test_service_killed_mid_visit_loses_and_duplicates_nothing(
    store_url: str, tmp_path: Path
) -> None:
    creds = Credentials(tmp_path / "creds.yaml")
    producer = creds.add("prompt", Role.PRODUCER)
    broker = creds.add("fink", Role.BROKER)
    proc, url = start_server(store_url, tmp_path, creds.path)
    url_box = [url]
    try:
        with AlertClient(url, broker) as c:
            c.create_feed(name="fink-full", broker="fink", start="earliest")
        endpoint = ValidationEndpoint(HttpFeedSource(url, broker, "fink-full"), tmp_path / "v.db")
        batches = [list(packets(VISIT, 10, start=i)) for i in range(0, 60, 10)]
        for b in batches[:3]:
            ingest_retrying(url_box, producer, b)
        endpoint.poll(wait_s=0.1)  # the broker has part of the visit
        os.kill(proc.pid, signal.SIGKILL)  # mid-visit
        proc.wait()
        proc, url = start_server(store_url, tmp_path, creds.path)
        url_box[0] = url
        # The producer did not know whether its last batch landed: it sends it again.
        for b in batches[2:]:
            ingest_retrying(url_box, producer, b)
        with AlertClient(url, producer) as c:
            c.close_visit(VISIT)
        endpoint.close()
        endpoint = ValidationEndpoint(HttpFeedSource(url, broker, "fink-full"), tmp_path / "v.db")
        deadline = time.monotonic() + 60
        endpoint.run(lambda: VISIT in endpoint.manifests() or time.monotonic() > deadline)
        produced = {VISIT: [alert_id_for(VISIT, i) for i in range(60)]}
        report = endpoint.report(produced)
        endpoint.close()
        assert report["delivered"] == 60
        assert report["duplicates"] == 0
        assert report["missing"] == 0
        assert report["manifests_verified"] == 1
    finally:
        proc.kill()
        proc.wait()
