"""The OODS's logic: index arrivals, find, read under lease, pin, expire (LDM-230 2.6).

The cache is a plain directory tree in a predictable hierarchy,
``<root>/<instrument>/<day_obs>/<obs_id>/<obs_id>_<detector>.fits``, which the archiver
writes atomically; `Oods.add` then indexes the file, registers raws in the OODS's own Butler
repository (``transfer='direct'``: the Butler points at the cached file, never copies it;
the repository lives beside the tree, not in it) and wakes live followers of the arrival
stream. `Oods.expire` removes what falls out of the retention window — never a pinned file,
never one under a read lease — from the index, the Butler and the disk, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ldf.config import Settings
from ldf.db import utcnow
from ldf.errors import ChecksumMismatchError, NotFoundError, StorageError, UserInputError
from ldf.oods.models import ExpiryReport, OodsEntry, Pin
from ldf.oods.storage import FILTERS, IndexStore

if TYPE_CHECKING:
    from ldf.butler.repo import ButlerRepo

__all__ = ["Followers", "Oods", "ReadLease"]

_log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""Instrument, obs_id and detector names: one path component each, never '.' or '..'."""

_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Dataset and observation types."""

_CHECKSUM_RE = re.compile(r"^(?:[0-9a-f]{8}|[0-9a-f]{64})$")
"""Adler-32 (8 hex digits) or BLAKE3 (64 hex digits), lowercase."""

RAW = "raw"
"""The dataset type registered in the OODS Butler."""


def _name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise UserInputError(
            f"invalid {kind} {value!r}: use letters, digits, '_' and '-' (at most 64)"
        )
    return value


def _type(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _TYPE_RE.match(value):
        raise UserInputError(f"invalid {kind} {value!r}: use letters, digits, '_', '.', '-'")
    return value


def _day_obs(value: int) -> int:
    valid = isinstance(value, int) and not isinstance(value, bool)
    if not valid or not 1000_01_01 <= value <= 9999_12_31:
        raise UserInputError(f"invalid day_obs {value!r}: use YYYYMMDD")
    return value


class Followers:
    """Live followers of the arrival stream, woken from any thread when a file arrives.

    Each follower is an `asyncio.Event` of its own event loop; `notify` sets them all
    thread-safely. Arrivals indexed by another process are found by the followers' polling.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def subscribe(self) -> asyncio.Event:
        """A new follower's event (call in its event loop)."""
        event = asyncio.Event()
        with self._lock:
            self._events.add((asyncio.get_running_loop(), event))
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        """Forget a follower."""
        with self._lock:
            self._events = {(loop, e) for loop, e in self._events if e is not event}

    def __len__(self) -> int:
        return len(self._events)

    def notify(self) -> None:
        """Wake every follower."""
        with self._lock:
            waiting = list(self._events)
        for loop, event in waiting:
            with contextlib.suppress(RuntimeError):  # its loop has closed
                loop.call_soon_threadsafe(event.set)


class ReadLease:
    """A read lease on a cached file: expiry leaves the file alone until it is released.

    A context manager whose value is the file's path. Leases lapse after the policy's
    ``read_lease_s`` unless renewed, so a crashed reader never pins a file for ever.
    """

    def __init__(self, oods: Oods, entry: OodsEntry, lease_id: str, path: Path) -> None:
        self.oods = oods
        self.entry = entry
        self.id = lease_id
        self.path = path
        self._released = False

    def renew(self) -> None:
        """Extend the lease by ``read_lease_s`` from now."""
        self.oods.store.renew_lease(self.id, utcnow() + self.oods.lease_duration)

    def release(self) -> None:
        """End the lease (idempotent)."""
        if not self._released:
            self._released = True
            self.oods.store.release_lease(self.id)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Oods:
    """The Observatory Operations Data Service over one cache root and index."""

    def __init__(self, settings: Settings, store: IndexStore, root: Path, butler_root: Path):
        self.settings = settings
        self.policy = settings.policies.oods
        self.store = store
        self.root = root
        self.butler_root = butler_root
        self.followers = Followers()
        self._butler: ButlerRepo | None = None
        self._butler_lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings) -> Oods:
        """The OODS of a configuration: its cache root created, its index migrated.

        The root is ``policies.oods.root`` (default ``$LDF_HOME/oods``); the Butler
        repository is ``oods-butler`` beside the root, outside the file tree.
        """
        policy = settings.policies.oods
        if policy.root:
            root = Path(policy.root).expanduser().absolute()
            butler_root = root.parent / "oods-butler"
        else:
            root = settings.home / "oods"
            butler_root = settings.home / "oods-butler"
        root.mkdir(parents=True, exist_ok=True)
        return cls(settings, IndexStore.open(settings.database_url("oods")), root, butler_root)

    def close(self) -> None:
        """Release database connections (the index's and the Butler's)."""
        with self._butler_lock:
            if self._butler is not None:
                self._butler.close()
                self._butler = None
        self.store.close()

    def __enter__(self) -> Oods:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lease_duration(self) -> timedelta:
        """How long a read lease protects a file unless renewed."""
        return timedelta(seconds=self.policy.read_lease_s)

    @property
    def token_path(self) -> Path:
        """The file of accepted HTTP bearer tokens."""
        if self.policy.token_file:
            return Path(self.policy.token_file).expanduser().absolute()
        # Outside the cache root, so the cache holds exactly its predictable hierarchy.
        return self.settings.home / "secrets" / "oods-tokens"

    def butler(self) -> ButlerRepo:
        """The OODS Butler repository (created on first use)."""
        from ldf.butler.repo import ButlerRepo

        with self._butler_lock:
            if self._butler is None:
                self._butler = ButlerRepo.create(self.butler_root)
            return self._butler

    # -- paths -----------------------------------------------------------------------------

    def relpath_for(self, instrument: str, day_obs: int, obs_id: str, detector: str) -> str:
        """The POSIX path of a file relative to the root (validates every component)."""
        _name("instrument", instrument)
        _day_obs(day_obs)
        _name("obs_id", obs_id)
        _name("detector", detector)
        return f"{instrument}/{day_obs}/{obs_id}/{obs_id}_{detector}.fits"

    def path_for(self, instrument: str, day_obs: int, obs_id: str, detector: str) -> Path:
        """Where a file lives: ``<root>/<instrument>/<day_obs>/<obs_id>/<obs_id>_<detector>.fits``.

        Raises
        ------
        UserInputError
            A component is not a plain name (e.g. contains '/' or is '..').
        """
        return self.root / self.relpath_for(instrument, day_obs, obs_id, detector)

    def local_path(self, entry: OodsEntry) -> Path:
        """The file of an entry, checked to be a regular file inside the root.

        Raises
        ------
        NotFoundError
            The file is missing, or resolves (through a symbolic link) outside the root.
        """
        path = self.root / entry.path
        try:
            resolved = path.resolve(strict=True)
        except (FileNotFoundError, RuntimeError):
            raise NotFoundError(f"{entry.path} is not in the OODS cache") from None
        if not resolved.is_relative_to(self.root.resolve()) or not resolved.is_file():
            _log.warning("refusing %s: it resolves to %s, outside the cache", path, resolved)
            raise NotFoundError(f"{entry.path} is not in the OODS cache")
        return resolved

    # -- arrivals --------------------------------------------------------------------------

    def add(
        self,
        path: Path,
        *,
        instrument: str,
        day_obs: int,
        obs_id: str,
        exposure_id: int,
        detector: str,
        obs_type: str,
        dataset_type: str = RAW,
        size: int,
        checksum: str,
        arrived_at: datetime | None = None,
    ) -> OodsEntry:
        """Index a file the archiver has written at ``path_for(...)``.

        Idempotent on (instrument, obs_id, detector): the same size and checksum again is a
        no-op; new content (the file was rewritten) updates the entry and arrives again.
        Raws are registered in the OODS Butler before they are indexed, so a file found in
        the index is always in the Butler too.

        Raises
        ------
        UserInputError
            ``path`` is not ``path_for(...)`` (e.g. outside the root), is a symbolic link,
            or its size differs from ``size``; a bad name or checksum.
        NotFoundError
            The file does not exist.
        """
        expected = self.path_for(instrument, day_obs, obs_id, detector)
        _type("obs_type", obs_type)
        _type("dataset_type", dataset_type)
        checksum = checksum.lower() if isinstance(checksum, str) else checksum
        if not isinstance(checksum, str) or not _CHECKSUM_RE.match(checksum):
            raise UserInputError(
                f"invalid checksum {checksum!r}: give Adler-32 (8 hex digits) or BLAKE3 (64)"
            )
        if arrived_at is not None and arrived_at.tzinfo is None:
            raise UserInputError("arrived_at must be timezone-aware")
        given = Path(path).absolute()
        if given.parent.resolve() / given.name != expected.parent.resolve() / expected.name:
            raise UserInputError(
                f"{path} is not where the OODS keeps this file; write it at {expected}"
            )
        if given.is_symlink():
            raise UserInputError(f"{path} is a symbolic link; the OODS caches real files only")
        try:
            actual = given.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"cannot cache {path}: no such file") from None
        if actual != size:
            raise UserInputError(f"{path} has {actual} bytes, not the {size} given")
        if dataset_type == RAW:
            self._register_raw(expected)
        now = utcnow()
        entry, arrived = self.store.upsert(
            {
                "instrument": instrument,
                "day_obs": day_obs,
                "obs_id": obs_id,
                "exposure_id": int(exposure_id),
                "detector": detector,
                "obs_type": obs_type,
                "dataset_type": dataset_type,
                "path": self.relpath_for(instrument, day_obs, obs_id, detector),
                "size": size,
                "checksum": checksum,
                "arrived_at": arrived_at or now,
            },
            now,
        )
        if arrived:
            self.followers.notify()
        return entry

    def _register_raw(self, path: Path) -> None:
        from ldf.butler.records import RawRecord

        record = RawRecord.from_file(path)
        repo = self.butler()
        with self._butler_lock:
            repo.ingest_raws([record], transfer="direct")

    # -- queries ---------------------------------------------------------------------------

    def find(
        self,
        *,
        since: datetime | None = None,
        limit: int | None = None,
        **filters: Any,
    ) -> list[OodsEntry]:
        """Cached files matching every filter given (oldest arrival in the index first).

        Filters: instrument, day_obs, exposure (id), obs_id, detector, obs_type,
        dataset_type; ``since`` keeps files that arrived at or after it.

        Raises
        ------
        UserInputError
            An unknown filter or a bad limit.
        """
        unknown = sorted(set(filters) - set(FILTERS))
        if unknown:
            raise UserInputError(
                f"unknown filter {unknown[0]!r}; use one of {', '.join([*FILTERS, 'since'])}"
            )
        if limit is not None and limit < 1:
            raise UserInputError(f"limit must be >= 1, got {limit}")
        if since is not None and since.tzinfo is None:
            raise UserInputError("since must be timezone-aware")
        return self.store.find(since=since, limit=limit, **filters)

    def get(self, instrument: str, obs_id: str, detector: str) -> OodsEntry:
        """One cached file by data ID.

        Raises
        ------
        NotFoundError
            It is not cached.
        """
        entry = self.store.get(instrument, obs_id, detector)
        if entry is None:
            raise NotFoundError(f"{instrument} {obs_id} {detector} is not in the OODS cache")
        return entry

    def entry_for_file(
        self, instrument: str, day_obs: int, obs_id: str, filename: str
    ) -> OodsEntry:
        """The entry at ``<instrument>/<day_obs>/<obs_id>/<filename>`` (the HTTP file path).

        Raises
        ------
        NotFoundError
            No such cached file (including any name that is not a plain component).
        """
        shown = f"{instrument}/{day_obs}/{obs_id}/{filename}"
        prefix, suffix = f"{obs_id}_", ".fits"
        detector = filename[len(prefix) : -len(suffix)]
        if not (filename.startswith(prefix) and filename.endswith(suffix)):
            raise NotFoundError(f"{shown} is not in the OODS cache")
        try:
            relpath = self.relpath_for(instrument, day_obs, obs_id, detector)
        except UserInputError:
            raise NotFoundError(f"{shown} is not in the OODS cache") from None
        entry = self.store.get(instrument, obs_id, detector)
        if entry is None or entry.path != relpath:
            raise NotFoundError(f"{shown} is not in the OODS cache")
        return entry

    # -- reading ---------------------------------------------------------------------------

    def open_for_read(self, entry: OodsEntry, *, holder: str = "") -> ReadLease:
        """Take a read lease on a cached file; use as ``with oods.open_for_read(e) as path``.

        Raises
        ------
        NotFoundError
            The file has left the cache (or is not a regular file inside the root).
        """
        lease_id = str(uuid.uuid4())
        self.store.acquire_lease(lease_id, entry.id, holder[:128], utcnow() + self.lease_duration)
        try:
            path = self.local_path(entry)
        except BaseException:
            self.store.release_lease(lease_id)
            raise
        return ReadLease(self, entry, lease_id, path)

    def copy_to(self, entry: OodsEntry, dest: Path) -> Path:
        """Copy a cached file to ``dest`` (a file, or a directory to put it in), verified.

        The copy is written beside its destination, checked against the entry's checksum
        and renamed into place; the source is read under a lease.

        Raises
        ------
        ChecksumMismatchError
            The copy's bytes differ from the index's checksum (nothing is left at dest).
        StorageError
            Writing failed.
        """
        from ldf.backbone.checksums import checksum_file

        target = dest / entry.filename if dest.is_dir() else dest
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
        try:
            with self.open_for_read(entry, holder="copy") as src:
                shutil.copyfile(src, tmp)
            sums = checksum_file(tmp)
            got = sums.adler32 if len(entry.checksum) == 8 else sums.blake3
            if got != entry.checksum or sums.size != entry.size:
                raise ChecksumMismatchError(
                    f"copy of {entry.path} has checksum {got} and {sums.size} bytes, "
                    f"expected {entry.checksum} and {entry.size}"
                )
            tmp.replace(target)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot copy {entry.path} to {target}: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return target

    # -- pins ------------------------------------------------------------------------------

    @staticmethod
    def _selector(
        obs_id: str | None, exposure: int | None, day_obs: int | None, instrument: str | None
    ) -> dict[str, Any]:
        given = [v for v in (obs_id, exposure, day_obs) if v is not None]
        if len(given) != 1:
            raise UserInputError("name exactly one of obs_id, exposure or day_obs")
        return {
            "instrument": None if instrument is None else _name("instrument", instrument),
            "obs_id": None if obs_id is None else _name("obs_id", obs_id),
            "exposure_id": exposure,
            "day_obs": None if day_obs is None else _day_obs(day_obs),
        }

    def pin(
        self,
        *,
        obs_id: str | None = None,
        exposure: int | None = None,
        day_obs: int | None = None,
        instrument: str | None = None,
        reason: str = "",
        by: str = "",
    ) -> Pin:
        """Pin files by obs_id, exposure id or day_obs (optionally of one instrument).

        Pinned files never expire, including files that arrive after the pin. Pinning the
        same selector again returns the existing pin.

        Raises
        ------
        UserInputError
            Not exactly one of obs_id, exposure, day_obs; or a bad value.
        """
        selector = self._selector(obs_id, exposure, day_obs, instrument)
        return self.store.add_pin(selector, reason[:512], by[:128], utcnow())

    def unpin(
        self,
        *,
        obs_id: str | None = None,
        exposure: int | None = None,
        day_obs: int | None = None,
        instrument: str | None = None,
    ) -> int:
        """Remove the pin with exactly this selector; returns how many pins were removed.

        Raises
        ------
        NotFoundError
            No pin has this selector.
        """
        selector = self._selector(obs_id, exposure, day_obs, instrument)
        removed = self.store.remove_pins(selector)
        if not removed:
            raise NotFoundError("no such pin (see `ldf oods status` for the pins)")
        return removed

    def pins(self) -> list[Pin]:
        """Every pin, with how many cached files it selects."""
        return self.store.pins()

    # -- expiry ----------------------------------------------------------------------------

    def retention_days(self, instrument: str, dataset_type: str) -> float | None:
        """Days a class of files is kept: 'instrument/dataset_type' wins over 'dataset_type',
        which wins over '*'; None (kept until an operator removes it) when none is set."""
        days = self.policy.retention_days
        for key in (f"{instrument}/{dataset_type}", dataset_type, "*"):
            if key in days:
                return days[key]
        return None

    def expire(self, now: datetime | None = None, dry_run: bool = False) -> ExpiryReport:
        """Remove what fell out of its retention window; never pinned, never leased files.

        Each file leaves the index first (in one transaction that re-checks pins and
        leases), then the Butler, then the disk (and directories left empty).
        """
        now = now or utcnow()
        if now.tzinfo is None:
            raise UserInputError("now must be timezone-aware")
        cutoffs = []
        for instrument, dataset_type in self.store.classes():
            days = self.retention_days(instrument, dataset_type)
            if days is not None:
                cutoffs.append((instrument, dataset_type, now - timedelta(days=days)))
        report = ExpiryReport(now=now, dry_run=dry_run)
        removed: list[OodsEntry] = []
        for entry, leased in self.store.past_window(cutoffs, now):
            if entry.pinned:
                report.kept_pinned += 1
            elif leased:
                report.kept_leased += 1
            elif dry_run or self.store.delete_expirable(entry.id, now):
                removed.append(entry)
            else:  # pinned or leased since we looked
                report.kept_leased += 1
        report.removed = len(removed)
        report.bytes = sum(e.size for e in removed)
        report.paths = [e.path for e in removed[:1000]]
        if dry_run or not removed:
            return report
        report.butler_removed = self._unregister(removed, report.errors)
        for entry in removed:
            self._remove_file(entry, report.errors)
        self.store.purge_lapsed_leases(now)
        _log.info("expired %d files (%d bytes)", report.removed, report.bytes)
        return report

    def _unregister(self, entries: list[OodsEntry], errors: list[str]) -> int:
        by_exposure: dict[tuple[str, int], list[str]] = {}
        for e in entries:
            if e.dataset_type == RAW:
                by_exposure.setdefault((e.instrument, e.exposure_id), []).append(e.detector)
        if not by_exposure or not (self.butler_root / "butler.yaml").exists():
            return 0
        repo = self.butler()
        removed = 0
        for (instrument, exposure_id), detectors in by_exposure.items():
            try:
                with self._butler_lock:
                    removed += repo.remove_raws(instrument, exposure_id, detectors)
            except Exception as exc:  # keep expiring the rest; report what failed
                errors.append(f"butler {instrument} {exposure_id}: {exc}")
        return removed

    def _remove_file(self, entry: OodsEntry, errors: list[str]) -> None:
        path = self.root / entry.path
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            errors.append(f"{entry.path}: {exc.strerror}")
            return
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): stop climbing
                break
            parent = parent.parent

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counts and bytes per instrument and dataset type, pins, oldest and newest
        arrivals, active read leases, free disk and the retention policy."""
        summary = self.store.summary()
        usage = shutil.disk_usage(self.root)
        return {
            "root": str(self.root),
            "butler": str(self.butler_root),
            **summary,
            "active_leases": self.store.active_leases(utcnow()),
            "last_event_id": self.store.last_event_id(),
            "free_bytes": usage.free,
            "disk_bytes": usage.total,
            "retention_days": dict(self.policy.retention_days),
            "pin_list": [p.model_dump(mode="json") for p in self.pins()],
        }
