"""``themis_rag`` through SQL under pgbench, against the same engine in-process.

    python bench/sql_rag.py --dsn "$DSN" --fill 2000                  # documents
    # a worker with THEMIS_MAX_SEQUENCES=64 running, then:
    python bench/sql_rag.py --dsn "$DSN" --sql --pgbench "$PG/pgbench" --clients 64 --calls 8
    # the worker stopped, then (the same engine, built from the same settings):
    python bench/sql_rag.py --dsn "$DSN" --engine --model m.gguf --clients 64 --calls 8

``--fill N`` inserts N documents of ``--words`` random words without embeddings (the worker
embeds them).  ``--sql`` warms the worker with two calls, one after the other, then runs
pgbench with a custom script: each of ``--clients`` clients calls ``themis_rag(query, k,
max_tokens => M)`` ``--calls`` times, the query drawn from ``QUERIES`` numbered texts; pgbench
gives requests/s and failed calls, and its per-transaction log the latency of each client's
first call (a new backend) against its later ones (``call_latencies``).  It then reads
back, from the jobs table, each kind's mean queue wait and run time, the generation requests
the worker ran, in the order it took them (warm-up first), and the worker's engine figures
from ``themis_stats()``.  ``--engine`` builds the worker's generation engine from
the same settings (``Worker._engine``) in this process and gives it the same requests: the
same two warm-up calls one after the other, then every request pgbench made, in the order
the worker took them, submitted at once (the engine runs at most ``max_sequences``
together).  The order matters: the engine learns its cached prefix from consecutive
prompts, so both sides must see the same sequence.  ``--json`` appends each side's figures
to one file.  ``--without-kept`` runs the engine alone once more with streams that keep no
prompt cells (``BatchEngine.keep_prompts``): what keeping them saves.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (libllama before NumPy: themis_pg.generation.load_llama_first)
import numpy as np
import psycopg
from generation import engine_figures, run_engine

log = logging.getLogger("bench.sql_rag")

QUERIES = 128
WARM_CALLS = 2
WORDS = ("rotate", "key", "cluster", "backup", "index", "replica", "vacuum", "certificate",
         "token", "shard", "lease", "worker", "snapshot", "schema", "commit", "restore",
         "policy", "channel", "socket", "buffer")


def fill(dsn: str, rows: int, words: int) -> None:
    rng = np.random.default_rng(0)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.cursor().executemany(
            "INSERT INTO themis.documents (content) VALUES (%s)",
            [(" ".join(rng.choice(WORDS, words)),) for _ in range(rows)])
    log.info("inserted %d documents of %d words", rows, words)


def rag_sql(args: argparse.Namespace, query_id: int | str) -> str:
    return (f"SELECT themis_rag('Question ' || {query_id} || ': how do I rotate the key?', "
            f"{args.k}, max_tokens => {args.max_tokens})")


def one(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return row[0]


def run_pgbench(args: argparse.Namespace) -> dict[str, Any]:
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        for _ in range(WARM_CALLS):  # as the engine alone is warmed
            conn.execute(rag_sql(args, 1))
        first_job = one(conn, "SELECT coalesce(max(id), 0) FROM themis.jobs")
    script = f"\\set id random(1, {QUERIES})\n{rag_sql(args, ':id')};\n"
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    logs = Path(tempfile.mkdtemp(prefix="pgbench-log-"))
    cmd = [args.pgbench, "-n", "-c", str(args.clients), "-j", str(min(args.clients, 16)),
           "-t", str(args.calls), "-f", f.name, "-l", f"--log-prefix={logs}/tx", args.dsn]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    calls = call_latencies(logs)
    log.info("pgbench: %s\n%s", done.stdout[-2000:], done.stderr[-2000:])
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    time.sleep(2.5)  # one heartbeat after the last call: themis_stats() is up to date
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        stats = one(conn, "SELECT themis_stats()")
        taken = [row[0] for row in conn.execute(
            "SELECT payload FROM themis.jobs WHERE kind = 'generate' ORDER BY started_at, id")]
        n_warm = one(conn, "SELECT count(*) FROM themis.jobs WHERE kind = 'generate' "
                     "AND id <= %s", (first_job,))
        jobs = {kind: {"jobs": n, "wait_ms": round(wait, 1), "run_ms": round(run, 1)}
                for kind, n, wait, run in conn.execute(
                    "SELECT kind, count(*), "
                    "1000 * extract(epoch FROM avg(started_at - created_at))::float8, "
                    "1000 * extract(epoch FROM avg(finished_at - started_at))::float8 "
                    "FROM themis.jobs WHERE id > %s GROUP BY kind", (first_job,))}
    args.prompts.write_text(json.dumps({"warm": n_warm, "requests": taken}))
    (worker,) = stats["workers"]
    return {"path": f"SQL, pgbench -c {args.clients}", "requests_per_s":
            float(tps.group(1)) if tps else None,
            "failed": int(failed.group(1)) if failed else None,
            "processed": int(processed.group(1)) if processed else None, "wall_s": wall,
            "returncode": done.returncode, "calls": calls, "jobs": jobs,
            "engine": engine_figures(worker["stats"]["generation"])}


def call_latencies(logs: Path) -> dict[str, Any]:
    """From pgbench's per-transaction log: the latency of each client's first call (a new
    backend: PL/Python's interpreter and imports, the bus connection) and of the later ones,
    and the closed loop's steady rate, clients / the later calls' mean latency (Little's
    law), which the first calls do not weigh on."""
    by_client: dict[int, list[tuple[int, float]]] = {}
    for path in logs.glob("tx*"):
        for line in path.read_text().splitlines():
            client, number, latency_us = (int(x) for x in line.split()[:3])
            by_client.setdefault(client, []).append((number, latency_us / 1e6))
        path.unlink()
    logs.rmdir()
    calls = [sorted(c) for c in by_client.values()]
    first = [c[0][1] for c in calls]
    later = [latency for c in calls for _, latency in c[1:]]
    out: dict[str, Any] = {"first_mean_s": round(float(np.mean(first)), 3) if first else None,
                           "later_mean_s": round(float(np.mean(later)), 3) if later else None}
    if later:
        out["steady_requests_per_s"] = round(len(by_client) / float(np.mean(later)), 3)
    return out


def run_engine_alone(args: argparse.Namespace, reqs: list[Any], n_warm: int,
                     keep_prompts: bool = True) -> dict[str, Any]:
    from themis_pg.config import Settings
    from themis_pg.generation.adapters import AdapterEngines
    from themis_pg.generation.batching import BatchEngine
    from themis_pg.worker.process import Worker

    BatchEngine.keep_prompts = keep_prompts  # read by the engines it builds, lazily
    engine = Worker._engine(Settings(), "bench", args.model, lambda use: Path(use.sha256))
    try:
        for warm in reqs[:n_warm]:  # one after the other, as the SQL side was warmed
            run_engine(engine, [warm])
        row = run_engine(engine, reqs[n_warm:])
        assert isinstance(engine, AdapterEngines)  # the batch engine: it has figures
        figures = engine_figures(engine.snapshot())
    finally:
        engine.close()
        BatchEngine.keep_prompts = True  # the product's setting again
    kept = "" if keep_prompts else ", streams keep no prompt"
    return dict(row, path=f"engine alone, {len(reqs) - n_warm} requests{kept}",
                engine=figures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--fill", type=int, default=0)
    ap.add_argument("--words", type=int, default=200)
    ap.add_argument("--sql", action="store_true")
    ap.add_argument("--pgbench", default="pgbench")
    ap.add_argument("--engine", action="store_true")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--without-kept", action="store_true",
                    help="--engine again with streams that keep no prompt cells")
    ap.add_argument("--prompts", type=Path, default=Path("/tmp/sql_rag_prompts.json"),
                    help="where --sql leaves the requests for --engine")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = []
    if args.fill:
        fill(args.dsn, args.fill, args.words)
    if args.sql:
        rows.append(run_pgbench(args))
    if args.engine:
        from themis_pg.pl.payloads import Limits, parse

        taken = json.loads(args.prompts.read_text())
        reqs = [parse("generate", r, Limits()) for r in taken["requests"]]
        rows.append(run_engine_alone(args, reqs, taken["warm"]))
        if args.without_kept:  # what the kept prompt cells save (the cached prefix only)
            rows.append(run_engine_alone(args, reqs, taken["warm"], keep_prompts=False))
    for r in rows:
        print(json.dumps(r))
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
