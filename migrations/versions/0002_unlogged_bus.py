"""The bus without WAL (unlogged jobs and workers), payload limits, bus_dsn off themis.config.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from themis_pg.migration_support import execute_sql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    execute_sql(op, "schema_0002.sql")


def downgrade() -> None:
    execute_sql(op, "schema_0002_down.sql")
