"""The caller's side of the job bus, run inside a PostgreSQL backend.

A PL/Python function runs inside the caller's transaction: a job INSERTed through SPI would
stay invisible to the worker until the caller commits, and the caller could not see the
worker's answer from a REPEATABLE READ snapshot.  So every job goes through an *autonomous*
connection (role ``themis_bus``) that commits on its own, LISTENs on a channel private to
this backend, and reads the answer.

One job costs two round trips on that connection: ``bus_submit`` (checks, queues, notifies
the workers and says which timeout is in force) and, once our channel is notified,
``bus_take`` (reads the outcome and clears a search's candidates in the same statement).
Nothing is read before the wake-up; the row is re-read after ``poll_interval``, then at doubling
gaps up to ``MAX_POLL_S``, only in case a notification was lost.

Waiting happens in short slices; between slices ``check_interrupts`` (an SPI ``SELECT 1``)
lets PostgreSQL act on ``statement_timeout``, ``pg_cancel_backend`` and client disconnects.

The connection is cached per backend between calls.  The server closes it after 60 s idle
(``idle_session_timeout`` of role themis_bus, revision 0002), so a session that stopped
calling themis gives its second connection back; the next call opens a new one (we do so
ourselves a little before the server would).

Only the standard library and psycopg (Debian's python3-psycopg) may be imported here.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from .errors import PLError

TERMINAL = ("done", "failed", "cancelled")
WAIT_SLICE_S = 0.05
IDLE_RECONNECT_S = 50.0  # below the server's idle_session_timeout of 60 s
MAX_POLL_S = 5.0  # longest gap between two re-reads of a job while waiting
# Our own SQLSTATE for bus trouble: class 08 would make client pools drop the *caller's*
# healthy connection.
BUS_TROUBLE = "58000"


@dataclass(frozen=True)
class Caller:
    """Who asks: recorded on the job for RLS and for the worker's orphan check."""

    role: str
    pid: int
    backend_start: str


@dataclass(frozen=True)
class Submitted:
    """A queued job, with the timeout and worker grace bus_submit put in force."""

    id: int
    token: str
    kind: str
    timeout_s: float
    worker_stale_s: float


@dataclass(frozen=True)
class JobOutcome:
    status: str
    result: dict[str, Any] | None
    answer: str | None
    error: str | None
    error_sqlstate: str | None
    error_hint: str | None = None


class BusClient:
    """One autonomous connection per backend, with its private reply channel."""

    def __init__(self, dsn: str, *, poll_interval: float = 1.0, connect_timeout: int = 5) -> None:
        self.dsn = dsn
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.channel = f"themis_reply_{secrets.token_hex(8)}"
        self._conn: psycopg.Connection[Any] | None = None
        self._last_used = 0.0
        self._woken: set[str] = set()  # payloads (job ids) notified on our channel

    # -- connection ---------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=self.connect_timeout,
                application_name="themis_bus",
            )
        except psycopg.OperationalError as exc:
            text = str(exc)
            if "too many" in text or "remaining connection slots" in text:
                raise PLError(
                    "themis could not open its bus connection: the server has no free "
                    "connection slot",
                    sqlstate="53300",
                    hint="Each session calling themis functions holds one extra connection "
                    "(closed after 60 s idle); raise max_connections.",
                ) from exc
            raise PLError(
                f"themis could not open its bus connection: {text.strip()}",
                sqlstate=BUS_TROUBLE,
                hint="Check that role themis_bus may log in over the server's unix socket "
                "(README 'Existing PostgreSQL servers'), or THEMIS_BUS_DSN.",
            ) from exc
        # Notifications that arrive while a statement runs are delivered to handlers only.
        conn.add_notify_handler(self._on_notify)
        conn.execute(f'LISTEN "{self.channel}"')
        return conn

    def _on_notify(self, note: Any) -> None:
        if note.channel == self.channel:
            self._woken.add(note.payload)

    @property
    def conn(self) -> psycopg.Connection[Any]:
        now = time.monotonic()
        if self._conn is not None and now - self._last_used > IDLE_RECONNECT_S:
            self._reset()  # the server is about to close it (or did): start afresh
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = None
            self._conn = self._connect()
        self._last_used = now
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def _execute(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run one statement, reconnecting once if the connection was dropped."""
        for attempt in (1, 2):
            conn = self.conn
            try:
                cur = conn.execute(sql, params)
                return cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                if not (conn.broken or conn.closed):  # an error of the statement itself
                    raise PLError(exc.diag.message_primary or str(exc),
                                  sqlstate=exc.sqlstate or "XX000",
                                  hint=exc.diag.message_hint) from exc
                self._reset()
                if attempt == 2:
                    raise PLError(f"themis lost its bus connection: {str(exc).strip()}",
                                  sqlstate=BUS_TROUBLE) from exc
        raise AssertionError("unreachable")

    # -- protocol -------------------------------------------------------------------------
    def submit(self, kind: str, payload: str, caller: Caller,
               timeout_s: float | None) -> Submitted:
        """Queue a job (``timeout_s`` None: the server's default).  Idempotent per token, so
        the reconnect-retry never queues twice."""
        token = secrets.token_hex(16)
        rows = self._execute(
            "SELECT job_id, timeout_s, worker_stale_s FROM themis.bus_submit("
            "%s, %s::jsonb, %s, %s, %s::timestamptz, %s, %s, %s)",
            (kind, payload, caller.role, caller.pid, caller.backend_start, self.channel,
             token, timeout_s),
        )
        job_id, effective, stale = rows[0]
        return Submitted(int(job_id), token, kind, float(effective), float(stale))

    def take(self, job: Submitted) -> tuple[JobOutcome | None, bool]:
        """The job's outcome once it has one (else None), and whether a worker is alive."""
        rows = self._execute(
            "SELECT status, result, answer, error, error_sqlstate, error_hint, worker_alive "
            "FROM themis.bus_take(%s, %s)", (job.id, job.token),
        )
        if not rows:
            return JobOutcome("failed", None, None, "job vanished from themis.jobs",
                              "XX000"), True
        status, result, answer, error, sqlstate, hint, alive = rows[0]
        if status not in TERMINAL:
            return None, bool(alive)
        return JobOutcome(status, result, answer, error, sqlstate, hint), True

    def cancel(self, job: Submitted, reason: str) -> None:
        """Best effort: the worker's orphan check catches what this misses."""
        try:
            self._execute("SELECT themis.bus_cancel(%s, %s, %s)", (job.id, job.token, reason))
        except Exception:
            self._reset()

    def _wait_for_notify(self, timeout: float, job_id: int) -> bool:
        """Sleep on the socket up to ``timeout``; True if our job's notification came."""
        key = str(job_id)
        if key not in self._woken:
            conn = self.conn
            poller = select.poll()  # not select(): backends may hold fds above 1024
            poller.register(conn.pgconn.socket, select.POLLIN)
            if poller.poll(max(timeout, 0.0) * 1000):
                conn.pgconn.consume_input()
                while (note := conn.pgconn.notifies()) is not None:
                    if note.relname.decode() == self.channel:
                        self._woken.add(note.extra.decode())
        if key in self._woken:
            self._woken.discard(key)
            return True
        return False

    def pieces(self, job: Submitted) -> list[str]:
        """The pieces of a streamed job made since the last read (each is read once)."""
        rows = self._execute("SELECT seq, piece FROM themis.bus_pieces(%s, %s)",
                             (job.id, job.token))
        return [str(r[1]) for r in rows]

    def follow(self, job: Submitted, deadline: float, stated_timeout_s: float,
               check_interrupts: Callable[[], None]) -> Iterator[str | JobOutcome]:
        """A streamed job: its pieces as the worker sends them, then its outcome (last).

        Each notification on our channel (the worker sends one per batch of pieces, and
        one when it finishes) reads the new pieces and the job's status; without one the
        row is read every ``poll_interval``.  Closing the iterator early (the caller closed
        its cursor), an interrupt or the deadline cancels the job."""
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise PLError(f"themis call timed out after {stated_timeout_s:g} s "
                                  f"(streaming its {job.kind} job)", sqlstate="57014",
                                  hint="Pass a larger timeout_s or add workers.")
                try:
                    woke = self._wait_for_notify(min(WAIT_SLICE_S, deadline - now), job.id)
                except (psycopg.OperationalError, OSError):
                    self._reset()
                    woke = True
                if woke or time.monotonic() - now >= self.poll_interval:
                    yield from self.pieces(job)
                    outcome, _ = self.take(job)
                    if outcome is not None:
                        yield from self.pieces(job)  # written before the job ended
                        yield outcome
                        return
                check_interrupts()
        except BaseException as exc:
            reason = exc.message if isinstance(exc, PLError) else "caller stopped reading"
            self.cancel(job, reason)
            raise

    def wait(self, job: Submitted, deadline: float, stated_timeout_s: float,
             check_interrupts: Callable[[], None]) -> JobOutcome:
        """Wait for the job's outcome until ``deadline`` (time.monotonic()).

        If no worker for the job's kind is alive for ``worker_stale_s`` while we wait (its
        worker died or stopped and no other took over), the call fails instead of waiting
        out its timeout.  On any exception (cancel, timeout, bus trouble) the job is
        cancelled, which frees the worker's slot.
        """
        next_check = time.monotonic() + self.poll_interval  # no read before a wake-up
        checks = 0
        no_worker_since: float | None = None
        try:
            while True:
                now = time.monotonic()
                if now >= next_check:
                    outcome, alive = self.take(job)
                    if outcome is not None:
                        return outcome
                    no_worker_since = None if alive else (no_worker_since or now)
                    if (no_worker_since is not None
                            and now - no_worker_since >= job.worker_stale_s):
                        raise PLError(
                            f"the themis worker serving this {job.kind} job stopped and no "
                            "other worker is running", sqlstate="55000",
                            hint="Start one with `themis worker`.")
                    # re-read at 1, 2, 4, 8, 13, 18... s: a lost notification is found soon,
                    # and a long generation costs few reads
                    checks += 1
                    next_check = now + min(self.poll_interval * 2 ** (checks - 1), MAX_POLL_S)
                if now >= deadline:
                    raise PLError(f"themis call timed out after {stated_timeout_s:g} s "
                                  f"(waiting for its {job.kind} job)", sqlstate="57014",
                                  hint="Pass a larger timeout_s or add workers.")
                try:
                    if self._wait_for_notify(min(WAIT_SLICE_S, deadline - now), job.id):
                        next_check = 0.0
                except (psycopg.OperationalError, OSError):
                    self._reset()  # dropped bus connection: reconnect, re-LISTEN, re-read
                    next_check = 0.0
                check_interrupts()
        except BaseException as exc:
            # statement_timeout, pg_cancel_backend, our own timeout, no worker, a bus
            # failure: free the worker's slot (a no-op if the job already ended).
            reason = exc.message if isinstance(exc, PLError) else "caller cancelled"
            self.cancel(job, reason)
            raise
