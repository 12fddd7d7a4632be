"""A lane: one thread that claims jobs of some kinds and serves them.

Lanes are the only place that groups jobs into batches.  Each waits on its ``wake`` event
(set by the listener on a NOTIFY, by a cancel, or by its engine) or the poll interval.  A lane
claims only when there is a reason to think jobs are queued (``notified``: a NOTIFY came, the
poll interval passed, or its last claim took all it asked for), so finishing a job costs no
extra empty claim, and a lost notification costs at most ``poll_interval``.  Subclasses
implement ``step``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from ..bus.jobs import Finished, Job, JobStore
from ..pl.payloads import Payload, PayloadError, parse
from .connections import RECONNECT_BACKOFF_S, ManagedConnection

if TYPE_CHECKING:
    from .process import Worker

log = logging.getLogger(__name__)


class Lane(threading.Thread):
    kinds: tuple[str, ...] = ()

    def __init__(self, worker: Worker) -> None:
        self.kinds = tuple(k for k in self.kinds if k in worker.kinds)
        super().__init__(name=f"lane-{'-'.join(self.kinds)}", daemon=True)
        self.worker = worker
        self.settings = worker.settings
        self.wake = threading.Event()
        self.notified = threading.Event()  # jobs may be queued: claim at the next step
        self.notified.set()
        worker.registry.wakes.append(self.wake)
        self.db = ManagedConnection(worker.dsn, self.name, worker.stopping, self.on_connect)

    def on_connect(self, conn: psycopg.Connection[Any]) -> None:
        """Hook for per-connection setup."""

    def store(self) -> JobStore:
        return JobStore(self.db.get(), self.worker.worker_id)

    def run(self) -> None:
        try:
            while not self.worker.stopping.is_set():
                try:
                    self.wake.clear()  # before the step: a wake during it is not lost
                    if not self.step() and not self.wake.wait(self.settings.poll_interval):
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
