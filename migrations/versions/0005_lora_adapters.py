"""LoRA adapters as table rows (themis.lora_adapters, themis.lora_adapter_chunks).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from themis_pg.migration_support import execute_sql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    execute_sql(op, "schema_0005.sql")


def downgrade() -> None:
    execute_sql(op, "schema_0005_down.sql")
