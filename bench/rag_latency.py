"""Latency of themis-pg's SQL path against the same work done in-process.

What the SQL path adds is the job bus: PL/Python queues a job over an autonomous connection,
a ``themis worker`` process wakes on NOTIFY, does the work and notifies back, and the function
reads the candidates through SPI as the caller.  The in-process peer does the same model work
with the same model files in this process, with no PostgreSQL in the loop:

* search: ``SELECT * FROM themis_search(q, k)`` vs :func:`themis_pg.pipeline.search_batch`
  (embed + exact top-k over an index loaded from the same database);
* RAG: ``SELECT themis_rag(q, k, max_tokens)`` vs :func:`themis_pg.pipeline.answer_in_process`.

The two paths run one after the other, never at once (the worker and this process share the
CPU), in alternating order per run.  Generation at temperature 0 is deterministic, so the
completion lengths of both paths are reported (``themis_rag_json`` gives the SQL path's usage,
from an untimed call made *after* the timed one so that llama.cpp's prompt-prefix cache never
favours the timed call) and the answers compared: the ratio is only fair if they match.

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
class Run:
    """One measured (or warm-up) iteration: the same question through all four paths."""

    question: str
    sql_first: bool
    search_sql_ms: float
    search_peer_ms: float
    rag_sql_ms: float
    rag_peer_ms: float
    search_ids_sql: list[int]
    search_ids_peer: list[int]
    completion_tokens_sql: int | None
    completion_tokens_peer: int
    prompt_tokens_sql: int | None
    prompt_tokens_peer: int
    same_answer: bool | None


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
def worker_process(dsn: str, log_dir: Path, settings: Settings) -> Iterator[None]:
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
        yield
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
def self_contained_database(settings: Settings) -> Iterator[str]:
    """A throwaway embedded cluster with the schema, the default models, the sample corpus
    and one worker; everything is removed on exit.  Yields the database's DSN."""
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
        with worker_process(dsn, home, settings):
            yield dsn
    finally:
        log.info("removing the throwaway cluster in %s", home)
        cluster.destroy()


# -- the measurement -----------------------------------------------------------------------
def timed(action: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = action()
    return result, (time.perf_counter() - started) * 1000


class Bench:
    """Both paths, loaded: a SQL session (as a client would hold one) and the in-process peer
    (its own embedder, index and generator from the models the database registers)."""

    def __init__(self, dsn: str, settings: Settings, k: int, max_tokens: int) -> None:
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

    # search
    def search_sql(self, question: str) -> tuple[list[int], float]:
        rows, ms = timed(lambda: self.sql.execute(
            "SELECT id, score, content, metadata FROM themis_search(%s, %s)",
            (question, self.k)).fetchall())
        return [int(r[0]) for r in rows], ms

    def search_peer(self, question: str) -> tuple[list[int], float]:
        found, ms = timed(lambda: search_batch(self.index, self.embedder, [question], [self.k]))
        return [h.id for h in found.hits[0]], ms

    # rag
    def rag_sql(self, question: str) -> tuple[str, float]:
        row, ms = timed(lambda: self.sql.execute("SELECT themis_rag(%s, %s, %s)",
                                                 (question, self.k, self.max_tokens)).fetchone())
        assert row is not None
        return str(row[0]), ms

    def rag_sql_usage(self, question: str) -> dict[str, Any]:
        """themis_rag_json for ``question`` (untimed, once per question): answer and usage."""
        if question not in self._usage:
            row = self.sql.execute("SELECT themis_rag_json(%s, %s, %s)",
                                   (question, self.k, self.max_tokens)).fetchone()
            assert row is not None
            self._usage[question] = dict(row[0])
        return self._usage[question]

    def rag_peer(self, question: str) -> tuple[str, int, int, float]:
        (result, _), ms = timed(lambda: answer_in_process(
            self.peer_conn, self.index, self.embedder, self.generator, question, self.k,
            max_tokens=self.max_tokens))
        return result.answer, result.completion_tokens, result.prompt_tokens, ms

    def iteration(self, question: str, sql_first: bool) -> Run:
        """All four measurements for one question, SQL or in-process first as told."""
        search: dict[str, tuple[list[int], float]] = {}
        rag: dict[str, Any] = {}
        for path in (("sql", "peer") if sql_first else ("peer", "sql")):
            search[path] = self.search_sql(question) if path == "sql" \
                else self.search_peer(question)
        for path in (("sql", "peer") if sql_first else ("peer", "sql")):
            if path == "sql":
                rag["sql"] = self.rag_sql(question)
                rag["usage"] = self.rag_sql_usage(question)  # after the timed call, see above
            else:
                rag["peer"] = self.rag_peer(question)
        usage = rag["usage"].get("usage") or {}
        sql_answer, rag_sql_ms = rag["sql"]
        peer_answer, peer_completion, peer_prompt, rag_peer_ms = rag["peer"]
        return Run(
            question=question, sql_first=sql_first,
            search_sql_ms=search["sql"][1], search_peer_ms=search["peer"][1],
            rag_sql_ms=rag_sql_ms, rag_peer_ms=rag_peer_ms,
            search_ids_sql=search["sql"][0], search_ids_peer=search["peer"][0],
            completion_tokens_sql=usage.get("completion_tokens"),
            completion_tokens_peer=peer_completion,
            prompt_tokens_sql=usage.get("prompt_tokens"), prompt_tokens_peer=peer_prompt,
            same_answer=(sql_answer == peer_answer
                         and rag["usage"].get("answer") == sql_answer),
        )


def measure(bench: Bench, questions: list[str], runs: int, warmup: int,
            report: Report) -> None:
    for i in range(warmup + runs):
        question = questions[i % len(questions)]
        run = bench.iteration(question, sql_first=(i % 2 == 0))
        if i < warmup:
            report.warmup.append(run)
            log.info("warm-up %d/%d done", i + 1, warmup)
            continue
        report.runs.append(run)
        log.info("run %d/%d: search %.1f ms SQL / %.1f ms in-process; rag %.0f ms SQL "
                 "(%s tokens) / %.0f ms in-process (%d tokens)%s", i - warmup + 1, runs,
                 run.search_sql_ms, run.search_peer_ms, run.rag_sql_ms,
                 run.completion_tokens_sql, run.rag_peer_ms, run.completion_tokens_peer,
                 "" if run.same_answer else "; answers differ")


# -- the report ---------------------------------------------------------------------------
def markdown(report: Report) -> str:
    runs = report.runs
    meta = report.meta
    search_sql = Summary.of([r.search_sql_ms for r in runs])
    search_peer = Summary.of([r.search_peer_ms for r in runs])
    rag_sql = Summary.of([r.rag_sql_ms for r in runs])
    rag_peer = Summary.of([r.rag_peer_ms for r in runs])
    k, max_tokens = meta["k"], meta["max_tokens"]
    rows: list[tuple[str, Summary, Summary | None]] = [
        (f"`SELECT * FROM themis_search(q, {k})` (SQL → bus → worker)", search_sql, search_peer),
        (f"`search_batch` (in-process embed + top-{k})", search_peer, None),
        (f"`SELECT themis_rag(q, {k}, {max_tokens})` (SQL → bus → worker)", rag_sql, rag_peer),
        (f"`answer_in_process(..., max_tokens={max_tokens})`", rag_peer, None),
    ]
    lines = ["| path | p50 ms | p95 ms | mean ms | SQL/in-process (p50) | SQL − in-process (p50) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s, peer in rows:
        ratio = f"{s.p50 / peer.p50:.2f}x" if peer else ""
        delta = f"{s.p50 - peer.p50:+.1f} ms" if peer else ""
        lines.append(f"| {name} | {s.p50:.1f} | {s.p95:.1f} | {s.mean:.1f} | {ratio} | {delta} |")
    tok_sql = [r.completion_tokens_sql for r in runs if r.completion_tokens_sql is not None]
    tok_peer = [r.completion_tokens_peer for r in runs]
    same = sum(1 for r in runs if r.same_answer)
    same_ids = sum(1 for r in runs if r.search_ids_sql == r.search_ids_peer)
    threads = meta["n_threads"]
    lines += [
        "",
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
        dsn = stack.enter_context(self_contained_database(settings)) if args.self_contained \
            else str(args.dsn)
        if not args.self_contained:
            log.info("using %s; its worker's thread and model settings are its own", dsn)
        bench = Bench(dsn, settings, args.k, args.max_tokens)
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
