"""Heartbeats, lease renewal, reaping, orphan cancelling, pruning, and the worker's caps."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import psycopg

from ..bus.jobs import JobStore
from ..pl.payloads import Limits
from .connections import ManagedConnection

if TYPE_CHECKING:
    from .process import Worker

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0


class Housekeeper(threading.Thread):
    def __init__(self, worker: Worker) -> None:
        super().__init__(name="housekeeper", daemon=True)
        self.worker = worker
        self.db = ManagedConnection(worker.dsn, "housekeeper", worker.stopping)
        self._last_prune = 0.0

    def run(self) -> None:
        worker = self.worker
        while not worker.stopping.wait(worker.settings.heartbeat_interval):
            try:
                self.tick()
            except psycopg.Error as exc:
                if self.db.lost(exc):
                    self.db.drop(exc)
                else:
                    log.exception("housekeeper tick failed")
            except Exception:
                log.exception("housekeeper tick failed")
        self.db.close()

    def tick(self) -> None:
        worker = self.worker
        store = JobStore(self.db.get(), worker.worker_id)
        watermark = worker.index.watermark if worker.index is not None else None
        if not store.heartbeat(worker.settings.lease, worker.registry.active(), worker.stats(),
                               watermark):
            log.warning("worker row was missing; registering again")
            store.register(worker.kinds, worker.stats(), watermark)
        worker.limits = Limits.from_config(store.config())
        lost = store.reap_lost()
        if lost:
            log.warning("re-queued or failed %d jobs of lost workers: %s", len(lost), lost)
        store.cancel_orphans()
        worker.registry.cancel(sorted(store.cancelled_among(worker.registry.active())))
        now = time.monotonic()
        if now - self._last_prune > PRUNE_EVERY_S:
            store.prune(worker.settings.job_retention)
            self._last_prune = now
