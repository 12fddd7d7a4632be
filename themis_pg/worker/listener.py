"""The listener: LISTENs on ``themis_jobs`` and ``themis_cancel`` and wakes the lanes.

A notification only wakes someone up; the jobs table stays the truth.  Anyone may NOTIFY, so
a cancel counts only once the jobs table confirms it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from ..bus.jobs import JobStore
from .connections import ManagedConnection
from .lane import JOBS_CHANNEL, Lane

if TYPE_CHECKING:
    from .process import Worker

log = logging.getLogger(__name__)


class Listener:
    def __init__(self, worker: Worker, lanes: Sequence[Lane]) -> None:
        self.worker = worker
        self.lanes = lanes
        self.db = ManagedConnection(worker.dsn, "listener", worker.stopping, self._listen_on)

    def _listen_on(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"LISTEN {JOBS_CHANNEL}")
        conn.execute("LISTEN themis_cancel")
        for lane in self.lanes:  # whatever was queued while we were not listening
            lane.notified.set()
            lane.wake.set()

    def run(self) -> None:
        """Until the worker stops (runs on the main thread, so signals reach it)."""
        while not self.worker.stopping.is_set():
            try:
                conn = self.db.get()
                claimed_cancels: set[int] = set()
                for note in conn.notifies(timeout=0.5):
                    self._on_notify(note.channel, note.payload, claimed_cancels)
                if claimed_cancels:  # not inside notifies(): it holds the connection
                    confirmed = JobStore(conn, self.worker.worker_id).cancelled_among(
                        sorted(claimed_cancels))
                    self.worker.registry.cancel(sorted(confirmed))
            except psycopg.Error as exc:
                self.db.drop(exc)
        self.db.close()

    def _on_notify(self, channel: str, payload: str, claimed_cancels: set[int]) -> None:
        if channel == JOBS_CHANNEL:
            for lane in self.lanes:
                if not lane.listens:  # a listening lane hears it on its own connection
                    lane.on_notify(channel, payload)
        elif channel == "themis_cancel":
            try:
                job_id = int(payload)
            except ValueError:
                log.warning("ignoring malformed cancel notification %r", payload)
                return
            if job_id in self.worker.registry.active():
                claimed_cancels.add(job_id)
