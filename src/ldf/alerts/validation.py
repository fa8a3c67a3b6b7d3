"""The validation endpoint broker (LDM-230 4.3.2.3): record everything, check it against production.

It consumes one feed exactly once (:class:`~ldf.alerts.client.DurableConsumer`), recording every
entry it receives (position, alertId, visit, arrival time) — duplicates included, so that a
duplicate is seen rather than hidden — and every manifest. :meth:`ValidationEndpoint.report`
compares that with what was produced: per visit, the alerts received against the visit's
alertIds in the archive and against the manifest the stream carried (count and checksum), and
the latency from the visit's end of readout when it is known.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ldf.alerts.client import DurableConsumer, Entry, FeedSource
from ldf.alerts.models import manifest_checksum

__all__ = ["ValidationEndpoint", "feed_report"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    position INTEGER NOT NULL,
    alert_id INTEGER,
    visit INTEGER NOT NULL,
    kind TEXT NOT NULL,
    replay INTEGER NOT NULL,
    size INTEGER NOT NULL,
    received_unix REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS received_visit ON received (visit);
CREATE TABLE IF NOT EXISTS manifests (
    visit INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    count INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    position INTEGER NOT NULL
);
"""


class ValidationEndpoint:
    """A broker that records what one feed delivers.

    Parameters
    ----------
    source
        The feed's transport.
    path
        The endpoint's database.
    """

    def __init__(self, source: FeedSource, path: Path) -> None:
        self.consumer = DurableConsumer(source, path)
        self.db = self.consumer.db
        self.db.executescript(_SCHEMA)

    @staticmethod
    def _record(entries: list[Entry], db: sqlite3.Connection) -> None:
        now = time.time()
        rows = []
        for e in entries:
            h = e.header
            rows.append(
                (e.position, e.alert_id, int(h["visit"]), e.kind, bool(h.get("replay")),
                 len(e.body), now)
            )  # fmt: skip
            if e.kind == "manifest":
                m = json.loads(e.body)
                db.execute(
                    "INSERT INTO manifests VALUES (?, ?, ?, ?, ?)",
                    (m["visit"], m["revision"], m["count"], m["checksum"], e.position),
                )
        db.executemany("INSERT INTO received VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def poll(self, *, max_entries: int = 2000, wait_s: float = 1.0) -> int:
        """Consume one batch; how many entries."""
        return self.consumer.poll(self._record, max_entries=max_entries, wait_s=wait_s)

    def run(self, until: Callable[[], bool], *, wait_s: float = 0.5) -> int:
        """Consume until ``until()``; entries consumed."""
        return self.consumer.run(self._record, until=until, wait_s=wait_s)

    def manifests(self) -> dict[int, dict[str, Any]]:
        """The latest manifest received per visit."""
        out: dict[int, dict[str, Any]] = {}
        for visit, rev, count, checksum in self.db.execute(
            "SELECT visit, revision, count, checksum FROM manifests ORDER BY position"
        ):
            out[visit] = {"revision": rev, "count": count, "checksum": checksum}
        return out

    def received(self, visit: int | None = None) -> list[tuple[int, float]]:
        """(alertId, arrival time) of every alert received (of a visit), duplicates included."""
        sql = "SELECT alert_id, received_unix FROM received WHERE kind = 'alert'"
        args: tuple[Any, ...] = ()
        if visit is not None:
            sql += " AND visit = ?"
            args = (visit,)
        return [(int(a), float(t)) for a, t in self.db.execute(sql, args)]

    def report(
        self,
        produced: Mapping[int, list[int]],
        readout_unix: Mapping[int, float] | None = None,
    ) -> dict[str, Any]:
        """Compare what arrived with what was produced.

        Parameters
        ----------
        produced
            The alertIds of each visit, as the archive holds them.
        readout_unix
            End of readout per visit (wall clock), for latencies.
        """
        return feed_report(self.received(), self.manifests(), produced, readout_unix)

    def close(self) -> None:
        """Close the database and the source."""
        self.consumer.close()


def feed_report(
    received: list[tuple[int, float]],
    manifests: Mapping[int, Mapping[str, Any]],
    produced: Mapping[int, list[int]],
    readout_unix: Mapping[int, float] | None = None,
) -> dict[str, Any]:
    """Delivered, duplicates, missing, manifest agreement and latency of one feed."""
    arrivals: dict[int, float] = {}
    duplicates = 0
    for alert_id, t in received:
        if alert_id in arrivals:
            duplicates += 1
        else:
            arrivals[alert_id] = t
    produced_ids = {a for ids in produced.values() for a in ids}
    missing = len(produced_ids - set(arrivals))
    unexpected = len(set(arrivals) - produced_ids)
    manifest_ok = 0
    manifest_bad: list[int] = []
    for visit, ids in produced.items():
        m = manifests.get(visit)
        if m is None:
            manifest_bad.append(visit)
            continue
        got = [a for a in ids if a in arrivals]
        if m["count"] == len(ids) and m["checksum"] == manifest_checksum(got):
            manifest_ok += 1
        else:
            manifest_bad.append(visit)
    latencies: list[float] = []
    if readout_unix:
        visit_of = {a: v for v, ids in produced.items() for a in ids}
        for alert_id, t in arrivals.items():
            of = visit_of.get(alert_id)
            if of is not None and of in readout_unix:
                latencies.append(t - readout_unix[of])
    out: dict[str, Any] = {
        "delivered": len(arrivals),
        "duplicates": duplicates,
        "missing": missing,
        "unexpected": unexpected,
        "visits": len(produced),
        "manifests_verified": manifest_ok,
        "manifests_unverified": sorted(manifest_bad),
    }
    if latencies:
        arr = np.asarray(latencies)
        out["latency_s"] = {
            "p50": round(float(np.percentile(arr, 50)), 3),
            "p98": round(float(np.percentile(arr, 98)), 3),
            "max": round(float(arr.max()), 3),
        }
    return out
