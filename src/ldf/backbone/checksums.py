"""File checksums of the Data Backbone: size, Adler-32 and BLAKE3, computed in one pass.

Adler-32 is what Rucio and Rubin's transfer tools record (8 lowercase hex digits), so replicas
can be compared with theirs; BLAKE3 is the strong hash we trust for integrity audits. Both are
computed from the same buffer as it streams by, so a file is read once.
"""

from __future__ import annotations

import os
import re
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3 as _blake3

from ldf.errors import NotFoundError, StorageError, UserInputError

__all__ = ["ChecksumAccumulator", "Checksums", "checksum_bytes", "checksum_file"]

_ADLER_RE = re.compile(r"^[0-9a-f]{8}$")
_BLAKE3_RE = re.compile(r"^[0-9a-f]{64}$")

_PARALLEL_MIN = 1 << 20
"""Chunks at least this large get Adler-32 on a helper thread while BLAKE3 runs on the caller's.

Both hashes release the GIL, so on two cores this measured 2.9 GB/s against 1.6 GB/s for
one after the other (8 MiB chunks); BLAKE3's own threads (``max_threads``) gained less.
"""

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _adler_pool() -> ThreadPoolExecutor:
    """The process's helper threads for Adler-32, recreated after a fork (threads do not follow)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(
                max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="ldf-adler32"
            )
            _pool_pid = os.getpid()
        return _pool


@dataclass(frozen=True)
class Checksums:
    """Size and checksums of a file's bytes."""

    size: int
    """Length in bytes."""
    adler32: str
    """Adler-32 as 8 lowercase hex digits (Rucio's and Rubin's convention)."""
    blake3: str
    """BLAKE3-256 as 64 lowercase hex digits."""

    def __post_init__(self) -> None:
        if self.size < 0:
            raise UserInputError(f"checksum size must be >= 0, got {self.size}")
        if not _ADLER_RE.match(self.adler32):
            raise UserInputError(f"adler32 must be 8 lowercase hex digits, got {self.adler32!r}")
        if not _BLAKE3_RE.match(self.blake3):
            raise UserInputError(f"blake3 must be 64 lowercase hex digits, got {self.blake3!r}")

    def differences(self, other: Checksums) -> list[str]:
        """Name what differs from ``other``, e.g. ``['size 10 != 12', 'adler32 ...']``."""
        out = []
        for field in ("size", "adler32", "blake3"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                out.append(f"{field} {mine} != {theirs}")
        return out


class ChecksumAccumulator:
    """Accumulate size, Adler-32 and BLAKE3 over chunks of a stream.

    Feeding the same bytes in any chunking gives the same `Checksums`.
    """

    def __init__(self) -> None:
        self._size = 0
        self._adler = 1  # zlib.adler32(b"")
        self._blake = _blake3.blake3()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next chunk of bytes."""
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not n:
            return
        self._size += n
        if n < _PARALLEL_MIN:
            self._adler = zlib.adler32(data, self._adler)
            self._blake.update(data)
            return
        # Wait for the helper before returning: the caller may reuse its buffer at once.
        fut: Future[int] = _adler_pool().submit(zlib.adler32, data, self._adler)
        try:
            self._blake.update(data)
        finally:
            self._adler = fut.result()

    def result(self) -> Checksums:
        """The checksums of everything fed so far (feeding may continue afterwards)."""
        return Checksums(
            size=self._size,
            adler32=f"{self._adler & 0xFFFFFFFF:08x}",
            blake3=self._blake.hexdigest(),
        )


def checksum_bytes(data: bytes | bytearray | memoryview) -> Checksums:
    """Checksums of an in-memory buffer."""
    acc = ChecksumAccumulator()
    acc.update(data)
    return acc.result()


def checksum_file(path: Path, *, chunk_size: int = 8 << 20) -> Checksums:
    """Checksums of a file, read once in chunks of ``chunk_size`` bytes.

    Parameters
    ----------
    path
        File to read.
    chunk_size
        Bytes read per system call; one buffer of this size is reused.

    Raises
    ------
    NotFoundError
        The file does not exist.
    StorageError
        The file could not be read.
    """
    if chunk_size <= 0:
        raise UserInputError(f"chunk_size must be > 0, got {chunk_size}")
    acc = ChecksumAccumulator()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                acc.update(view[:n])
    except FileNotFoundError as exc:
        raise NotFoundError(f"cannot checksum {path}: no such file") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"cannot checksum {path}: is a directory") from exc
    except OSError as exc:
        raise StorageError(f"cannot checksum {path}: {exc.strerror or exc}") from exc
    return acc.result()
