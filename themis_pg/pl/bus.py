"""The caller's side of the job bus, run inside a PostgreSQL backend.

A PL/Python function runs inside the caller's transaction: a job INSERTed through SPI would
stay invisible to the worker until the caller commits, and the caller could not see the
worker's answer from a REPEATABLE READ snapshot.  So every job goes through an *autonomous*
connection (role ``themis_bus``) that commits on its own, LISTENs on a channel private to
this backend, and reads the answer.  The connection is cached per backend.

Waiting happens in short slices; between slices ``check_interrupts`` (an SPI ``SELECT 1``)
lets PostgreSQL act on ``statement_timeout``, ``pg_cancel_backend`` and client disconnects.
The jobs table is the truth: notifications only wake us early, and the row is re-read every
``poll_interval`` in case one was lost.

Only the standard library and psycopg (Debian's python3-psycopg) may be imported here.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from .errors import PLError

TERMINAL = ("done", "failed", "cancelled")
WAIT_SLICE_S = 0.05
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
                    "while it waits; raise max_connections.",
                ) from exc
            raise PLError(
                f"themis could not open its bus connection: {text.strip()}",
                sqlstate=BUS_TROUBLE,
                hint="Check themis.config 'bus_dsn' and that role themis_bus may log in.",
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
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = None
            self._conn = self._connect()
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
    def submit(self, kind: str, payload: str, caller: Caller, token: str,
               timeout_s: float) -> int:
        """Queue a job; idempotent per token, so the reconnect-retry never queues twice."""
        rows = self._execute(
            "SELECT themis.bus_submit(%s, %s::jsonb, %s, %s, %s::timestamptz, %s, %s, %s)",
            (kind, payload, caller.role, caller.pid, caller.backend_start, self.channel,
             token, timeout_s),
        )
        return int(rows[0][0])

    def take(self, job_id: int, token: str) -> tuple[JobOutcome | None, bool]:
        """The job's outcome once it has one (else None), and whether a worker is alive."""
        rows = self._execute(
            "SELECT status, result, answer, error, error_sqlstate, error_hint, worker_alive "
            "FROM themis.bus_take(%s, %s)", (job_id, token),
        )
        if not rows:
            return JobOutcome("failed", None, None, "job vanished from themis.jobs",
                              "XX000"), True
        status, result, answer, error, sqlstate, hint, alive = rows[0]
        if status not in TERMINAL:
            return None, bool(alive)
        return JobOutcome(status, result, answer, error, sqlstate, hint), True

    def ack(self, job_id: int, token: str) -> None:
        """Clear the job's internal result now that we hold it (best effort: the column is
        not readable by callers, and finished jobs are pruned anyway)."""
        with contextlib.suppress(PLError):
            self._execute("SELECT themis.bus_ack(%s, %s)", (job_id, token))

    def cancel(self, job_id: int, token: str, reason: str) -> None:
        """Best effort: the worker's orphan check catches what this misses."""
        try:
            self._execute("SELECT themis.bus_cancel(%s, %s, %s)", (job_id, token, reason))
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

    def call(self, kind: str, payload: str, caller: Caller, timeout_s: float,
             check_interrupts: Callable[[], None], *, call_timeout_s: float | None = None,
             worker_grace_s: float = 15.0) -> JobOutcome:
        """Submit a job and wait for its outcome, honouring cancels and the timeout.

        ``timeout_s`` is what is left of the SQL call's ``call_timeout_s`` (for messages).
        If no worker for the job's kind is alive for ``worker_grace_s`` while we wait (its
        worker died or stopped and no other took over), the call fails instead of waiting
        out its timeout.
        """
        stated = timeout_s if call_timeout_s is None else call_timeout_s
        token = secrets.token_hex(16)
        job_id = self.submit(kind, payload, caller, token, timeout_s)
        deadline = time.monotonic() + timeout_s
        next_check = 0.0
        no_worker_since: float | None = None
        try:
            while True:
                now = time.monotonic()
                if now >= next_check:
                    outcome, alive = self.take(job_id, token)
                    if outcome is not None:
                        if outcome.result is not None:
                            self.ack(job_id, token)
                        return outcome
                    no_worker_since = None if alive else (no_worker_since or now)
                    if no_worker_since is not None and now - no_worker_since >= worker_grace_s:
                        raise PLError(
                            f"the themis worker serving this {kind} job stopped and no other "
                            "worker is running", sqlstate="55000",
                            hint="Start one with `themis worker`.")
                    next_check = now + self.poll_interval
                if now >= deadline:
                    raise PLError(f"themis call timed out after {stated:g} s "
                                  f"(waiting for its {kind} job)", sqlstate="57014",
                                  hint="Pass a larger timeout_s or add workers.")
                try:
                    if self._wait_for_notify(min(WAIT_SLICE_S, deadline - now), job_id):
                        next_check = 0.0
                except (psycopg.OperationalError, OSError):
                    self._reset()  # dropped bus connection: reconnect, re-LISTEN, re-read
                    next_check = 0.0
                check_interrupts()
        except BaseException as exc:
            # statement_timeout, pg_cancel_backend, our own timeout, no worker, a bus
            # failure: free the worker's slot (a no-op if the job already ended).
            reason = exc.message if isinstance(exc, PLError) else "caller cancelled"
            self.cancel(job_id, token, reason)
            raise
