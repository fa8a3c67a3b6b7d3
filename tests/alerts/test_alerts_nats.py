"""Alert feeds on NATS JetStream: headers, de-duplication, bounded backlog, gaps, credentials,
a publisher killed with SIGKILL mid-pump, and the NATS server killed and restarted.

Most tests use the server at 127.0.0.1:4222 under a prefix of their own; the credential and
restart tests start a throwaway ``nats-server`` of their own on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from ldf.alerts.client import DurableConsumer, Entry
from ldf.alerts.models import Delivery, FeedSpec
from ldf.alerts.nats import (
    NatsFeedSource,
    NatsNames,
    NatsPublisher,
    PublisherThread,
    decode_header,
    encode_header,
    nats_authorization,
    new_password,
)
from ldf.alerts.service import AlertService
from ldf.alerts.storage import AlertStore
from ldf.alerts.synthetic import alert_id_for
from ldf.errors import NotFoundError, TransportError, UserInputError
from tests.alerts.conftest import VISIT, packets
from tests.alerts.test_alerts_transports import consume, delete_streams, manifests
from tests.engines import NATS_URL, require_nats

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def test_headers_round_trip() -> None:
    d = Delivery(position=42, kind="alert", visit=VISIT, body=b"x", alert_id=7, schema_id=1101,
                 replay=True)  # fmt: skip
    headers = encode_header(d, prev=40)
    assert headers["Ldf-Position"] == "42"
    assert headers["Ldf-Alert-Id"] == "7"
    assert headers["Ldf-Replay"] == "true"
    assert decode_header(headers) == (d.header(), 40)
    manifest = Delivery(position=43, kind="manifest", visit=VISIT, body=b"{}", format="manifest")
    assert decode_header(encode_header(manifest, 42)) == (manifest.header(), 42)
    with pytest.raises(UserInputError, match="Ldf-Position"):
        decode_header({"Nats-Msg-Id": "x"})
    with pytest.raises(UserInputError, match="malformed"):
        decode_header({"Ldf-Position": "forty"})


def test_names_and_bad_input() -> None:
    names = NatsNames("ldf")
    assert names.stream("fink") == "LDF_ALERTS_fink"
    assert names.subject("fink", "fink-full") == "ldf.alerts.fink.fink-full"
    with pytest.raises(UserInputError, match="NATS prefix"):
        NatsNames("a.b")
    good = new_password()
    with pytest.raises(UserInputError, match="password of 'fink'"):
        nats_authorization({"fink": "short"}, publisher=("pub", good))
    with pytest.raises(UserInputError, match="NATS user"):
        nats_authorization({"bad name": good}, publisher=("pub", good))
    with pytest.raises(UserInputError, match="also a broker"):
        nats_authorization({"pub": good}, publisher=("pub", good))


@pytest.fixture
def sqlite_service(tmp_path: Path) -> Iterator[AlertService]:
    """An alert service on SQLite."""
    svc = AlertService(AlertStore.open(f"sqlite:///{tmp_path / 's.sqlite3'}"), tmp_path / "alerts")
    yield svc
    svc.close()


@pytest.fixture
def names() -> Iterator[NatsNames]:
    """A prefix of the test's own on the shared server (its streams deleted afterwards)."""
    require_nats()
    n = NatsNames("t" + secrets.token_hex(5))
    yield n
    delete_streams(n.prefix)


async def stream_state(url: str, stream: str) -> Any:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state
    finally:
        await nc.close()


@pytest.mark.nats
def test_republish_is_deduplicated(sqlite_service: AlertService, names: NatsNames) -> None:
    sqlite_service.create_feed(FeedSpec(name="fink-full", broker="fink", transport="nats"))
    sqlite_service.ingest(packets(VISIT, 6))
    publisher = NatsPublisher(sqlite_service, NATS_URL, names=names)
    stream, subject = names.stream("fink"), names.subject("fink", "fink-full")

    async def run() -> None:
        try:
            await publisher.ensure_feed("fink-full")
            entries = sqlite_service.fetch("fink-full", after=0)
            await publisher.publish(stream, subject, "fink-full", entries[:4], prev=0)
            # A publisher that crashed before moving the cursor sends them all again.
            await publisher.publish(stream, subject, "fink-full", entries, prev=0)
        finally:
            await publisher.close()

    asyncio.run(run())
    assert (publisher.stats.published, publisher.stats.duplicates) == (6, 4)
    assert asyncio.run(stream_state(NATS_URL, stream)).messages == 6


@pytest.mark.nats
def test_feed_setup_errors(sqlite_service: AlertService, names: NatsNames) -> None:
    sqlite_service.create_feed(FeedSpec(name="fink-http", broker="fink"))
    publisher = NatsPublisher(sqlite_service, NATS_URL, names=names)

    async def run() -> None:
        try:
            with pytest.raises(UserInputError, match="over http, not NATS"):
                await publisher.ensure_feed("fink-http")
            with pytest.raises(NotFoundError):
                await publisher.ensure_feed("nope")
        finally:
            await publisher.close()

    asyncio.run(run())
    with pytest.raises(NotFoundError, match="no NATS consumer"):
        NatsFeedSource(NATS_URL, "fink", "fink-http", names=names)
    with pytest.raises(TransportError, match="cannot connect"):
        NatsFeedSource("nats://127.0.0.1:1", "fink", "fink-http", names=names)
    with pytest.raises(UserInputError):
        NatsPublisher(sqlite_service, NATS_URL, batch_entries=0)


@pytest.mark.nats
def test_stalled_feed_backlog_is_bounded(
    sqlite_service: AlertService, names: NatsNames, tmp_path: Path
) -> None:
    """A broker that reads nothing holds at most max_backlog messages in JetStream; the rest
    waits in the service's log, and arrives once the broker reads again."""
    svc = sqlite_service
    publisher = NatsPublisher(svc, NATS_URL, names=names, max_backlog=20, batch_entries=10,
                              discover_s=0.1)  # fmt: skip
    with PublisherThread(publisher) as thread:
        for feed, broker in (("fink-full", "fink"), ("lasair-full", "lasair")):
            svc.create_feed(FeedSpec(name=feed, broker=broker, transport="nats"))
            thread.ensure_feed(feed)
        svc.ingest(packets(VISIT, 100))
        svc.close_visit(VISIT)
        fink = consume(
            NatsFeedSource(NATS_URL, "fink", "fink-full", names=names), tmp_path / "a.db",
            manifests(1), max_entries=50,
        )  # fmt: skip
        assert len(fink) == 101
        deadline = time.monotonic() + 10
        while publisher.stats.paused == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        state = asyncio.run(stream_state(NATS_URL, names.stream("lasair")))
        assert 20 <= state.messages < 30  # max_backlog, plus at most one window
        assert svc.feed("lasair-full").cursor < svc.head()
        lasair = consume(
            NatsFeedSource(NATS_URL, "lasair", "lasair-full", names=names), tmp_path / "b.db",
            manifests(1), max_entries=50,
        )  # fmt: skip
    assert [e.alert_id for e in lasair[:-1]] == [alert_id_for(VISIT, i) for i in range(100)]
    assert publisher.stats.feeds == {"fink-full": 101, "lasair-full": 101}


@pytest.mark.nats
def test_stalled_broker_lag_counts_what_jetstream_holds(
    sqlite_service: AlertService, names: NatsNames, tmp_path: Path
) -> None:
    """Everything fits in JetStream (the default max_backlog): the service's own lag is 0,
    but the feed's lag is the broker's, and its alarm fires; once read, it clears."""
    svc = sqlite_service
    svc.policy = svc.policy.model_copy(update={"lag_check_s": 0.2})
    publisher = NatsPublisher(svc, NATS_URL, names=names, discover_s=0.1)
    with PublisherThread(publisher) as thread:
        svc.create_feed(FeedSpec(name="fink-full", broker="fink", transport="nats",
                                 lag_alarm_entries=30, lag_alarm_s=3600))  # fmt: skip
        thread.ensure_feed("fink-full")
        svc.ingest(packets(VISIT, 50))
        svc.close_visit(VISIT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            feed = svc.feed("fink-full")
            st = svc.feed_status(feed)
            if feed.cursor == svc.head() and st.lag_entries == 51:
                break
            time.sleep(0.1)
        assert feed.cursor == svc.head()  # all of it published: nothing left in the service
        assert st.lag_entries == 51  # all of it waiting for the broker in JetStream
        assert st.lagging
        assert [name for name, lagging, _ in svc.check_lag() if lagging] == ["fink-full"]
        got = consume(
            NatsFeedSource(NATS_URL, "fink", "fink-full", names=names), tmp_path / "a.db",
            manifests(1), max_entries=50,
        )  # fmt: skip
        assert len(got) == 51
        deadline = time.monotonic() + 20
        while svc.feed_status(svc.feed("fink-full")).lag_entries and time.monotonic() < deadline:
            time.sleep(0.1)
        st = svc.feed_status(svc.feed("fink-full"))
        assert (st.lag_entries, st.lagging) == (0, False)


@pytest.mark.nats
def test_entry_missing_from_jetstream_is_skipped_with_an_error(
    sqlite_service: AlertService, names: NatsNames, caplog: pytest.LogCaptureFixture
) -> None:
    sqlite_service.create_feed(FeedSpec(name="fink-full", broker="fink", transport="nats"))
    sqlite_service.ingest(packets(VISIT, 3))
    publisher = NatsPublisher(sqlite_service, NATS_URL, names=names, ack_wait_s=0.5)
    stream, subject = names.stream("fink"), names.subject("fink", "fink-full")
    entries = sqlite_service.fetch("fink-full", after=0)

    async def run() -> None:
        try:
            await publisher.ensure_feed("fink-full")
            # The first entry is lost (as if purged): the second says it follows it.
            await publisher.publish(
                stream, subject, "fink-full", entries[1:], prev=entries[0].position
            )
        finally:
            await publisher.close()

    asyncio.run(run())
    source = NatsFeedSource(NATS_URL, "fink", "fink-full", names=names, gap_timeout_s=0.5)
    try:
        assert source.fetch(0, max_entries=10, wait_s=0.1) == []  # waits for the first
        got: list[Entry] = []
        deadline = time.monotonic() + 10
        with caplog.at_level(logging.ERROR, logger="ldf.alerts.nats"):
            while not got and time.monotonic() < deadline:
                got = source.fetch(0, max_entries=10, wait_s=0.3)
        assert [e.position for e in got] == [e.position for e in entries[1:]]
        assert source.skipped_gaps == 1
        assert "are not in JetStream" in caplog.text
    finally:
        source.close()


@pytest.mark.nats
def test_deleted_feed_loses_its_consumer(sqlite_service: AlertService, names: NatsNames) -> None:
    publisher = NatsPublisher(sqlite_service, NATS_URL, names=names, discover_s=0.05)
    sqlite_service.create_feed(FeedSpec(name="fink-full", broker="fink", transport="nats"))
    with PublisherThread(publisher):
        deadline = time.monotonic() + 10
        while "fink-full" not in publisher._pumps and time.monotonic() < deadline:
            time.sleep(0.02)
        NatsFeedSource(NATS_URL, "fink", "fink-full", names=names).close()
        sqlite_service.delete_feed("fink-full")
        while "fink-full" in publisher._pumps and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
    with pytest.raises(NotFoundError):
        NatsFeedSource(NATS_URL, "fink", "fink-full", names=names)


# -- the publisher killed with SIGKILL --------------------------------------------------------

PUBLISHER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path
    from ldf.alerts.nats import NatsNames, NatsPublisher
    from ldf.alerts.service import AlertService
    from ldf.alerts.storage import AlertStore

    cfg = json.loads(sys.argv[1])
    svc = AlertService(AlertStore.open(cfg["store"]), Path(cfg["root"]))
    acks, ack = 0, svc.ack

    def hanging_ack(name, position):
        # JetStream has stored the round; the cursor has not moved yet: SIGKILL lands here.
        global acks
        acks += 1
        if cfg["hang_at"] and acks >= cfg["hang_at"]:
            Path(cfg["marker"]).touch()
            time.sleep(3600)
        return ack(name, position)

    svc.ack = hanging_ack
    pub = NatsPublisher(svc, cfg["url"], names=NatsNames(cfg["prefix"]),
                        batch_entries=cfg["batch"], discover_s=0.05)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(pub.run(stop))
        while svc.feed(cfg["feed"]).cursor < cfg["last"]:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        await pub.close()
        print(json.dumps({"published": pub.stats.published, "duplicates": pub.stats.duplicates}))

    asyncio.run(main())
    """
)


@pytest.mark.nats
def test_publisher_killed_mid_pump(names: NatsNames, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 's.sqlite3'}"
    svc = AlertService(AlertStore.open(store), tmp_path / "alerts")
    try:
        svc.create_feed(FeedSpec(name="fink-full", broker="fink", transport="nats"))
        svc.ingest(packets(VISIT, 100))
        svc.close_visit(VISIT)
        last = svc.head(max_age_s=0)
        marker = tmp_path / "hung"
        cfg = {
            "store": store, "root": str(tmp_path / "alerts"), "url": NATS_URL,
            "prefix": names.prefix, "feed": "fink-full", "last": last, "batch": 10,
            "hang_at": 3, "marker": str(marker),
        }  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, json.dumps(cfg)])
        try:
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert proc.poll() is None, "the publisher ended before it could be killed"
                assert time.monotonic() < deadline, "the publisher never got going"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stream = names.stream("fink")
        assert asyncio.run(stream_state(NATS_URL, stream)).messages == 30
        assert svc.feed("fink-full").delivered == 20  # the third round is not acknowledged
        # Restarted, it publishes the third round again: JetStream drops it as a duplicate.
        out = subprocess.run(
            [sys.executable, "-c", PUBLISHER, json.dumps({**cfg, "hang_at": 0})],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        stats = json.loads(out.stdout.decode().strip().splitlines()[-1])
        assert stats == {"published": 71, "duplicates": 10}
        assert asyncio.run(stream_state(NATS_URL, stream)).messages == 101
        got = consume(
            NatsFeedSource(NATS_URL, "fink", "fink-full", names=names), tmp_path / "c.db",
            manifests(1), max_entries=40,
        )  # fmt: skip
        assert [e.alert_id for e in got[:-1]] == [alert_id_for(VISIT, i) for i in range(100)]
        assert got[-1].kind == "manifest"
    finally:
        svc.close()


# -- a NATS server of the test's own ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A throwaway ``nats-server`` with JetStream (killable and restartable)."""

    def __init__(self, root: Path, config: str = "") -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "nats.conf"
        self.conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{root / "js"}" }}\n' + config
        )
        self.conf.chmod(0o600)
        self.log = root / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            time.sleep(0.05)
        raise AssertionError("nats-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def nats_server(root: Path, config: str = "") -> Iterator[NatsServer]:
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed")
    server = NatsServer(root, config)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.nats
def test_brokers_read_only_their_own_feeds(sqlite_service: AlertService, tmp_path: Path) -> None:
    passwords = {"fink": new_password(), "lasair": new_password()}
    publisher_password = new_password()
    config = nats_authorization(passwords, publisher=("ldf-alerts", publisher_password))
    svc = sqlite_service
    with nats_server(tmp_path / "nats", config) as server:
        publisher = NatsPublisher(svc, server.url, user="ldf-alerts", password=publisher_password)
        with PublisherThread(publisher) as thread:
            for feed, broker in (("fink-full", "fink"), ("lasair-full", "lasair")):
                svc.create_feed(FeedSpec(name=feed, broker=broker, transport="nats"))
                thread.ensure_feed(feed)
            svc.ingest(packets(VISIT, 5))
            svc.close_visit(VISIT)
            # fink reads its own feed.
            got = consume(
                NatsFeedSource(server.url, "fink", "fink-full", password=passwords["fink"]),
                tmp_path / "fink.db", manifests(1),
            )  # fmt: skip
            assert [e.alert_id for e in got[:-1]] == [alert_id_for(VISIT, i) for i in range(5)]
            # ... and nothing of lasair's, however it asks.
            with pytest.raises(UserInputError, match="permissions violation"):
                NatsFeedSource(
                    server.url, "lasair", "lasair-full", user="fink", password=passwords["fink"]
                )
            with pytest.raises(UserInputError, match="refused the credentials"):
                NatsFeedSource(server.url, "lasair", "lasair-full", password=passwords["fink"])

            async def snoop() -> list[str]:
                errors: list[str] = []
                both = asyncio.Event()

                async def on_error(exc: Exception) -> None:
                    errors.append(str(exc))
                    if len(errors) >= 2:
                        both.set()

                nc = await nats.connect(
                    server.url, user="fink", password=passwords["fink"], error_cb=on_error,
                    allow_reconnect=False,
                )  # fmt: skip
                try:
                    await nc.subscribe("ldf.alerts.lasair.>")
                    await nc.publish(
                        "$JS.API.CONSUMER.MSG.NEXT.LDF_ALERTS_lasair.lasair-full",
                        b'{"batch": 1}', reply="_INBOX_fink.x",
                    )  # fmt: skip
                    await nc.flush()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(both.wait(), 10)
                finally:
                    await nc.close()
                return errors

            errors = asyncio.run(snoop())
            assert any('subscription to "ldf.alerts.lasair.>"' in e.lower() for e in errors)
            assert any('publish to "$js.api.consumer.msg.next' in e.lower() for e in errors)
            # lasair's feed was untouched: it gets everything.
            got = consume(
                NatsFeedSource(server.url, "lasair", "lasair-full", password=passwords["lasair"]),
                tmp_path / "lasair.db", manifests(1),
            )  # fmt: skip
            assert len(got) == 6


@pytest.mark.nats
def test_nats_server_killed_and_restarted(sqlite_service: AlertService, tmp_path: Path) -> None:
    svc = sqlite_service
    with nats_server(tmp_path / "nats") as server:
        publisher = NatsPublisher(svc, server.url, ack_wait_s=1.0, publish_timeout_s=2.0)
        with PublisherThread(publisher) as thread:
            svc.create_feed(FeedSpec(name="fink-full", broker="fink", transport="nats"))
            thread.ensure_feed("fink-full")
            svc.ingest(packets(VISIT, 30))
            source = NatsFeedSource(server.url, "fink", "fink-full")
            consumer = DurableConsumer(source, tmp_path / "c.db")
            got: list[Entry] = []

            def handler(entries: list[Entry], _db: Any) -> None:
                got.extend(entries)

            deadline = time.monotonic() + 30
            while len(got) < 12 and time.monotonic() < deadline:
                consumer.poll(handler, max_entries=6, wait_s=0.5)
            server.kill()
            svc.ingest(packets(VISIT, 30, start=30))  # while the server is down
            svc.close_visit(VISIT)
            with contextlib.suppress(TransportError):
                consumer.poll(handler, max_entries=6, wait_s=0.2)
            server.start()
            deadline = time.monotonic() + 60
            consumer.run(
                handler,
                until=lambda: (
                    bool(got and got[-1].kind == "manifest") or time.monotonic() > deadline
                ),
                max_entries=6,
                wait_s=0.5,
            )
            consumer.close()
    assert [e.alert_id for e in got[:-1]] == [alert_id_for(VISIT, i) for i in range(60)]
    assert got[-1].kind == "manifest"


@pytest.mark.nats
def test_new_consumer_of_a_consumed_feed_starts_at_what_jetstream_has(
    sqlite_service: AlertService, names: NatsNames, tmp_path: Path
) -> None:
    """JetStream keeps what no consumer acknowledged: a consumer that lost its position
    (a new database) gets that, not the feed from its start (HTTP would re-read it)."""
    svc = sqlite_service
    with PublisherThread(NatsPublisher(svc, NATS_URL, names=names)) as thread:
        svc.create_feed(FeedSpec(name="f", broker="fink", transport="nats", max_ack_pending=8))
        thread.ensure_feed("f")
        svc.ingest(packets(VISIT, 10))
        first = consume(
            NatsFeedSource(NATS_URL, "fink", "f", names=names), tmp_path / "a.db",
            lambda got: len(got) >= 10,
        )  # fmt: skip
        assert len(first) == 10
        svc.ingest(packets(VISIT, 10, start=10))
        source = NatsFeedSource(NATS_URL, "fink", "f", names=names)
        got = consume(source, tmp_path / "new.db", lambda got: len(got) >= 10)
    assert [e.alert_id for e in got] == [alert_id_for(VISIT, i) for i in range(10, 20)]
    assert source.skipped_gaps == 1
