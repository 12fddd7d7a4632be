"""Streamed generation: the pieces of an answer on their way to the caller (themis.job_pieces).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from themis_pg.migration_support import execute_sql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    execute_sql(op, "schema_0004.sql")


def downgrade() -> None:
    execute_sql(op, "schema_0004_down.sql")
