"""Keep each site's Butler repository in step with the raw files the Backbone holds there.

Rubin runs Rucio beside its Butlers; here the Backbone registers every raw file it stores on
a site's online disk in that site's `ldf.butler.ButlerRepo` (``transfer='direct'``: the
Butler points at the Backbone's file, never copies or deletes it), and removes the entry when
the file is deleted. The repository lives outside the storage endpoints, so audits never take
Butler's own files for dark data.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from ldf.backbone.endpoints import StorageEndpoint
from ldf.backbone.models import LogicalFile

if TYPE_CHECKING:
    from ldf.backbone.service import Backbone
    from ldf.butler.repo import ButlerRepo

__all__ = ["register_raw", "repo_for", "unregister_raw"]

_lock = threading.RLock()
"""Serializes Butler registry writes from the transfer threads (re-entrant: `repo_for` is
called with it held)."""


def repo_for(bb: Backbone, site: str) -> ButlerRepo:
    """The Butler repository of a site (created on first use), cached on the Backbone."""
    from ldf.butler.repo import ButlerRepo

    with _lock:
        repo = bb._butlers.get(site)
        if repo is None:
            conf = bb.settings.sites[site]
            root = conf.butler or str(bb.settings.home / "butler" / site)
            repo = ButlerRepo.create(root, db_url=conf.butler_db)
            bb._butlers[site] = repo
        return repo


def _local_path(uri: str) -> Path:
    parts = urlsplit(uri)
    return Path(unquote(parts.path)) if parts.scheme in ("file", "") else Path(uri)


def register_raw(bb: Backbone, file: LogicalFile, site: str, ep: StorageEndpoint) -> bool:
    """Register one raw replica in the site's Butler; True when it is (or already was)."""
    from ldf.butler.records import RawRecord

    path = _local_path(ep.uri(file.lfn))
    record = RawRecord.from_file(path)
    repo = repo_for(bb, site)
    with _lock:
        repo.ingest_raws([record], transfer="direct")
    return True


def unregister_raw(bb: Backbone, file: LogicalFile) -> int:
    """Remove a deleted raw from every site's Butler; returns datasets removed."""
    md = file.metadata
    if md.get("dataset_type") != "raw" or not bb.policy.butler:
        return 0
    try:
        instrument, exposure, detector = md["instrument"], int(md["exposure"]), str(md["detector"])
    except (KeyError, TypeError, ValueError):
        return 0
    removed = 0
    for site in bb.settings.sites:
        root = bb.settings.sites[site].butler or str(bb.settings.home / "butler" / site)
        if not Path(root, "butler.yaml").exists() and site not in bb._butlers:
            continue
        repo = repo_for(bb, site)
        with _lock:
            removed += repo.remove_raws(instrument, exposure, [detector])
    return removed
