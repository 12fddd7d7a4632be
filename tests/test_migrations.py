"""Alembic: upgrade → downgrade → upgrade leaves the same schema; both entry points work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg

from themis_pg.db import current_revision, downgrade, migrate

REPO = Path(__file__).resolve().parent.parent


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


def test_upgrade_downgrade_upgrade_same_schema(server):
    dsn = server.create_database("t_migrations")
    try:
        migrate(dsn)
        assert current_revision(dsn) is not None
        first = schema_dump(dsn)
        assert "CREATE TABLE themis.jobs" in first
        downgrade(dsn, "base")
        assert objects(dsn) == set()
        migrate(dsn)
        assert schema_dump(dsn) == first
    finally:
        server.drop_database("t_migrations")


def test_plain_alembic_and_themis_migrate(server):
    dsn = server.create_database("t_alembic_cli")
    try:
        subprocess.run([sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"),
                        "-x", f"dsn={dsn}", "upgrade", "head"], check=True, cwd=REPO,
                       capture_output=True)
        assert "schema themis" in objects(dsn)
        subprocess.run([sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"),
                        "-x", f"dsn={dsn}", "downgrade", "base"], check=True, cwd=REPO,
                       capture_output=True)
        assert objects(dsn) == set()
        done = subprocess.run([sys.executable, "-m", "themis_pg.cli", "--dsn", dsn, "migrate"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert re.search(r"revision head", done.stdout)
        assert "function themis_rag" in objects(dsn)
    finally:
        server.drop_database("t_alembic_cli")
