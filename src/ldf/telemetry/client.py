"""The producers' side: `TelemetryClient` sends messages to a Telemetry Gateway.

`TelemetryClient.send` returns True once the gateway holds the message durably (accepted
now, or a duplicate of one it holds), False when the gateway cannot take it now (unreachable,
timed out, 5xx, 503 while DISABLED), so the producer keeps it and tries again later; a 4xx
raises `TelemetryRejectedError`, because sending the same message again will not help.

Message ids are deterministic unless given: the topic, the exposure and detector when the
payload has them, and a digest of the payload, e.g.
``imageQuality-2026112100042-R22_S11-3f1c9a0b7d2e``. A retry of the same message is thus a
duplicate at the gateway, never a second message; a changed payload is a new message.

A client is a callable ``(name, payload) -> bool``, which is what Prompt Processing's
``PromptService.publish_telemetry`` expects::

    service.publish_telemetry = TelemetryClient(url, token)
"""

from __future__ import annotations

import hashlib
import json
import logging
from types import TracebackType
from typing import Any, Self

import httpx

from ldf.errors import UserInputError
from ldf.telemetry.errors import TelemetryRejectedError
from ldf.telemetry.models import API_PREFIX

__all__ = ["TelemetryClient", "default_message_id"]

_log = logging.getLogger(__name__)


def _canonical(payload: dict[str, Any]) -> str:
    try:
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise UserInputError(
            f"telemetry payload is not JSON data ({exc}): send null for a failed measurement"
        ) from None
    except TypeError as exc:
        raise UserInputError(f"telemetry payload is not JSON data: {exc}") from None


def default_message_id(topic: str, payload: dict[str, Any]) -> str:
    """A deterministic message id: topic, exposure and detector if present, payload digest."""
    digest = hashlib.sha256(_canonical(payload).encode()).hexdigest()
    parts = [topic]
    for key in ("exposure_id", "detector", "job_id"):
        value = payload.get(key)
        if isinstance(value, int | str) and not isinstance(value, bool):
            text = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(value))
            parts.append(text[:40])
    return "-".join([*parts, digest[: 12 if len(parts) > 1 else 24]])[:128]


class TelemetryClient:
    """A producer's connection to a Telemetry Gateway (keep-alive; thread-safe).

    Parameters
    ----------
    url
        The gateway's base URL (``http://host:8022``).
    token
        The producer's bearer token.
    timeout
        Seconds to wait for the gateway before giving up (then `send` returns False).
    """

    def __init__(self, url: str, token: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url + API_PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        """Close the connection."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- sending -----------------------------------------------------------------------------

    def send(self, topic: str, payload: dict[str, Any], message_id: str | None = None) -> bool:
        """Send one message.

        Returns
        -------
        bool
            True when the gateway holds it (accepted or duplicate); False when it cannot
            take it now (keep the message and try again later).

        Raises
        ------
        TelemetryRejectedError
            The gateway refused it (4xx): bad token, topic outside the token's scope, unknown
            topic, too large, schema violation, id reused with another payload.
        UserInputError
            The payload is not JSON data (NaN, a numpy array…).
        """
        _canonical(payload)  # refuses NaN and non-JSON values with a clear error
        mid = message_id or default_message_id(topic, payload)
        body = json.dumps({"message_id": mid, "payload": payload})
        return self._post(f"/topics/{topic}/messages", body) is not None

    def send_batch(self, topic: str, messages: list[tuple[str | None, dict[str, Any]]]) -> bool:
        """Send ``(message_id or None, payload)`` pairs as one batch (all or none stored).

        Returns and raises as `send`.
        """
        items = [
            {"message_id": mid or default_message_id(topic, payload), "payload": payload}
            for mid, payload in messages
        ]
        for _, payload in messages:
            _canonical(payload)
        return self._post(f"/topics/{topic}/batches", json.dumps({"messages": items})) is not None

    def __call__(self, name: str, payload: dict[str, Any]) -> bool:
        """``send(name, payload)``: the ``publish_telemetry`` interface of Prompt Processing."""
        return self.send(name, payload)

    def _post(self, path: str, body: str) -> dict[str, Any] | None:
        try:
            response = self._http.post(
                path, content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            _log.warning("telemetry gateway %s unreachable: %s", self.url, exc)
            return None
        if response.status_code in (200, 201):
            result: dict[str, Any] = response.json()
            return result
        code, message = _error_of(response)
        if 400 <= response.status_code < 500:
            raise TelemetryRejectedError(response.status_code, code, message)
        _log.warning(
            "telemetry gateway %s cannot take messages now (%d %s): %s",
            self.url,
            response.status_code,
            code,
            message,
        )
        return None

    # -- reading -----------------------------------------------------------------------------

    def topics(self) -> list[dict[str, Any]]:
        """The gateway's topics."""
        return self._get("/topics")

    def schema(self, topic: str) -> dict[str, Any]:
        """A topic's payload as JSON Schema."""
        return self._get(f"/topics/{topic}/schema")

    def status(self) -> dict[str, Any]:
        """The gateway's status (operator tokens only)."""
        return self._get("/status")

    def audit(self, *, producer: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The audit trail, newest first (operator tokens only)."""
        params: dict[str, Any] = {"limit": limit}
        if producer is not None:
            params["producer"] = producer
        return self._get("/audit", params)

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        from ldf.errors import TransportError

        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise TransportError(f"telemetry gateway {self.url} unreachable: {exc}") from None
        if response.status_code != 200:
            code, message = _error_of(response)
            if response.status_code < 500:
                raise TelemetryRejectedError(response.status_code, code, message)
            raise TransportError(f"telemetry gateway {self.url}: {response.status_code} {message}")
        return response.json()


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "http_error", response.text[:200] or response.reason_phrase
