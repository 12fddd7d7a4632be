"""Claim, finish, fail, renew and reap jobs: each a single guarded statement.

Every method runs in its own short transaction on an autocommit connection: a worker never
holds a row lock or an open transaction while a model runs.  ``finish`` and ``fail`` are
fenced on the claim (job id, attempt number and this worker's id), and say which jobs they
really ended, because a job may have been cancelled or taken over while we worked on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .queries import query


@dataclass(frozen=True)
class Job:
    """A claimed job: everything the worker needs to serve it is in ``payload``."""

    id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    remaining_s: float


@dataclass(frozen=True)
class Finished:
    """One job's result, for ``JobStore.finish``."""

    job: Job
    result: dict[str, Any]
    answer: str | None = None


class JobStore:
    """The jobs and workers tables, seen from one worker connection (autocommit)."""

    def __init__(self, conn: psycopg.Connection[Any], worker_id: str) -> None:
        if not conn.autocommit:
            raise ValueError("JobStore needs an autocommit connection")
        self.conn = conn
        self.worker_id = worker_id

    def _run(self, name: str, **params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query(name), params)
        return cur.fetchall() if cur.description else []

    # -- workers -----------------------------------------------------------------------
    def register(self, kinds: Sequence[str], stats: dict[str, Any],
                 watermark: int | None = None) -> None:
        """Announce this worker; ``watermark`` holds back change-log pruning for its index."""
        self._run("register", worker_id=self.worker_id, host=os.uname().nodename,
                  pid=os.getpid(), kinds=list(kinds), stats=Jsonb(stats),
                  watermark=None if watermark is None else str(watermark))

    def deregister(self) -> None:
        self._run("deregister", worker_id=self.worker_id)

    def heartbeat(self, lease_s: float, active: Sequence[int], stats: dict[str, Any],
                  watermark: int | None) -> bool:
        """Renew the leases of ``active`` jobs; False if our worker row is gone (pruned) and
        must be re-registered."""
        rows = self._run("heartbeat", worker_id=self.worker_id, lease=lease_s,
                         active=list(active), stats=Jsonb(stats),
                         watermark=None if watermark is None else str(watermark))
        return bool(rows)

    # -- jobs --------------------------------------------------------------------------
    def claim_statement(self, kinds: Sequence[str], limit: int,
                        lease_s: float) -> tuple[str, dict[str, Any]]:
        """The claim as (sql, params), for callers that pipeline it with other statements."""
        return query("claim"), {"kinds": list(kinds), "limit": limit, "lease": lease_s,
                                "worker_id": self.worker_id}

    @staticmethod
    def jobs_from_rows(rows: Sequence[Sequence[Any]]) -> list[Job]:
        return [Job(id=r[0], kind=r[1], payload=r[2], attempts=r[3], max_attempts=r[4],
                    remaining_s=r[5]) for r in sorted(rows, key=lambda r: int(r[0]))]

    def claim(self, kinds: Sequence[str], limit: int, lease_s: float) -> list[Job]:
        sql, params = self.claim_statement(kinds, limit, lease_s)
        return self.jobs_from_rows(self.conn.execute(sql, params).fetchall())

    def finish(self, done: Sequence[Finished]) -> set[int]:
        """Store the results of several jobs in one statement; returns the ids that counted."""
        if not done:
            return set()
        rows = self._run("finish", worker_id=self.worker_id,
                         ids=[d.job.id for d in done], attempts=[d.job.attempts for d in done],
                         results=[Jsonb(d.result) for d in done],
                         answers=[d.answer for d in done])
        return {int(r[0]) for r in rows}

    def add_pieces(self, pieces: Sequence[tuple[int, int, str]]) -> None:
        """Streamed (job id, seq, text) pieces of our running jobs, one statement; each job's
        caller is notified once."""
        if pieces:
            self._run("add_pieces", worker_id=self.worker_id,
                      ids=[p[0] for p in pieces], seqs=[p[1] for p in pieces],
                      pieces=[p[2] for p in pieces])

    def fail(self, job: Job, error: str, sqlstate: str, hint: str | None = None) -> bool:
        return bool(self._run("fail", id=job.id, attempt=job.attempts,
                              worker_id=self.worker_id, error=error, sqlstate=sqlstate,
                              hint=hint))

    def release(self, ids: Sequence[int] | None = None) -> int:
        """Put our running jobs (or just ``ids``) back in the queue, attempt not counted."""
        return len(self._run("release", worker_id=self.worker_id,
                             ids=None if ids is None else list(ids)))

    def cancelled_among(self, ids: Sequence[int]) -> set[int]:
        if not ids:
            return set()
        return {r[0] for r in self._run("cancelled_among", ids=list(ids))}

    # -- housekeeping (any worker may do it; all statements are idempotent) -----------------
    def reap_lost(self) -> list[tuple[int, str]]:
        return [(r[0], r[1]) for r in self._run("reap_lost")]

    def cancel_orphans(self) -> list[int]:
        return [r[0] for r in self._run("cancel_orphans")]

    def config(self) -> dict[str, Any]:
        """themis.config as {key: value}: the worker applies the same caps as bus_submit."""
        return {str(r[0]): r[1] for r in self._run("config")}

    def prune(self, retention_s: float) -> None:
        self._run("prune_jobs", retention=retention_s)
        self._run("prune_workers")
        self._run("prune_changes")
        self._run("prune_snapshots")
