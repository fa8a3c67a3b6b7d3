"""Replication of designated database tables between sites (LDM-230 5.1).

A consistent snapshot of each designated database (SQLite backup API, or ``pg_dump`` for
PostgreSQL, see `ldf.backbone.tables`) is catalogued like any file — scratch retention, so
old snapshots expire — and copied to every site the policy names, verified like every copy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ldf.backbone.models import Replica, ReplicaState, Retention
from ldf.backbone.service import Backbone
from ldf.backbone.tables import replicate_table_snapshot

__all__ = ["replicate_tables"]


def replicate_tables(bb: Backbone) -> list[dict[str, Any]]:
    """Snapshot every designated database and replicate it to its sites.

    Returns one entry per snapshot: its LFN, the sites holding it, and the transfer report.
    """
    out = []
    for spec in bb.policy.tables:
        for site in spec.sites:
            bb.check_site(site)
        url = bb.settings.database_url(spec.role)
        with tempfile.TemporaryDirectory(prefix="ldf-table-") as tmp:
            snapshot = replicate_table_snapshot(url, Path(tmp))
            lfn = f"tables/{spec.role}/{snapshot.name}"
            first, *others = spec.sites
            bb.ingest(
                snapshot,
                lfn,
                site=first,
                metadata={"dataset_type": "table_snapshot", "role": spec.role},
                producer="backbone-tables",
                retention=Retention.SCRATCH,
            )
        for site in others:
            ep = bb.endpoint(site)
            dst = Replica(
                lfn=lfn, site=site, endpoint=ep.name, tier=ep.tier, uri=ep.uri(lfn),
                state=ReplicaState.PENDING,
            )  # fmt: skip
            bb.store.enqueue(lfn, dst=dst, priority=2)
        report = bb.run_transfers()
        held = sorted(r.site for r in bb.store.replicas(lfn) if r.state is ReplicaState.AVAILABLE)
        out.append({"role": spec.role, "lfn": lfn, "sites": held, "transfers": report.as_dict()})
    return out
