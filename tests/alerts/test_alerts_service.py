"""The alert service's contract, on SQLite and PostgreSQL: ingest, feeds, manifests, replay."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from ldf.alerts import formats
from ldf.alerts.models import FeedFormat, FeedSpec, ReplaySpec, manifest_checksum
from ldf.alerts.service import AlertService
from ldf.alerts.storage import AlertStore
from ldf.alerts.synthetic import alert_id_for
from ldf.errors import NotFoundError, StateError, UserInputError
from ldf.pipelines.alertpacket import AlertPacketError, AlertSchema, LocalAlertSink
from tests.alerts.conftest import VISIT, packets


def drain(service: AlertService, feed: str) -> list:
    """Everything a feed has now, acknowledging as it goes."""
    out = []
    while batch := service.fetch(feed, max_entries=7):
        out += batch
        service.ack(feed, batch[-1].position)
    return out


def test_ingest_is_durable_and_idempotent(service: AlertService) -> None:
    batch = packets(VISIT, 20)
    first = service.ingest(batch)
    assert (first.accepted, first.duplicates) == (20, 0)
    again = service.ingest([*batch[5:], *packets(VISIT, 5, start=20)])
    assert (again.accepted, again.duplicates) == (5, 15)
    assert service.store.counts()["alerts"] == 25
    # Bytes come back exactly as produced.
    assert service.get_alert(alert_id_for(VISIT, 3)) == batch[3]
    # Within one batch a repeated packet counts once.
    r = service.ingest([packets(VISIT, 1, start=30)[0]] * 3)
    assert (r.accepted, r.duplicates) == (1, 2)


def test_bad_packet_stores_nothing_of_its_batch(service: AlertService) -> None:
    good = packets(VISIT, 3)
    with pytest.raises(AlertPacketError, match="packet 1 of 3"):
        service.ingest([good[0], b"\x00\x00\x00\x04\x4d garbage", good[2]])
    with pytest.raises(AlertPacketError, match="magic byte"):
        service.ingest([b"\x01" + good[0][1:]])
    with pytest.raises(AlertPacketError, match="not supported"):
        service.ingest([b"\x00\x00\x00\x00\x07" + good[0][5:]])
    assert service.store.counts()["alerts"] == 0


def test_lookup_by_id_object_and_visit(service: AlertService) -> None:
    service.ingest(packets(VISIT, 4))
    service.ingest(packets(VISIT + 1, 2))
    info = service.alert_info(alert_id_for(VISIT, 2))
    assert info["visit"] == VISIT
    assert info["dia_object_id"] is not None
    assert service.store.alert_ids(dia_object_id=info["dia_object_id"]) == [alert_id_for(VISIT, 2)]
    assert service.store.alert_ids(visit=VISIT + 1) == [
        alert_id_for(VISIT + 1, 0),
        alert_id_for(VISIT + 1, 1),
    ]
    with pytest.raises(NotFoundError):
        service.get_alert(12345)


def test_every_alert_once_per_feed_with_manifests(service: AlertService) -> None:
    service.create_feed(FeedSpec(name="a-full", broker="a"))
    service.create_feed(FeedSpec(name="b-lite", broker="b", format=FeedFormat.NOTIFICATION))
    service.ingest(packets(VISIT, 10))
    manifest = service.close_visit(VISIT)
    assert manifest.count == 10
    assert manifest.checksum == manifest_checksum(alert_id_for(VISIT, i) for i in range(10))
    full = drain(service, "a-full")
    lite = drain(service, "b-lite")
    for got in (full, lite):
        alerts = [d for d in got if d.kind == "alert"]
        assert sorted(d.alert_id for d in alerts) == [alert_id_for(VISIT, i) for i in range(10)]
        assert [d.kind for d in got][-1] == "manifest"
    assert [d.body for d in full if d.kind == "alert"] == list(packets(VISIT, 10))
    note = formats.json_loads(lite[0].body)
    assert note["alertId"] == alert_id_for(VISIT, 0)
    assert note["visit"] == VISIT
    assert "url" in note
    assert str(note["alertId"]) in note["url"]
    # Nothing more, and closing again without changes adds no revision.
    assert service.close_visit(VISIT).revision == 1
    assert service.fetch("a-full") == []


def test_late_alerts_revise_the_manifest(service: AlertService) -> None:
    service.create_feed(FeedSpec(name="f", broker="a"))
    service.ingest(packets(VISIT, 3))
    service.close_visit(VISIT)
    service.ingest(packets(VISIT, 2, start=3))
    got = drain(service, "f")
    manifests = [formats.json_loads(d.body) for d in got if d.kind == "manifest"]
    assert [(m["revision"], m["count"]) for m in manifests] == [(1, 3), (2, 5)]


def test_cursor_survives_restart_and_ack_is_checked(
    service: AlertService, store_url: str, tmp_path: Path
) -> None:
    from ldf.alerts.storage import AlertStore

    service.create_feed(FeedSpec(name="f", broker="a"))
    service.ingest(packets(VISIT, 6))
    batch = service.fetch("f", max_entries=4)
    service.ack("f", batch[1].position)
    with pytest.raises(UserInputError, match="last entry"):
        service.ack("f", 10_000)
    again = AlertService(AlertStore.open(store_url), tmp_path / "alerts")
    try:
        rest = again.fetch("f")
        assert [d.alert_id for d in rest] == [alert_id_for(VISIT, i) for i in range(2, 6)]
        assert again.feed("f").delivered == 2
        again.ack("f", batch[0].position)  # older than the cursor: nothing changes
        assert again.feed("f").cursor == batch[1].position
    finally:
        again.close()


def test_feed_options_are_checked(service: AlertService) -> None:
    service.create_feed(FeedSpec(name="f", broker="a"))
    with pytest.raises(StateError, match="exists"):
        service.create_feed(FeedSpec(name="f", broker="a"))
    with pytest.raises(UserInputError, match="not supported"):
        service.create_feed(FeedSpec(name="g", broker="a", schema_version="3.0"))
    with pytest.raises(ValueError, match="feed name"):
        FeedSpec(name="bad name", broker="a")
    with pytest.raises(UserInputError, match="outside the log"):
        service.create_feed(FeedSpec(name="h", broker="a", start=99))


def test_formats_no_cutouts_and_older_schema(service: AlertService) -> None:
    service.create_feed(FeedSpec(name="nc", broker="a", format=FeedFormat.NO_CUTOUTS))
    service.create_feed(FeedSpec(name="old", broker="a", schema_version="11.0"))
    service.ingest(packets(VISIT, 2))
    nc = drain(service, "nc")
    record = AlertSchema.latest().deserialize(nc[0].body)
    assert record["cutoutScience"] is None
    assert record["diaSource"]["diaSourceId"] == nc[0].alert_id
    assert len(nc[0].body) < len(packets(VISIT, 1)[0]) / 2
    old = drain(service, "old")
    assert old[0].schema_id == 1100
    rec = AlertSchema.for_version(11, 0).deserialize(old[0].body)
    assert rec["diaSourceId"] == old[0].alert_id
    assert rec["cutoutScience"] is not None
    assert "exposureTime" not in rec["diaSource"]


def test_replay_by_visits_time_and_ids(service: AlertService) -> None:
    service.create_feed(FeedSpec(name="live", broker="a"))
    service.ingest(packets(VISIT, 4))
    service.ingest(packets(VISIT + 1, 3))
    service.close_visit(VISIT)
    service.close_visit(VISIT + 1)
    drain(service, "live")
    # Into a new feed: the visit's alerts then its manifest, marked as a replay.
    out = service.replay(ReplaySpec(feed="a-replay", visits=[VISIT + 1]), actor="a")
    assert out["alerts"] == 3
    got = drain(service, "a-replay")
    assert [d.alert_id for d in got if d.kind == "alert"] == [
        alert_id_for(VISIT + 1, i) for i in range(3)
    ]
    assert all(d.replay for d in got)
    assert got[-1].kind == "manifest"
    assert formats.json_loads(got[-1].body)["count"] == 3
    # Into the live feed: only those, then new alerts continue.
    service.replay(
        ReplaySpec(
            feed="live", alert_id_min=alert_id_for(VISIT, 1), alert_id_max=alert_id_for(VISIT, 2)
        ),
        actor="a",
    )
    service.ingest(packets(VISIT + 2, 1))
    got = drain(service, "live")
    assert [(d.alert_id, d.replay) for d in got if d.kind == "alert"] == [
        (alert_id_for(VISIT, 1), True),
        (alert_id_for(VISIT, 2), True),
        (alert_id_for(VISIT + 2, 0), False),
    ]
    # A time range covering everything.
    n = service.replay(ReplaySpec(feed="t", since_unix=0), actor="a")["alerts"]
    assert n == 8
    with pytest.raises(ValueError, match="exactly one"):
        ReplaySpec(feed="x", visits=[1], since_unix=0)


def test_two_feeds_are_independent(service: AlertService) -> None:
    service.create_feed(FeedSpec(name="fast", broker="a"))
    service.create_feed(FeedSpec(name="stalled", broker="b", lag_alarm_entries=5))
    events = []
    service.lag_listeners.append(lambda feed, lagging, st: events.append((feed, lagging)))
    for v in range(3):
        service.ingest(packets(VISIT + v, 4))
        assert len(drain(service, "fast")) == 4
    changes = service.check_lag()
    assert [(name, lagging) for name, lagging, _ in changes] == [("stalled", True)]
    assert events == [("stalled", True)]
    assert service.check_lag() == []  # raised once per episode
    st = {f["name"]: f for f in service.status()["feeds"]}
    assert st["fast"]["lag_entries"] == 0
    assert st["stalled"]["lag_entries"] == 12
    assert st["fast"]["delivered"] == 12
    assert st["stalled"]["lagging"]
    assert len(drain(service, "stalled")) == 12
    service.check_lag()
    assert events[-1] == ("stalled", False)


def test_archive_is_gzip_and_serves_reads(service: AlertService) -> None:
    service.ingest(packets(VISIT, 5))
    service.close_visit(VISIT)
    assert service.archive_closed(older_than_s=0) == 5
    path = service.archive.root / service.archive.name(VISIT)
    assert gzip.decompress(path.read_bytes()) == b"".join(packets(VISIT, 5))
    for seg in service.segments.segments():
        service.segments.remove(seg)
    assert service.get_alert(alert_id_for(VISIT, 4)) == packets(VISIT, 5)[4]
    assert service.archive_closed(older_than_s=0) == 0


def test_outbox_files_are_ingested_once(service: AlertService, tmp_path: Path) -> None:
    sink = LocalAlertSink(tmp_path / "outbox")
    sink.deliver(VISIT, "R22_S11", list(packets(VISIT, 3)))
    sink.deliver(VISIT, "R22_S12", list(packets(VISIT, 2, start=3)))
    r = service.ingest_outbox(tmp_path / "outbox")
    assert (r.accepted, r.duplicates) == (5, 0)
    assert not list((tmp_path / "outbox").rglob("*.alerts*"))
    # A re-delivery (retried detector) is a duplicate.
    sink.deliver(VISIT, "R22_S11", list(packets(VISIT, 3)))
    assert service.ingest_outbox(tmp_path / "outbox").duplicates == 3


async def test_wait_ignores_entries_for_other_feeds(service: AlertService) -> None:
    service.create_feed(FeedSpec(name="a", broker="a"))
    service.ingest(packets(VISIT, 3))
    last = drain(service, "a")[-1].position
    # A replay into another feed appends entries that feed "a" is never presented.
    service.replay(ReplaySpec(feed="b", broker="b", visits=[VISIT]), actor="operator")
    assert service.head() > last
    assert await service.wait("a", last, 0.3) is False
    assert await service.wait("b", 0, 0.3) is True
    service.ingest(packets(VISIT, 1, start=3))
    assert await service.wait("a", last, 0.3) is True


def test_log_tail_in_memory_reads_exactly_what_the_database_holds(
    service: AlertService, store_url: str
) -> None:
    store = service.store
    # Live alerts, a manifest, a replay addressed to one feed (not recorded in the tail: a
    # gap), alerts of a second store writing the same log (another gap), more alerts.
    service.ingest(packets(VISIT, 5))
    service.close_visit(VISIT)
    service.ingest(packets(VISIT + 1, 4))
    service.replay(ReplaySpec(feed="r", visits=[VISIT]), actor="a")
    service.ingest(packets(VISIT + 2, 3))
    other = AlertStore.open(store_url)
    try:
        AlertService(other, service.root.parent / "other-alerts").ingest(packets(VISIT + 3, 2))
    finally:
        other.close()
    service.ingest(packets(VISIT + 4, 3))
    service.close_visit(VISIT + 4)
    head = store.head()
    assert head >= 5 + 1 + 4 + 3 + 2 + 3 + 1
    # The tail holds the run since the other store's write: that store's visit's manifest
    # and the last batch.
    run = [r["position"] for r in store.tail.rows]
    assert run == list(range(head - 3, head + 1))
    # Entries addressed to one feed written after the run (a replay's): past the run's end.
    service.replay(ReplaySpec(feed="r", visits=[VISIT + 1]), actor="a")
    head = store.head()
    tail = store.tail
    compared = 0
    for feed, live in (("live", True), ("r", True), ("r", False)):
        for after in range(head + 1):
            for limit in (1, 2, 50):
                got = store.read_log(feed, live, after, limit)
                store.tail = type(tail)(0)  # the database alone
                try:
                    want = store.read_log(feed, live, after, limit)
                finally:
                    store.tail = tail
                assert [r["position"] for r in got] == [r["position"] for r in want]
                assert got == want
                compared += tail.read(feed, live, after, limit) is not None
            for upto in range(after, head + 1):
                n = store.count_between(feed, live, after, upto)
                store.tail = type(tail)(0)
                try:
                    assert n == store.count_between(feed, live, after, upto)
                finally:
                    store.tail = tail
    assert compared == 2 * 4 * 3  # every live (feed, after, limit) the run covers
    assert tail.read("r", False, run[0], 10) is None  # a non-live feed: never in the run
    assert tail.count("live", True, run[0] - 1, run[-1]) == 4
    assert tail.count("live", True, run[0] - 2, run[-1]) is None
    assert tail.read("live", True, run[0], 10) is not None  # covered: served from memory
    assert tail.read("live", True, run[0] - 2, 10) is None  # before the run: database
    assert tail.read("live", True, run[-1], 10) is None  # at its end: database
    # Archiving changes committed rows: the tail empties.
    service.archive_visit(VISIT + 4)
    assert not tail.rows


def test_transport_backlog_counts_in_a_nats_feeds_lag(service: AlertService) -> None:
    import time

    service.create_feed(FeedSpec(name="n", broker="b", transport="nats", lag_alarm_s=1.0))
    service.create_feed(FeedSpec(name="h", broker="b"))
    assert service.feed_status(service.feed("n")).lag_entries == 0
    # A new visit's backlog after a quiet spell: the broker's last ack is old, but nothing
    # has waited yet.
    long_ago = time.time() - 600
    service.set_transport_backlog("n", 10, long_ago)
    st = service.feed_status(service.feed("n"))
    assert st.lag_entries == 10
    assert st.lag_s < 1.0
    assert not st.lagging
    time.sleep(1.2)
    service.set_transport_backlog("n", 10, long_ago)  # the broker still acks nothing
    st = service.feed_status(service.feed("n"))
    assert st.lag_s >= 1.2
    assert st.lagging
    service.set_transport_backlog("n", 4, time.time())  # reading again
    assert service.feed_status(service.feed("n")).lag_s < 1.0
    service.set_transport_backlog("n", 0, time.time())
    st = service.feed_status(service.feed("n"))
    assert (st.lag_entries, st.lagging) == (0, False)
    # Only NATS feeds count it.
    service.set_transport_backlog("h", 10, long_ago)
    assert service.feed_status(service.feed("h")).lag_entries == 0


def test_framed_batches_equal_frame_of_fetch(service: AlertService) -> None:
    """The HTTP transport's batches (framed in place when they are plain live alerts) are
    exactly `formats.frame` of what `fetch` returns, for every format and entry kind."""
    service.create_feed(FeedSpec(name="full", broker="a"))
    service.create_feed(FeedSpec(name="nc", broker="a", format=FeedFormat.NO_CUTOUTS))
    service.create_feed(FeedSpec(name="note", broker="a", format=FeedFormat.NOTIFICATION))
    service.create_feed(FeedSpec(name="old", broker="a", schema_version="11.0"))
    service.ingest(packets(VISIT, 6))
    service.ingest(packets(VISIT, 5, start=6))  # two appends: two runs in the segment
    service.close_visit(VISIT)  # a manifest entry among the alerts
    service.ingest(packets(VISIT + 1, 4))
    service.replay(ReplaySpec(feed="copies", broker="a", visits=[VISIT]), actor="operator")
    feeds = ["full", "nc", "note", "old", "copies"]

    def compare() -> int:
        batches = 0
        for name in feeds:
            for after in range(service.head() + 1):
                for limit in (1, 3, 100):
                    want = service.fetch(name, after=after, max_entries=limit)
                    body, count, last = service.fetch_framed(name, after=after, max_entries=limit)
                    assert bytes(body) == formats.frame(want)
                    assert count == len(want)
                    assert last == (want[-1].position if want else None)
                    batches += bool(want)
        return batches

    assert compare() > 0
    # A batch of plain alerts was framed in place (it equals the general path's above).
    body, count, _ = service.fetch_framed("full", after=0, max_entries=6)
    assert isinstance(body, bytearray)
    assert count == 6
    # Segments pruned after archiving: the same batches, from the archive.
    service.close_visit(VISIT + 1)
    assert service.archive_closed(older_than_s=0) == 15
    for seg in service.segments.segments():
        service.segments.remove(seg)
    body, count, _ = service.fetch_framed("full", after=0, max_entries=6)
    assert count == 6
    assert not isinstance(body, bytearray)
    assert [h["alert_id"] for h, _ in formats.unframe(body)] == [
        alert_id_for(VISIT, i) for i in range(6)
    ]
    assert compare() > 0


def test_alerts_archived_by_another_process_are_still_served(
    service: AlertService, store_url: str
) -> None:
    """A second service on the same log (another `ldf serve alerts` worker) archives a visit
    and prunes its segment: this one's in-memory tail still says "hot segment", and its
    reads find the alerts in the archive."""
    service.create_feed(FeedSpec(name="full", broker="a"))
    service.ingest(packets(VISIT, 4))
    service.close_visit(VISIT)
    assert service.store.tail.rows  # this service's rows: no archive yet
    other = AlertService(AlertStore.open(store_url), service.root, service.policy)
    try:
        assert other.archive_closed(older_than_s=0) == 4
        for seg in other.segments.segments():
            other.segments.remove(seg)
    finally:
        other.close()
    assert service.store.tail.rows
    service.segments.close()  # (an open descriptor would still read the unlinked file)
    got = [d.body for d in service.fetch("full", after=0) if d.kind == "alert"]
    assert [bytes(b) for b in got] == list(packets(VISIT, 4))
    body, count, _ = service.fetch_framed("full", after=0)
    assert count == 5
    assert [b for _, b in formats.unframe(body)][:4] == list(packets(VISIT, 4))
