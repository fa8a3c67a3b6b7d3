"""Alembic environment of alert distribution's state (run through ldf.db.migrate)."""

from ldf.alerts.schema import Base
from ldf.db.migrate import run_env

run_env(Base.metadata, "alembic_version_alerts")
