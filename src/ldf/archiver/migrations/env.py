"""Alembic environment of the archivers' work queues (run through ldf.db.migrate)."""

from ldf.archiver.schema import Base
from ldf.db.migrate import run_env

run_env(Base.metadata, "alembic_version_archiver")
