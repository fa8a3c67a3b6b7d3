"""Site configuration: one pydantic-settings model loaded from YAML with ``LDF_*`` overrides."""

from ldf.config.loader import load_settings, validate_file
from ldf.config.models import (
    BatchSettings,
    BusSettings,
    Endpoint,
    InstrumentSettings,
    Policies,
    Settings,
    SimSettings,
    Site,
    Tier,
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
    "load_settings",
    "validate_file",
]
