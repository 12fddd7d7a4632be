"""Metadata filters: jsonb containment on documents.metadata, applied before top-k."""

from __future__ import annotations

import psycopg
import pytest

from .helpers import TLS, one, sqlstate_of


@pytest.fixture(scope="module")
def tagged_db(rag_db):
    """Seven documents tagged lang=de, the rest lang=en."""
    with psycopg.connect(rag_db, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM themis.documents ORDER BY id")]
        german = ids[::10][:7]
        conn.execute("UPDATE themis.documents SET metadata = metadata || "
                     "CASE WHEN id = ANY(%s) THEN '{\"lang\": \"de\"}'::jsonb "
                     "ELSE '{\"lang\": \"en\"}'::jsonb END", (german,))
    return rag_db, set(german)


def test_filter_returns_k_matching_rows(tagged_db):
    dsn, german = tagged_db
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT id, metadata FROM themis_search(%s, 5, "
                            "filter => '{\"lang\": \"de\"}')", (TLS,)).fetchall()
        unfiltered = conn.execute("SELECT id FROM themis_search(%s, 5)", (TLS,)).fetchall()
    assert len(rows) == 5 and {r[0] for r in rows} <= german
    assert all(r[1]["lang"] == "de" for r in rows)
    assert {r[0] for r in unfiltered} - german, "the filter must change the answer"


def test_fewer_rows_only_when_fewer_match(tagged_db):
    dsn, german = tagged_db
    assert one(dsn, "SELECT count(*) FROM themis_search(%s, 20, filter => "
                    "'{\"lang\": \"de\"}')", (TLS,)) == len(german)
    assert one(dsn, "SELECT count(*) FROM themis_search(%s, 5, filter => "
                    "'{\"lang\": \"fr\"}')", (TLS,)) == 0


def test_filter_on_rag_and_read_your_writes(tagged_db):
    dsn, german = tagged_db
    with psycopg.connect(dsn, autocommit=True) as conn:
        new_id = conn.execute(
            "INSERT INTO themis.documents (content, metadata, embedding) SELECT content, "
            "'{\"lang\": \"it\", \"team\": \"ops\"}', embedding FROM themis.documents "
            "ORDER BY id LIMIT 1 RETURNING id").fetchone()[0]
        found = conn.execute("SELECT id FROM themis_search(%s, 3, filter => "
                             "'{\"lang\": \"it\"}')", (TLS,)).fetchall()
        result = conn.execute("SELECT themis_rag_json(%s, 3, 4, filter => "
                              "'{\"lang\": \"de\"}')", (TLS,)).fetchone()[0]
    assert found == [(new_id,)]
    assert result["sources"] and {s["id"] for s in result["sources"]} <= german
    assert all(s["metadata"]["lang"] == "de" for s in result["sources"])


@pytest.mark.parametrize("bad", ["[1, 2]", "\"de\"", "3"])
def test_a_filter_that_is_not_an_object_is_refused(tagged_db, bad):
    dsn, _ = tagged_db
    state, message = sqlstate_of(dsn, "SELECT themis_search(%s, 3, filter => %s::jsonb)",
                                 (TLS, bad))
    assert state == "22023" and "filter must be a jsonb object" in message


def test_a_cached_filter_sees_a_metadata_only_change_at_the_next_call(tagged_db):
    """The worker keeps each filter's matches between calls (worker/filter_cache.py); an
    UPDATE of metadata alone (no new embedding) must still reach the very next call."""
    dsn, german = tagged_db
    count = "SELECT count(*) FROM themis_search(%s, 50, filter => '{\"lang\": \"de\"}')"
    assert one(dsn, count, (TLS,)) == len(german)
    assert one(dsn, count, (TLS,)) == len(german)  # served from the cache
    with psycopg.connect(dsn, autocommit=True) as conn:
        moved = conn.execute(
            "UPDATE themis.documents SET metadata = metadata || '{\"lang\": \"de\"}' "
            "WHERE id = (SELECT min(id) FROM themis.documents WHERE metadata->>'lang' = 'en') "
            "RETURNING id").fetchone()[0]
        try:
            rows = conn.execute("SELECT id FROM themis_search(%s, 50, filter => "
                                "'{\"lang\": \"de\"}')", (TLS,)).fetchall()
            assert {r[0] for r in rows} == german | {moved}
        finally:
            conn.execute("UPDATE themis.documents SET metadata = metadata || "
                         "'{\"lang\": \"en\"}' WHERE id = %s", (moved,))
        assert one(dsn, count, (TLS,)) == len(german)
