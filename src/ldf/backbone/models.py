"""What the Data Backbone talks in: files, replicas, rules, transfers, audits, deletions."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ldf.config import Tier

__all__ = [
    "AuditFinding",
    "AuditReport",
    "DeletionRequest",
    "DeletionState",
    "FileState",
    "FindingKind",
    "IngestResult",
    "LogicalFile",
    "Replica",
    "ReplicaState",
    "Retention",
    "Rule",
    "Transfer",
    "TransferState",
]


class _Model(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class FileState(StrEnum):
    """Lifecycle of a logical file."""

    ACTIVE = "active"
    DEFECTIVE = "defective"
    """No verified good replica is left (or an operator flagged it)."""
    DELETED = "deleted"


class ReplicaState(StrEnum):
    """State of one copy of a file at one storage endpoint."""

    PENDING = "pending"
    """A transfer will create it."""
    AVAILABLE = "available"
    """Complete and verified."""
    SUSPECT = "suspect"
    """An audit found its bytes differ from the catalog's checksum."""
    LOST = "lost"
    """An audit found it missing."""
    DELETED = "deleted"


class Retention(StrEnum):
    """Retention class of a file (decides what may be deleted, and how)."""

    PERMANENT = "permanent"
    """Survey record: deleted only through an approved request."""
    SCRATCH = "scratch"
    """Deleted when its lifetime ends, or by request."""
    CAMPAIGN = "campaign"
    """Campaign output: deleted by request (e.g. a faulty campaign), or by lifetime if set."""


class TransferState(StrEnum):
    """State of a queued copy."""

    QUEUED = "queued"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"
    """Gave up after the maximum attempts (an operator may retry)."""


class LogicalFile(_Model):
    """A file of the permanent record, independent of where its copies are."""

    lfn: str = Field(description="Logical file name: a relative POSIX path, never a location.")
    size: int
    adler32: str
    blake3: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    producer: str = Field(default="", description="Producing service or campaign.")
    inputs: list[str] = Field(default_factory=list, description="LFNs it was made from.")
    retention: Retention = Retention.PERMANENT
    expires_at: datetime | None = None
    state: FileState = FileState.ACTIVE
    datasets: list[str] = Field(default_factory=list)
    created_at: datetime | None = None


class Replica(_Model):
    """One copy of a file at one storage endpoint of a site."""

    lfn: str
    site: str
    endpoint: str
    tier: Tier
    uri: str
    state: ReplicaState
    created_at: datetime | None = None
    verified_at: datetime | None = None


class Rule(_Model):
    """A replication rule: files matching ``expression`` must have ``copies`` copies."""

    id: int | None = None
    name: str
    expression: str
    copies: int = Field(ge=1)
    sites: list[str] = Field(min_length=1, description="Sites the copies may go to, in order.")
    tier: Tier | None = Field(default=None, description="Only endpoints of this tier count.")
    priority: int = Field(default=3, ge=1, le=5, description="1 highest … 5 lowest.")
    lifetime_s: float | None = Field(default=None, gt=0)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    active: bool = True


class Transfer(_Model):
    """A queued copy of a file to one endpoint (the durable work queue)."""

    id: int
    lfn: str
    rule: str | None
    src_site: str | None
    src_endpoint: str | None
    dst_site: str
    dst_endpoint: str
    state: TransferState
    priority: int
    attempts: int
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    created_at: datetime | None = None
    done_at: datetime | None = None


class FindingKind(StrEnum):
    """What an audit found."""

    LOST = "lost"
    CORRUPT = "corrupt"
    DARK = "dark"


class AuditFinding(_Model):
    """One problem an audit found."""

    kind: FindingKind
    site: str
    endpoint: str
    lfn: str
    detail: str = ""
    action: str = Field(default="", description="What was done: quarantined, marked lost...")


class AuditReport(_Model):
    """The report of one audit run of one site."""

    id: int | None = None
    site: str
    started_at: datetime
    finished_at: datetime | None = None
    checksums: bool = Field(description="Whether contents were checksummed (else sizes only).")
    checked: int = 0
    lost: int = 0
    corrupt: int = 0
    dark: int = 0
    findings: list[AuditFinding] = Field(default_factory=list)


class DeletionState(StrEnum):
    """Lifecycle of a deletion request."""

    REQUESTED = "requested"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXECUTED = "executed"


class DeletionRequest(_Model):
    """A request to delete files, approved before it is executed."""

    id: int | None = None
    expression: str = Field(description="Which files (metadata expression, or lfn == '…').")
    reason: str
    requested_by: str
    state: DeletionState = DeletionState.REQUESTED
    decided_by: str | None = None
    created_at: datetime | None = None
    decided_at: datetime | None = None
    executed_at: datetime | None = None
    files: int = 0
    bytes: int = 0


class IngestResult(_Model):
    """What one ingest did."""

    lfn: str
    created: bool = Field(description="False when the file was already catalogued (a no-op).")
    size: int
    adler32: str
    blake3: str
    site: str
    endpoint: str
    transfers_queued: int = 0
    butler: bool = False
