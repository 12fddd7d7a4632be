"""Initial schema: documents, change log, models, job bus, workers, SQL functions.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from themis_pg.migration_support import apply_functions, check_server_package, execute_sql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("themis",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    check_server_package(op)
    execute_sql(op, "schema_0001.sql")
    apply_functions(op)


def downgrade() -> None:
    execute_sql(op, "drop_all.sql")
