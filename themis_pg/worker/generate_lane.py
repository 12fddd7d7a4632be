"""The generation lane: admits jobs into the generation engine and reports their outcomes.

It claims only as many jobs as the engine has room for, between engine steps; everything
else (scheduling, batching, KV memory) is the engine's business.  Outcomes come back on the
engine's thread and are queued here, so every database write happens on the lane's own
connection.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..bus.jobs import Finished, Job, JobStore
from ..generation.engine import GenerationEngine, GenerationOutcome, GenerationRequest
from ..pl.payloads import GeneratePayload
from .lane import Lane

if TYPE_CHECKING:
    from .process import Worker

log = logging.getLogger(__name__)


class GenerateLane(Lane):
    kinds = ("generate",)

    def __init__(self, worker: Worker, engine: GenerationEngine) -> None:
        super().__init__(worker)
        self.engine = engine
        self.outcomes: queue.SimpleQueue[GenerationOutcome] = queue.SimpleQueue()
        # streamed pieces (job id, text), in the order the engine made them
        self.pieces: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()
        self._piece_seq: dict[int, int] = {}
        self.running: dict[int, Job] = {}
        self._cancel_sent: set[int] = set()

    def _on_done(self, outcome: GenerationOutcome) -> None:  # engine thread
        self.outcomes.put(outcome)
        self.wake.set()

    def _on_token(self, job_id: int) -> Callable[[str], None]:
        def put(text: str) -> None:  # engine thread
            self.pieces.put((job_id, text))
            self.wake.set()
        return put

    def _flush_pieces(self) -> None:
        """Every piece queued so far, in one statement (before the outcomes that follow them,
        so a reader sees a job's last piece before its end)."""
        batch: list[tuple[int, int, str]] = []
        while True:
            try:
                job_id, text = self.pieces.get_nowait()
            except queue.Empty:
                break
            seq = self._piece_seq.get(job_id, 0)
            self._piece_seq[job_id] = seq + 1
            batch.append((job_id, seq, text))
        if batch:
            self.db.run(lambda conn: JobStore(conn, self.worker.worker_id).add_pieces(batch))

    def step(self) -> bool:
        self._flush_pieces()
        self._report_outcomes()
        self._forward_cancels()
        free = self.engine.free_slots()
        jobs: list[Job] = []
        if free > 0 and not self.worker.stopping.is_set() and self.should_claim():
            jobs = self.store().claim(self.kinds, free, self.settings.lease)
            if len(jobs) == free:  # it took all it asked for: the queue may hold more
                self.notified.set()
            self.worker.registry.start([j.id for j in jobs])
            for job, payload in self.parse_payloads(jobs):
                assert isinstance(payload, GeneratePayload)
                self.running[job.id] = job
                self.engine.submit(GenerationRequest(job.id, payload), self._on_done,
                                   self._on_token(job.id) if payload.stream else None)
            for job in jobs:
                if job.id not in self.running:  # failed its payload check
                    self.worker.registry.end([job.id])
        # Again at once if outcomes are waiting, or the queue may hold more than we took.
        return not self.outcomes.empty() or (self.notified.is_set()
                                             and self.engine.free_slots() > 0)

    def _forward_cancels(self) -> None:
        for job_id in list(self.running):
            if job_id not in self._cancel_sent and self.worker.registry.is_cancelled(job_id):
                self.engine.cancel(job_id)
                self._cancel_sent.add(job_id)

    def _report_outcomes(self) -> bool:
        done: list[Finished] = []
        outcomes: list[GenerationOutcome] = []
        while True:
            try:
                outcomes.append(self.outcomes.get_nowait())
            except queue.Empty:
                break
        if outcomes:
            self._flush_pieces()  # every piece of these jobs was queued before its outcome
        for outcome in outcomes:
            self._piece_seq.pop(outcome.request.id, None)
            job = self.running.pop(outcome.request.id, None)
            self._cancel_sent.discard(outcome.request.id)
            if job is None:
                continue
            self.worker.registry.end([job.id])
            if outcome.result is not None:
                done.append(Finished(job, outcome.result.as_json(), outcome.result.answer))
            elif outcome.error is not None:
                err = outcome.error
                self.fail(job, err.message, err.sqlstate, err.hint)
            elif outcome.crash is not None:
                log.error("generation crashed on job %d", job.id, exc_info=outcome.crash)
                self.fail(job, "internal error in the worker", "XX000")
            elif self.worker.registry.is_cancelled(job.id):
                log.info("job %d cancelled by its caller; generation stopped", job.id)
            elif job.payload.get("stream"):  # its caller has seen part of it: no re-run
                self.fail(job, "the worker stopped while streaming this answer", "57P01",
                          "Call again.")
            else:  # stopped because the worker is shutting down: let another worker take it
                self.release([job.id])
        self.finish(done)
        return bool(outcomes)

    def on_connection_lost(self) -> None:
        """Results of running requests are still reported once the connection is back;
        their leases are renewed meanwhile, and fencing stops any stale write."""

    def shutdown(self) -> None:
        self.engine.close()  # running requests report 'stopped'
        self._report_outcomes()
