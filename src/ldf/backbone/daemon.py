"""``ldf serve backbone``: replication, audits and retention, continuously.

One thread drains the transfer queue (new files replicate within a poll interval of their
ingest); the main loop audits every site, repairs what the audits found, expires scratch
files and snapshots designated tables every ``audit_interval_s``. SIGTERM or Ctrl-C stops
claiming work; copies in flight finish (a ``kill -9`` is safe too: leases expire, temp files
are cleaned, nothing half-written is ever visible).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ldf.backbone.integrity import audit, expire, repair
from ldf.backbone.service import Backbone
from ldf.backbone.tablesync import replicate_tables
from ldf.errors import LdfError

__all__ = ["run_daemon"]

_log = logging.getLogger(__name__)


def maintenance(bb: Backbone) -> dict[str, Any]:
    """One round of audits, repairs, expiry and table snapshots."""
    summary: dict[str, Any] = {"audits": {}}
    for site in bb.settings.sites:
        report = audit(bb, site, checksums=bb.policy.audit_checksums)
        summary["audits"][site] = {
            "lost": report.lost,
            "corrupt": report.corrupt,
            "dark": report.dark,
        }
    summary["repair"] = repair(bb).as_dict()
    summary["expired"] = expire(bb).as_dict()
    if bb.policy.tables:
        summary["tables"] = replicate_tables(bb)
    return summary


def run_daemon(
    bb: Backbone,
    stop: threading.Event,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run until ``stop`` is set."""
    transfers = threading.Thread(
        target=bb.run_transfers,
        kwargs={"until_idle": False, "stop": stop},
        name="backbone-transfers",
        daemon=True,
    )
    transfers.start()
    next_round = time.monotonic()
    while not stop.is_set():
        if time.monotonic() >= next_round:
            try:
                summary = maintenance(bb)
                if on_round:
                    on_round(summary)
            except LdfError as exc:
                _log.error("backbone maintenance failed: %s", exc)
            next_round = time.monotonic() + bb.policy.audit_interval_s
        stop.wait(min(1.0, max(0.0, next_round - time.monotonic())))
    transfers.join()
