"""Clients of alert distribution: producers, brokers' feed consumers, exactly-once delivery.

* :class:`AlertClient` — the HTTP API for producers (ingest, close a visit), brokers (feeds,
  replays, alerts by id, manifests) and operators (status, audit).
* :class:`FeedSource` — what every transport's consumer does: fetch the entries after a
  position (long-polling), acknowledge a position. :class:`HttpFeedSource` is the embedded
  transport's; ``ldf.alerts.nats`` has JetStream's. One contract suite tests both.
* :class:`DurableConsumer` — exactly once over any source: it stores what the application
  made of a batch and the batch's last position in one SQLite transaction, then acknowledges.
  After a crash anywhere it resumes from its stored position, so the application sees each
  entry once, whatever was or was not acknowledged.
"""

from __future__ import annotations

import http.client
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from ldf.alerts import formats
from ldf.errors import LdfError, NotFoundError, StateError, TransportError, UserInputError

__all__ = ["AlertClient", "DurableConsumer", "Entry", "FeedSource", "HttpFeedSource"]


@dataclass(slots=True)
class Entry:
    """One entry a feed presented: its header (position, kind, alert_id, visit…) and body."""

    header: dict[str, Any]
    body: bytes

    @property
    def position(self) -> int:
        """Position in the log."""
        return int(self.header["position"])

    @property
    def kind(self) -> str:
        """``'alert'`` or ``'manifest'``."""
        return str(self.header["kind"])

    @property
    def alert_id(self) -> int | None:
        """The alert's id (alerts only)."""
        value = self.header.get("alert_id")
        return None if value is None else int(value)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    status = response.status_code
    if status == 404:
        raise NotFoundError(message)
    if status == 409:
        raise StateError(message)
    if status in (400, 401, 403, 413, 422):
        raise UserInputError(f"{status}: {message}")
    raise TransportError(f"alert service answered {status}: {message}")


class AlertClient:
    """The alert distribution HTTP API.

    Parameters
    ----------
    url
        Base URL, e.g. ``http://127.0.0.1:8031``.
    token
        The caller's bearer token.
    timeout_s
        Request timeout (long-polls add their wait to it).
    """

    def __init__(self, url: str, token: str, *, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url + "/alerts/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        """Close connections."""
        self._http.close()

    def __enter__(self) -> AlertClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"alert service at {self.url} unreachable: {exc}") from exc
        _raise_for(response)
        return response

    # producers
    def ingest(self, packets: Sequence[bytes]) -> dict[str, Any]:
        """Hand packets over; returns once they are durable (accepted, duplicates)."""
        packets = list(packets)
        # Streamed in ~1 MB pieces with its length known: no copy of the whole body.
        headers = {
            "Content-Type": "application/x-ldf-alert-packets",
            "Content-Length": str(formats.packed_size(packets)),
        }
        result: dict[str, Any] = self._request(
            "POST", "/ingest", content=formats.iter_packed(packets), headers=headers
        ).json()
        return result

    def close_visit(self, visit: int) -> dict[str, Any]:
        """Publish a visit's manifest."""
        result: dict[str, Any] = self._request("POST", f"/visits/{visit}/close").json()
        return result

    # brokers
    def create_feed(self, **spec: Any) -> dict[str, Any]:
        """Create a feed (see `ldf.alerts.models.FeedSpec`)."""
        result: dict[str, Any] = self._request("POST", "/feeds", json=spec).json()
        return result

    def feeds(self) -> list[dict[str, Any]]:
        """The caller's feeds."""
        result: list[dict[str, Any]] = self._request("GET", "/feeds").json()
        return result

    def feed_status(self, feed: str) -> dict[str, Any]:
        """One feed's audit figures."""
        result: dict[str, Any] = self._request("GET", f"/feeds/{feed}").json()
        return result

    def replay(self, **spec: Any) -> dict[str, Any]:
        """Ask for a replay (see `ldf.alerts.models.ReplaySpec`)."""
        result: dict[str, Any] = self._request("POST", "/replays", json=spec).json()
        return result

    def alert(self, alert_id: int, format: str = "full") -> bytes:
        """One stored alert."""
        return self._request("GET", f"/alerts/{alert_id}", params={"format": format}).content

    def manifest(self, visit: int) -> dict[str, Any]:
        """A visit's latest manifest."""
        result: dict[str, Any] = self._request("GET", f"/visits/{visit}/manifest").json()
        return result

    def visit_alert_ids(self, visit: int) -> list[int]:
        """The alertIds of a visit."""
        return list(self._request("GET", f"/visits/{visit}/alerts").json()["alert_ids"])

    def schema(self, schema_id: int) -> dict[str, Any]:
        """An alert schema by registry id (``{"schema": "<json>", "version"}``)."""
        result: dict[str, Any] = self._request("GET", f"/schemas/ids/{schema_id}").json()
        return result

    def status(self) -> dict[str, Any]:
        """The service's status (the caller's feeds; every feed for operators)."""
        result: dict[str, Any] = self._request("GET", "/status").json()
        return result

    # feeds, the embedded transport
    def entries(
        self,
        feed: str,
        *,
        after: int | None,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        wait_s: float = 0.0,
    ) -> list[Entry]:
        """The entries of a feed after ``after`` (None: its cursor), waiting up to ``wait_s``."""
        params: dict[str, Any] = {"wait": wait_s}
        if after is not None:
            params["after"] = after
        if max_entries is not None:
            params["max"] = max_entries
        if max_bytes is not None:
            params["max_bytes"] = max_bytes
        response = self._request(
            "GET",
            f"/feeds/{feed}/entries",
            params=params,
            timeout=(self._http.timeout.read or 60.0) + wait_s,
        )
        return [Entry(h, b) for h, b in formats.unframe(response.content)]

    def ack(self, feed: str, position: int) -> dict[str, Any]:
        """Acknowledge a feed's entries up to ``position``."""
        result: dict[str, Any] = self._request(
            "POST", f"/feeds/{feed}/ack", json={"position": position}
        ).json()
        return result


class FeedSource(Protocol):
    """A feed as a transport presents it to a consumer."""

    feed: str

    def fetch(self, after: int, *, max_entries: int, wait_s: float) -> list[Entry]:
        """Entries after ``after``, in position order (empty if none came within ``wait_s``)."""
        ...

    def ack(self, position: int) -> None:
        """Acknowledge every entry up to ``position``."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class HttpFeedSource:
    """A feed over the embedded transport (HTTP long-poll, explicit acknowledgement).

    Batches (tens of MB) are read over a keep-alive ``http.client`` connection: it reads a
    body in one go, where httpx's pure-Python HTTP parser takes twice the CPU (77 vs 40 ms
    per 32 MB here), which a broker's host spends on every alert. Everything else goes
    through `AlertClient`.
    """

    def __init__(self, url: str, token: str, feed: str, *, timeout_s: float = 60.0) -> None:
        self.feed = feed
        self.client = AlertClient(url, token)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserInputError(f"alert service URL {url!r} must be http(s)://host[:port]")
        self._conn_args = (parts.scheme, parts.hostname, parts.port, timeout_s)
        self._base = parts.path.rstrip("/") + "/alerts/v1"
        self._auth = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None
        # Batches are read into one buffer, kept: a fresh ~32 MB allocation per batch is
        # fresh pages from the kernel every time (on a virtual machine ~1 GB/s to fault in).
        # Entries are copied out of it before fetch returns, so reusing it is safe.
        self._buffer = bytearray()

    def _connection(self, wait_s: float) -> http.client.HTTPConnection:
        scheme, host, port, timeout = self._conn_args
        if self._conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            self._conn = cls(host, port, timeout=timeout + wait_s)
        self._conn.timeout = timeout + wait_s
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout + wait_s)
        return self._conn

    def fetch(self, after: int, *, max_entries: int = 2000, wait_s: float = 5.0) -> list[Entry]:
        """Entries after ``after`` (long-polls up to ``wait_s``)."""
        query = urllib.parse.urlencode({"after": after, "max": max_entries, "wait": wait_s})
        path = f"{self._base}/feeds/{urllib.parse.quote(self.feed)}/entries?{query}"
        for attempt in (1, 2):  # a keep-alive connection the server closed: once more
            conn = self._connection(wait_s)
            try:
                conn.request("GET", path, headers={"Authorization": self._auth})
                response = conn.getresponse()
                body = self._read_body(response)
                break
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                self._conn = None
                if attempt == 2:
                    raise TransportError(f"alert service unreachable: {exc}") from exc
        if response.status >= 400:
            _raise_for(httpx.Response(response.status, content=bytes(body)))
        return [Entry(h, b) for h, b in formats.unframe(body)]

    def _read_body(self, response: http.client.HTTPResponse) -> bytes | memoryview:
        """The response's body: in the kept buffer when its length is known."""
        length = response.length
        if length is None:  # chunked
            return response.read()
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        view = memoryview(self._buffer)[:length]
        got = 0
        while got < length:
            n = response.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(bytes(view[:got]), length - got)
            got += n
        return view

    def ack(self, position: int) -> None:
        """Acknowledge up to ``position``."""
        self.client.ack(self.feed, position)

    def close(self) -> None:
        """Close connections."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.client.close()


Handler = Callable[[list[Entry], sqlite3.Connection], None]
"""What the application does with a batch, inside the consumer's transaction."""


class DurableConsumer:
    """Exactly-once consumption of a feed into a local SQLite database.

    Parameters
    ----------
    source
        The feed's transport.
    path
        The consumer's database (the application may keep its own tables there: the handler
        writes them in the same transaction as the position).
    """

    def __init__(self, source: FeedSource, path: Path) -> None:
        self.source = source
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS consumer_position (feed TEXT PRIMARY KEY, position INTEGER)"
        )
        self._acked = -1

    @property
    def position(self) -> int:
        """The last position this consumer has durably processed."""
        row = self.db.execute(
            "SELECT position FROM consumer_position WHERE feed = ?", (self.source.feed,)
        ).fetchone()
        return int(row[0]) if row else 0

    def start_at(self, position: int) -> None:
        """Set the position of a consumer that has none yet (e.g. the feed's cursor)."""
        self.db.execute(
            "INSERT OR IGNORE INTO consumer_position (feed, position) VALUES (?, ?)",
            (self.source.feed, position),
        )

    def poll(self, handler: Handler, *, max_entries: int = 2000, wait_s: float = 5.0) -> int:
        """Fetch one batch, hand it to ``handler`` and commit it with its position; acknowledge.

        Returns how many entries were processed (0 when none came).
        """
        entries = self.source.fetch(self.position, max_entries=max_entries, wait_s=wait_s)
        if not entries:
            return 0
        last = entries[-1].position
        self.db.execute("BEGIN IMMEDIATE")
        try:
            handler(entries, self.db)
            self.db.execute(
                "INSERT INTO consumer_position (feed, position) VALUES (?, ?) "
                "ON CONFLICT(feed) DO UPDATE SET position = excluded.position",
                (self.source.feed, last),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._ack(last)
        return len(entries)

    def _ack(self, position: int) -> None:
        # Acknowledging is an optimization for the service (lag, retention): a failed ack
        # loses nothing, the next one covers it.
        try:
            self.source.ack(position)
            self._acked = position
        except (LdfError, OSError):
            pass

    def run(
        self,
        handler: Handler,
        *,
        until: Callable[[], bool],
        max_entries: int = 2000,
        wait_s: float = 1.0,
    ) -> int:
        """Poll until ``until()`` is true; returns entries processed."""
        total = 0
        while not until():
            try:
                total += self.poll(handler, max_entries=max_entries, wait_s=wait_s)
            except TransportError:
                time.sleep(0.5)
        return total

    def close(self) -> None:
        """Close the database and the source."""
        self.db.close()
        self.source.close()
