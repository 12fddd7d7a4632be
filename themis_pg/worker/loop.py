"""``themis worker``: one long-lived process serving the job bus.

Threads, each with its own connection:

* the **listener** (main thread) LISTENs on ``themis_jobs`` and ``themis_cancel``; a
  notification only wakes a lane or flags a job, the jobs table stays the truth;
* one **lane** per stage claims jobs with ``FOR UPDATE SKIP LOCKED`` and serves them: the
  search lane (embedding + exact top-k, in batches) and the generation lane.  Lanes are the
  only place that groups jobs into batches.  Each also polls every ``poll_interval``, so a
  lost notification costs at most that;
* the **housekeeper** renews leases (heartbeat), re-queues jobs of lost workers, cancels jobs
  whose caller went away, notices cancellations, and prunes old rows.

Any number of workers may share one database.  SIGTERM/SIGINT: lanes stop after their
current step, unfinished jobs go back to the queue, the worker row is removed.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg

from ..bus.jobs import Job, JobStore
from ..bus.queries import query
from ..config import Settings
from ..embedding import Embedder
from ..errors import ContextOverflow, InvalidInput, ModelMismatch, ThemisError
from ..generation.llama import LlamaGenerator
from ..models.registry import get_model
from ..pipeline import search_batch
from ..retrieval.index import EmbeddingIndex

log = logging.getLogger(__name__)

RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
PRUNE_EVERY_S = 60.0
T = TypeVar("T")


def connect(dsn: str) -> psycopg.Connection[Any]:
    """Worker connections fail fast and notice a dead server (keepalives), so a worker never
    hangs on a half-open socket while its leases are renewed by another thread."""
    return psycopg.connect(dsn, autocommit=True, application_name="themis_worker",
                           connect_timeout=10, keepalives=1, keepalives_idle=10,
                           keepalives_interval=5, keepalives_count=3)


def connection_lost(conn: psycopg.Connection[Any] | None, exc: psycopg.Error) -> bool:
    """A broken connection (retry elsewhere), as opposed to an error of the statement."""
    return (conn is None or conn.broken or conn.closed
            or (exc.sqlstate or "").startswith(("08", "57P0")))


class JobRegistry:
    """Jobs this worker is serving now, and which of them were cancelled (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: set[int] = set()
        self._cancelled: set[int] = set()

    def start(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._active.update(ids)

    def end(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._active.difference_update(ids)
            self._cancelled.difference_update(ids)

    def active(self) -> list[int]:
        with self._lock:
            return sorted(self._active)

    def cancel(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._cancelled.update(i for i in ids if i in self._active)

    def is_cancelled(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._cancelled


class Lane(threading.Thread):
    """Claims jobs of some kinds and serves them; subclasses say how."""

    kinds: tuple[str, ...] = ()
    batch = 1

    def __init__(self, worker: Worker) -> None:
        self.kinds = tuple(k for k in self.kinds if k in worker.kinds)
        super().__init__(name=f"lane-{'-'.join(self.kinds)}", daemon=True)
        self.worker = worker
        self.settings = worker.settings
        self.wake = threading.Event()
        self.conn: psycopg.Connection[Any] | None = None
        self.store: JobStore | None = None

    def _ensure_store(self) -> JobStore:
        if self.conn is None or self.conn.closed or self.conn.broken or self.store is None:
            self.conn = connect(self.worker.dsn)
            self.store = JobStore(self.conn, self.worker.worker_id)
            self.on_connect(self.conn)
        return self.store

    def on_connect(self, conn: psycopg.Connection[Any]) -> None:
        """Hook for per-connection setup."""

    def run(self) -> None:
        try:
            self._loop()
        except BaseException:
            # A lane that dies must not leave a worker that heartbeats but serves nothing.
            log.exception("%s died; stopping the worker", self.name)
            self.worker.fatal.set()
            self.worker.stopping.set()

    def _loop(self) -> None:
        failures = 0
        while not self.worker.stopping.is_set():
            try:
                store = self._ensure_store()
                self.wake.clear()
                jobs = store.claim(self.kinds, self.batch, self.settings.lease)
                failures = 0
            except psycopg.Error as exc:
                if connection_lost(self.conn, exc):
                    self._drop_connection(exc, failures)
                else:  # e.g. the schema is being migrated: back off, keep going
                    log.warning("%s: cannot claim jobs: %s", self.name, str(exc).strip())
                    self.worker.stopping.wait(RECONNECT_BACKOFF_S[-1])
                failures += 1
                continue
            if not jobs:
                self.wake.wait(self.settings.poll_interval)
                continue
            ids = [j.id for j in jobs]
            self.worker.registry.start(ids)
            try:
                self.serve(jobs)
            except psycopg.Error as exc:
                if connection_lost(self.conn, exc):
                    # The connection broke mid-batch: put what is unfinished back.
                    self._drop_connection(exc, failures)
                    self.release(ids)
                else:
                    log.exception("%s: database error on jobs %s", self.name, ids)
                    self._fail_all(jobs, f"database error in the worker: {exc}",
                                   exc.sqlstate or "XX000")
            except Exception:
                log.exception("%s crashed on jobs %s", self.name, ids)
                self._fail_all(jobs, "internal error in the worker", "XX000")
            finally:
                self.worker.registry.end(ids)

    def release(self, ids: list[int]) -> None:
        self.with_store(lambda store: store.release(ids))

    def fail(self, job_id: int, message: str, sqlstate: str, hint: str | None = None) -> None:
        self.with_store(lambda store: store.fail(job_id, message, sqlstate, hint))
        self.worker.count("failed")

    def with_store(self, action: Callable[[JobStore], T]) -> T | None:
        """Run a bus statement, reconnecting on a broken connection (a few tries; after that
        the job's lease lapses and the reaper of any worker re-queues it)."""
        for attempt in range(len(RECONNECT_BACKOFF_S)):
            try:
                return action(self._ensure_store())
            except psycopg.Error as exc:
                if not connection_lost(self.conn, exc):
                    raise
                self._drop_connection(exc, attempt)
        return None

    def _drop_connection(self, exc: Exception, failures: int) -> None:
        delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
        log.warning("%s: database connection lost (%s); retrying in %.1f s", self.name,
                    str(exc).strip(), delay)
        if self.conn is not None:
            self.conn.close()
        self.conn = self.store = None
        self.worker.stopping.wait(delay)

    def _fail_all(self, jobs: Sequence[Job], message: str, sqlstate: str) -> None:
        """Fail what is still running of ``jobs`` (finished ones are left alone)."""
        for job in jobs:
            try:
                self.fail(job.id, message, sqlstate)
            except psycopg.Error:
                log.exception("could not fail job %d", job.id)

    def finish_or_fail(self, job: Job,
                       work: Callable[[], tuple[dict[str, Any], str | None]]) -> None:
        """Run ``work`` for one job; a ThemisError fails the job once with its SQLSTATE."""
        try:
            result, answer = work()
        except ThemisError as exc:
            log.info("job %d (%s) failed: %s", job.id, job.kind, exc.message)
            self.fail(job.id, exc.message, exc.sqlstate, exc.hint)
            return
        if self.with_store(lambda s: s.finish(job.id, result, answer)):
            self.worker.count("done")
        else:
            log.info("job %d was cancelled or taken over; result dropped", job.id)

    def serve(self, jobs: list[Job]) -> None:
        raise NotImplementedError


def _with_no_answer(result: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    return result, None


def _require_text(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"job payload needs a non-empty {key!r}")
    return value


class SearchLane(Lane):
    """Embedding and exact top-k, for many queries at once."""

    kinds = ("search", "embed")

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.batch = worker.settings.search_batch

    def serve(self, jobs: list[Job]) -> None:
        worker = self.worker
        assert self.conn is not None
        searches = [j for j in jobs if j.kind == "search"]
        embeds = [j for j in jobs if j.kind == "embed"]
        if searches:
            try:
                worker.index.sync(self.conn, embed=worker.embedder.embed)
            except ModelMismatch as exc:
                for job in searches:
                    self.fail(job.id, exc.message, exc.sqlstate, exc.hint)
                searches = []
        good: list[tuple[Job, str, int]] = []
        for job in searches:
            try:
                query = _require_text(job.payload, "query")
                n = int(job.payload.get("n", 10))
                if not 1 <= n <= 10_000_000:
                    raise InvalidInput(f"n must be positive, got {n}")
                good.append((job, query, n))
            except (ThemisError, TypeError, ValueError) as exc:
                self.fail(job.id, f"bad search job: {exc}", "22023")
        if good:
            found = search_batch(worker.index, worker.embedder, [q for _, q, _ in good],
                                 [n for _, _, n in good])
            share = found.embed_ms / len(good)
            for (job, _, _), hits, exhausted in zip(good, found.hits, found.exhausted,
                                                    strict=True):
                result = {"candidates": [[h.id, round(h.score, 6)] for h in hits],
                          "exhausted": exhausted, "model": worker.embedder.name,
                          "embed_ms": round(share, 3), "search_ms": round(found.search_ms, 3),
                          "index_size": len(worker.index)}
                self.finish_or_fail(job, functools.partial(_with_no_answer, result))
        for job in embeds:
            def work(job: Job = job) -> tuple[dict[str, Any], str | None]:
                vector = worker.embedder.embed([_require_text(job.payload, "text")])[0]
                return {"embedding": [round(float(x), 7) for x in vector],
                        "model": worker.embedder.name, "dim": int(vector.shape[0])}, None
            self.finish_or_fail(job, work)


class GenerateLane(Lane):
    """One request at a time for now; continuous batching will batch here."""

    kinds = ("generate",)

    def serve(self, jobs: list[Job]) -> None:
        worker = self.worker
        generator = worker.generator
        assert generator is not None, "generate lane without a generation model"
        for job in jobs:
            def stop(job_id: int = job.id) -> bool:
                return worker.registry.is_cancelled(job_id) or worker.stopping.is_set()

            def work(job: Job = job) -> tuple[dict[str, Any], str | None]:
                _validate_generation(job.payload)
                try:
                    res = generator.generate(job.payload, should_stop=stop)
                except ValueError as exc:  # llama.cpp's own context check
                    if "context" in str(exc):
                        raise ContextOverflow(str(exc)) from exc
                    raise
                if res.stopped:
                    raise _Abandoned()
                return res.as_json(), res.answer

            try:
                self.finish_or_fail(job, work)
            except _Abandoned:
                if worker.registry.is_cancelled(job.id):
                    log.info("job %d cancelled by its caller; generation stopped", job.id)
                else:
                    self.release([job.id])


class _Abandoned(Exception):
    """Generation stopped early: cancelled by the caller, or the worker is shutting down."""


def _validate_generation(payload: dict[str, Any]) -> None:
    try:
        max_tokens = int(payload["max_tokens"])
        temperature = float(payload.get("temperature", 0.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"bad generation job: {exc}") from exc
    if max_tokens < 1 or not 0.0 <= temperature <= 2.0:
        raise InvalidInput("bad generation job: max_tokens or temperature out of range")


class Housekeeper(threading.Thread):
    """Heartbeats, lease renewal, reaping, orphan cancelling, pruning."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="housekeeper", daemon=True)
        self.worker = worker
        self.conn: psycopg.Connection[Any] | None = None
        self._last_prune = 0.0

    def run(self) -> None:
        worker = self.worker
        while not worker.stopping.wait(worker.settings.heartbeat_interval):
            try:
                self.tick()
            except psycopg.Error as exc:
                if connection_lost(self.conn, exc):
                    log.warning("housekeeper: database connection lost (%s)",
                                str(exc).strip())
                    if self.conn is not None:
                        self.conn.close()
                    self.conn = None
                else:
                    log.exception("housekeeper tick failed")
            except Exception:
                log.exception("housekeeper tick failed")

    def tick(self) -> None:
        worker = self.worker
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = connect(worker.dsn)
        store = JobStore(self.conn, worker.worker_id)
        if not store.heartbeat(worker.settings.lease, worker.registry.active(), worker.stats(),
                               worker.index.watermark):
            log.warning("worker row was missing; registering again")
            store.register(worker.kinds, worker.stats(), worker.index.watermark)
        lost = store.reap_lost()
        if lost:
            log.warning("re-queued or failed %d jobs of lost workers: %s", len(lost), lost)
        store.cancel_orphans()
        worker.registry.cancel(sorted(store.cancelled_among(worker.registry.active())))
        now = time.monotonic()
        if now - self._last_prune > PRUNE_EVERY_S:
            store.prune(worker.settings.job_retention)
            self._last_prune = now


class Worker:
    """Loads the models and the index, then runs the lanes until told to stop."""

    def __init__(self, settings: Settings, dsn: str,
                 kinds: Sequence[str] = ("search", "embed", "generate")) -> None:
        self.settings = settings
        self.dsn = dsn
        self.kinds = list(kinds)
        self.worker_id = settings.worker_identity()
        self.stopping = threading.Event()
        self.fatal = threading.Event()
        self.registry = JobRegistry()
        self._counts = {"done": 0, "failed": 0}
        self._counts_lock = threading.Lock()
        self.started = time.time()

        with connect(dsn) as conn:
            emb = get_model(conn, "embedding", settings.embedding_model or None)
            gen = get_model(conn, "generation", settings.generation_model or None) \
                if "generate" in self.kinds else None
        self.embedder = Embedder(emb.path, emb.name, n_threads=settings.n_threads)
        self.index = EmbeddingIndex(self.embedder.dim, self.embedder.name)
        self.generator: LlamaGenerator | None = (
            LlamaGenerator(gen.path, gen.name, n_ctx=settings.n_ctx,
                           n_threads=settings.n_threads, n_gpu_layers=settings.n_gpu_layers)
            if gen is not None else None)
        log.info("worker %s: embedding model %s (dim %d), generation model %s",
                 self.worker_id, emb.name, self.embedder.dim, gen.name if gen else "-")

    def count(self, what: str) -> None:
        with self._counts_lock:
            self._counts[what] += 1

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self._counts)
        return {"jobs": counts, "index_size": len(self.index),
                "embedding_model": self.embedder.name,
                "generation_model": self.generator.name if self.generator else None,
                "retrieval_backend": "numpy", "uptime_s": round(time.time() - self.started, 1)}

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or ``stopping`` is set)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        searches = bool({"search", "embed"} & set(self.kinds))
        with connect(self.dsn) as conn:
            store = JobStore(conn, self.worker_id)
            if searches:
                # Registered with the watermark of the snapshot the index is about to load
                # from, so that no other worker prunes changes this one will still need.
                xmin = conn.execute(query("snapshot_state")).fetchone()[0]  # type: ignore[index]
                store.register(self.kinds, self.stats(), int(xmin))
                try:
                    self.index.load(conn)
                except ModelMismatch as exc:
                    log.error("%s; search jobs will fail until this is fixed", exc.message)
            else:
                store.register(self.kinds, self.stats())
        lanes: list[Lane] = []
        if searches:
            lanes.append(SearchLane(self))
        if "generate" in self.kinds:
            lanes.append(GenerateLane(self))
        housekeeper = Housekeeper(self)
        for thread in (*lanes, housekeeper):
            thread.start()
        log.info("worker %s ready (kinds: %s)", self.worker_id, ", ".join(self.kinds))
        try:
            self._listen(lanes)
        finally:
            self.stopping.set()
            for thread in (*lanes, housekeeper):
                thread.join(timeout=30)
            self._shutdown()
        if self.fatal.is_set():
            raise RuntimeError("a worker thread died; see the log above")

    def _listen(self, lanes: list[Lane]) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                with connect(self.dsn) as conn:
                    conn.execute("LISTEN themis_jobs")
                    conn.execute("LISTEN themis_cancel")
                    failures = 0
                    for lane in lanes:  # whatever was queued while we were not listening
                        lane.wake.set()
                    while not self.stopping.is_set():
                        claimed_cancels: set[int] = set()
                        for note in conn.notifies(timeout=0.5):
                            self._on_notify(note.channel, note.payload, lanes, claimed_cancels)
                        if claimed_cancels:  # not inside notifies(): it holds the connection
                            confirmed = JobStore(conn, self.worker_id).cancelled_among(
                                sorted(claimed_cancels))
                            self.registry.cancel(sorted(confirmed))
            except psycopg.OperationalError as exc:
                delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                log.warning("listener: database connection lost (%s); retrying in %.1f s",
                            str(exc).strip(), delay)
                self.stopping.wait(delay)

    def _on_notify(self, channel: str, payload: str, lanes: list[Lane],
                   claimed_cancels: set[int]) -> None:
        """A notification only wakes us up: anyone may NOTIFY, so a cancel is collected in
        ``claimed_cancels`` and counts only once the jobs table confirms it."""
        if channel == "themis_jobs":
            for lane in lanes:
                if payload in lane.kinds or not payload:
                    lane.wake.set()
        elif channel == "themis_cancel":
            try:
                job_id = int(payload)
            except ValueError:
                log.warning("ignoring malformed cancel notification %r", payload)
                return
            if job_id in self.registry.active():
                claimed_cancels.add(job_id)

    def _shutdown(self) -> None:
        try:
            with connect(self.dsn) as conn:
                store = JobStore(conn, self.worker_id)
                released = store.release()
                store.deregister()
            log.info("worker %s stopped (%d unfinished jobs re-queued)", self.worker_id,
                     released)
        except psycopg.Error as exc:
            log.warning("could not deregister cleanly: %s", exc)
