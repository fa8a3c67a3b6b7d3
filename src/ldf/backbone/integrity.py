"""Integrity and retention of the Data Backbone: audits, repairs, deletions, expiry.

Rucio's dark-data audit is ATLAS-specific and Rubin runs none; ours compares the catalog with
what is really on every endpoint of a site and finds

* LOST files (catalogued, missing from storage),
* CORRUPT files (present, but size — or, with ``checksums``, content — differs), and
* DARK files (on storage, not in the catalog, older than a grace period so an ingest in
  flight is never mistaken for one), which it quarantines.

`repair` restores lost and corrupt replicas from a copy whose checksum is verified first.
Deletion follows policy: the permanent survey record is deleted only through a request that
somebody other than the requester approves; scratch and campaign files also expire when
their lifetime ends. Every deletion is recorded, and a dry run shows its effect first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ldf.backbone.checksums import Checksums
from ldf.backbone.endpoints import copy_file
from ldf.backbone.models import (
    AuditFinding,
    AuditReport,
    DeletionRequest,
    DeletionState,
    FileState,
    FindingKind,
    LogicalFile,
    ReplicaState,
    Retention,
)
from ldf.backbone.service import Backbone, file_record
from ldf.db import utcnow
from ldf.errors import LdfError, StateError, UserInputError
from ldf.expr import parse

__all__ = [
    "DeletionPlan",
    "RepairReport",
    "approve_deletion",
    "audit",
    "execute_deletion",
    "expire",
    "reject_deletion",
    "repair",
    "request_deletion",
]


def audit(
    bb: Backbone, site: str, *, checksums: bool = False, quarantine: bool = True
) -> AuditReport:
    """Compare the catalog with the storage of every endpoint of a site; store the report."""
    bb.check_site(site)
    report = AuditReport(site=site, started_at=utcnow(), checksums=checksums)
    grace = bb.policy.dark_grace_s
    for ep in bb.endpoints(site):
        states = (
            ReplicaState.AVAILABLE,
            ReplicaState.SUSPECT,
            ReplicaState.LOST,
            ReplicaState.PENDING,
        )
        # The catalog is listed before the storage: a file is stored before it is
        # catalogued, so anything catalogued now is already on storage when listed after.
        catalogued = list(bb.store.replicas_at(site, ep.name, states))
        on_storage = dict(ep.walk())
        for lfn, size, adler32, blake3, state in catalogued:
            present = on_storage.pop(lfn, None)
            if state == ReplicaState.PENDING:
                continue  # a transfer will write it
            if present is None and ep.exists(lfn):
                present = ep.size(lfn)  # written since the listing
            if present is None:
                if state != ReplicaState.LOST:
                    _mark(bb, lfn, site, ep.name, ReplicaState.LOST)
                report.findings.append(
                    AuditFinding(
                        kind=FindingKind.LOST,
                        site=site,
                        endpoint=ep.name,
                        lfn=lfn,
                        detail="catalogued but not on storage",
                        action="marked lost",
                    )
                )
                continue
            report.checked += 1
            problem = None
            if present != size:
                problem = f"size {present} bytes, catalog says {size}"
            elif checksums:
                got = ep.checksum(lfn)
                if got != Checksums(size=size, adler32=adler32, blake3=blake3):
                    problem = (
                        f"checksum differs (blake3 {got.blake3[:12]}…, catalog {blake3[:12]}…)"
                    )
            if problem:
                if state != ReplicaState.SUSPECT:
                    _mark(bb, lfn, site, ep.name, ReplicaState.SUSPECT)
                report.findings.append(
                    AuditFinding(
                        kind=FindingKind.CORRUPT,
                        site=site,
                        endpoint=ep.name,
                        lfn=lfn,
                        detail=problem,
                        action="marked suspect",
                    )
                )
            elif state != ReplicaState.AVAILABLE and (checksums or state == ReplicaState.LOST):
                _mark(bb, lfn, site, ep.name, ReplicaState.AVAILABLE)  # it came back intact
        now = time.time()
        for lfn in sorted(on_storage):
            if now - ep.modified(lfn) < grace:
                continue  # may be an ingest or transfer between its copy and its catalog entry
            if _catalogued_here(bb, lfn, site, ep.name):
                continue  # catalogued since the listing
            action = ""
            if quarantine:
                action = f"quarantined to {ep.quarantine(lfn)}"
            report.findings.append(
                AuditFinding(
                    kind=FindingKind.DARK,
                    site=site,
                    endpoint=ep.name,
                    lfn=lfn,
                    detail=f"{on_storage[lfn]} bytes not in the catalog",
                    action=action,
                )
            )
    report.lost = sum(f.kind is FindingKind.LOST for f in report.findings)
    report.corrupt = sum(f.kind is FindingKind.CORRUPT for f in report.findings)
    report.dark = sum(f.kind is FindingKind.DARK for f in report.findings)
    report.finished_at = utcnow()
    return bb.store.save_audit(report)


def _catalogued_here(bb: Backbone, lfn: str, site: str, endpoint: str) -> bool:
    if bb.store.get_file(lfn) is None:
        return False
    return any(r.site == site and r.endpoint == endpoint for r in bb.store.replicas(lfn))


def _mark(bb: Backbone, lfn: str, site: str, endpoint: str, state: ReplicaState) -> None:
    rep = next(r for r in bb.store.replicas(lfn) if (r.site, r.endpoint) == (site, endpoint))
    bb.store.set_replica(rep.model_copy(update={"state": state}))


@dataclass
class RepairReport:
    """What a repair pass did."""

    repaired: list[str] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "repaired": len(self.repaired),
            "unrepairable": len(self.unrepairable),
            "files": self.repaired[:100],
            "defective": self.unrepairable[:100],
            "errors": self.errors[:20],
        }


def repair(bb: Backbone, site: str | None = None) -> RepairReport:
    """Restore lost and suspect replicas (of one site, or all) from a verified good copy.

    A source is used only after its content is re-checksummed against the catalog. A file
    with no good copy left anywhere is marked defective.
    """
    if site is not None:
        bb.check_site(site)
    report = RepairReport()
    for f in bb.store.iter_files(states=(FileState.ACTIVE, FileState.DEFECTIVE)):
        reps = bb.store.replicas(f.lfn)
        broken = (ReplicaState.LOST, ReplicaState.SUSPECT)
        bad = [r for r in reps if r.state in broken and (site is None or r.site == site)]
        if not bad:
            continue
        expected = Checksums(size=f.size, adler32=f.adler32, blake3=f.blake3)
        source = None
        for r in sorted(reps, key=lambda r: (r.state is not ReplicaState.AVAILABLE, r.tier.value)):
            if r.state is not ReplicaState.AVAILABLE or r in bad:
                continue
            ep = bb.endpoint(r.site, r.endpoint)
            try:
                if ep.checksum(f.lfn) == expected:
                    source = ep
                    break
            except LdfError:
                continue
            _mark(bb, f.lfn, r.site, r.endpoint, ReplicaState.SUSPECT)
        if source is None:
            bb.store.set_file_state(f.lfn, FileState.DEFECTIVE)
            report.unrepairable.append(f.lfn)
            continue
        for r in bad:
            dst = bb.endpoint(r.site, r.endpoint)
            try:
                if dst.exists(f.lfn):
                    if dst.checksum(f.lfn) == expected:  # it is fine after all
                        bb.store.set_replica(r.model_copy(update={"state": ReplicaState.AVAILABLE}))
                        report.repaired.append(f"{f.lfn} @ {r.site}/{r.endpoint} (verified)")
                        continue
                    dst.quarantine(f.lfn)  # keep the bad bytes for forensics, off the data path
                copy_file(source, dst, f.lfn, expected=expected)
                bb.store.set_replica(r.model_copy(update={"state": ReplicaState.AVAILABLE}))
                report.repaired.append(f"{f.lfn} @ {r.site}/{r.endpoint}")
            except LdfError as exc:
                report.errors.append(f"{f.lfn} @ {r.site}/{r.endpoint}: {exc}")
        if f.state is FileState.DEFECTIVE:
            bb.store.set_file_state(f.lfn, FileState.ACTIVE)
    return report


# -- retention -------------------------------------------------------------------------------


@dataclass
class DeletionPlan:
    """What a deletion would do (or did)."""

    files: list[str] = field(default_factory=list)
    bytes: int = 0
    replicas_per_site: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    executed: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "files": len(self.files),
            "bytes": self.bytes,
            "replicas_per_site": self.replicas_per_site,
            "refused": self.refused[:100],
            "sample": self.files[:20],
            "executed": self.executed,
        }


def _matching(bb: Backbone, expression: str) -> list[LogicalFile]:
    expr = parse(expression)
    return [
        f
        for f in bb.store.iter_files(states=(FileState.ACTIVE, FileState.DEFECTIVE))
        if expr.matches(file_record(f))
    ]


def _plan(bb: Backbone, files: list[LogicalFile]) -> DeletionPlan:
    plan = DeletionPlan()
    for f in files:
        plan.files.append(f.lfn)
        plan.bytes += f.size
        for r in bb.store.replicas(f.lfn):
            if r.state is not ReplicaState.DELETED:
                plan.replicas_per_site[r.site] = plan.replicas_per_site.get(r.site, 0) + 1
    return plan


def _delete(bb: Backbone, files: list[LogicalFile]) -> None:
    for f in files:
        for r in bb.store.replicas(f.lfn):
            if r.state is ReplicaState.DELETED:
                continue
            try:
                bb.endpoint(r.site, r.endpoint).delete(f.lfn)
            except UserInputError:
                continue  # the endpoint left the configuration; the record still goes
        bb.store.purge_replicas(f.lfn)
        from ldf.backbone.butler import unregister_raw

        unregister_raw(bb, f)


def request_deletion(
    bb: Backbone, expression: str, reason: str, requested_by: str
) -> DeletionRequest:
    """Record a request to delete the files an expression selects (nothing is deleted yet)."""
    if not reason.strip():
        raise UserInputError("a deletion request needs a reason")
    plan = _plan(bb, _matching(bb, expression))
    if not plan.files:
        raise UserInputError(f"no active file matches {expression!r}")
    return bb.store.add_deletion(
        DeletionRequest(
            expression=expression,
            reason=reason,
            requested_by=requested_by,
            files=len(plan.files),
            bytes=plan.bytes,
        )
    )


def approve_deletion(bb: Backbone, request_id: int, approver: str) -> DeletionRequest:
    """Approve a request; the approver must not be its requester (two-person rule)."""
    req = bb.store.get_deletion(request_id)
    if req.state is not DeletionState.REQUESTED:
        raise StateError(f"deletion request {request_id} is {req.state.value}, not requested")
    if approver == req.requested_by:
        raise StateError(
            f"deletion request {request_id} must be approved by someone other than its "
            f"requester ({approver})"
        )
    return bb.store.update_deletion(
        request_id, state=DeletionState.APPROVED, decided_by=approver, decided_at=utcnow()
    )


def reject_deletion(bb: Backbone, request_id: int, approver: str) -> DeletionRequest:
    """Reject a request."""
    req = bb.store.get_deletion(request_id)
    if req.state is not DeletionState.REQUESTED:
        raise StateError(f"deletion request {request_id} is {req.state.value}, not requested")
    return bb.store.update_deletion(
        request_id, state=DeletionState.REJECTED, decided_by=approver, decided_at=utcnow()
    )


def execute_deletion(bb: Backbone, request_id: int, *, dry_run: bool = False) -> DeletionPlan:
    """Delete what an approved request selects (every replica, then the catalog record)."""
    req = bb.store.get_deletion(request_id)
    files = _matching(bb, req.expression)
    plan = _plan(bb, files)
    if dry_run:
        return plan
    if req.state is not DeletionState.APPROVED:
        raise StateError(
            f"deletion request {request_id} is {req.state.value}; only an approved request "
            "is executed (see 'ldf backbone delete approve')"
        )
    _delete(bb, files)
    bb.store.update_deletion(
        request_id,
        state=DeletionState.EXECUTED,
        executed_at=utcnow(),
        files=len(plan.files),
        bytes=plan.bytes,
    )
    plan.executed = True
    return plan


def expire(bb: Backbone, *, dry_run: bool = False) -> DeletionPlan:
    """Delete scratch and campaign files whose lifetime has ended (never the survey record)."""
    now = utcnow()
    files = [
        f
        for f in bb.store.iter_files(states=(FileState.ACTIVE, FileState.DEFECTIVE))
        if f.retention is not Retention.PERMANENT
        and f.expires_at is not None
        and f.expires_at <= now
    ]
    plan = _plan(bb, files)
    if dry_run or not files:
        return plan
    _delete(bb, files)
    req = bb.store.add_deletion(
        DeletionRequest(
            expression="retention != 'permanent' and expires_at <= now",
            reason="lifetime ended (retention policy)",
            requested_by="retention-policy",
            files=len(plan.files),
            bytes=plan.bytes,
        )
    )
    bb.store.update_deletion(
        req.id or 0,
        state=DeletionState.EXECUTED,
        decided_by="retention-policy",
        decided_at=now,
        executed_at=utcnow(),
    )
    plan.executed = True
    return plan
