"""The Telemetry Gateway's logic (LDM-230 2.7): accept, validate, buffer, inject, audit.

Accepting
    `TelemetryGateway.authenticate` finds the producer of a bearer token (the producers file,
    `ldf.telemetry.tokens`); `authorize` checks the topic exists and is in the producer's
    scope; `parse` validates the body against the topic's schema (`ldf.telemetry.models`);
    `accept` stores the messages durably in one transaction, idempotently on (producer,
    message id), and only then does the caller answer 2xx. While the gateway's device is not
    ENABLED, `check_accepting` refuses (503). Every outcome goes to the audit trail.

Injecting
    `Injector` drains the buffer into the OCS bus: for each producer, its pending messages
    in sequence order, one `Bus.publish` at a time, marked injected only after the bus took
    them. When the bus raises (unreachable, closed, full) the producer's drain stops at that
    message and is retried with exponential backoff; later messages wait, so the order on the
    bus is the producer's order. Producers drain independently: one whose bus topic fails does
    not hold up the others.

Delivery is at least once: after a crash between a publish and its mark (or a publish that
reached the bus but raised on the way back) the message is published again. Each bus
message's id is ``<producer>/<message_id>`` (`bus_message_id`), so consumers drop repeats
(NATS JetStream drops them itself within its duplicate window, as the id is its
``Nats-Msg-Id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ldf.config import Settings
from ldf.db import utcnow
from ldf.errors import LdfError, UserInputError
from ldf.ocs.bus import Bus
from ldf.ocs.models import Kind, Message, State
from ldf.telemetry.errors import (
    AuthenticationError,
    ForbiddenError,
    PayloadTooLargeError,
    SchemaViolationError,
    UnavailableError,
    UnknownTopicError,
    http_status,
)
from ldf.telemetry.models import (
    TOPICS,
    Accepted,
    AuditEntry,
    BatchIn,
    GatewayStatus,
    Incoming,
    MessageIn,
    Producer,
    StoredMessage,
    TopicSpec,
    bus_message_id,
    canonical_json,
    payload_digest,
)
from ldf.telemetry.storage import GatewayStore
from ldf.telemetry.tokens import ProducerFile

__all__ = ["Injector", "TelemetryGateway", "bus_message", "producers_path"]

_log = logging.getLogger(__name__)

_ENVELOPES: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    name: (MessageIn[spec.model], BatchIn[spec.model])  # type: ignore[name-defined]
    for name, spec in TOPICS.items()
}
"""Per topic, the validated body of a single message and of a batch."""

_MAX_ERRORS = 20
"""Most schema problems listed in one error."""


def producers_path(settings: Settings) -> Path:
    """The producers file: ``policies.telemetry.producers_file`` or under ``$LDF_HOME/secrets``."""
    configured = settings.policies.telemetry.producers_file
    if configured:
        return Path(configured).expanduser().absolute()
    return settings.home / "secrets" / "telemetry-producers.yaml"


def _schema_error(exc: ValidationError, what: str) -> SchemaViolationError:
    errors = []
    for err in exc.errors()[:_MAX_ERRORS]:
        path = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "json_invalid":
            path, message = "", f"not valid JSON ({err.get('ctx', {}).get('error', 'syntax')})"
        errors.append({"path": path, "message": message})
    first = errors[0] if errors else {"path": "", "message": "invalid"}
    more = exc.error_count() - 1
    line = f"{what}: {first['path'] + ': ' if first['path'] else ''}{first['message']}"
    if more:
        line += f" (and {more} more problem{'s' if more > 1 else ''})"
    return SchemaViolationError(line, errors)


def guess_message_id(body: bytes) -> str | None:
    """The ``message_id`` of a body that failed validation, if it has one (for the audit)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    value = data.get("message_id") if isinstance(data, dict) else None
    return value[:128] if isinstance(value, str) else None


class TelemetryGateway:
    """The Telemetry Gateway over one store and one producers file.

    Parameters
    ----------
    settings
        The site configuration (``policies.telemetry``).
    store
        The buffer and audit trail.
    producers
        The producers file.
    """

    def __init__(self, settings: Settings, store: GatewayStore, producers: ProducerFile) -> None:
        self.settings = settings
        self.policy = settings.policies.telemetry
        self.store = store
        self.producers = producers
        self.state = State.STANDBY
        """The state of the gateway's device; messages are accepted only when ENABLED."""
        self._wakers: list[Callable[[str], None]] = []
        self._wakers_lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings) -> TelemetryGateway:
        """The gateway of a configuration: its database (role ``telemetry``) migrated."""
        store = GatewayStore.open(settings.database_url("telemetry"))
        return cls(settings, store, ProducerFile(producers_path(settings)))

    def close(self) -> None:
        """Release database connections."""
        self.store.close()

    def __enter__(self) -> TelemetryGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def device_name(self) -> str:
        """The gateway's own OCS device name."""
        return self.policy.device

    @property
    def accepting(self) -> bool:
        """Whether new messages are accepted now (the device is ENABLED)."""
        return self.state is State.ENABLED

    # -- topics ------------------------------------------------------------------------------

    def topic(self, name: str) -> TopicSpec:
        """A topic by name.

        Raises
        ------
        UnknownTopicError
            No such topic.
        """
        spec = TOPICS.get(name)
        if spec is None:
            raise UnknownTopicError(f"unknown topic {name!r}; known: {', '.join(TOPICS)}")
        return spec

    def topics(self) -> list[dict[str, Any]]:
        """Every topic: name, description and where its schema is served."""
        return [
            {
                "name": spec.name,
                "description": spec.description,
                "bus_topic": f"ocs.<device>.tel.{spec.name}",
                "schema": f"/telemetry/v1/topics/{spec.name}/schema",
            }
            for spec in TOPICS.values()
        ]

    # -- who may do what ---------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Producer:
        """The producer of an ``Authorization: Bearer <token>`` header.

        Raises
        ------
        AuthenticationError
            No header, not a bearer token, or a token no producer holds.
        """
        if not authorization:
            raise AuthenticationError("missing bearer token (Authorization: Bearer <token>)")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("malformed Authorization header: expected Bearer <token>")
        producer = self.producers.authenticate(token)
        if producer is None:
            raise AuthenticationError("invalid bearer token")
        return producer

    def authorize(self, producer: Producer, topic: str) -> TopicSpec:
        """The topic, if the producer may send it.

        Raises
        ------
        UnknownTopicError
            No such topic.
        ForbiddenError
            The producer's token does not cover it.
        """
        spec = self.topic(topic)
        if topic not in producer.topics:
            allowed = ", ".join(producer.topics) or "no topic"
            raise ForbiddenError(
                f"producer {producer.name} may not send {topic} (its token covers {allowed})"
            )
        return spec

    def require_operator(self, producer: Producer) -> None:
        """Refuse a producer that is not an operator.

        Raises
        ------
        ForbiddenError
            Its token is not an operator's.
        """
        if not producer.operator:
            raise ForbiddenError(f"{producer.name} is not an operator: status and audit need one")

    def check_accepting(self) -> None:
        """Refuse while the device is not ENABLED.

        Raises
        ------
        UnavailableError
            The device is DISABLED (or STANDBY, FAULT, OFFLINE).
        """
        if not self.accepting:
            raise UnavailableError(
                f"{self.device_name} is {self.state.name}: not accepting telemetry now; "
                f"Operations enable it (ldf ocs command {self.device_name} enable)"
            )

    # -- accepting ---------------------------------------------------------------------------

    def parse(self, topic: str, body: bytes | str, *, batch: bool = False) -> list[Incoming]:
        """Validate a request body against the topic's schema.

        Parameters
        ----------
        topic
            The topic.
        body
            ``{"message_id": …, "payload": {…}}``, or with ``batch``
            ``{"messages": [{"message_id": …, "payload": {…}}, …]}``.
        batch
            Whether the body is a batch.

        Returns
        -------
        list[Incoming]
            The messages, payloads normalised (what the bus will carry).

        Raises
        ------
        UnknownTopicError
            No such topic.
        SchemaViolationError
            Not JSON, or not the topic's schema (the message names the field path).
        PayloadTooLargeError
            A batch has too many messages, or one payload is larger than ``max_body_bytes``.
        """
        self.topic(topic)
        single, many = _ENVELOPES[topic]
        try:
            envelope: Any = (many if batch else single).model_validate_json(body)
        except ValidationError as exc:
            raise _schema_error(exc, f"{topic} {'batch' if batch else 'message'}") from None
        items = envelope.messages if batch else [envelope]
        if len(items) > self.policy.max_batch_messages:
            raise PayloadTooLargeError(
                f"batch of {len(items)} messages; at most {self.policy.max_batch_messages}"
            )
        out = []
        for item in items:
            payload = item.payload.model_dump(mode="json", exclude_unset=True)
            canonical = canonical_json(payload)
            if len(canonical) > self.policy.max_body_bytes:
                raise PayloadTooLargeError(
                    f"payload of {item.message_id} is {len(canonical)} bytes; "
                    f"at most {self.policy.max_body_bytes}"
                )
            out.append(Incoming(item.message_id, payload, canonical, payload_digest(canonical)))
        return out

    def accept(
        self,
        producer: Producer,
        topic: str,
        messages: list[Incoming],
        *,
        client: str = "",
    ) -> list[Accepted]:
        """Store validated messages durably (then wake the injector).

        Raises
        ------
        UnavailableError
            The device is not ENABLED.
        UnknownTopicError, ForbiddenError
            See `authorize`.
        DuplicateConflictError
            A message id used before with another payload (nothing stored).
        """
        self.check_accepting()
        self.authorize(producer, topic)
        assert producer.device is not None  # a producer with topics has a device
        results = self.store.accept(
            producer.name, producer.device, topic, messages, now=utcnow(), client=client
        )
        if any(r.status == "accepted" for r in results):
            self._wake(producer.name)
        return results

    def submit(
        self,
        producer: Producer,
        topic: str,
        payload: dict[str, Any],
        message_id: str,
        *,
        client: str = "",
    ) -> Accepted:
        """Validate and store one message given as Python data (the HTTP path's checks).

        Raises
        ------
        SchemaViolationError
            The payload is not the topic's schema (or holds NaN).
        UnavailableError, UnknownTopicError, ForbiddenError, DuplicateConflictError
            See `accept`.
        """
        self.check_accepting()
        self.authorize(producer, topic)
        try:
            body = json.dumps({"message_id": message_id, "payload": payload}, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SchemaViolationError(
                f"{topic} message: payload is not JSON data: {exc}"
            ) from None
        return self.accept(producer, topic, self.parse(topic, body), client=client)[0]

    def reject(
        self,
        exc: LdfError,
        *,
        producer: Producer | None,
        topic: str | None,
        message_id: str | None = None,
        client: str = "",
    ) -> None:
        """Record a refused request in the audit trail (never raises: it is logged instead)."""
        try:
            self.store.reject(
                now=utcnow(),
                producer=None if producer is None else producer.name,
                topic=topic,
                message_id=message_id,
                status=http_status(exc),
                reason=f"{exc.code}: {str(exc).splitlines()[0]}",
                client=client,
            )
        except Exception:
            _log.exception("cannot write the audit row of a rejected telemetry request")

    # -- operators ---------------------------------------------------------------------------

    def status(self) -> GatewayStatus:
        """The gateway's state, backlog and every producer's counts."""
        producers = self.store.status()
        return GatewayStatus(
            device=self.device_name,
            state=self.state.name,
            accepting=self.accepting,
            backlog=sum(p.backlog for p in producers),
            producers=producers,
            rejected_unauthenticated=self.store.rejected_unauthenticated(),
        )

    def audit(
        self,
        *,
        producer: str | None = None,
        outcome: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """The audit trail, newest first."""
        if outcome is not None and outcome not in ("accepted", "duplicate", "rejected"):
            raise UserInputError(
                f"unknown outcome {outcome!r}; use accepted, duplicate or rejected"
            )
        if limit < 1:
            raise UserInputError(f"limit must be >= 1, got {limit}")
        return self.store.audit(
            producer=producer, outcome=outcome, before_id=before_id, limit=limit
        )

    def purge(self) -> tuple[int, int]:
        """Forget injected messages and audit rows older than ``retention_days``."""
        return self.store.purge(utcnow() - timedelta(days=self.policy.retention_days))

    # -- waking the injector -----------------------------------------------------------------

    def add_waker(self, wake: Callable[[str], None]) -> None:
        """Call ``wake(producer)`` (from any thread) whenever a producer's messages are stored."""
        with self._wakers_lock:
            self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[str], None]) -> None:
        """Stop calling ``wake``."""
        with self._wakers_lock:
            if wake in self._wakers:
                self._wakers.remove(wake)

    def _wake(self, producer: str) -> None:
        with self._wakers_lock:
            wakers = list(self._wakers)
        for wake in wakers:
            wake(producer)


def bus_message(message: StoredMessage) -> Message:
    """The OCS bus message of a buffered message (id: `bus_message_id`)."""
    return Message(
        topic=message.bus_topic,
        device=message.device,
        kind=Kind.TEL,
        name=message.topic,
        payload=message.payload,
        id=bus_message_id(message.producer, message.message_id),
    )


class Injector:
    """Drains the gateway's buffer into the OCS bus, in order per producer.

    Run `run` as a task (the gateway's device does, while ENABLED); cancel it to stop.

    Parameters
    ----------
    gateway
        The gateway whose buffer is drained.
    bus
        The bus to publish on (not closed here).
    batch
        Messages read (and marked injected) at a time per producer.
    poll_s
        How often the buffer is looked at without being woken (messages stored by another
        process).
    """

    def __init__(
        self, gateway: TelemetryGateway, bus: Bus, *, batch: int = 200, poll_s: float = 1.0
    ) -> None:
        self.gateway = gateway
        self.bus = bus
        self.batch = batch
        self.poll_s = poll_s
        self.retry_base_s = gateway.policy.retry_base_s
        self.retry_max_s = gateway.policy.retry_max_s
        self.injected = 0
        """Messages this injector put on the bus."""
        self.failures: dict[str, int] = {}
        """Consecutive failed attempts per producer (absent: the last attempt succeeded)."""
        self.last_error: str | None = None
        """The most recent publish error."""
        self._retry_at: dict[str, float] = {}
        self._woken: set[str] = set()
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self, producer: str | None = None) -> None:
        """Look at a producer's messages (None: the whole buffer) now; thread-safe."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._woke, producer)

    def _woke(self, producer: str | None) -> None:
        if producer is not None:
            self._woken.add(producer)
        if self._event is not None:
            self._event.set()

    async def run(self) -> None:
        """Drain until cancelled: woken producers at once, the whole buffer every ``poll_s``.

        A wake-up names the producer whose messages were just stored, so the pass reads only
        its messages; a pass that was not woken (the poll, a retry falling due) scans the
        whole buffer, which also finds messages stored by other processes.
        """
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self.gateway.add_waker(self.wake)
        scan_all = True
        try:
            while True:
                self._event.clear()
                woken, self._woken = self._woken, set()
                try:
                    more = await self.drain_once(None if scan_all else woken)
                except Exception as exc:  # e.g. the database is down: try again later
                    _log.warning("telemetry injector: %s", exc)
                    more, scan_all = set(), True
                if more:
                    self._woken |= more
                    scan_all = False
                    continue
                timeout = self.poll_s
                if self._retry_at:
                    soonest = min(self._retry_at.values()) - self._loop.time()
                    timeout = max(0.0, min(timeout, soonest))
                try:
                    await asyncio.wait_for(self._event.wait(), timeout)
                    scan_all = False
                except TimeoutError:
                    scan_all = True
        finally:
            self.gateway.remove_waker(self.wake)

    async def drain_once(self, producers: set[str] | None = None) -> set[str]:
        """One pass over producers (None: all with pending messages) not waiting to retry.

        Returns
        -------
        set[str]
            The producers with more messages ready now (they filled a batch).
        """
        loop = asyncio.get_running_loop()
        if producers is None:
            producers = set(await asyncio.to_thread(self.gateway.store.pending_producers))
        now = loop.time()
        ready = sorted(p for p in producers if self._retry_at.get(p, 0.0) <= now)
        if not ready:
            return set()
        # return_exceptions: one producer's failure must not leave the others' drains running
        # unawaited, or the next pass could drain a producer twice at once (out of order).
        results = await asyncio.gather(*(self._drain(p) for p in ready), return_exceptions=True)
        more = set()
        for producer, result in zip(ready, results, strict=True):
            if isinstance(result, BaseException):
                _log.warning("telemetry of %s: %s", producer, result)
            elif result:
                more.add(producer)
        return more

    async def _drain(self, producer: str) -> bool:
        """Publish a producer's next pending messages in order; True if it had a full batch."""
        store = self.gateway.store
        messages = await asyncio.to_thread(store.pending, producer, self.batch)
        done: list[int] = []
        error: Exception | None = None
        try:
            for message in messages:
                try:
                    await self.bus.publish(bus_message(message))
                except Exception as exc:  # any failure of the bus: keep the order, retry
                    error = exc
                    break
                done.append(message.id)
        finally:
            if done:
                # Shielded: a disable arriving now must not lose the record of what went out.
                await asyncio.shield(
                    asyncio.to_thread(store.mark_injected, producer, done, utcnow())
                )
                self.injected += len(done)
        if error is not None:
            await self._failed(producer, error)
            return False
        if producer in self.failures:
            _log.info(
                "telemetry of %s reaches the bus again after %d failed attempts",
                producer,
                self.failures.pop(producer),
            )
            self._retry_at.pop(producer, None)
        return len(messages) == self.batch

    async def _failed(self, producer: str, error: Exception) -> None:
        n = self.failures.get(producer, 0) + 1
        self.failures[producer] = n
        delay = min(self.retry_base_s * 2 ** (n - 1), self.retry_max_s)
        self._retry_at[producer] = asyncio.get_running_loop().time() + delay
        text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        self.last_error = text
        if n == 1 or n % 10 == 0:
            _log.warning(
                "telemetry of %s not injected (attempt %d, next in %.1f s): %s",
                producer,
                n,
                delay,
                text,
            )
        try:
            await asyncio.to_thread(self.gateway.store.injection_failed, producer, text, utcnow())
        except Exception as exc:
            _log.warning("cannot record the injection failure of %s: %s", producer, exc)
