"""Alembic environment of the OODS index (run through ldf.db.migrate)."""

from __future__ import annotations

from alembic import context

from ldf.oods.schema import Base

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # `alembic` CLI use: take the URL from the configuration
    from ldf.db import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=config.get_main_option("version_table") or "alembic_version_oods",
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
