"""Names, message headers and connections shared by the NATS publisher and source."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.aio.client import Client

from ldf.alerts.models import Delivery
from ldf.errors import TransportError, UserInputError

__all__ = ["LoopThread", "NatsNames", "decode_header", "encode_header", "open_connection"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_INT_KEYS = frozenset({"position", "visit", "alert_id", "schema_id"})
"""Entry header keys whose values are integers."""

_PREFIX = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class NatsNames:
    """Stream, subject, consumer and inbox names of the alert feeds under one prefix.

    The prefix keeps deployments (and tests) that share a NATS server apart.
    """

    prefix: str = "ldf"
    """Lower-case first subject token; the stream names start with it in upper case."""

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise UserInputError(
                f"NATS prefix {self.prefix!r} must be 1-32 lower-case letters, digits, '_' or "
                "'-', starting with a letter"
            )

    def stream(self, broker: str) -> str:
        """The stream of a broker's feeds."""
        return f"{self.prefix.upper()}_ALERTS_{broker}"

    def subjects(self, broker: str) -> str:
        """The subjects of a broker's stream."""
        return f"{self.prefix}.alerts.{broker}.>"

    def subject(self, broker: str, feed: str) -> str:
        """The subject of one feed."""
        return f"{self.prefix}.alerts.{broker}.{feed}"

    @staticmethod
    def inbox(broker: str) -> str:
        """The inbox prefix a broker's connections use (only it may subscribe there)."""
        return f"_INBOX_{broker}"


# -- headers --------------------------------------------------------------------------------


def _header_name(key: str) -> str:
    return "Ldf-" + "-".join(part.capitalize() for part in key.split("_"))


def encode_header(delivery: Delivery, prev: int) -> dict[str, str]:
    """The NATS headers of one entry (``prev``: the feed's previous entry, 0 for its first)."""
    out: dict[str, str] = {}
    for key, value in delivery.header().items():
        out[_header_name(key)] = (
            ("true" if value else "false") if isinstance(value, bool) else str(value)
        )
    out["Ldf-Prev"] = str(prev)
    return out


def decode_header(headers: Mapping[str, str] | None) -> tuple[dict[str, Any], int]:
    """The entry header and previous position a message carries.

    Raises
    ------
    UserInputError
        The message is not an alert feed entry (no or malformed ``Ldf-Position``).
    """
    if not headers or "Ldf-Position" not in headers:
        raise UserInputError("NATS message without an Ldf-Position header is not a feed entry")
    header: dict[str, Any] = {}
    prev = 0
    try:
        for name, value in headers.items():
            if not name.startswith("Ldf-"):
                continue
            key = name[4:].lower().replace("-", "_")
            if key == "prev":
                prev = int(value)
            elif key in _INT_KEYS:
                header[key] = int(value)
            elif value in ("true", "false"):
                header[key] = value == "true"
            else:
                header[key] = value
    except ValueError as exc:
        raise UserInputError(f"malformed feed entry header: {exc}") from None
    return header, prev


# -- connections ----------------------------------------------------------------------------


async def open_connection(
    url: str,
    *,
    user: str | None,
    password: str | None,
    token: str | None,
    inbox_prefix: str | None = None,
    error_cb: Any = None,
    name: str,
) -> Client:
    """A connection that fails at once with its reason, then reconnects forever.

    Raises
    ------
    UserInputError
        The server refused the credentials.
    TransportError
        The server is unreachable.
    """
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        if len(errors) < 10:  # the reasons of the first connection's failure
            errors.append(exc)
        await (error_cb or _log_error)(exc)

    options: dict[str, Any] = {
        "name": name,
        "connect_timeout": 2,
        # Fail the first connection soon, with its reason (a wrong password, no server);
        # reconnecting forever is switched on once connected, below.
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
    }
    if user is not None:
        options["user"], options["password"] = user, password
    elif token is not None:
        options["token"] = token
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    nc = Client()
    try:
        await asyncio.wait_for(nc.connect(url, **options), timeout=15.0)
    except Exception as exc:  # nats raises several unrelated types for "unreachable"
        with contextlib.suppress(Exception):  # a refused connection leaves its socket open
            await nc.close()
        reason = errors[0] if errors else exc
        if any("authorization violation" in str(e).lower() for e in [*errors, exc]):
            raise UserInputError(
                f"the NATS server at {url} refused the credentials of {user or 'this client'}"
            ) from None
        raise TransportError(f"cannot connect to the NATS server at {url}: {reason!r}") from exc
    # Long-running clients ride out a server restart. nats-py reads these options when a
    # connection drops, so setting them now applies to every later reconnect.
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    return nc


async def _log_error(exc: Exception) -> None:
    # Debug only: reconnect attempts repeat; failures surface as errors of the calls.
    _log.debug("NATS: %s", exc)


class LoopThread:
    """An event loop in a daemon thread, for the synchronous faces of async clients."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coro`` in the loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TransportError(f"NATS call did not finish within {timeout} s") from None

    def close(self) -> None:
        """Cancel what is left, stop the loop and join the thread."""

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(5.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10.0)
        if not self.loop.is_running():
            self.loop.close()
