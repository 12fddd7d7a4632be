"""Stage timings of CupyStore's search paths on 1M x 384 (a diagnostic for the GPU machine):
candidates by the one-pass scan and by the GEMM path, the whole search from host memory, and
the one-query matmul (the read floor)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cupy as cp
import numpy as np

from themis_pg.retrieval import cupy_store as cs


def timed(label: str, fn: Callable[[], Any], runs: int = 50) -> None:
    from retrieval import timed as median_ms  # bench/retrieval.py (bench/ is on PYTHONPATH)

    print(f"{label}: {median_ms(fn, cp.cuda.Device().synchronize, runs, warmup=5):.3f} ms")


def main() -> None:
    n, dim, k = 1_000_000, 384, 10
    keep = k + cs.MARGIN
    rs = cp.random.RandomState(1)
    full = rs.standard_normal((n, dim), dtype=cp.float32)
    full /= cp.linalg.norm(full, axis=1, keepdims=True)
    store = cs.CupyStore(dim)
    store.replace_all(np.arange(n, dtype=np.int64), full)
    for b in (1, 4, 16):
        host = cp.asnumpy(full[:b])
        q32 = cp.asarray(host)
        print(f"b={b}: rows per block {cs.scan_rows_per_block(n, b, dim)}, "
              f"one pass: {store._small_ok(b, k + cs.MARGIN)}")
        stages: list[tuple[str, Callable[[], Any]]] = [
            ("candidates, GEMM path", lambda: store._candidates_gemm(q32, keep)),  # noqa: B023
            ("search() from host memory", lambda: store.search(host, k)),  # noqa: B023
            ("matmul alone", lambda: q32.astype(cp.float16) @ store._half[:n].T)]  # noqa: B023
        if store._small_ok(b, keep):
            stages.insert(0, ("candidates, one-pass scan",
                              lambda: store._candidates_scan(q32, keep)))  # noqa: B023
            per = cs.scan_rows_per_block(n, b, dim)
            blocks = -(-n // per)
            rows = cp.empty((b, blocks * keep), cp.int64)
            scores = cp.empty((b, blocks * keep), cp.float32)
            maxb = 1 << (b - 1).bit_length()
            kernel = cs._kernel(cp, cs._SCAN_SELECT, "scan_select",
                                (f"-DDIM={dim}", f"-DMAXB={maxb}"))
            stages.insert(0, ("scan_select kernel alone", lambda: kernel(  # noqa: B023
                (blocks,), (cs.SCAN_THREADS,),  # noqa: B023
                (store._half, cp.int64(n), q32, cp.int32(b), cp.int32(keep),  # noqa: B023
                 cp.int32(per), rows, scores), shared_mem=4 * b * (dim + per))))  # noqa: B023
        for label, fn in stages:
            timed("  " + label, fn)


if __name__ == "__main__":
    main()
