"""The embedded OCS bus: an append-only SQLite log that every local process shares.

Each message is a row of one table in ``<home>/bus/ocs.sqlite3`` (WAL mode, so readers
never block the writer). A bus instance reads new rows in log order and hands them to its
matching subscriptions: immediately when it published them itself (an `asyncio.Event`
wakes the reader), within `POLL_INTERVAL_S` when another process did. The log order is the
delivery order, so every subscriber sees each topic in the same order.

SQLite calls are short single statements made directly in the event loop: the database is
local and small, and one connection per bus keeps them simple and correct.

The log is trimmed now and then: rows older than the retention window go, except the
latest on each topic, which status displays read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from pathlib import Path

from ldf.errors import StorageError
from ldf.ocs.bus import Bus, Subscription
from ldf.ocs.models import Message, topic_matches

__all__ = ["POLL_INTERVAL_S", "EmbeddedBus"]

_log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.025
"""How often a bus looks for rows written by other processes."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    timestamp REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_topic ON messages (topic, pos);
"""


class EmbeddedBus(Bus):
    """The OCS bus as a SQLite log file.

    Parameters
    ----------
    path
        The log file (created with its directory if missing).
    command_timeout_s
        Default command timeout.
    retention_s
        Messages older than this are trimmed, except the latest per topic.
    trim_every
        Trim after this many messages published by this instance.
    """

    def __init__(
        self,
        path: Path,
        *,
        command_timeout_s: float = 10.0,
        retention_s: float = 3600.0,
        trim_every: int = 1000,
    ) -> None:
        super().__init__(command_timeout_s=command_timeout_s)
        self.path = path
        self.retention_s = retention_s
        self.trim_every = trim_every
        self._published = 0
        self._starts: dict[Subscription, int] = {}
        self._cursor = 0
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: every statement is its own short transaction.
            self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the bus log {path}: {exc}") from exc

    def _max_pos(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(pos), 0) FROM messages").fetchone()
        return int(row[0])

    async def _send(self, message: Message) -> None:
        try:
            self._db.execute(
                "INSERT INTO messages (topic, timestamp, body) VALUES (?, ?, ?)",
                (message.topic, message.timestamp, message.model_dump_json()),
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write to the bus log {self.path}: {exc}") from exc
        self._wake.set()
        self._published += 1
        if self._published % self.trim_every == 0:
            self.trim()

    def trim(self, now: float | None = None) -> int:
        """Delete messages older than the retention window, keeping the latest per topic.

        Returns
        -------
        int
            Number of messages deleted.
        """
        cutoff = (time.time() if now is None else now) - self.retention_s
        cur = self._db.execute(
            "DELETE FROM messages WHERE timestamp < ? AND pos NOT IN "
            "(SELECT MAX(pos) FROM messages GROUP BY topic)",
            (cutoff,),
        )
        return cur.rowcount

    async def _open_subscription(self, sub: Subscription) -> None:
        if self.closed:
            sub._end()
            return
        start = self._max_pos()
        if not self._starts:
            self._cursor = start
        self._starts[sub] = start
        self._subscriptions.add(sub)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(
                self._read_loop(), name=f"ocs-bus-reader {self.path}"
            )

    async def _close_subscription(self, sub: Subscription) -> None:
        await super()._close_subscription(sub)
        self._starts.pop(sub, None)

    async def _read_loop(self) -> None:
        while self._starts:
            self._wake.clear()
            try:
                rows = self._db.execute(
                    "SELECT pos, topic, body FROM messages WHERE pos > ? ORDER BY pos",
                    (self._cursor,),
                ).fetchall()
            except sqlite3.Error as exc:  # e.g. locked beyond the timeout: try again
                _log.warning("reading the bus log %s: %s", self.path, exc)
                rows = []
            for pos, topic, body in rows:
                self._cursor = pos
                message: Message | None = None
                for sub, start in list(self._starts.items()):
                    if pos > start and topic_matches(sub.pattern, topic):
                        message = message or Message.model_validate_json(body)
                        sub._deliver(message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL_S)

    async def latest(self, pattern: str) -> list[Message]:
        rows = self._db.execute(
            "SELECT topic, body FROM messages WHERE pos IN "
            "(SELECT MAX(pos) FROM messages GROUP BY topic) ORDER BY topic"
        ).fetchall()
        return [
            Message.model_validate_json(body)
            for topic, body in rows
            if topic_matches(pattern, topic)
        ]

    async def close(self) -> None:
        if self.closed:
            return
        await super().close()
        self._starts.clear()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._db.close()
