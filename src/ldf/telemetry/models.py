"""What the Telemetry Gateway talks in: topic payloads, envelopes, results, status, audit.

Each topic has one pydantic model of its payload, validated in strict JSON mode: numbers
must be JSON numbers (never strings), integers never booleans, floats finite (a measurement
that failed is ``null``, as Prompt Processing sends NaN), and unknown fields are refused
unless the topic says otherwise (``calibrationQA`` allows its per-amplifier keys, by
pattern). A topic reaches the OCS bus as the telemetry of the producer's OCS device:
``ocs.<device>.tel.<topic>`` (`bus_topic`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    model_validator,
)

from ldf.ocs.models import Kind, make_topic

__all__ = [
    "API_PREFIX",
    "EXAMPLES",
    "MESSAGE_ID_PATTERN",
    "PRODUCER_PATTERN",
    "TOPICS",
    "Accepted",
    "AuditEntry",
    "BatchJobResult",
    "CalibrationQA",
    "GatewayStatus",
    "ImageQuality",
    "Incoming",
    "Producer",
    "ProducerStatus",
    "StoredMessage",
    "TopicSpec",
    "bus_message_id",
    "bus_topic",
    "canonical_json",
]

API_PREFIX = "/telemetry/v1"
"""Where the gateway's HTTP API lives."""

MESSAGE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
"""A producer's message id: letters, digits and ``. _ : -``, at most 128 characters."""

PRODUCER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A producer name: letters, digits and ``_ . -``, at most 64 characters."""

UNAUTHENTICATED = "unauthenticated"
"""The producer recorded in the audit trail for a request without a valid token."""

Measurement = Annotated[float | None, Field(description="null when it could not be measured.")]
"""A measured value; None (JSON null) when the measurement failed (NaN at the producer)."""

Count = Annotated[int | None, Field(ge=0)]
"""A count of things; None when unknown."""


class _Payload(BaseModel):
    """Base of topic payloads: strict types, finite floats, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class _Detector(_Payload):
    exposure_id: int = Field(ge=0, description="Rubin's exposure id, day_obs * 100000 + seq_num.")
    detector: str = Field(
        pattern=r"^[A-Za-z0-9_]{1,32}$", description="Detector name, e.g. 'R22_S11'."
    )


class ImageQuality(_Detector):
    """Image-quality parameters of one science detector, from Prompt Processing's front end.

    The keys of ``ldf.pipelines.singleframe.SingleFrame.quality`` (via ``plain_quality``) plus
    the exposure and detector `ldf.prompt.service.PromptService.flush_telemetry` adds.
    """

    band: str | None = Field(default=None, max_length=16, description="Band ('r'), if known.")
    seeing_arcsec: Measurement = None
    psf_e1: Measurement = None
    psf_e2: Measurement = None
    psf_ellipticity: Measurement = None
    sky_e_per_pixel: Measurement = None
    n_sources: Count = None
    pointing_offset_east_arcsec: Measurement = None
    pointing_offset_north_arcsec: Measurement = None
    pointing_offset_err_arcsec: Measurement = None
    astrometry_rms_arcsec: Measurement = None
    astrometry_matches: Count = None
    zero_point: Measurement = None
    zero_point_err: Measurement = None


_AMP_KEY = re.compile(r"^(?:overscan_noise_adu|read_noise_e)_[A-Za-z0-9]{1,8}$")
"""Per-amplifier keys of calibration QA: ``read_noise_e_C10``, ``overscan_noise_adu_C07``."""

_MAX_AMP_KEYS = 128
"""Most per-amplifier keys one calibrationQA message may carry (LSSTCam has 2 × 16)."""


def _amp_schema(schema: dict[str, Any]) -> None:
    schema["patternProperties"] = {
        _AMP_KEY.pattern: {"anyOf": [{"type": "number"}, {"type": "null"}]}
    }
    schema["additionalProperties"] = False


class CalibrationQA(_Detector):
    """Quality of one detector of a bias, dark or flat, from Prompt Processing.

    The keys of ``ldf.pipelines.calibs.calibration_qa`` plus ``obs_type`` and the exposure and
    detector. Besides the fields below, per-amplifier ``overscan_noise_adu_<amp>`` and
    ``read_noise_e_<amp>`` (numbers or null) are allowed; any other key is refused. Check
    verdicts (``ok``, ``ok_<check>``) are 1.0 (pass) or 0.0 (fail).
    """

    model_config = ConfigDict(extra="allow", json_schema_extra=_amp_schema)
    __pydantic_extra__: dict[str, float | None] = Field(init=False)

    obs_type: Literal["bias", "dark", "flat"]
    ok: Measurement = None
    ok_read_noise: Measurement = None
    ok_bias_light: Measurement = None
    ok_bias_mean: Measurement = None
    ok_bias_rms: Measurement = None
    ok_dark_current: Measurement = None
    ok_dark_new_hot_pixels: Measurement = None
    ok_flat_level: Measurement = None
    ok_flat_rms: Measurement = None
    ok_flat_max_dev: Measurement = None
    read_noise_max_rel_dev: Measurement = None
    bias_mean_e: Measurement = None
    bias_rms_e: Measurement = None
    bias_rms_ratio: Measurement = None
    bias_light_e: Measurement = None
    bias_light_max_amp_e: Measurement = None
    dark_current_e_s: Measurement = None
    dark_current_master_e_s: Measurement = None
    dark_hot_pixels: Measurement = None
    dark_new_hot_pixels: Measurement = None
    flat_level_e: Measurement = None
    flat_saturated_pixels: Measurement = None
    flat_ratio_rms: Measurement = None
    flat_ratio_expected_rms: Measurement = None
    flat_ratio_max_dev: Measurement = None

    @model_validator(mode="after")
    def _amplifier_keys_only(self) -> Self:
        extra = self.model_extra or {}
        for key in extra:
            if not _AMP_KEY.match(key):
                raise ValueError(
                    f"unknown field {key!r} (besides its fields, calibrationQA allows only "
                    "overscan_noise_adu_<amp> and read_noise_e_<amp>)"
                )
        if len(extra) > _MAX_AMP_KEYS:
            raise ValueError(f"{len(extra)} per-amplifier keys; at most {_MAX_AMP_KEYS}")
        return self


CountName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$")]
"""The name of a count in a batch job result."""


class BatchJobResult(_Payload):
    """The result (or progress) of an OCS-driven batch job (LDM-230 2.5)."""

    job_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", description="Job id.")
    name: str = Field(min_length=1, max_length=200, description="What the job does.")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    started_at: AwareDatetime | None = Field(default=None, description="ISO time with zone.")
    finished_at: AwareDatetime | None = Field(default=None, description="ISO time with zone.")
    counts: dict[CountName, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Named counts, e.g. {'quanta': 189, 'succeeded': 188, 'failed': 1}.",
    )
    message: str = Field(default="", max_length=4000, description="A human-readable summary.")

    @model_validator(mode="after")
    def _times_in_order(self) -> Self:
        if self.started_at and self.finished_at and self.finished_at < self.started_at:
            raise ValueError("finished_at is before started_at")
        return self


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its payload model and description."""

    name: str
    """Topic name, also the telemetry name on the bus (Rubin's camelCase)."""
    model: type[_Payload]
    """The payload model."""
    description: str
    """What the topic carries and who sends it."""

    def schema(self) -> dict[str, Any]:
        """The payload's JSON Schema."""
        schema = self.model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = self.name
        schema["description"] = self.description
        schema["examples"] = [dict(EXAMPLES[self.name])]
        return schema


TOPICS: Mapping[str, TopicSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            TopicSpec(
                "imageQuality",
                ImageQuality,
                "Image-quality parameters of one science detector from Prompt Processing "
                "(seeing, PSF shape, sky, pointing offset, astrometric scatter, zero point).",
            ),
            TopicSpec(
                "calibrationQA",
                CalibrationQA,
                "Quality checks of one detector of a bias, dark or flat from Prompt "
                "Processing's calibration QA.",
            ),
            TopicSpec(
                "batchJobResult",
                BatchJobResult,
                "The result or progress of an OCS-driven batch job (status, times, counts).",
            ),
        )
    }
)
"""Every topic the gateway accepts, by name."""


EXAMPLES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "imageQuality": {
            "exposure_id": 2026112100042,
            "detector": "R22_S11",
            "band": "r",
            "seeing_arcsec": 0.82,
            "psf_e1": 0.012,
            "psf_e2": -0.018,
            "psf_ellipticity": 0.0216,
            "sky_e_per_pixel": 1234.5,
            "n_sources": 412,
            "pointing_offset_east_arcsec": 1.21,
            "pointing_offset_north_arcsec": -0.73,
            "pointing_offset_err_arcsec": 0.05,
            "astrometry_rms_arcsec": 0.021,
            "astrometry_matches": 180,
            "zero_point": 28.41,
            "zero_point_err": None,
        },
        "calibrationQA": {
            "exposure_id": 2026112100003,
            "detector": "R22_S11",
            "obs_type": "bias",
            "bias_mean_e": 0.02,
            "bias_rms_e": 6.1,
            "bias_rms_ratio": 1.01,
            "bias_light_e": 0.01,
            "bias_light_max_amp_e": 0.05,
            "read_noise_e_C10": 6.02,
            "overscan_noise_adu_C10": 3.9,
            "read_noise_max_rel_dev": 0.02,
            "ok_bias_light": 1.0,
            "ok_bias_mean": 1.0,
            "ok_bias_rms": 1.0,
            "ok_read_noise": 1.0,
            "ok": 1.0,
        },
        "batchJobResult": {
            "job_id": "ocsbatch-20261122-0007",
            "name": "master bias R22",
            "status": "succeeded",
            "started_at": "2026-11-22T10:00:00Z",
            "finished_at": "2026-11-22T10:04:31Z",
            "counts": {"quanta": 9, "succeeded": 9, "failed": 0},
            "message": "9 of 9 done",
        },
    }
)
"""A valid payload of each topic (in its JSON Schema as ``examples``, and for benchmarks)."""


def bus_topic(device: str, topic: str) -> str:
    """The OCS bus topic a producer's message goes to: ``ocs.<device>.tel.<topic>``."""
    return make_topic(device, Kind.TEL, topic)


def bus_message_id(producer: str, message_id: str) -> str:
    """The id of the bus message carrying a gateway message: ``<producer>/<message_id>``.

    Deterministic, so a consumer (or JetStream's duplicate window, which keys on it) can
    drop a message the gateway injected twice around a crash.
    """
    return f"{producer}/{message_id}"


def canonical_json(payload: Mapping[str, Any]) -> str:
    """The payload as compact JSON with sorted keys (what duplicates are compared by)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)


def payload_digest(canonical: str) -> str:
    """SHA-256 (hex) of a canonical payload."""
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- envelopes --------------------------------------------------------------------------------


class MessageIn[P: BaseModel](BaseModel):
    """The body of ``POST …/topics/{topic}/messages``: a message id and the payload."""

    model_config = ConfigDict(strict=True, extra="forbid")

    message_id: str = Field(
        pattern=MESSAGE_ID_PATTERN,
        description="The producer's id of this message; sending it again is a no-op.",
    )
    payload: P


class BatchIn[P: BaseModel](BaseModel):
    """The body of ``POST …/topics/{topic}/batches``: messages stored in one transaction."""

    model_config = ConfigDict(strict=True, extra="forbid")

    messages: list[MessageIn[P]] = Field(min_length=1)


@dataclass(frozen=True)
class Incoming:
    """A validated message, ready to be stored."""

    message_id: str
    payload: dict[str, Any]
    """The payload as the bus will carry it (validated, normalised: JSON types only)."""
    canonical: str
    """`canonical_json` of the payload."""
    digest: str
    """SHA-256 of ``canonical``."""


# -- producers --------------------------------------------------------------------------------


class Producer(BaseModel):
    """A trusted producer, as its entry in the producers file describes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=PRODUCER_PATTERN, description="Producer name (audit, status).")
    device: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="OCS device its telemetry is published as (e.g. MTPrompt).",
    )
    topics: tuple[str, ...] = Field(default=(), description="Topics it may send.")
    operator: bool = Field(default=False, description="May read status and the audit trail.")
    token_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of its bearer token."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        unknown = [t for t in self.topics if t not in TOPICS]
        if unknown:
            raise ValueError(f"unknown topic {unknown[0]!r}; known: {', '.join(TOPICS)}")
        if self.topics and self.device is None:
            raise ValueError("a producer that sends topics needs a device")
        return self


# -- results ----------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Accepted(_Out):
    """What became of one message the gateway took."""

    message_id: str
    status: Literal["accepted", "duplicate"]
    """``accepted``: stored now; ``duplicate``: the same message was stored before."""
    seq: int
    """Its position in the producer's order of injection (from 1)."""
    topic: str
    bus_topic: str
    received_at: datetime
    """When it was first stored."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message in the durable buffer (a dataclass: the injector reads thousands a second)."""

    id: int
    """Row id (the buffer's own)."""
    producer: str
    message_id: str
    seq: int
    """Position in the producer's order (from 1)."""
    topic: str
    device: str
    """The OCS device it goes out as."""
    payload: dict[str, Any]
    received_at: datetime
    injected_at: datetime | None
    state: Literal["pending", "injected"]

    @property
    def bus_topic(self) -> str:
        """Where it goes on the bus."""
        return bus_topic(self.device, self.topic)


class AuditEntry(_Out):
    """One row of the audit trail: a message (or a whole request) and what became of it."""

    id: int
    at: datetime
    producer: str
    """Producer name, or ``unauthenticated``."""
    topic: str | None
    message_id: str | None
    outcome: Literal["accepted", "duplicate", "rejected"]
    status: int
    """The HTTP status answered."""
    reason: str
    """Why it was rejected (the error's one line); empty otherwise."""
    client: str
    """The client's address."""
    injected_at: datetime | None = None
    """When the message reached the bus (accepted and duplicate rows; None until then)."""


class ProducerStatus(_Out):
    """Counts and health of one producer."""

    producer: str
    device: str | None
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    injected: int = 0
    backlog: int = 0
    """Accepted and not yet on the bus."""
    oldest_pending_at: datetime | None = None
    last_received_at: datetime | None = None
    last_injected_at: datetime | None = None
    injection_errors: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def failing(self) -> bool:
        """Whether the latest injection attempt failed."""
        return self.last_error_at is not None and (
            self.last_injected_at is None or self.last_error_at > self.last_injected_at
        )


class GatewayStatus(_Out):
    """The whole gateway: its state and every producer's counts."""

    device: str
    state: str
    accepting: bool
    backlog: int
    producers: list[ProducerStatus]
    rejected_unauthenticated: int = 0
