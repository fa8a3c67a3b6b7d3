"""What the OCS bus talks in: states, topics, messages and command acknowledgements.

Topics follow one scheme, ``ocs.<device>.<kind>.<name>``, where ``kind`` is ``cmd``
(a command to the device), ``ack`` (the device's acknowledgement of a command), ``evt``
(an event, such as ``summaryState``) or ``tel`` (telemetry). Subscription patterns use
NATS wildcards on the dot-separated tokens: ``*`` matches one token and ``>`` (last
token only) matches one or more, so ``ocs.MTCamera.evt.*`` or ``ocs.*.evt.summaryState``.
"""

from __future__ import annotations

import re
import time
import uuid
from enum import IntEnum, StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ldf.errors import UserInputError

__all__ = [
    "Ack",
    "AckCode",
    "DeviceStatus",
    "Kind",
    "Message",
    "State",
    "make_topic",
    "parse_topic",
    "topic_matches",
    "validate_pattern",
]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
"""A device or message name: one topic token, no dots, no wildcards."""


class State(IntEnum):
    """Summary state of an OCS-commandable device, with ts_salobj's numeric values."""

    DISABLED = 1
    """Configured and ready, but not doing its job; ``enable`` makes it work."""
    ENABLED = 2
    """Doing its job."""
    FAULT = 3
    """Something went wrong; only ``standby`` leaves this state."""
    OFFLINE = 4
    """Not under OCS control (after ``exitControl``)."""
    STANDBY = 5
    """Running but not configured; ``start`` configures it."""


class Kind(StrEnum):
    """Kind of a bus message: the third token of its topic."""

    CMD = "cmd"
    """A command to a device."""
    ACK = "ack"
    """A device's acknowledgement of a command."""
    EVT = "evt"
    """An event (state changes, errors, log messages, heartbeats)."""
    TEL = "tel"
    """Telemetry: periodic measurements."""


class AckCode(IntEnum):
    """Acknowledgement codes, with ts_salobj's ``SalRetCode`` values."""

    ACK = 300
    """Received (not used by ldf devices, kept for compatibility)."""
    IN_PROGRESS = 301
    """Accepted and running; a final acknowledgement follows."""
    COMPLETE = 303
    """Done successfully."""
    NOPERM = -300
    """Refused: not allowed in the current state, unknown command or bad parameters."""
    FAILED = -302
    """Accepted, then failed while running; the state did not change."""
    TIMEOUT = -304
    """The controller gave up waiting (never sent by a device)."""

    @property
    def final(self) -> bool:
        """Whether no further acknowledgement follows this one."""
        return self not in (AckCode.ACK, AckCode.IN_PROGRESS)


def make_topic(device: str, kind: Kind | str, name: str) -> str:
    """Build the topic ``ocs.<device>.<kind>.<name>``.

    Raises
    ------
    UserInputError
        The device or message name is empty or contains dots, spaces or wildcards.
    """
    for label, value in (("device", device), ("name", name)):
        if not _TOKEN.match(value):
            raise UserInputError(
                f"invalid {label} {value!r}: use letters, digits, '_' or '-' (no dots)"
            )
    return f"ocs.{device}.{Kind(kind).value}.{name}"


def parse_topic(topic: str) -> tuple[str, Kind, str]:
    """Split a topic into device, kind and name.

    Raises
    ------
    UserInputError
        The topic does not follow ``ocs.<device>.<kind>.<name>``.
    """
    parts = topic.split(".")
    if len(parts) != 4 or parts[0] != "ocs" or parts[2] not in {k.value for k in Kind}:
        raise UserInputError(f"invalid topic {topic!r}: expected ocs.<device>.<kind>.<name>")
    return parts[1], Kind(parts[2]), parts[3]


def validate_pattern(pattern: str) -> str:
    """Check a subscription pattern and return it.

    Raises
    ------
    UserInputError
        The pattern has empty tokens, or ``>`` somewhere other than the last token.
    """
    tokens = pattern.split(".")
    if any(not t for t in tokens) or ">" in tokens[:-1]:
        raise UserInputError(f"invalid pattern {pattern!r}: '>' may only be the last token")
    for token in tokens:
        if token not in ("*", ">") and not _TOKEN.match(token):
            raise UserInputError(f"invalid pattern {pattern!r}: bad token {token!r}")
    return pattern


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether a topic matches a subscription pattern (NATS wildcard rules)."""
    want = pattern.split(".")
    have = topic.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or (part != "*" and part != have[i]):
            return False
    return len(want) == len(have)


def _new_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """One message on the bus."""

    model_config = ConfigDict(frozen=True)

    topic: str = Field(description="``ocs.<device>.<kind>.<name>``.")
    device: str = Field(description="Device the topic belongs to.")
    kind: Kind = Field(description="cmd, ack, evt or tel.")
    name: str = Field(description="Command, event or telemetry name (Rubin's camelCase).")
    payload: dict[str, Any] = Field(default_factory=dict, description="The data (JSON types).")
    id: str = Field(
        default_factory=_new_id, description="Unique message id (commands: the id acks refer to)."
    )
    sender: str = Field(default="", description="Identity of the publishing bus connection.")
    seq: int = Field(default=0, description="The sender's sequence number on this topic (from 1).")
    timestamp: float = Field(
        default_factory=time.time, description="When it was sent: UTC, seconds since 1970."
    )

    @classmethod
    def build(
        cls, device: str, kind: Kind | str, name: str, payload: dict[str, Any] | None = None
    ) -> Message:
        """Make a message for a device, kind and name (topic built and checked)."""
        return cls(
            topic=make_topic(device, kind, name),
            device=device,
            kind=Kind(kind),
            name=name,
            payload=payload or {},
        )


class Ack(BaseModel):
    """A device's acknowledgement of a command (the payload of an ``ack`` message)."""

    command_id: str = Field(description="Id of the command message acknowledged.")
    device: str = Field(description="Device that acknowledges.")
    command: str = Field(description="Command name.")
    code: AckCode = Field(description="What happened.")
    result: str = Field(default="", description="Human-readable result or reason for refusal.")
    timeout_s: float = Field(
        default=0.0, ge=0, description="IN_PROGRESS only: how much longer the command may take."
    )


class DeviceStatus(BaseModel):
    """What the bus knows about one device, for ``ldf ocs status``."""

    name: str = Field(description="Device name.")
    state: str | None = Field(description="Name of the last summaryState; None if never sent.")
    summary_state: int | None = Field(description="Its numeric value (ts_salobj's).")
    last_heartbeat: float | None = Field(description="UTC time of the last heartbeat, if any.")
    heartbeat_age_s: float | None = Field(description="Seconds since the last heartbeat.")
    error_code: int = Field(default=0, description="Last errorCode published (0: none).")
    error_report: str = Field(default="", description="Last error report published.")
