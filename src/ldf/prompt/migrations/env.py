"""Alembic environment of Prompt Processing's state (run through ldf.db.migrate)."""

from ldf.db.migrate import run_env
from ldf.prompt.schema import Base

run_env(Base.metadata, "alembic_version_prompt")
