"""The site configuration model.

One model describes a whole deployment: where data lives (sites, storage endpoints and their
tiers), which database and bus engines serve it, how batch work runs, which instruments are
attached, and per-service policies. With no file at all every value has an embedded default
under ``$LDF_HOME`` (``./ldf-data`` when unset): SQLite databases, local directories as sites,
the embedded bus, a local worker pool.

Precedence, highest first: arguments given in code, ``LDF_*`` environment variables (nested
with ``__``, e.g. ``LDF_BUS__URL``), the YAML file, the defaults here.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = [
    "BatchSettings",
    "BusSettings",
    "Endpoint",
    "InstrumentSettings",
    "Policies",
    "Settings",
    "SimSettings",
    "Site",
    "Tier",
]

DEFAULT_SITES = ("summit", "base", "archive", "dr")
"""Sites of the embedded default deployment, as LDM-230 names Rubin's."""

yaml_data: ContextVar[dict[str, Any] | None] = ContextVar("ldf_yaml_data", default=None)
"""The parsed YAML file being loaded (set by the loader around model construction)."""


class _Strict(BaseModel):
    """Base of configuration sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Tier(StrEnum):
    """Storage tier of an endpoint (LDM-230 5.1)."""

    DISK = "disk"
    """Online disk: read directly."""
    NEARLINE = "nearline"
    """Tape-like: reading needs a staging request that completes after a delay."""
    DR = "dr"
    """Disaster-recovery copy: written, audited, read only to repair or restore."""


class Endpoint(_Strict):
    """A storage endpoint at a site."""

    name: str = Field(description="Endpoint name, unique within its site.")
    tier: Tier = Field(default=Tier.DISK, description="Storage tier.")
    root: str = Field(
        description="Local path or URI of the endpoint (file:// now; object stores later)."
    )
    staging_delay_s: float = Field(
        default=0.0, ge=0, description="Nearline only: seconds a staging request takes."
    )
    capacity_bytes: int | None = Field(
        default=None, gt=0, description="Capacity to plan against; None means the filesystem's."
    )

    @model_validator(mode="after")
    def _staging_only_nearline(self) -> Endpoint:
        if self.staging_delay_s and self.tier is not Tier.NEARLINE:
            raise ValueError("staging_delay_s applies only to tier 'nearline'")
        return self


class Site(_Strict):
    """A site of the facility (summit, base, archive, disaster recovery...)."""

    description: str = Field(default="", description="What the site is, for people.")
    endpoints: list[Endpoint] = Field(
        default_factory=list, min_length=1, description="Storage endpoints at this site."
    )
    butler: str | None = Field(
        default=None,
        description="Root of the site's Butler repository (None: $LDF_HOME/butler/<site>).",
    )
    butler_db: str | None = Field(
        default=None,
        description="Registry database URL of that repository (None: SQLite inside it).",
    )

    @field_validator("endpoints")
    @classmethod
    def _unique_names(cls, value: list[Endpoint]) -> list[Endpoint]:
        names = [e.name for e in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"endpoint names must be unique; repeated: {', '.join(dupes)}")
        return value


class BusSettings(_Strict):
    """The OCS bus: commands, events and telemetry between devices."""

    url: str = Field(
        default="embedded",
        description="'embedded' (a log file under $LDF_HOME, no server) or nats://host:port.",
    )
    credentials: SecretStr | None = Field(
        default=None, description="NATS credentials or token, if the server needs one."
    )
    stream_prefix: str = Field(
        default="LDF", pattern=r"^[A-Za-z0-9_-]+$", description="Prefix of JetStream stream names."
    )
    command_timeout_s: float = Field(
        default=10.0, gt=0, description="Default time to wait for a command acknowledgement."
    )
    heartbeat_interval_s: float = Field(
        default=1.0, gt=0, description="Interval between device heartbeats."
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value != "embedded" and not value.startswith(("nats://", "tls://")):
            raise ValueError("must be 'embedded' or a nats:// (or tls://) URL")
        return value


class BatchSettings(_Strict):
    """How batch work runs (LDM-230 5.3)."""

    engine: Literal["local", "parsl", "htcondor", "panda", "slurm"] = Field(
        default="local",
        description="'local' (a pool of warm worker processes) or a ctrl_bps plugin.",
    )
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="Local worker processes."
    )


class InstrumentSettings(_Strict):
    """An instrument attached to the facility."""

    enabled: bool = Field(default=True, description="Whether the facility serves it.")
    detectors: list[str] | None = Field(
        default=None, description="Subset of detector names to read out (None: all)."
    )


class SimSettings(_Strict):
    """Defaults of the simulated observatory."""

    seed: int = Field(default=20261121, ge=0, description="Seed of the simulated sky and night.")
    scale: float = Field(
        default=0.15,
        gt=0,
        le=1,
        description="Linear shrink of detector pixel counts (1 = full LSSTCam size).",
    )
    visits: int = Field(default=12, ge=0, description="Science visits in a default night.")
    detectors: int | None = Field(
        default=4,
        ge=1,
        description="Science CCDs per LSSTCam visit, nearest the centre (4: R22_S11 and three "
        "neighbours, so the default night takes about five minutes on 2 cores; 9: raft R22; "
        "None: all).",
    )
    day_obs: int = Field(default=20261121, description="Observing day (YYYYMMDD, Rubin's).")
    transient_rate_deg2: float = Field(
        default=500.0,
        ge=0,
        description="Injected transients per deg² whose light curve starts in each 50-day "
        "epoch (at full detector size, ~25 per CCD: enough to validate difference imaging).",
    )
    variable_density_deg2: float = Field(
        default=100.0, ge=0, description="Injected periodic variable stars per deg²."
    )
    density_scale: float | None = Field(
        default=None,
        gt=0,
        description="Multiplies the sky's stars (and its transients and variables unless "
        "injected_density_scale is set). None: 1/scale² (at most 50), so a shrunk detector "
        "sees as many stars as a full-size one (PSF, astrometry and photometry need tens of "
        "stars per CCD).",
    )
    injected_density_scale: float | None = Field(
        default=None,
        gt=0,
        description="Multiplies the injected transients and variables. None: density_scale "
        "if that is set, else 1/scale (at most 50): ~5 transients of S/N ≥ 10 per 0.15-scale "
        "CCD (~550 a default night) without the crowding 1/scale² would bring (another "
        "transient shining within 2.4″ of 9 % of them; 1.3 % at 1/scale).",
    )

    def sky(self, scale: float | None = None) -> tuple[float, float, float]:
        """(star density scale, transient rate, variable density) of the simulated sky.

        Stars are scaled so a shrunk CCD holds as many as a full-size one: the front end
        needs their number, and a denser star field is still a real one (a Galactic-plane
        field). Transients and variables are scaled less — they are counted, not used — so
        that they keep a realistic chance of having another within a few arcseconds.
        """
        s = self.scale if scale is None else scale
        k = self.density_scale or min(50.0, max(1.0, 1.0 / (s * s)))
        k_inj = self.injected_density_scale or self.density_scale or min(50.0, max(1.0, 1.0 / s))
        return (k, self.transient_rate_deg2 * k_inj, self.variable_density_deg2 * k_inj)


class _Policy(_Strict):
    """Base of per-service policy sections (later services add their fields)."""


class ArchiverPolicy(_Policy):
    """Archiving policies (LDM-230 2.2.3.2.1); an operator may change them by OCS command."""

    oods_only: list[str] = Field(
        default_factory=lambda: ["engtest"],
        description="Observation types written to the OODS only, never to the permanent "
        "archive (e.g. engtest, smoke tests, one-off calibrations).",
    )
    backlog_order: Literal["oldest-first", "newest-first", "science-first"] = Field(
        default="oldest-first", description="Order in which a backlog is archived."
    )
    catchup_factor: float = Field(
        default=2.0, ge=1.0, description="Catch-up rate after an outage, × nominal frame rate."
    )
    rate_limit_mbps: float | None = Field(
        default=None, gt=0, description="Bandwidth cap of the archiver's writes (megabits/s)."
    )
    missing_detector_timeout_s: float = Field(
        default=30.0, ge=0, description="Alarm when a detector is still missing after this."
    )
    compress: bool = Field(default=False, description="Tile-compress (RICE) the raw FITS files.")
    workers: int = Field(default=2, ge=1, description="Parallel detector writers per archiver.")
    backbone_site: str = Field(default="base", description="Site the archiver ingests into.")


class PromptPolicy(_Policy):
    """Prompt processing policies (LDM-230 2.1.3.2.1); Operations select them by OCS command."""

    qa_first: bool = Field(
        default=True,
        description="Publish each detector's image-quality parameters the moment the front "
        "end (ISR → photometry) has them, before difference imaging; off: with the science "
        "result. A timed-out or failed back end still leaves its QA published.",
    )
    science_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="A visit's science processing is abandoned this long after its end of "
        "readout: detectors not done by then are handed to offline catch-up (no alerts).",
    )
    backlog: Literal["process", "skip-to-newest", "offline"] = Field(
        default="process",
        description="When a new visit arrives with older visits still waiting: process them "
        "all in order; skip the older ones (recorded, never processed); or hand them to "
        "offline catch-up (processed later: APDB updated, no alerts).",
    )
    workers: int = Field(
        default=2, ge=1, description="Warm worker processes (one detector each at a time)."
    )
    prewarp_templates: bool = Field(
        default=True,
        description="On nextVisit, idle workers warp each detector's template onto the grid "
        "the commanded pointing predicts; the detector then only shifts it by the pointing "
        "error (~0.3 s instead of a ~2.5 s warp at full size). Detectors whose raw arrives "
        "first, or whose fitted WCS is not a shift of the predicted one, warp in full.",
    )
    max_attempts: int = Field(
        default=2, ge=1, description="Tries of a detector whose worker died before it is failed."
    )
    association_radius_arcsec: float = Field(
        default=1.0, gt=0, description="DiaSource → DiaObject association radius."
    )
    detection_threshold: float = Field(
        default=5.5,
        gt=0,
        description="DIA detection threshold, σ on the difference image. At 5σ a full-size "
        "CCD has 2-3.5 pure-noise peaks of each sign (measured, as theory predicts): 5.5σ keeps "
        "false DiaSources under 1 per CCD and loses no S/N ≥ 10 transient.",
    )


class OodsPolicy(_Policy):
    """OODS cache policies (LDM-230 2.6)."""

    root: str | None = Field(default=None, description="Cache root (None: $LDF_HOME/oods).")
    retention_days: dict[str, float] = Field(
        default_factory=lambda: {"raw": 7.0},
        description="Days kept per dataset type, or per 'instrument/dataset_type' (wins).",
    )
    token_file: str | None = Field(
        default=None,
        description="File of accepted bearer tokens, one per line "
        "(None: $LDF_HOME/secrets/oods-tokens).",
    )
    host: str = Field(default="127.0.0.1", description="HTTP listen address.")
    port: int = Field(default=8021, ge=0, le=65535, description="HTTP port (0: any free port).")
    read_lease_s: float = Field(
        default=300.0, gt=0, description="A download in progress protects its file this long."
    )


class TableReplication(_Strict):
    """A database whose tables are replicated to other sites as consistent snapshots."""

    role: str = Field(description="Database role (see `databases`), e.g. 'catalog'.")
    sites: list[str] = Field(min_length=1, description="Sites that receive the snapshots.")


class BackbonePolicy(_Policy):
    """Data Backbone replication and retention policies (LDM-230 5.1)."""

    ingest_site: str = Field(default="base", description="Site new files land at by default.")
    transfer_workers: int = Field(default=4, ge=1, description="Parallel copies per daemon.")
    link_mbps: dict[str, float] = Field(
        default_factory=dict,
        description="Bandwidth limit per link, 'src->dst' (site names) → megabits per second.",
    )
    max_attempts: int = Field(default=8, ge=1, description="Attempts before a transfer fails.")
    retry_base_s: float = Field(default=2.0, gt=0, description="First retry delay (doubles).")
    retry_max_s: float = Field(default=600.0, gt=0, description="Longest retry delay.")
    lease_s: float = Field(
        default=600.0, gt=0, description="A claimed transfer returns to the queue after this."
    )
    poll_s: float = Field(default=0.5, gt=0, description="Daemon's queue polling interval.")
    audit_interval_s: float = Field(default=3600.0, gt=0, description="Daemon's audit cadence.")
    audit_checksums: bool = Field(
        default=False, description="Daemon audits re-checksum contents (else sizes only)."
    )
    dark_grace_s: float = Field(
        default=3600.0,
        ge=0,
        description="A file on storage but not in the catalog is dark only once this old "
        "(longer than any copy takes; 0 is safe only while nothing writes).",
    )
    scratch_lifetime_days: float = Field(
        default=30.0, gt=0, description="Default lifetime of scratch files."
    )
    butler: bool = Field(
        default=True, description="Register raw files in each site's Butler repository."
    )
    tables: list[TableReplication] = Field(
        default_factory=list, description="Databases replicated as snapshots."
    )

    @field_validator("link_mbps")
    @classmethod
    def _links(cls, value: dict[str, float]) -> dict[str, float]:
        for link, mbps in value.items():
            if link.count("->") != 1 or not all(link.split("->")):
                raise ValueError(f"link {link!r} must be 'source->destination'")
            if mbps <= 0:
                raise ValueError(f"link {link!r}: bandwidth must be > 0")
        return value


class AlertsPolicy(_Policy):
    """Alert distribution policies (LDM-230 4.3)."""

    root: str | None = Field(
        default=None, description="Alert log and archive root (None: $LDF_HOME/alerts)."
    )
    host: str = Field(default="127.0.0.1", description="HTTP listen address.")
    port: int = Field(default=8031, ge=0, le=65535, description="HTTP port (0: any free port).")
    credentials_file: str | None = Field(
        default=None,
        description="Brokers', producers' and operators' credentials (None: "
        "$LDF_HOME/secrets/alerts-credentials.yaml).",
    )
    max_batch_entries: int = Field(
        default=2000, ge=1, description="Most entries one fetch returns."
    )
    max_batch_bytes: int = Field(
        default=32 << 20, ge=1 << 16, description="Most bytes one fetch returns (one entry "
        "always goes, however large)."
    )  # fmt: skip
    max_wait_s: float = Field(
        default=30.0, ge=0, description="Longest long-poll a consumer may ask for."
    )
    max_ingest_bytes: int = Field(
        default=512 << 20, ge=1 << 16, description="Largest ingest request body."
    )
    lag_check_s: float = Field(default=5.0, gt=0, description="How often feed lag is checked.")
    archive_delay_s: float = Field(
        default=60.0, ge=0, description="A closed visit is archived (gzipped) this long after "
        "its manifest, off the delivery path."
    )  # fmt: skip
    hot_retention_days: float = Field(
        default=7.0, gt=0, description="Hot segments are kept this long after archiving."
    )
    nats_url: str | None = Field(
        default=None,
        description="NATS JetStream server for feeds with transport 'nats' (None: such feeds "
        "are not published), e.g. nats://127.0.0.1:4222.",
    )
    nats_user: str | None = Field(default=None, description="The publisher's NATS user.")
    nats_password: str | None = Field(default=None, description="The publisher's NATS password.")
    nats_max_backlog: int = Field(
        default=100_000,
        ge=1,
        description="Messages of one NATS feed JetStream may hold unread by its broker before "
        "the publisher pauses that feed (the rest waits in the service's log, on disk).",
    )
    fetch_url: str = Field(
        default="/alerts/v1/alerts/{alert_id}",
        description="Where a notification says the full packet is ({alert_id} filled in).",
    )


class TelemetryPolicy(_Policy):
    """Telemetry gateway policies (LDM-230 2.7)."""

    device: str = Field(
        default="TelemetryGateway",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="The gateway's own OCS device name (its commands, state and events).",
    )
    producers_file: str | None = Field(
        default=None,
        description="YAML file of producers and their token hashes "
        "(None: $LDF_HOME/secrets/telemetry-producers.yaml).",
    )
    host: str = Field(default="127.0.0.1", description="HTTP listen address.")
    port: int = Field(default=8022, ge=0, le=65535, description="HTTP port (0: any free port).")
    max_body_bytes: int = Field(
        default=65536, ge=256, description="Largest message body (and payload in a batch)."
    )
    max_batch_bytes: int = Field(default=1 << 20, ge=256, description="Largest batch body.")
    max_batch_messages: int = Field(default=500, ge=1, description="Most messages in a batch.")
    retry_base_s: float = Field(
        default=0.5, gt=0, description="First wait before retrying an unavailable bus (doubles)."
    )
    retry_max_s: float = Field(default=30.0, gt=0, description="Longest wait between retries.")
    retention_days: float = Field(
        default=30.0,
        gt=0,
        description="Injected messages and audit rows are kept this long; a message id can be "
        "deduplicated for this long.",
    )


class Policies(_Strict):
    """Per-service policy sections."""

    archiver: ArchiverPolicy = Field(default_factory=ArchiverPolicy)
    prompt: PromptPolicy = Field(default_factory=PromptPolicy)
    oods: OodsPolicy = Field(default_factory=OodsPolicy)
    backbone: BackbonePolicy = Field(default_factory=BackbonePolicy)
    alerts: AlertsPolicy = Field(default_factory=AlertsPolicy)
    telemetry: TelemetryPolicy = Field(default_factory=TelemetryPolicy)


type InstrumentName = Literal["LSSTCam", "LATISS"]
"""Instruments the facility knows."""


def _default_instruments() -> dict[InstrumentName, InstrumentSettings]:
    return {"LSSTCam": InstrumentSettings(), "LATISS": InstrumentSettings()}


def _default_home() -> Path:
    return Path("ldf-data")


class _YamlSource(PydanticBaseSettingsSource):
    """Settings source for the YAML file the loader parsed (keeps its line numbers)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        data = yaml_data.get() or {}
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(yaml_data.get() or {})


class Settings(BaseSettings):
    """The whole site configuration."""

    model_config = SettingsConfigDict(
        env_prefix="LDF_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(
        default_factory=_default_home,
        description="Root of embedded state (databases, sites, bus log). Env: LDF_HOME.",
    )
    sites: dict[str, Site] = Field(
        default_factory=dict,
        description="Sites by name; empty means summit, base, archive and dr under $LDF_HOME.",
    )
    databases: dict[str, str] = Field(
        default_factory=dict,
        description="SQLAlchemy URLs by role (catalog, apdb, efd...); missing roles are SQLite.",
    )
    bus: BusSettings = Field(default_factory=BusSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    instruments: dict[InstrumentName, InstrumentSettings] = Field(
        default_factory=_default_instruments,
        description="Attached instruments.",
    )
    sim: SimSettings = Field(default_factory=SimSettings)
    policies: Policies = Field(default_factory=Policies)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        # Services may change directory; keep every embedded path absolute.
        self.home = self.home.expanduser().absolute()
        if not self.sites:
            self.sites = {
                name: Site(
                    description=f"embedded default site '{name}'",
                    endpoints=[
                        Endpoint(
                            name="disk",
                            tier=Tier.DR if name == "dr" else Tier.DISK,
                            root=str(self.home / "sites" / name / "disk"),
                        ),
                        *(
                            [
                                Endpoint(
                                    name="tape",
                                    tier=Tier.NEARLINE,
                                    root=str(self.home / "sites" / name / "tape"),
                                    staging_delay_s=2.0,
                                )
                            ]
                            if name == "archive"
                            else []
                        ),
                    ],
                )
                for name in DEFAULT_SITES
            }
        return self

    def database_url(self, role: str) -> str:
        """Return the SQLAlchemy URL for a database role (SQLite under home by default)."""
        if role in self.databases:
            return self.databases[role]
        return f"sqlite:///{(self.home / 'db' / f'{role}.sqlite3').resolve()}"

    @property
    def bus_is_embedded(self) -> bool:
        """Whether the OCS bus is the embedded log rather than a NATS server."""
        return self.bus.url == "embedded"
