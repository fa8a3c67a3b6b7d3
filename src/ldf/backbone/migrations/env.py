"""Alembic environment of the Data Backbone catalog (run through ldf.db.migrate)."""

from ldf.backbone.schema import Base
from ldf.db.migrate import run_env

run_env(Base.metadata, "alembic_version_backbone")
