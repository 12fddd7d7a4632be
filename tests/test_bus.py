"""Job-bus properties: no hang, no lost or duplicated work, cancellation, isolation levels."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psycopg

from .helpers import LONG_PROMPT, TLS, Call, one, sqlstate_of, wait_until


def job_row(dsn, job_id):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT status, attempts, worker_id, error FROM themis.jobs "
                            "WHERE id = %s", (job_id,)).fetchone()


def running_job(dsn, kind="generate"):
    return one(dsn, "SELECT id FROM themis.jobs WHERE kind = %s AND status = 'running' "
                    "ORDER BY id DESC LIMIT 1", (kind,))


def newest_job(dsn, kind):
    return one(dsn, "SELECT id FROM themis.jobs WHERE kind = %s ORDER BY id DESC LIMIT 1",
               (kind,))


def test_no_worker_fails_fast_with_a_clear_error(corpus_db):
    started = time.monotonic()
    state, message = sqlstate_of(corpus_db, "SELECT themis_rag(%s, 3)", (TLS,))
    assert time.monotonic() - started < 2
    assert state == "55000"
    assert "no themis worker is running" in message
    assert one(corpus_db, "SELECT count(*) FROM themis.jobs") == 0


def test_queue_full_fails_at_once(corpus_db, start_worker):
    start_worker(corpus_db)
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        conn.execute("UPDATE themis.config SET value = '0' WHERE key = 'max_queue_depth'")
    state, message = sqlstate_of(corpus_db, "SELECT themis_rag(%s, 3)", (TLS,))
    assert state == "53000" and "queue is full" in message


def test_repeatable_read_serializable_and_rolled_back_callers(rag_db):
    for level in ("REPEATABLE READ", "SERIALIZABLE"):
        with psycopg.connect(rag_db) as conn:
            conn.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
            conn.execute("SELECT count(*) FROM themis.documents")  # snapshot taken now
            rows = conn.execute("SELECT id FROM themis_search(%s, 3)", (TLS,)).fetchall()
            answer = conn.execute("SELECT themis_rag(%s, 2, 8)", (TLS,)).fetchone()[0]
            conn.commit()
        assert len(rows) == 3 and answer.strip()
    before = one(rag_db, "SELECT max(id) FROM themis.jobs")
    with psycopg.connect(rag_db) as conn:
        conn.execute("SELECT themis_rag(%s, 2, 8)", (TLS,))
        conn.rollback()
    with psycopg.connect(rag_db, autocommit=True) as conn:
        states = conn.execute("SELECT status FROM themis.jobs WHERE id > %s", (before,)).fetchall()
    assert states and {s for (s,) in states} == {"done"}, "a rolled-back call left a live job"


def test_statement_timeout_ends_the_call_and_cancels_the_job(corpus_db, start_worker):
    worker = start_worker(corpus_db)
    worker.proc.send_signal(signal.SIGSTOP)  # alive on record, but serves nothing
    try:
        call = Call(corpus_db, "SELECT themis_generate('hello', 8)",
                    setup="SET statement_timeout = '700ms'")
        call.start()
        call.join(timeout=10)
        assert not call.is_alive()
        assert call.error is not None and call.error.sqlstate == "57014"
        assert call.elapsed < 3
        status, *_ = job_row(corpus_db, newest_job(corpus_db, "generate"))
        assert status == "cancelled"
    finally:
        worker.proc.send_signal(signal.SIGCONT)


def test_own_timeout_parameter(corpus_db, start_worker):
    worker = start_worker(corpus_db)
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        state, message = sqlstate_of(corpus_db, "SELECT themis_generate('hi', 8, 0, 0.5)")
        assert state == "57014" and "timed out after 0.5 s" in message
        assert job_row(corpus_db, newest_job(corpus_db, "generate"))[0] == "cancelled"
    finally:
        worker.proc.send_signal(signal.SIGCONT)


def test_pg_cancel_backend_stops_a_running_generation(corpus_db, start_worker):
    start_worker(corpus_db)
    call = Call(corpus_db, "SELECT themis_generate(%s, 1500)", (LONG_PROMPT,))
    call.start()
    job_id = wait_until(lambda: running_job(corpus_db), 30, "the generation to start")
    time.sleep(0.5)
    assert one(corpus_db, "SELECT pg_cancel_backend(%s)", (call.pid,))
    call.join(timeout=10)
    assert not call.is_alive() and call.error is not None
    assert call.error.sqlstate == "57014"
    assert job_row(corpus_db, job_id)[0] == "cancelled"
    # The worker dropped the cancelled generation: the next call is served at once.
    started = time.monotonic()
    assert one(corpus_db, "SELECT themis_generate('Say hi.', 4)").strip()
    assert time.monotonic() - started < 15


def test_client_disconnect_cancels_the_job(corpus_db, start_worker):
    start_worker(corpus_db)
    psql = subprocess.Popen(["psql", corpus_db, "-X", "-c",
                             f"SELECT themis_generate('{LONG_PROMPT}', 1500)"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job_id = wait_until(lambda: running_job(corpus_db), 30, "the generation to start")
    caller = one(corpus_db, "SELECT caller_pid FROM themis.jobs WHERE id = %s", (job_id,))
    os.kill(psql.pid, signal.SIGKILL)
    psql.wait()
    wait_until(lambda: job_row(corpus_db, job_id)[0] == "cancelled", 10, "the job to be cancelled")
    assert "went away" in job_row(corpus_db, job_id)[3]
    wait_until(lambda: not one(corpus_db, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                               (caller,)), 10, "the calling backend to end")


def test_worker_killed_mid_job_is_finished_by_another(corpus_db, start_worker):
    first = start_worker(corpus_db)
    call = Call(corpus_db, "SELECT themis_generate(%s, 64)", (LONG_PROMPT,))
    call.start()
    job_id = wait_until(lambda: running_job(corpus_db), 30, "the generation to start")
    first.kill(signal.SIGKILL)
    start_worker(corpus_db)
    call.join(timeout=120)
    assert call.error is None, call.error
    assert isinstance(call.result, str) and call.result.strip()
    status, attempts, worker_id, _ = job_row(corpus_db, job_id)
    assert (status, attempts) == ("done", 2)
    assert worker_id != first.id
    # Exactly one answer: one generate job for this call, finished once.
    assert one(corpus_db, "SELECT count(*) FROM themis.jobs WHERE kind = 'generate'") == 1


def test_dropped_bus_and_listener_connections_are_survived(rag_db):
    call = Call(rag_db, "SELECT themis_rag(%s, 3, 48)", (TLS,))
    call.start()
    wait_until(lambda: one(rag_db, "SELECT count(*) FROM pg_stat_activity "
                                   "WHERE application_name = 'themis_bus' AND datname = "
                                   "current_database()"), 10, "the bus connection")
    with psycopg.connect(rag_db, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name IN ('themis_bus', 'themis_worker') "
                     "AND datname = current_database()")
    call.join(timeout=120)
    assert call.error is None, call.error
    assert call.result.strip()
    # The worker reconnected its listener and lanes: later calls are served too.
    started = time.monotonic()
    assert one(rag_db, "SELECT count(*) FROM themis_search(%s, 2)", (TLS,)) == 2
    assert time.monotonic() - started < 10


def test_the_search_lane_hears_its_jobs_itself_and_again_after_a_reconnect(corpus_db,
                                                                           start_worker):
    """The search lane LISTENs on its own connection (no hop through the listener thread).
    With a 60 s poll, only that notification can get a search claimed within the calls'
    10 s timeout, before and after the worker's connections are cut."""
    start_worker(corpus_db, env={"THEMIS_POLL_INTERVAL": "60"}, kinds="search,embed")

    def searches() -> None:
        for _ in range(3):
            started = time.monotonic()
            assert one(corpus_db, "SELECT count(*) FROM themis_search(%s, 2, 10)", (TLS,)) == 2
            assert time.monotonic() - started < 10

    searches()
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = 'themis_worker' "
                     "AND datname = current_database()")
    searches()


def test_job_that_cannot_succeed_fails_once_and_the_worker_serves_on(rag_db):
    huge = "word " * 20000  # far beyond the 2048-token test context
    state, message = sqlstate_of(rag_db, "SELECT themis_generate(%s, 16)", (huge,))
    assert state == "54000" and "context window" in message
    status, attempts, _, _ = job_row(rag_db, newest_job(rag_db, "generate"))
    assert (status, attempts) == ("failed", 1)
    assert one(rag_db, "SELECT themis_generate('Say hi.', 4)").strip()


def test_several_workers_share_one_database(corpus_db, start_worker):
    """Generations take seconds and each worker here decodes at most two at once, so while
    one worker is full the other must take the next queued jobs: both serve, and each job is
    done exactly once."""
    env = {"THEMIS_MAX_SEQUENCES": "2"}
    workers = [start_worker(corpus_db, env=env), start_worker(corpus_db, env=env)]
    calls = [Call(corpus_db, "SELECT themis_rag(%s, 2, 8)", (TLS,)) for _ in range(6)]
    calls += [Call(corpus_db, "SELECT count(*) FROM themis_search(%s, 2)", (TLS,))
              for _ in range(6)]
    for c in calls:
        c.start()
    for c in calls:
        c.join(timeout=300)
        assert c.error is None, c.error
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        by_worker: dict[str, int] = dict(conn.execute(
            "SELECT worker_id, count(*) FROM themis.jobs WHERE kind = 'generate' "
            "GROUP BY worker_id").fetchall())
        attempts = conn.execute("SELECT DISTINCT status, attempts FROM themis.jobs").fetchall()
    assert set(by_worker) == {w.id for w in workers}, by_worker
    assert sum(by_worker.values()) == 6
    assert attempts == [("done", 1)]
    assert all(w.proc.poll() is None for w in workers)


def test_finish_is_fenced_on_the_attempt(corpus_db):
    """A worker whose lease lapsed (its job re-queued and claimed again, even by itself) can
    no longer finish or fail the old attempt."""
    from themis_pg.bus.jobs import Finished, JobStore

    with psycopg.connect(corpus_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO themis.jobs (kind, payload, requested_by, caller_pid, caller_started, "
            "reply_channel, reply_token, deadline) VALUES ('embed', '{\"text\": \"x\"}', "
            "current_user, pg_backend_pid(), now(), 'c', 'tok', now() + interval '1 hour')")
        first_store, other_store = JobStore(conn, "w1"), JobStore(conn, "w2")
        (first,) = first_store.claim(["embed"], 1, 30)
        conn.execute("UPDATE themis.jobs SET status = 'queued', lease_until = NULL")
        (again,) = first_store.claim(["embed"], 1, 30)  # the same worker, a new attempt
        assert (first.attempts, again.attempts) == (1, 2)
        assert first_store.finish([Finished(first, {"stale": True})]) == set()
        assert not first_store.fail(first, "stale", "XX000")
        assert not other_store.fail(again, "not mine", "XX000")
        assert first_store.finish([Finished(again, {"fresh": True})]) == {again.id}
        row = conn.execute("SELECT status, result FROM themis.jobs").fetchone()
    assert row == ("done", {"fresh": True})


def test_idle_bus_connections_are_closed_by_the_server(rag_db):
    with psycopg.connect(rag_db, autocommit=True) as conn:
        setting = conn.execute(
            "SELECT setconfig FROM pg_db_role_setting WHERE setdatabase = 0 "
            "AND setrole = 'themis_bus'::regrole").fetchone()[0]
        assert "idle_session_timeout=60s" in setting
        # a per-database setting wins over the role's: this test's database only
        conn.execute("ALTER ROLE themis_bus IN DATABASE " + conn.info.dbname
                     + " SET idle_session_timeout = '1s'")
    try:
        with psycopg.connect(rag_db, autocommit=True) as caller:
            assert caller.execute("SELECT count(*) FROM themis_search(%s, 2)",
                                  (TLS,)).fetchone()[0] == 2
            bus_count = ("SELECT count(*) FROM pg_stat_activity WHERE usename = 'themis_bus' "
                         "AND datname = current_database()")
            assert one(rag_db, bus_count) >= 1
            wait_until(lambda: one(rag_db, bus_count) == 0, 10, "the idle bus connection to close")
            # the same session reconnects on its next call
            assert caller.execute("SELECT count(*) FROM themis_search(%s, 2)",
                                  (TLS,)).fetchone()[0] == 2
    finally:
        with psycopg.connect(rag_db, autocommit=True) as conn:
            conn.execute("ALTER ROLE themis_bus IN DATABASE " + conn.info.dbname
                         + " RESET idle_session_timeout")


def test_no_free_connection_for_the_bus_is_a_clear_error(rag_db):
    """Each waiting caller needs a second connection; without one the call fails at once."""
    with psycopg.connect(rag_db, autocommit=True) as conn:
        conn.execute("ALTER ROLE themis_bus CONNECTION LIMIT 0")
    try:
        started = time.monotonic()
        # A fresh session: its backend has no cached bus connection yet.
        state, message = sqlstate_of(rag_db, "SELECT themis_search(%s, 2)", (TLS,))
        assert state == "53300" and "no free connection slot" in message
        assert time.monotonic() - started < 10
    finally:
        with psycopg.connect(rag_db, autocommit=True) as conn:
            conn.execute("ALTER ROLE themis_bus CONNECTION LIMIT -1")
    assert one(rag_db, "SELECT count(*) FROM themis_search(%s, 2)", (TLS,)) == 2
