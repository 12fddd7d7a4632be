"""Alembic: the schema can grow past its first revision.

Functions are applied once, after the last revision of a run, from the function set of the
revision the database ends at (sql/README.md).  A throwaway revision, built in a temp copy of
``migrations/`` and ``sql/``, adds a column that a new function uses and changes a public
signature; upgrading, downgrading and re-upgrading through it must give the schema a fresh
database gets, and stepping back must restore the old bodies and signatures.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory

from themis_pg.db import current_revision, downgrade, migrate
from themis_pg.migration_support import BRANCH, function_set_for

REPO = Path(__file__).resolve().parent.parent
EXTRA = "test_extra"  # the throwaway revision


def schema_dump(dsn: str) -> str:
    out = subprocess.run(["pg_dump", "--schema-only", "--no-owner", dsn], check=True,
                         capture_output=True, text=True).stdout
    # pg_dump 15 prints a random \restrict key on newer minor versions; drop comments too.
    return "\n".join(line for line in out.splitlines()
                     if not line.startswith(("--", "\\restrict", "\\unrestrict")))


def objects(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname = 'themis' "
            "UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proname LIKE 'themis%'"
        ).fetchall()
    return {r[0] for r in rows}


def signatures(dsn: str, name: str) -> list[str]:
    """Every overload of public.<name>, as ``name(args with names and defaults)``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT p.proname || '(' || pg_get_function_arguments(p.oid) || ')' FROM pg_proc p "
            "WHERE p.proname = %s AND p.pronamespace = 'public'::regnamespace ORDER BY 1",
            (name,)).fetchall()
    return [r[0] for r in rows]


def our_head(migrations: Path) -> str:
    head = ScriptDirectory(str(migrations)).get_current_head()
    assert head is not None
    return head


@pytest.fixture
def databases(server) -> Iterator[Callable[[str], str]]:
    """Create empty databases (dropped afterwards): ``new("label")`` gives a DSN."""
    made: list[str] = []

    def new(label: str) -> str:
        name = f"t_mig_{label}"
        server.drop_database(name)
        made.append(name)
        return str(server.create_database(name))

    yield new
    for name in made:
        server.drop_database(name)


# -- the throwaway revision ----------------------------------------------------------------------
@dataclass
class Tree:
    """A temp copy of migrations/ and sql/ with the throwaway revision on top of our head."""

    migrations: Path
    sql: Path
    below: str  # our real head: the throwaway revision's down_revision

    def migrate(self, dsn: str, revision: str = "head") -> None:
        migrate(dsn, revision, migrations=self.migrations, sql_dir=self.sql)

    def downgrade(self, dsn: str, revision: str) -> None:
        downgrade(dsn, revision, migrations=self.migrations, sql_dir=self.sql)


EXTRA_REVISION = '''\
"""Throwaway test revision: a column that the new function set uses.

Revision ID: {revision}
Revises: {below}
"""

from alembic import op

revision = "{revision}"
down_revision = "{below}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE themis.documents ADD COLUMN lang text")


def downgrade() -> None:
    op.execute("ALTER TABLE themis.documents DROP COLUMN lang")
'''

# A LANGUAGE sql body is checked when it is created: it cannot exist before the column does.
EXTRA_FUNCTION = """
CREATE OR REPLACE FUNCTION public.themis_doc_lang(doc_id bigint) RETURNS text
LANGUAGE sql STABLE SECURITY INVOKER SET search_path = pg_catalog, themis, pg_temp
    SET themis.execute = 'themis_user' AS $$
    SELECT lang FROM themis.documents WHERE id = doc_id
$$;
"""
SEARCH_HEADER = re.compile(
    r"(CREATE OR REPLACE FUNCTION public\.themis_search\(.*?)(\s*\)\s*RETURNS)", re.DOTALL)


def build_tree(root: Path) -> Tree:
    """Copy the tree, freeze the current function set as the throwaway's down_revision's,
    then change the head set: a new function on the new column, and an extra argument of
    themis_search."""
    migrations, sql = root / "migrations", root / "sql"
    shutil.copytree(REPO / "migrations", migrations,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "sql", sql)
    below = our_head(migrations)
    frozen = sql / "api_at" / below
    if not frozen.exists():  # the developer rule: freeze before changing sql/api
        shutil.copytree(sql / "api", frozen)
    (migrations / "versions" / f"{EXTRA}.py").write_text(
        EXTRA_REVISION.format(revision=EXTRA, below=below))
    (sql / "api" / "25_doc_lang.sql").write_text(EXTRA_FUNCTION)
    changed = 0
    for path in sorted((sql / "api").glob("*.sql")):
        text, n = SEARCH_HEADER.subn(r"\1, min_score real DEFAULT NULL\2", path.read_text())
        if n:
            path.write_text(text)
            changed += n
    assert changed == 1, "expected one CREATE OR REPLACE FUNCTION public.themis_search( in sql/api"
    return Tree(migrations, sql, below)


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path)


def test_function_set_for_walks_towards_head(tree: Tree):
    script = ScriptDirectory(str(tree.migrations))
    assert function_set_for(None, script=script, sql_dir=tree.sql) is None
    assert function_set_for(EXTRA, script=script, sql_dir=tree.sql) == tree.sql / "api"
    assert function_set_for(tree.below, script=script, sql_dir=tree.sql) == (
        tree.sql / "api_at" / tree.below)
    for rev in script.walk_revisions():
        found = function_set_for(rev.revision, script=script, sql_dir=tree.sql)
        assert found is not None and found.is_dir()
        if rev.revision != EXTRA:  # below the new revision, always a frozen copy
            assert found.parent == tree.sql / "api_at"


def test_frozen_sets_name_our_revisions():
    script = ScriptDirectory(str(REPO / "migrations"))
    ours = {rev.revision for rev in script.walk_revisions() if BRANCH in rev.branch_labels}
    frozen = REPO / "sql" / "api_at"
    names = {p.name for p in frozen.iterdir()} if frozen.exists() else set()
    assert names <= ours, f"sql/api_at/ names no revision of ours: {sorted(names - ours)}"
    assert our_head(REPO / "migrations") not in names, "the head's set is sql/api/, not frozen"


def test_upgrade_downgrade_upgrade_through_a_new_revision(tree: Tree, databases):
    fresh = databases("fresh")
    tree.migrate(fresh)
    expected = schema_dump(fresh)
    assert "lang text" in expected and "themis_doc_lang" in expected
    assert len(signatures(fresh, "themis_search")) == 1
    assert "min_score real" in signatures(fresh, "themis_search")[0]

    cycled = databases("cycled")
    tree.migrate(cycled)
    tree.downgrade(cycled, "base")
    assert objects(cycled) == set()
    tree.migrate(cycled)
    assert schema_dump(cycled) == expected


def test_downgrade_one_step_restores_the_old_functions(tree: Tree, databases):
    old = databases("old")
    migrate(old, tree.below)  # the unmodified tree, at our real head
    expected = schema_dump(old)

    stepped = databases("stepped")
    tree.migrate(stepped)
    tree.downgrade(stepped, "-1")
    assert current_revision(stepped) == tree.below
    assert signatures(stepped, "themis_search") == signatures(old, "themis_search")
    assert signatures(stepped, "themis_doc_lang") == []
    assert schema_dump(stepped) == expected


def test_every_revision_reached_up_or_down_has_the_same_schema(tree: Tree, databases):
    script = ScriptDirectory(str(tree.migrations))
    revisions = [rev.revision for rev in script.walk_revisions()]  # head first
    walker = databases("walker")
    tree.migrate(walker)
    for i, rev in enumerate(revisions[1:]):
        tree.downgrade(walker, rev)
        fresh = databases(f"at_{i}")
        tree.migrate(fresh, rev)
        assert schema_dump(walker) == schema_dump(fresh), f"revision {rev}"


def test_a_failure_leaves_the_database_as_it_was(tree: Tree, databases):
    (tree.sql / "api" / "95_broken.sql").write_text("SELECT 1 / 0;\n")
    empty = databases("empty")
    with pytest.raises(psycopg.errors.DivisionByZero):
        tree.migrate(empty)
    assert objects(empty) == set()
    assert current_revision(empty) is None

    below = databases("below")
    tree.migrate(below, tree.below)  # its frozen set is intact
    before = schema_dump(below)
    with pytest.raises(psycopg.errors.DivisionByZero):
        tree.migrate(below)
    assert current_revision(below) == tree.below
    assert schema_dump(below) == before


# -- the real tree ---------------------------------------------------------------------------------
def test_upgrade_downgrade_upgrade_same_schema(databases):
    dsn = databases("real")
    migrate(dsn)
    assert current_revision(dsn) is not None
    first = schema_dump(dsn)
    assert "TABLE themis.jobs (" in first
    downgrade(dsn, "base")
    assert objects(dsn) == set()
    migrate(dsn)
    assert schema_dump(dsn) == first


def test_plain_alembic_and_themis_migrate(databases):
    dsn = databases("cli")

    def alembic(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"),
                               "-x", f"dsn={dsn}", *args], cwd=REPO, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr

    alembic("upgrade", "head")
    assert "schema themis" in objects(dsn)
    assert "function themis_rag" in objects(dsn)
    alembic("downgrade", "base")
    assert objects(dsn) == set()
    done = subprocess.run([sys.executable, "-m", "themis_pg.cli", "--dsn", dsn, "migrate"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"revision head", done.stdout)
    assert "function themis_rag" in objects(dsn)


def test_objects_that_depend_on_our_functions_stop_the_migration_clearly(databases):
    dsn = databases("dependent")
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE VIEW public.app_status AS SELECT themis_status() AS s")
    before = schema_dump(dsn)
    with pytest.raises(psycopg.errors.DependentObjectsStillExist) as caught:
        migrate(dsn)
    assert "app_status" in (caught.value.diag.message_detail or "")
    assert "re-create" in (caught.value.diag.message_hint or "")
    assert schema_dump(dsn) == before


# -- our revisions in an application's own Alembic project ---------------------------------------
APP_ENV = """\
import psycopg
import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

from themis_pg.migration_support import sync_functions

dsn = context.get_x_argument(as_dictionary=True)["dsn"]
engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn),
                          poolclass=NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
        sync_functions(context.get_context())
"""
APP_REVISION = '''\
from alembic import op

revision = "app1"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE public.app_items (id integer PRIMARY KEY)")


def downgrade() -> None:
    op.execute("DROP TABLE public.app_items")
'''


def test_our_revisions_in_an_application_project(tmp_path: Path, databases):
    app = tmp_path / "app"
    (app / "migrations" / "versions").mkdir(parents=True)
    (app / "migrations" / "env.py").write_text(APP_ENV)
    (app / "migrations" / "versions" / "app1.py").write_text(APP_REVISION)
    (app / "alembic.ini").write_text(textwrap.dedent(f"""\
        [alembic]
        script_location = %(here)s/migrations
        path_separator = space
        version_locations = %(here)s/migrations/versions {REPO / "migrations" / "versions"}
        """))
    dsn = databases("app")

    def alembic(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(app / "alembic.ini"),
                               "-x", f"dsn={dsn}", *args], capture_output=True, text=True,
                              cwd=app)
        assert done.returncode == 0, done.stderr

    def versions() -> set[str]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return {r[0] for r in conn.execute("SELECT version_num FROM alembic_version")}

    def app_table() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT to_regclass('public.app_items') IS NOT NULL").fetchone()
        return bool(row and row[0])

    alembic("upgrade", "heads")
    assert versions() == {"app1", our_head(REPO / "migrations")}
    assert {"schema themis", "function themis_rag", "function themis_search"} <= objects(dsn)
    assert app_table()

    alembic("downgrade", f"{BRANCH}@base")
    assert versions() == {"app1"}
    assert objects(dsn) == set()
    assert app_table()

    alembic("upgrade", f"{BRANCH}@head")
    assert "function themis_rag" in objects(dsn)
