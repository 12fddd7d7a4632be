"""Index snapshots: the tokens that let a restarted worker trust its local matrix file.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from themis_pg.migration_support import execute_sql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    execute_sql(op, "schema_0003.sql")


def downgrade() -> None:
    execute_sql(op, "schema_0003_down.sql")
