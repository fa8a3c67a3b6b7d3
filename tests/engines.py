"""Where the scale-out engines the tests use are, and what to do when one is missing.

A test of a scale-out backend skips with a reason when its engine is unreachable, except
under ``LDF_REQUIRE_ENGINES=1`` (set by ``.ci/run``), where it fails: CI always tests them.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest

NATS_URL = os.environ.get("LDF_TEST_NATS_URL", "nats://127.0.0.1:4222")
"""The NATS JetStream server the nats-marked tests use."""


def _reachable(url: str, default_port: int) -> bool:
    parts = urlparse(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require_nats() -> None:
    """Skip (or fail, with LDF_REQUIRE_ENGINES=1) when the NATS server is unreachable."""
    if _reachable(NATS_URL, 4222):
        return
    reason = f"NATS server not reachable at {NATS_URL}"
    if os.environ.get("LDF_REQUIRE_ENGINES") == "1":
        pytest.fail(reason + " (LDF_REQUIRE_ENGINES=1)")
    pytest.skip(reason)
