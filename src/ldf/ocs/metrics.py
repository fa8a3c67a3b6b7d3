"""Prometheus metrics every OCS-commandable device keeps.

Each device has a `DeviceMetrics` on a `prometheus_client.CollectorRegistry` (its own, or
one shared by every device of a process); services add their own metrics to the same
registry (``device.metrics.registry``) and `ldf.ocs.health.health_app` serves them all.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["DeviceMetrics"]


@dataclass(frozen=True)
class _Families:
    """The labelled metric families of one registry (registered once per registry)."""

    state: Gauge
    heartbeats: Counter
    commands: Counter


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


def _families(registry: CollectorRegistry) -> _Families:
    if registry not in _by_registry:
        _by_registry[registry] = _Families(
            state=Gauge(
                "ldf_ocs_summary_state",
                "Summary state (1 DISABLED, 2 ENABLED, 3 FAULT, 4 OFFLINE, 5 STANDBY).",
                ["device"],
                registry=registry,
            ),
            heartbeats=Counter(
                "ldf_ocs_heartbeats", "Heartbeats published.", ["device"], registry=registry
            ),
            commands=Counter(
                "ldf_ocs_commands",
                "Commands received, by name and result (complete, refused, failed).",
                ["device", "command", "result"],
                registry=registry,
            ),
        )
    return _by_registry[registry]


class DeviceMetrics:
    """The metrics of one device.

    Parameters
    ----------
    device
        Device name (the ``device`` label).
    registry
        Registry to register on; a new one when None.
    """

    def __init__(self, device: str, registry: CollectorRegistry | None = None) -> None:
        self.device = device
        self.registry = registry if registry is not None else CollectorRegistry()
        """Where the metrics live; add service metrics here."""
        families = _families(self.registry)
        self._state = families.state.labels(device=device)
        self._heartbeats = families.heartbeats.labels(device=device)
        self._commands = families.commands

    def set_state(self, state: int) -> None:
        """Record the current summary state."""
        self._state.set(state)

    def heartbeat(self) -> None:
        """Count one heartbeat."""
        self._heartbeats.inc()

    def command(self, name: str, result: str) -> None:
        """Count one command with its result (``complete``, ``refused`` or ``failed``)."""
        self._commands.labels(device=self.device, command=name, result=result).inc()
