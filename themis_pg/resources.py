"""Where the SQL files, Alembic revisions and sample corpus live, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
_INSTALLED = _PACKAGE / "_resources"


def _first_existing(name: str) -> Path:
    for base in (_CHECKOUT, _INSTALLED):
        candidate = base / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"themis-pg resource {name!r} not found next to {_PACKAGE}")


def sql_dir() -> Path:
    """The ``sql/`` folder: function bodies and named queries."""
    return _first_existing("sql")


def migrations_dir() -> Path:
    """The Alembic ``migrations/`` folder."""
    return _first_existing("migrations")


def alembic_ini() -> Path:
    return _first_existing("alembic.ini")


def sql_file(name: str) -> str:
    """Text of ``sql/<name>``."""
    return (sql_dir() / name).read_text(encoding="utf-8")


def pl_package_dir() -> Path:
    """The server-side package (``themis_pg/pl``), copied into the server's Python path as
    ``themis_pl``."""
    return _PACKAGE / "pl"


def sample_corpus_dir() -> Path:
    """The sample corpus shipped for the demo and the tests."""
    return _PACKAGE / "data" / "sample_corpus"
