"""Latency of themis-pg's SQL path against the same work done in-process.

What the SQL path adds is the job bus: PL/Python queues a job over an autonomous connection,
a ``themis worker`` process wakes on NOTIFY, does the work and notifies back, and the function
reads the candidates through SPI as the caller.  The in-process peer does the same model work
with the same model files in this process, with no bus and no worker (the RAG peer still
reads its documents from the database):

* search: ``SELECT * FROM themis_search(q, k)`` vs :func:`themis_pg.pipeline.search_batch`
  (embed + exact top-k over an index loaded from the same database);
* RAG: ``SELECT themis_rag(q, k, max_tokens)`` vs :func:`themis_pg.pipeline.answer_in_process`.

The two paths run one after the other, never at once (the worker and this process share the
CPU), in alternating order per run.  Generation at temperature 0 is deterministic, so the
completion lengths of both paths are reported (``themis_rag_json`` gives the SQL path's usage,
from an untimed call made *after* the timed one so that llama.cpp's prompt-prefix cache never
favours the timed call) and the answers compared: the ratio is only fair if they match.

Besides wall time, each call's CPU time is summed over this process, the worker and the
PostgreSQL processes (``--self-contained`` only: their pids are known there), and the bus jobs
of each SQL call are read back from ``themis.jobs`` to split its time into queue wait, worker
service and the rest.

With ``--concurrency C`` a second table follows: both paths again, with 1 and with C sessions
calling at once (see :class:`Concurrency` for what the in-process peer shares between its
threads), p50/p95 per path and the overhead (SQL p50 − in-process p50) at each level, and
its ratio to the 1-session overhead.  ``--runs 0`` skips the single-session table.

Run against a database with the sample corpus and a live worker (``--dsn``, default
``THEMIS_DSN``), or with ``--self-contained`` to build and tear down a throwaway cluster and
worker.  Progress goes to the log (stderr); the Markdown report goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp  # noqa: F401  (libllama before NumPy: themis_pg.generation.load_llama_first)
import numpy as np
import psycopg
from _setup import QUESTIONS, cpu_model, git_revision, load_questions, self_contained_database

from themis_pg.config import Settings, get_settings
from themis_pg.db import connect
from themis_pg.embedding import Embedder
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.models.registry import get_model
from themis_pg.pipeline import answer_in_process, search_batch
from themis_pg.retrieval.index import EmbeddingIndex

log = logging.getLogger("bench.rag_latency")

T = TypeVar("T")


# -- results ----------------------------------------------------------------------------------
@dataclass
class Measured:
    """One timed call of one path."""

    wall_ms: float
    #: CPU ms by process group (bench, worker, server); None where not measurable.
    cpu_ms: dict[str, float | None]
    ids: list[int] = field(default_factory=list)  # search: the documents returned, best first
    answer: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    #: In-process path: model time of the generation (prompt building included).
    generate_ms: float | None = None
    #: SQL path: the bus jobs this call made (kind, queue wait, worker service time).
    jobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """One measured (or warm-up) iteration: the same question through all four paths."""

    question: str
    sql_first: bool
    search_sql: Measured
    search_peer: Measured
    rag_sql: Measured
    rag_peer: Measured
    same_answer: bool


@dataclass
class Report:
    meta: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    warmup: list[Run] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    p50: float
    p95: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        arr = np.asarray(values, dtype=np.float64)
        return cls(p50=float(np.percentile(arr, 50)), p95=float(np.percentile(arr, 95)),
                   mean=float(arr.mean()))


# -- CPU time ---------------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class CpuMeter:
    """CPU time used by this process, the worker and the PostgreSQL server processes.

    Wall time on a shared 2-core machine depends on what else runs; CPU time much less so,
    and it shows work one path does that the other does not (polling, spinning threads).
    The worker's and the server's processes are only known when they run on this machine
    (``--self-contained``); otherwise only this process is measured.
    """

    def __init__(self, worker_pid: int | None = None) -> None:
        self.worker_pid = worker_pid
        self.server_pids: list[int] = []

    def find_server(self, conn: psycopg.Connection[Any]) -> None:
        """Every server process now: backends (ours, the bus's, the worker's) and the
        background processes; call once the connections of the measurement exist."""
        self.server_pids = [int(r[0]) for r in conn.execute(
            "SELECT pid FROM pg_stat_activity UNION SELECT pg_backend_pid()").fetchall()]

    def snapshot(self) -> dict[str, float | None]:
        worker = process_cpu_s(self.worker_pid) if self.worker_pid else None
        server: float | None = None
        if self.server_pids:
            server = sum(c for c in map(process_cpu_s, self.server_pids) if c is not None)
        return {"bench": time.process_time(), "worker": worker, "server": server}

    @staticmethod
    def delta(before: dict[str, float | None],
              after: dict[str, float | None]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key, start in before.items():
            end = after.get(key)
            out[key] = None if start is None or end is None else (end - start) * 1000
        return out


# -- the measurement -----------------------------------------------------------------------
def timed(meter: CpuMeter, action: Callable[[], T]) -> tuple[T, Measured]:
    cpu_before = meter.snapshot()
    started = time.perf_counter()
    result = action()
    wall_ms = (time.perf_counter() - started) * 1000
    return result, Measured(wall_ms, CpuMeter.delta(cpu_before, meter.snapshot()))


# The bus jobs one SQL call made, read after the call (outside the timed part).  Their
# results are gone (the caller acknowledges and clears them); their timestamps stay.
JOBS_SINCE = """
SELECT kind, extract(epoch FROM started_at - created_at) * 1000 AS wait_ms,
       extract(epoch FROM finished_at - started_at) * 1000 AS service_ms
  FROM themis.jobs WHERE id > %s ORDER BY id
"""


class Bench:
    """Both paths, loaded: a SQL session (as a client would hold one) and the in-process peer
    (its own embedder, index and generator from the models the database registers)."""

    def __init__(self, dsn: str, settings: Settings, k: int, max_tokens: int,
                 meter: CpuMeter) -> None:
        self.meter = meter
        self.k = k
        self.max_tokens = max_tokens
        self.sql = connect(dsn, application_name="themis_bench_sql")
        self.peer_conn = connect(dsn, application_name="themis_bench_peer")
        emb = get_model(self.peer_conn, "embedding", settings.embedding_model or None)
        gen = get_model(self.peer_conn, "generation", settings.generation_model or None)
        self.models = {"embedding": emb.name, "generation": gen.name,
                       "embedding_path": str(emb.path), "generation_path": str(gen.path)}
        self.embedder = Embedder(emb.path, emb.name, n_threads=settings.n_threads)
        self.index = EmbeddingIndex(self.embedder.dim, self.embedder.name)
        self.index.load(self.peer_conn)
        self.generator = LlamaGenerator(gen.path, gen.name, n_ctx=settings.n_ctx,
                                        n_threads=settings.n_threads,
                                        n_gpu_layers=settings.n_gpu_layers)
        llm = self.generator._llm  # what llama-cpp-python made of n_threads=None
        self.threads = {"setting": settings.n_threads, "generation": int(llm.n_threads),
                        "batch": int(llm.n_threads_batch)}
        self._usage: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self.embedder.close()
        self.sql.close()
        self.peer_conn.close()

    # the SQL path
    def _last_job(self) -> int | None:
        try:
            row = self.sql.execute("SELECT coalesce(max(id), 0) FROM themis.jobs").fetchone()
        except psycopg.Error as exc:  # a role that may not read the jobs table
            log.debug("no job details: %s", exc)
            return None
        return None if row is None else int(row[0])

    def _jobs_since(self, last: int | None) -> list[dict[str, Any]]:
        if last is None:
            return []
        try:
            rows = self.sql.execute(JOBS_SINCE, (last,)).fetchall()
        except psycopg.Error as exc:
            log.debug("no job details: %s", exc)
            return []
        return [{"kind": r[0], "wait_ms": float(r[1]), "service_ms": float(r[2])}
                for r in rows]

    def _sql_call(self, statement: str, params: tuple[Any, ...]) -> tuple[list[Any], Measured]:
        last = self._last_job()
        rows, measured = timed(self.meter,
                               lambda: self.sql.execute(statement, params).fetchall())
        measured.jobs = self._jobs_since(last)
        return rows, measured

    def search_sql(self, question: str) -> Measured:
        rows, measured = self._sql_call(
            "SELECT id, score, content, metadata FROM themis_search(%s, %s)", (question, self.k))
        measured.ids = [int(r[0]) for r in rows]
        return measured

    def rag_sql(self, question: str) -> Measured:
        """The timed ``themis_rag``, then (untimed) ``themis_rag_json`` for the usage."""
        rows, measured = self._sql_call("SELECT themis_rag(%s, %s, %s)",
                                        (question, self.k, self.max_tokens))
        measured.answer = str(rows[0][0])
        usage = self.rag_sql_usage(question)
        measured.completion_tokens = usage["usage"]["completion_tokens"]
        measured.prompt_tokens = usage["usage"]["prompt_tokens"]
        if usage["answer"] != measured.answer:
            log.warning("themis_rag and themis_rag_json answered %r differently", question)
        return measured

    def rag_sql_usage(self, question: str) -> dict[str, Any]:
        """themis_rag_json for ``question`` (untimed, once per question): answer and usage."""
        if question not in self._usage:
            row = self.sql.execute("SELECT themis_rag_json(%s, %s, %s)",
                                   (question, self.k, self.max_tokens)).fetchone()
            assert row is not None
            self._usage[question] = dict(row[0])
        return self._usage[question]

    # the in-process peer
    def search_peer(self, question: str) -> Measured:
        found, measured = timed(self.meter, lambda: search_batch(
            self.index, self.embedder, [question], [self.k]))
        measured.ids = [h.id for h in found.hits[0]]
        return measured

    def rag_peer(self, question: str) -> Measured:
        (result, _), measured = timed(self.meter, lambda: answer_in_process(
            self.peer_conn, self.index, self.embedder, self.generator, question, self.k,
            max_tokens=self.max_tokens))
        measured.answer = result.answer
        measured.completion_tokens = result.completion_tokens
        measured.prompt_tokens = result.prompt_tokens
        measured.generate_ms = result.generate_ms
        return measured

    def iteration(self, question: str, sql_first: bool) -> Run:
        """All four measurements for one question, SQL or in-process first as told.

        The untimed themis_rag_json runs right after the timed themis_rag, so each timed
        generation follows one for another question on both sides: llama.cpp reuses the
        common prompt prefix (system prompt) equally, never a whole cached prompt.
        """
        order = ("sql", "peer") if sql_first else ("peer", "sql")
        search = {path: self.search_sql(question) if path == "sql"
                  else self.search_peer(question) for path in order}
        rag = {path: self.rag_sql(question) if path == "sql"
               else self.rag_peer(question) for path in order}
        return Run(question=question, sql_first=sql_first,
                   search_sql=search["sql"], search_peer=search["peer"],
                   rag_sql=rag["sql"], rag_peer=rag["peer"],
                   same_answer=rag["sql"].answer == rag["peer"].answer)


def measure(bench: Bench, questions: list[str], runs: int, warmup: int,
            report: Report) -> None:
    for i in range(warmup + runs):
        if i == warmup and bench.meter.worker_pid:
            bench.meter.find_server(bench.sql)  # the warm-up opened every connection
        question = questions[i % len(questions)]
        run = bench.iteration(question, sql_first=(i % 2 == 0))
        if i < warmup:
            report.warmup.append(run)
            log.info("warm-up %d/%d done", i + 1, warmup)
            continue
        report.runs.append(run)
        log.info("run %d/%d: search %.1f ms SQL / %.1f ms in-process; rag %.0f ms SQL "
                 "(%s tokens, CPU %s) / %.0f ms in-process (%s tokens, CPU %s)%s",
                 i - warmup + 1, runs, run.search_sql.wall_ms, run.search_peer.wall_ms,
                 run.rag_sql.wall_ms, run.rag_sql.completion_tokens,
                 _cpu_text(run.rag_sql.cpu_ms), run.rag_peer.wall_ms,
                 run.rag_peer.completion_tokens, _cpu_text(run.rag_peer.cpu_ms),
                 "" if run.same_answer else "; answers differ")


def _cpu_total(cpu: dict[str, float | None]) -> float | None:
    """CPU ms of all measured processes; None unless worker and server were measured."""
    values = list(cpu.values())
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _cpu_text(cpu: dict[str, float | None]) -> str:
    return " + ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v is not None) + " ms"


def _mean(values: Sequence[float | None], digits: int = 1) -> str:
    """Mean of the values, formatted; 'n/a' when any is missing."""
    if not values or any(v is None for v in values):
        return "n/a"
    return f"{np.mean([v for v in values if v is not None]):.{digits}f}"


def _job_sum(m: Measured, key: str, kind: str | None = None) -> float | None:
    """Sum of ``key`` over the call's jobs (of ``kind``); None when jobs were not read."""
    if not m.jobs:
        return None
    return float(sum(j[key] for j in m.jobs if kind is None or j["kind"] == kind))


# -- concurrency -------------------------------------------------------------------------------
@dataclass
class Call:
    """One timed call of one session in a concurrent phase."""

    session: int
    question: str
    wall_ms: float
    answer: str | None = None
    ids: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class ConcurrentPhase:
    """``sessions`` sessions calling one path back to back, started together."""

    kind: str  # "search" or "rag"
    path: str  # "sql" or "peer"
    sessions: int
    calls: list[Call]
    wall_s: float
    cpu_ms: dict[str, float | None]


class _Serialised:
    """``target`` with the named methods behind one lock (everything else passes through):
    how the in-process peer shares one model between threads, as the worker does."""

    def __init__(self, target: Any, *methods: str) -> None:
        self._target = target
        self._methods = set(methods)
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name not in self._methods:
            return value

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return value(*args, **kwargs)

        return locked

    def __len__(self) -> int:
        return len(self._target)


class Concurrency:
    """The paths again, with ``sessions`` client threads at once.

    SQL path: each thread has its own connection (so its own backend and bus connection)
    and calls ``themis_search``/``themis_rag`` back to back.  In-process peer: each thread
    calls ``search_batch``/``answer_in_process`` back to back on the bench's one embedder,
    index and generator.  The embedder serialises its calls with its own lock (it is not
    meant to be shared, but is safe to); the generator is put behind a lock here, as the
    worker has one generation lane serving one request at a time; the index's sync (RAG
    only) is behind a lock too, its search is read-only NumPy.  So the peer does the same
    work with the same serialisation of the models, except that the worker's search lane
    embeds all queued queries in one batch (up to THEMIS_SEARCH_BATCH) while the peer's
    threads embed one query each, in turn.  RAG peer threads read documents on their own
    connections.
    """

    def __init__(self, bench: Bench, dsn: str, questions: list[str], timeout_s: float) -> None:
        self.bench = bench
        self.dsn = dsn
        self.questions = questions
        self.timeout_s = timeout_s
        self.index = _Serialised(bench.index, "sync")
        self.generator = _Serialised(bench.generator, "generate")

    def _call(self, kind: str, path: str, conn: psycopg.Connection[Any] | None,
              question: str) -> Call:
        b = self.bench
        started = time.perf_counter()
        call = Call(session=-1, question=question, wall_ms=0.0)
        if path == "sql":
            assert conn is not None
            if kind == "search":
                rows = conn.execute("SELECT id, score, content, metadata FROM "
                                    "themis_search(%s, %s)", (question, b.k)).fetchall()
                call.ids = [int(r[0]) for r in rows]
            else:
                row = conn.execute("SELECT themis_rag(%s, %s, %s, timeout_s => %s)",
                                   (question, b.k, b.max_tokens, self.timeout_s)).fetchone()
                call.answer = None if row is None else str(row[0])
        elif kind == "search":
            found = search_batch(self.index, b.embedder, [question], [b.k])  # type: ignore[arg-type]
            call.ids = [h.id for h in found.hits[0]]
        else:
            assert conn is not None
            result, _ = answer_in_process(conn, self.index, b.embedder,  # type: ignore[arg-type]
                                          self.generator, question, b.k,  # type: ignore[arg-type]
                                          max_tokens=b.max_tokens)
            call.answer = result.answer
        call.wall_ms = (time.perf_counter() - started) * 1000
        return call

    def phase(self, kind: str, path: str, sessions: int, per_session: int,
              offset: int = 0) -> ConcurrentPhase:
        """Each session makes one unmeasured search call (it opens the backend's bus
        connection on the SQL path), waits for all the others, then ``per_session`` calls."""
        needs_conn = path == "sql" or kind == "rag"
        conns = [connect(self.dsn, application_name=f"themis_bench_{path}_{i}")
                 if needs_conn else None for i in range(sessions)]
        ready, go = threading.Barrier(sessions + 1), threading.Barrier(sessions + 1)
        calls: list[list[Call]] = [[] for _ in range(sessions)]
        errors: list[BaseException] = []

        def session(i: int) -> None:
            try:
                self._call("search", path, conns[i], self.questions[i % len(self.questions)])
                ready.wait()
                go.wait()
                for j in range(per_session):
                    q = self.questions[(offset + i * per_session + j) % len(self.questions)]
                    try:
                        call = self._call(kind, path, conns[i], q)
                    except psycopg.Error as exc:
                        call = Call(session=i, question=q, wall_ms=float("nan"),
                                    error=f"{exc.sqlstate}: {str(exc).strip()}")
                    call.session = i
                    calls[i].append(call)
            except threading.BrokenBarrierError:
                pass
            except BaseException as exc:
                errors.append(exc)
                ready.abort()
                go.abort()

        threads = [threading.Thread(target=session, args=(i,), name=f"session-{i}")
                   for i in range(sessions)]
        try:
            for t in threads:
                t.start()
            ready.wait()
            if self.bench.meter.worker_pid:
                self.bench.meter.find_server(self.bench.sql)
            cpu_before = self.bench.meter.snapshot()
            started = time.perf_counter()
            go.wait()
            for t in threads:
                t.join()
            wall_s = time.perf_counter() - started
            cpu = CpuMeter.delta(cpu_before, self.bench.meter.snapshot())
        except threading.BrokenBarrierError:
            for t in threads:
                t.join()
            raise RuntimeError(f"a {path} session failed: {errors[0]!r}") from errors[0]
        finally:
            for c in conns:
                if c is not None:
                    c.close()
        if errors:
            raise RuntimeError(f"a {path} session failed: {errors[0]!r}") from errors[0]
        flat = [c for per in calls for c in per]
        failed = [c for c in flat if c.error]
        log.info("%s %s x%d: %d calls in %.1f s%s", kind, path, sessions, len(flat), wall_s,
                 f", {len(failed)} failed (first: {failed[0].error})" if failed else "")
        return ConcurrentPhase(kind, path, sessions, flat, wall_s, cpu)


def measure_concurrency(conc: Concurrency, levels: list[int], runs: dict[str, int],
                        top: int) -> list[ConcurrentPhase]:
    """For each level and kind, both paths (order swapped between levels).  Every level
    makes the same number of calls: ``runs[kind]`` per session at the top level."""
    phases = []
    for n, level in enumerate(levels):
        for kind in ("search", "rag"):
            total = runs[kind] * top
            per_session = -(-total // level)  # ceil
            order = ("sql", "peer") if n % 2 == 0 else ("peer", "sql")
            for path in order:
                log.info("concurrency: %s, %s path, %d session(s) x %d calls", kind, path,
                         level, per_session)
                phases.append(conc.phase(kind, path, level, per_session))
    return phases


def concurrency_markdown(phases: list[ConcurrentPhase], meta: dict[str, Any],
                         footer: bool = False) -> str:
    def pick(kind: str, path: str, level: int) -> ConcurrentPhase:
        return next(p for p in phases if (p.kind, p.path, p.sessions) == (kind, path, level))

    k, max_tokens = meta["k"], meta["max_tokens"]
    names = {"search": f"`themis_search(q, {k})` vs `search_batch`",
             "rag": f"`themis_rag(q, {k}, {max_tokens})` vs `answer_in_process`"}
    levels = sorted({p.sessions for p in phases})
    lines = ["| call | sessions | calls | SQL p50 ms | SQL p95 ms | in-process p50 ms "
             "| in-process p95 ms | CPU ms/call SQL / in-process | overhead p50 ms "
             "(SQL − in-process) | overhead / 1-session overhead |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for kind in ("search", "rag"):
        base: float | None = None
        for level in levels:
            sql, peer = pick(kind, "sql", level), pick(kind, "peer", level)
            ok_sql = [c.wall_ms for c in sql.calls if not c.error]
            ok_peer = [c.wall_ms for c in peer.calls if not c.error]
            if not ok_sql or not ok_peer:
                lines.append(f"| {names[kind]} | {level} | {len(sql.calls)} | failed | | | | | | |")
                continue
            s, p = Summary.of(ok_sql), Summary.of(ok_peer)
            overhead = s.p50 - p.p50
            if level == 1:
                base = overhead
            ratio = "" if base is None or level == 1 or base == 0 else f"{overhead / base:.2f}x"
            cpu = [_cpu_total(ph.cpu_ms) for ph in (sql, peer)]
            cpu_text = "n/a" if None in cpu else " / ".join(
                f"{c / max(len(ph.calls), 1):.0f}" for c, ph in zip(cpu, (sql, peer),  # type: ignore[operator]
                                                                    strict=True))
            lines.append(f"| {names[kind]} | {level} | {len(ok_sql)} | {s.p50:.1f} | "
                         f"{s.p95:.1f} | {p.p50:.1f} | {p.p95:.1f} | {cpu_text} | "
                         f"{overhead:+.1f} | {ratio} |")
            failed = len(sql.calls) - len(ok_sql) + len(peer.calls) - len(ok_peer)
            if failed:
                first = next(c.error for c in sql.calls + peer.calls if c.error)
                notes.append(f"- {kind} at {level} session(s): {failed} failed calls "
                             f"(left out; first: {first})")
            if kind == "rag":
                by_q = {c.question: c.answer for c in peer.calls if not c.error}
                pairs = [(c.answer, by_q[c.question]) for c in sql.calls
                         if not c.error and c.question in by_q]
                same = sum(1 for a, b in pairs if a == b)
                notes.append(f"- rag at {level} session(s): the SQL answer equals the "
                             f"in-process answer to the same question in {same}/{len(pairs)} "
                             "calls")
            else:
                by_q_ids = {c.question: c.ids for c in peer.calls if not c.error}
                pairs_ids = [(c.ids, by_q_ids[c.question]) for c in sql.calls
                             if not c.error and c.question in by_q_ids]
                same = sum(1 for a, b in pairs_ids if a == b)
                notes.append(f"- search at {level} session(s): same top-{k} ids in "
                             f"{same}/{len(pairs_ids)} calls")
    top = max(levels)
    lines += [
        "",
        f"- sessions: client threads started together, each on its own connection (SQL) or "
        f"calling the in-process functions (peer), back to back; every level makes the same "
        f"number of calls ({meta['concurrent_runs']['search']} search and "
        f"{meta['concurrent_runs']['rag']} RAG calls per session at {top} sessions); p50 and "
        "p95 over all calls of all sessions; each session makes one unmeasured search call "
        "first (on the SQL path it opens that backend's bus connection)",
        "- in-process peer: the bench's one embedder (its own lock serialises calls), one "
        "index (read-only search) and one generator behind a lock, as the worker serves one "
        "generation at a time; unlike the worker's search lane, which embeds every queued "
        "query in one batch, the peer's threads embed one query each, in turn",
        f"- themis_rag is called as `themis_rag(q, {k}, {max_tokens}, timeout_s => "
        f"{meta['concurrent_timeout_s']:g})`: queued behind up to {top - 1} other answers, a "
        "call can wait longer than the default timeout",
        "- CPU ms/call: CPU of this process, the worker and the PostgreSQL processes over the "
        "phase, divided by its calls (n/a unless --self-contained)",
        "- overhead / 1-session overhead: the bar's ratio; it only means something when the "
        "1-session overhead is positive and well above the run-to-run noise (with "
        f"{top} sessions on few cores most of a call's time is queueing, on both paths)",
        *notes,
    ]
    if footer:  # the single-session report, which has these, was not printed
        threads = meta["n_threads"]
        lines += [
            f"- models: generation {meta['models']['generation']}, embedding "
            f"{meta['models']['embedding']}; n_ctx {meta['n_ctx']}; llama.cpp threads "
            f"(THEMIS_N_THREADS={threads['setting']}): {threads['generation']} for "
            f"generation, {threads['batch']} for prompt/batch",
            f"- machine: {meta['cpu']}, {meta['cores']} cores; load average "
            f"{meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after (1 min)",
            f"- date: {meta['date']}; revision: {meta['revision']}",
            f"- command: `{meta['command']}`",
        ]
    return "\n".join(lines)


# -- the report ---------------------------------------------------------------------------
def markdown(report: Report) -> str:
    runs = report.runs
    meta = report.meta
    k, max_tokens = meta["k"], meta["max_tokens"]
    paths: list[tuple[str, Callable[[Run], Measured], Callable[[Run], Measured] | None]] = [
        (f"`SELECT * FROM themis_search(q, {k})` (SQL → bus → worker)",
         lambda r: r.search_sql, lambda r: r.search_peer),
        (f"`search_batch` (in-process embed + top-{k})", lambda r: r.search_peer, None),
        (f"`SELECT themis_rag(q, {k}, {max_tokens})` (SQL → bus → worker)",
         lambda r: r.rag_sql, lambda r: r.rag_peer),
        (f"`answer_in_process(..., max_tokens={max_tokens})`", lambda r: r.rag_peer, None),
    ]
    lines = ["| path | p50 ms | p95 ms | mean ms | CPU ms/call (mean) | SQL/in-process (p50) "
             "| SQL − in-process (p50) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, pick, pick_peer in paths:
        s = Summary.of([pick(r).wall_ms for r in runs])
        ratio = delta = ""
        if pick_peer is not None:
            peer = Summary.of([pick_peer(r).wall_ms for r in runs])
            ratio, delta = f"{s.p50 / peer.p50:.2f}x", f"{s.p50 - peer.p50:+.1f} ms"
        cpu = _mean([_cpu_total(pick(r).cpu_ms) for r in runs], digits=0)
        lines.append(f"| {name} | {s.p50:.1f} | {s.p95:.1f} | {s.mean:.1f} | {cpu} "
                     f"| {ratio} | {delta} |")
    tok_sql = [r.rag_sql.completion_tokens or 0 for r in runs]
    tok_peer = [r.rag_peer.completion_tokens or 0 for r in runs]
    same = sum(1 for r in runs if r.same_answer)
    same_ids = sum(1 for r in runs if r.search_sql.ids == r.search_peer.ids)
    threads = meta["n_threads"]

    def rest(m: Measured) -> float | None:
        wait, service = _job_sum(m, "wait_ms"), _job_sum(m, "service_ms")
        return None if wait is None or service is None else m.wall_ms - wait - service

    lines += [
        "",
        "- SQL path, means per call from `themis.jobs`: search: "
        f"{_mean([float(len(r.search_sql.jobs)) for r in runs])} job(s), queue wait "
        f"{_mean([_job_sum(r.search_sql, 'wait_ms') for r in runs])} ms, worker service "
        f"{_mean([_job_sum(r.search_sql, 'service_ms') for r in runs])} ms, the rest "
        f"(PL/Python, SPI, reply, client) {_mean([rest(r.search_sql) for r in runs])} ms; "
        f"RAG: queue wait {_mean([_job_sum(r.rag_sql, 'wait_ms') for r in runs])} ms, worker "
        f"service {_mean([_job_sum(r.rag_sql, 'service_ms', 'search') for r in runs])} ms "
        f"search + {_mean([_job_sum(r.rag_sql, 'service_ms', 'generate') for r in runs])} ms "
        f"generation (in-process generation: {_mean([r.rag_peer.generate_ms for r in runs])} "
        f"ms), the rest {_mean([rest(r.rag_sql) for r in runs])} ms",
        "- CPU ms/call: user + system CPU of this process, the worker and every PostgreSQL "
        "process, summed (n/a unless --self-contained); above the wall time when threads run "
        "in parallel",
        f"- completion tokens per answer: SQL path mean {np.mean(tok_sql):.1f} "
        f"(total {sum(tok_sql)}), in-process mean {np.mean(tok_peer):.1f} "
        f"(total {sum(tok_peer)}); identical answers in {same}/{len(runs)} runs",
        f"- same top-{k} document ids from both search paths in {same_ids}/{len(runs)} runs",
        f"- runs: {len(runs)} measured after {meta['warmup']} warm-up, questions cycled from "
        f"{meta['questions_file']} ({meta['questions']} questions), paths alternated, "
        "never concurrent",
        f"- models: generation {meta['models']['generation']}, embedding "
        f"{meta['models']['embedding']}; n_ctx {meta['n_ctx']}; llama.cpp threads "
        f"(THEMIS_N_THREADS={threads['setting']}): {threads['generation']} for generation, "
        f"{threads['batch']} for prompt/batch"
        + ("" if meta["self_contained"] else " (in this process; the worker uses its own)"),
        f"- machine: {meta['cpu']}, {meta['cores']} cores; load average "
        f"{meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after (1 min)",
        f"- date: {meta['date']}; revision: {meta['revision']}",
        f"- command: `{meta['command']}`",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Latency of themis_search/themis_rag through SQL (job bus + worker) "
        "against the same work in-process.  Markdown report on stdout.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dsn", default=os.environ.get("THEMIS_DSN"),
                       help="database with the sample corpus ingested and a live worker "
                       "(default: THEMIS_DSN)")
    where.add_argument("--self-contained", action="store_true",
                       help="build a throwaway embedded cluster, corpus and worker, and "
                       "remove them afterwards")
    parser.add_argument("--runs", type=int, default=30, help="measured runs (default: 30)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured runs first (default: 3)")
    parser.add_argument("--k", type=int, default=3, help="documents retrieved (default: 3)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="max_tokens of each answer (default: 64)")
    parser.add_argument("--n-threads", type=int, default=None,
                        help="llama.cpp threads for both paths (default: THEMIS_N_THREADS, "
                        "else llama-cpp-python's default)")
    parser.add_argument("--questions", type=Path, default=QUESTIONS,
                        help="JSON lines with a 'question' field (default: the sample set)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the raw timings here")
    parser.add_argument("--concurrency", type=int, default=None, metavar="C",
                        help="also measure both paths with 1 and with C sessions at once "
                        "(a second table; with --runs 0 only that)")
    parser.add_argument("--concurrent-runs", type=int, default=10,
                        help="search calls per session at C sessions (default: 10); the "
                        "1-session level makes as many calls in all")
    parser.add_argument("--concurrent-rag-runs", type=int, default=2,
                        help="RAG calls per session at C sessions (default: 2)")
    parser.add_argument("--concurrent-timeout", type=float, default=3600.0,
                        help="timeout_s of each concurrent themis_rag call (default: 3600)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.self_contained and not args.dsn:
        parser.error("give --dsn (or set THEMIS_DSN) or --self-contained")
    if args.warmup < 0 or args.k < 1 or args.max_tokens < 1:
        parser.error("--k and --max-tokens must be positive, --warmup not negative")
    if args.runs < (0 if args.concurrency else 1):
        parser.error("--runs must be positive (0 is allowed with --concurrency)")
    if args.concurrency is not None and (args.concurrency < 1 or args.concurrent_runs < 1
                                         or args.concurrent_rag_runs < 1):
        parser.error("--concurrency, --concurrent-runs and --concurrent-rag-runs must be "
                     "positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = get_settings(n_threads=args.n_threads)
    questions = load_questions(args.questions)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None \
        else shlex.join(["rag_latency.py", *argv])
    report = Report(meta={
        "command": command, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_before": list(os.getloadavg()),
        "revision": git_revision(), "self_contained": args.self_contained,
        "runs": args.runs, "warmup": args.warmup, "k": args.k, "max_tokens": args.max_tokens,
        "n_ctx": settings.n_ctx, "questions": len(questions),
        "questions_file": args.questions.name,
    })
    with contextlib.ExitStack() as stack:
        if args.self_contained:
            dsn, worker_pid = stack.enter_context(self_contained_database(settings))
            meter = CpuMeter(worker_pid)
        else:
            dsn, meter = str(args.dsn), CpuMeter()
            log.info("using %s; its worker's thread and model settings are its own", dsn)
        bench = Bench(dsn, settings, args.k, args.max_tokens, meter)
        stack.callback(bench.close)
        report.meta["models"] = bench.models
        report.meta["n_threads"] = bench.threads
        try:
            measure(bench, questions, args.runs, args.warmup, report)
        except psycopg.Error as exc:
            log.error("a SQL call failed: %s", exc)
            return 1
        concurrent: list[ConcurrentPhase] = []
        if args.concurrency:
            levels = sorted({1, args.concurrency})
            runs = {"search": args.concurrent_runs, "rag": args.concurrent_rag_runs}
            report.meta.update(concurrency=args.concurrency, concurrent_runs=runs,
                               concurrent_timeout_s=args.concurrent_timeout)
            conc = Concurrency(bench, dsn, questions, args.concurrent_timeout)
            concurrent = measure_concurrency(conc, levels, runs, args.concurrency)
    report.meta["load_after"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps({"meta": report.meta,
                                         "runs": [asdict(r) for r in report.runs],
                                         "warmup": [asdict(r) for r in report.warmup],
                                         "concurrency": [asdict(p) for p in concurrent]},
                                        indent=2) + "\n", encoding="utf-8")
        log.info("raw timings written to %s", args.json)
    if report.runs:
        print(markdown(report))
    if concurrent:
        if report.runs:
            print()
        print(f"Concurrency (the same paths with 1 and {args.concurrency} sessions at once):\n")
        print(concurrency_markdown(concurrent, report.meta, footer=not report.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
