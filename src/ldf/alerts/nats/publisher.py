"""The service's side: pump every NATS feed of an alert service into JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError
from nats.js.errors import NotFoundError as JsNotFoundError

from ldf.alerts.models import Delivery, Feed
from ldf.alerts.nats.wire import LoopThread, NatsNames, encode_header, open_connection
from ldf.errors import NotFoundError, TransportError, UserInputError

if TYPE_CHECKING:
    from ldf.alerts.service import AlertService

__all__ = ["NatsPublisher", "PublisherStats", "PublisherThread"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass
class PublisherStats:
    """What a publisher did since it started."""

    published: int = 0
    """Messages JetStream stored."""
    duplicates: int = 0
    """Messages JetStream had already (a re-publish after a crash)."""
    errors: int = 0
    """Failed publish rounds (each retried)."""
    paused: int = 0
    """Times a feed's pump waited because its JetStream backlog was full."""
    feeds: dict[str, int] = field(default_factory=dict)
    """Messages stored per feed."""


class NatsPublisher:
    """Pumps every NATS feed of an alert service into JetStream.

    Parameters
    ----------
    service
        The alert service whose feeds with ``transport == "nats"`` are pumped.
    url
        ``nats://host:port``.
    names
        Stream and subject names (the prefix).
    user, password, token
        The publisher's NATS credentials, if the server requires them.
    duplicate_window_s
        JetStream's de-duplication window: a re-publish within it is dropped.
    max_age_s
        Messages a broker has not consumed within this leave JetStream (it replays them from
        the service).
    ack_wait_s
        How long a consumer may hold a message unacknowledged before it is redelivered.
    batch_entries
        Most entries one publish round sends (and holds in flight) per feed.
    max_backlog
        Messages of one feed waiting in JetStream (undelivered or unacknowledged) beyond
        which its pump pauses.
    poll_s
        How often the log's head is polled for new entries.
    discover_s
        How often the service's feeds are listed (new feeds get a stream, consumer and pump).
    publish_timeout_s
        How long one round waits for JetStream's acknowledgements before retrying.
    """

    def __init__(
        self,
        service: AlertService,
        url: str,
        *,
        names: NatsNames | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        duplicate_window_s: float = 7200.0,
        max_age_s: float = 7 * 86400.0,
        ack_wait_s: float = 30.0,
        batch_entries: int = 500,
        max_backlog: int = 100_000,
        poll_s: float = 0.025,
        discover_s: float = 1.0,
        publish_timeout_s: float = 30.0,
    ) -> None:
        if batch_entries < 1 or max_backlog < 1:
            raise UserInputError("batch_entries and max_backlog must be at least 1")
        self.service = service
        self.url = url
        self.names = names or NatsNames()
        self._auth = {"user": user, "password": password, "token": token}
        self.duplicate_window_s = duplicate_window_s
        self.max_age_s = max_age_s
        self.ack_wait_s = ack_wait_s
        self.batch_entries = batch_entries
        self.max_backlog = max_backlog
        self.poll_s = poll_s
        self.discover_s = discover_s
        self.publish_timeout_s = publish_timeout_s
        self.stats = PublisherStats()
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._head = 0
        self._head_cond: asyncio.Condition | None = None
        self._backlog: dict[str, int] = {}
        self._executor: ThreadPoolExecutor | None = None

    async def _db(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a (blocking) service call in the publisher's threads.

        Its own pool, not asyncio's default: `close` waits for what is in flight, so no
        database call outlives the publisher (and the service it is closed before).
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="alerts-nats")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(call, *args, **kwargs))

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (after `connect`)."""
        if self._js is None:
            raise TransportError("the NATS publisher is not connected")
        return self._js

    async def connect(self) -> None:
        """Connect to the NATS server (idempotent).

        Raises
        ------
        TransportError
            The server is unreachable or refused the credentials.
        """
        if self.nc is not None and not self.nc.is_closed:
            return
        self.nc = await open_connection(self.url, name="ldf-alerts-publisher", **self._auth)
        self._js = self.nc.jetstream(timeout=10.0)

    async def close(self) -> None:
        """Stop the pumps and close the connection."""
        await self._stop_pumps()
        if self.nc is not None and not self.nc.is_closed:
            # Not drain(): nothing in flight matters (the cursor moves only after JetStream's
            # acknowledgements), and drain waits on a server that may be gone.
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.nc, self._js = None, None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- streams and consumers ------------------------------------------------------------

    async def ensure_feed(self, feed: Feed | str) -> None:
        """Create or update a NATS feed's stream (its broker's) and durable consumer.

        Raises
        ------
        UserInputError
            The feed is not a NATS feed.
        TransportError
            JetStream refused the configuration.
        """
        await self.connect()
        if isinstance(feed, str):
            feed = await self._db(self.service.feed, feed)
        if feed.transport != "nats":
            raise UserInputError(f"feed {feed.name!r} is delivered over {feed.transport}, not NATS")
        stream = self.names.stream(feed.broker)
        config = StreamConfig(
            name=stream,
            description=f"ldf alert feeds of broker {feed.broker}",
            subjects=[self.names.subjects(feed.broker)],
            retention=RetentionPolicy.INTEREST,
            storage=StorageType.FILE,
            duplicate_window=self.duplicate_window_s,
            max_age=self.max_age_s,
        )
        try:
            try:
                await self.js.add_stream(config)
            except BadRequestError:  # exists with other limits
                await self.js.update_stream(config)
            await self.js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=feed.name,
                    description=f"ldf alert feed {feed.name}",
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait_s,
                    max_deliver=-1,  # never give up on an entry: that would be a lost alert
                    max_ack_pending=feed.max_ack_pending,
                    filter_subject=self.names.subject(feed.broker, feed.name),
                ),
            )
        except Exception as exc:
            raise TransportError(
                f"cannot set up JetStream stream {stream} / consumer {feed.name}: {exc}"
            ) from exc

    async def remove_feed(self, feed: Feed) -> None:
        """Delete a feed's consumer (its stream stays for the broker's other feeds)."""
        await self.connect()
        with contextlib.suppress(JsNotFoundError):
            await self.js.delete_consumer(self.names.stream(feed.broker), feed.name)

    # -- running --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Pump every NATS feed until ``stop`` is set.

        Raises
        ------
        TransportError
            The server could not be reached at the start.
        """
        await self.connect()
        self._head_cond = asyncio.Condition()
        self._head = await self._db(self.service.head, max_age_s=0.0)
        watcher = asyncio.create_task(self._watch_head(stop), name="alerts-nats-head")
        known: dict[str, Feed] = {}
        backlogs = asyncio.create_task(self._watch_backlogs(stop, known), name="alerts-nats-lag")
        try:
            while not stop.is_set():
                try:
                    await self._discover(known)
                except Exception as exc:  # the database or server restarting: keep going
                    _log.warning("NATS feed discovery failed, retrying: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.discover_s)
        finally:
            watcher.cancel()
            backlogs.cancel()
            await asyncio.gather(watcher, backlogs, return_exceptions=True)
            await self._stop_pumps()

    async def _stop_pumps(self) -> None:
        pumps = list(self._pumps.values())
        self._pumps.clear()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _discover(self, known: dict[str, Feed]) -> None:
        feeds = {f.name: f for f in await self._db(self.service.feeds) if f.transport == "nats"}
        for name in list(self._pumps):
            if name not in feeds:
                self._pumps.pop(name).cancel()
                gone = known.pop(name, None)
                if gone is not None:
                    with contextlib.suppress(Exception):
                        await self.remove_feed(gone)
        for name, feed in feeds.items():
            task = self._pumps.get(name)
            if task is not None and not task.done():
                continue
            if task is not None and task.done() and not task.cancelled() and task.exception():
                _log.error("pump of NATS feed %s stopped: %s", name, task.exception())
            try:
                await self.ensure_feed(feed)
            except TransportError as exc:
                _log.warning("%s; retrying", exc)
                continue
            known[name] = feed
            self._pumps[name] = asyncio.create_task(self._pump(feed), name=f"alerts-nats-{name}")

    async def _watch_head(self, stop: asyncio.Event) -> None:
        assert self._head_cond is not None
        while not stop.is_set():
            try:
                head = await self._db(self.service.head, max_age_s=0.0)
            except Exception as exc:  # the database restarting: keep polling
                _log.debug("head poll failed: %s", exc)
                head = self._head
            if head > self._head:
                async with self._head_cond:
                    self._head = head
                    self._head_cond.notify_all()
            await asyncio.sleep(self.poll_s)

    async def _watch_backlogs(self, stop: asyncio.Event, known: dict[str, Feed]) -> None:
        """Tell the service each NATS feed's backlog in JetStream, every lag check.

        The service's cursor of a NATS feed only says what is safely in JetStream; what the
        broker has not acknowledged yet is its consumer's ``num_pending + num_ack_pending``,
        and the time since it last acknowledged anything. Without these a stalled broker's
        lag would stay at zero while JetStream filled up to ``max_backlog``.
        """
        while not stop.is_set():
            for name, feed in list(known.items()):
                try:
                    info = await self.js.consumer_info(self.names.stream(feed.broker), name)
                except Exception as exc:  # the server restarting, the feed just deleted
                    _log.debug("consumer info of %s: %s", name, exc)
                    continue
                pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
                last = info.ack_floor.last_active if info.ack_floor is not None else None
                self.service.set_transport_backlog(
                    name, pending, last.timestamp() if last is not None else None
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.service.policy.lag_check_s)

    async def _wait_head(self, seen: int, timeout_s: float = 1.0) -> None:
        """Return once the log's head is past ``seen`` (or after ``timeout_s``, to recheck)."""
        cond = self._head_cond
        if cond is None:
            await asyncio.sleep(self.poll_s)
            return
        async with cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cond.wait_for(lambda: self._head > seen), timeout_s)

    async def _pump(self, feed: Feed) -> None:
        """Publish one feed's entries after its cursor, forever (a task per feed)."""
        name = feed.name
        stream = self.names.stream(feed.broker)
        subject = self.names.subject(feed.broker, name)
        # A consumer holding max_ack_pending messages gets nothing new: keep the reorder a
        # failed round can cause (the retried entries land behind the round's others) well
        # inside that limit, so the entry it waits for can always be delivered. A window is
        # also no bigger than max_backlog: a stalled feed stops within one window of it.
        window = min(self.batch_entries, max(1, feed.max_ack_pending // 2), self.max_backlog)
        backoff = 0.1
        while True:
            # The next window is read from the service while JetStream stores this one.
            ahead: tuple[int, asyncio.Future[list[Delivery]]] | None = None
            try:
                current = await self._db(self.service.feed, name)
                after = current.cursor
                prev = current.cursor if current.delivered else 0
                while True:
                    await self._room(name, stream)
                    if ahead is None:
                        seen = self._head
                        entries = await self._fetch(name, after, window)
                    else:
                        (seen, task), ahead = ahead, None
                        entries = await task
                    if not entries:
                        await self._wait_head(seen)
                        continue
                    last = entries[-1].position
                    ahead = (self._head, asyncio.ensure_future(self._fetch(name, last, window)))
                    await self.publish(stream, subject, name, entries, prev)
                    await self._db(self.service.ack, name, last)
                    prev = after = last
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except NotFoundError:
                _log.info("NATS feed %s was deleted; its pump stops", name)
                return
            except Exception as exc:
                self.stats.errors += 1
                _log.warning("publishing NATS feed %s failed, retrying: %s", name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                # The stream or consumer may be gone (deleted, or a server that lost its
                # store): set them up again before retrying.
                with contextlib.suppress(Exception):
                    await self.ensure_feed(name)
            finally:
                if ahead is not None:
                    ahead[1].cancel()
                    await asyncio.gather(ahead[1], return_exceptions=True)

    async def _fetch(self, name: str, after: int, window: int) -> list[Delivery]:
        return await self._db(self.service.fetch, name, after=after, max_entries=window)

    async def _room(self, name: str, stream: str) -> None:
        """Wait while the feed's JetStream backlog is at ``max_backlog``."""
        estimate = self._backlog.get(name, 0)
        paused = False
        while estimate >= self.max_backlog:
            info = await self.js.consumer_info(stream, name)
            estimate = (info.num_pending or 0) + (info.num_ack_pending or 0)
            if estimate < self.max_backlog:
                break
            if not paused:
                self.stats.paused += 1
                paused = True
            await asyncio.sleep(0.25)
        self._backlog[name] = estimate

    async def publish(
        self, stream: str, subject: str, feed: str, entries: list[Delivery], prev: int
    ) -> None:
        """Publish entries of one feed and wait until JetStream has stored every one.

        Raises
        ------
        TransportError
            JetStream did not acknowledge them all (nothing is lost: the caller retries,
            and de-duplication drops what was stored).
        """
        futures: list[asyncio.Future[Any]] = []
        try:
            for entry in entries:
                headers = encode_header(entry, prev)
                headers["Nats-Msg-Id"] = f"{feed}:{entry.position}"
                futures.append(
                    await self.js.publish_async(
                        subject, entry.body, stream=stream, headers=headers, wait_stall=30.0
                    )
                )
                prev = entry.position
            acks = await asyncio.wait_for(asyncio.gather(*futures), self.publish_timeout_s)
        except Exception as exc:
            for f in futures:
                f.cancel()
            if isinstance(exc, TimeoutError):
                raise TransportError(
                    f"JetStream did not acknowledge {len(entries)} entries of feed {feed} "
                    f"within {self.publish_timeout_s} s"
                ) from None
            raise TransportError(f"cannot publish feed {feed} to JetStream: {exc}") from exc
        dup = sum(1 for a in acks if a.duplicate)
        self.stats.duplicates += dup
        self.stats.published += len(acks) - dup
        self.stats.feeds[feed] = self.stats.feeds.get(feed, 0) + len(acks) - dup
        self._backlog[feed] = self._backlog.get(feed, 0) + len(acks) - dup


class PublisherThread:
    """A `NatsPublisher` running in a thread of its own, as a context manager.

    Parameters
    ----------
    publisher
        What to run.
    """

    def __init__(self, publisher: NatsPublisher) -> None:
        self.publisher = publisher
        self._loop = LoopThread("alerts-nats-publisher")
        self._stop: asyncio.Event | None = None
        self._run: Any = None

    def __enter__(self) -> PublisherThread:
        async def start() -> None:
            await self.publisher.connect()
            self._stop = asyncio.Event()

        try:
            self._loop.call(start(), 30.0)
        except BaseException:
            self._loop.close()
            raise
        assert self._stop is not None
        self._run = asyncio.run_coroutine_threadsafe(
            self.publisher.run(self._stop), self._loop.loop
        )
        return self

    def ensure_feed(self, feed: Feed | str) -> None:
        """Create a feed's stream and consumer now (rather than at the next discovery)."""
        self._loop.call(self.publisher.ensure_feed(feed), 30.0)

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        stop = self._stop
        if stop is not None:
            self._loop.loop.call_soon_threadsafe(stop.set)
        if self._run is not None:
            with contextlib.suppress(Exception):
                self._run.result(30.0)
        with contextlib.suppress(Exception):
            self._loop.call(self.publisher.close(), 30.0)
        self._loop.close()
