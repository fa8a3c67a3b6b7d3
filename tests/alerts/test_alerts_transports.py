"""The transport contract: every feed transport presents each entry once, in order.

One suite, run over the embedded transport (HTTP long-poll, `HttpFeedSource`) and NATS
JetStream (`NatsPublisher` into the server at 127.0.0.1:4222, `NatsFeedSource`), each on
SQLite and PostgreSQL: exactly once and in order, manifests after their visit's alerts, a
consumer crash (before or after its commit) loses and duplicates nothing, a stalled feed
delays no other, replays arrive flagged, acknowledgement semantics; and a consumer process
killed with SIGKILL mid-batch, restarted, ends with every alert exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ldf.alerts.auth import Credentials, Role
from ldf.alerts.client import DurableConsumer, Entry, FeedSource, HttpFeedSource
from ldf.alerts.daemon import ServerThread
from ldf.alerts.models import FeedSpec, ReplaySpec
from ldf.alerts.service import AlertService
from ldf.alerts.storage import AlertStore
from ldf.alerts.synthetic import alert_id_for
from ldf.errors import TransportError
from tests.alerts.conftest import VISIT, packets
from tests.engines import NATS_URL, require_nats

ACK_WAIT_S = 1.0
"""The NATS consumers' ack_wait here: what a crashed consumer held comes back after it."""


@dataclass
class Transport:
    """One transport over one alert service, as the contract suite drives it."""

    kind: str
    service: AlertService
    open_source: Callable[[str, str], FeedSource]
    setup_feed: Callable[[str], None]
    details: dict[str, Any] = field(default_factory=dict)

    def create_feed(self, name: str, broker: str, **spec: Any) -> None:
        """Create a feed on this transport (and, for NATS, its consumer now)."""
        self.service.create_feed(FeedSpec(name=name, broker=broker, transport=self.kind, **spec))
        self.setup_feed(name)

    def source(self, broker: str, feed: str) -> FeedSource:
        """A broker's source of one of its feeds."""
        return self.open_source(broker, feed)


def delete_streams(prefix: str) -> None:
    """Delete every stream of a test's NATS prefix."""
    import nats

    async def run() -> None:
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                name = info.config.name or ""
                if name.startswith(prefix.upper() + "_ALERTS_"):
                    await js.delete_stream(name)
        finally:
            await nc.close()

    asyncio.run(run())


@contextlib.contextmanager
def open_transport(kind: str, service: AlertService, tmp_path: Path) -> Iterator[Transport]:
    """Serve ``service`` over a transport; yields what the suite drives."""
    if kind == "http":
        creds = Credentials(tmp_path / "secrets" / "creds.yaml")
        tokens = {b: creds.add(b, Role.BROKER) for b in ("fink", "lasair")}
        with ServerThread(service, creds, background=False) as server:
            yield Transport(
                "http",
                service,
                lambda broker, feed: HttpFeedSource(server.url, tokens[broker], feed),
                lambda feed: None,
                {"url": server.url, "tokens": tokens},
            )
        return
    require_nats()
    from ldf.alerts.nats import NatsFeedSource, NatsNames, NatsPublisher, PublisherThread

    names = NatsNames("t" + secrets.token_hex(5))
    publisher = NatsPublisher(
        service, NATS_URL, names=names, ack_wait_s=ACK_WAIT_S, discover_s=0.2, max_backlog=50
    )
    try:
        with PublisherThread(publisher) as thread:
            yield Transport(
                "nats",
                service,
                lambda broker, feed: NatsFeedSource(NATS_URL, broker, feed, names=names),
                thread.ensure_feed,
                {"url": NATS_URL, "prefix": names.prefix, "publisher": publisher},
            )
    finally:
        delete_streams(names.prefix)


@pytest.fixture(params=["http", pytest.param("nats", marks=pytest.mark.nats)])
def transport(
    request: pytest.FixtureRequest, service: AlertService, tmp_path: Path
) -> Iterator[Transport]:
    """The service over each transport (on each engine)."""
    with open_transport(request.param, service, tmp_path) as t:
        yield t


def consume(
    source: FeedSource,
    path: Path,
    until: Callable[[list[Entry]], bool],
    *,
    max_entries: int = 7,
    timeout_s: float = 30.0,
) -> list[Entry]:
    """Run a durable consumer over ``source`` until ``until(everything so far)``; close it.

    The handler records each entry in the consumer's database in the batch's transaction;
    returns what this run processed.
    """
    consumer = DurableConsumer(source, path)
    consumer.db.execute(
        "CREATE TABLE IF NOT EXISTS got (position INTEGER, kind TEXT, alert_id INTEGER)"
    )
    got: list[Entry] = []

    def handler(entries: list[Entry], db: sqlite3.Connection) -> None:
        db.executemany(
            "INSERT INTO got VALUES (?, ?, ?)", [(e.position, e.kind, e.alert_id) for e in entries]
        )
        got.extend(entries)

    deadline = time.monotonic() + timeout_s
    try:
        consumer.run(
            handler,
            until=lambda: until(got) or time.monotonic() > deadline,
            max_entries=max_entries,
            wait_s=0.5,
        )
    finally:
        consumer.close()
    return got


def recorded(path: Path) -> list[tuple[int, str, int | None]]:
    """What a consumer's database holds, in the order it was committed."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.execute("SELECT position, kind, alert_id FROM got ORDER BY rowid"))


def manifests(n: int) -> Callable[[list[Entry]], bool]:
    """Stop once ``n`` manifests came."""
    return lambda got: sum(e.kind == "manifest" for e in got) >= n


def test_each_alert_once_in_order_with_manifests(transport: Transport, tmp_path: Path) -> None:
    transport.create_feed("fink-full", "fink")
    svc = transport.service
    svc.ingest(packets(VISIT, 8))
    svc.ingest(packets(VISIT, 4, start=8))
    svc.close_visit(VISIT)
    svc.ingest(packets(VISIT + 1, 5))
    svc.close_visit(VISIT + 1)
    got = consume(transport.source("fink", "fink-full"), tmp_path / "c.db", manifests(2))
    positions = [e.position for e in got]
    assert positions == sorted(set(positions))
    assert [e.kind for e in got] == ["alert"] * 12 + ["manifest"] + ["alert"] * 5 + ["manifest"]
    expected = [alert_id_for(VISIT, i) for i in range(12)]
    expected += [alert_id_for(VISIT + 1, i) for i in range(5)]
    assert [e.alert_id for e in got if e.kind == "alert"] == expected
    assert [e.body for e in got[:12]] == list(packets(VISIT, 12))
    first, second = (json.loads(e.body) for e in got if e.kind == "manifest")
    assert (first["visit"], first["count"], second["visit"], second["count"]) == (
        VISIT, 12, VISIT + 1, 5,
    )  # fmt: skip
    assert got[0].header["visit"] == VISIT
    assert "schema_id" in got[0].header
    assert "replay" not in got[0].header
    assert len(recorded(tmp_path / "c.db")) == len(got)


def test_each_feed_gets_every_alert_once(transport: Transport, tmp_path: Path) -> None:
    transport.create_feed("fink-full", "fink")
    transport.create_feed("lasair-lite", "lasair", format="notification")
    transport.service.ingest(packets(VISIT, 10))
    transport.service.close_visit(VISIT)
    full = consume(transport.source("fink", "fink-full"), tmp_path / "a.db", manifests(1))
    lite = consume(transport.source("lasair", "lasair-lite"), tmp_path / "b.db", manifests(1))
    expected = [alert_id_for(VISIT, i) for i in range(10)]
    for got in (full, lite):
        assert [e.alert_id for e in got if e.kind == "alert"] == expected
        assert got[-1].kind == "manifest"
    assert json.loads(lite[0].body)["alertId"] == expected[0]
    assert lite[0].header["format"] == "notification"


class NoAck:
    """A source whose acknowledgements never arrive (the consumer dies right after commit)."""

    def __init__(self, source: FeedSource) -> None:
        self.inner = source
        self.feed = source.feed

    def fetch(self, after: int, *, max_entries: int, wait_s: float) -> list[Entry]:
        return self.inner.fetch(after, max_entries=max_entries, wait_s=wait_s)

    def ack(self, position: int) -> None:
        raise TransportError("the consumer died before acknowledging")

    def close(self) -> None:
        self.inner.close()


def test_consumer_crash_loses_and_duplicates_nothing(transport: Transport, tmp_path: Path) -> None:
    transport.create_feed("fink-full", "fink")
    transport.service.ingest(packets(VISIT, 20))
    transport.service.close_visit(VISIT)
    db = tmp_path / "c.db"
    # 1: commits two batches, never acknowledges them.
    first = consume(
        NoAck(transport.source("fink", "fink-full")), db, lambda g: len(g) >= 8, max_entries=4
    )
    assert len(first) >= 8
    # 2: fetches a batch and dies before committing it (the handler raises).
    consumer = DurableConsumer(transport.source("fink", "fink-full"), db)

    def crash(entries: list[Entry], _db: sqlite3.Connection) -> None:
        raise RuntimeError("killed mid-batch")

    def poll_until_a_batch_comes() -> None:
        while True:
            consumer.poll(crash, max_entries=5, wait_s=5.0)

    with pytest.raises(RuntimeError, match="killed"):
        poll_until_a_batch_comes()
    consumer.close()  # without acknowledging
    assert len(recorded(db)) == len(first)
    # 3: a fresh consumer on the same database gets the rest, once each.
    consume(transport.source("fink", "fink-full"), db, manifests(1))
    rows = recorded(db)
    alerts = [r[2] for r in rows if r[1] == "alert"]
    assert alerts == [alert_id_for(VISIT, i) for i in range(20)]
    assert [r[1] for r in rows].count("manifest") == 1
    assert [r[0] for r in rows] == sorted({r[0] for r in rows})


def test_stalled_feed_does_not_delay_another(transport: Transport, tmp_path: Path) -> None:
    transport.create_feed("fink-full", "fink", max_ack_pending=8)
    transport.create_feed("lasair-full", "lasair", max_ack_pending=8)
    transport.service.ingest(packets(VISIT, 5))
    stalled = transport.source("lasair", "lasair-full")
    try:
        held = fetch_until(stalled, 0, 4)  # and never acknowledged
        assert [e.alert_id for e in held] == [alert_id_for(VISIT, i) for i in range(4)]
        for start in range(5, 125, 20):
            transport.service.ingest(packets(VISIT, 20, start=start))
        transport.service.close_visit(VISIT)
        healthy = consume(
            transport.source("fink", "fink-full"), tmp_path / "a.db", manifests(1), max_entries=50
        )
        assert [e.alert_id for e in healthy if e.kind == "alert"] == [
            alert_id_for(VISIT, i) for i in range(125)
        ]
    finally:
        stalled.close()
    # The stalled broker resumes where it was and gets the rest, once.
    rest = consume(
        transport.source("lasair", "lasair-full"), tmp_path / "b.db", manifests(1), max_entries=50
    )
    assert [e.alert_id for e in rest if e.kind == "alert"] == [
        alert_id_for(VISIT, i) for i in range(125)
    ]


def test_replay_arrives_flagged(transport: Transport, tmp_path: Path) -> None:
    transport.create_feed("fink-full", "fink")
    transport.create_feed("fink-replay", "fink", live=False)
    transport.service.ingest(packets(VISIT, 6))
    transport.service.close_visit(VISIT)
    live = consume(transport.source("fink", "fink-full"), tmp_path / "a.db", manifests(1))
    assert len(live) == 7
    done = transport.service.replay(
        ReplaySpec(feed="fink-replay", alert_id_min=alert_id_for(VISIT, 2)), actor="fink"
    )
    assert done["alerts"] == 4
    got = consume(transport.source("fink", "fink-replay"), tmp_path / "b.db", manifests(1))
    assert [e.alert_id for e in got[:-1]] == [alert_id_for(VISIT, i) for i in range(2, 6)]
    assert all(e.header.get("replay") is True for e in got)
    assert got[0].body == packets(VISIT, 6)[2]
    manifest = json.loads(got[-1].body)
    assert (manifest["count"], manifest["feed"]) == (4, "fink-replay")
    # The live feed is not sent the copies.
    source = transport.source("fink", "fink-full")
    try:
        assert source.fetch(live[-1].position, max_entries=10, wait_s=0.3) == []
    finally:
        source.close()


def fetch_until(source: FeedSource, after: int, n: int, timeout_s: float = 15.0) -> list[Entry]:
    """Fetch after ``after`` until ``n`` entries came (what JetStream redelivers comes late).

    Each fetch is after the same position, so nothing is acknowledged; each presents again
    what the one before did, and whatever came since.
    """
    got: list[Entry] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        again = source.fetch(after, max_entries=n, wait_s=0.5)
        assert [e.position for e in again[: len(got)]] == [e.position for e in got]
        got = again
    return got


def test_ack_semantics(transport: Transport) -> None:
    transport.create_feed("fink-full", "fink")
    transport.service.ingest(packets(VISIT, 6))
    first = transport.source("fink", "fink-full")
    try:
        # Fetching again after the same position, without acknowledging, presents the
        # same entries again (and those that came since).
        batch = fetch_until(first, 0, 6)
        assert [e.alert_id for e in batch] == [alert_id_for(VISIT, i) for i in range(6)]
        assert [e.position for e in first.fetch(0, max_entries=10, wait_s=0.2)] == [
            e.position for e in batch
        ]
        first.ack(batch[2].position)
    finally:
        first.close()
    # A new connection is presented what was not acknowledged, nothing before it.
    second = transport.source("fink", "fink-full")
    try:
        rest = fetch_until(second, batch[2].position, 3)
        assert [e.position for e in rest] == [e.position for e in batch[3:]]
        second.ack(rest[-1].position)
        assert second.fetch(rest[-1].position, max_entries=10, wait_s=0.3) == []
        transport.service.ingest(packets(VISIT, 2, start=6))
        new = fetch_until(second, rest[-1].position, 2)
        assert [e.alert_id for e in new] == [alert_id_for(VISIT, 6), alert_id_for(VISIT, 7)]
    finally:
        second.close()


def test_a_batch_is_not_changed_by_the_next_fetch(transport: Transport) -> None:
    """What a fetch returned stays as it was after later fetches (`HttpFeedSource` reads
    every batch into one buffer it keeps)."""
    transport.create_feed("fink-full", "fink")
    sent = list(packets(VISIT, 6))
    transport.service.ingest(sent)
    source = transport.source("fink", "fink-full")
    try:
        first = fetch_until(source, 0, 3)[:3]
        bodies = [bytes(e.body) for e in first]
        assert bodies == sent[:3]
        later = fetch_until(source, first[-1].position, 3)
        assert [bytes(e.body) for e in later] == sent[3:]
        assert [bytes(e.body) for e in first] == bodies
    finally:
        source.close()


# -- a consumer process killed with SIGKILL mid-batch ----------------------------------------

CONSUMER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from ldf.alerts.client import DurableConsumer, HttpFeedSource

    cfg = json.loads(sys.argv[1])
    if cfg["kind"] == "http":
        source = HttpFeedSource(cfg["url"], cfg["token"], cfg["feed"])
    else:
        from ldf.alerts.nats import NatsFeedSource, NatsNames
        source = NatsFeedSource(cfg["url"], cfg["broker"], cfg["feed"],
                                names=NatsNames(cfg["prefix"]))
    consumer = DurableConsumer(source, Path(cfg["db"]))
    consumer.db.execute("CREATE TABLE IF NOT EXISTS got (position INTEGER, alert_id INTEGER)")
    busy = Path(cfg["db"] + ".busy")

    def handler(entries, db):
        for e in entries:
            db.execute("INSERT INTO got VALUES (?, ?)", (e.position, e.alert_id))
        busy.touch()
        time.sleep(0.2)  # the work SIGKILL interrupts, its rows not committed yet
        busy.unlink()

    consumer.run(handler, until=lambda: consumer.position >= cfg["last"], max_entries=6,
                 wait_s=0.5)
    consumer.close()
    """
)


@pytest.fixture(params=["http", pytest.param("nats", marks=pytest.mark.nats)])
def sqlite_transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    """Each transport over a service on SQLite (the process test needs one engine)."""
    svc = AlertService(AlertStore.open(f"sqlite:///{tmp_path / 's.sqlite3'}"), tmp_path / "alerts")
    try:
        with open_transport(request.param, svc, tmp_path) as t:
            yield t
    finally:
        svc.close()


def test_consumer_process_killed_mid_batch(sqlite_transport: Transport, tmp_path: Path) -> None:
    t = sqlite_transport
    t.create_feed("fink-full", "fink")
    t.service.ingest(packets(VISIT, 40))
    last = t.service.close_visit(VISIT)
    head = t.service.head(max_age_s=0)
    assert last.count == 40
    db = tmp_path / "consumer.db"
    cfg = {
        "kind": t.kind, "url": t.details["url"], "feed": "fink-full", "broker": "fink",
        "token": t.details.get("tokens", {}).get("fink"), "prefix": t.details.get("prefix"),
        "db": str(db), "last": head,
    }  # fmt: skip
    busy = Path(str(db) + ".busy")

    def run(kill_after_rows: int | None) -> int:
        proc = subprocess.Popen([sys.executable, "-c", CONSUMER, json.dumps(cfg)])
        try:
            if kill_after_rows is None:
                return proc.wait(120)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if busy.exists() and len(rows()) >= kill_after_rows:
                    break
                assert proc.poll() is None, "the consumer finished before it could be killed"
                time.sleep(0.01)
            else:
                pytest.fail("the consumer never got to work")
            os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def rows() -> list[tuple[int, int | None]]:
        if not db.exists():
            return []
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
                return list(conn.execute("SELECT position, alert_id FROM got"))
        except sqlite3.OperationalError:  # the table is not there yet
            return []

    assert run(kill_after_rows=6) == -signal.SIGKILL
    assert run(kill_after_rows=len(rows()) + 6) == -signal.SIGKILL
    busy.unlink(missing_ok=True)
    assert run(kill_after_rows=None) == 0
    got = rows()
    alert_ids = [a for _, a in got if a is not None]
    assert sorted(alert_ids) == [alert_id_for(VISIT, i) for i in range(40)]
    assert len(got) == 41  # the alerts and the manifest, each once
