"""``themis_rag`` through SQL under pgbench, against the same engine in-process.

    python bench/sql_rag.py --dsn "$DSN" --fill 2000                  # documents
    # a worker with THEMIS_MAX_SEQUENCES=64 running, then:
    python bench/sql_rag.py --dsn "$DSN" --sql --pgbench "$PG/pgbench" --clients 64 --calls 2
    # the worker stopped, then (the same engine, built from the same settings):
    python bench/sql_rag.py --dsn "$DSN" --engine --model m.gguf --clients 64 --calls 2

``--fill N`` inserts N documents of ``--words`` random words without embeddings (the worker
embeds them).  ``--sql`` runs pgbench with a custom script: each of ``--clients`` clients
calls ``themis_rag(query, k, max_tokens => M)`` ``--calls`` times, the query drawn from
``QUERIES`` numbered texts; pgbench gives requests/s and failed calls.  ``--engine`` builds the
worker's generation engine from the same settings (``Worker._engine``) in this process and
gives it the same requests: each query's prompt from the ``k`` documents ``themis_search``
returns for it (read once beforehand, so both sides generate from the same prompts),
``--clients x --calls`` of them submitted at once (the engine runs at most its
``max_sequences`` together).  ``--json`` appends each side's figures to one file.
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

log = logging.getLogger("bench.sql_rag")

QUERIES = 128
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


def run_pgbench(args: argparse.Namespace) -> dict[str, Any]:
    script = (f"\\set id random(1, {QUERIES})\n"
              f"SELECT themis_rag('Question ' || :id || ': how do I rotate the key?', {args.k}, "
              f"max_tokens => {args.max_tokens});\n")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    cmd = [args.pgbench, "-n", "-c", str(args.clients), "-j", str(min(args.clients, 16)),
           "-t", str(args.calls), "-f", f.name, args.dsn]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    log.info("pgbench: %s\n%s", done.stdout[-2000:], done.stderr[-2000:])
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    return {"path": f"SQL, pgbench -c {args.clients}", "requests_per_s":
            float(tps.group(1)) if tps else None,
            "failed": int(failed.group(1)) if failed else None,
            "processed": int(processed.group(1)) if processed else None, "wall_s": wall,
            "returncode": done.returncode}


def prompts(args: argparse.Namespace) -> list[Any]:
    """The requests the SQL side makes: for each query its top-k documents, as the worker
    sees them."""
    from themis_pg.pl.payloads import Context, GeneratePayload

    rng = np.random.default_rng(2)
    out = []
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        by_query = {}
        for i in range(1, QUERIES + 1):
            q = f"Question {i}: how do I rotate the key?"
            rows = conn.execute("SELECT id, content FROM themis_search(%s, %s)",
                                (q, args.k)).fetchall()
            by_query[i] = (q, tuple(Context(int(r[0]), str(r[1])) for r in rows))
    for i in rng.integers(1, QUERIES + 1, args.clients * args.calls):
        q, ctx = by_query[int(i)]
        out.append(GeneratePayload("rag", args.max_tokens, 0.0, query=q, contexts=ctx))
    return out


def run_engine_alone(args: argparse.Namespace, reqs: list[Any]) -> dict[str, Any]:
    from generation import run_engine

    from themis_pg.config import Settings
    from themis_pg.worker.process import Worker

    engine = Worker._engine(Settings(), "bench", args.model, lambda use: Path(use.sha256))
    try:
        run_engine(engine, reqs[:2])  # warm
        row = run_engine(engine, reqs)
    finally:
        engine.close()
    return dict(row, path=f"engine alone, {len(reqs)} requests")


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
    ap.add_argument("--prompts", type=Path, default=Path("/tmp/sql_rag_prompts.json"),
                    help="where --sql leaves the requests for --engine")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2)
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
        reqs = prompts(args)  # also warms every backend-independent path
        args.prompts.write_text(json.dumps([r.to_json() for r in reqs]))
        rows.append(run_pgbench(args))
    if args.engine:
        from themis_pg.pl.payloads import Context, GeneratePayload

        reqs = [GeneratePayload("rag", r["max_tokens"], 0.0, query=r["query"],
                                contexts=tuple(Context(**c) for c in r["contexts"]))
                for r in json.loads(args.prompts.read_text())]
        rows.append(run_engine_alone(args, reqs))
    for r in rows:
        print(json.dumps(r))
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
