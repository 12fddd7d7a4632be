"""Initial schema: documents, change log, models, job bus, workers.

Tables only: the SQL functions are applied after the last revision of a run
(themis_pg.migration_support.sync_functions).

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from themis_pg.migration_support import check_server_package, drop_marked_functions, execute_sql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("themis",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    check_server_package(op)
    execute_sql(op, "schema_0001.sql")


def downgrade() -> None:
    drop_marked_functions(op)
    execute_sql(op, "drop_all.sql")
