"""Prompt Processing's real QA through the gateway: `TelemetryClient` as ``publish_telemetry``.

Slow (seeds a facility and processes detectors): ``make test-all`` runs it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ldf.ocs.bus_embedded import EmbeddedBus
from ldf.telemetry.client import TelemetryClient
from ldf.telemetry.daemon import serve_gateway
from ldf.telemetry.service import TelemetryGateway, producers_path
from ldf.telemetry.tokens import ProducerFile
from tests.prompt.conftest import (  # noqa: F401 - fixtures used by name
    DETECTORS,
    Facility,
    announce,
    facility,
    make_service,
    seeded_home,
    write_raws,
)


@pytest.mark.slow
async def test_prompt_processing_qa_reaches_the_bus_through_the_gateway(
    facility: Facility,  # noqa: F811
    make_service: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = facility.settings
    token = ProducerFile(producers_path(settings)).add(
        "prompt-lsstcam", device="MTPrompt", topics=["imageQuality", "calibrationQA"]
    )
    bus = EmbeddedBus(tmp_path / "bus.sqlite3")
    svc = make_service()
    try:
        with TelemetryGateway.open(settings) as gateway:
            async with (
                serve_gateway(gateway, bus, poll_s=0.05) as served,
                bus.subscribe("ocs.MTPrompt.tel.*") as sub,
            ):
                with TelemetryClient(served.url, token) as client:
                    svc.publish_telemetry = client
                    visit = facility.visits[0]
                    await asyncio.to_thread(announce, svc, visit)
                    bias = next(v for v in facility.calib_visits if v.obs_type == "bias")
                    await asyncio.to_thread(
                        svc.on_next_visit, bias.model_dump(mode="json"), detectors=DETECTORS
                    )
                    raws = await asyncio.to_thread(write_raws, facility, bias)
                    for det, path in raws.items():
                        svc.on_image(bias.exposure_id, det, path)
                    await asyncio.to_thread(svc.run, until_idle=True)
                    got = [await sub.get(timeout=60) for _ in range(2 * len(DETECTORS))]
                    await asyncio.to_thread(svc.flush_telemetry)
                    assert svc.store.unsent_telemetry() == []
            rejected = gateway.audit(outcome="rejected")
            assert rejected == [], [r.reason for r in rejected]
    finally:
        await bus.close()
    names = sorted((m.name, m.payload["exposure_id"], m.payload["detector"]) for m in got)
    assert names == sorted(
        [("imageQuality", visit.exposure_id, d) for d in DETECTORS]
        + [("calibrationQA", bias.exposure_id, d) for d in DETECTORS]
    )
    iq = next(m for m in got if m.name == "imageQuality")
    assert iq.topic == "ocs.MTPrompt.tel.imageQuality"
    assert iq.payload["seeing_arcsec"] > 0
    assert iq.id.startswith("prompt-lsstcam/imageQuality-")
    qa = next(m for m in got if m.name == "calibrationQA")
    assert qa.payload["obs_type"] == "bias"
    assert any(k.startswith("read_noise_e_") for k in qa.payload)
