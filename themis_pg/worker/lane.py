"""A lane: one thread that claims jobs of some kinds and serves them.

Lanes are the only place that groups jobs into batches.  Each waits on its ``wake`` (set by
the listener on a NOTIFY, by a cancel, or by its engine) or the poll interval.  A lane
claims only when there is a reason to think jobs are queued (``notified``: a NOTIFY came, the
poll interval passed, or its last claim took all it asked for), so finishing a job costs no
extra empty claim, and a lost notification costs at most ``poll_interval``.  A lane whose
latency is the product (``listens``: the search lane) LISTENs on its own connection and
sleeps on that socket and its wake-up at once, so a NOTIFY reaches it without a hop through
the listener thread.  Subclasses implement ``step``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from ..bus.jobs import Finished, Job, JobStore
from ..pl.payloads import Payload, PayloadError, parse
from .connections import RECONNECT_BACKOFF_S, ManagedConnection

if TYPE_CHECKING:
    from .process import Worker

log = logging.getLogger(__name__)

JOBS_CHANNEL = "themis_jobs"


class Wakeup:
    """``threading.Event``'s set / clear / is_set / wait, plus a descriptor that is readable
    while it is set, so a thread can sleep on it and on a socket in one ``poll``."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        if not self._flag.is_set():
            self._flag.set()
            # a full pipe holds earlier wake-ups: readable anyway
            with contextlib.suppress(BlockingIOError):
                os.write(self._write, b"w")

    def clear(self) -> None:
        """Only the waiting thread clears (a set() racing this is seen by ``is_set``)."""
        self._flag.clear()
        with contextlib.suppress(BlockingIOError):  # drained
            while os.read(self._read, 4096):
                pass

    def is_set(self) -> bool:
        return self._flag.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._flag.wait(timeout)


class Lane(threading.Thread):
    kinds: tuple[str, ...] = ()
    listens = False  # LISTEN on the lane's own connection (see the module docstring)

    def __init__(self, worker: Worker) -> None:
        self.kinds = tuple(k for k in self.kinds if k in worker.kinds)
        super().__init__(name=f"lane-{'-'.join(self.kinds)}", daemon=True)
        self.worker = worker
        self.settings = worker.settings
        self.wake = Wakeup()
        self.notified = threading.Event()  # jobs may be queued: claim at the next step
        self.notified.set()
        worker.registry.wakes.append(self.wake)
        self.db = ManagedConnection(worker.dsn, self.name, worker.stopping, self._connected)

    def _connected(self, conn: psycopg.Connection[Any]) -> None:
        if self.listens:
            # Notifications that arrive while a statement runs go to the handler; those that
            # arrive while the lane sleeps are read in wait_for_work.
            conn.add_notify_handler(lambda note: self.on_notify(note.channel, note.payload))
            conn.execute(f"LISTEN {JOBS_CHANNEL}")
            self.notified.set()  # whatever was queued while we were not listening
        self.on_connect(conn)

    def on_connect(self, conn: psycopg.Connection[Any]) -> None:
        """Hook for per-connection setup."""

    def on_notify(self, channel: str, payload: str) -> None:
        """A NOTIFY on ``themis_jobs`` naming one of our kinds (or none) means: claim."""
        if channel == JOBS_CHANNEL and (payload in self.kinds or not payload):
            self.notified.set()
            self.wake.set()

    def wait_for_work(self, timeout: float) -> bool:
        """Sleep until woken (True) or ``timeout`` passed (False).  A listening lane sleeps
        on its connection's socket too and reads the notifications itself."""
        if not self.listens:
            return self.wake.wait(timeout)
        conn = self.db.get()
        self._read_notifies(conn)  # any that came in with the last statement's result
        socket = conn.pgconn.socket
        poller = select.poll()  # not select(): the descriptor may be above 1024
        poller.register(self.wake.fileno(), select.POLLIN)
        poller.register(socket, select.POLLIN)
        end = time.monotonic() + timeout
        while not self.wake.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            if any(fd == socket for fd, _ in poller.poll(left * 1000)):
                try:
                    conn.pgconn.consume_input()
                except psycopg.OperationalError:
                    conn.close()  # broken: the next step reconnects and LISTENs again
                    return True
                self._read_notifies(conn)
        return True

    def _read_notifies(self, conn: psycopg.Connection[Any]) -> None:
        while (note := conn.pgconn.notifies()) is not None:
            self.on_notify(note.relname.decode(), note.extra.decode())

    def store(self) -> JobStore:
        return JobStore(self.db.get(), self.worker.worker_id)

    def run(self) -> None:
        try:
            self.prepare()
            while not self.worker.stopping.is_set():
                try:
                    self.wake.clear()  # before the step: a wake during it is not lost
                    if not self.step() and not self.wait_for_work(self.settings.poll_interval):
                        self.notified.set()  # the poll: look at the table anyway
                except psycopg.Error as exc:
                    if self.db.lost(exc):
                        self.db.drop(exc)
                        self.on_connection_lost()
                    else:  # e.g. the schema is being migrated: back off, keep going
                        log.warning("%s: database error: %s", self.name, str(exc).strip())
                        self.worker.stopping.wait(RECONNECT_BACKOFF_S[-1])
            self.shutdown()
        except BaseException:
            # A lane that dies must not leave a worker that heartbeats but serves nothing.
            log.exception("%s died; stopping the worker", self.name)
            self.worker.fatal.set()
            self.worker.stopping.set()

    def prepare(self) -> None:
        """Called once on the lane's thread before its first step."""

    def step(self) -> bool:
        """Claim (if ``notified``) and serve; True to run again at once."""
        raise NotImplementedError

    def should_claim(self) -> bool:
        """Whether to claim now; clears the flag, so a NOTIFY during the claim sets it again."""
        if self.notified.is_set():
            self.notified.clear()
            return True
        return False

    def on_connection_lost(self) -> None:
        """Called after the connection broke mid-step (jobs may be unfinished)."""

    def shutdown(self) -> None:
        """Called once when the worker stops."""

    # -- helpers for subclasses ---------------------------------------------------------
    def parse_payloads(self, jobs: Sequence[Job]) -> list[tuple[Job, Payload]]:
        """Typed payloads of ``jobs``; a bad one fails its job at once with the reason."""
        good = []
        for job in jobs:
            try:
                good.append((job, parse(job.kind, job.payload, self.worker.limits)))
            except PayloadError as exc:
                self.fail(job, f"bad {job.kind} job: {exc.message}", exc.sqlstate, exc.hint)
        return good

    def finish(self, done: Sequence[Finished]) -> None:
        counted = self.db.run(lambda conn: JobStore(conn, self.worker.worker_id).finish(done))
        counted = counted or set()
        self.worker.count("done", len(counted))
        for d in done:
            if d.job.id not in counted:
                log.info("job %d was cancelled or taken over; result dropped", d.job.id)

    def fail(self, job: Job, message: str, sqlstate: str, hint: str | None = None) -> None:
        log.info("job %d (%s) failed: %s", job.id, job.kind, message)
        self.db.run(lambda conn: JobStore(conn, self.worker.worker_id).fail(
            job, message, sqlstate, hint))
        self.worker.count("failed")

    def release(self, ids: Sequence[int]) -> None:
        self.db.run(lambda conn: JobStore(conn, self.worker.worker_id).release(ids))
