"""Rights: GRANTs and row-level security decide what a call uses; the bus leaks nothing."""

from __future__ import annotations

import threading

import psycopg
import pytest

from .helpers import TLS, Call, one, sqlstate_of, wait_until


@pytest.fixture
def rls_db(corpus_db, start_worker):
    """Only documents whose id is a multiple of 3 are visible to themis_user members."""
    start_worker(corpus_db)
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE themis.documents ENABLE ROW LEVEL SECURITY")
        conn.execute("CREATE POLICY only_thirds ON themis.documents FOR SELECT TO themis_user "
                     "USING (id % 3 = 0)")
    return corpus_db


def hidden(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT id, content FROM themis.documents WHERE id % 3 <> 0").fetchall()
    return {r[0] for r in rows}, [r[1] for r in rows]


def test_rls_hides_rows_and_still_returns_k(rls_db, user_role):
    user = user_role(rls_db)
    hidden_ids, hidden_texts = hidden(rls_db)
    with psycopg.connect(user, autocommit=True) as conn:
        rows = conn.execute("SELECT id, content FROM themis_search(%s, 5)", (TLS,)).fetchall()
        result = conn.execute("SELECT themis_rag_json(%s, 4, 8)", (TLS,)).fetchone()[0]
    assert len(rows) == 5
    assert all(r[0] % 3 == 0 for r in rows)
    assert len(result["sources"]) == 4
    assert not {s["id"] for s in result["sources"]} & hidden_ids
    assert not any(s["snippet"] in t for s in result["sources"] for t in hidden_texts
                   if s["snippet"])
    # The admin (no RLS) gets the unrestricted ranking, which does use hidden rows.
    admin_ids = {r[0] for r in psycopg.connect(rls_db, autocommit=True).execute(
        "SELECT id FROM themis_search(%s, 5)", (TLS,))}
    assert admin_ids & hidden_ids
    # Nothing about hidden rows lingers in the bus where the user could read it.
    with psycopg.connect(rls_db, autocommit=True) as conn:
        # a finished search's candidates (which name hidden rows) are cleared when taken;
        # a generation's result holds the answer and token counts only
        leftovers = conn.execute("SELECT count(*) FROM themis.jobs WHERE result IS NOT NULL "
                                 "AND requested_by <> current_user AND kind = 'search'"
                                 ).fetchone()[0]
        contexts = conn.execute("SELECT jsonb_path_query(payload, '$.contexts[*].id')::bigint "
                                "FROM themis.jobs WHERE kind = 'generate'").fetchall()
    assert leftovers == 0
    assert contexts and not {c[0] for c in contexts} & hidden_ids


def test_fewer_visible_rows_than_k(rls_db, user_role):
    with psycopg.connect(rls_db, autocommit=True) as conn:
        conn.execute("DROP POLICY only_thirds ON themis.documents")
        keep = conn.execute("SELECT max(id) FROM themis.documents").fetchone()[0]
        conn.execute(f"CREATE POLICY one_row ON themis.documents FOR SELECT TO themis_user "
                     f"USING (id = {int(keep)})")
    with psycopg.connect(user_role(rls_db), autocommit=True) as conn:
        rows = conn.execute("SELECT id FROM themis_search(%s, 5)", (TLS,)).fetchall()
    assert rows == [(keep,)]


def test_without_select_on_documents_the_call_is_refused(corpus_db, start_worker, user_role):
    start_worker(corpus_db)
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        conn.execute("REVOKE SELECT ON themis.documents FROM themis_user")
    state, message = sqlstate_of(user_role(corpus_db), "SELECT themis_search(%s, 3)", (TLS,))
    assert state == "42501" and "documents" in message


def test_execute_is_only_for_themis_user(rag_db, user_role):
    outsider = user_role(rag_db, member_of="")
    for sql in ("SELECT themis_rag('q', 3)", "SELECT themis_search('q', 3)",
                "SELECT themis_embed('q')", "SELECT themis_generate('q')"):
        state, _ = sqlstate_of(outsider, sql)
        assert state == "42501", sql


def test_a_role_sees_only_its_own_jobs(rag_db, user_role):
    alice, bob = user_role(rag_db), user_role(rag_db)
    with psycopg.connect(alice, autocommit=True) as conn:
        conn.execute("SELECT themis_rag('What does alice ask about TLS?', 2, 8)")
        mine = conn.execute("SELECT payload->>'query', answer FROM themis.jobs").fetchall()
    assert mine and all(q == "What does alice ask about TLS?" for q, _ in mine)
    assert any(a for _, a in mine), "alice should see her own answer"
    with psycopg.connect(bob, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM themis.jobs").fetchone()[0] == 0
    state, _ = sqlstate_of(alice, "SELECT result FROM themis.jobs")
    assert state == "42501"


def as_bus(dsn, sql, params=None):
    """Run ``sql`` with the rights of themis_bus (only the server's own OS user may log in as
    it on the embedded cluster; SET ROLE gives the test the same rights)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET ROLE themis_bus")
        try:
            return None, conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            return exc.sqlstate, str(exc)


def test_the_bus_role_can_do_nothing_else(rag_db):
    for sql in ("SELECT * FROM themis.jobs", "SELECT * FROM themis.documents",
                "SELECT themis_rag('q', 3)", "UPDATE themis.config SET value = '1'",
                "SELECT * FROM themis.config", "SELECT themis.config_value('max_k')"):
        state, _ = as_bus(rag_db, sql)
        assert state == "42501", sql


SUBMIT = ("SELECT job_id FROM themis.bus_submit(%s, %s::jsonb, 'postgres', pg_backend_pid(), "
          "now(), 'themis_reply_x', md5(random()::text), 5)")


@pytest.mark.parametrize(("kind", "payload", "state", "words"), [
    ("search", '{"query": "q", "k": 3, "n": 10000000}', "22023", "n must be between 3 and"),
    ("search", '{"query": "q", "k": 1000, "n": 1000}', "22023", "k must be between 1 and 100"),
    ("search", '{"query": "q", "k": 3}', "22023", "integer 'n'"),
    ("embed", '{"text": ""}', "22023", "non-empty text"),
    ("generate", '{"mode": "raw", "prompt": "p", "max_tokens": 100000}', "22023",
     "max_tokens must be between 1 and 2048"),
    ("generate", '{"mode": "raw", "prompt": "p", "max_tokens": 4, "temperature": 9}', "22023",
     "temperature"),
    ("generate", '{"mode": "rag", "query": "q", "max_tokens": 4, "contexts": {}}', "22023",
     "contexts"),
    ("evil", '{}', "22023", "unknown job kind"),
])
def test_a_bus_login_cannot_exceed_the_limits(rag_db, kind, payload, state, words):
    before = one(rag_db, "SELECT count(*) FROM themis.jobs")
    got, message = as_bus(rag_db, SUBMIT, (kind, payload))
    assert got == state and words in message, message
    assert one(rag_db, "SELECT count(*) FROM themis.jobs") == before


def test_bus_submit_fills_defaults_and_cuts_contexts(rag_db):
    with psycopg.connect(rag_db, autocommit=True) as conn:
        conn.execute("UPDATE themis.config SET value = '10' WHERE key = 'max_context_chars'")
    try:
        got, rows = as_bus(rag_db, SUBMIT, (
            "generate", '{"mode": "rag", "query": "q", "contexts": '
                        '[{"id": 1, "content": "0123456789abcdef"}]}'))
        assert got is None, rows
        payload = one(rag_db, "SELECT payload FROM themis.jobs WHERE id = %s", (rows[0][0],))
        assert payload["max_tokens"] == 256
        assert payload["contexts"][0]["content"] == "0123456789"
    finally:
        with psycopg.connect(rag_db, autocommit=True) as conn:
            conn.execute("UPDATE themis.config SET value = '16000' "
                         "WHERE key = 'max_context_chars'")
            conn.execute("UPDATE themis.jobs SET status = 'cancelled' WHERE status = 'queued'")


def test_the_worker_applies_the_same_caps(rag_db):
    """A job that reached the table some other way (here: inserted by the owner) is failed
    by the worker with the reason, not run."""
    with psycopg.connect(rag_db, autocommit=True) as conn:
        job_id = conn.execute(
            "INSERT INTO themis.jobs (kind, payload, requested_by, caller_pid, caller_started, "
            "reply_channel, reply_token, deadline) SELECT 'search', "
            "'{\"query\": \"q\", \"k\": 3, \"n\": 10000000}', current_user, "
            "pg_backend_pid(), backend_start, 'themis_reply_y', md5(random()::text), "
            "now() + interval '1 minute' FROM pg_stat_activity WHERE pid = pg_backend_pid() "
            "RETURNING id").fetchone()[0]
        conn.execute("NOTIFY themis_jobs, 'search'")
        wait_until(lambda: one(rag_db, "SELECT status FROM themis.jobs WHERE id = %s",
                               (job_id,)) == "failed", 15, "the worker to refuse the job")
    with psycopg.connect(rag_db, autocommit=True) as conn:
        row = conn.execute("SELECT error, error_sqlstate FROM themis.jobs WHERE id = %s",
                           (job_id,)).fetchone()
    assert row is not None
    error, state = row
    assert state == "22023" and "n must be between 3 and 100000" in error
    assert one(rag_db, "SELECT count(*) FROM themis_search(%s, 2)", (TLS,)) == 2


def test_callers_cannot_read_the_bus_dsn(rag_db, user_role):
    user = user_role(rag_db)
    with psycopg.connect(user, autocommit=True) as conn:
        keys = {r[0] for r in conn.execute("SELECT key FROM themis.config")}
        endpoint = conn.execute("SELECT * FROM themis.bus_endpoint()").fetchone()
    assert "bus_dsn" not in keys
    assert not any("password" in str(v) for v in endpoint)


def test_callers_cannot_change_settings_or_inject_sql(rag_db, user_role):
    user = user_role(rag_db)
    state, _ = sqlstate_of(user, "UPDATE themis.config SET value = '100000' WHERE key = 'max_k'")
    assert state == "42501"
    state, _ = sqlstate_of(user, "UPDATE themis.models SET path = '/tmp/x'")
    assert state == "42501"
    evil = "'); DROP TABLE themis.documents; --"
    with psycopg.connect(user, autocommit=True) as conn:
        assert len(conn.execute("SELECT * FROM themis_search(%s, 2)", (evil,)).fetchall()) == 2
    assert one(rag_db, "SELECT count(*) FROM themis.documents") > 0


def test_spoofed_cancel_notifications_are_ignored(rag_db, user_role):
    """NOTIFY needs no privilege: a cancel counts only if the jobs table says so."""
    intruder = user_role(rag_db, member_of="")
    call = Call(rag_db, "SELECT themis_generate('Tell me about lighthouses.', 24)")
    call.start()
    job_id = wait_until(lambda: one(rag_db, "SELECT id FROM themis.jobs WHERE kind = "
                                            "'generate' AND status = 'running'"), 30,
                        "a running generation")
    with psycopg.connect(intruder, autocommit=True) as conn:
        for _ in range(3):
            conn.execute(f"NOTIFY themis_cancel, '{int(job_id)}'")
    call.join(timeout=120)
    assert call.error is None, call.error
    assert one(rag_db, "SELECT status FROM themis.jobs WHERE id = %s", (job_id,)) == "done"


def test_calls_work_after_set_role(rag_db, user_role):
    """Behind a pooler or PostgREST the session user differs from the current user."""
    user = user_role(rag_db)
    role = user.split("user=")[1].split()[0]
    with psycopg.connect(rag_db, autocommit=True) as conn:
        conn.execute(f'SET ROLE "{role}"')
        rows = conn.execute("SELECT id FROM themis_search(%s, 2)", (TLS,)).fetchall()
        jobs = conn.execute("SELECT count(*) FROM themis.jobs").fetchone()[0]
    assert len(rows) == 2 and jobs >= 1


def test_writers_need_no_rights_on_the_change_log(corpus_db, start_worker, user_role):
    start_worker(corpus_db)
    writer = user_role(corpus_db)
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        conn.execute("GRANT INSERT ON themis.documents TO themis_user")
        conn.execute("GRANT USAGE ON SEQUENCE themis.documents_id_seq TO themis_user")
    with psycopg.connect(writer, autocommit=True) as conn:
        doc_id = conn.execute("INSERT INTO themis.documents (content) VALUES "
                              "('The capybara council meets on Tuesdays') RETURNING id"
                              ).fetchone()[0]
        top = conn.execute("SELECT id FROM themis_search('capybara council', 1)").fetchone()
        assert top == (doc_id,)
    state, _ = sqlstate_of(writer, "INSERT INTO themis.changes (doc_id, op) VALUES (1, 'T')")
    assert state == "42501"


def _tenths(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP POLICY only_thirds ON themis.documents")
        conn.execute("CREATE POLICY tenths ON themis.documents FOR SELECT TO themis_user "
                     "USING (id % 10 = 0)")
        return conn.execute("SELECT content FROM themis.documents ORDER BY id LIMIT 1"
                            ).fetchone()[0]


def _copies(dsn, count):
    """``count`` rows with the embedding of the first document: tied scores."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO themis.documents (content, embedding) "
                     "SELECT 'copy ' || g, (SELECT embedding FROM themis.documents "
                     "ORDER BY id LIMIT 1) FROM generate_series(1, %s) g", (count,))


def test_rls_paging_through_tied_scores(rls_db, user_role):
    """150 rows tie at the top score, more than the first round's candidates: the cut falls
    inside the tie, and later rounds must neither repeat nor skip tied rows."""
    query = _tenths(rls_db)
    _copies(rls_db, 150)
    with psycopg.connect(rls_db, autocommit=True) as conn:
        tied = {r[0] for r in conn.execute(
            "SELECT id FROM themis.documents WHERE embedding = (SELECT embedding FROM "
            "themis.documents ORDER BY id LIMIT 1)")}
    visible_tied = {i for i in tied if i % 10 == 0}
    assert len(tied) > 4 * 20 and len(visible_tied) < 20
    with psycopg.connect(user_role(rls_db), autocommit=True) as conn:
        rows = conn.execute("SELECT id, score FROM themis_search(%s, 20)", (query,)).fetchall()
        result = conn.execute("SELECT themis_rag_json(%s, 20, 1)", (query,)).fetchone()[0]
    ids = [r[0] for r in rows]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert all(i % 10 == 0 for i in ids)
    assert visible_tied <= set(ids), "a tied visible row was skipped"
    assert [s for _, s in rows] == sorted((s for _, s in rows), reverse=True)
    assert result["timings"]["search_rounds"] > 1, "the test must page"
    assert [s["id"] for s in result["sources"]] == ids


def test_rls_paging_with_concurrent_inserts(rls_db, user_role):
    query = _tenths(rls_db)
    user = user_role(rls_db)
    with psycopg.connect(rls_db, autocommit=True) as conn:
        before = conn.execute("SELECT id FROM themis.documents WHERE id % 10 = 0").fetchall()
    before_ids = {r[0] for r in before}
    stop = threading.Event()

    def insert_forever():
        with psycopg.connect(rls_db, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO themis.documents (content, embedding) SELECT "
                             "'late ' || clock_timestamp(), embedding FROM themis.documents "
                             "WHERE id IN (SELECT id FROM themis.documents ORDER BY random() "
                             "LIMIT 1)")

    writer = threading.Thread(target=insert_forever, daemon=True)
    writer.start()
    try:
        for _ in range(5):
            with psycopg.connect(user, autocommit=True) as conn:
                rows = conn.execute("SELECT id, score FROM themis_search(%s, 15)",
                                    (query,)).fetchall()
                # the same ranking as seen by the admin, for the rows that existed before
                with psycopg.connect(rls_db, autocommit=True) as admin:
                    ranked = admin.execute(
                        "SELECT id, score FROM themis_search(%s, 100)", (query,)).fetchall()
            ids = [r[0] for r in rows]
            assert len(ids) == 15 and len(set(ids)) == 15, ids
            assert all(i % 10 == 0 for i in ids)
            scores = [s for _, s in rows]
            assert scores == sorted(scores, reverse=True)
            must = {i for i, s in ranked if i in before_ids and s > scores[-1] + 1e-4}
            assert must <= set(ids), f"rows skipped: {must - set(ids)}"
    finally:
        stop.set()
        writer.join(timeout=10)
