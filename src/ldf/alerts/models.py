"""What alert distribution talks in: feeds, deliveries, manifests, replays, status.

Positions
    Every entry the service stores gets a *position* in one append-only log: an alert when a
    producer hands it over, a visit's completeness manifest when the visit closes, and copies
    of earlier alerts addressed to one feed (a replay, or a mini-broker user's match). A feed
    is a cursor over that log: it is presented every entry after its cursor that is addressed
    to everyone (if the feed is *live*) or to the feed itself, in position order. A consumer
    acknowledges a position; everything up to it is done.

Manifests
    When a visit closes, the service appends its manifest: the number of alerts and a
    SHA-256 over their sorted alertIds (:func:`manifest_checksum`), so a broker can prove it
    has them all. Alerts that arrive after a visit closed produce a new revision.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "NAME_PATTERN",
    "Delivery",
    "EntryKind",
    "Feed",
    "FeedFormat",
    "FeedSpec",
    "FeedStatus",
    "IngestResult",
    "Manifest",
    "ReplaySpec",
    "manifest_checksum",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""Feed and broker names: one token (they appear in URLs and NATS subjects)."""

_NAME = re.compile(NAME_PATTERN)
_ID = struct.Struct(">Q")


def manifest_checksum(alert_ids: Iterable[int]) -> str:
    """The manifest checksum of a set of alertIds.

    SHA-256 (hex) over the sorted, distinct ids, each as an 8-byte big-endian unsigned
    integer. A broker recomputes it from the alertIds it holds for the visit.
    """
    h = hashlib.sha256()
    for alert_id in sorted(set(alert_ids)):
        h.update(_ID.pack(alert_id))
    return h.hexdigest()


class FeedFormat(StrEnum):
    """What a feed carries for each alert."""

    FULL = "full"
    """The whole packet in Confluent wire format, as produced."""
    NO_CUTOUTS = "nocutouts"
    """The packet with its three cutouts null (same schema, a fraction of the bytes)."""
    NOTIFICATION = "notification"
    """A small JSON record (ids, position, flux, S/N); the full packet is fetched by alertId
    (the split DMTN-165 proposes)."""


class EntryKind(StrEnum):
    """Kind of a log entry."""

    ALERT = "alert"
    MANIFEST = "manifest"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit"
        )
    return value


class FeedSpec(_Strict):
    """A feed as a broker or an operator asks for it."""

    name: str = Field(description="Unique feed name, e.g. 'fink-full'.")
    broker: str = Field(description="The broker that owns and reads the feed.")
    format: FeedFormat = Field(default=FeedFormat.FULL)
    schema_version: str | None = Field(
        default=None,
        description="Alert schema 'MAJOR.MINOR' to deliver in (an older supported minor); "
        "None: the version each alert was produced in.",
    )
    live: bool = Field(
        default=True,
        description="Receives new alerts; False: only what is addressed to it (replays, "
        "mini-broker matches).",
    )
    start: Literal["now", "earliest"] | int = Field(
        default="now",
        description="Where a new feed's cursor starts: 'now' (the next alert), 'earliest', "
        "or a position.",
    )
    lag_alarm_s: float = Field(
        default=60.0, gt=0, description="Lag (age of the oldest unacknowledged entry) that "
        "raises a feedLagging event."
    )  # fmt: skip
    lag_alarm_entries: int = Field(
        default=200_000, gt=0, description="Unacknowledged entries that raise feedLagging."
    )
    transport: Literal["http", "nats"] = Field(
        default="http", description="How the broker reads it: HTTP long-poll or NATS JetStream."
    )
    max_ack_pending: int = Field(
        default=5000, gt=0, description="NATS: unacknowledged messages before delivery pauses."
    )
    description: str = ""

    @field_validator("name")
    @classmethod
    def _feed_name(cls, value: str) -> str:
        return _check_name(value, "feed name")

    @field_validator("broker")
    @classmethod
    def _broker_name(cls, value: str) -> str:
        return _check_name(value, "broker name")

    @field_validator("schema_version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+\.\d+", value):
            raise ValueError(f"schema_version {value!r} must be 'MAJOR.MINOR', e.g. '11.0'")
        return value


class Feed(FeedSpec):
    """A feed and its cursor."""

    cursor: int = Field(description="Last acknowledged position.")
    created_unix: float
    delivered: int = Field(default=0, description="Entries acknowledged so far.")
    last_ack_unix: float | None = None
    last_fetch_unix: float | None = None
    errors: int = 0
    state: Literal["active", "paused"] = "active"


class ReplaySpec(_Strict):
    """A replay: earlier alerts re-sent into a feed (existing or new) at full rate.

    Exactly one selection: a time range of ingestion, an alertId range, or a list of visits.
    The alerts are re-presented with ``replay: true`` in their headers, followed by the
    manifests of the visits they belong to.
    """

    feed: str = Field(description="Target feed; created (not live) if it does not exist.")
    broker: str | None = Field(
        default=None, description="Owner of a new target feed (default: the caller)."
    )
    format: FeedFormat = FeedFormat.FULL
    since_unix: float | None = None
    until_unix: float | None = None
    alert_id_min: int | None = None
    alert_id_max: int | None = None
    visits: list[int] | None = None

    @field_validator("feed")
    @classmethod
    def _feed_name(cls, value: str) -> str:
        return _check_name(value, "feed name")

    @model_validator(mode="after")
    def _one_selection(self) -> ReplaySpec:
        kinds = [
            self.since_unix is not None or self.until_unix is not None,
            self.alert_id_min is not None or self.alert_id_max is not None,
            self.visits is not None,
        ]
        if sum(kinds) != 1:
            raise ValueError(
                "a replay selects by exactly one of: time (since_unix/until_unix), "
                "alertId range (alert_id_min/alert_id_max) or visits"
            )
        if self.visits is not None and not self.visits:
            raise ValueError("visits must not be empty")
        return self


class Manifest(_Strict):
    """A visit's completeness manifest."""

    visit: int
    count: int
    checksum: str
    revision: int = 1
    closed_unix: float
    feed: str | None = Field(
        default=None, description="Set when the manifest covers one feed's selection only."
    )


class IngestResult(_Strict):
    """What an ingest did."""

    accepted: int
    duplicates: int
    first_position: int | None = None
    last_position: int | None = None


class FeedStatus(_Strict):
    """The audit figures of one feed."""

    name: str
    broker: str
    format: FeedFormat
    transport: str
    live: bool
    cursor: int
    head: int
    lag_entries: int
    lag_s: float
    delivered: int
    rate_per_s: float
    last_ack_unix: float | None
    last_fetch_unix: float | None
    errors: int
    lagging: bool


@dataclass(slots=True)
class Delivery:
    """One entry as a feed presents it (a plain dataclass: there are tens of thousands)."""

    position: int
    kind: str
    visit: int
    body: bytes
    alert_id: int | None = None
    schema_id: int | None = None
    format: str = FeedFormat.FULL.value
    replay: bool = False
    headers: dict[str, Any] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        """The entry's header as the transports send it."""
        out: dict[str, Any] = {
            "position": self.position,
            "kind": self.kind,
            "visit": self.visit,
            "format": self.format,
        }
        if self.alert_id is not None:
            out["alert_id"] = self.alert_id
        if self.schema_id is not None:
            out["schema_id"] = self.schema_id
        if self.replay:
            out["replay"] = True
        out.update(self.headers)
        return out
