"""CupyStore on the queries that are hard for a certified fp16 scan, 1M x 384 on the GPU.

The SQL-path run (docs/benchmarks.md) found the top-k slow because its random-weight
embedding model maps every text to nearly one direction: near-ties at the k-th score, which
the fp16 bound cannot certify.  This times, per batch size, ``search()`` from host memory
(median of 20 runs) for

* rows + noise: the usual case;
* one direction: queries with mean cosine ~0.97 to each other, all in one dense cluster (what
  that model gives);
* duplicates: 2,000 exact copies of one row, queried with that row (ties at the k-th score);
* a 1% metadata filter (``AllowSet``), its row map built once (what the worker's filter
  cache keeps) and built on every call;

and counts the queries that needed the near-tie pass; every answer is checked against an
exact fp32 GPU reference (recall, ties counted as hits).
"""

from __future__ import annotations

import time
from typing import Any

import cupy as cp
import numpy as np
from retrieval import clustered_unit, timed  # bench/retrieval.py (bench/ on PYTHONPATH)

from themis_pg.retrieval import cupy_store as cs
from themis_pg.retrieval.store import AllowSet, SearchFilter

N, DIM, K = 1_000_000, 384, 10


def unit(x: Any) -> Any:
    return (x / cp.linalg.norm(x, axis=1, keepdims=True)).astype(cp.float32)


def exact_ok(full: Any, queries: np.ndarray, got: list[list[tuple[int, float]]],
             allowed: Any = None) -> float:
    """Recall@K of ``got`` against an fp32 scan, ties within 1e-6 of the K-th counted."""
    scores = cp.asarray(queries) @ full.T
    if allowed is not None:
        mask = cp.full(full.shape[0], -cp.inf, cp.float32)
        mask[allowed] = 0
        scores = scores + mask
    kth = cp.asnumpy(cp.sort(scores, axis=1)[:, -K])
    best = cp.asnumpy(cp.argsort(-scores, axis=1)[:, :K])
    hits = sum(1 for g, b, t in zip(got, best, kth, strict=True)
               for i, s in g if i in set(b.tolist()) or abs(s - t) < 1e-6)
    return hits / (K * len(got))


def main() -> None:
    rs = cp.random.RandomState(5)
    full = clustered_unit(cp, N, DIM, 2000, seed=1)
    full[N - 2000:] = full[N - 2001]  # 2,000 duplicates of one row, the last 2,001 rows
    store = cs.CupyStore(DIM)
    store.replace_all(np.arange(N, dtype=np.int64), full)
    near: list[int] = []
    real = store._near_ties

    def spy(q: Any, *args: Any) -> Any:
        near.append(len(q))
        return real(q, *args)

    store._near_ties = spy  # type: ignore[method-assign,assignment]
    sync = cp.cuda.Device().synchronize
    center = full[12345]
    print("| queries | batch | search ms | near-tie queries per call | recall@10 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for b in (1, 8, 16):
        kinds = {
            "rows + noise": unit(full[rs.randint(0, N - 2001, b)]
                                 + 0.05 * rs.standard_normal((b, DIM), dtype=cp.float32)
                                 / np.sqrt(DIM)),
            "one direction (cosine ~0.97)": unit(
                center + 0.17 * rs.standard_normal((b, DIM), dtype=cp.float32)
                / np.sqrt(DIM)),
            "duplicates (2,000 copies)": cp.repeat(full[N - 1:N], b, axis=0),
        }
        for label, q in kinds.items():
            host = cp.asnumpy(q)
            near.clear()
            got = store.search(host, K)
            calls = sum(near)
            ms = timed(lambda h=host: store.search(h, K), sync, 20)  # type: ignore[misc]
            print(f"| {label} | {b} | {ms:.3f} | {calls} | {exact_ok(full, host, got):.4f} |")
    allowed = np.arange(7, N, 100)
    allow = AllowSet(allowed.tolist())
    q = cp.asnumpy(unit(full[rs.randint(0, N, 1)] + 0.05 * rs.standard_normal(
        (1, DIM), dtype=cp.float32) / np.sqrt(DIM)))
    flt = [SearchFilter(allow=allow)]
    got = store.search(q, K, flt)
    cached = timed(lambda: store.search(q, K, flt), sync, 20)
    t0 = time.perf_counter()
    for _ in range(5):
        store.search(q, K, [SearchFilter(allow=AllowSet(allowed.tolist()))])
    fresh = (time.perf_counter() - t0) * 1000 / 5
    plain = timed(lambda: store.search(q, K), sync, 20)
    print(f"\n1% filter (10,000 ids), one query: {cached:.3f} ms with the row map kept, "
          f"{fresh:.3f} ms building it each call (AllowSet included), unfiltered {plain:.3f} "
          f"ms; recall@10 {exact_ok(full, q, got, cp.asarray(allowed)):.4f}")


if __name__ == "__main__":
    main()
