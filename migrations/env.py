"""Alembic environment for themis-pg.

The database: ``config.attributes['dsn']`` (``themis migrate``), else ``-x dsn=...``, else
``THEMIS_DSN``, else the embedded cluster.  Our version table is ``themis_alembic_version`` so
that an application's own Alembic history in the same database is left alone.

One run (every revision it passes, then the SQL functions of the revision it ends at) is one
transaction: a failure anywhere leaves the database as it was.  The ``sql/`` folder read is
``config.attributes['themis_sql_dir']`` or the main option ``themis_sql_dir``, else the
installed one (themis_pg.migration_support).
"""

from __future__ import annotations

import logging.config

import psycopg
import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

from themis_pg.db import resolve_dsn
from themis_pg.migration_support import sync_functions

VERSION_TABLE = "themis_alembic_version"

config = context.config
if config.config_file_name is not None and not config.attributes.get("dsn"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

dsn = (config.attributes.get("dsn") or context.get_x_argument(as_dictionary=True).get("dsn")
       or resolve_dsn(None))


def run_migrations_online() -> None:
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn),
                              poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None,
                          version_table=VERSION_TABLE)
        with context.begin_transaction():
            context.run_migrations()
            sync_functions(context.get_context())


if context.is_offline_mode():
    # The revisions run SQL files through the live connection and the function set depends
    # on the revision the database reaches, so there is no faithful offline script.
    raise SystemExit("themis-pg migrations need a database connection: offline (--sql) mode "
                     "is not supported")
run_migrations_online()
