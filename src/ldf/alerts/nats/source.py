"""The broker's side: a feed's durable JetStream consumer as a `FeedSource`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError as JsNotFoundError

from ldf.alerts.client import Entry
from ldf.alerts.nats.wire import LoopThread, NatsNames, decode_header, open_connection
from ldf.errors import NotFoundError, TransportError, UserInputError

__all__ = ["NatsFeedSource"]

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Held:
    """A message received and not yet acknowledged."""

    msg: Msg
    entry: Entry
    prev: int


class NatsFeedSource:
    """A feed over NATS JetStream (implements `ldf.alerts.client.FeedSource`).

    Parameters
    ----------
    url
        ``nats://host:port``.
    broker, feed
        Whose feed, and which.
    names
        Stream and subject names (the prefix the service publishes under).
    user, password, token
        The broker's NATS credentials (``user`` defaults to the broker's name when a
        password is given).
    timeout_s
        How long a JetStream call may take.
    max_pull_bytes
        About the most bytes one pull asks for (by the mean size of the messages so far).
    gap_timeout_s
        How long an entry missing before the entries held is waited for, at most, before
        it is skipped with an error in the log (see `_gap`: most gaps are decided sooner).

    Raises
    ------
    NotFoundError
        The feed has no consumer (not a NATS feed, or the publisher has not set it up).
    UserInputError
        The server refused the credentials or the broker may not read the feed.
    TransportError
        The server is unreachable.
    """

    def __init__(
        self,
        url: str,
        broker: str,
        feed: str,
        *,
        names: NatsNames | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout_s: float = 10.0,
        gap_timeout_s: float = 120.0,
        max_pull_bytes: int = 8 << 20,
    ) -> None:
        self.feed = feed
        self.broker = broker
        self.url = url
        self.names = names or NatsNames()
        self.stream = self.names.stream(broker)
        self.timeout_s = timeout_s
        self.gap_timeout_s = gap_timeout_s
        self.max_pull_bytes = max_pull_bytes
        self._mean_size = 100_000.0  # bytes per message, until some came (a full alert)
        self.skipped_gaps = 0
        """Entries missing from JetStream that the source gave up waiting for."""
        if password is not None and user is None:
            user = broker
        self._auth = {"user": user, "password": password, "token": token}
        self._held: dict[int, _Held] = {}
        self._gap_since: float | None = None
        self._denied: str | None = None
        self._max_ack_pending = 0
        self._foreign = 0
        self._foreign_until = 0.0
        self.nc: Client | None = None
        self._sub: Any = None
        self._loop = LoopThread(f"alerts-nats-{feed}")
        try:
            self._loop.call(self._open(), timeout_s + 15.0)
        except BaseException:
            self._loop.call(self._close(), 10.0)
            self._loop.close()
            raise

    async def _error(self, exc: Exception) -> None:
        text = str(exc)
        if "permissions violation" in text.lower():
            self._denied = text.removeprefix("nats: ")
        _log.debug("NATS: %s", exc)

    def _check_denied(self) -> None:
        if self._denied is not None:
            denied, self._denied = self._denied, None
            raise UserInputError(
                f"NATS refused broker {self.broker} access to feed {self.feed}: {denied}"
            )

    async def _open(self) -> None:
        self.nc = await open_connection(
            self.url,
            name=f"ldf-alerts-{self.broker}",
            inbox_prefix=self.names.inbox(self.broker),
            error_cb=self._error,
            **self._auth,
        )
        js = self.nc.jetstream(timeout=self.timeout_s)
        # A request the server refuses gets no answer, only an error on the connection: see
        # it after one round trip instead of waiting for the request to time out.
        request = asyncio.create_task(
            js.consumer_info(self.stream, self.feed, timeout=self.timeout_s)
        )
        while not request.done():
            await asyncio.wait({request}, timeout=0.05)
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=math.ceil(self.timeout_s))
            if self._denied is not None:
                request.cancel()
                await asyncio.gather(request, return_exceptions=True)
                self._check_denied()
        try:
            info = await request
        except JsNotFoundError:
            raise NotFoundError(
                f"feed {self.feed} of broker {self.broker} has no NATS consumer in stream "
                f"{self.stream} (not a NATS feed, or not set up yet)"
            ) from None
        except Exception as exc:
            self._check_denied()
            raise TransportError(
                f"cannot read NATS consumer {self.stream}/{self.feed}: {exc!r}"
            ) from exc
        ack_wait = float(info.config.ack_wait or 30.0)
        self._max_ack_pending = int(info.config.max_ack_pending or 0)
        # What a previous (crashed) connection held counts against max_ack_pending until
        # JetStream redelivers it, at the latest ack_wait from now.
        self._foreign = int(info.num_ack_pending or 0)
        self._foreign_until = time.monotonic() + ack_wait
        self._sub = await js.pull_subscribe_bind(
            durable=self.feed,
            stream=self.stream,
            inbox_prefix=(self.names.inbox(self.broker) + ".").encode(),
        )

    @property
    def held(self) -> int:
        """Messages received and not yet acknowledged (bounded by ``max_ack_pending``)."""
        return len(self._held)

    def fetch(self, after: int, *, max_entries: int = 2000, wait_s: float = 5.0) -> list[Entry]:
        """Entries after ``after``, in position order (empty if none came within ``wait_s``).

        Entries at or before ``after`` are acknowledged: the caller is done with them, and
        JetStream never presents them again (``after`` does not go back, as it does not in
        `ldf.alerts.client.DurableConsumer`). Entries fetched and not acknowledged are
        presented again by the next fetch after the same position.

        Raises
        ------
        UserInputError
            The broker may not read this feed.
        TransportError
            The server is unreachable.
        """
        if max_entries < 1:
            raise UserInputError("max_entries must be at least 1")
        return self._loop.call(
            self._fetch(int(after), max_entries, max(0.0, wait_s)), wait_s + self.timeout_s + 30
        )

    def ack(self, position: int) -> None:
        """Acknowledge every fetched entry up to ``position``."""
        self._loop.call(self._settle(int(position)), self.timeout_s + 5)

    def close(self) -> None:
        """Close the connection; what was not acknowledged is redelivered after ``ack_wait``."""
        try:
            self._loop.call(self._close(), 15.0)
        finally:
            self._loop.close()

    async def _close(self) -> None:
        self._held.clear()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def _settle(self, position: int) -> None:
        """Acknowledge and forget every held message at or before ``position``."""
        done = [p for p in self._held if p <= position]
        if not done:
            return
        for p in done:
            held = self._held.pop(p)
            with contextlib.suppress(Exception):  # already acknowledged, or reconnecting
                await held.msg.ack()
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=math.ceil(self.timeout_s))

    def _chain(self, after: int, limit: int) -> list[Entry]:
        """Held entries that follow ``after`` without a gap, in order."""
        out: list[Entry] = []
        pending = sorted(self._held)
        cursor = after
        for p in pending:
            if len(out) >= limit:
                break
            held = self._held[p]
            if held.prev <= cursor < p:
                out.append(held.entry)
                cursor = p
            else:
                break
        return out

    def _room(self, wanted: int) -> int:
        """How many messages to ask for: JetStream sends at most ``max_ack_pending`` unacked,
        and a pull asking for more than it can send only ends when it expires."""
        if self._max_ack_pending <= 0:
            return wanted
        foreign = self._foreign if time.monotonic() < self._foreign_until else 0
        return max(1, min(wanted, self._max_ack_pending - len(self._held) - foreign))

    async def _pull(self, batch: int, wait_s: float, after: int) -> int:
        """Pull up to ``batch`` messages (waiting up to ``wait_s``); how many came."""
        assert self._sub is not None
        # A pull of many large messages arrives in one burst: keep it well below what the
        # server buffers for a client before dropping it as a slow consumer (64 MB).
        batch = min(self._room(batch), max(1, int(self.max_pull_bytes // self._mean_size)))
        try:
            msgs = await self._sub.fetch(batch, timeout=max(wait_s, 0.01))
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        except nats.errors.ConnectionClosedError as exc:
            raise TransportError(f"NATS connection to {self.url} closed") from exc
        except Exception as exc:
            self._check_denied()
            raise TransportError(f"cannot fetch feed {self.feed} from NATS: {exc!r}") from exc
        if not msgs and self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
        self._check_denied()
        if msgs:
            size = sum(len(m.data) for m in msgs) / len(msgs)
            self._mean_size = max(256.0, 0.5 * self._mean_size + 0.5 * size)
        for msg in msgs:
            try:
                header, prev = decode_header(msg.headers)
            except UserInputError as exc:
                _log.error("feed %s: dropping a foreign message: %s", self.feed, exc)
                with contextlib.suppress(Exception):
                    await msg.ack()
                continue
            entry = Entry(header, msg.data)
            if entry.position <= after:  # redelivered after a crash: done already
                with contextlib.suppress(Exception):
                    await msg.ack()
                self._held.pop(entry.position, None)
                continue
            self._held[entry.position] = _Held(msg, entry, prev)
        return len(msgs)

    async def _fetch(self, after: int, max_entries: int, wait_s: float) -> list[Entry]:
        deadline = time.monotonic() + wait_s
        await self._settle(after)
        chain = self._chain(after, max_entries)
        pulled = False
        while len(chain) < max_entries:
            remaining = deadline - time.monotonic()
            if pulled and (chain or remaining <= 0):
                break
            # With entries in hand, take only what is there now; else wait for some.
            await self._pull(max_entries - len(chain), 0.02 if chain else remaining, after)
            pulled = True
            chain = self._chain(after, max_entries)
        if chain or not self._held:
            self._gap_since = None
            return chain
        return await self._gap(after, max_entries)

    async def _gap(self, after: int, max_entries: int) -> list[Entry]:
        """Held entries wait for one before them: skip it once JetStream cannot send it.

        The entry still comes if another connection (a crashed one) holds it until
        ``ack_wait``, or if it is undelivered: JetStream delivers in stream order, and a
        failed publish round stores an entry behind at most ``window - 1`` of the entries
        after it (the publisher's window is at most half of ``max_ack_pending``). So when
        nothing is pending elsewhere and this source holds at least that many entries after
        the gap, the entry is gone: acknowledged by an earlier consumer of the feed (whose
        position was lost), or expired or purged from the stream. With fewer held, the entry
        may still be on its way from a publisher retrying a round: it is waited for up to
        ``gap_timeout_s``.
        """
        now = time.monotonic()
        if self._gap_since is None:
            self._gap_since = now
        assert self._sub is not None
        try:
            info = await self._sub.consumer_info()
        except Exception as exc:
            raise TransportError(f"cannot read NATS consumer {self.feed}: {exc!r}") from exc
        if (info.num_ack_pending or 0) > len(self._held):
            return []  # held by a dead connection until ack_wait, or on its way to us
        bound = max(1, self._max_ack_pending // 2)
        if len(self._held) < bound and now - self._gap_since < self.gap_timeout_s:
            return []
        first = min(self._held)
        _log.error(
            "feed %s: the entries after position %d and before %d are not in JetStream "
            "(acknowledged by an earlier consumer of the feed, or expired or purged); "
            "skipping to %d (replay from the service what is missing)",
            self.feed, after, first, first,
        )  # fmt: skip
        self.skipped_gaps += 1
        self._held[first].prev = after
        self._gap_since = None
        return self._chain(after, max_entries)
