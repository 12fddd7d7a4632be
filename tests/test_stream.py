"""Streaming through SQL and the Python client, against a real database and worker: the
first piece arrives before the answer is complete, the pieces make the answer, closing the
cursor cancels the generation, bad input is a clear error before any row."""

from __future__ import annotations

import time

import psycopg
import pytest

from themis_pg.client import stream_rag

from .helpers import one, sqlstate_of

TLS = "How do I rotate TLS keys?"


def _last_generate_job(dsn: str) -> tuple[int, str, str | None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT id, status, answer FROM themis.jobs WHERE kind = 'generate' "
                           "ORDER BY id DESC LIMIT 1").fetchone()
    assert row is not None
    return int(row[0]), str(row[1]), row[2]


def test_a_cursor_gets_the_first_piece_before_the_answer_is_done(rag_db):
    with psycopg.connect(rag_db) as conn:
        conn.execute("DECLARE c CURSOR FOR SELECT themis_rag_stream(%s, 3, max_tokens => 48)",
                     (TLS,))
        first = conn.execute("FETCH 1 FROM c").fetchone()
        assert first is not None and first[0]
        _, status, _ = _last_generate_job(rag_db)
        assert status == "running", "the first piece came only after the whole answer"
        pieces = [first[0]] + [r[0] for r in conn.execute("FETCH ALL FROM c").fetchall()]
        conn.execute("CLOSE c")
        conn.commit()
    job_id, status, answer = _last_generate_job(rag_db)
    assert status == "done"
    assert "".join(pieces).strip() == answer
    assert one(rag_db, "SELECT count(*) FROM themis.job_pieces WHERE job_id = %s",
               (job_id,)) == 0, "pieces left behind"


def test_python_client_iterates_pieces_and_stopping_cancels(rag_db):
    with psycopg.connect(rag_db) as conn:
        pieces = list(stream_rag(conn, TLS, 3, max_tokens=24))
    assert pieces and "".join(pieces).strip() == _last_generate_job(rag_db)[2]
    with psycopg.connect(rag_db) as conn:
        stream = stream_rag(conn, TLS, 3, max_tokens=400)
        assert next(stream)
        stream.close()  # the caller stops reading: the cursor closes, the job is cancelled
        deadline = time.monotonic() + 10
        while _last_generate_job(rag_db)[1] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
    _, status, _ = _last_generate_job(rag_db)
    assert status == "cancelled"
    assert one(rag_db, "SELECT count(*) FROM themis_rag_stream(%s, 2, max_tokens => 8)",
               (TLS,)) >= 1, "the worker must keep serving after a cancel"


@pytest.mark.parametrize(("sql", "state"), [
    ("SELECT themis_rag_stream(NULL, 3)", "22004"),
    ("SELECT themis_rag_stream('q', 0)", "22023"),
    ("SELECT themis_rag_stream('q', 3, max_tokens => -1)", "22023"),
    ("SELECT themis_rag_stream('q', 3, filter => '[1]'::jsonb)", "22023"),
])
def test_bad_input_is_an_error_before_any_row(rag_db, sql, state):
    got, message = sqlstate_of(rag_db, sql)
    assert got == state, message


def test_concurrent_calls_share_decode_steps_and_show_in_stats(rag_db):
    """Four themis_rag calls at once run in one decode loop: the worker's figures (heartbeat,
    themis_stats()) count them and a mean batch above one."""
    from .helpers import Call

    calls = [Call(rag_db, "SELECT themis_rag(%s, 2, 24)", (TLS,)) for _ in range(4)]
    for c in calls:
        c.start()
    for c in calls:
        c.join(timeout=300)
        assert c.error is None, c.error
    time.sleep(1.2)  # a heartbeat carries the figures
    stats = one(rag_db, "SELECT themis_stats()")
    gen = stats["workers"][0]["stats"]["generation"]
    assert gen["engine"] == "continuous batching" and gen["finished"] >= 4
    assert gen["mean_batch"] > 1.0, gen
    assert gen["tokens_out"] > 0 and gen["kv"]["bytes_per_token"] > 0
