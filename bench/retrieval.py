"""Exact top-k on the GPU: themis' CupyStore against torch, CuPy argpartition and NumPy.

Run on the GPU machine (see ../shared/GPU.md); prints one table and writes JSON:

    python bench/retrieval.py --sizes 1000000x384,10000000x384,1000000x768 --json out.json

For each matrix (clustered unit vectors made on the GPU, fp16 for the scans) and each batch
size: median milliseconds per batch of several runs (CUDA-synchronised wall time, so the
query upload and the result download of our store are included), queries/s, the HBM read
floor (fp16 matrix bytes / bandwidth measured here with a plain reduction) and each path's
ratio to it, and recall@10 against a float64 reference.  NumPy (fp32, all CPU cores) runs on
the smallest matrix only, with fewer runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("bench.retrieval")


def timed(fn: Callable[[], Any], sync: Callable[[], None], runs: int, warmup: int = 3) -> float:
    """Median wall milliseconds of ``fn`` (synchronised before and after each run)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def clustered_unit(cp: Any, n: int, dim: int, clusters: int, seed: int) -> Any:
    rs = cp.random.RandomState(seed)
    centers = rs.standard_normal((clusters, dim), dtype=cp.float32)
    centers /= cp.linalg.norm(centers, axis=1, keepdims=True)
    out = cp.empty((n, dim), cp.float32)
    step = 1 << 20
    for s in range(0, n, step):
        e = min(s + step, n)
        x = centers[rs.randint(0, clusters, e - s)] + 0.3 * rs.standard_normal(
            (e - s, dim), dtype=cp.float32) / np.sqrt(dim)
        out[s:e] = x / cp.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_at(got_ids: list[list[int]], ref_ids: np.ndarray, ref_scores: np.ndarray,
              got_scores: list[list[float]]) -> float:
    hits = total = 0
    for g, gs, r, rs in zip(got_ids, got_scores, ref_ids, ref_scores, strict=True):
        want = set(r.tolist())
        kth = rs[-1]
        hits += sum(1 for i, s in zip(g, gs, strict=True) if i in want or abs(s - kth) < 1e-6)
        total += len(r)
    return hits / total


def bench_matrix(cp: Any, torch: Any, n: int, dim: int, batches: list[int], k: int,
                 runs: int, with_numpy: bool) -> list[dict[str, Any]]:
    """Every path on one matrix, for each batch size."""
    from themis_pg.retrieval.cupy_store import CupyStore

    sync = cp.cuda.Device().synchronize
    full = clustered_unit(cp, n, dim, 2000, seed=1)
    half = full.astype(cp.float16)
    # The read floor: one pass over the fp16 matrix, by the faster of a reduction and the
    # one-query matmul (a GEMV: it reads the matrix once and writes almost nothing).
    one = cp.ones((1, dim), cp.float16)
    floor_ms = min(timed(lambda: half.max(), sync, 10), timed(lambda: one @ half.T, sync, 10))
    bandwidth = half.nbytes / (floor_ms / 1000) / 1e12
    store = CupyStore(dim)
    t0 = time.perf_counter()
    store.replace_all(np.arange(n, dtype=np.int64), full)
    sync()
    log.info("store filled in %.2f s; read floor %.3f ms (%.2f TB/s)",
             time.perf_counter() - t0, floor_ms, bandwidth)
    qsource = clustered_unit(cp, max(batches), dim, 2000, seed=2)
    full64 = full.astype(cp.float64)
    host = cp.asnumpy(full) if with_numpy else None
    th = torch.as_tensor(half, device="cuda") if torch is not None else None
    out = []
    for b in batches:
        q = qsource[:b]
        q_host = cp.asnumpy(q)
        q16 = q.astype(cp.float16)
        # float64 reference for the first 64 queries of the batch
        ref = q[:64].astype(cp.float64) @ full64.T
        part = cp.argpartition(-ref, k - 1, axis=1)[:, :k]
        vals = cp.take_along_axis(ref, part, axis=1)
        order = cp.argsort(-vals, axis=1)
        ref_ids = cp.asnumpy(cp.take_along_axis(part, order, axis=1))
        ref_scores = cp.asnumpy(cp.take_along_axis(vals, order, axis=1))
        del ref, part, vals
        entry: dict[str, Any] = {"n": n, "dim": dim, "batch": b, "floor_ms": floor_ms,
                                 "bandwidth_TBps": bandwidth}
        got = store.search(q_host, k)[:64]
        entry["themis_recall"] = recall_at([[i for i, _ in g] for g in got], ref_ids,
                                           ref_scores, [[s for _, s in g] for g in got])
        entry["themis_ms"] = timed(lambda: store.search(q_host, k), sync, runs)  # noqa: B023
        entry["matmul_ms"] = timed(lambda: q16 @ half.T, sync, runs)  # noqa: B023
        if b * n <= 1 << 31:
            entry["cupy_argpartition_ms"] = timed(
                lambda: cp.argpartition(-(q16 @ half.T), k - 1, axis=1)[:, :k], sync,  # noqa: B023
                max(3, runs // 4))
        if th is not None and b * n * 2 <= 8 << 30:  # its fp16 score matrix must fit
            tq = torch.as_tensor(q16, device="cuda")
            entry["torch_ms"] = timed(lambda: torch.topk(tq @ th.T, k, dim=1),  # noqa: B023
                                      torch.cuda.synchronize, runs)
        if host is not None and b <= 64:
            entry["numpy_ms"] = timed(
                lambda: np.argpartition(-(q_host @ host.T), k - 1, axis=1)[:, :k],  # noqa: B023
                lambda: None, 3, warmup=1)
        out.append(entry)
        log.info("%s", entry)
        cp.get_default_memory_pool().free_all_blocks()
    return out


def row(e: dict[str, Any]) -> str:
    def f(key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(e[key]) if key in e else "–"
    return (f"| {e['n']:,} x {e['dim']} | {e['batch']} | {f('floor_ms')} | {f('themis_ms')} | "
            f"{e['themis_ms'] / e['floor_ms']:.2f} | {e['batch'] / e['themis_ms'] * 1000:,.0f} | "
            f"{f('themis_recall', '{:.4f}')} | {f('matmul_ms')} | {f('torch_ms')} | "
            f"{f('cupy_argpartition_ms')} | {f('numpy_ms', '{:.1f}')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1000000x384,10000000x384,1000000x768")
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-numpy", action="store_true")
    ap.add_argument("--fused-max", type=int, default=None,
                    help="largest batch the store's fused path takes (cupy_store.FUSED_MAX)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import cupy as cp

    if args.fused_max is not None:
        from themis_pg.retrieval import cupy_store

        cupy_store.FUSED_MAX = args.fused_max

    try:
        import torch
    except ImportError:
        torch = None
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    rows_out: list[dict[str, Any]] = []
    for i, (n, dim) in enumerate(sizes):
        log.info("matrix %d x %d", n, dim)
        rows_out += bench_matrix(cp, torch, n, dim, batches, args.k, args.runs,
                                 with_numpy=not args.no_numpy and i == 0)
        cp.get_default_memory_pool().free_all_blocks()
    print("| N x d | batch | floor ms | themis ms | x floor | queries/s | recall@10 | matmul "
          "ms | torch matmul+topk ms | CuPy matmul+argpartition ms | NumPy ms |")
    print("| " + " | ".join("---" for _ in range(11)) + " |")
    for e in rows_out:
        print(row(e))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows_out, out, indent=1)


if __name__ == "__main__":
    main()
