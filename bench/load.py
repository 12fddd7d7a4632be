"""Loading the embedding matrix from PostgreSQL: themis' block loader against one COPY.

    python bench/load.py --dsn "host=/tmp port=5433 user=pguser dbname=postgres" \
        --rows 1000000 --dim 384 --fill

``--fill`` creates a minimal ``themis.documents (id, embedding vector)`` and fills it with
clustered unit vectors through a binary COPY built with NumPy.  Then, for the peer (one binary
``COPY (SELECT id, embedding) TO STDOUT`` parsed with one NumPy dtype, what the worker did
before) and the block loader at several connection counts: seconds and rows/s to host memory,
and, where CuPy sees a GPU, the host→device copy into a ``CupyStore`` (the block loader
gathers straight into the store's host buffer).  Then the
warm restart's data path: the store exported to an index snapshot file (snapshot.py) and
loaded back as the worker does (the ids, then the rows through the GPU store's pinned staging
buffers, ``CupyStore.load_rows``; the database's part of a warm start is one small query and
the changes since).  Every result is checked against the generated vectors.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np
import psycopg

from themis_pg.retrieval import loader
from themis_pg.retrieval.index import normalize_in_place

log = logging.getLogger("bench.load")


def copy_rows_dtype(dim: int) -> np.dtype[Any]:
    return np.dtype([("n", ">i2"), ("l1", ">i4"), ("id", ">i8"), ("l2", ">i4"),
                     ("dim", ">i2"), ("u", ">i2"), ("v", ">f4", (dim,))])


def fill(dsn: str, rows: int, dim: int) -> np.ndarray:
    # Clustered unit vectors (2,000 clusters), like real embeddings and bench/retrieval.py.
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2000, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vectors = centers[rng.integers(0, 2000, rows)]
    vectors += 0.3 / np.sqrt(dim) * rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE SCHEMA IF NOT EXISTS themis")
        conn.execute("DROP TABLE IF EXISTS themis.documents")
        conn.execute(f"CREATE TABLE themis.documents (id bigint PRIMARY KEY, "
                     f"embedding vector({dim}))")
        started = time.perf_counter()
        with conn.cursor().copy("COPY themis.documents (id, embedding) FROM STDIN "
                                "(FORMAT binary)") as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") * 2)
            step = 50_000
            for s in range(0, rows, step):
                e = min(s + step, rows)
                block = np.zeros(e - s, copy_rows_dtype(dim))
                block["n"], block["l1"], block["l2"] = 2, 8, 4 + 4 * dim
                block["id"] = np.arange(s + 1, e + 1)
                block["dim"] = dim
                block["v"] = vectors[s:e]
                copy.write(block.tobytes())
            copy.write((-1).to_bytes(2, "big", signed=True))
        conn.execute("VACUUM ANALYZE themis.documents")
        log.info("filled %d rows in %.1f s", rows, time.perf_counter() - started)
    return vectors


def peer_copy(dsn: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """One binary COPY, one message per row, parsed with one NumPy dtype."""
    buf = bytearray()
    with psycopg.connect(dsn) as conn, conn.cursor().copy(
            "COPY (SELECT id, embedding FROM themis.documents) TO STDOUT (FORMAT binary)") as cp:
        for chunk in cp:
            buf += chunk
    body = memoryview(buf)[19:len(buf) - 2]
    rows = np.frombuffer(body, np.dtype([("n", ">i2"), ("l1", ">i4"), ("id", ">i8"),
                                         ("l2", ">i4"), ("dim", ">i2"), ("u", ">i2"),
                                         ("v", ">f4", (dim,))]))
    return rows["id"].astype(np.int64), rows["v"].astype(np.float32)


def themis_load(dsn: str, dim: int, connections: int,
                allocate: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The worker's cold read: the block loader, then the rows scaled to unit length in place
    (as ``VectorIndex.load`` does; the generated rows already are, so the check still holds)."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        ids, vectors = loader.load_embeddings(
            conn, dim, connections=connections,
            connect=lambda: psycopg.connect(dsn, autocommit=True), allocate=allocate)
    normalize_in_place(vectors)
    return ids, vectors


def host_allocator(dim: int) -> Any:
    """The allocator of a CupyStore (its host buffer: pageable since 2026-12-03, see
    CupyStore.host_buffer), None without a GPU."""
    try:
        from themis_pg.retrieval.cupy_store import CupyStore, cupy_available
    except ImportError:
        return None
    return CupyStore(dim).host_buffer if cupy_available() else None


def warm_restart(ids: np.ndarray, vectors: np.ndarray, dim: int, folder: str,
                 threads: int, runs: int = 3) -> dict[str, float]:
    """Seconds to write an index snapshot of a loaded GPU store, and to load it back into a
    fresh GPU store as a worker's warm start does (median of ``runs``; the file is in the
    page cache, as after a worker restart on the same host): the header and ids, then
    ``CupyStore.load_rows`` on ``threads`` staging threads (its pinned buffers are given
    back after every load, so each run pins its own, as a new process would)."""
    import statistics
    from pathlib import Path

    import cupy as cp

    from themis_pg.retrieval.cupy_store import CupyStore
    from themis_pg.retrieval.snapshot import SnapshotMeta, read_header, read_ids, write_file

    store = CupyStore(dim)
    store.replace_all(ids, vectors)
    path = Path(folder) / "bench.snapshot"
    t0 = time.perf_counter()
    out_ids, out_vecs = store.export()
    meta = SnapshotMeta(token="bench", model="bench", dim=dim, rows=len(out_ids), watermark=0,
                        seen={}, pending=[])
    write_file(path, meta, out_ids, out_vecs)
    write_s = time.perf_counter() - t0
    del store, out_vecs
    cp.get_default_memory_pool().free_all_blocks()
    reads, gpus = [], []
    for _ in range(runs):
        fresh = CupyStore(dim)
        cp.cuda.Device().synchronize()
        t1 = time.perf_counter()
        got_ids, source = read_ids(path, read_header(path))
        t2 = time.perf_counter()
        fresh.load_rows(got_ids, source, threads=threads)
        cp.cuda.Device().synchronize()
        reads.append(t2 - t1)
        gpus.append(time.perf_counter() - t2)
        got_ids, got_vecs = fresh.export()
        assert np.array_equal(got_ids, ids) and np.array_equal(got_vecs, vectors)
        del fresh, got_vecs
        cp.get_default_memory_pool().free_all_blocks()
    path.unlink()
    return {"write_s": write_s, "read_s": statistics.median(reads),
            "gpu_s": statistics.median(gpus)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--fill", action="store_true")
    ap.add_argument("--connections", default="1,4,8,16")
    ap.add_argument("--snapshot-dir", default="/tmp",
                    help="where the warm-restart run writes its snapshot file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    expected = fill(args.dsn, args.rows, args.dim) if args.fill else None
    results = []
    runs: list[tuple[str, Any]] = [("one COPY (peer)", lambda: peer_copy(args.dsn, args.dim))]
    allocate = host_allocator(args.dim)
    runs += [(f"themis blocks, {c} conn", lambda c=c: themis_load(args.dsn, args.dim, int(c),
                                                                  allocate))
             for c in args.connections.split(",")]
    for label, fn in runs:
        fn()  # warm the server's cache
        t0 = time.perf_counter()
        ids, vecs = fn()
        seconds = time.perf_counter() - t0
        if expected is not None:
            order = np.argsort(ids)
            assert len(ids) == args.rows and np.array_equal(ids[order], np.arange(1, args.rows + 1))
            # the themis rows were scaled to unit length again: equal to a few ulps
            assert np.allclose(vecs[order], expected, rtol=0, atol=1e-6), label
        gpu = None
        try:
            import cupy as cp

            from themis_pg.retrieval.cupy_store import CupyStore

            store = CupyStore(args.dim)
            cp.cuda.Device().synchronize()
            t1 = time.perf_counter()
            store.replace_all(ids, vecs)
            cp.cuda.Device().synchronize()
            gpu = time.perf_counter() - t1
            del store
            cp.get_default_memory_pool().free_all_blocks()
        except ImportError:
            pass
        results.append((label, seconds, gpu))
        log.info("%s: %.2f s", label, seconds)
    warm = None
    warm_by_threads: dict[int, dict[str, float]] = {}
    if allocate is not None:
        from themis_pg.retrieval.cupy_store import STAGE_THREADS

        for threads in sorted({4, 8, 16, STAGE_THREADS}):
            warm_by_threads[threads] = warm_restart(ids, vecs, args.dim, args.snapshot_dir,
                                                    threads)
            log.info("warm restart, %d staging threads: %s", threads, warm_by_threads[threads])
        warm = warm_by_threads[STAGE_THREADS]
    print(f"| path ({args.rows:,} x {args.dim}) | to host s | rows/s | to GPU s | total s |")
    print("| --- | --- | --- | --- | --- |")
    for label, seconds, gpu in results:
        total = seconds + (gpu or 0.0)
        print(f"| {label} | {seconds:.2f} | {args.rows / seconds:,.0f} | "
              f"{'–' if gpu is None else f'{gpu:.2f}'} | {total:.2f} |")
    for threads, w in warm_by_threads.items():
        total = w["read_s"] + w["gpu_s"]
        mark = " (the default)" if w is warm else ""
        print(f"| index snapshot (warm restart): ids, then rows staged on {threads} threads"
              f"{mark} | {w['read_s']:.3f} | – | {w['gpu_s']:.3f} | {total:.3f} |")
    if warm is not None:
        print(f"\nsnapshot written in {warm['write_s']:.2f} s (export from the GPU + file)")


if __name__ == "__main__":
    main()
