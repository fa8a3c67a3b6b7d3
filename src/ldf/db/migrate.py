"""Run a service's Alembic migrations programmatically."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

__all__ = ["alembic_config", "migrate"]


def alembic_config(package: str, engine: Engine) -> Config:
    """Alembic configuration for the ``migrations`` folder of a service package.

    Each service keeps its revisions in ``<package>/migrations`` and records them in its own
    version table (``alembic_version_<service>``), so services can share a database.
    """
    folder = Path(str(resources.files(package) / "migrations"))
    cfg = Config()
    cfg.set_main_option("script_location", str(folder))
    cfg.set_main_option("version_table", f"alembic_version_{package.rsplit('.', 1)[-1]}")
    cfg.attributes["engine"] = engine
    return cfg


def migrate(package: str, engine: Engine, revision: str = "head") -> None:
    """Bring a service's schema to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(package, engine), revision)
