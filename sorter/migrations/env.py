"""Alembic environment: run migrations on the engine handed over by :mod:`sorter.db.session`.

Run by ``sorter db upgrade``/``sorter db check`` and by the automatic migration
of the embedded database; the ``alembic`` command line works as well
(``alembic -c sorter/migrations/alembic.ini ...``), against ``SORTER_DATABASE_URL``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Engine

from sorter.config import Settings
from sorter.db.models import Base
from sorter.db.session import create_db_engine

#: Serialises concurrent migrations of one PostgreSQL database (several workers
#: starting against an empty database); any constant unique to this project will do.
_MIGRATION_LOCK_KEY = 0x50_52_54_52  # "SRTR"


def _engine() -> Engine:
    given = context.config.attributes.get("engine")
    if isinstance(given, Engine):
        return given
    url = context.config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
    return create_db_engine(url)


def run_migrations_offline() -> None:
    """Emit SQL for ``alembic upgrade --sql``, without a connection."""
    url = context.config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _ours(name: str | None, type_: str, _parents: object) -> bool:
    """Compare only dicom-sorter's tables: a database may hold others beside them on purpose
    (another application's, with `sorter db upgrade`; PostGIS's ``spatial_ref_sys``), and
    ``sorter db check`` called them drift to remove."""
    return type_ != "table" or name in Base.metadata.tables


def run_migrations_online() -> None:
    """Apply migrations on a live connection."""
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=True,  # SQLite cannot ALTER most things; batch mode recreates tables
            compare_type=True,
            include_name=_ours,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Taken inside the migration transaction, before Alembic reads the
                # current revision, so a second process waits and then finds head.
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
