"""Which step of the GPU store's near-tie pass is slow the first time, and for which shapes.

In bench/gpu/sql_path.sh (2026-12-02) a worker on a fresh machine spent 3.4-6.1 s in single
near-tie passes (t = 1, 8, 5 queries) while passes of 2, 3, 4 and 6 queries took 1-2 ms:
a one-time cost (the next worker on the same machine had none).  This probe, on a fresh
machine, times each step of ``CupyStore._near_ties`` (device synchronised around each) for
a sequence of (queries, rows within the bound) shapes, and prints one line per step that
took more than 50 ms.

    python bench/gpu/probe_first_use.py [rows] [--bincount]

First run (H200, 2026-12-02, --bincount): cp.bincount(minlength=t) took 2.9-4.3 s at its first
use for each of t = 1, 8, 5, 16 (and 0.14 s for 2); every other step compiled once.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import cupy as cp
import numpy as np

from themis_pg.retrieval.cupy_store import CupyStore, radix_topk

ROWS = int(next((a for a in sys.argv[1:] if a.isdigit()), 1_000_000))
BINCOUNT = "--bincount" in sys.argv  # the step as it was (the first run's finding)
DIM = 384


def timed(label: str, fn: Callable[[], Any]) -> Any:
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    out = fn()
    cp.cuda.Device().synchronize()
    ms = (time.perf_counter() - t0) * 1000
    if ms > 50:
        print(f"    SLOW {label}: {ms:.0f} ms", flush=True)
    return out


def near_ties_steps(store: CupyStore, q32: Any, floor_h: np.ndarray, k: int) -> list[int]:
    t = len(q32)
    size = len(store)
    q16 = timed("q astype fp16", lambda: q32.astype(cp.float16))
    floor = cp.asarray(floor_h, cp.float32)[:, None]
    half = store._half[:size]
    gemm = timed("fp16 GEMM", lambda: q16 @ half.T)
    block = timed("astype fp32", lambda: gemm.astype(cp.float32))
    mask = timed("compare", lambda: block >= floor)
    at_q, at_col = timed("nonzero", lambda: cp.nonzero(mask))
    key = timed("key", lambda: at_q * size + at_col)
    which, cols = key // size, key % size
    if BINCOUNT:
        counts = timed("bincount+tolist", lambda: cp.bincount(which, minlength=t).tolist())
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    else:  # what _near_ties does since
        starts = timed("searchsorted+tolist", lambda: cp.searchsorted(
            which, cp.arange(t + 1)).tolist())
        counts = [b - a for a, b in itertools.pairwise(starts)]
    for j in range(t):
        rows = cols[starts[j]:starts[j + 1]]
        m = len(rows)
        scores = timed(f"gather+matvec m={m}", partial(cp.matmul, store._full[rows], q32[j]))
        kk = min(k, m)
        part = timed(f"radix_topk n={m} k={kk}", partial(radix_topk, cp, scores[None, :], kk))[0]
        cand = timed("where", partial(cp.where, scores[part] == -cp.inf, -1, rows[part]))
        timed(f"exact_top c={kk}", partial(store._exact_top, q32[j][None, :], cand[None, :], kk))
    return [int(c) for c in counts]


def main() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2000, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, 2000, ROWS)]
    x += 0.3 / np.sqrt(DIM) * rng.standard_normal(x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = CupyStore(DIM)
    t0 = time.perf_counter()
    store.replace_all(np.arange(ROWS, dtype=np.int64), x)
    print(f"loaded {ROWS} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    base = rng.standard_normal(DIM).astype(np.float32)
    # (queries, rows within the bound): the shapes the worker's log showed, then others
    for t, within in [(1, 200), (8, 100), (5, 60), (3, 60), (5, 200), (16, 100), (2, 30),
                      (11, 300), (1, 1000)]:
        q = base + 0.3 * rng.standard_normal((t, DIM)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        exact = q @ x.T
        floor = -np.sort(-exact, axis=1)[:, within - 1]  # about `within` rows at or above
        started = time.perf_counter()
        counts = near_ties_steps(store, cp.asarray(q), floor, 40)
        print(f"t={t} within~{within}: counts {counts[:4]}..., "
              f"{(time.perf_counter() - started) * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
