"""Topic payloads against what the pipelines produce; the producers file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from ldf.config import Settings
from ldf.errors import ConfigError
from ldf.ocs.models import State
from ldf.pipelines.singleframe import plain_quality
from ldf.telemetry.errors import SchemaViolationError
from ldf.telemetry.models import EXAMPLES, TOPICS, bus_topic
from ldf.telemetry.service import TelemetryGateway
from ldf.telemetry.tokens import ProducerFile, hash_token


def _quality_as_singleframe_builds_it() -> dict[str, object]:
    """``SingleFrame.quality()``'s keys and types (numpy scalars, a failed fit as NaN)."""
    return {
        "band": "i", "seeing_arcsec": np.float64(0.91), "psf_e1": np.float32(0.01),
        "psf_e2": np.float64(-0.02), "psf_ellipticity": np.float64(0.022),
        "sky_e_per_pixel": np.float32(812.5), "n_sources": np.int64(233),
        "pointing_offset_east_arcsec": np.float64(0.4), "pointing_offset_north_arcsec": 0.1,
        "pointing_offset_err_arcsec": np.float64(0.03), "astrometry_rms_arcsec": np.nan,
        "astrometry_matches": 0, "zero_point": np.float64(28.3), "zero_point_err": np.inf,
    }  # fmt: skip


def test_what_prompt_processing_sends_validates(gateway: TelemetryGateway) -> None:
    # flush_telemetry's payload: exposure and detector, then plain_quality of the QA dict.
    payload = {"exposure_id": 2026112100007, "detector": "R22_S11",
               **plain_quality(_quality_as_singleframe_builds_it())}  # fmt: skip
    body = json.dumps({"message_id": "m", "payload": payload})
    (msg,) = gateway.parse("imageQuality", body)
    assert msg.payload["astrometry_rms_arcsec"] is None
    assert msg.payload["n_sources"] == 233
    # calibration_qa's keys for a flat, with obs_type as the worker adds it.
    amps = [f"C1{i}" for i in range(8)] + [f"C0{i}" for i in range(8)]
    qa: dict[str, object] = {
        "obs_type": "flat", "flat_level_e": 21000.0, "flat_saturated_pixels": 0.0,
        "flat_ratio_rms": 0.007, "flat_ratio_expected_rms": 0.0069, "flat_ratio_max_dev": np.nan,
        "read_noise_max_rel_dev": 0.03, "ok_flat_level": 1.0, "ok_flat_rms": 1.0,
        "ok_flat_max_dev": 0.0, "ok_read_noise": 1.0, "ok": 0.0,
    }  # fmt: skip
    for amp in amps:
        qa[f"overscan_noise_adu_{amp}"] = np.float64(3.9)
        qa[f"read_noise_e_{amp}"] = np.float32(6.0)
    payload = {"exposure_id": 2026112100003, "detector": "R22_S11", **plain_quality(qa)}
    (msg,) = gateway.parse("calibrationQA", json.dumps({"message_id": "q", "payload": payload}))
    assert msg.payload["read_noise_e_C07"] == 6.0
    assert msg.payload["flat_ratio_max_dev"] is None


def test_payload_normalisation_and_digest(gateway: TelemetryGateway) -> None:
    a = gateway.parse("imageQuality", '{"message_id":"m","payload":{"detector":"R22_S11",'
                      '"exposure_id":1,"seeing_arcsec":1}}')[0]  # fmt: skip
    b = gateway.parse("imageQuality", '{"payload":{"exposure_id":1,"seeing_arcsec":1.0,'
                      '"detector":"R22_S11"},"message_id":"m"}')[0]  # fmt: skip
    assert a.payload == b.payload == {"exposure_id": 1, "detector": "R22_S11", "seeing_arcsec": 1.0}
    assert a.digest == b.digest  # key order and 1 vs 1.0 do not make another message


def test_submit_from_python(gateway: TelemetryGateway) -> None:
    producer = gateway.producers.get("prompt")
    got = gateway.submit(producer, "imageQuality", dict(EXAMPLES["imageQuality"]), "a")
    assert (got.status, got.seq, got.bus_topic) == (
        "accepted",
        1,
        bus_topic("MTPrompt", "imageQuality"),
    )
    with pytest.raises(SchemaViolationError, match="not JSON data"):
        gateway.submit(
            producer, "imageQuality", {"exposure_id": 1, "seeing_arcsec": float("nan")}, "b"
        )
    gateway.state = State.DISABLED
    with pytest.raises(Exception, match="DISABLED"):
        gateway.submit(producer, "imageQuality", dict(EXAMPLES["imageQuality"]), "c")


def test_every_topic_has_a_valid_example() -> None:
    for name, spec in TOPICS.items():
        spec.model.model_validate_json(json.dumps(EXAMPLES[name]))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("producers: 3\n", "expected a 'producers:' list"),
        ("producers: [3]\n", "producers[0] is not a mapping"),
        ("producers: [{name: a, device: D, topics: [weather], token_sha256: " + "a" * 64 + "}]\n",
         "unknown topic 'weather'"),
        ("producers: [{name: a, topics: [imageQuality], token_sha256: " + "a" * 64 + "}]\n",
         "needs a device"),
        ("producers: [{name: a, token: secret}]\n", "producers[0]"),
        ("producers: [{name: a, token_sha256: " + "a" * 64 + "}, {name: a, token_sha256: "
         + "b" * 64 + "}]\n", "repeated: a"),
        ("producers: [{name: a, token_sha256: " + "a" * 64 + "}, {name: b, token_sha256: "
         + "a" * 64 + "}]\n", "share a token"),
        ("producers: [\n", "cannot read"),
    ],
)  # fmt: skip
def test_a_bad_producers_file_is_refused_with_a_reason(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "producers.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(why)) as e:
        ProducerFile(path).producers()
    assert "secret" not in str(e.value)


def test_producers_file_lookups(tmp_path: Path) -> None:
    pf = ProducerFile(tmp_path / "secrets" / "p.yaml")
    assert pf.producers() == []
    assert pf.authenticate("anything") is None
    token = pf.add("prompt", device="MTPrompt", topics=["imageQuality"])
    found = pf.authenticate(token)
    assert found is not None
    assert (found.name, found.token_sha256) == ("prompt", hash_token(token))
    assert pf.authenticate(token + "x") is None
    # Another process edits the file: this instance sees it.
    other = ProducerFile(pf.path)
    other.remove("prompt")
    assert pf.authenticate(token) is None
    assert not list(pf.path.parent.glob(".p.yaml.*"))  # no temporary file left


def test_settings_point_the_producers_file_elsewhere(tmp_path: Path) -> None:
    from ldf.telemetry.service import producers_path

    settings = Settings.model_validate(
        {
            "home": str(tmp_path),
            "policies": {"telemetry": {"producers_file": str(tmp_path / "x.yaml")}},
        }
    )
    assert producers_path(settings) == tmp_path / "x.yaml"
