"""The producers file: who may send telemetry, as which OCS device, on which topics.

A YAML file (mode 0600), read again whenever it changes, so an operator adds, rotates or
revokes a producer without restarting the gateway::

    # ldf telemetry producers (ldf telemetry producers add|rotate|remove)
    producers:
      - name: prompt-lsstcam
        device: MTPrompt
        topics: [imageQuality, calibrationQA]
        token_sha256: 5d41402abc4b2a76b9719d911017c592…
      - name: night-ops
        operator: true
        token_sha256: …

Only the SHA-256 of each token is kept: a copy of the file lets nobody send telemetry. A
token is looked up by its hash (a dict lookup, then a constant-time comparison), so the
cost does not grow with the number of producers. Writes go to a temporary file renamed
over the old one, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ldf.errors import ConfigError, NotFoundError, UserInputError
from ldf.telemetry.models import TOPICS, Producer

__all__ = ["ProducerFile", "hash_token", "new_token"]

_HEADER = "# ldf telemetry producers (ldf telemetry producers add|rotate|remove)\n"


def new_token() -> str:
    """A new random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The SHA-256 (hex) of a token, as the producers file keeps it."""
    return hashlib.sha256(token.encode()).hexdigest()


class ProducerFile:
    """The producers of a producers file, re-read when the file changes.

    Parameters
    ----------
    path
        The YAML file (missing: no producers yet).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._producers: list[Producer] = []
        self._by_hash: dict[str, Producer] = {}

    def producers(self) -> list[Producer]:
        """Every producer now, in file order.

        Raises
        ------
        ConfigError
            The file is not valid (the message says where).
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            with self._lock:
                self._stamp, self._producers, self._by_hash = None, [], {}
            return []
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                self._producers = _parse(self.path)
                self._by_hash = {p.token_sha256: p for p in self._producers}
                self._stamp = stamp
            return list(self._producers)

    def authenticate(self, token: str) -> Producer | None:
        """The producer holding ``token``, or None."""
        digest = hash_token(token)
        self.producers()
        with self._lock:
            found = self._by_hash.get(digest)
        if found is None or not hmac.compare_digest(found.token_sha256, digest):
            return None
        return found

    def get(self, name: str) -> Producer:
        """A producer by name.

        Raises
        ------
        NotFoundError
            No producer has that name.
        """
        for producer in self.producers():
            if producer.name == name:
                return producer
        raise NotFoundError(f"no telemetry producer {name!r} in {self.path}")

    # -- changes (the CLI) --------------------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        device: str | None,
        topics: list[str],
        operator: bool = False,
    ) -> str:
        """Add a producer with a new token; returns the token (shown once, never stored).

        Raises
        ------
        UserInputError
            The name is taken, or the entry is invalid (unknown topic, bad device name…).
        """
        producers = self.producers()
        if any(p.name == name for p in producers):
            raise UserInputError(
                f"telemetry producer {name!r} exists; use 'ldf telemetry producers rotate' "
                "for a new token"
            )
        token = new_token()
        entry = _validated(
            {
                "name": name,
                "device": device,
                "topics": topics,
                "operator": operator,
                "token_sha256": hash_token(token),
            }
        )
        self._write([*producers, entry])
        return token

    def rotate(self, name: str) -> str:
        """Give a producer a new token (the old one stops working); returns it.

        Raises
        ------
        NotFoundError
            No producer has that name.
        """
        old = self.get(name)
        token = new_token()
        updated = old.model_copy(update={"token_sha256": hash_token(token)})
        self._write([updated if p.name == name else p for p in self.producers()])
        return token

    def remove(self, name: str) -> None:
        """Remove a producer (its token stops working at once).

        Raises
        ------
        NotFoundError
            No producer has that name.
        """
        self.get(name)
        self._write([p for p in self.producers() if p.name != name])

    def _write(self, producers: list[Producer]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"producers": [_entry(p) for p in producers]}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_HEADER)
                yaml.safe_dump(body, f, sort_keys=False)
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).chmod(0o600)
            Path(tmp).replace(self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _entry(producer: Producer) -> dict[str, Any]:
    out: dict[str, Any] = {"name": producer.name}
    if producer.device is not None:
        out["device"] = producer.device
    if producer.topics:
        out["topics"] = list(producer.topics)
    if producer.operator:
        out["operator"] = True
    out["token_sha256"] = producer.token_sha256
    return out


def _validated(data: dict[str, Any], where: str = "") -> Producer:
    try:
        return Producer.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise UserInputError(
            f"{where}invalid producer {data.get('name')!r}: {field + ': ' if field else ''}{msg}"
            f" (topics: {', '.join(TOPICS)})"
        ) from None


def _parse(path: Path) -> list[Producer]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the telemetry producers file {path}: {exc}") from None
    entries = data.get("producers") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a 'producers:' list")
    out: list[Producer] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: producers[{i}] is not a mapping")
        try:
            out.append(_validated(entry, f"{path}: producers[{i}]: "))
        except UserInputError as exc:
            raise ConfigError(str(exc)) from None
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: producer names must be unique; repeated: {', '.join(dupes)}")
    if len({p.token_sha256 for p in out}) != len(out):
        raise ConfigError(f"{path}: two producers share a token; give each its own")
    return out
