"""Bad input gets a PostgreSQL error with a clear message and fitting SQLSTATE; the worker
keeps serving."""

from __future__ import annotations

import psycopg
import pytest

from .helpers import TLS, one, sqlstate_of, themis


@pytest.mark.parametrize(("sql", "params", "state", "words"), [
    ("SELECT themis_rag(NULL, 3)", None, "22004", "query must not be NULL"),
    ("SELECT themis_rag('', 3)", None, "22023", "must not be empty"),
    ("SELECT themis_rag('   ', 3)", None, "22023", "must not be empty"),
    ("SELECT themis_rag(%s, 0)", (TLS,), "22023", "k must be at least 1"),
    ("SELECT themis_rag(%s, -4)", (TLS,), "22023", "k must be at least 1"),
    ("SELECT themis_rag(%s, 101)", (TLS,), "22023", "k must be between"),
    ("SELECT themis_rag(%s, NULL)", (TLS,), "22004", "k must not be NULL"),
    ("SELECT themis_rag(%s, 3)", ("x" * 4001,), "54000", "the limit is 4000"),
    ("SELECT themis_rag(%s, 3, 0)", (TLS,), "22023", "max_tokens must be at least 1"),
    ("SELECT themis_rag(%s, 3, 100000)", (TLS,), "22023", "max_tokens must be between"),
    ("SELECT themis_rag(%s, 3, 8, -1)", (TLS,), "22023", "temperature must be between"),
    ("SELECT themis_rag(%s, 3, 8, 'NaN')", (TLS,), "22023", "temperature must be between"),
    ("SELECT themis_rag(%s, 3, 8, 0, 0)", (TLS,), "22023", "timeout_s must be between"),
    ("SELECT themis_search(NULL, 3)", None, "22004", "query must not be NULL"),
    ("SELECT themis_search(%s, 1000)", (TLS,), "22023", "k must be between"),
    ("SELECT themis_embed(NULL)", None, "22004", "input must not be NULL"),
    ("SELECT themis_generate('')", None, "22023", "prompt must not be empty"),
])
def test_bad_arguments(rag_db, sql, params, state, words):
    got_state, message = sqlstate_of(rag_db, sql, params)
    assert got_state == state, message
    assert words in message
    first_line = message.splitlines()[0]
    assert not first_line.startswith(("plpy", "spiexceptions")), first_line


def test_worker_still_serves_after_bad_input(rag_db):
    assert one(rag_db, "SELECT count(*) FROM themis_search(%s, 2)", (TLS,)) == 2


def test_query_model_mismatch_is_a_clear_error(corpus_db, start_worker):
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        conn.execute("UPDATE themis.corpus SET embedding_model = 'some-other-model'")
    start_worker(corpus_db)
    state, message = sqlstate_of(corpus_db, "SELECT themis_search(%s, 2)", (TLS,))
    assert state == "55000"
    assert "embedded with some-other-model" in message and "reembed" in message
    assert one(corpus_db, "SELECT themis_generate('Say hi.', 4)").strip()


def test_ingest_invalid_utf8_is_a_clear_cli_error(migrated_db, tmp_path):
    bad = tmp_path / "broken.txt"
    bad.write_bytes(b"fine start \xff\xfe then garbage")
    done = themis("ingest", "--no-progress", str(bad), dsn=migrated_db)
    assert done.returncode != 0
    assert "broken.txt" in done.stderr and "UTF-8" in done.stderr
    assert "Traceback" not in done.stderr
    assert one(migrated_db, "SELECT count(*) FROM themis.documents") == 0


def test_missing_model_file_is_a_clear_error(migrated_db, tmp_path):
    done = themis("models", "register", "ghost", "generation", str(tmp_path / "nope.gguf"),
                  dsn=migrated_db)
    assert done.returncode != 0 and "nope.gguf" in done.stderr
    assert "Traceback" not in done.stderr
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute("UPDATE themis.models SET path = %s WHERE kind = 'generation'",
                     (str(tmp_path / "moved.gguf"),))
    done = themis("worker", dsn=migrated_db)
    assert done.returncode != 0 and "moved.gguf" in done.stderr
    assert "Traceback" not in done.stderr
