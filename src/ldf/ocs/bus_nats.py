"""The OCS bus on NATS JetStream.

Every message is published to JetStream (``js.publish``, so it is stored and acknowledged
by the server) on the subject ``<prefix>.<topic>``, e.g. ``LDF.ocs.MTCamera.evt.heartbeat``,
in the stream ``<prefix>_OCS`` (subjects ``<prefix>.ocs.>``). The prefix keeps deployments
that share a server apart (JetStream streams may not overlap subjects), as ts_salobj's
``LSST_TOPIC_SUBNAME`` does for Rubin's topics. The stream keeps a bounded history per
subject and a maximum age; `NatsBus.latest` reads the last message of each subject with
``get_last_msg``, so status needs no running subscriber.

Subscriptions are core NATS subscriptions: live delivery, in publication order per
publisher (each topic has one publisher in practice: its device, or the commanding
controller).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from ldf.errors import TransportError
from ldf.ocs.bus import Bus, Subscription
from ldf.ocs.models import Message

__all__ = ["NatsBus"]

_log = logging.getLogger(__name__)


class NatsBus(Bus):
    """The OCS bus on NATS JetStream; make one with `NatsBus.connect`.

    Parameters
    ----------
    nc
        A connected NATS client (closed by `close`).
    stream_prefix
        Prefix of the stream name and of every subject.
    command_timeout_s
        Default command timeout.
    """

    def __init__(self, nc: Client, *, stream_prefix: str, command_timeout_s: float = 10.0) -> None:
        super().__init__(command_timeout_s=command_timeout_s)
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.prefix = stream_prefix
        self.stream = f"{stream_prefix}_OCS"
        self._nats_subs: dict[Subscription, NatsSubscription] = {}

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        stream_prefix: str = "LDF",
        credentials: str | None = None,
        command_timeout_s: float = 10.0,
        max_age_s: float = 86400.0,
        max_msgs_per_subject: int = 1000,
    ) -> NatsBus:
        """Connect and make sure the stream exists with the given limits.

        Parameters
        ----------
        url
            ``nats://host:port``.
        stream_prefix
            Prefix of the stream name and subjects.
        credentials
            A ``.creds`` file path, or a token.
        command_timeout_s
            Default command timeout.
        max_age_s
            Messages older than this leave the stream.
        max_msgs_per_subject
            History kept per subject (the latest always stays until ``max_age_s``).

        Raises
        ------
        TransportError
            The server cannot be reached or has no JetStream.
        """
        options: dict[str, Any] = {
            "connect_timeout": 2,
            "max_reconnect_attempts": 3,
            "error_cb": _log_error,
            **_auth_options(credentials),
        }
        try:
            nc = await nats.connect(url, **options)
        except Exception as exc:  # nats raises several unrelated types for "unreachable"
            raise TransportError(f"cannot reach the NATS server at {url}: {exc}") from exc
        bus = cls(nc, stream_prefix=stream_prefix, command_timeout_s=command_timeout_s)
        config: dict[str, Any] = {
            "name": bus.stream,
            "subjects": [f"{stream_prefix}.ocs.>"],
            "max_age": max_age_s,
            "max_msgs_per_subject": max_msgs_per_subject,
        }
        try:
            try:
                await bus.js.add_stream(**config)
            except BadRequestError:  # exists with other limits
                await bus.js.update_stream(**config)
        except Exception as exc:
            await nc.close()
            raise TransportError(
                f"cannot set up JetStream stream {bus.stream} at {url}: {exc}"
            ) from exc
        return bus

    def _subject(self, topic_or_pattern: str) -> str:
        return f"{self.prefix}.{topic_or_pattern}"

    async def _send(self, message: Message) -> None:
        try:
            await self.js.publish(
                self._subject(message.topic),
                message.model_dump_json().encode(),
                stream=self.stream,
                headers={"Nats-Msg-Id": message.id},
            )
        except Exception as exc:
            raise TransportError(f"cannot publish {message.topic} to NATS: {exc}") from exc

    async def _open_subscription(self, sub: Subscription) -> None:
        if self.closed:
            sub._end()
            return

        async def deliver(msg: Msg) -> None:
            try:
                sub._deliver(Message.model_validate_json(msg.data))
            except ValueError:
                _log.warning("ignoring a malformed message on %s", msg.subject)

        try:
            self._nats_subs[sub] = await self.nc.subscribe(self._subject(sub.pattern), cb=deliver)
            await self.nc.flush()  # the server has the subscription before we return
        except Exception as exc:
            raise TransportError(f"cannot subscribe to {sub.pattern} on NATS: {exc}") from exc
        self._subscriptions.add(sub)

    async def _close_subscription(self, sub: Subscription) -> None:
        await super()._close_subscription(sub)
        nats_sub = self._nats_subs.pop(sub, None)
        if nats_sub is not None and not self.nc.is_closed:
            try:
                await nats_sub.unsubscribe()
            except Exception as exc:  # already gone with the connection
                _log.debug("unsubscribe %s: %s", sub.pattern, exc)

    async def latest(self, pattern: str) -> list[Message]:
        try:
            info = await self.js.stream_info(self.stream, subjects_filter=self._subject(pattern))
            subjects = sorted((info.state.subjects or {}).keys())
            raw = await asyncio.gather(*(self.js.get_last_msg(self.stream, s) for s in subjects))
        except NotFoundError:
            return []
        except Exception as exc:
            raise TransportError(f"cannot read the latest {pattern} from NATS: {exc}") from exc
        return [Message.model_validate_json(r.data or b"{}") for r in raw]

    async def close(self) -> None:
        if self.closed:
            return
        await super().close()
        self._nats_subs.clear()
        if not self.nc.is_closed:
            await self.nc.close()


def _auth_options(credentials: str | None) -> dict[str, str]:
    """Connect options for credentials: a ``.creds`` file path, else a token."""
    if not credentials:
        return {}
    if Path(credentials).is_file():
        return {"user_credentials": credentials}
    return {"token": credentials}


async def _log_error(exc: Exception) -> None:
    # Debug only: connection failures surface as a TransportError with the same text, and
    # a CLI user should see one line, not one per reconnect attempt.
    _log.debug("NATS: %s", exc)
