"""Run a service's Alembic migrations programmatically."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, MetaData

__all__ = ["alembic_config", "migrate", "run_env"]


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


def run_env(metadata: MetaData, default_version_table: str) -> None:
    """The body of every service's ``migrations/env.py``: run its revisions online.

    Uses the engine `migrate` passes in; from the ``alembic`` command line, the configured
    ``sqlalchemy.url``. SQLite gets batch mode (it cannot ALTER most things in place).
    """
    from alembic import context

    from ldf.db.engine import make_engine

    config = context.config
    engine = config.attributes.get("engine") or make_engine(
        config.get_main_option("sqlalchemy.url") or ""
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=config.get_main_option("version_table") or default_version_table,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
