"""Alembic environment of the OODS index (run through ldf.db.migrate)."""

from ldf.db.migrate import run_env
from ldf.oods.schema import Base

run_env(Base.metadata, "alembic_version_oods")
