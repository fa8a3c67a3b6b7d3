"""The summary state machine, exhaustively: every (state, command) pair."""

from __future__ import annotations

import itertools

import pytest

from ldf.errors import CommandRefusedError
from ldf.ocs.device import STANDARD_COMMANDS, TRANSITIONS, next_state
from ldf.ocs.models import State

LEGAL = {
    (State.STANDBY, "start"): State.DISABLED,
    (State.DISABLED, "enable"): State.ENABLED,
    (State.ENABLED, "disable"): State.DISABLED,
    (State.DISABLED, "standby"): State.STANDBY,
    (State.FAULT, "standby"): State.STANDBY,
    (State.STANDBY, "exitControl"): State.OFFLINE,
}
"""Rubin's CSC transitions, written out independently of the table under test."""

ALLOWED_TEXT = {
    "start": "STANDBY",
    "enable": "DISABLED",
    "disable": "ENABLED",
    "standby": "DISABLED, FAULT",
    "exitControl": "STANDBY",
}


def test_salobj_state_values() -> None:
    assert {s.name: int(s) for s in State} == {
        "DISABLED": 1,
        "ENABLED": 2,
        "FAULT": 3,
        "OFFLINE": 4,
        "STANDBY": 5,
    }


def test_commands() -> None:
    assert set(STANDARD_COMMANDS) == {"start", "enable", "disable", "standby", "exitControl"}


@pytest.mark.parametrize(("state", "command"), list(itertools.product(State, STANDARD_COMMANDS)))
def test_every_pair(state: State, command: str) -> None:
    if (state, command) in LEGAL:
        assert next_state("MTCamera", state, command) is LEGAL[state, command]
        return
    with pytest.raises(CommandRefusedError) as info:
        next_state("MTCamera", state, command)
    assert str(info.value) == (
        f"MTCamera: cannot {command} in state {state.name}; allowed in {ALLOWED_TEXT[command]}"
    )


def test_fault_left_only_by_standby() -> None:
    leaving = [c for c in STANDARD_COMMANDS if State.FAULT in TRANSITIONS[c]]
    assert leaving == ["standby"]


def test_unknown_command() -> None:
    with pytest.raises(CommandRefusedError, match="unknown command 'reboot'"):
        next_state("MTCamera", State.STANDBY, "reboot")
