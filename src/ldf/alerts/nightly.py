"""Alert distribution in the main job (``ldf night``).

:class:`NightAlerts` serves the facility's alert service over HTTP with its OCS device, takes
Prompt Processing's alerts from its durable outbox (the hand-over: a detector's alerts are a
file there once it is done), closes each science visit once none of its detectors is still
waiting, queued or running, and runs three brokers in threads, each an exactly-once consumer:
the validation endpoint (full packets), ``alerce`` (full packets) and ``antares``
(notifications). At the end it reports per feed: delivered, duplicates, missing, manifests
verified, and the latency from the visit's end of readout to the alert's arrival.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ldf.alerts.auth import Credentials, Role
from ldf.alerts.client import HttpFeedSource
from ldf.alerts.daemon import ServerThread, credentials_path
from ldf.alerts.models import FeedSpec
from ldf.alerts.service import AlertService
from ldf.alerts.validation import ValidationEndpoint
from ldf.config.models import Settings
from ldf.errors import NotFoundError

__all__ = ["NightAlerts", "print_alerts_summary"]

_log = logging.getLogger(__name__)

NIGHT_FEEDS = {
    "validation-full": ("validation", "full"),
    "alerce-full": ("alerce", "full"),
    "antares-lite": ("antares", "notification"),
}
"""Feed → (broker, format) of the main job."""

_ACTIVE = {"waiting", "queued", "running"}


class NightAlerts:
    """The night's alert distribution: service, device, outbox pump, brokers.

    Parameters
    ----------
    settings
        The site configuration.
    prompt
        The night's Prompt Processing service (its store says which visits are finished and
        when their readout ended; its outbox holds the alerts).
    """

    def __init__(self, settings: Settings, prompt: Any) -> None:
        from ldf.prompt.inputs import InputPaths

        self.settings = settings
        self.prompt = prompt
        self.outbox = InputPaths(settings.home).alerts
        self.service = AlertService.open(settings)
        self.credentials = Credentials(credentials_path(settings))
        self.tokens = self._tokens()
        for feed, (broker, fmt) in NIGHT_FEEDS.items():
            try:
                self.service.feed(feed)
            except NotFoundError:
                self.service.create_feed(FeedSpec(name=feed, broker=broker, format=fmt), "night")
        self.server = ServerThread(self.service, self.credentials)
        self.closed: set[int] = set()
        self.science: set[int] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.endpoints: dict[str, ValidationEndpoint] = {}
        self.device: Any = None

    def _tokens(self) -> dict[str, str]:
        """Tokens for the night's producer and brokers (new ones each night: only hashes are
        stored, so earlier tokens cannot be read back)."""
        tokens = {}
        for name, role in [("prompt", Role.PRODUCER)] + [
            (broker, Role.BROKER) for broker, _ in NIGHT_FEEDS.values()
        ]:
            self.credentials.remove(name)
            tokens[name] = self.credentials.add(name, role)
        return tokens

    async def start(self, bus: Any, heartbeat_interval_s: float = 1.0) -> str:
        """Serve, bring the device to ENABLED, start the pump and the brokers; the URL."""
        from ldf.alerts.device import AlertDevice

        self.server.__enter__()
        self.device = AlertDevice(self.service, bus, heartbeat_interval_s=heartbeat_interval_s)
        await self.device.open()
        await self.device.execute("start")
        await self.device.execute("enable")
        home = self.settings.home / "brokers"
        for feed, (broker, _fmt) in NIGHT_FEEDS.items():
            source = HttpFeedSource(self.server.url, self.tokens[broker], feed)
            endpoint = ValidationEndpoint(source, home / f"{feed}.sqlite3")
            endpoint.consumer.start_at(self.service.feed(feed).cursor)
            self.endpoints[feed] = endpoint
        self._threads = [threading.Thread(target=self._pump, name="alerts-outbox", daemon=True)]
        self._threads += [
            threading.Thread(target=self._consume, args=(ep,), name=f"broker {feed}", daemon=True)
            for feed, ep in self.endpoints.items()
        ]
        for t in self._threads:
            t.start()
        return self.server.url

    def _finished_visits(self) -> list[int]:
        out = []
        for visit in self.prompt.store.visits(instrument=self.prompt.instrument):
            exposure = visit["exposure_id"]
            if exposure in self.closed or visit["obs_type"] != "science" or visit["offline"]:
                continue
            self.science.add(exposure)
            states = {j["state"] for j in self.prompt.store.jobs(exposure)}
            if states and not states & _ACTIVE:
                out.append(exposure)
        return out

    def pump_once(self) -> int:
        """Ingest the outbox, then close the visits that were finished before it; alerts taken."""
        finished = self._finished_visits()
        taken = self.service.ingest_outbox(self.outbox, producer="prompt").accepted
        for visit in finished:
            self.service.close_visit(visit)
            self.closed.add(visit)
        return taken

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.pump_once():
                    self._stop.wait(0.1)
            except Exception:  # the pump must outlive one bad round
                _log.exception("alert outbox pump failed; retrying")
                self._stop.wait(1.0)

    def _consume(self, endpoint: ValidationEndpoint) -> None:
        while not self._stop.is_set():
            try:
                endpoint.poll(wait_s=0.5)
            except Exception:
                _log.exception("broker consumer failed; retrying")
                self._stop.wait(0.5)

    def drain(self, timeout_s: float = 120.0) -> bool:
        """Wait until every science visit is closed and every feed has its manifest."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump_once()
            pending = self.science - self.closed
            have = all(
                self.closed <= set(ep.manifests()) for ep in self.endpoints.values()
            )  # fmt: skip
            if not pending and have:
                return True
            time.sleep(0.2)
        return False

    async def stop(self) -> dict[str, Any]:
        """Stop everything; the night's alert summary."""
        self._stop.set()
        for t in self._threads:
            t.join(30.0)
        summary = self.summary()
        if self.device is not None:
            summary["events"] = [f"{e}:{f}" for e, f in self.device.events]
            await self.device.execute("disable")
            await self.device.close()
        for ep in self.endpoints.values():
            ep.close()
        self.server.__exit__(None, None, None)
        self.service.close()
        return summary

    def summary(self) -> dict[str, Any]:
        """Per feed: delivered, duplicates, missing, manifests verified, latency."""
        produced = {v: self.service.store.alert_ids(visit=v) for v in sorted(self.closed)}
        readout = {}
        for v in produced:
            row = self.prompt.store.visit(v)
            if row and row.get("readout_unix"):
                readout[v] = float(row["readout_unix"])
        feeds = {}
        for feed, ep in self.endpoints.items():
            report = ep.report(produced, readout)
            report["format"] = NIGHT_FEEDS[feed][1]
            feeds[feed] = report
        return {
            "url": self.server.url,
            "visits_closed": len(self.closed),
            "alerts": sum(len(v) for v in produced.values()),
            "feeds": feeds,
            "store": self.service.store.counts(),
        }


def print_alerts_summary(summary: dict[str, Any], console: Any) -> None:
    """The night's alert distribution lines."""
    console.print(
        f"[bold]Alert distribution[/]: {summary['alerts']:,} alerts of "
        f"{summary['visits_closed']} visits, each visit's manifest published"
    )
    for feed, r in summary["feeds"].items():
        lat = r.get("latency_s")
        lat_s = "-" if not lat else f"p50 {lat['p50']:.1f} s / p98 {lat['p98']:.1f} s"
        ok = r["duplicates"] == 0 and r["missing"] == 0 and not r["manifests_unverified"]
        console.print(
            f"  {feed:<16} {r['format']:<12} delivered {r['delivered']:>6,}  duplicates "
            f"{r['duplicates']}  missing {r['missing']}  manifests {r['manifests_verified']}/"
            f"{r['visits']}  readout→broker {lat_s}  {'[green]ok[/]' if ok else '[red]FAIL[/]'}"
        )
