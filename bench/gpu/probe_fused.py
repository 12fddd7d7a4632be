"""The fused search path against the GEMM path (a diagnostic for the GPU machine).

On clustered unit vectors (as bench/retrieval.py makes them), for each batch size: the whole
search from host memory by the fused path (fused_group_max on the tensor cores) and by the
GEMM path (cuBLAS scores, then group maxima), their recall@10 against float64 and the queries
whose certificate failed; at 64 queries the fused path's stages alone and its two knobs (rows
a group, resident blocks a multiprocessor).

    python bench/gpu/probe_fused.py [--sizes 1000000x384,10000000x384,1000000x768]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import cupy as cp
import numpy as np
from retrieval import clustered_unit, recall_at, timed  # bench/ is on PYTHONPATH

from themis_pg.retrieval import cupy_store as cs


def ms(fn: Callable[[], Any], runs: int = 20) -> float:
    return float(timed(fn, cp.cuda.Device().synchronize, runs, warmup=3))


def reference(full: Any, q: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    ref = q[:64].astype(cp.float64) @ full.astype(cp.float64).T
    part = cp.argpartition(-ref, k - 1, axis=1)[:, :k]
    vals = cp.take_along_axis(ref, part, axis=1)
    order = cp.argsort(-vals, axis=1)
    return (cp.asnumpy(cp.take_along_axis(part, order, axis=1)),
            cp.asnumpy(cp.take_along_axis(vals, order, axis=1)))


DEFAULTS = cs.SMALL_BATCH, cs.FUSED_MIN, cs.FUSED_MAX


def path(name: str) -> None:
    """Route every batch to one path ("fused", "gemm"), or as the store does ("default")."""
    cs.SMALL_BATCH, cs.FUSED_MIN, cs.FUSED_MAX = DEFAULTS
    if name != "default":
        cs.SMALL_BATCH, cs.FUSED_MIN = 0, 1
        cs.FUSED_MAX = 1 << 20 if name == "fused" else 0


def probe(n: int, dim: int, batches: list[int], k: int) -> None:
    full = clustered_unit(cp, n, dim, 2000, seed=1)
    store = cs.CupyStore(dim)
    store.replace_all(np.arange(n, dtype=np.int64), full)
    qs = clustered_unit(cp, max(batches), dim, 2000, seed=2)
    print(f"\n== {n:,} x {dim}, group {store._group_rows()} rows")
    path("fused")
    if not store._fused_ok(64):
        print("the fused path is not available here (see the log)")
        return
    print("| batch | default ms | fused ms | recall | not certified | GEMM path ms | recall "
          "| not certified |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in batches:
        host = cp.asnumpy(qs[:b])
        ref_ids, ref_scores = reference(full, qs[:b], k)
        path("default")
        cells = [f"{ms(lambda: store.search(host, k)):.3f}"]  # noqa: B023
        for name in ("fused", "gemm"):
            path(name)
            before = store.uncertified_queries
            got = store.search(host, k)[:64]
            failed = store.uncertified_queries - before
            rec = recall_at([[i for i, _ in g] for g in got], ref_ids, ref_scores,
                            [[s for _, s in g] for g in got])
            cells += [f"{ms(lambda: store.search(host, k)):.3f}",  # noqa: B023
                      f"{rec:.4f}", str(failed)]
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)
    path("fused")
    b = 64
    q32 = cp.ascontiguousarray(qs[:b])
    host = cp.asnumpy(q32)
    keep = k + cs.MARGIN
    cand, approx, bound = store._candidates_fused(q32, keep)
    group = store._group_rows()
    groups = -(-n // group)
    maxima = cp.empty((b, groups), cp.float32)
    kernel = store._fused_kernel(64)
    smem = cs._fused_smem(dim, 64)
    strides = min(-(-groups // 8), cs.FUSED_BLOCKS_PER_SM * store._sms)  # as the store
    q16 = q32.astype(cp.float16)

    def launch() -> None:
        kernel((1, strides), (cs.FUSED_THREADS,),
               (store._half, cp.int64(n), cp.int32(group), cp.int64(groups), q16,
                cp.int32(b), maxima), shared_mem=smem)

    launch()
    # the kernel's maxima against the GEMM's (fp16 scores: within 2^-10 of each other)
    gemm_scores = (q16 @ store._half[:n].T).astype(cp.float32)
    pad = groups * group - n
    if pad:
        gemm_scores = cp.concatenate([gemm_scores, cp.full((b, pad), -cp.inf, cp.float32)], 1)
    want = gemm_scores.reshape(b, groups, group).max(axis=2)
    print(f"\nfused maxima vs GEMM maxima: max |diff| {float(cp.abs(want - maxima).max()):.2e}")
    del gemm_scores, want
    print(f"stages at {b} queries ({groups} groups of {group}, {cand.shape[1]} candidates):")
    print(f"  fused_group_max alone: {ms(launch):.3f} ms "
          f"(read floor {store._half[:n].nbytes / 4.0e12 * 1e3:.3f} ms at 4 TB/s)")
    for options, per_sm in ((("-DNT=4", "-DMINB=1"), 1), (("-DNT=4", "-DMINB=1"), 2),
                            (("-DNT=2", "-DMINB=2"), 4), (("-DNT=1", "-DMINB=3"), 3)):
        variant = cs._kernel(cp, cs._FUSED_GROUP_MAX, "fused_group_max",
                             (f"-DDIM={dim}", "-DQT=64", *options))
        variant.max_dynamic_shared_size_bytes = smem
        grid = (1, min(-(-groups // 8), per_sm * store._sms))
        args = (store._half, cp.int64(n), cp.int32(group), cp.int64(groups), q16,
                cp.int32(b), maxima)
        print(f"  variant {' '.join(options)}, {per_sm} blocks an SM: " + f"{ms(lambda: variant(grid, (cs.FUSED_THREADS,), args, shared_mem=smem)):.3f} ms")  # noqa: B023,E501
    print(f"  radix_topk of the maxima: {ms(lambda: cs.radix_topk(cp, maxima, keep)):.3f} ms")
    print(f"  candidates (kernel + select + score_groups): "
          f"{ms(lambda: store._candidates_fused(q32, keep)):.3f} ms")
    print(f"  merge_rank: {ms(lambda: store._merge_rank(q32, cand, approx, 128, k, cs.EPS_SCAN, bound)):.3f} ms")  # noqa: E501
    print(f"  search() from host memory: {ms(lambda: store.search(host, k)):.3f} ms")
    print(f"  matmul alone (cuBLAS): {ms(lambda: q16 @ store._half[:n].T):.3f} ms")
    default_bps = cs.FUSED_BLOCKS_PER_SM
    for bps in (1, 2, 3, 4, 8):
        cs.FUSED_BLOCKS_PER_SM = bps
        print(f"  search() with {bps} blocks an SM: {ms(lambda: store.search(host, k)):.3f} ms")
    cs.FUSED_BLOCKS_PER_SM = default_bps
    defaults = cs.GROUP, cs.MAX_GROUP
    for g in (32, 64, 128, 256):
        cs.GROUP = cs.MAX_GROUP = g  # _group_rows() returns g
        before = store.uncertified_queries
        store.search(host, k)
        print(f"  search() with groups of {g}: {ms(lambda: store.search(host, k)):.3f} ms, "
              f"{store.uncertified_queries - before} not certified")
    cs.GROUP, cs.MAX_GROUP = defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1000000x384,10000000x384,1000000x768")
    ap.add_argument("--batches", default="1,2,4,16,32,64,128,256,1024")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    for size in args.sizes.split(","):
        n, dim = (int(x) for x in size.split("x"))
        probe(n, dim, [int(b) for b in args.batches.split(",")], args.k)
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
