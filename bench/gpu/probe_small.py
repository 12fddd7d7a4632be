"""Stage timings of CupyStore's search paths on 1M x 384 (a diagnostic for the GPU machine):
the one-pass scan kernel at several block sizes, candidates by the scan and by the GEMM path,
the fused merge (merge_rank), the whole search from host memory, and the one-query matmul
(the read floor)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cupy as cp
import numpy as np

from themis_pg.retrieval import cupy_store as cs


def timed(label: str, fn: Callable[[], Any], runs: int = 50) -> None:
    from retrieval import timed as median_ms  # bench/retrieval.py (bench/ is on PYTHONPATH)

    print(f"{label}: {median_ms(fn, cp.cuda.Device().synchronize, runs, warmup=5):.3f} ms")


def scan_kernel(store: cs.CupyStore, q32: Any, keep: int, per: int) -> Callable[[], Any]:
    """One scan_select launch with ``per`` rows per block (outputs preallocated)."""
    n, dim = len(store), store.dim
    b = len(q32)
    blocks = -(-n // per)
    rows = cp.empty((b, blocks * keep), cp.int64)
    scores = cp.empty((b, blocks * keep), cp.float32)
    maxb = 1 << (b - 1).bit_length()
    kernel = cs._kernel(cp, cs._SCAN_SELECT, "scan_select", (f"-DDIM={dim}", f"-DMAXB={maxb}"))
    return lambda: kernel((blocks,), (cs.SCAN_THREADS,),
                          (store._half, cp.int64(n), q32, cp.int32(b), cp.int32(keep),
                           cp.int32(per), rows, scores), shared_mem=4 * b * (dim + per))


def gemm_stages(store: cs.CupyStore, q32: Any, keep: int) -> None:
    """The GEMM path's steps on its first chunk, each timed alone."""
    b, n = len(q32), len(store)
    group = cs.GROUP
    while n // group > cs.TARGET_GROUPS and group < cs.MAX_GROUP:
        group *= 2
    live = min(n, max(group, (cs.CHUNK_BYTES // (2 * b)) // group * group))
    groups = -(-live // group)
    q16 = q32.astype(cp.float16)
    scores = q16 @ store._half[:live].T
    maxima = cp.empty((b, groups), cp.float32)
    print(f"  first chunk: {live} rows, {groups} groups of {group}")
    timed("    GEMM", lambda: q16 @ store._half[:live].T)
    timed("    group_max", lambda: cs.group_max(cp, scores, live, group, maxima, 0))
    timed("    radix_topk of the maxima", lambda: cs.radix_topk(cp, maxima, keep))


def main() -> None:
    k = 10
    keep = k + cs.MARGIN
    for n, batches, pers in ((1_000_000, (1, 4, 16, 64, 1024), (256, 512, 1024, 2048, 4096)),
                             (10_000_000, (1, 64), (2048, 4096, 8192))):
        probe(n, 384, k, keep, batches, pers)
        cp.get_default_memory_pool().free_all_blocks()  # the store went with probe()


def probe(n: int, dim: int, k: int, keep: int, batches: tuple[int, ...],
          pers: tuple[int, ...]) -> None:
    print(f"== {n} x {dim}")
    rs = cp.random.RandomState(1)
    full = rs.standard_normal((n, dim), dtype=cp.float32)
    full /= cp.linalg.norm(full, axis=1, keepdims=True)
    store = cs.CupyStore(dim)
    store.replace_all(np.arange(n, dtype=np.int64), full)
    queries = cp.asnumpy(full[:max(batches)])
    del full
    for b in batches:
        host = queries[:b]
        q32 = cp.asarray(host)
        small = store._small_ok(b, keep)
        print(f"b={b}: rows per block {cs.scan_rows_per_block(n, b, dim, store._sms)}, "
              f"one pass: {small}")
        if small:
            for per in pers:
                timed(f"  scan_select kernel alone, {per} rows a block",
                      scan_kernel(store, q32, keep, per))
            cand, approx = store._candidates_scan(q32, keep)
            timed("  candidates, one-pass scan, unmerged",
                  lambda: store._candidates_scan(q32, keep))  # noqa: B023
        else:
            cand, approx = store._candidates_gemm(q32, keep, merged=False)
            gemm_stages(store, q32, keep)
        eps = cs.EPS_SCAN if small else cs.EPS_GEMM
        stages: list[tuple[str, Callable[[], Any]]] = [
            (f"merge_rank over {cand.shape[1]} candidates a query",
             lambda: store._merge_rank(q32, cand, approx, keep, k, eps)),  # noqa: B023
            ("candidates, GEMM path, unmerged",
             lambda: store._candidates_gemm(q32, keep, merged=False)),  # noqa: B023
            ("search() from host memory", lambda: store.search(host, k)),  # noqa: B023
            ("matmul alone", lambda: q32.astype(cp.float16) @ store._half[:n].T)]  # noqa: B023
        for label, fn in stages:
            timed("  " + label, fn)
        if b >= 64:  # larger score blocks: fewer chunks, fewer candidates to merge
            default = cs.CHUNK_BYTES
            for chunk in (1 << 30, 1 << 32):
                cs.CHUNK_BYTES = chunk
                timed(f"  search() with {chunk >> 20} MiB score blocks",
                      lambda: store.search(host, k))  # noqa: B023
            cs.CHUNK_BYTES = default


if __name__ == "__main__":
    main()
