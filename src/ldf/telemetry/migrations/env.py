"""Alembic environment of the Telemetry Gateway (run through ldf.db.migrate)."""

from ldf.db.migrate import run_env
from ldf.telemetry.schema import Base

run_env(Base.metadata, "alembic_version_telemetry")
