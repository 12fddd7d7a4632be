"""The documents waiting for an embedding, indexed (a cold load's question without a scan).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from themis_pg.migration_support import execute_sql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    execute_sql(op, "schema_0007.sql")


def downgrade() -> None:
    execute_sql(op, "schema_0007_down.sql")
