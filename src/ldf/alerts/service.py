"""Alert distribution: ingest, the archive, feeds and their cursors, manifests, replay, audit.

Ingest
    :meth:`AlertService.ingest` reads each packet's header and indexed fields (refusing what
    is not an alert of a supported schema), drops alertIds already stored, appends the new
    packets' bytes to the hot segment and syncs them, then indexes them and appends them to the
    log in one transaction. Only then does it return: what it acknowledged is durable. The same
    packets again are duplicates, counted and dropped.

Feeds
    A feed is a cursor over the log (:mod:`ldf.alerts.models`). :meth:`fetch` returns the
    entries after a position in the feed's format; :meth:`ack` moves the cursor. A consumer
    that keeps its own position (``ldf.alerts.client.FeedConsumer``) is presented each alert
    exactly once across restarts of either side. Feeds share nothing but the log on disk: a
    stalled one holds no buffer and blocks no other.

Lag
    :meth:`check_lag` compares each feed's oldest unacknowledged entry with its thresholds and
    reports transitions (``feedLagging`` / ``feedCaughtUp``), which the device publishes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from ldf.alerts import formats
from ldf.alerts.models import (
    Delivery,
    EntryKind,
    Feed,
    FeedFormat,
    FeedSpec,
    FeedStatus,
    IngestResult,
    Manifest,
    ReplaySpec,
    manifest_checksum,
)
from ldf.alerts.segments import ArchiveFiles, SegmentLog
from ldf.alerts.storage import AlertStore, LogRow
from ldf.config.models import AlertsPolicy, Settings
from ldf.errors import NotFoundError, StorageError, UserInputError
from ldf.pipelines.alertpacket import AlertPacketError

__all__ = ["AlertService"]

_log = logging.getLogger(__name__)

LagListener = Callable[[str, bool, FeedStatus], None]
"""Called with (feed, lagging, status) when a feed starts or stops lagging."""


class AlertService:
    """The alert distribution service over one store and one log root.

    Parameters
    ----------
    store
        The SQL store.
    root
        Directory of the hot segments and the archive.
    policy
        Alert distribution policies.
    """

    def __init__(self, store: AlertStore, root: Path, policy: AlertsPolicy | None = None) -> None:
        self.store = store
        self.root = root
        self.policy = policy or AlertsPolicy()
        self.segments = SegmentLog(root / "segments")
        self.archive = ArchiveFiles(root / "archive")
        self._head = store.head()
        self._head_read = time.monotonic()
        self._changed = threading.Condition()
        self._rates: dict[str, collections.deque[tuple[float, int]]] = {}
        self._lagging: set[str] = set()
        self._last_fetch: dict[str, float] = {}
        self._transport_backlog: dict[str, tuple[int, float | None, float, float | None]] = {}
        self.lag_listeners: list[LagListener] = []

    @classmethod
    def open(cls, settings: Settings) -> Self:
        """The service of a site configuration (store in the ``alerts`` database role)."""
        policy = settings.policies.alerts
        root = Path(policy.root) if policy.root else settings.home / "alerts"
        return cls(AlertStore.open(settings.database_url("alerts")), root, policy)

    def close(self) -> None:
        """Release the store and open files."""
        self.segments.close()
        self.store.close()

    # -- ingest ---------------------------------------------------------------------------

    def ingest(self, packets: Sequence[bytes], producer: str = "local") -> IngestResult:
        """Store alert packets (idempotent on alertId); returns once they are durable.

        Raises
        ------
        AlertPacketError
            A packet is not an alert of a supported schema (nothing of the batch is stored).
        StorageError
            The bytes could not be written (nothing is stored).
        """
        metas = []
        for i, packet in enumerate(packets):
            try:
                metas.append(formats.inspect(packet))
            except AlertPacketError as exc:
                raise AlertPacketError(f"packet {i} of {len(packets)}: {exc}") from None
        with self.segments.writer():
            seen = self.store.existing(m.alert_id for m in metas)
            new_metas, new_packets = [], []
            for meta, packet in zip(metas, packets, strict=True):
                if meta.alert_id in seen:
                    continue
                seen.add(meta.alert_id)
                new_metas.append(meta)
                new_packets.append(packet)
            positions: list[int] = []
            if new_packets:
                locations = self.segments.append(new_packets)
                positions = self.store.add_alerts(new_metas, locations, producer)
        # A visit that was closed and gets late alerts gets a new manifest revision.
        late = self.store.manifested_visits({m.visit for m in new_metas}) if new_metas else set()
        for visit in sorted(late):
            self.close_visit(visit)
        self._notify()
        return IngestResult(
            accepted=len(new_metas),
            duplicates=len(metas) - len(new_metas),
            first_position=positions[0] if positions else None,
            last_position=positions[-1] if positions else None,
        )

    def close_visit(self, visit: int) -> Manifest:
        """Publish a visit's manifest (a new revision only if its alerts changed)."""
        manifest, new = self.store.close_visit(int(visit))
        if new:
            self._notify()
        return manifest

    def ingest_outbox(self, root: Path, producer: str = "prompt") -> IngestResult:
        """Ingest every detector-visit file a producer's outbox holds, then remove them.

        The outbox is :class:`ldf.pipelines.alertpacket.LocalAlertSink`'s layout. A file is
        claimed by renaming it, ingested (idempotently) and deleted; a claimed file a crash
        left behind is ingested on the next call.
        """
        total = IngestResult(accepted=0, duplicates=0)
        if not root.is_dir():
            return total
        claimed = sorted(root.glob("*/*.alerts.claimed"))
        for path in sorted(root.glob("*/*.alerts")):
            target = path.with_name(path.name + ".claimed")
            try:
                path.replace(target)
            except FileNotFoundError:
                continue
            claimed.append(target)
        for path in claimed:
            try:
                packets = _read_sink(path)
            except (UserInputError, OSError) as exc:
                _log.error("outbox file %s unreadable, kept: %s", path, exc)
                continue
            result = self.ingest(packets, producer)
            total.accepted += result.accepted
            total.duplicates += result.duplicates
            path.unlink(missing_ok=True)
        return total

    def _notify(self) -> None:
        head = self.store.head()
        with self._changed:
            self._head = max(self._head, head)
            self._head_read = time.monotonic()
            self._changed.notify_all()

    def head(self, *, max_age_s: float = 0.1) -> int:
        """The log's last position (cached; re-read when older than ``max_age_s``, since other
        processes may write the same log)."""
        if time.monotonic() - self._head_read > max_age_s:
            self._head = max(self._head, self.store.head())
            self._head_read = time.monotonic()
        return self._head

    # -- feeds ----------------------------------------------------------------------------

    def create_feed(self, spec: FeedSpec, actor: str = "operator") -> Feed:
        """Create a feed; its cursor starts per ``spec.start``.

        Raises
        ------
        UserInputError
            An unsupported schema version or a start position beyond the log.
        StateError
            A feed of that name exists.
        """
        if spec.schema_version is not None:
            formats.schema_for_version(spec.schema_version)
        if spec.schema_version is not None and spec.format is FeedFormat.NOTIFICATION:
            raise UserInputError("a notification feed has no schema version (it is JSON)")
        head = self.store.head()
        if spec.start == "now":
            cursor = head
        elif spec.start == "earliest":
            cursor = 0
        else:
            if not 0 <= spec.start <= head:
                raise UserInputError(f"start position {spec.start} is outside the log (0..{head})")
            cursor = spec.start
        feed = self.store.create_feed(spec, cursor)
        _log.info("feed %s created for %s by %s at %d", spec.name, spec.broker, actor, cursor)
        return feed

    def feed(self, name: str) -> Feed:
        """A feed by name."""
        return self.store.feed(name)

    def feeds(self, broker: str | None = None) -> list[Feed]:
        """Every feed, or one broker's."""
        return self.store.feeds(broker)

    def delete_feed(self, name: str, actor: str = "operator") -> None:
        """Remove a feed."""
        self.store.delete_feed(name, actor)
        self._rates.pop(name, None)

    def fetch(
        self,
        name: str,
        *,
        after: int | None = None,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        feed: Feed | None = None,
    ) -> list[Delivery]:
        """The entries a feed is presented after ``after`` (default: its cursor), in order.

        At most ``max_entries`` entries and about ``max_bytes`` bytes (one entry always goes).
        ``feed``: the feed as the caller just read it (saves reading it again).
        """
        feed, rows = self._batch(name, feed, after, max_entries, max_bytes)
        return self._delivered(feed, rows)

    def fetch_framed(
        self,
        name: str,
        *,
        after: int | None = None,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        feed: Feed | None = None,
    ) -> tuple[bytes | bytearray, int, int | None]:
        """What :meth:`fetch` returns, framed for the HTTP transport (`formats.frame`): the
        body, the number of entries and the last one's position (None if none).

        A batch of live alerts in their produced form (a full-packet feed in the producer's
        schema, the common case) is framed in place: the headers are written into the
        buffer and the packets read from their segments straight after them. Joining a
        batch's copies was a fifth of the server's time holding the GIL
        (benchmarks/alerts.py, py-spy --gil).
        """
        feed, rows = self._batch(name, feed, after, max_entries, max_bytes)
        if not rows:
            return b"", 0, None
        full = FeedFormat.FULL.value
        in_place = feed.schema_version is None and all(
            r["kind"] == EntryKind.ALERT.value
            and not r["replay"]
            and (r["entry_format"] or feed.format.value) == full
            and r["segment"] is not None
            for r in rows
        )
        if in_place:
            headers = [
                formats.alert_header(r["position"], r["visit"], full, r["alert_id"], r["schema_id"])
                for r in rows
            ]
            buffer, offsets = formats.frame_layout(headers, [r["length"] for r in rows])
            view = memoryview(buffer)
            try:
                self.segments.read_into(
                    [
                        (r["segment"], r["offset"], r["length"], view[o : o + r["length"]])
                        for r, o in zip(rows, offsets, strict=True)
                    ]
                )
                self._last_fetch[name] = time.time()
                return buffer, len(rows), rows[-1]["position"]
            except StorageError:
                pass  # pruned segments: the archive, by the general path
        return formats.frame(self._delivered(feed, rows)), len(rows), rows[-1]["position"]

    def _batch(
        self,
        name: str,
        feed: Feed | None,
        after: int | None,
        max_entries: int | None,
        max_bytes: int | None,
    ) -> tuple[Feed, list[LogRow]]:
        """The feed (``feed`` if it is the one named, else read) and the log rows of its next
        batch (count and byte budgets applied; none unless the feed is active)."""
        feed = feed if feed is not None and feed.name == name else self.store.feed(name)
        if feed.state != "active":
            return feed, []
        limit = min(max_entries or self.policy.max_batch_entries, self.policy.max_batch_entries)
        budget = min(max_bytes or self.policy.max_batch_bytes, self.policy.max_batch_bytes)
        start = feed.cursor if after is None else int(after)
        rows = self.store.read_log(name, feed.live, start, limit)
        # Cut the batch at the byte budget (lengths are known before reading).
        size, keep = 0, 0
        small = feed.format is FeedFormat.NOTIFICATION
        for row in rows:
            size += 512 if small or row["entry_format"] == "notification" else row["length"] or 512
            if keep and size > budget:
                break
            keep += 1
        return feed, rows[:keep]

    def _delivered(self, feed: Feed, rows: list[LogRow]) -> list[Delivery]:
        """The deliveries of a batch's rows; a read error is counted on the feed."""
        try:
            out = self._deliveries(feed, rows)
        except StorageError as exc:
            self.store.count_error(feed.name, {"error": str(exc)}, actor="service")
            raise
        if out:
            # In memory: a database write per fetch would compete with ingest for the lock.
            self._last_fetch[feed.name] = time.time()
        return out

    def _deliveries(self, feed: Feed, rows: list[LogRow]) -> list[Delivery]:
        hot = [
            (r["segment"], r["offset"], r["length"])
            for r in rows
            if r["kind"] == EntryKind.ALERT.value
        ]
        data = iter(self._read_packets(rows, hot))
        target_id = (
            formats.schema_for_version(feed.schema_version).schema_id
            if feed.schema_version
            else None
        )
        out = []
        for r in rows:
            if r["kind"] == EntryKind.MANIFEST.value:
                out.append(
                    Delivery(
                        position=r["position"],
                        kind=EntryKind.MANIFEST.value,
                        visit=r["visit"],
                        body=json.dumps(r["body"], separators=(",", ":")).encode(),
                        format="manifest",
                        replay=bool(r["replay"]),
                    )
                )
                continue
            packet = next(data)
            fmt = FeedFormat(r["entry_format"] or feed.format)
            if fmt is FeedFormat.NOTIFICATION:
                body = formats.notification(
                    {**r, "alert_id": r["alert_id"]}, fetch_url=self.policy.fetch_url
                )
                schema_id = None
            else:
                body = formats.convert(packet, cutouts=fmt is FeedFormat.FULL, schema_id=target_id)
                schema_id = target_id or r["schema_id"]
            out.append(
                Delivery(
                    position=r["position"],
                    kind=EntryKind.ALERT.value,
                    visit=r["visit"],
                    body=body,
                    alert_id=r["alert_id"],
                    schema_id=schema_id,
                    format=fmt.value,
                    replay=bool(r["replay"]),
                )
            )
        return out

    def _read_packets(self, rows: list[LogRow], hot: list[tuple[int, int, int]]) -> list[bytes]:
        """The packets of alert rows: from hot segments, or the archive once pruned."""
        try:
            return self.segments.read(hot, views=True)
        except StorageError:
            out = []
            for r in rows:
                if r["kind"] != EntryKind.ALERT.value:
                    continue
                out.append(self._packet(r))
            return out

    def _packet(self, row: dict[str, Any]) -> bytes:
        try:
            return self.segments.read([(row["segment"], row["offset"], row["length"])])[0]
        except StorageError:
            if not row.get("archive_file") and row.get("alert_id") is not None:
                # A row read before the alert was archived (another process may archive
                # and prune): where it is now.
                row = self.store.alert_row(int(row["alert_id"]))
            if row.get("archive_file"):
                return self.archive.read(
                    row["archive_file"], row["archive_offset"], row["archive_length"]
                )
            raise

    async def wait(self, name: str, after: int, timeout_s: float, feed: Feed | None = None) -> bool:
        """Wait up to ``timeout_s`` for an entry after ``after`` that the feed is presented."""
        feed = feed if feed is not None and feed.name == name else self.store.feed(name)
        deadline = time.monotonic() + max(0.0, min(timeout_s, self.policy.max_wait_s))
        checked = after
        while True:
            head = self.head(max_age_s=0.05)
            if head > checked:
                # Something was appended; it may be addressed to other feeds only.
                if self.store.first_after(name, feed.live, after) is not None:
                    return True
                checked = head
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(0.02, remaining))

    def ack(self, name: str, position: int, feed: Feed | None = None) -> Feed:
        """Acknowledge everything a feed was presented up to ``position``.

        An older position than the cursor changes nothing (acks are monotonic). ``feed``:
        the feed as the caller just read it (saves reading it again).

        Raises
        ------
        UserInputError
            ``position`` is beyond the feed's last entry.
        """
        feed = feed if feed is not None and feed.name == name else self.store.feed(name)
        # A live feed is presented every position: the cached head settles most acks
        # without a query (it only grows; past it, the database decides).
        if not (feed.live and position <= self._head):
            head = self.store.feed_head(name, feed.live)
            if position > head:
                raise UserInputError(
                    f"cannot acknowledge position {position} of feed {name!r}: "
                    f"its last entry is {head}"
                )
        if position <= feed.cursor:
            return feed
        count = self.store.count_between(name, feed.live, feed.cursor, position)
        old, new = self.store.ack(name, position, count)
        now = time.time()
        rate = self._rates.setdefault(name, collections.deque(maxlen=4096))
        rate.append((now, count))
        if old != feed.cursor:  # another ack moved it meanwhile: read what it is now
            return self.store.feed(name)
        return feed.model_copy(
            update={"cursor": new, "delivered": feed.delivered + count, "last_ack_unix": now}
        )

    # -- replay ---------------------------------------------------------------------------

    def replay(self, spec: ReplaySpec, actor: str) -> dict[str, Any]:
        """Re-send a selection of stored alerts into a feed (created, not live, if new).

        The copies follow in log order, then the manifest of each visit they belong to (what
        this replay sent of it).

        Raises
        ------
        UserInputError
            The target feed belongs to another broker.
        """
        try:
            feed = self.store.feed(spec.feed)
            if feed.broker != (spec.broker or actor) and actor != "operator":
                raise UserInputError(f"feed {spec.feed!r} belongs to another broker")
        except NotFoundError:
            feed = self.create_feed(
                FeedSpec(
                    name=spec.feed, broker=spec.broker or actor, format=spec.format, live=False,
                    start="now",
                ),
                actor,
            )  # fmt: skip
        ids = self.store.alert_ids(
            since_unix=spec.since_unix,
            until_unix=spec.until_unix,
            alert_id_min=spec.alert_id_min,
            alert_id_max=spec.alert_id_max,
            visits=spec.visits,
        )
        sent = 0
        for i in range(0, len(ids), 5000):
            sent += self.store.add_copies(feed.name, ids[i : i + 5000], replay=True)
        by_visit: dict[int, list[int]] = collections.defaultdict(list)
        for alert_id, visit in self.store.alert_visits(ids).items():
            by_visit[visit].append(alert_id)
        for visit, vids in sorted(by_visit.items()):
            self.store.add_feed_manifest(
                feed.name,
                Manifest(
                    visit=visit, count=len(vids), checksum=manifest_checksum(vids),
                    closed_unix=time.time(), feed=feed.name,
                ),
                replay=True,
            )  # fmt: skip
        self.store.audit(
            "replay", actor, feed.name, selection=spec.model_dump(mode="json"), alerts=sent
        )
        self._notify()
        return {"feed": feed.name, "alerts": sent, "visits": sorted(by_visit)}

    # -- the archive ----------------------------------------------------------------------

    def get_alert(self, alert_id: int) -> bytes:
        """One stored alert, as produced (wire format).

        Raises
        ------
        NotFoundError
            No such alert.
        """
        return self._packet(self.store.alert_row(int(alert_id)))

    def alert_info(self, alert_id: int) -> dict[str, Any]:
        """The indexed fields of one alert."""
        row = self.store.alert_row(int(alert_id))
        return {k: v for k, v in row.items() if k not in {"segment", "offset", "length"}}

    def archive_visit(self, visit: int) -> int:
        """Gzip a visit's alerts into the archive; how many were archived now."""
        rows = self.store.unarchived(visit)
        if not rows:
            return 0
        packets = self.segments.read([(r["segment"], r["offset"], r["length"]) for r in rows])
        locations = self.archive.append(visit, packets)
        self.store.set_archived(
            [(r["alert_id"], *loc) for r, loc in zip(rows, locations, strict=True)]
        )
        return len(rows)

    def archive_closed(self, *, older_than_s: float | None = None) -> int:
        """Archive every closed visit whose manifest is older than the policy's delay."""
        delay = self.policy.archive_delay_s if older_than_s is None else older_than_s
        done = 0
        now = time.time()
        for visit in self.store.visits_to_archive():
            if now - self.store.manifest(visit).closed_unix >= delay:
                done += self.archive_visit(visit)
        return done

    # -- status and lag -------------------------------------------------------------------

    def set_transport_backlog(self, name: str, entries: int, last_ack_unix: float | None) -> None:
        """What a feed's transport holds that its broker has not acknowledged (NATS: the
        consumer's pending and unacknowledged messages) and when the broker last acknowledged
        something there; counted in the feed's lag (set by the NATS publisher)."""
        now = time.time()
        before = self._transport_backlog.get(name)
        # Since when entries have been waiting: a backlog that just appeared (a new visit
        # after a quiet spell) is not a lag of the time since the broker's last ack.
        waiting = None if entries <= 0 else (before[3] if before and before[3] else now)
        self._transport_backlog[name] = (entries, last_ack_unix, now, waiting)

    def feed_status(self, feed: Feed, head: int | None = None) -> FeedStatus:
        """The audit figures of one feed.

        For a NATS feed the lag adds what JetStream holds for the broker (as last reported
        by the publisher) to what the service has not yet published.
        """
        if head is None or not feed.live:
            head = self.store.feed_head(feed.name, feed.live)
        first = self.store.first_after(feed.name, feed.live, feed.cursor)
        now = time.time()
        lag_s = 0.0 if first is None else max(0.0, now - first[1])
        backlog = 0 if first is None else self.store.feed_backlog(feed.name, feed.live, feed.cursor)
        held = self._transport_backlog.get(feed.name)
        if held is not None and feed.transport == "nats" and held[0] > 0:
            entries, last_ack, reported, waiting = held
            backlog += entries
            # Waiting since the backlog appeared or the broker last acknowledged, whichever
            # is later (a broker reading steadily has a small lag; a stalled one a growing one).
            since = max(last_ack or 0.0, waiting or now)
            if now - reported < 60.0:  # a report that old says nothing any more
                lag_s = max(lag_s, now - since)
        samples = self._rates.get(feed.name, ())
        recent = [(t, n) for t, n in samples if now - t <= 60.0]
        rate = 0.0
        if recent:
            span = max(1.0, now - recent[0][0])
            rate = sum(n for _, n in recent) / span
        lagging = lag_s > feed.lag_alarm_s or backlog > feed.lag_alarm_entries
        return FeedStatus(
            name=feed.name,
            broker=feed.broker,
            format=feed.format,
            transport=feed.transport,
            live=feed.live,
            cursor=feed.cursor,
            head=head,
            lag_entries=backlog,
            lag_s=round(lag_s, 3),
            delivered=feed.delivered,
            rate_per_s=round(rate, 1),
            last_ack_unix=feed.last_ack_unix,
            last_fetch_unix=self._last_fetch.get(feed.name, feed.last_fetch_unix),
            errors=feed.errors,
            lagging=lagging,
        )

    def status(self, broker: str | None = None) -> dict[str, Any]:
        """The service's figures: stored counts, the head, and every (or one broker's) feed."""
        head = self.store.head()
        return {
            "head": head,
            "store": self.store.counts(),
            "feeds": [
                self.feed_status(f, head).model_dump(mode="json") for f in self.feeds(broker)
            ],
        }

    def check_lag(self) -> list[tuple[str, bool, FeedStatus]]:
        """Feeds that started or stopped lagging since the last check (and tell listeners)."""
        changes = []
        head = self.store.head()
        for feed in self.feeds():
            st = self.feed_status(feed, head)
            was = feed.name in self._lagging
            if st.lagging and not was:
                self._lagging.add(feed.name)
                self.store.audit(
                    "lagging", "service", feed.name, lag_s=st.lag_s, lag_entries=st.lag_entries
                )
                changes.append((feed.name, True, st))
            elif was and not st.lagging:
                self._lagging.discard(feed.name)
                self.store.audit("caught_up", "service", feed.name, lag_s=st.lag_s)
                changes.append((feed.name, False, st))
        for name, lagging, st in changes:
            for listener in self.lag_listeners:
                try:
                    listener(name, lagging, st)
                except Exception:  # a listener's failure must not stop the checks
                    _log.exception("lag listener failed")
        return changes

    def run_background(self, stop: threading.Event) -> None:
        """Lag checks and archiving until ``stop`` is set (a thread's target)."""
        next_archive = 0.0
        while not stop.wait(self.policy.lag_check_s):
            try:
                self.check_lag()
                if time.monotonic() >= next_archive:
                    self.archive_closed()
                    next_archive = time.monotonic() + max(
                        self.policy.lag_check_s, min(30.0, self.policy.archive_delay_s / 4)
                    )
            except Exception:
                _log.exception("alert service background work failed; retrying")


def _read_sink(path: Path) -> list[bytes]:
    """The packets of one LocalAlertSink file (by path)."""
    data = path.read_bytes()
    if data[:8] != b"LDFALRT1":
        raise UserInputError(f"{path} is not an alert outbox file")
    (count,) = struct.unpack_from(">I", data, 8)
    pos, out = 12, []
    for _ in range(count):
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        out.append(data[pos : pos + n])
        pos += n
    if len(out) != count or pos != len(data):
        raise UserInputError(f"{path} is truncated")
    return out
