"""Rights: GRANTs and row-level security decide what a call uses; the bus leaks nothing."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

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
        leftovers = conn.execute("SELECT count(*) FROM themis.jobs WHERE result IS NOT NULL "
                                 "AND requested_by <> current_user").fetchone()[0]
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


def test_the_bus_role_can_do_nothing_else(rag_db):
    bus = make_conninfo(rag_db, user="themis_bus")
    for sql in ("SELECT * FROM themis.jobs", "SELECT * FROM themis.documents",
                "SELECT themis_rag('q', 3)", "UPDATE themis.config SET value = '1'",
                "SELECT * FROM themis.config"):
        state, _ = sqlstate_of(bus, sql)
        assert state == "42501", sql


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
