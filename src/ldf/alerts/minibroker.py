"""The mini-broker (LDM-230 4.3; LSE-61 DMS-REQ-0342, DMS-REQ-0343): users' own alert streams.

Filters
    An authenticated user (role ``user``) registers named filters in the safe expression
    language of :mod:`ldf.expr` over an alert's fields (``diaSource.snr > 10 and band in
    ('g','r')``). Each is parsed and checked against the fields of the alert schema before it
    is stored; a bad one is refused with the expression and a caret under the offending token.
    Each filter gets a non-live feed, ``user-<user>-<filter>``, owned by the user: the user
    reads it with the feed endpoints every broker uses.

Matcher
    :meth:`MiniBroker.run_once` reads the log's entries addressed to everyone after its own
    durable cursor, decodes each alert once, evaluates every active filter and appends the
    matches to the filters' feeds as copies. Copies, per-visit counts and the cursor are
    written in one transaction, which also checks that the cursor is still where the batch
    started: after a kill -9 the batch is redone from the stored cursor, and a second matcher
    never appends a batch twice. So each user gets each match exactly once.

Limits (LSE-61)
    At most :data:`MAX_USERS` users (100) have active filters at once; the 101st is refused.
    Per user and visit, the first :data:`FULL_PER_VISIT` matches (20, across the user's
    filters, counted per copy) are delivered as full alerts, the rest as notifications (a
    small JSON record with the URL of the full packet). The counts are stored with the copies,
    so they survive restarts.

Manifests
    When the matcher passes a visit's manifest it appends a manifest to every active filter's
    feed (registered before the visit closed), even when nothing matched: count and checksum
    of what that feed got of the visit, so a user can tell "nothing matched" from "not done
    yet" and prove it has everything.

Fields, decoding and the store are in :mod:`ldf.alerts.filters`. ``workers`` spreads the
decoding and matching of each pass over processes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ldf import expr
from ldf.alerts.auth import Principal, Role
from ldf.alerts.filters import (
    MAX_EXPRESSION_CHARS,
    FeedManifestEntry,
    Filter,
    FilterLimitError,
    FilterSpec,
    Found,
    MatchBatch,
    MatchCopy,
    MiniBrokerStore,
    check_name,
    feed_name,
    filter_fields,
    match_packets,
)
from ldf.alerts.handlers import PREFIX, Who, _HttpError
from ldf.alerts.models import EntryKind, FeedFormat, FeedSpec, Manifest, manifest_checksum
from ldf.errors import NotFoundError, StateError, StorageError, UserInputError

if TYPE_CHECKING:
    from ldf.alerts.service import AlertService

__all__ = [
    "FULL_PER_VISIT",
    "MAX_FILTERS_PER_USER",
    "MAX_USERS",
    "Filter",
    "FilterLimitError",
    "FilterSpec",
    "MatchReport",
    "MiniBroker",
    "router",
]

_log = logging.getLogger(__name__)

MAX_USERS = 100
"""Users with active filters at once (LSE-61 DMS-REQ-0343: at least 100 simultaneous users)."""

FULL_PER_VISIT = 20
"""Full alerts per user per visit (LSE-61 DMS-REQ-0343); further matches are notifications."""

MAX_FILTERS_PER_USER = 10
"""Active filters one user may have (LSE-61 sets none; this bounds the matcher's work)."""

USER_LAG_ALARM_S = 86_400.0
"""Lag alarm of a user's feed: users read when they like; an alarm after a day, not a minute."""

MATCHER = "minibroker"
"""Name of the matcher's cursor row."""


IDLE_COMMIT_S = 5.0
"""With no active filter, how often the matcher's cursor is moved to the log's head."""


@dataclass(slots=True)
class MatchReport:
    """What one pass of the matcher did."""

    entries: int = 0
    """Public log entries read."""
    alerts: int = 0
    """Alerts decoded and matched."""
    copies: int = 0
    """Copies appended to users' feeds."""
    full: int = 0
    """Of which full alerts (the rest are notifications)."""
    manifests: int = 0
    """Per-feed manifests appended."""
    errors: int = 0
    """Alerts skipped because they did not decode."""
    cursor: int = 0
    """The matcher's cursor after the pass."""
    conflict: bool = False
    """Another matcher moved the cursor first: nothing was written."""


# -- the service ----------------------------------------------------------------------------


class MiniBroker:
    """Users' filters and the matcher, over one alert service.

    Parameters
    ----------
    service
        The alert service (its store's database holds the filters; its log the streams).
    max_users
        Users with active filters at once.
    full_per_visit
        Full alerts per user per visit; further matches are notifications.
    max_filters_per_user
        Active filters one user may have.
    batch_entries
        Log entries one matcher pass reads (each alert's packet is held in memory).
    workers
        Processes that decode and match a pass's alerts in parallel (0 or 1: this process).
    name
        The matcher's cursor (one per mini-broker; two processes running it are safe).
    """

    def __init__(
        self,
        service: AlertService,
        *,
        max_users: int = MAX_USERS,
        full_per_visit: int = FULL_PER_VISIT,
        max_filters_per_user: int = MAX_FILTERS_PER_USER,
        batch_entries: int = 500,
        workers: int = 0,
        name: str = MATCHER,
    ) -> None:
        self.service = service
        self.store = MiniBrokerStore(service.store.engine, service.store.read_engine)
        self.max_users = max_users
        self.full_per_visit = full_per_visit
        self.max_filters_per_user = max_filters_per_user
        self.batch_entries = batch_entries
        self.workers = workers
        self.name = name
        self._executor: ProcessPoolExecutor | None = None
        self._idle_commit = -IDLE_COMMIT_S

    # -- filters --------------------------------------------------------------------------

    @staticmethod
    def validate(expression: str) -> expr.Expression:
        """Parse and check a filter expression.

        Raises
        ------
        UserInputError
            It does not parse or names an unknown field: the message shows the expression
            with a caret under the offending token.
        """
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise UserInputError(
                f"filter expression is {len(expression)} characters; at most {MAX_EXPRESSION_CHARS}"
            )
        return expr.parse(expression, fields=filter_fields())

    def register(self, user: str, name: str, expression: str) -> Filter:
        """Register a user's filter and create its feed (``user-<user>-<name>``, not live).

        The filter matches the log entries after the moment it is registered.

        Raises
        ------
        UserInputError
            A bad name or expression (the message points at the offending token).
        StateError
            The user has a filter of that name, or the feed name is another party's feed.
        FilterLimitError
            :data:`MAX_USERS` other users have filters, or the user has the most it may have.
        """
        check_name(name)
        feed = feed_name(user, name)
        self.validate(expression)
        if self.store.active_filter(user, name) is not None:
            raise StateError(f"{user} has a filter {name!r}; delete it first to replace it")
        self.store.matcher_cursor(self.name)
        try:
            existing = self.service.feed(feed)
        except NotFoundError:
            existing = None
        if existing is not None:
            if existing.broker != user or existing.live:
                raise StateError(f"feed {feed!r} belongs to {existing.broker}; choose another name")
            # Left by a crash between creating a feed and storing its filter: start afresh.
            self.service.delete_feed(feed, actor=user)
        self.service.create_feed(
            FeedSpec(
                name=feed, broker=user, format=FeedFormat.FULL, live=False, start="now",
                lag_alarm_s=USER_LAG_ALARM_S,
                description=f"mini-broker filter {name!r} of {user}: {expression}"[:500],
            ),
            actor=user,
        )  # fmt: skip
        try:
            flt = self.store.add_filter(
                user, name, expression, feed,
                max_users=self.max_users, max_filters=self.max_filters_per_user,
            )  # fmt: skip
        except BaseException:
            self.service.delete_feed(feed, actor=user)
            raise
        self.store.audit("filter_registered", user, feed, name=name, expression=expression)
        _log.info("mini-broker: %s registered %s: %s", user, name, expression)
        return flt

    def filters(self, user: str | None = None) -> list[Filter]:
        """Active filters, of everyone or of one user."""
        return self.store.filters(user)

    def filter(self, user: str, name: str) -> Filter:
        """A user's active filter.

        Raises
        ------
        NotFoundError
            No such filter.
        """
        found = self.store.active_filter(user, name)
        if found is None:
            raise NotFoundError(f"{user} has no filter {name!r}")
        return found

    def delete(self, user: str, name: str) -> Filter:
        """Stop a filter and remove its feed (the filter stays in the audit, inactive).

        Raises
        ------
        NotFoundError
            The user has no filter of that name.
        """
        flt = self.store.deactivate_filter(user, name)
        with contextlib.suppress(NotFoundError):  # the user may have removed the feed itself
            self.service.delete_feed(flt.feed, actor=user)
        self.store.audit("filter_deleted", user, flt.feed, name=name)
        return flt

    def users(self) -> list[str]:
        """Users with active filters."""
        return sorted({f.user for f in self.store.filters()})

    def usage(self, user: str, visit: int) -> dict[str, Any]:
        """What a user got of a visit: per filter, matches and full alerts; the total full."""
        per = self.store.filter_visits(user, visit)
        return {
            "user": user,
            "visit": visit,
            "full": sum(p["full"] for p in per),
            "full_limit": self.full_per_visit,
            "filters": per,
        }

    def status(self) -> dict[str, Any]:
        """The matcher's figures: cursor, backlog, users, filters, totals."""
        row = self.store.matcher_row(self.name)
        filters = self.store.filters()
        return {
            **row,
            "head": self.store.head(),
            "backlog": self.store.public_backlog(row["cursor"]),
            "users": len({f.user for f in filters}),
            "max_users": self.max_users,
            "filters": len(filters),
        }

    # -- the matcher ----------------------------------------------------------------------

    def run_once(self, max_entries: int | None = None) -> MatchReport:
        """Match the next batch of the log's public entries against every active filter.

        Raises
        ------
        StorageError
            An alert's bytes could not be read (nothing is written; the next pass retries).
        """
        expected = self.store.matcher_cursor(self.name)
        # The head is read before the filters: a filter registered after this read matches
        # only entries after its own (later) head, so moving the cursor here skips nothing.
        head = self.service.head()
        filters = self.store.filters()
        if not filters:
            # Nothing to match: move the cursor to the head now and then (a filter only
            # matches what comes after it is registered), not a write per batch, which
            # would compete with ingest for the log's lock.
            now = time.monotonic()
            if now - self._idle_commit < IDLE_COMMIT_S:
                return MatchReport(cursor=expected)
            self._idle_commit = now
            if head > expected:
                self.store.commit_batch(self.name, expected, head, MatchBatch())
            return MatchReport(cursor=max(head, expected))
        rows = self.store.public_entries(expected, max_entries or self.batch_entries)
        if not rows:
            return MatchReport(cursor=expected)
        texts = tuple(sorted({f.expression for f in filters}))
        alerts = [r for r in rows if r["kind"] == EntryKind.ALERT.value]
        batch = MatchBatch(alerts=len(alerts))
        hits: dict[int, list[int]] = {}
        if texts and alerts:
            packets = self._packets(alerts)
            where = [r["position"] for r in alerts]
            found = self._match(texts, list(zip(where, packets, strict=True)))
            for r, (_pos, result) in zip(alerts, found, strict=True):
                if isinstance(result, str):
                    batch.errors += 1
                    _log.error("mini-broker: alert %s skipped: %s", r["alert_id"], result)
                else:
                    hits[r["position"]] = result
        batch.items = self._plan(rows, hits, texts, filters)
        new_cursor = rows[-1]["position"]
        if not self.store.commit_batch(self.name, expected, new_cursor, batch):
            _log.warning("mini-broker: another matcher moved the cursor; batch dropped")
            return MatchReport(cursor=self.store.matcher_cursor(self.name), conflict=True)
        copies = [i for i in batch.items if isinstance(i, MatchCopy)]
        return MatchReport(
            entries=len(rows),
            alerts=batch.alerts,
            copies=len(copies),
            full=sum(1 for c in copies if c.format == FeedFormat.FULL.value),
            manifests=len(batch.items) - len(copies),
            errors=batch.errors,
            cursor=new_cursor,
        )

    def _packets(self, rows: Sequence[dict[str, Any]]) -> list[bytes]:
        """The packets of alert rows: from hot segments, else the archive."""
        try:
            return self.service.segments.read(
                [(r["segment"], r["offset"], r["length"]) for r in rows]
            )
        except StorageError:
            return [self.service.get_alert(r["alert_id"]) for r in rows]

    def _match(self, texts: tuple[str, ...], packets: list[tuple[int, bytes]]) -> Found:
        """:func:`match_packets` here, or split over the worker processes."""
        if self.workers <= 1 or len(packets) < 2 * self.workers:
            return match_packets(texts, packets)
        if self._executor is None:
            # forkserver: safe beside the threads of a web app, and the workers are forked
            # from one process that imported the matching code once.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["ldf.alerts.filters"])
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
        size = -(-len(packets) // self.workers)
        chunks = [packets[i : i + size] for i in range(0, len(packets), size)]
        try:
            parts = list(self._executor.map(match_packets, [texts] * len(chunks), chunks))
        except BrokenProcessPool:
            self._executor = None  # a worker died: a new pool next pass
            raise
        return [hit for part in parts for hit in part]

    def _plan(
        self,
        rows: list[dict[str, Any]],
        hits: dict[int, list[int]],
        texts: tuple[str, ...],
        filters: list[Filter],
    ) -> list[MatchCopy | FeedManifestEntry]:
        """The entries to append, in log order: copies with their formats, and manifests."""
        by_text: dict[str, list[Filter]] = defaultdict(list)
        for f in filters:
            by_text[f.expression].append(f)
        matched = {
            pos: [f for i in found for f in by_text[texts[i]] if pos > f.since_position]
            for pos, found in hits.items()
        }
        visit_of = {r["position"]: r["visit"] for r in rows}
        full = self.store.full_counts(
            {f.user for fs in matched.values() for f in fs},
            {visit_of[pos] for pos, fs in matched.items() if fs},
        )
        closing = [
            (f.id, f.feed, r["visit"])
            for r in rows
            if r["kind"] == EntryKind.MANIFEST.value
            for f in filters
            if r["position"] > f.since_position
        ]
        before = self.store.feed_visit_ids(closing) if closing else {}
        pending: dict[tuple[int, int], list[int]] = defaultdict(list)
        items: list[MatchCopy | FeedManifestEntry] = []
        for r in rows:
            visit = r["visit"]
            if r["kind"] == EntryKind.ALERT.value:
                for f in matched.get(r["position"], ()):
                    n = full.get((f.user, visit), 0)
                    fmt = FeedFormat.FULL if n < self.full_per_visit else FeedFormat.NOTIFICATION
                    full[(f.user, visit)] = n + 1
                    items.append(MatchCopy(f, r["alert_id"], visit, fmt.value))
                    pending[(f.id, visit)].append(r["alert_id"])
                continue
            revision = int((r["body"] or {}).get("revision", 1))
            for f in filters:
                if r["position"] <= f.since_position:
                    continue
                ids = before.get((f.id, visit), []) + pending.get((f.id, visit), [])
                manifest = Manifest(
                    visit=visit, count=len(set(ids)), checksum=manifest_checksum(ids),
                    revision=revision, closed_unix=time.time(), feed=f.feed,
                )  # fmt: skip
                items.append(FeedManifestEntry(f, manifest))
        return items

    def run(self, stop: threading.Event, *, idle_s: float = 0.2) -> None:
        """Match until ``stop`` is set (a thread's target); errors are logged and retried."""
        try:
            while not stop.is_set():
                try:
                    report = self.run_once()
                except Exception:
                    _log.exception("mini-broker matcher failed; retrying")
                    stop.wait(5.0)
                    continue
                if report.entries == 0:
                    stop.wait(idle_s)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker processes (the store belongs to the service)."""
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None


# -- HTTP -----------------------------------------------------------------------------------


def router(broker: MiniBroker) -> APIRouter:
    """The mini-broker's routes, for the alert distribution app (``app.include_router``).

    ==========================================  =============================================
    ``POST   /alerts/v1/filters``               ``{name, expression}``: register (201)
    ``GET    /alerts/v1/filters``               the caller's filters (operators: everyone's)
    ``GET    /alerts/v1/filters/{name}``        one filter
    ``DELETE /alerts/v1/filters/{name}``        stop it and remove its feed (204)
    ==========================================  =============================================

    Users (role ``user``) and operators only; an operator acts for ``user`` (body or query).
    A bad expression is a 400 whose message shows the expression with a caret under the
    offending token. The matches are read from the filter's feed with the feed routes.
    """
    api = APIRouter(prefix=f"{PREFIX}/filters", tags=["mini-broker"])

    def acting(who: Principal, user: str | None) -> str:
        if who.role not in (Role.USER, Role.OPERATOR):
            raise _HttpError(
                403, "forbidden", f"{who.name} ({who.role}) may not do this; needs user"
            )
        if user is not None and user != who.name and who.role is not Role.OPERATOR:
            raise _HttpError(403, "forbidden", f"{who.name} may manage only its own filters")
        return user or who.name

    @api.post("", status_code=201, response_model=None)
    def register(spec: FilterSpec, who: Who) -> dict[str, Any] | JSONResponse:
        user = acting(who, spec.user)
        try:
            flt = broker.register(user, spec.name, spec.expression)
        except UserInputError as exc:
            # The whole message: its second and third lines are the expression and the caret.
            return JSONResponse({"error": {"code": exc.code, "message": str(exc)}}, status_code=400)
        return flt.model_dump()

    @api.get("")
    def filters(who: Who, user: str | None = None) -> list[dict[str, Any]]:
        if who.role is Role.OPERATOR and user is None:
            return [f.model_dump() for f in broker.filters()]
        return [f.model_dump() for f in broker.filters(acting(who, user))]

    @api.get("/{name}")
    def one(name: str, who: Who, user: str | None = None) -> dict[str, Any]:
        return broker.filter(acting(who, user), name).model_dump()

    @api.delete("/{name}", status_code=204)
    def delete(name: str, who: Who, user: str | None = None) -> Response:
        broker.delete(acting(who, user), name)
        return Response(status_code=204)

    return api
