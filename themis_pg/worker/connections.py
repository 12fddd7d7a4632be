"""Worker connections: how they are opened, and the one reconnect-with-backoff rule.

Every worker thread owns one ``ManagedConnection``.  A statement that fails because the
connection broke is retried on a fresh one after a short backoff; an error of the statement
itself is raised.  Keepalives and ``tcp_user_timeout`` notice a dead server or network in
about 5 s, well inside the 15 s job lease, so a worker never renews leases from one thread
while another hangs on a half-open socket.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

log = logging.getLogger(__name__)

RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
T = TypeVar("T")


def connect(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit worker connection.  Worker writes need no durable commit either: jobs
    and workers are unlogged, and an embedding lost in a crash is simply computed again
    (the index reloads after a server restart), so synchronous_commit is off."""
    return psycopg.connect(dsn, autocommit=True, application_name="themis_worker",
                           connect_timeout=10, keepalives=1, keepalives_idle=2,
                           keepalives_interval=1, keepalives_count=3, tcp_user_timeout=5000,
                           options="-c synchronous_commit=off")


def connection_lost(conn: psycopg.Connection[Any] | None, exc: BaseException) -> bool:
    """A broken connection (retry elsewhere), as opposed to an error of the statement."""
    if isinstance(exc, psycopg.OperationalError) and conn is None:
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return (conn is None or conn.broken or conn.closed
            or sqlstate.startswith(("08", "57P0")))


class ManagedConnection:
    """One thread's connection, reopened on demand after it breaks."""

    def __init__(self, dsn: str, name: str, stopping: threading.Event,
                 on_connect: Callable[[psycopg.Connection[Any]], None] | None = None) -> None:
        self.dsn = dsn
        self.name = name
        self.stopping = stopping
        self.on_connect = on_connect
        self.conn: psycopg.Connection[Any] | None = None
        self.failures = 0

    def get(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = connect(self.dsn)
            if self.on_connect is not None:
                self.on_connect(self.conn)
            self.failures = 0
        return self.conn

    def lost(self, exc: BaseException) -> bool:
        return connection_lost(self.conn, exc)

    def drop(self, exc: BaseException) -> None:
        """Close the broken connection and wait the next backoff step."""
        delay = RECONNECT_BACKOFF_S[min(self.failures, len(RECONNECT_BACKOFF_S) - 1)]
        self.failures += 1
        log.warning("%s: database connection lost (%s); retrying in %.1f s", self.name,
                    str(exc).strip(), delay)
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.stopping.wait(delay)

    def run(self, action: Callable[[psycopg.Connection[Any]], T]) -> T | None:
        """Run ``action`` on the connection, reconnecting on a broken one (a few tries; after
        that None, and a claimed job's lease lapses so that any worker's reaper re-queues it)."""
        for _ in range(len(RECONNECT_BACKOFF_S)):
            try:
                return action(self.get())
            except psycopg.Error as exc:
                if not self.lost(exc):
                    raise
                self.drop(exc)
        return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
