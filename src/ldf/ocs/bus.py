"""The OCS bus: one interface, two backends.

`Bus` is what devices and controllers use: publish events and telemetry, subscribe to
topic patterns, send commands and wait for their acknowledgements, and read the latest
message on a topic for status displays. Backends implement a few primitives
(`Bus._send`, `Bus._open_subscription`, `Bus.latest`, `Bus.close`):

* `ldf.ocs.bus_embedded.EmbeddedBus` — an append-only SQLite log under
  ``$LDF_HOME/bus/``, shared by every process on the machine; no server.
* `ldf.ocs.bus_nats.NatsBus` — NATS JetStream.

`open_bus` picks one from `ldf.config.BusSettings`.

Commands follow ts_salobj: the controller publishes ``ocs.<device>.cmd.<name>`` and waits
on ``ocs.<device>.ack.<name>`` for acknowledgements carrying the command's message id:
``IN_PROGRESS`` (optional, may extend the timeout), then ``COMPLETE``, ``FAILED`` or
``NOPERM`` (refused). Delivery is live: a subscription sees messages published after it
started; history is only the latest message per topic (`Bus.latest`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections import defaultdict
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ldf.config.models import BusSettings
from ldf.errors import CommandFailedError, CommandRefusedError, CommandTimeoutError, LdfError
from ldf.ocs.models import Ack, AckCode, Kind, Message, make_topic, validate_pattern

__all__ = ["Bus", "CommandFailedError", "Subscription", "open_bus"]


class Subscription:
    """Messages matching a pattern, in order, as an async iterator.

    Use it as an async context manager so that it is active before anything is published::

        async with bus.subscribe("ocs.MTCamera.evt.*") as sub:
            async for message in sub:
                ...

    Iteration ends when the subscription or its bus is closed.
    """

    def __init__(self, bus: Bus, pattern: str) -> None:
        self.bus = bus
        self.pattern = validate_pattern(pattern)
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._started = False
        self._closed = False

    async def start(self) -> Self:
        """Activate the subscription (idempotent); messages published after this arrive."""
        if not self._started:
            self._started = True
            await self.bus._open_subscription(self)
        return self

    async def close(self) -> None:
        """Stop receiving; a pending or later iteration ends."""
        if not self._closed:
            self._closed = True
            await self.bus._close_subscription(self)
            self._queue.put_nowait(None)

    def _deliver(self, message: Message) -> None:
        """Queue a message (called by the backend, in the event loop)."""
        if not self._closed:
            self._queue.put_nowait(message)

    def _end(self) -> None:
        """End iteration because the bus closed."""
        self._closed = True
        self._queue.put_nowait(None)

    async def get(self, timeout: float | None = None) -> Message:  # noqa: ASYNC109 (API as documented)
        """Wait for the next message.

        Raises
        ------
        TimeoutError
            Nothing arrived within ``timeout`` seconds.
        StopAsyncIteration
            The subscription is closed.
        """
        await self.start()
        message = await asyncio.wait_for(self._queue.get(), timeout)
        if message is None:
            self._queue.put_nowait(None)  # keep later calls ending too
            raise StopAsyncIteration
        return message

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        return await self.get()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Bus(ABC):
    """A connection to the OCS bus.

    Parameters
    ----------
    command_timeout_s
        Default time `command` waits for a final acknowledgement.
    """

    def __init__(self, *, command_timeout_s: float = 10.0) -> None:
        self.command_timeout_s = command_timeout_s
        self.sender = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """Identity of this connection, stamped on every message it sends."""
        self._seq: defaultdict[str, itertools.count[int]] = defaultdict(lambda: itertools.count(1))
        self._subscriptions: set[Subscription] = set()
        self.closed = False

    # -- primitives the backends implement -------------------------------------------------

    @abstractmethod
    async def _send(self, message: Message) -> None:
        """Append a fully stamped message to the bus."""

    @abstractmethod
    async def _open_subscription(self, sub: Subscription) -> None:
        """Start delivering messages that match ``sub.pattern`` to ``sub._deliver``."""

    async def _close_subscription(self, sub: Subscription) -> None:
        """Stop delivering to a subscription (backends extend)."""
        self._subscriptions.discard(sub)

    @abstractmethod
    async def latest(self, pattern: str) -> list[Message]:
        """The most recent message on each topic that matches a pattern, sorted by topic."""

    async def close(self) -> None:
        """Close the connection; every open subscription ends."""
        self.closed = True
        for sub in list(self._subscriptions):
            sub._end()
        self._subscriptions.clear()

    # -- the interface ---------------------------------------------------------------------

    async def publish(self, message: Message) -> Message:
        """Stamp a message with this sender and its sequence number, and send it.

        Returns
        -------
        Message
            The message as sent.
        """
        if self.closed:
            raise LdfError("the bus connection is closed")
        stamped = message.model_copy(
            update={
                "sender": self.sender,
                "seq": next(self._seq[message.topic]),
                "timestamp": time.time(),
            }
        )
        await self._send(stamped)
        return stamped

    async def publish_event(self, device: str, name: str, payload: dict[str, Any]) -> Message:
        """Publish an event ``ocs.<device>.evt.<name>``."""
        return await self.publish(Message.build(device, Kind.EVT, name, payload))

    async def publish_telemetry(self, device: str, name: str, payload: dict[str, Any]) -> Message:
        """Publish telemetry ``ocs.<device>.tel.<name>``."""
        return await self.publish(Message.build(device, Kind.TEL, name, payload))

    def subscribe(self, pattern: str) -> Subscription:
        """Subscribe to topics matching a pattern (``*`` one token, ``>`` the rest).

        Use the result with ``async with`` (or ``await sub.start()``) before relying on
        delivery of messages published afterwards.
        """
        return Subscription(self, pattern)

    def commands(self, device: str) -> Subscription:
        """Device side: the subscription to every command sent to ``device``."""
        make_topic(device, Kind.CMD, "x")  # validates the device name
        return self.subscribe(f"ocs.{device}.cmd.*")

    async def ack(
        self, command: Message, code: AckCode, result: str = "", timeout_s: float = 0.0
    ) -> Message:
        """Device side: acknowledge a command message."""
        ack = Ack(
            command_id=command.id,
            device=command.device,
            command=command.name,
            code=code,
            result=result,
            timeout_s=timeout_s,
        )
        return await self.publish(
            Message.build(command.device, Kind.ACK, command.name, ack.model_dump(mode="json"))
        )

    async def command(
        self,
        device: str,
        name: str,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the controller API callers expect)
    ) -> Ack:
        """Controller side: send a command and wait for its final acknowledgement.

        Parameters
        ----------
        device
            Device to command.
        name
            Command name (``start``, ``enable``... or one the device registered).
        params
            Command parameters (``start`` takes ``configuration``).
        timeout
            Seconds to wait for the final acknowledgement (default: the bus's); an
            ``IN_PROGRESS`` acknowledgement may extend it.

        Returns
        -------
        Ack
            The ``COMPLETE`` acknowledgement.

        Raises
        ------
        CommandRefusedError
            The device refused the command; its reason is the message.
        CommandFailedError
            The device accepted the command and then failed.
        CommandTimeoutError
            No (final) acknowledgement arrived in time.
        """
        timeout = self.command_timeout_s if timeout is None else timeout
        cmd = Message.build(device, Kind.CMD, name, params)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        in_progress = False
        async with self.subscribe(make_topic(device, Kind.ACK, name)) as acks:
            cmd = await self.publish(cmd)
            while True:
                try:
                    message = await acks.get(timeout=max(0.0, deadline - loop.time()))
                except TimeoutError:
                    if in_progress:
                        raise CommandTimeoutError(
                            f"{device} accepted {name} but sent no final acknowledgement "
                            f"within {timeout:g} s — did it stop?"
                        ) from None
                    raise CommandTimeoutError(
                        f"no acknowledgement from {device} within {timeout:g} s — is it running?"
                    ) from None
                except StopAsyncIteration:
                    raise CommandTimeoutError(
                        f"bus closed while waiting for {device} to acknowledge {name}"
                    ) from None
                ack = Ack.model_validate(message.payload)
                if ack.command_id != cmd.id:
                    continue
                if ack.code is AckCode.COMPLETE:
                    return ack
                if ack.code is AckCode.NOPERM:
                    raise CommandRefusedError(ack.result or f"{device}: {name} refused")
                if ack.code.final:
                    raise CommandFailedError(ack.result or f"{device}: {name} failed")
                in_progress = True
                if ack.timeout_s:
                    deadline = max(deadline, loop.time() + ack.timeout_s)

    async def last(self, topic: str) -> Message | None:
        """The most recent message on one topic, or None if there was none."""
        found = await self.latest(topic)
        return found[0] if found else None

    async def devices(self) -> list[str]:
        """Names of every device that has published an event, sorted."""
        return sorted({m.device for m in await self.latest("ocs.*.evt.*")})

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def open_bus(settings: BusSettings, home: Path) -> Bus:
    """Connect to the bus the settings name.

    Parameters
    ----------
    settings
        ``url`` ``embedded`` opens the log at ``<home>/bus/ocs.sqlite3``; a ``nats://``
        URL connects to NATS JetStream and makes sure the stream exists.
    home
        ``$LDF_HOME`` (used by the embedded backend only).

    Raises
    ------
    TransportError
        The NATS server cannot be reached.
    """
    if settings.url == "embedded":
        from ldf.ocs.bus_embedded import EmbeddedBus

        return EmbeddedBus(
            home / "bus" / "ocs.sqlite3", command_timeout_s=settings.command_timeout_s
        )
    from ldf.ocs.bus_nats import NatsBus

    return await NatsBus.connect(
        settings.url,
        stream_prefix=settings.stream_prefix,
        credentials=(settings.credentials.get_secret_value() if settings.credentials else None),
        command_timeout_s=settings.command_timeout_s,
    )
