"""NATS server credentials for the alert feeds: one user per broker, its own feeds only."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping

from ldf.alerts.models import _check_name
from ldf.alerts.nats.wire import NatsNames
from ldf.errors import UserInputError

__all__ = ["nats_authorization", "new_password"]

_PASSWORD = re.compile(r"^[A-Za-z0-9._~+/=-]{16,128}$")
"""Passwords: 16-128 characters that need no quoting in a NATS server configuration."""


def new_password() -> str:
    """A random NATS password (give it to the broker once; it is in the server config)."""
    return secrets.token_urlsafe(24)


def _user(name: str, password: str, publish: list[str], subscribe: list[str]) -> str:
    """One user of an ``authorization`` block."""
    pub = ", ".join(json.dumps(p) for p in publish)
    sub = ", ".join(json.dumps(p) for p in subscribe)
    return (
        f"    {{user: {json.dumps(name)}, password: {json.dumps(password)}, permissions: {{\n"
        f"      publish: {{allow: [{pub}]}}\n"
        f"      subscribe: {{allow: [{sub}]}}\n"
        "    }}"
    )


def nats_authorization(
    brokers: Mapping[str, str],
    *,
    publisher: tuple[str, str],
    names: NatsNames | None = None,
) -> str:
    """The NATS server ``authorization`` block for the alert feeds.

    Each broker may fetch from, acknowledge and inspect only the consumers of its own stream,
    and receive only on its own inbox (`NatsNames.inbox`, which `NatsFeedSource` uses). The
    publisher may publish the feeds' subjects and use the JetStream API.

    Parameters
    ----------
    brokers
        Broker name → password.
    publisher
        (user, password) of the service's publisher.
    names
        The prefix the feeds are published under.

    Returns
    -------
    str
        A server configuration snippet (keep the file mode 0600: it holds the passwords).

    Raises
    ------
    UserInputError
        A name or password is not acceptable.
    """
    names = names or NatsNames()
    pub_user, pub_password = publisher
    for who, password in [(pub_user, pub_password), *brokers.items()]:
        try:
            _check_name(who, "NATS user")
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        if not _PASSWORD.match(password):
            raise UserInputError(
                f"password of {who!r} must be 16-128 letters, digits or ._~+/=- "
                "(new_password() makes one)"
            )
    if pub_user in brokers:
        raise UserInputError(f"publisher user {pub_user!r} is also a broker")
    users = [_user(pub_user, pub_password, [f"{names.prefix}.alerts.>", "$JS.API.>"], ["_INBOX.>"])]
    for broker, password in sorted(brokers.items()):
        stream = names.stream(broker)
        allow_pub = [
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.ACK.{stream}.>",
        ]
        users.append(_user(broker, password, allow_pub, [names.inbox(broker) + ".>"]))
    return (
        "# ldf alert feeds: one user per broker, each limited to its own stream's consumers\n"
        "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"
    )
