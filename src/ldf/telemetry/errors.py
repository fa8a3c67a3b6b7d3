"""Errors of the Telemetry Gateway, each with the HTTP status it is answered with.

::

    LdfError
    ├── AuthenticationError            401  no, malformed or unknown bearer token
    ├── ForbiddenError(PermissionError) 403  the token does not cover this topic or action
    ├── NotFoundError
    │   └── UnknownTopicError          404  no such topic
    ├── UserInputError
    │   ├── PayloadTooLargeError       413  the body (or one payload) exceeds its limit
    │   ├── SchemaViolationError       422  the body does not match the topic's schema
    │   └── TelemetryRejectedError         (client side) the gateway answered 4xx
    └── StateError
        ├── DuplicateConflictError     409  a message id seen before, with another payload
        └── UnavailableError           503  the gateway is not ENABLED

Messages never contain tokens.
"""

from __future__ import annotations

from typing import Any

from ldf.errors import ConfigError, LdfError, NotFoundError, StateError, UserInputError

__all__ = [
    "AuthenticationError",
    "DuplicateConflictError",
    "ForbiddenError",
    "PayloadTooLargeError",
    "SchemaViolationError",
    "TelemetryRejectedError",
    "UnavailableError",
    "UnknownTopicError",
    "http_status",
]


class AuthenticationError(LdfError):
    """No bearer token, or one no producer holds."""

    code = "unauthorized"


class ForbiddenError(LdfError, PermissionError):
    """A valid token that does not cover the topic (or an operator action)."""

    code = "forbidden"


class UnknownTopicError(NotFoundError):
    """The topic is not one the gateway knows."""

    code = "unknown_topic"


class PayloadTooLargeError(UserInputError):
    """The request body or one payload is larger than the configured limit."""

    code = "payload_too_large"


class SchemaViolationError(UserInputError):
    """The body does not match the topic's schema.

    Parameters
    ----------
    message
        The first problem, with its field path (``payload.seeing_arcsec: …``).
    errors
        Every problem: ``{"path": "payload.seeing_arcsec", "message": "…"}``.
    """

    code = "schema_violation"

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class DuplicateConflictError(StateError):
    """A message id the producer used before, now with a different payload."""

    code = "duplicate_conflict"


class UnavailableError(StateError):
    """The gateway does not accept messages now (its device is not ENABLED)."""

    code = "unavailable"


class TelemetryRejectedError(UserInputError):
    """The gateway refused a message (HTTP 4xx); sending it again will not help.

    Parameters
    ----------
    status
        The HTTP status.
    code
        The gateway's error code (``schema_violation``…).
    message
        The gateway's one-line reason.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"telemetry gateway refused the message ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.reason = message


_STATUS: tuple[tuple[type[LdfError], int], ...] = (
    (AuthenticationError, 401),
    (ForbiddenError, 403),
    (NotFoundError, 404),
    (PayloadTooLargeError, 413),
    (SchemaViolationError, 422),
    (DuplicateConflictError, 409),
    (UnavailableError, 503),
)


def http_status(exc: LdfError) -> int:
    """The HTTP status an error is answered with (500 for anything unforeseen)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    if isinstance(exc, ConfigError):
        return 500  # the gateway's own configuration (its producers file), not the request
    if isinstance(exc, UserInputError):
        return 400
    return 500
