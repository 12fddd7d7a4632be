"""pgvector through SQL on the rows ``bench/load.py --fill`` wrote, beside themis' GPU store.

    python bench/pgvector_peer.py --dsn "host=/tmp port=5433 user=pguser dbname=postgres"

On ``themis.documents (id, embedding vector(d))``: the exact scan (``ORDER BY embedding <#> q
LIMIT k`` with index scans off), then an HNSW index (m=16, ef_construction=64, inner product)
built with every core, queried at each ``--ef`` from one client (p50/p99 ms, recall@k against
a float64 NumPy reference) and from ``--clients`` threads at once (queries/s).  Where CuPy sees
a GPU, the same queries against a ``CupyStore`` loaded from the same rows (in-process: no SQL,
no query embedding; the SQL path's own cost is measured by bench/rag_latency.py) go in the
same table.  Prints Markdown; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from typing import Any

import numpy as np
import psycopg
from load import themis_load

log = logging.getLogger("bench.pgvector_peer")

SEARCH = "SELECT id FROM themis.documents ORDER BY embedding <#> %s::vector LIMIT %s"


def vec(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in v) + "]"


def recall(got: list[list[int]], ref: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(r.tolist())) / len(r) for g, r in zip(got, ref,
                                                                              strict=True)]))


def one_client(dsn: str, queries: np.ndarray, k: int, setup: list[str]
               ) -> tuple[list[float], list[list[int]]]:
    times, ids = [], []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in setup:
            conn.execute(s)
        for q in queries[:3]:
            conn.execute(SEARCH, (vec(q), k)).fetchall()  # warm the plan and the cache
        for q in queries:
            t0 = time.perf_counter()
            rows = conn.execute(SEARCH, (vec(q), k)).fetchall()
            times.append((time.perf_counter() - t0) * 1000)
            ids.append([int(r[0]) for r in rows])
    return times, ids


def many_clients(dsn: str, queries: np.ndarray, k: int, setup: list[str], clients: int,
                 seconds: float) -> float:
    """Queries/s from ``clients`` threads, each on its own connection, for ``seconds``."""
    done = [0] * clients
    stop = time.perf_counter() + seconds
    texts = [vec(q) for q in queries]

    def run(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for s in setup:
                conn.execute(s)
            j = i
            while time.perf_counter() < stop:
                conn.execute(SEARCH, (texts[j % len(texts)], k)).fetchall()
                done[i] += 1
                j += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=5)
    ap.add_argument("--ef", default="40,200")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    k = args.k
    with psycopg.connect(args.dsn) as conn:
        dim = int(conn.execute("SELECT vector_dims(embedding) FROM themis.documents "
                               "LIMIT 1").fetchone()[0])  # type: ignore[index]
    ids, vectors = themis_load(args.dsn, dim, 16)
    rows = len(ids)
    # Queries near the data (rows of the table plus noise), exact float64 reference.
    rng = np.random.default_rng(5)
    picks = vectors[rng.integers(0, rows, args.queries)]
    queries = picks + 0.3 * rng.standard_normal(picks.shape).astype(np.float32) / np.sqrt(dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    ref = ids[np.argsort(-scores, axis=1)[:, :k]]
    del scores
    results: list[dict[str, Any]] = []

    def add(path: str, times: list[float], got: list[list[int]], refs: np.ndarray,
            qps: float | None = None) -> None:
        e = {"path": path, "p50_ms": statistics.median(times),
             "p99_ms": float(np.percentile(times, 99)), "recall": recall(got, refs),
             "qps_clients": qps}
        results.append(e)
        log.info("%s", e)

    no_index = ["SET enable_indexscan = off", "SET max_parallel_workers_per_gather = 0"]
    times, got = one_client(args.dsn, queries[:args.exact_queries], k, no_index)
    add("pgvector exact scan (1 core)", times, got, ref[:args.exact_queries])
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute("SET max_parallel_maintenance_workers = 15")
        conn.execute("SET maintenance_work_mem = '8GB'")
        conn.execute("DROP INDEX IF EXISTS themis.documents_hnsw")
        t0 = time.perf_counter()
        conn.execute("CREATE INDEX documents_hnsw ON themis.documents USING hnsw "
                     "(embedding vector_ip_ops) WITH (m = 16, ef_construction = 64)")
        build_s = time.perf_counter() - t0
        size = conn.execute("SELECT pg_relation_size('themis.documents_hnsw')").fetchone()
    log.info("HNSW built in %.1f s (%s bytes)", build_s, size)
    for ef in (int(x) for x in args.ef.split(",")):
        setup = [f"SET hnsw.ef_search = {ef}"]
        times, got = one_client(args.dsn, queries, k, setup)
        qps = many_clients(args.dsn, queries, k, setup, args.clients, args.seconds)
        add(f"pgvector HNSW ef_search {ef}", times, got, ref, qps)
    try:
        import cupy as cp

        from themis_pg.retrieval.cupy_store import CupyStore, cupy_available
        if cupy_available():
            store = CupyStore(dim)
            store.replace_all(ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
            store.search(queries[:3], k)
            times, got = [], []
            for q in queries:
                cp.cuda.Device().synchronize()
                t0 = time.perf_counter()
                hits = store.search(q[None, :], k)[0]
                times.append((time.perf_counter() - t0) * 1000)
                got.append([i for i, _ in hits])
            add("themis CupyStore, exact (in-process, 1 query at a time)", times, got, ref)
    except ImportError:
        pass
    print(f"{rows:,} x {dim}, k={k}, {args.queries} queries; HNSW (m=16, ef_construction=64) "
          f"built in {build_s:.1f} s, {int(size[0]) / 2**30:.2f} GiB")  # type: ignore[index]
    print()
    print(f"| path | p50 ms | p99 ms | recall@{k} | queries/s, {args.clients} clients |")
    print("| --- | --- | --- | --- | --- |")
    for e in results:
        rate = "–" if e["qps_clients"] is None else f"{e['qps_clients']:,.0f}"
        print(f"| {e['path']} | {e['p50_ms']:.3f} | {e['p99_ms']:.3f} | {e['recall']:.3f} | "
              f"{rate} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rows": rows, "dim": dim, "build_s": build_s, "results": results}, out,
                      indent=1)


if __name__ == "__main__":
    main()
