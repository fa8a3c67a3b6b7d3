"""The Data Backbone's logic: ingest, replication by rule, transfers, access.

Audits, repairs and retention live in `ldf.backbone.integrity`; this module holds what moves
files: `Backbone.ingest` catalogues a file once its first replica is complete and verified,
then applies the replication rules to it at once (a night's dataset that keeps growing
replicates file by file, not when it stops growing); `Backbone.run_transfers` drains the
durable transfer queue with parallel, checksum-verified, bandwidth-limited copies and retries
with backoff; `Backbone.get` serves a file from its best replica, staging it from nearline
storage when needed.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ldf.backbone.checksums import Checksums, checksum_file
from ldf.backbone.endpoints import StorageEndpoint, copy_file, open_endpoint, validate_lfn
from ldf.backbone.models import (
    FileState,
    IngestResult,
    LogicalFile,
    Replica,
    ReplicaState,
    Retention,
    Rule,
    Transfer,
)
from ldf.backbone.nearline import NearlineEndpoint
from ldf.backbone.ratelimit import RateLimiter
from ldf.backbone.storage import CatalogStore
from ldf.config import Settings, Tier
from ldf.db import utcnow
from ldf.errors import (
    ChecksumMismatchError,
    LdfError,
    NotFoundError,
    StagingRequiredError,
    StorageError,
    StorageFullError,
    UserInputError,
)
from ldf.expr import Expression, parse

__all__ = ["Backbone", "TransferReport", "file_record"]

_log = logging.getLogger(__name__)

TIER_PREFERENCE = {Tier.DISK: 0, Tier.DR: 1, Tier.NEARLINE: 2}
"""Which replica to read first: online disk, then the DR copy, then tape-like storage."""

LIVE_STATES = (ReplicaState.AVAILABLE, ReplicaState.PENDING, ReplicaState.SUSPECT)
"""Replica states that count toward a rule's copies."""


def file_record(f: LogicalFile) -> dict[str, Any]:
    """The fields rule and deletion expressions see: the metadata plus catalog attributes."""
    return {
        **f.metadata,
        "lfn": f.lfn,
        "size": f.size,
        "producer": f.producer,
        "retention": f.retention.value,
        "state": f.state.value,
    }


@dataclass
class TransferReport:
    """What one pass over the transfer queue did."""

    done: int = 0
    retried: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        mb_s = self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        return {
            "done": self.done,
            "retried": self.retried,
            "failed": self.failed,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "MB_per_s": round(mb_s, 1),
            "errors": self.errors[:20],
        }


class Backbone:
    """The Data Backbone over one catalog and the sites of a configuration."""

    def __init__(self, settings: Settings, store: CatalogStore) -> None:
        self.settings = settings
        self.store = store
        self.policy = settings.policies.backbone
        self._endpoints: dict[tuple[str, str], StorageEndpoint] = {}
        for site, conf in settings.sites.items():
            for ep in conf.endpoints:
                self._endpoints[(site, ep.name)] = open_endpoint(site, ep)
        self._limiters: dict[tuple[str, str], RateLimiter | None] = {}
        self._limiter_lock = threading.Lock()
        self._expressions: dict[str, Expression] = {}
        self._butlers: dict[str, Any] = {}

    @classmethod
    def open(cls, settings: Settings) -> Backbone:
        """The Backbone of a configuration, with its catalog database migrated."""
        return cls(settings, CatalogStore.open(settings.database_url("catalog")))

    def close(self) -> None:
        """Release database connections."""
        self.store.close()

    # -- sites and endpoints ---------------------------------------------------------------

    def check_site(self, site: str) -> None:
        """Raise a clear error for an unknown site."""
        if site not in self.settings.sites:
            known = ", ".join(sorted(self.settings.sites))
            raise UserInputError(f"unknown site {site!r}; known sites: {known}")

    def endpoint(self, site: str, name: str | None = None) -> StorageEndpoint:
        """An endpoint of a site; by default its first online one."""
        self.check_site(site)
        if name is None:
            eps = [e for (s, _), e in self._endpoints.items() if s == site]
            eps.sort(key=lambda e: TIER_PREFERENCE[e.tier])
            return eps[0]
        try:
            return self._endpoints[(site, name)]
        except KeyError:
            names = ", ".join(n for (s, n) in self._endpoints if s == site)
            raise UserInputError(
                f"site {site!r} has no endpoint {name!r}; it has: {names}"
            ) from None

    def endpoints(self, site: str | None = None) -> list[StorageEndpoint]:
        """Every endpoint (of one site, or of all)."""
        return [e for (s, _), e in self._endpoints.items() if site is None or s == site]

    def _limiter(self, src: str, dst: str) -> RateLimiter | None:
        with self._limiter_lock:
            key = (src, dst)
            if key not in self._limiters:
                mbps = self.policy.link_mbps.get(f"{src}->{dst}")
                self._limiters[key] = RateLimiter(mbps * 1e6 / 8) if mbps else None
            return self._limiters[key]

    def _expression(self, text: str) -> Expression:
        if text not in self._expressions:
            self._expressions[text] = parse(text)
        return self._expressions[text]

    # -- ingest ----------------------------------------------------------------------------

    def ingest(
        self,
        source: Path,
        lfn: str,
        *,
        site: str | None = None,
        endpoint: str | None = None,
        metadata: dict[str, Any] | None = None,
        producer: str = "",
        inputs: list[str] | None = None,
        datasets: list[str] | None = None,
        retention: Retention = Retention.PERMANENT,
        lifetime_s: float | None = None,
    ) -> IngestResult:
        """Store a file at a site and catalogue it once its replica is complete and verified.

        Idempotent: the same LFN with the same content is a no-op (``created`` False); the
        same LFN with different content is refused. Matching replication rules queue their
        transfers at once.

        Raises
        ------
        UserInputError
            Bad LFN, unknown site or endpoint, or the LFN holds different content.
        NotFoundError
            The source file does not exist.
        StorageError
            The copy failed (StorageFullError when the destination is full); nothing is
            catalogued.
        """
        lfn = validate_lfn(lfn)
        site = site or self.policy.ingest_site
        ep = self.endpoint(site, endpoint)
        source = Path(source)
        if not source.is_file():
            raise NotFoundError(f"{source}: no such file to ingest")
        sums = checksum_file(source)
        existing = self.store.get_file(lfn)
        if existing is not None and (existing.size, existing.blake3) != (sums.size, sums.blake3):
            raise UserInputError(
                f"{lfn} is already catalogued with different content ({existing.size} bytes, "
                f"blake3 {existing.blake3[:12]}…; this file: {sums.size} bytes, "
                f"blake3 {sums.blake3[:12]}…)"
            )
        ep.put(lfn, source, expected=sums)
        if retention is not Retention.PERMANENT and lifetime_s is None:
            lifetime_s = self.policy.scratch_lifetime_days * 86400
        expires = utcnow() + timedelta(seconds=lifetime_s) if lifetime_s else None
        file, created = self.store.add_file(
            LogicalFile(
                lfn=lfn,
                size=sums.size,
                adler32=sums.adler32,
                blake3=sums.blake3,
                metadata=metadata or {},
                producer=producer,
                inputs=inputs or [],
                retention=retention,
                expires_at=expires,
                datasets=datasets or [],
            ),
            Replica(
                lfn=lfn,
                site=site,
                endpoint=ep.name,
                tier=ep.tier,
                uri=ep.uri(lfn),
                state=ReplicaState.AVAILABLE,
            ),
        )
        queued = self.apply_rules(file)
        registered = self._register_butler(file, site, ep)
        return IngestResult(
            lfn=lfn,
            created=created,
            size=sums.size,
            adler32=sums.adler32,
            blake3=sums.blake3,
            site=site,
            endpoint=ep.name,
            transfers_queued=queued,
            butler=registered,
        )

    # -- rules -----------------------------------------------------------------------------

    def validate_rule(self, rule: Rule) -> None:
        """Check a rule against the sites of the configuration.

        Raises
        ------
        UserInputError
            Bad expression, unknown site, a site without an endpoint of the rule's tier, or
            more copies than sites.
        """
        parse(rule.expression)
        for site in rule.sites:
            self.check_site(site)
            if rule.tier is not None and not any(e.tier is rule.tier for e in self.endpoints(site)):
                raise UserInputError(f"site {site!r} has no {rule.tier.value} endpoint")
        if len(set(rule.sites)) != len(rule.sites):
            raise UserInputError("a rule's sites must be distinct")
        if rule.copies > len(rule.sites):
            raise UserInputError(
                f"{rule.copies} copies cannot be kept on {len(rule.sites)} site(s)"
            )

    def add_rule(self, rule: Rule) -> tuple[Rule, int]:
        """Store a rule and apply it to every file already catalogued.

        Returns the stored rule and the number of transfers queued.
        """
        self.validate_rule(rule)
        stored = self.store.add_rule(rule)
        queued = 0
        expr = self._expression(stored.expression)
        for f in self.store.iter_files():
            if expr.matches(file_record(f)):
                queued += self._satisfy(stored, f)
        return stored, queued

    def apply_rules(self, file: LogicalFile) -> int:
        """Queue what the active rules want for one file; returns transfers queued."""
        if file.state is not FileState.ACTIVE:
            return 0
        record = file_record(file)
        return sum(
            self._satisfy(rule, file)
            for rule in self.store.rules()
            if self._expression(rule.expression).matches(record)
        )

    def _rule_endpoint(self, rule: Rule, site: str) -> StorageEndpoint | None:
        eps = [e for e in self.endpoints(site) if rule.tier is None or e.tier is rule.tier]
        eps.sort(key=lambda e: TIER_PREFERENCE[e.tier])
        return eps[0] if eps else None

    def _satisfy(self, rule: Rule, file: LogicalFile) -> int:
        replicas = self.store.replicas(file.lfn)
        holders = {
            r.site
            for r in replicas
            if r.site in rule.sites
            and r.state in LIVE_STATES
            and (rule.tier is None or r.tier is rule.tier)
        }
        need = rule.copies - len(holders)
        queued = 0
        for site in rule.sites:
            if need <= 0:
                break
            if site in holders:
                continue
            ep = self._rule_endpoint(rule, site)
            if ep is None:
                continue
            dst = Replica(
                lfn=file.lfn,
                site=site,
                endpoint=ep.name,
                tier=ep.tier,
                uri=ep.uri(file.lfn),
                state=ReplicaState.PENDING,
            )
            if self.store.enqueue(file.lfn, dst=dst, priority=rule.priority, rule_id=rule.id):
                queued += 1
            need -= 1
        return queued

    # -- transfers -------------------------------------------------------------------------

    def _source_for(self, file: LogicalFile, t: Transfer) -> tuple[StorageEndpoint, Replica]:
        """The best verified replica to copy from (not the destination itself)."""
        candidates = [
            r
            for r in self.store.replicas(file.lfn)
            if r.state is ReplicaState.AVAILABLE
            and (r.site, r.endpoint) != (t.dst_site, t.dst_endpoint)
            and (r.site, r.endpoint) in self._endpoints
        ]
        if not candidates:
            raise NotFoundError(f"{file.lfn}: no available replica to copy from")
        candidates.sort(
            key=lambda r: (
                (r.site, r.endpoint) != (t.src_site, t.src_endpoint),
                TIER_PREFERENCE[r.tier],
                r.site,
            )
        )
        rep = candidates[0]
        return self._endpoints[(rep.site, rep.endpoint)], rep

    def _transfer_one(self, t: Transfer, owner: str, report: TransferReport) -> None:
        try:
            file = self.store.get_file(t.lfn)
            if file is None or file.state is FileState.DELETED:
                raise NotFoundError(f"{t.lfn}: no longer in the catalog")
            src, rep = self._source_for(file, t)
            if isinstance(src, NearlineEndpoint) and not src.is_staged(t.lfn):
                ready = src.request_stage(t.lfn)
                raise StagingRequiredError(
                    f"{t.lfn}: staging from {rep.site}/{rep.endpoint}, ready at "
                    f"{datetime.fromtimestamp(ready).isoformat(timespec='seconds')}"
                )
            dst = self.endpoint(t.dst_site, t.dst_endpoint)
            expected = Checksums(size=file.size, adler32=file.adler32, blake3=file.blake3)
            try:
                copy_file(
                    src, dst, t.lfn, expected=expected, limiter=self._limiter(rep.site, t.dst_site)
                )
            except ChecksumMismatchError:
                # Is the source at fault? Then flag it and try another copy next time.
                if src.checksum(t.lfn) != expected:
                    self.store.set_replica(rep.model_copy(update={"state": ReplicaState.SUSPECT}))
                raise
            if self.store.finish_transfer(t.id, owner, file.size, dst.uri(t.lfn)):
                with self._limiter_lock:
                    report.done += 1
                    report.bytes += file.size
                self._register_butler(file, t.dst_site, dst)
        except (LdfError, OSError) as exc:
            self._failed(t, owner, exc, report)

    def _failed(self, t: Transfer, owner: str, exc: Exception, report: TransferReport) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, StagingRequiredError):
            retry_at: datetime | None = utcnow() + timedelta(seconds=1)
        elif t.attempts >= self.policy.max_attempts and not isinstance(exc, StorageFullError):
            retry_at = None
        else:
            # A full destination keeps the rule pending: retried with backoff, never given up.
            delay = min(self.policy.retry_base_s * 2 ** (t.attempts - 1), self.policy.retry_max_s)
            retry_at = utcnow() + timedelta(seconds=delay)
        self.store.fail_transfer(t.id, owner, message, retry_at)
        with self._limiter_lock:
            if retry_at is None:
                report.failed += 1
            else:
                report.retried += 1
            report.errors.append(f"{t.lfn} → {t.dst_site}/{t.dst_endpoint}: {message}")
        _log.warning("transfer %s of %s to %s failed: %s", t.id, t.lfn, t.dst_site, message)

    def run_transfers(
        self,
        *,
        workers: int | None = None,
        until_idle: bool = True,
        max_seconds: float | None = None,
        stop: threading.Event | None = None,
    ) -> TransferReport:
        """Drain the transfer queue with parallel workers.

        Parameters
        ----------
        workers
            Parallel copies (policy default when None).
        until_idle
            Return when nothing is due (else keep polling until ``stop`` or ``max_seconds``).
        max_seconds
            Stop claiming new work after this long.
        stop
            Set to stop claiming new work.
        """
        workers = workers or self.policy.transfer_workers
        owner = f"{uuid.uuid4().hex[:12]}"
        report = TransferReport()
        t0 = time.monotonic()
        for ep in self.endpoints():
            # Temp files of a worker killed mid-copy (never visible under a final name).
            ep.cleanup_partials(older_than_s=self.policy.lease_s)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transfer") as pool:
            while not (stop is not None and stop.is_set()):
                if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                    break
                batch = self.store.claim(owner, workers * 2, self.policy.lease_s)
                if not batch:
                    if until_idle:
                        break
                    time.sleep(self.policy.poll_s)
                    continue
                list(pool.map(lambda t: self._transfer_one(t, owner, report), batch))
        report.seconds = time.monotonic() - t0
        return report

    # -- access ----------------------------------------------------------------------------

    def best_replica(self, lfn: str, prefer_site: str | None = None) -> Replica:
        """The replica to read: available, preferred site first, then by tier."""
        lfn = validate_lfn(lfn)
        if self.store.get_file(lfn) is None:
            raise NotFoundError(f"{lfn}: not in the catalog")
        reps = [
            r
            for r in self.store.replicas(lfn)
            if r.state is ReplicaState.AVAILABLE and (r.site, r.endpoint) in self._endpoints
        ]
        if not reps:
            raise NotFoundError(f"{lfn}: no available replica (see 'ldf backbone stat {lfn}')")
        reps.sort(key=lambda r: (r.site != prefer_site, TIER_PREFERENCE[r.tier], r.site))
        return reps[0]

    def get(
        self,
        lfn: str,
        dest: Path,
        *,
        prefer_site: str | None = None,
        wait_s: float = 0.0,
    ) -> tuple[Path, Replica]:
        """Copy a file from its best replica to ``dest`` (a file or a directory).

        A nearline replica is staged first; with ``wait_s`` > 0 the call waits that long for
        staging, else it raises `StagingRequiredError` saying when the file will be ready.
        The copy is verified against the catalog's checksum and appears atomically.
        """
        rep = self.best_replica(lfn, prefer_site)
        file = self.store.get_file(rep.lfn)
        assert file is not None
        ep = self._endpoints[(rep.site, rep.endpoint)]
        if isinstance(ep, NearlineEndpoint) and not ep.is_staged(rep.lfn):
            ready = ep.request_stage(rep.lfn)
            deadline = time.time() + wait_s
            while not ep.is_staged(rep.lfn):
                if time.time() >= deadline:
                    when = datetime.fromtimestamp(ready).isoformat(timespec="seconds")
                    raise StagingRequiredError(
                        f"{rep.lfn} is on nearline storage at {rep.site}; staging requested, "
                        f"ready at {when} (retry then, or pass a wait)"
                    )
                time.sleep(min(0.2, max(0.01, ready - time.time())))
        target = Path(dest)
        if target.is_dir():
            target = target / Path(rep.lfn).name
        tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            with ep.open(rep.lfn) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
            got = checksum_file(tmp)
            if (got.size, got.blake3) != (file.size, file.blake3):
                raise ChecksumMismatchError(
                    f"{rep.lfn}: copy from {rep.site}/{rep.endpoint} does not match the catalog"
                )
            tmp.replace(target)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return target, rep

    # -- Butler ----------------------------------------------------------------------------

    def _register_butler(self, file: LogicalFile, site: str, ep: StorageEndpoint) -> bool:
        """Register a raw file in the site's Butler repository (when policy says so)."""
        if not self.policy.butler or file.metadata.get("dataset_type") != "raw":
            return False
        if ep.tier is not Tier.DISK:
            return False
        try:
            from ldf.backbone.butler import register_raw

            return register_raw(self, file, site, ep)
        except ImportError:  # pragma: no cover - the Butler part is optional at import time
            return False
