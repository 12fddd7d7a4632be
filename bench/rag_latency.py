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
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psycopg

from themis_pg.config import Settings, get_settings
from themis_pg.db import connect, migrate
from themis_pg.embedding import Embedder
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.models.registry import get_model, register_defaults
from themis_pg.pipeline import answer_in_process, search_batch
from themis_pg.resources import sample_corpus_dir
from themis_pg.retrieval.index import EmbeddingIndex

log = logging.getLogger("bench.rag_latency")

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO / "themis_pg" / "data" / "sample_questions.jsonl"
BENCH_DB = "themis"
WORKER_START_TIMEOUT_S = 300.0
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


# -- the environment ----------------------------------------------------------------------------
def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + (" (with uncommitted changes)" if dirty else "")


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


def load_questions(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        questions = [str(json.loads(line)["question"]) for line in fh if line.strip()]
    if len(questions) < 2:
        raise SystemExit(f"{path}: need at least 2 questions (consecutive prompts must differ)")
    return questions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_worker(dsn: str, proc: subprocess.Popen[bytes], log_path: Path,
                     timeout: float = WORKER_START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the worker exited with {proc.returncode} during start-up:\n{tail}")
        with connect(dsn) as conn:
            row = conn.execute("SELECT themis.live_worker_exists('search') "
                               "AND themis.live_worker_exists('generate')").fetchone()
            if row is not None and row[0]:
                return
        time.sleep(0.5)
    raise SystemExit(f"no worker came up within {timeout:.0f} s; see {log_path}")


@contextlib.contextmanager
def worker_process(dsn: str, log_dir: Path, settings: Settings) -> Iterator[int]:
    """A ``themis worker`` subprocess with this run's thread setting, stopped on exit."""
    env = {**os.environ, "THEMIS_WORKER_ID": f"bench-{os.getpid()}",
           "THEMIS_N_CTX": str(settings.n_ctx), "THEMIS_N_GPU_LAYERS": str(settings.n_gpu_layers),
           "THEMIS_GENERATION_MODEL": settings.generation_model,
           "THEMIS_EMBEDDING_MODEL": settings.embedding_model}
    env.pop("THEMIS_N_THREADS", None)
    if settings.n_threads is not None:
        env["THEMIS_N_THREADS"] = str(settings.n_threads)
    log_path = log_dir / "worker.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "themis_pg.cli", "--dsn", dsn, "worker"],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.info("started worker pid %d (log %s)", proc.pid, log_path)
    try:
        _wait_for_worker(dsn, proc, log_path)
        log.info("worker is live")
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("worker stopped (exit status %s)", proc.returncode)


@contextlib.contextmanager
def self_contained_database(settings: Settings) -> Iterator[tuple[str, int]]:
    """A throwaway embedded cluster with the schema, the default models, the sample corpus
    and one worker; everything is removed on exit.  Yields the DSN and the worker's pid."""
    from themis_pg.cluster import EmbeddedCluster
    from themis_pg.ingest import ingest_paths

    # Under /tmp, world-traversable: as root the server runs as another OS user.
    home = Path(tempfile.mkdtemp(prefix="themis-bench-", dir="/tmp"))
    home.chmod(0o755)
    cluster = EmbeddedCluster(home, _free_port())
    try:
        cluster.init()
        cluster.start()
        cluster.ensure_database(BENCH_DB)
        dsn = cluster.url(BENCH_DB)
        log.info("migrating %s", dsn)
        migrate(dsn)
        with connect(dsn) as conn:
            register_defaults(conn, settings.model_cache)
            emb = get_model(conn, "embedding", settings.embedding_model or None)
            with Embedder(emb.path, emb.name, n_threads=settings.n_threads) as embedder:
                report = ingest_paths(conn, [sample_corpus_dir()], embedder, progress=False)
        log.info("ingested the sample corpus: %s", vars(report))
        with worker_process(dsn, home, settings) as worker_pid:
            yield dsn, worker_pid
    finally:
        log.info("removing the throwaway cluster in %s", home)
        cluster.destroy()


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
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.self_contained and not args.dsn:
        parser.error("give --dsn (or set THEMIS_DSN) or --self-contained")
    if args.runs < 1 or args.warmup < 0 or args.k < 1 or args.max_tokens < 1:
        parser.error("--runs, --k and --max-tokens must be positive, --warmup not negative")
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
    report.meta["load_after"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps({"meta": report.meta,
                                         "runs": [asdict(r) for r in report.runs],
                                         "warmup": [asdict(r) for r in report.warmup]},
                                        indent=2) + "\n", encoding="utf-8")
        log.info("raw timings written to %s", args.json)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
