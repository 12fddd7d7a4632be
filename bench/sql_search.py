"""``themis_search`` through SQL on a large corpus, beside pgvector HNSW from the same clients.

    python bench/sql_search.py --dsn "$DSN" --fill 1000000 --embedding-model emb.gguf
    THEMIS_DSN="$DSN" themis worker --kinds search,embed &   # then, once it is ready:
    python bench/sql_search.py --dsn "$DSN" --measure

``--fill N`` registers the embedding model (default embedding, dim from its header) and
writes N documents into the real schema with one binary COPY: content ``doc <id>``, metadata
``{"b": id % 100}`` (so ``filter => '{"b": 7}'`` selects 1%), clustered unit vectors (as
bench/load.py).  ``--measure`` then, against a live worker:

* ``themis_search(q, k)`` from one client (p50/p99 ms; distinct query texts, so every call
  embeds its query on the worker) and from ``--clients`` clients (queries/s, p50/p99);
* the same with the 1% filter, checking every result matches it and that k come back;
* a committed 1,000-row change: the next call finds a new row (the worker embeds rows
  inserted without an embedding before the next search);
* pgvector: an HNSW index (m=16, ef_construction=64, inner product, every core) on the same
  rows, queried at ef_search 40 with the same queries' embeddings (``themis_embed``, taken
  before) from one client and from ``--clients``: the peer the bar names.

Prints Markdown; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

log = logging.getLogger("bench.sql_search")

WORDS = ("key", "rotate", "certificate", "server", "client", "table", "index", "vacuum",
         "replica", "backup", "restore", "query", "plan", "cache", "lock", "commit", "role",
         "grant", "schema", "worker", "queue", "vector", "model")
SEARCH = "SELECT id, metadata FROM themis_search(%s, %s, filter => %s::jsonb)"
HNSW = ("SELECT id FROM themis.documents ORDER BY embedding::vector({dim}) <#> %s::vector "
        "LIMIT %s")


def fill(dsn: str, rows: int, model: Path) -> None:
    from themis_pg.lora.adapter_file import base_model_number
    from themis_pg.models.registry import register_model

    with psycopg.connect(dsn, autocommit=True) as conn:
        dim = base_model_number(model, "bert.embedding_length") or 384
        register_model(conn, "bench-embedding", "embedding", model, default=True,
                       params={"dim": dim, "pooling": "mean", "max_tokens": 512})
        conn.execute("INSERT INTO themis.corpus (embedding_model, dim) VALUES (%s, %s) "
                     "ON CONFLICT (singleton) DO UPDATE SET embedding_model = "
                     "EXCLUDED.embedding_model, dim = EXCLUDED.dim", ("bench-embedding", dim))
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((2000, dim)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        row = np.dtype([("n", ">i2"), ("l1", ">i4"), ("content", "S12"), ("l2", ">i4"),
                        ("jv", "u1"), ("meta", "S9"), ("l3", ">i4"), ("dim", ">i2"),
                        ("u", ">i2"), ("v", ">f4", (dim,))])
        started = time.perf_counter()
        with conn.cursor().copy("COPY themis.documents (content, metadata, embedding) FROM "
                                "STDIN (FORMAT binary)") as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") * 2)
            step = 50_000
            for s in range(0, rows, step):
                e = min(s + step, rows)
                ids = np.arange(s + 1, e + 1)
                v = centers[rng.integers(0, 2000, e - s)]
                v += 0.3 / np.sqrt(dim) * rng.standard_normal(v.shape).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                block = np.zeros(e - s, row)
                block["n"], block["l1"], block["l2"], block["jv"] = 3, 12, 10, 1  # jsonb: version 1
                block["l3"], block["dim"], block["v"] = 4 + 4 * dim, dim, v
                block["content"] = [f"doc {i:08d}".encode() for i in ids]
                block["meta"] = [f'{{"b": {i % 100:2d}}}'.encode() for i in ids]
                copy.write(block.tobytes())
            copy.write(b"\xff\xff")
        log.info("filled %d rows in %.1f s", rows, time.perf_counter() - started)
        conn.execute("VACUUM ANALYZE themis.documents")


def one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params or None).fetchone()
    assert row is not None, sql
    return row[0]


def job_times(dsn: str, since: float) -> dict[str, Any]:
    """Medians (ms) of queue wait and worker service over the search jobs since ``since``:
    where a call's time goes besides the bus and SPI."""
    def med(expr: str) -> str:
        return f"percentile_cont(0.5) WITHIN GROUP (ORDER BY {expr})"

    exprs = ["extract(epoch FROM started_at - created_at) * 1000",
             "extract(epoch FROM finished_at - started_at) * 1000"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT " + ", ".join(med(e) for e in exprs) + ", count(*) FROM themis.jobs "
            "WHERE kind = 'search' AND created_at >= to_timestamp(%s)", (since,)).fetchone()
        # the slowest jobs, to tell a slow worker from a slow caller in the latency tail
        slow = conn.execute(
            f"SELECT {exprs[0]}, {exprs[1]} FROM themis.jobs WHERE kind = 'search' AND "
            "created_at >= to_timestamp(%s) "
            "ORDER BY finished_at - created_at DESC NULLS LAST LIMIT 5",
            (since,)).fetchall()
    assert row is not None
    return {"job_wait_ms": float(row[0] or 0), "job_service_ms": float(row[1] or 0),
            "jobs": int(row[2]),
            "slowest_jobs_wait_service_ms": [[round(float(a or 0), 1), round(float(b or 0), 1)]
                                             for a, b in slow]}


def search_figures(dsn: str) -> dict[str, float]:
    """The worker's search counters (themis_stats(), published with each heartbeat)."""
    time.sleep(2.5)  # one heartbeat after the last call
    with psycopg.connect(dsn, autocommit=True) as conn:
        (w,) = one(conn, "SELECT themis_stats()")["workers"]
    s = w["stats"]["searches"]
    return {"batches": s["batches"], "queries": s["queries"], "topk_ms": s["total_ms"],
            "embed_ms": s["embed_total_ms"], "uncertified": s.get("uncertified_queries", 0)}


def per_batch(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean batch size and mean embed / top-k ms per batch between two readings."""
    n = max(after["batches"] - before["batches"], 1)
    return {"mean_batch": (after["queries"] - before["queries"]) / n,
            "embed_ms_per_batch": (after["embed_ms"] - before["embed_ms"]) / n,
            "topk_ms_per_batch": (after["topk_ms"] - before["topk_ms"]) / n,
            "uncertified": after["uncertified"] - before["uncertified"]}


def query_texts(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [f"how do I {' '.join(rng.choice(WORDS, 6))} ({i})" for i in range(n)]


def timed(run: Callable[[psycopg.Connection[Any], int], None], dsn: str, clients: int,
          calls: int) -> dict[str, Any]:
    """``calls`` calls of ``run(conn, i)`` per client, each client on its own connection."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    # Queries/s count from the moment every client is connected and warm: a backend's first
    # call starts its Python interpreter and bus connection, which is not steady-state work.
    ready = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                run(conn, c)  # warm: the backend's first call sets up its bus connection
                ready.wait()
                for j in range(calls):
                    t0 = time.perf_counter()
                    run(conn, c + clients * (j + 1))
                    lat[c].append((time.perf_counter() - t0) * 1000)
        except BaseException as exc:  # reported below
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: raised below
        ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    flat = [x for xs in lat for x in xs]
    return {"clients": clients, "calls": len(flat), "p50_ms": statistics.median(flat),
            "p99_ms": float(np.percentile(flat, 99)), "queries_per_s": len(flat) / wall,
            "slowest_calls_ms": [round(x, 1) for x in sorted(flat)[-5:][::-1]]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    texts = query_texts(args.queries)
    k = args.k
    out: dict[str, Any] = {"k": k}

    def search(flt: str | None) -> Callable[[psycopg.Connection[Any], int], None]:
        def run(conn: psycopg.Connection[Any], i: int) -> None:
            rows = conn.execute(SEARCH, (texts[i % len(texts)], k, flt)).fetchall()
            assert len(rows) == k, (len(rows), flt)
            if flt is not None:
                assert all(m == json.loads(flt) for _, m in rows), rows
        return run

    levels: list[tuple[str, str | None, int]] = [
        (f"themis_search x{c}", None, c) for c in (1, args.clients)]
    levels.append(("themis_search 1% filter x1", '{"b": 7}', 1))
    for name, flt, c in levels:
        calls = args.calls if c == 1 else max(args.calls // 4, 10)
        since, before = time.time(), search_figures(args.dsn)
        out[name] = timed(search(flt), args.dsn, c, calls)
        out[name].update(job_times(args.dsn, since))
        out[name].update(per_batch(before, search_figures(args.dsn)))
        log.info("%s: %s", name, out[name])
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        dim = int(one(conn, "SELECT dim FROM themis.corpus"))
        new = [f"fresh row {i} about {WORDS[i % len(WORDS)]}" for i in range(1000)]
        with conn.transaction():
            conn.cursor().executemany("INSERT INTO themis.documents (content) VALUES (%s)",
                                      [(t,) for t in new])
        t0 = time.perf_counter()
        top = conn.execute("SELECT content FROM themis_search(%s, 1)", (new[123],)).fetchone()
        out["change"] = {"rows": 1000, "next_call_ms": (time.perf_counter() - t0) * 1000,
                         "found": top is not None and top[0] == new[123]}
        log.info("a committed 1,000-row change: %s", out["change"])
        if args.themis_only:
            out["stats"] = one(conn, "SELECT themis_stats()")
            return out
        vectors = [str(one(conn, "SELECT themis_embed(%s)::text", t))
                   for t in texts[: args.calls + 50]]
        conn.execute("SET maintenance_work_mem = '8GB'")
        conn.execute(f"SET max_parallel_maintenance_workers = {args.build_workers}")
        t0 = time.perf_counter()
        conn.execute(f"CREATE INDEX IF NOT EXISTS documents_hnsw ON themis.documents USING hnsw "
                     f"((embedding::vector({dim})) vector_ip_ops) WITH (m = 16, "
                     f"ef_construction = 64)")
        out["hnsw_build_s"] = time.perf_counter() - t0
        out["stats"] = one(conn, "SELECT themis_stats()")
        log.info("HNSW built in %.1f s", out["hnsw_build_s"])
    sql = HNSW.format(dim=dim)

    def hnsw(conn: psycopg.Connection[Any], i: int) -> None:
        if i < args.clients:
            conn.execute("SET hnsw.ef_search = 40")
        conn.execute(sql, (vectors[i % len(vectors)], k)).fetchall()

    for c in (1, args.clients):
        calls = args.calls if c == 1 else max(args.calls // 4, 10)
        out[f"pgvector HNSW ef 40 x{c}"] = timed(hnsw, args.dsn, c, calls)
    return out


def report(out: dict[str, Any]) -> None:
    print(f"themis_search(q, {out['k']}) through SQL (query embedding included) and pgvector "
          "HNSW (m=16, ef_construction=64, ef_search 40; query vectors given) on the same "
          "rows\n")
    print("| path | clients | calls | p50 ms | p99 ms | queries/s | job wait p50 ms | "
          "job service p50 ms | mean batch | embed ms / batch | top-k ms / batch | "
          "searched again |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in out.items():
        if isinstance(r, dict) and "p50_ms" in r:
            jobs = (f"{r['job_wait_ms']:.2f} | {r['job_service_ms']:.2f} | "
                    f"{r['mean_batch']:.1f} | {r['embed_ms_per_batch']:.2f} | "
                    f"{r['topk_ms_per_batch']:.2f} | {r['uncertified']}" if "jobs" in r
                    else "– | – | – | – | – | –")
            print(f"| {name} | {r['clients']} | {r['calls']} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | {r['queries_per_s']:.0f} | {jobs} |")
    for name, r in out.items():
        if isinstance(r, dict) and "slowest_calls_ms" in r:
            print(f"\n{name}: slowest calls {r['slowest_calls_ms']} ms" + (
                f"; slowest jobs (wait, service) {r['slowest_jobs_wait_service_ms']} ms"
                if "slowest_jobs_wait_service_ms" in r else ""))
    ch = out["change"]
    print(f"\nA committed {ch['rows']}-row change: the next call took {ch['next_call_ms']:.0f} "
          f"ms and {'found' if ch['found'] else 'DID NOT find'} a new row."
          + (f" HNSW build {out['hnsw_build_s']:.1f} s." if "hnsw_build_s" in out else "")
          + "\n\nthemis_stats() at the end:\n")
    print(json.dumps(out["stats"], indent=1)[:3000])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--fill", type=int, default=None)
    ap.add_argument("--embedding-model", type=Path, default=None)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--build-workers", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--themis-only", action="store_true",
                    help="skip pgvector (a second worker setting on the same rows)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.fill is not None:
        if args.embedding_model is None:
            ap.error("--fill needs --embedding-model")
        fill(args.dsn, args.fill, args.embedding_model)
    if args.measure:
        out = measure(args)
        report(out)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
