"""Alembic support: run the SQL files of ``sql/`` and keep the SQL functions in step with the
tables.

Two kinds of SQL live in ``sql/``:

* **Table changes**, one revision each (``schema_0001.sql`` ...), run by that revision only.
  Revisions never create, replace or drop the SQL functions.
* **Function sets**: a folder of idempotent ``.sql`` files, applied in name order, that
  creates every function.  Each function carries the marker ``SET themis.execute = '<roles>'``
  (``'none'`` for the owner only); ``90_grants.sql`` grants EXECUTE from it, and the
  migrations drop exactly the marked functions of the schemas ``themis`` and ``public``.

**The set in force at a revision.**  ``sql/api/`` is the set of the newest revision (head).
``sql/api_at/<X>/`` is a frozen copy: the set of revision X and of every older revision with
no frozen copy of its own.  :func:`function_set_for` walks from a revision towards head and
takes the first frozen copy it meets, else ``sql/api/``.

**The developer rule.**  Before a new revision R changes anything the functions use (a column
they read, a signature, a body), copy ``sql/api/`` as it is to ``sql/api_at/<R's
down_revision>/``, commit that copy, and only then edit ``sql/api/``.  A frozen copy is never
edited again.  R itself changes tables only.  (``sql/README.md`` says the same.)

**When functions are applied.**  Once, after the last revision of a run, in the same
transaction as the revisions: :func:`sync_functions` drops every marked function (whatever its
signature, so changed signatures leave no overload behind) and applies the set of the revision
the database is at now (nothing at base).  ``migrations/env.py`` calls it; so must the
``env.py`` of an application that runs our revisions in its own Alembic project.  A failure
anywhere rolls the whole run back.

SQL files go through the raw DBAPI connection without parameters, so PL/Python bodies and
``RAISE ... %`` format strings reach the server untouched (SQLAlchemy's ``text()`` would read
``:name`` as bind parameters).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .pl import API_VERSION
from .resources import migrations_dir
from .resources import sql_dir as default_sql_dir

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

BRANCH = "themis"
"""The branch label of our revisions (so they can share an application's Alembic history)."""

SQL_DIR_OPTION = "themis_sql_dir"
"""Alembic config key (``config.attributes`` or a main option) naming the ``sql/`` folder to
read; unset, the installed one (:func:`themis_pg.resources.sql_dir`)."""

HEAD_SET = "api"
FROZEN_SETS = "api_at"
MARKER = "themis.execute"
MARKED_SCHEMAS = ("themis", "public")


# -- where the SQL comes from --------------------------------------------------------------------
def sql_dir_of(config: Config | None) -> Path:
    """The ``sql/`` folder a migration run reads: ``config.attributes[SQL_DIR_OPTION]``, else
    the main option ``themis_sql_dir``, else the installed one."""
    if config is not None:
        chosen = config.attributes.get(SQL_DIR_OPTION) or config.get_main_option(SQL_DIR_OPTION)
        if chosen:
            return Path(chosen)
    return default_sql_dir()


def _sql_dir_of_op(op: Any) -> Path:
    return sql_dir_of(op.get_context().config)


def _dbapi(bind: Any) -> Any:
    """The DBAPI connection (psycopg 3 or psycopg2) under a SQLAlchemy ``Connection``."""
    return bind.connection.dbapi_connection


def _run_script(dbapi_connection: Any, sql: str) -> None:
    # No parameters: both psycopg 3 and psycopg2 send the text as one simple query, so it may
    # hold many statements and % signs.
    with dbapi_connection.cursor() as cur:
        cur.execute(sql)


def execute_sql(op: Any, name: str) -> None:
    """Execute ``sql/<name>`` as one multi-statement script, inside the revision's
    transaction."""
    _run_script(_dbapi(op.get_bind()), (_sql_dir_of_op(op) / name).read_text(encoding="utf-8"))


def apply_functions(op: Any) -> None:
    """Gone: revisions no longer apply functions (kept only to fail clearly in a revision
    generated from an old template)."""
    raise RuntimeError(
        "revisions no longer apply the SQL functions: remove apply_functions(op) from this "
        "revision; the function set is applied once after the last revision (sql/README.md)"
    )


# -- the server's Python ---------------------------------------------------------------------------
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


def _check_server_package(dbapi_connection: Any) -> None:
    _run_script(dbapi_connection, CHECK_SERVER_PACKAGE.replace("{version}", str(API_VERSION)))


def check_server_package(op: Any) -> None:
    """Fail the migration early and clearly if the server cannot run our functions (the
    server's Python must import ``themis_pl`` of our API version, and psycopg)."""
    _check_server_package(_dbapi(op.get_bind()))


# -- function sets ---------------------------------------------------------------------------------
def function_set_for(revision: str | None, *, script: ScriptDirectory | None = None,
                     sql_dir: Path | None = None) -> Path | None:
    """The folder of the function set in force at ``revision`` (None: base, no functions).

    Walks ``revision`` → its child → … → head along our branch and returns the first
    ``sql/api_at/<rev>/`` that exists, else ``sql/api/``.  ``script`` defaults to our own
    ``migrations/``; ``sql_dir`` to the installed ``sql/``.

    Raises ``alembic.util.CommandError`` for an unknown revision and ``RuntimeError`` where our
    history branches (it is linear by design).
    """
    if revision is None:
        return None
    if script is None:
        from alembic.script import ScriptDirectory

        script = ScriptDirectory(str(migrations_dir()))
    base = sql_dir if sql_dir is not None else default_sql_dir()
    current = script.get_revision(revision)
    if current is None:
        return None
    while True:
        frozen = base / FROZEN_SETS / current.revision
        if frozen.is_dir():
            return frozen
        children = [child for child in (script.get_revision(r) for r in current.nextrev)
                    if child is not None and BRANCH in child.branch_labels]
        if not children:
            return base / HEAD_SET
        if len(children) > 1:
            names = ", ".join(sorted(c.revision for c in children))
            raise RuntimeError(f"themis revision {current.revision} has several children "
                               f"({names}); our history must stay linear")
        current = children[0]


def themis_revision_now(migration_context: MigrationContext,
                        script: ScriptDirectory) -> str | None:
    """Our revision the database is at, read from the version table in the current
    transaction: the newest revision of the ``themis`` branch among the applied ones (an
    application's own heads may share the table), or None at base."""
    heads = migration_context.get_current_heads()
    if not heads:
        return None
    for rev in script.iterate_revisions(heads, "base"):
        if BRANCH in rev.branch_labels:
            return rev.revision  # newest first: ancestors come after their descendants
    return None


DROP_MARKED_FUNCTIONS = """
DO $drop$
DECLARE
    targets text;
    msg text;
    detail text;
BEGIN
    SELECT string_agg(format('%I.%I(%s)', n.nspname, p.proname,
                             pg_get_function_identity_arguments(p.oid)), ', ')
      INTO targets
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname IN ('themis', 'public')
       AND EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'themis.execute=%');
    IF targets IS NOT NULL THEN
        -- One statement: dependencies between the marked functions themselves do not matter.
        EXECUTE 'DROP ROUTINE ' || targets;
    END IF;
EXCEPTION WHEN dependent_objects_still_exist THEN
    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
    RAISE EXCEPTION USING MESSAGE = msg, DETAIL = detail, ERRCODE = '2BP01',
        HINT = 'themis-pg re-creates its functions on every migration: drop the objects that '
               'depend on them (views, defaults ...) before migrating and re-create them after.';
END
$drop$;
"""


def _drop_marked_functions(dbapi_connection: Any) -> None:
    _run_script(dbapi_connection, DROP_MARKED_FUNCTIONS)


def drop_marked_functions(op: Any) -> None:
    """Drop every function marked ``SET themis.execute`` in the schemas themis and public,
    found in the catalog (so any signature, old or new, goes)."""
    _drop_marked_functions(_dbapi(op.get_bind()))


def apply_function_set(dbapi_connection: Any, set_dir: Path | None) -> None:
    """Replace the marked functions by those of ``set_dir`` (None: drop them only).

    Checks the server's Python first when there is a set to apply.  Runs in the caller's
    transaction.
    """
    files = [] if set_dir is None else sorted(set_dir.glob("*.sql"))
    if set_dir is not None and not files:
        raise FileNotFoundError(f"function set {set_dir} holds no .sql files")
    if files:
        _check_server_package(dbapi_connection)
    _drop_marked_functions(dbapi_connection)
    for path in files:
        log.info("applying %s", path)
        _run_script(dbapi_connection, path.read_text(encoding="utf-8"))


def sync_functions(migration_context: MigrationContext) -> str | None:
    """Bring the SQL functions in step with the revision the database is at now.

    Call it in ``env.py`` right after ``context.run_migrations()``, inside the same
    ``context.begin_transaction()`` block (and without ``transaction_per_migration``), so that
    revisions and functions commit or roll back together::

        with context.begin_transaction():
            context.run_migrations()
            sync_functions(context.get_context())

    Drops every marked function and applies the set of our revision now (nothing at base),
    read from the run's config (``themis_sql_dir``, else the installed ``sql/``).  Returns that
    revision.  Does nothing for commands that do not move the database (``alembic current``,
    ``check``) and refuses offline (``--sql``) runs.
    """
    opts = migration_context.opts
    if opts.get("dont_mutate") or opts.get("destination_rev") is None:
        return None
    if migration_context.as_sql:
        raise NotImplementedError("themis-pg migrations need a live connection (no --sql)")
    script = migration_context.script
    if script is None:
        raise RuntimeError("sync_functions needs the migration context of an Alembic run")
    revision = themis_revision_now(migration_context, script)
    set_dir = function_set_for(revision, script=script,
                               sql_dir=sql_dir_of(migration_context.config))
    log.info("themis functions: set %s for revision %s", set_dir, revision)
    apply_function_set(_dbapi(migration_context.bind), set_dir)
    return revision
