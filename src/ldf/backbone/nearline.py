"""Nearline (tape-like) storage endpoints: writes go straight in, reads need staging."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from ldf.backbone.endpoints import STAGING_DIR, TEMP_PREFIX, PosixEndpoint, validate_lfn
from ldf.config.models import Tier
from ldf.errors import StagingRequiredError

__all__ = ["NearlineEndpoint"]


class NearlineEndpoint(PosixEndpoint):
    """A tape-like endpoint: writes go straight in; a read needs a staging request first.

    Staging completes ``staging_delay_s`` after it is requested. Staging state lives in
    ``<root>/.staging/<lfn>.json``, so it survives a restart of the process.

    Parameters
    ----------
    site
        Site the endpoint belongs to.
    name
        Endpoint name, unique within its site.
    root
        Directory holding the endpoint's files.
    staging_delay_s
        Seconds between a staging request and the file becoming readable.
    """

    def __init__(
        self,
        site: str,
        name: str,
        root: Path,
        *,
        staging_delay_s: float = 0.0,
    ) -> None:
        super().__init__(site, name, root, Tier.NEARLINE)
        self.staging_delay_s = staging_delay_s
        """Seconds a staging request takes."""

    def _state_path(self, lfn: str) -> Path:
        return self.root / STAGING_DIR / f"{validate_lfn(lfn)}.json"

    def _ready_at(self, lfn: str) -> float | None:
        try:
            data = json.loads(self._state_path(lfn).read_text())
            return float(data["ready_at"])
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a corrupt state file counts as not requested; a new request fixes it

    def request_stage(self, lfn: str) -> float:
        """Ask for ``lfn`` to be staged; return the UTC time (epoch seconds) it will be readable.

        Asking again while a request is pending or done returns the earlier time.
        """
        self._stat(lfn)
        ready = self._ready_at(lfn)
        if ready is not None:
            return ready
        now = time.time()
        ready = now + self.staging_delay_s
        state = self._state_path(lfn)
        state.parent.mkdir(parents=True, exist_ok=True)
        temp = state.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        try:
            temp.write_text(json.dumps({"lfn": lfn, "requested_at": now, "ready_at": ready}))
            temp.replace(state)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        return ready

    def is_staged(self, lfn: str) -> bool:
        """Whether ``lfn`` has been staged and may be read now."""
        ready = self._ready_at(lfn)
        return ready is not None and time.time() >= ready and self.exists(lfn)

    def release(self, lfn: str) -> None:
        """Forget the staged copy of ``lfn`` (reading it again needs a new request)."""
        state = self._state_path(lfn)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            state.unlink()
        self._prune_state(state.parent)

    def _prune_state(self, directory: Path) -> None:
        top = self.root / STAGING_DIR
        while directory != top and top in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def open(self, lfn: str) -> BinaryIO:
        """Open a staged ``lfn`` for reading; `StagingRequiredError` if it is not staged."""
        self._stat(lfn)
        ready = self._ready_at(lfn)
        if ready is None:
            raise StagingRequiredError(
                f"{lfn} on {self.label} is on nearline storage; request staging before reading it"
            )
        if time.time() < ready:
            raise StagingRequiredError(
                f"{lfn} on {self.label} is still being staged; readable in "
                f"{ready - time.time():.1f} s"
            )
        return super().open(lfn)

    def delete(self, lfn: str) -> bool:
        """Remove ``lfn`` and its staging state; return whether it existed."""
        existed = super().delete(lfn)
        self.release(lfn)
        return existed

    def quarantine(self, lfn: str) -> str:
        """Move ``lfn`` aside (see `PosixEndpoint.quarantine`) and forget its staging state."""
        where = super().quarantine(lfn)
        self.release(lfn)
        return where
