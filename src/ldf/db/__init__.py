"""Managed database services (LDM-230 5.2): engines, schema migrations, timestamps.

Every service's tables are SQLAlchemy 2 models with Alembic migrations, identical on SQLite
(the embedded default) and PostgreSQL. `make_engine` gives an engine with the settings each
backend needs; `migrate` brings a service's schema to its newest revision, each service with
its own Alembic version table so services can share one database.
"""

from ldf.db.engine import make_engine, utcnow
from ldf.db.migrate import migrate
from ldf.db.store import SqlStore
from ldf.db.types import JsonType, UtcDateTime

__all__ = ["JsonType", "SqlStore", "UtcDateTime", "make_engine", "migrate", "utcnow"]
