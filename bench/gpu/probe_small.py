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


def main() -> None:
    n, dim, k = 1_000_000, 384, 10
    keep = k + cs.MARGIN
    rs = cp.random.RandomState(1)
    full = rs.standard_normal((n, dim), dtype=cp.float32)
    full /= cp.linalg.norm(full, axis=1, keepdims=True)
    store = cs.CupyStore(dim)
    store.replace_all(np.arange(n, dtype=np.int64), full)
    for b in (1, 4, 16, 64):
        host = cp.asnumpy(full[:b])
        q32 = cp.asarray(host)
        small = store._small_ok(b, keep)
        print(f"b={b}: rows per block {cs.scan_rows_per_block(n, b, dim)}, one pass: {small}")
        if small:
            for per in (256, 512, 1024, 2048, 4096):
                timed(f"  scan_select kernel alone, {per} rows a block",
                      scan_kernel(store, q32, keep, per))
            cand, approx = store._candidates_scan(q32, keep, merged=False)
            timed("  candidates, one-pass scan, unmerged",
                  lambda: store._candidates_scan(q32, keep, merged=False))  # noqa: B023
        else:
            cand, approx = store._candidates_gemm(q32, keep, merged=False)
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


if __name__ == "__main__":
    main()
