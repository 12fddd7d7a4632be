"""LoRA adapters registered through SQL: models.gguf_header, the themis_admin role.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from themis_pg.migration_support import execute_sql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger(__name__)


def upgrade() -> None:
    execute_sql(op, "schema_0006.sql")
    _record_headers()


def _record_headers() -> None:
    """Record the header of every generation model whose file this machine can read (the
    others keep NULL: themis_lora_register then says to register the model again)."""
    from themis_pg.errors import ThemisError
    from themis_pg.lora.adapter_file import base_model_header

    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT name, path FROM themis.models WHERE kind = 'generation'")).all()
    for name, path in rows:
        try:
            header = base_model_header(Path(path))
        except (OSError, ThemisError) as exc:
            log.warning("model %s: header not recorded (%s)", name, exc)
            continue
        bind.execute(sa.text("UPDATE themis.models SET gguf_header = CAST(:h AS jsonb) "
                             "WHERE name = :n"), {"h": json.dumps(header), "n": name})


def downgrade() -> None:
    execute_sql(op, "schema_0006_down.sql")
