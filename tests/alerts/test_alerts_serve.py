"""``ldf serve alerts`` as its own process: HTTP API, background work, the NATS publisher."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ldf.alerts.auth import Credentials, Role
from ldf.alerts.client import AlertClient
from ldf.alerts.nats import NatsNames
from tests.alerts.conftest import VISIT, packets
from tests.alerts.test_alerts_transports import delete_streams
from tests.engines import NATS_URL, require_nats


@pytest.mark.nats
def test_serve_alerts_publishes_nats_feeds_with_the_policys_backlog(tmp_path: Path) -> None:
    """A NATS feed of a stalled broker: the publisher stops at ``nats_max_backlog`` and the
    feed's lag (service + JetStream) is the whole visit."""
    require_nats()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "LDF_HOME": str(home),
        "LDF_POLICIES__ALERTS__NATS_URL": NATS_URL,
        "LDF_POLICIES__ALERTS__NATS_MAX_BACKLOG": "7",
        "LDF_POLICIES__ALERTS__LAG_CHECK_S": "0.2",
    }
    from ldf.alerts.daemon import credentials_path
    from ldf.config import load_settings

    creds = Credentials(credentials_path(load_settings(home=home)))
    producer = creds.add("prompt", Role.PRODUCER)
    broker = "b" + secrets.token_hex(4)  # the default prefix: a broker of the test's own
    token = creds.add(broker, Role.BROKER)
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ldf")), "serve", "alerts", "--port", "0"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if m := re.search(r"alert distribution at (http://\S+)", line):
                url = m.group(1)
        assert url, "".join(lines)
        assert any("published to " + NATS_URL in line for line in lines), "".join(lines)
        with AlertClient(url, token) as client:
            client.create_feed(name=f"{broker}-full", broker=broker, transport="nats",
                               lag_alarm_entries=10)  # fmt: skip
        with AlertClient(url, producer) as prod:
            prod.ingest(list(packets(VISIT, 20)))
            prod.close_visit(VISIT)
        status: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with AlertClient(url, token) as client:
                status = client.feed_status(f"{broker}-full")
            if status["lag_entries"] == 21 and status["cursor"] < status["head"]:
                break
            time.sleep(0.2)
        # Paused at the policy's backlog (7, plus at most one window): the rest is in the log.
        assert status["lag_entries"] == 21, status
        assert status["cursor"] < status["head"]
        assert status["lagging"]
        assert httpx.get(f"{url}/alerts/status").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        delete_streams(NatsNames().prefix)
