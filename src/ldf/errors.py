"""Errors shared by every ldf package.

Hierarchy (each user-facing error also inherits the matching builtin, as daf_butler does)::

    LdfError                          base; carries a stable machine-readable ``code``
    ├── UserInputError(ValueError)    bad input from a user or another service (exit code 2)
    │   └── ConfigError               a configuration file or override is invalid
    ├── NotFoundError(LookupError)    something named does not exist
    ├── StateError(RuntimeError)      the request is illegal in the current state
    │   ├── CommandRefusedError       an OCS command was refused by its device
    │   └── CommandFailedError        a device accepted a command and then failed it
    ├── TransportError(ConnectionError)  a bus, database or remote service could not be reached
    │   └── CommandTimeoutError(TimeoutError)  a command got no acknowledgement in time
    └── StorageError(OSError)         reading or writing storage failed (disk full, permissions)
        ├── StorageFullError          no space left at a destination
        ├── ChecksumMismatchError     bytes differ from their recorded checksum
        └── StagingRequiredError      a nearline file must be staged before it is read

The CLI turns any ``LdfError`` into one line on stderr (``error: <message>``) and an exit code:
2 for ``UserInputError``, 1 otherwise. Messages never contain secrets.
"""

from __future__ import annotations


class LdfError(Exception):
    """Base of every error ldf raises on purpose."""

    code: str = "ldf_error"
    """Stable machine-readable code, used in JSON output and HTTP error bodies."""

    exit_code: int = 1
    """Process exit code the CLI uses for this error."""


class UserInputError(LdfError, ValueError):
    """Bad input: a value, file or command line that cannot be accepted."""

    code = "invalid_input"
    exit_code = 2


class ConfigError(UserInputError):
    """A configuration file or environment override is invalid.

    Parameters
    ----------
    message
        Summary line.
    problems
        Every problem found, each prefixed with its location (``file:line:col: field: why``).
    """

    code = "invalid_config"

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        if not self.problems:
            return super().__str__()
        return "\n".join([super().__str__(), *(f"  {p}" for p in self.problems)])


class NotFoundError(LdfError, LookupError):
    """Something named by the caller does not exist."""

    code = "not_found"
    exit_code = 2


class StateError(LdfError, RuntimeError):
    """The request is not allowed in the current state."""

    code = "invalid_state"


class CommandRefusedError(StateError):
    """An OCS command was refused by its device; nothing changed."""

    code = "command_refused"


class CommandFailedError(StateError):
    """A device accepted a command, then failed it; its state did not change."""

    code = "command_failed"


class TransportError(LdfError, ConnectionError):
    """A bus, database or remote service could not be reached."""

    code = "transport_error"


class CommandTimeoutError(TransportError, TimeoutError):
    """A command got no acknowledgement within its timeout."""

    code = "command_timeout"


class StorageError(LdfError, OSError):
    """Reading or writing storage failed."""

    code = "storage_error"


class StorageFullError(StorageError):
    """No space left on the destination; nothing was left half-written."""

    code = "storage_full"


class ChecksumMismatchError(StorageError):
    """Bytes read or written differ from their recorded checksum."""

    code = "checksum_mismatch"


class StagingRequiredError(StorageError):
    """A file on a nearline (tape-like) endpoint must be staged before it can be read."""

    code = "staging_required"


def http_status(exc: LdfError) -> int:
    """The HTTP status an HTTP API answers an error with.

    400 bad input, 404 not found, 409 illegal in the current state, 503 a dependency is
    unreachable; 500 for the service's own configuration, storage and anything unforeseen.
    """
    if isinstance(exc, ConfigError):
        return 500  # the service's own configuration, not the request
    if isinstance(exc, UserInputError):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, StateError):
        return 409
    if isinstance(exc, TransportError):
        return 503
    return 500
