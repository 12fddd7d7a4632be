"""End to end: SQL call → job bus → real worker → llama.cpp → answer with its sources."""

from __future__ import annotations

import time

import psycopg
import pytest

from .helpers import TLS, Call, one, sample_questions, source_names, sqlstate_of

QUESTIONS = sample_questions()


def test_rag_answers_with_the_expected_source(rag_db):
    first = QUESTIONS[0]
    assert first["question"] == "How do I rotate TLS keys?"
    answer = one(rag_db, "SELECT themis_rag(%s, 3)", (first["question"],))
    assert isinstance(answer, str) and answer.strip()
    result = one(rag_db, "SELECT themis_rag_json(%s, 3, 32)", (first["question"],))
    assert first["source"] in source_names(result)
    assert len(result["sources"]) == 3
    scores = [s["score"] for s in result["sources"]]
    assert scores == sorted(scores, reverse=True)
    assert result["model"] == "smollm2-135m-instruct"
    assert result["embedding_model"] == "all-minilm-l6-v2"
    assert result["usage"]["completion_tokens"] <= 32
    assert result["timings"]["total_ms"] > 0


def test_search_ranks_the_right_document_first_for_most_questions(rag_db):
    hits = 0
    for q in QUESTIONS:
        with psycopg.connect(rag_db, autocommit=True) as conn:
            rows = conn.execute("SELECT id, score, content, metadata FROM themis_search(%s, 3)",
                                (q["question"],)).fetchall()
            sources = [r[0] for r in conn.execute(
                "SELECT s.uri FROM themis.documents d JOIN themis.sources s "
                "ON s.id = d.source_id WHERE d.id = ANY(%s)", ([r[0] for r in rows],))]
        assert len(rows) == 3
        hits += any(s.endswith(q["source"]) for s in sources)
    assert hits >= 0.8 * len(QUESTIONS), f"only {hits}/{len(QUESTIONS)} questions found their doc"


def test_sixteen_concurrent_sessions_get_their_own_sources(rag_db):
    picked = (QUESTIONS * 2)[:16]
    # Generation is one request at a time until the batching engine lands (16 x ~4.5 s of
    # prompt processing on 2 cores): the timeout leaves room for a busy machine.
    calls = [Call(rag_db, "SELECT themis_rag_json(%s, 3, 8, timeout_s => 600)",
                  (q["question"],)) for q in picked]
    for c in calls:
        c.start()
    for c in calls:
        c.join(timeout=600)
    for q, c in zip(picked, calls, strict=True):
        assert c.error is None, c.error
        # Each session's sources are those of its own question, not a neighbour's.
        with psycopg.connect(rag_db, autocommit=True) as conn:
            rows = conn.execute("SELECT id FROM themis_search(%s, 3)", (q["question"],)).fetchall()
        assert [s["id"] for s in c.result["sources"]] == [r[0] for r in rows]


def test_embed_returns_the_model_vector(rag_db, embedder):
    text = "rotate the signing keys"
    vec = one(rag_db, "SELECT themis_embed(%s)::text", (text,))
    values = [float(x) for x in vec.strip("[]").split(",")]
    assert len(values) == embedder.dim
    want = embedder.embed([text])[0]
    assert max(abs(a - b) for a, b in zip(values, want, strict=True)) < 1e-4


def test_generate_raw_prompt(rag_db):
    out = one(rag_db, "SELECT themis_generate('Say hello.', 8)")
    assert isinstance(out, str) and out.strip()


@pytest.mark.parametrize("how", ["ingest-style insert", "plain insert without embedding"])
def test_read_your_writes(rag_db, embedder, how):
    marker = f"The quokka protocol {how.split()[0]} requires a purple lanyard at the north gate"
    with psycopg.connect(rag_db, autocommit=True) as conn:
        if how.startswith("plain"):
            doc_id = conn.execute("INSERT INTO themis.documents (content) VALUES (%s) "
                                  "RETURNING id", (marker,)).fetchone()[0]
        else:
            vec = "[" + ",".join(f"{x:.7g}" for x in embedder.embed([marker])[0]) + "]"
            doc_id = conn.execute("INSERT INTO themis.documents (content, embedding) "
                                  "VALUES (%s, %s) RETURNING id", (marker, vec)).fetchone()[0]
        # Committed: the very next call must find it.
        top = conn.execute("SELECT id FROM themis_search(%s, 1)",
                           ("quokka protocol purple lanyard north gate",)).fetchone()[0]
        assert top == doc_id
        conn.execute("DELETE FROM themis.documents WHERE id = %s", (doc_id,))
        ids = [r[0] for r in conn.execute("SELECT id FROM themis_search(%s, 5)",
                                          ("quokka protocol purple lanyard",))]
        assert doc_id not in ids


def test_themis_stats_reports_the_index_for_monitors_only(rag_db, user_role):
    assert one(rag_db, "SELECT count(*) FROM themis_search(%s, 2)", (TLS,)) == 2
    time.sleep(1.2)  # a heartbeat carries the figures
    stats = one(rag_db, "SELECT themis_stats()")
    (worker,) = stats["workers"]
    index = worker["stats"]["index"]
    assert worker["stats"]["index_size"] == one(rag_db, "SELECT count(*) FROM themis.documents")
    assert index["device"] == "cpu" and index["dtype"] == "float32" and index["bytes"] > 0
    searches = worker["stats"]["searches"]
    assert searches["queries"] >= 1
    assert searches["embed_total_ms"] > 0 and searches["total_ms"] > 0  # where the time went
    assert searches["uncertified_queries"] == 0  # the NumPy store is exact in one pass
    state, _ = sqlstate_of(user_role(rag_db), "SELECT themis_stats()")
    assert state == "42501"
    monitor = user_role(rag_db, member_of="pg_monitor")
    assert one(monitor, "SELECT themis_stats()")["workers"]
