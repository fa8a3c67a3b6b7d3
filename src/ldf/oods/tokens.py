"""Bearer tokens of the OODS HTTP API: a file of accepted tokens, one per line.

The file is read again whenever it changes, so an operator adds or revokes a token by editing
it, without restarting the service. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from pathlib import Path

from ldf.errors import ConfigError

__all__ = ["TokenFile", "ensure_token_file"]


def ensure_token_file(path: Path) -> bool:
    """Create ``path`` with one random token (mode 0600) unless it exists; True if created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write("# OODS bearer tokens, one per line ('Authorization: Bearer <token>')\n")
        f.write(secrets.token_urlsafe(32) + "\n")
    return True


class TokenFile:
    """The accepted tokens of a token file, re-read when the file changes.

    Parameters
    ----------
    path
        The file: one token per line; blank lines and lines starting with '#' are ignored.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: list[bytes] = []

    def tokens(self) -> list[bytes]:
        """The accepted tokens now.

        Raises
        ------
        ConfigError
            The file cannot be read.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise ConfigError(
                f"OODS token file {self.path} does not exist (ldf serve oods creates it)"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                lines = self.path.read_text().splitlines()
                self._tokens = [
                    s.encode() for line in lines if (s := line.strip()) and not s.startswith("#")
                ]
                self._stamp = stamp
            return self._tokens

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is one of the accepted tokens (constant-time comparisons)."""
        given = token.encode()
        ok = False
        for accepted in self.tokens():
            ok |= hmac.compare_digest(given, accepted)
        return ok

    def first(self) -> str:
        """The first token (for local clients such as benchmarks and tests)."""
        tokens = self.tokens()
        if not tokens:
            raise ConfigError(f"OODS token file {self.path} holds no token")
        return tokens[0].decode()
