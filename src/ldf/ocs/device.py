"""OCS-commandable devices: the summary state machine of Rubin's CSCs.

::

                 start            enable
     STANDBY ───────────► DISABLED ───────► ENABLED
       ▲  │  ◄─────────── │      ◄───────
       │  │    standby          disable
       │  │ exitControl
       │  ▼
       │ OFFLINE          (any state) ──fault()──► FAULT ──standby──► STANDBY

The transitions are a table (`TRANSITIONS`) and a pure function (`next_state`), so they
can be tested exhaustively. `Device` runs the table on the bus: it receives commands,
refuses illegal ones with a reason (nothing changes), calls the subclass hooks
(``handle_start``...), publishes ``summaryState``, ``errorCode``, ``logMessage`` and
``heartbeat`` events, and keeps metrics. Subclasses add commands with `Device.register_command`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Self

from prometheus_client import CollectorRegistry

from ldf.errors import CommandRefusedError, LdfError, StateError, UserInputError
from ldf.ocs.bus import Bus, Subscription
from ldf.ocs.metrics import DeviceMetrics
from ldf.ocs.models import AckCode, Message, State, make_topic

__all__ = [
    "STANDARD_COMMANDS",
    "TRANSITIONS",
    "CommandHandler",
    "Device",
    "next_state",
]

_log = logging.getLogger(__name__)

TRANSITIONS: Mapping[str, Mapping[State, State]] = MappingProxyType(
    {
        "start": MappingProxyType({State.STANDBY: State.DISABLED}),
        "enable": MappingProxyType({State.DISABLED: State.ENABLED}),
        "disable": MappingProxyType({State.ENABLED: State.DISABLED}),
        "standby": MappingProxyType({State.DISABLED: State.STANDBY, State.FAULT: State.STANDBY}),
        "exitControl": MappingProxyType({State.STANDBY: State.OFFLINE}),
    }
)
"""For each state-transition command, the states it is allowed in and where each leads."""

STANDARD_COMMANDS: tuple[str, ...] = tuple(TRANSITIONS)
"""The state-transition commands every device accepts."""

CommandHandler = Callable[[dict[str, Any]], Awaitable[str | None]]
"""A registered command: takes the parameters, returns an optional result text."""


def _states(states: Iterable[State]) -> str:
    return ", ".join(s.name for s in sorted(states, key=lambda s: s.name)) or "no state"


def next_state(device: str, state: State, command: str) -> State:
    """The state a transition command leads to from a state.

    Parameters
    ----------
    device
        Device name, for the message.
    state
        Current summary state.
    command
        One of `STANDARD_COMMANDS`.

    Raises
    ------
    CommandRefusedError
        The command is not allowed in this state (or is not a transition command); the
        message says where it is allowed.
    """
    allowed = TRANSITIONS.get(command)
    if allowed is None:
        raise CommandRefusedError(
            f"{device}: unknown command {command!r}; known: {', '.join(STANDARD_COMMANDS)}"
        )
    if state not in allowed:
        raise CommandRefusedError(
            f"{device}: cannot {command} in state {state.name}; allowed in {_states(allowed)}"
        )
    return allowed[state]


@dataclass(frozen=True)
class _Registered:
    handler: CommandHandler
    allowed: frozenset[State]


Action = Callable[[], Awaitable[str]]


class Device:
    """An OCS-commandable device.

    Subclasses override the hooks (``handle_start``, ``handle_enable``, ``handle_disable``,
    ``handle_standby``, ``handle_exit_control``); a hook that raises fails its command and
    leaves the state unchanged. Use as ``async with Device(...) as device:`` or call
    `open` and `close`; `serve` runs until ``exitControl``.

    Parameters
    ----------
    name
        Device name on the bus (e.g. ``MTCamera``, ``Archiver``).
    bus
        Bus to listen and publish on (not closed by the device).
    configurations
        Configuration names ``start`` accepts; the first is the default.
    heartbeat_interval_s
        Seconds between heartbeat events.
    initial_state
        State when opened (Rubin's CSCs start in STANDBY).
    registry
        Prometheus registry for the device's metrics (a new one when None).
    """

    def __init__(
        self,
        name: str,
        bus: Bus,
        *,
        configurations: Sequence[str] = ("default",),
        heartbeat_interval_s: float = 1.0,
        initial_state: State = State.STANDBY,
        registry: CollectorRegistry | None = None,
    ) -> None:
        make_topic(name, "evt", "x")  # validates the name
        if not configurations:
            raise UserInputError(f"{name}: at least one configuration is needed")
        self.name = name
        self.bus = bus
        self.configurations = tuple(configurations)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.configuration: str | None = None
        """Configuration given to the last successful ``start`` (None in STANDBY)."""
        self.error_code = 0
        """Code of the current fault (0 when not in FAULT)."""
        self.error_report = ""
        """Report of the current fault."""
        self.last_heartbeat: float | None = None
        """UTC time of the last heartbeat published."""
        self.metrics = DeviceMetrics(name, registry)
        self._state = initial_state
        self._commands: dict[str, _Registered] = {}
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._offline = asyncio.Event()
        self.metrics.set_state(initial_state)

    @property
    def state(self) -> State:
        """Current summary state."""
        return self._state

    # -- hooks -----------------------------------------------------------------------------

    async def handle_start(self, configuration: str) -> None:
        """Configure the device (STANDBY → DISABLED)."""

    async def handle_enable(self) -> None:
        """Start doing the job (DISABLED → ENABLED)."""

    async def handle_disable(self) -> None:
        """Stop doing the job (ENABLED → DISABLED)."""

    async def handle_standby(self) -> None:
        """Drop the configuration (DISABLED or FAULT → STANDBY)."""

    async def handle_exit_control(self) -> None:
        """Leave OCS control (STANDBY → OFFLINE)."""

    # -- commands --------------------------------------------------------------------------

    def register_command(
        self, name: str, handler: CommandHandler, *, allowed: Iterable[State]
    ) -> None:
        """Add a command that the device accepts in the given states.

        Raises
        ------
        UserInputError
            The name is invalid or already a command.
        """
        make_topic(self.name, "cmd", name)
        if name in TRANSITIONS or name in self._commands:
            raise UserInputError(f"{self.name}: command {name!r} already exists")
        self._commands[name] = _Registered(handler, frozenset(allowed))

    @property
    def command_names(self) -> list[str]:
        """Every command the device accepts (in some state)."""
        return [*STANDARD_COMMANDS, *self._commands]

    def _prepare(self, name: str, params: dict[str, Any]) -> Action:
        """Check a command against the current state; return what running it does.

        Raises
        ------
        CommandRefusedError
            Illegal in this state, unknown command, or unknown configuration.
        """
        if name in self._commands:
            registered = self._commands[name]
            if self._state not in registered.allowed:
                raise CommandRefusedError(
                    f"{self.name}: cannot {name} in state {self._state.name}; "
                    f"allowed in {_states(registered.allowed)}"
                )

            async def run_registered() -> str:
                return (await registered.handler(params)) or ""

            return run_registered
        if name not in TRANSITIONS:
            raise CommandRefusedError(
                f"{self.name}: unknown command {name!r}; known: {', '.join(self.command_names)}"
            )
        before = self._state
        after = next_state(self.name, before, name)
        configuration = None
        if name == "start":
            configuration = str(params.get("configuration") or self.configurations[0])
            if configuration not in self.configurations:
                raise CommandRefusedError(
                    f"{self.name}: unknown configuration {configuration!r}; "
                    f"known: {', '.join(self.configurations)}"
                )

        async def run_transition() -> str:
            match name:
                case "start":
                    assert configuration is not None
                    await self.handle_start(configuration)
                case "enable":
                    await self.handle_enable()
                case "disable":
                    await self.handle_disable()
                case "standby":
                    await self.handle_standby()
                case "exitControl":
                    await self.handle_exit_control()
            if self._state is not before:
                raise StateError(f"{self.name}: state changed to {self._state.name} during {name}")
            if name == "start":
                self.configuration = configuration
            elif after is State.STANDBY:
                self.configuration = None
            await self._set_state(after)
            return f"{self.name} is {after.name}"

        return run_transition

    async def execute(self, name: str, params: dict[str, Any] | None = None) -> str:
        """Run a command in-process, without the bus (the bus path runs the same checks).

        Returns
        -------
        str
            The command's result text.

        Raises
        ------
        CommandRefusedError
            The command is illegal now; nothing changed.
        Exception
            Whatever the hook raised; the state did not change.
        """
        action = self._prepare(name, params or {})
        try:
            result = await action()
        except Exception:
            self.metrics.command(name, "failed")
            raise
        self.metrics.command(name, "complete")
        return result

    async def _handle(self, command: Message) -> None:
        """Run one command received on the bus and acknowledge it."""
        try:
            action = self._prepare(command.name, command.payload)
        except CommandRefusedError as exc:
            self.metrics.command(command.name, "refused")
            await self.bus.ack(command, AckCode.NOPERM, str(exc))
            return
        await self.bus.ack(command, AckCode.IN_PROGRESS)
        try:
            result = await action()
        except Exception as exc:
            self.metrics.command(command.name, "failed")
            reason = f"{self.name}: {command.name} failed: {exc}"
            await self.log(logging.ERROR, reason)
            await self.bus.ack(command, AckCode.FAILED, reason)
            return
        self.metrics.command(command.name, "complete")
        await self.bus.ack(command, AckCode.COMPLETE, result)
        if self._state is State.OFFLINE:
            self._offline.set()

    # -- events ----------------------------------------------------------------------------

    async def _set_state(self, state: State) -> None:
        self._state = state
        self.metrics.set_state(state)
        if state is not State.FAULT:
            self.error_code, self.error_report = 0, ""
        await self.publish_summary_state()

    async def publish_summary_state(self) -> None:
        """Publish the ``summaryState`` event."""
        await self.bus.publish_event(
            self.name, "summaryState", {"summaryState": int(self._state), "state": self._state.name}
        )

    async def log(self, level: int, message: str) -> None:
        """Log a message locally and publish it as a ``logMessage`` event."""
        _log.log(level, message)
        await self.bus.publish_event(
            self.name,
            "logMessage",
            {"level": level, "levelName": logging.getLevelName(level), "message": message},
        )

    async def fault(self, code: int, report: str) -> None:
        """Go to FAULT: publish ``errorCode`` (code and report, no traceback), then state.

        Only ``standby`` leaves FAULT.
        """
        self.error_code, self.error_report = code, report
        await self.bus.publish_event(
            self.name, "errorCode", {"errorCode": code, "errorReport": report, "traceback": ""}
        )
        self._state = State.FAULT
        self.metrics.set_state(State.FAULT)
        await self.publish_summary_state()

    def health(self) -> dict[str, Any]:
        """Health for ``/health``: state, last heartbeat, error and ``ok`` (not in FAULT)."""
        now = time.time()
        return {
            "name": self.name,
            "state": self._state.name,
            "summaryState": int(self._state),
            "configuration": self.configuration,
            "last_heartbeat": self.last_heartbeat,
            "heartbeat_age_s": None if self.last_heartbeat is None else now - self.last_heartbeat,
            "errorCode": self.error_code,
            "errorReport": self.error_report,
            "ok": self._state is not State.FAULT,
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> Self:
        """Start listening for commands, publish the state, start the heartbeat."""
        if self._sub is not None:
            return self
        self._sub = await self.bus.commands(self.name).start()
        await self.publish_summary_state()
        self._tasks = [
            asyncio.create_task(self._command_loop(self._sub), name=f"{self.name} commands"),
            asyncio.create_task(self._heartbeat_loop(), name=f"{self.name} heartbeat"),
        ]
        return self

    async def close(self) -> None:
        """Stop heartbeats and command handling (the bus stays open)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._sub is not None:
            await self._sub.close()
            self._sub = None

    async def serve(self) -> None:
        """Open, run until ``exitControl`` takes the device OFFLINE, then close."""
        await self.open()
        try:
            await self._offline.wait()
        finally:
            await self.close()

    async def _command_loop(self, sub: Subscription) -> None:
        async for command in sub:
            try:
                await self._handle(command)
            except LdfError as exc:  # e.g. the bus went away while acknowledging
                _log.warning("%s: cannot handle %s: %s", self.name, command.name, exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.bus.publish_event(self.name, "heartbeat", {})
            except LdfError as exc:
                _log.warning("%s: heartbeat not published: %s", self.name, exc)
            else:
                self.last_heartbeat = time.time()
                self.metrics.heartbeat()
            await asyncio.sleep(self.heartbeat_interval_s)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
