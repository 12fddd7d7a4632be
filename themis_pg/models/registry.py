"""The ``themis.models`` table: which GGUF files the worker may load, and the default per kind.

A row names a model, its kind (``generation`` or ``embedding``), the absolute path of its GGUF
file on the worker's machine, the file's sha256 (checked before the file is loaded, by
:func:`~themis_pg.models.verify.verify_registered_model`) and free-form ``params`` (for
embeddings: ``dim``, ``pooling``, ``max_tokens``).  At most one row per kind has
``is_default``; a unique partial index enforces it, and :func:`register_model` moves the flag
inside one transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, get_args

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from themis_pg.errors import InvalidInput, ModelNotFound
from themis_pg.lora.adapter_file import base_model_header
from themis_pg.models.fetch import ModelKind, ensure_default_models, sha256_file, verify_model_file

__all__ = [
    "ModelRecord",
    "get_model",
    "is_gguf",
    "list_models",
    "register_defaults",
    "register_model",
]

_GGUF_MAGIC = b"GGUF"
_KINDS: tuple[str, ...] = get_args(ModelKind)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
_COLUMNS = "name, kind, path, sha256, params, is_default, created_at"
# gguf_header is written, never read back here: themis_lora_register reads it in the server

_CLEAR_DEFAULT = """
UPDATE themis.models SET is_default = false
 WHERE kind = %(kind)s AND is_default AND name <> %(name)s
"""
# Re-registering the current default without default=True keeps it the default.
_UPSERT = f"""
INSERT INTO themis.models AS m (name, kind, path, sha256, params, is_default, gguf_header)
VALUES (%(name)s, %(kind)s, %(path)s, %(sha256)s, %(params)s, %(is_default)s, %(gguf_header)s)
ON CONFLICT (name) DO UPDATE
   SET kind = EXCLUDED.kind, path = EXCLUDED.path, sha256 = EXCLUDED.sha256,
       params = EXCLUDED.params, gguf_header = EXCLUDED.gguf_header,
       is_default = EXCLUDED.is_default OR (m.is_default AND m.kind = EXCLUDED.kind)
RETURNING {_COLUMNS}
"""
_BY_NAME = f"SELECT {_COLUMNS} FROM themis.models WHERE name = %(name)s"
_DEFAULT_OF_KIND = f"SELECT {_COLUMNS} FROM themis.models WHERE kind = %(kind)s AND is_default"
_ALL = f"SELECT {_COLUMNS} FROM themis.models ORDER BY kind, name"


@dataclass(frozen=True)
class ModelRecord:
    """One row of ``themis.models``."""

    name: str
    kind: ModelKind
    path: Path
    sha256: str | None
    params: dict[str, Any] = field(default_factory=dict)
    is_default: bool = False
    created_at: datetime | None = None


def _record(row: dict[str, Any]) -> ModelRecord:
    return ModelRecord(
        name=row["name"],
        kind=row["kind"],
        path=Path(row["path"]),
        sha256=row["sha256"],
        params=dict(row["params"] or {}),
        is_default=bool(row["is_default"]),
        created_at=row["created_at"],
    )


def _check_kind(kind: str) -> ModelKind:
    if kind not in _KINDS:
        raise InvalidInput(f"model kind must be one of {', '.join(_KINDS)}, not {kind!r}")
    return kind  # type: ignore[return-value]


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic bytes."""
    try:
        with path.open("rb") as fh:
            return fh.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC
    except OSError:
        return False


def register_model(
    conn: psycopg.Connection[Any],
    name: str,
    kind: str,
    path: Path | str,
    *,
    sha256: str | None = None,
    params: dict[str, Any] | None = None,
    default: bool = False,
) -> ModelRecord:
    """Add or replace (by name) a model and return its row.

    The file must exist and be a GGUF; its sha256 is computed, or checked when given
    (:class:`ModelNotFound` on mismatch).  The path is stored absolute.  ``default=True``
    makes it the default of its kind, clearing the previous default in the same transaction;
    ``default=False`` leaves an existing default flag of the same kind alone.  Raises
    :class:`InvalidInput` for a bad name, kind or non-GGUF file.
    """
    if not _NAME_RE.match(name):
        raise InvalidInput(
            f"model name {name!r} must be 1-128 letters, digits or ._:+- (starting alphanumeric)"
        )
    kind = _check_kind(kind)
    file = Path(path).expanduser().resolve()
    verify_model_file(file, None)
    if not is_gguf(file):
        raise InvalidInput(f"{file} is not a GGUF file (llama.cpp loads only GGUF models)")
    if sha256 is None:
        digest = sha256_file(file)
    else:
        digest = sha256.lower()
        verify_model_file(file, digest)

    values = {
        "name": name,
        "kind": kind,
        "path": str(file),
        "sha256": digest,
        "params": Jsonb(params or {}),
        "is_default": default,
        # what checking a LoRA adapter for it needs (themis_lora_register, in the server)
        "gguf_header": Jsonb(base_model_header(file)) if kind == "generation" else None,
    }
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        if default:
            # Serialise concurrent default changes (readers are not blocked).
            cur.execute("LOCK TABLE themis.models IN SHARE ROW EXCLUSIVE MODE")
            cur.execute(_CLEAR_DEFAULT, values)
        cur.execute(_UPSERT, values)
        row = cur.fetchone()
    if row is None:  # pragma: no cover - INSERT ... RETURNING always returns the row
        raise RuntimeError(f"registering model {name!r} returned no row")
    return _record(row)


def get_model(conn: psycopg.Connection[Any], kind: str, name: str | None = None) -> ModelRecord:
    """The model called ``name``, or the default model of ``kind`` when ``name`` is None.

    Raises :class:`ModelNotFound` when there is no such model, or it is of another kind.  The
    row is only read: pass it to :func:`~themis_pg.models.verify.verify_registered_model`
    before loading its file.
    """
    kind = _check_kind(kind)
    with conn.cursor(row_factory=dict_row) as cur:
        if name is None:
            cur.execute(_DEFAULT_OF_KIND, {"kind": kind})
        else:
            cur.execute(_BY_NAME, {"name": name})
        row = cur.fetchone()
    if row is None:
        if name is None:
            raise ModelNotFound(
                f"no default {kind} model is registered",
                hint="run `themis models fetch` to register the default models",
            )
        raise ModelNotFound(
            f"{kind} model {name!r} is not registered",
            hint="see `themis models list`, or register it with its GGUF path",
        )
    record = _record(row)
    if record.kind != kind:
        raise ModelNotFound(f"model {name!r} has kind {record.kind!r}, not {kind!r}")
    return record


def list_models(conn: psycopg.Connection[Any]) -> list[ModelRecord]:
    """All registered models, by kind then name."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_ALL)
        return [_record(row) for row in cur.fetchall()]


def register_defaults(conn: psycopg.Connection[Any], cache_dir: Path) -> list[ModelRecord]:
    """Fetch the default models into ``cache_dir`` and register both as defaults.

    The download (if any) happens before the transaction opens, so no lock is held meanwhile.
    """
    local = ensure_default_models(cache_dir)
    with conn.transaction():
        return [
            register_model(
                conn, m.name, m.kind, m.path, sha256=m.sha256, params=m.params, default=True
            )
            for m in local
        ]
