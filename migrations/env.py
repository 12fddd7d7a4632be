"""Alembic environment for themis-pg.

The database: ``config.attributes['dsn']`` (``themis migrate``), else ``-x dsn=...``, else
``THEMIS_DSN``, else the embedded cluster.  Our version table is ``themis_alembic_version`` so
that an application's own Alembic history in the same database is left alone.
"""

from __future__ import annotations

import logging.config

import psycopg
import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

from themis_pg.db import resolve_dsn

VERSION_TABLE = "themis_alembic_version"

config = context.config
if config.config_file_name is not None and not config.attributes.get("dsn"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

dsn = (config.attributes.get("dsn") or context.get_x_argument(as_dictionary=True).get("dsn")
       or resolve_dsn(None))


def run_migrations_offline() -> None:
    context.configure(url="postgresql+psycopg://", literal_binds=True,
                      version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn),
                              poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None,
                          version_table=VERSION_TABLE, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
