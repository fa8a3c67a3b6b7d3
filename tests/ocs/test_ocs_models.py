"""Topics, patterns and messages."""

from __future__ import annotations

import pytest

from ldf.errors import UserInputError
from ldf.ocs.models import (
    AckCode,
    Kind,
    Message,
    make_topic,
    parse_topic,
    topic_matches,
    validate_pattern,
)


def test_topic_round_trip() -> None:
    topic = make_topic("MTCamera", Kind.EVT, "summaryState")
    assert topic == "ocs.MTCamera.evt.summaryState"
    assert parse_topic(topic) == ("MTCamera", Kind.EVT, "summaryState")


@pytest.mark.parametrize(
    ("device", "name"), [("MT.Camera", "x"), ("", "x"), ("Cam", "a b"), ("*", "x")]
)
def test_bad_names_refused(device: str, name: str) -> None:
    with pytest.raises(UserInputError, match="invalid"):
        make_topic(device, Kind.EVT, name)


@pytest.mark.parametrize(
    "topic", ["ocs.Cam.evt", "foo.Cam.evt.x", "ocs.Cam.bad.x", "ocs.Cam.evt.x.y"]
)
def test_bad_topics_refused(topic: str) -> None:
    with pytest.raises(UserInputError, match="invalid topic"):
        parse_topic(topic)


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("ocs.Cam.evt.heartbeat", "ocs.Cam.evt.heartbeat", True),
        ("ocs.Cam.evt.heartbeat", "ocs.Cam.evt.heartbeatX", False),
        ("ocs.Cam.evt.*", "ocs.Cam.evt.summaryState", True),
        ("ocs.Cam.evt.*", "ocs.Cam.tel.temperature", False),
        ("ocs.*.evt.summaryState", "ocs.Arch.evt.summaryState", True),
        ("ocs.*.evt.summaryState", "ocs.Arch.evt.heartbeat", False),
        ("ocs.Cam.>", "ocs.Cam.tel.temperature", True),
        ("ocs.>", "ocs.Cam.cmd.start", True),
        ("ocs.Cam.>", "ocs.Cam", False),
        ("ocs.*", "ocs.Cam.evt.x", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, matches: bool) -> None:
    assert topic_matches(pattern, topic) is matches


@pytest.mark.parametrize("pattern", ["ocs.>.evt", "ocs..evt", "ocs.C am.>"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(UserInputError, match="invalid pattern"):
        validate_pattern(pattern)


def test_message_json_round_trip() -> None:
    message = Message.build("Cam", "tel", "temperature", {"value": 1.5})
    assert Message.model_validate_json(message.model_dump_json()) == message


def test_final_ack_codes() -> None:
    assert [c.name for c in AckCode if not c.final] == ["ACK", "IN_PROGRESS"]
