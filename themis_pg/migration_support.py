"""Helpers for Alembic revisions: run the SQL files of ``sql/`` verbatim.

Files go through the raw psycopg connection without parameters, so PL/Python bodies and
``RAISE ... %`` format strings reach the server untouched (SQLAlchemy's ``text()`` would read
``:name`` as bind parameters).  They run inside the revision's transaction.
"""

from __future__ import annotations

from typing import Any

from .pl import API_VERSION
from .resources import sql_file

IDEMPOTENT_FILES = ("api/10_bus.sql", "api/20_functions.sql", "api/90_grants.sql")


def _raw_connection(op: Any) -> Any:
    return op.get_bind().connection.dbapi_connection


def execute_sql(op: Any, name: str) -> None:
    """Execute ``sql/<name>`` as one multi-statement script."""
    _raw_connection(op).execute(sql_file(name))


def apply_functions(op: Any) -> None:
    """(Re)create every function from the idempotent files; each revision ends with this."""
    for name in IDEMPOTENT_FILES:
        execute_sql(op, name)


CHECK_SERVER_PACKAGE = """
CREATE EXTENSION IF NOT EXISTS plpython3u;
DO $check$
try:
    import themis_pl
    import psycopg
except ImportError as exc:
    plpy.error("the server's Python cannot import %s" % exc.name,
               hint="themis-pg needs its server-side package (themis_pl) and psycopg in the "
                    "PostgreSQL server's Python: `themis db up` does this for the embedded "
                    "cluster; see README 'Existing PostgreSQL servers'.",
               sqlstate="58P01")
if getattr(themis_pl, "API_VERSION", None) != {version}:
    plpy.error("the server's themis_pl package has API version %s; this revision needs {version}"
               % getattr(themis_pl, "API_VERSION", None),
               hint="Re-install the server-side package from this themis-pg version.",
               sqlstate="55000")
$check$ LANGUAGE plpython3u;
"""


def check_server_package(op: Any) -> None:
    """Fail the migration early and clearly if the server cannot run our functions."""
    _raw_connection(op).execute(CHECK_SERVER_PACKAGE.replace("{version}", str(API_VERSION)))
