"""Connections and schema migrations.

``resolve_dsn`` is the one rule for which database a command talks to: an explicit DSN, else
``THEMIS_DSN``, else the embedded cluster's URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from .config import Settings, get_settings


def resolve_dsn(dsn: str | None, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if dsn:
        return dsn
    if settings.dsn:
        return settings.dsn
    from .cluster import EmbeddedCluster

    return EmbeddedCluster.from_settings(settings).url()


def connect(dsn: str, *, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=autocommit, **kwargs)


def alembic_config(dsn: str, *, migrations: Path | None = None,
                   sql_dir: Path | None = None) -> Any:
    """Alembic config of our revisions for ``dsn``.

    ``migrations`` (a ``migrations/`` folder) and ``sql_dir`` (a ``sql/`` folder) default to
    the installed ones; tests point them at modified copies.
    """
    from alembic.config import Config

    from .migration_support import SQL_DIR_OPTION
    from .resources import alembic_ini, migrations_dir

    cfg = Config(str(alembic_ini()))
    cfg.set_main_option("script_location", str(migrations or migrations_dir()))
    cfg.attributes["dsn"] = dsn
    if sql_dir is not None:
        cfg.attributes[SQL_DIR_OPTION] = str(sql_dir)
    return cfg


def migrate(dsn: str, revision: str = "head", *, migrations: Path | None = None,
            sql_dir: Path | None = None) -> None:
    """Upgrade the database to ``revision`` (default: the newest), then apply the SQL
    functions of that revision, all in one transaction."""
    from alembic import command

    command.upgrade(alembic_config(dsn, migrations=migrations, sql_dir=sql_dir), revision)


def downgrade(dsn: str, revision: str = "base", *, migrations: Path | None = None,
              sql_dir: Path | None = None) -> None:
    """Downgrade the database to ``revision`` (default: remove everything), then restore the
    SQL functions of that revision, all in one transaction."""
    from alembic import command

    command.downgrade(alembic_config(dsn, migrations=migrations, sql_dir=sql_dir), revision)


def current_revision(dsn: str) -> str | None:
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT to_regclass('public.themis_alembic_version') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return None
        found = conn.execute("SELECT version_num FROM public.themis_alembic_version").fetchone()
        return None if found is None else str(found[0])
