"""Mini-broker filters: the fields they read, matching (each alert decoded once), their store.

Fields
    A filter reads the alert record as decoded: ``diaSource.*``, ``diaObject.*``,
    ``ssSource.*``, ``mpc_orbits.*`` (scalar fields of the latest alert schema), the alert's
    own scalars (``diaSourceId``, ``observation_reason``, ``target_name``), the records
    themselves (``ssSource is not null``) and the shortcuts of :data:`ALIASES` (``band``,
    ``snr``, ``ra``…, taken from the triggering DiaSource). Missing and null values follow
    :mod:`ldf.expr` (a comparison with one is false; ``is null`` tests for it).

Decoding once, only as far as needed
    :func:`match_packets` reads each alert record only up to the last top-level field an
    active filter reads (Avro writes fields in order, so a schema of the first fields reads a
    prefix): filters on the triggering DiaSource (the usual case) decode the packet's head,
    ~10 times faster than decoding it whole; a filter on ``diaObject`` decodes through the
    DiaSource history, which the schema puts first. Cutouts are never decoded.

Store
    :class:`MiniBrokerStore` keeps the filters (``alerts_filter``), what each filter's feed got
    of each visit (``alerts_filter_visit``: the per-user, per-visit limit counts these) and the
    matcher's cursor (``alerts_matcher``), on the alert store's database: it appends copies to
    the same log, under the same lock, in the same transaction as the counts and the cursor.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import fastavro
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ldf import expr
from ldf.alerts import formats
from ldf.alerts.models import EntryKind, FeedFormat, Manifest
from ldf.alerts.schema import SQLAlert, SQLFilter, SQLFilterVisit, SQLLog, SQLMatcher
from ldf.alerts.storage import AlertStore
from ldf.errors import NotFoundError, StateError, UserInputError
from ldf.pipelines.alertpacket import WIRE_HEADER, AlertPacketError, AlertSchema

__all__ = [
    "ALIASES",
    "FILTER_NAME_PATTERN",
    "MAX_EXPRESSION_CHARS",
    "FeedManifestEntry",
    "Filter",
    "FilterLimitError",
    "FilterSpec",
    "Found",
    "MatchBatch",
    "MatchCopy",
    "MiniBrokerStore",
    "check_name",
    "decode_for_match",
    "feed_name",
    "filter_fields",
    "match_packets",
]

_log = logging.getLogger(__name__)

MAX_EXPRESSION_CHARS = 2000
"""Longest filter expression accepted."""

FILTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_]{0,31}$"
"""Filter names: no '-', so ``user-<user>-<name>`` names one filter of one user."""

_FILTER_NAME = re.compile(FILTER_NAME_PATTERN)

_FILTER_LOCK = 0x4C44_4646_494C_5431 & 0x7FFF_FFFF_FFFF_FFFF
"""PostgreSQL advisory lock key of filter registrations ('LDFFILT1')."""

ALIASES: dict[str, str] = {
    "alertId": "diaSourceId",
    "visit": "diaSource.visit",
    "detector": "diaSource.detector",
    "band": "diaSource.band",
    "ra": "diaSource.ra",
    "dec": "diaSource.dec",
    "mjd": "diaSource.midpointMjdTai",
    "snr": "diaSource.snr",
    "psfFlux": "diaSource.psfFlux",
    "psfFluxErr": "diaSource.psfFluxErr",
    "reliability": "diaSource.reliability",
    "diaObjectId": "diaSource.diaObjectId",
    "ssObjectId": "diaSource.ssObjectId",
}
"""Top-level shortcuts a filter may use, and the field each stands for."""

_RECORDS = ("diaSource", "diaObject", "ssSource", "mpc_orbits")
"""The alert's records whose scalar fields a filter may read."""

_SCALARS = {"long", "int", "float", "double", "boolean", "string"}


class FilterLimitError(StateError):
    """A limit of the mini-broker is reached (users, filters per user)."""

    code = "limit_reached"


# -- models ---------------------------------------------------------------------------------


class FilterSpec(BaseModel):
    """A filter as a user registers it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Filter name: 1-32 letters, digits or '_'.")
    expression: str = Field(description="The condition, e.g. \"snr > 10 and band in ('g','r')\".")
    user: str | None = Field(
        default=None, description="Operators only: the user to register it for."
    )


class Filter(BaseModel):
    """A registered filter."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    user: str
    name: str
    expression: str
    feed: str = Field(description="The feed its matches go to (read it as a broker would).")
    created_unix: float
    since_position: int = Field(description="It matches log entries after this position.")
    active: bool


# -- fields and decoding --------------------------------------------------------------------


@lru_cache(maxsize=4)
def _fields_of(schema: AlertSchema) -> frozenset[str]:
    names: set[str] = set(ALIASES)
    for f in schema.field_types("alert"):
        if f.kind in _SCALARS:
            names.add(f.name)
    for record in _RECORDS:
        names.add(record)  # e.g. ``ssSource is not null``
        try:
            fields = schema.field_types(record)
        except AlertPacketError:  # pragma: no cover - every supported schema has them
            continue
        names.update(f"{record}.{f.name}" for f in fields if f.kind in _SCALARS)
    return frozenset(names)


def filter_fields() -> frozenset[str]:
    """The field names a filter may use (from the latest alert schema, plus the aliases)."""
    return _fields_of(AlertSchema.latest())


def _top_level(names: Iterable[str]) -> frozenset[str]:
    """The alert record's top-level fields a set of filter fields reads."""
    out: set[str] = set()
    for name in names:
        if name in ALIASES:
            name = ALIASES[name]
        out.add(name.split(".", 1)[0])
    return frozenset(out)


def _plain(parsed: Any) -> Any:
    """A fastavro-parsed schema without fastavro's private keys."""
    if isinstance(parsed, dict):
        return {k: _plain(v) for k, v in parsed.items() if not k.startswith("__")}
    if isinstance(parsed, list):
        return [_plain(v) for v in parsed]
    return parsed


@lru_cache(maxsize=32)
def _prefix(schema_id: int, top: frozenset[str]) -> Any:
    """The schema of the alert record's first fields, through the last of ``top``; None: all.

    Avro writes a record's fields in order with nothing in between, so a record schema of the
    first *n* fields reads exactly those from the start of the body.

    Raises
    ------
    AlertPacketError
        Not a supported schema.
    """
    schema = formats.schema_for_id(schema_id)
    order = [f["name"] for f in schema.parsed["fields"]]
    count = max((order.index(n) + 1 for n in top if n in order), default=1)
    if count == len(order):
        return None
    definition = _plain(schema.parsed)
    return fastavro.parse_schema(dict(definition, fields=definition["fields"][:count]))


def decode_for_match(packet: bytes, top: frozenset[str]) -> dict[str, Any]:
    """The alert record as filters see it: decoded up to the last field in ``top``, aliases added.

    Raises
    ------
    AlertPacketError
        Not an alert packet of a supported schema, or a corrupt one.
    """
    if len(packet) < WIRE_HEADER.size or packet[0] != 0:
        return _with_aliases(formats.decode(packet)[1])  # raises the precise error
    prefix = _prefix(WIRE_HEADER.unpack_from(packet)[1], top)
    if prefix is None:
        return _with_aliases(formats.decode(packet)[1])
    try:
        raw = fastavro.schemaless_reader(
            io.BytesIO(memoryview(packet)[WIRE_HEADER.size :]), prefix, None
        )
    except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise AlertPacketError(f"corrupt alert body: {exc}") from exc
    if not isinstance(raw, dict):  # pragma: no cover - a record schema reads a dict
        raise AlertPacketError("corrupt alert body: not a record")
    record: dict[str, Any] = raw
    return _with_aliases(record)


def _with_aliases(record: dict[str, Any]) -> dict[str, Any]:
    src = record.get("diaSource") or {}
    for alias, target in ALIASES.items():
        if "." in target:
            record[alias] = src.get(target.split(".", 1)[1])
        else:
            record[alias] = record.get(target)
    return record


def check_name(name: str) -> str:
    """A filter name, checked.

    Raises
    ------
    UserInputError
        Not 1-32 letters, digits or '_' starting with a letter or digit.
    """
    if not _FILTER_NAME.match(name):
        raise UserInputError(
            f"filter name {name!r} must be 1-32 letters, digits or '_', starting with a letter "
            "or digit"
        )
    return name


def feed_name(user: str, name: str) -> str:
    """The feed of a user's filter.

    Raises
    ------
    UserInputError
        The name would be longer than a feed name may be (64 characters).
    """
    feed = f"user-{user}-{name}"
    if len(feed) > 64:
        raise UserInputError(
            f"filter name {name!r} is too long for user {user!r}: the feed name {feed!r} must "
            "be at most 64 characters"
        )
    return feed


# -- matching -------------------------------------------------------------------------------


Found = list[tuple[int, list[int] | str]]
"""Per alert (position): the indices of the expressions it matches, or why it did not decode."""


@lru_cache(maxsize=8)
def _compiled(texts: tuple[str, ...]) -> tuple[list[expr.Expression | None], frozenset[str]]:
    """Expressions (None: does not parse) and the top-level fields they read, together.

    Parsed without the field check: a field a newer schema dropped reads as missing (null).
    """
    out: list[expr.Expression | None] = []
    for t in texts:
        try:
            out.append(expr.parse(t))
        except UserInputError as exc:  # pragma: no cover - checked at registration
            _log.error("mini-broker: filter %r skipped: %s", t, exc)
            out.append(None)
    return out, _top_level(f for e in out if e is not None for f in e.fields)


def match_packets(texts: tuple[str, ...], packets: Sequence[tuple[int, bytes]]) -> Found:
    """Which expressions each packet matches, decoding each once (a worker process's task).

    Parameters
    ----------
    texts
        The distinct filter expressions.
    packets
        (position, packet) of each alert.
    """
    expressions, top = _compiled(texts)
    out: Found = []
    for position, packet in packets:
        try:
            record = decode_for_match(packet, top)
        except AlertPacketError as exc:
            out.append((position, str(exc)))
            continue
        hits = [i for i, e in enumerate(expressions) if e is not None and e.matches(record)]
        out.append((position, hits))
    return out


# -- the store ------------------------------------------------------------------------------


def _filter(row: SQLFilter) -> Filter:
    return Filter(
        id=row.id,
        user=row.user_name,
        name=row.name,
        expression=row.expression,
        feed=row.feed,
        created_unix=row.created_unix,
        since_position=row.since_position,
        active=row.active,
    )


@dataclass(slots=True)
class MatchCopy:
    """One match: a copy of an alert for a filter's feed, full or a notification."""

    filter: Filter
    alert_id: int
    visit: int
    format: str


@dataclass(slots=True)
class FeedManifestEntry:
    """A visit's manifest for one filter's feed."""

    filter: Filter
    manifest: Manifest


@dataclass(slots=True)
class MatchBatch:
    """What one pass appends, in log order, and the figures it adds to the cursor row."""

    items: list[MatchCopy | FeedManifestEntry] = field(default_factory=list)
    alerts: int = 0
    errors: int = 0


class MiniBrokerStore(AlertStore):
    """The mini-broker's tables, on the alert store's database (same engines, same log lock)."""

    def _lock_filters(self, s: Session) -> None:
        if s.bind is not None and s.bind.dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _FILTER_LOCK})

    # -- filters --------------------------------------------------------------------------

    def add_filter(
        self,
        user: str,
        name: str,
        expression: str,
        feed: str,
        *,
        max_users: int,
        max_filters: int,
    ) -> Filter:
        """Store a new active filter, checking the limits in the same transaction.

        Raises
        ------
        StateError
            The user has an active filter of that name.
        FilterLimitError
            ``max_users`` other users have active filters, or the user has ``max_filters``.
        """
        with self._session() as s, s.begin():
            self._lock_filters(s)
            active = s.execute(
                select(SQLFilter.user_name, SQLFilter.name).where(SQLFilter.active.is_(True))
            ).all()
            if (user, name) in {(u, n) for u, n in active}:
                raise StateError(f"{user} has a filter {name!r}; delete it first to replace it")
            users = {u for u, _ in active}
            if user not in users and len(users) >= max_users:
                raise FilterLimitError(
                    f"the mini-broker serves at most {max_users} users at once and has "
                    f"{len(users)}; try later or ask an operator"
                )
            mine = sum(1 for u, _ in active if u == user)
            if mine >= max_filters:
                raise FilterLimitError(
                    f"{user} has {mine} filters, the most one user may have; delete one first"
                )
            head = int(s.scalar(select(func.max(SQLLog.position))) or 0)
            row = SQLFilter(
                user_name=user,
                name=name,
                expression=expression,
                feed=feed,
                created_unix=time.time(),
                since_position=head,
                active=True,
            )
            s.add(row)
            s.flush()
            return _filter(row)

    def deactivate_filter(self, user: str, name: str) -> Filter:
        """Mark a user's active filter deleted.

        Raises
        ------
        NotFoundError
            The user has no active filter of that name.
        """
        with self._session() as s, s.begin():
            self._lock_filters(s)
            row = s.scalars(
                select(SQLFilter).where(
                    SQLFilter.user_name == user, SQLFilter.name == name, SQLFilter.active.is_(True)
                )
            ).first()
            if row is None:
                raise NotFoundError(f"{user} has no filter {name!r}")
            row.active = False
            row.deleted_unix = time.time()
            return _filter(row)

    def active_filter(self, user: str, name: str) -> Filter | None:
        """A user's active filter of that name, or None."""
        with self._reader() as s:
            row = s.scalars(
                select(SQLFilter).where(
                    SQLFilter.user_name == user, SQLFilter.name == name, SQLFilter.active.is_(True)
                )
            ).first()
            return None if row is None else _filter(row)

    def filters(self, user: str | None = None, *, active: bool = True) -> list[Filter]:
        """Active filters (or every filter ever), of everyone or one user, oldest first."""
        stmt = select(SQLFilter).order_by(SQLFilter.id)
        if active:
            stmt = stmt.where(SQLFilter.active.is_(True))
        if user is not None:
            stmt = stmt.where(SQLFilter.user_name == user)
        with self._reader() as s:
            return [_filter(r) for r in s.scalars(stmt)]

    # -- the matcher ----------------------------------------------------------------------

    def matcher_cursor(self, name: str) -> int:
        """The matcher's cursor; created at the log's head the first time."""
        with self._reader() as s:
            row = s.get(SQLMatcher, name)
            if row is not None:
                return row.cursor
        try:
            with self._session() as s, s.begin():
                head = int(s.scalar(select(func.max(SQLLog.position))) or 0)
                s.add(
                    SQLMatcher(
                        name=name, cursor=head, updated_unix=time.time(), alerts=0, copies=0,
                        errors=0,
                    )
                )  # fmt: skip
        except IntegrityError:  # created concurrently
            pass
        with self._reader() as s:
            row = s.get(SQLMatcher, name)
            assert row is not None
            return row.cursor

    def matcher_row(self, name: str) -> dict[str, Any]:
        """The matcher's cursor row (cursor, updated, alerts, copies, errors)."""
        self.matcher_cursor(name)
        with self._reader() as s:
            row = s.get(SQLMatcher, name)
            assert row is not None
            return {
                "cursor": row.cursor,
                "updated_unix": row.updated_unix,
                "alerts": row.alerts,
                "copies": row.copies,
                "errors": row.errors,
            }

    def public_entries(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Log entries addressed to everyone after a position, with where their bytes are."""
        stmt = (
            select(
                SQLLog.position,
                SQLLog.kind,
                SQLLog.visit,
                SQLLog.alert_id,
                SQLLog.body,
                SQLAlert.segment,
                SQLAlert.offset,
                SQLAlert.length,
            )
            .outerjoin(SQLAlert, SQLAlert.alert_id == SQLLog.alert_id)
            .where(SQLLog.position > after, SQLLog.target.is_(None))
            .order_by(SQLLog.position)
            .limit(limit)
        )
        with self._reader() as s:
            return [dict(r._mapping) for r in s.execute(stmt)]

    def public_backlog(self, after: int, cap: int = 1_000_000) -> int:
        """Entries addressed to everyone after a position (counted up to ``cap``)."""
        sub = (
            select(SQLLog.position)
            .where(SQLLog.position > after, SQLLog.target.is_(None))
            .limit(cap)
            .subquery()
        )
        with self._reader() as s:
            return int(s.scalar(select(func.count()).select_from(sub)) or 0)

    def full_counts(
        self, users: Iterable[str], visits: Iterable[int]
    ) -> dict[tuple[str, int], int]:
        """Full alerts each user got of each visit so far, across its filters (even deleted)."""
        users, visits = sorted(set(users)), sorted(set(visits))
        if not users or not visits:
            return {}
        stmt = (
            select(SQLFilterVisit.user_name, SQLFilterVisit.visit, func.sum(SQLFilterVisit.full))
            .where(SQLFilterVisit.user_name.in_(users), SQLFilterVisit.visit.in_(visits))
            .group_by(SQLFilterVisit.user_name, SQLFilterVisit.visit)
        )
        with self._reader() as s:
            return {(u, int(v)): int(n or 0) for u, v, n in s.execute(stmt)}

    def feed_visit_ids(
        self, keys: Iterable[tuple[int, str, int]]
    ) -> dict[tuple[int, int], list[int]]:
        """The alertIds filters' feeds got of visits (their copies, not replays).

        ``keys`` are (filter id, feed, visit); the result is keyed by (filter id, visit).
        """
        out: dict[tuple[int, int], list[int]] = {}
        with self._reader() as s:
            for filter_id, feed, visit in keys:
                row = s.get(SQLFilterVisit, (filter_id, visit))
                out[(filter_id, visit)] = (
                    []
                    if row is None
                    else list(
                        s.scalars(
                            select(SQLLog.alert_id).where(
                                SQLLog.target == feed,
                                SQLLog.position >= row.first_position,
                                SQLLog.kind == EntryKind.ALERT.value,
                                SQLLog.visit == visit,
                                SQLLog.replay.is_(False),
                            )
                        )
                    )
                )
        return out

    def filter_visits(self, user: str, visit: int) -> list[dict[str, Any]]:
        """Per filter of a user: matches and full alerts of one visit."""
        stmt = (
            select(SQLFilter.name, SQLFilter.feed, SQLFilterVisit.matched, SQLFilterVisit.full)
            .join(SQLFilter, SQLFilter.id == SQLFilterVisit.filter_id)
            .where(SQLFilterVisit.user_name == user, SQLFilterVisit.visit == visit)
            .order_by(SQLFilter.id)
        )
        with self._reader() as s:
            return [dict(r._mapping) for r in s.execute(stmt)]

    def commit_batch(self, name: str, expected: int, cursor: int, batch: MatchBatch) -> bool:
        """Append a pass's copies and manifests, add its counts and move the cursor, at once.

        Returns False (writing nothing) when the cursor is no longer ``expected``: another
        matcher did this batch.
        """
        now = time.time()
        with self._session() as s, s.begin():
            self._lock_log(s)
            row = s.get(SQLMatcher, name, with_for_update=True)
            if row is None or row.cursor != expected:
                return False
            # Writers of the log are serialized (the lock): this batch's positions follow head.
            head = int(s.scalar(select(func.max(SQLLog.position))) or 0)
            if batch.items:
                s.execute(insert(SQLLog), [_log_row(item, now) for item in batch.items])
            per: dict[tuple[int, int], list[Any]] = {}
            for item in batch.items:
                if isinstance(item, MatchCopy):
                    agg = per.setdefault((item.filter.id, item.visit), [item.filter.user, 0, 0])
                    agg[1] += 1
                    agg[2] += item.format == FeedFormat.FULL.value
            if per:
                existing = {
                    (fv.filter_id, fv.visit): fv
                    for fv in s.scalars(
                        select(SQLFilterVisit).where(
                            SQLFilterVisit.filter_id.in_({k[0] for k in per}),
                            SQLFilterVisit.visit.in_({k[1] for k in per}),
                        )
                    )
                }
                for (filter_id, visit), (user, matched, full) in per.items():
                    fv = existing.get((filter_id, visit))
                    if fv is None:
                        s.add(
                            SQLFilterVisit(
                                filter_id=filter_id, visit=visit, user_name=user,
                                matched=matched, full=full, first_position=head + 1,
                            )
                        )  # fmt: skip
                    else:
                        fv.matched += matched
                        fv.full += full
            row.cursor = cursor
            row.updated_unix = now
            row.alerts += batch.alerts
            row.copies += sum(v[1] for v in per.values())
            row.errors += batch.errors
            return True


def _log_row(item: MatchCopy | FeedManifestEntry, now: float) -> dict[str, Any]:
    if isinstance(item, MatchCopy):
        return {
            "kind": EntryKind.ALERT.value,
            "visit": item.visit,
            "alert_id": item.alert_id,
            "target": item.filter.feed,
            "format": item.format,
            "replay": False,
            "created_unix": now,
            "body": None,
        }
    return {
        "kind": EntryKind.MANIFEST.value,
        "visit": item.manifest.visit,
        "alert_id": None,
        "target": item.filter.feed,
        "format": None,
        "replay": False,
        "created_unix": now,
        "body": item.manifest.model_dump(mode="json"),
    }
