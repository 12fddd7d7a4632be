"""A Python client for what plain SQL cannot iterate by itself: a streamed answer.

``stream_rag`` yields the pieces of ``themis_rag_stream`` as the worker generates them: it reads
the set-returning function through a server-side cursor, one row per FETCH, in the select list
(in FROM, PostgreSQL would collect every row before the first).  Stopping the iteration early
closes the cursor, which cancels the generation.

    with psycopg.connect(dsn) as conn:
        for piece in stream_rag(conn, "How do I rotate TLS keys?", 5):
            print(piece, end="", flush=True)
"""

from __future__ import annotations

import secrets
from collections.abc import Generator
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

__all__ = ["stream_rag"]

_STREAM_SQL = ("SELECT themis_rag_stream(%s, %s, max_tokens => %s, temperature => %s, "
               "timeout_s => %s, filter => %s)")


def stream_rag(conn: psycopg.Connection[Any], query: str, k: int = 5, *,
               max_tokens: int | None = None, temperature: float = 0.0,
               timeout_s: float | None = None,
               filter: dict[str, Any] | None = None) -> Generator[str, None, None]:
    """The answer to ``query`` from the top ``k`` documents the connection's role may read,
    piece by piece.  Runs in a transaction of its own on ``conn`` (a server-side cursor needs
    one); errors are psycopg errors with the SQL function's SQLSTATE."""
    name = f"themis_stream_{secrets.token_hex(6)}"
    with conn.transaction(), conn.cursor(name=name) as cur:
        cur.itersize = 1  # one FETCH per piece: each arrives when the worker made it
        cur.execute(_STREAM_SQL, (query, k, max_tokens, temperature, timeout_s,
                                  None if filter is None else Jsonb(filter)))
        for (piece,) in cur:
            yield str(piece)
