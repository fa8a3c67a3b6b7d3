"""Who may talk to alert distribution: brokers, producers, operators, mini-broker users.

Credentials live in one YAML file (default ``$LDF_HOME/secrets/alerts-credentials.yaml``,
mode 0600), re-read whenever it changes, so an operator adds or revokes a broker without a
restart::

    principals:
      - name: fink
        role: broker            # reads its own feeds, fetches alerts by id, replays
        token_sha256: 6f1e...   # SHA-256 of the bearer token; the token itself is never stored
      - name: prompt
        role: producer          # ingests alerts, closes visits
      - name: ops
        role: operator          # everything, every feed
      - name: jdoe
        role: user              # a mini-broker user: its own filters and streams

Tokens are compared by their SHA-256 in constant time. ``add`` creates a principal with a
random token and returns the token once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import threading
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ldf.alerts.models import NAME_PATTERN, _check_name
from ldf.errors import ConfigError, StateError

__all__ = ["Credentials", "Principal", "Role"]


class Role(StrEnum):
    """What a principal may do."""

    BROKER = "broker"
    PRODUCER = "producer"
    OPERATOR = "operator"
    USER = "user"


class Principal(BaseModel):
    """One authenticated party."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    role: Role
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "principal name")


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    principals: list[Principal] = Field(default_factory=list)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Credentials:
    """The principals of a credentials file, re-read when the file changes.

    Parameters
    ----------
    path
        The YAML file (missing: nobody is authorized).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._principals: list[Principal] = []

    def principals(self) -> list[Principal]:
        """Every principal now.

        Raises
        ------
        ConfigError
            The file is not valid.
        """
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._principals = None, []
                return []
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    data = yaml.safe_load(self.path.read_text()) or {}
                    parsed = _File.model_validate(data)
                except (yaml.YAMLError, ValidationError) as exc:
                    raise ConfigError(
                        f"{self.path}: invalid credentials file: {str(exc).splitlines()[0]}"
                    ) from exc
                names = [p.name for p in parsed.principals]
                if len(names) != len(set(names)):
                    raise ConfigError(f"{self.path}: a principal name appears twice")
                self._principals, self._stamp = parsed.principals, stamp
            return list(self._principals)

    def authenticate(self, token: str) -> Principal | None:
        """The principal a bearer token belongs to, or None."""
        digest = _digest(token)
        found = None
        for p in self.principals():
            if hmac.compare_digest(p.token_sha256, digest):
                found = p
        return found

    def add(self, name: str, role: Role) -> str:
        """Add a principal with a new random token; returns the token (shown once).

        Raises
        ------
        StateError
            A principal of that name exists.
        """
        token = secrets.token_urlsafe(32)
        principal = Principal(name=name, role=role, token_sha256=_digest(token))
        existing = self.principals()
        if any(p.name == name for p in existing):
            raise StateError(f"principal {name!r} exists; remove it first to issue a new token")
        self._write([*existing, principal])
        return token

    def remove(self, name: str) -> bool:
        """Remove a principal (its token stops working at once); False if unknown."""
        existing = self.principals()
        kept = [p for p in existing if p.name != name]
        if len(kept) == len(existing):
            return False
        self._write(kept)
        return True

    def _write(self, principals: list[Principal]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = yaml.safe_dump(
            {"principals": [p.model_dump(mode="json") for p in principals]}, sort_keys=False
        )
        fd, tmp = tempfile.mkstemp(prefix=".credentials.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("# ldf alert distribution credentials (ldf alerts credentials add)\n")
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            Path(tmp).chmod(0o600)
            Path(tmp).replace(self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
