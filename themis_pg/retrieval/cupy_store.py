"""The GPU store: the embedding matrix resident in GPU memory (CuPy), exact top-k there.

Layout: an fp16 copy of the unit vectors is what every search streams (half the bytes of
fp32: the scan is bound by memory bandwidth), and an fp32 copy answers the exact rescoring of
a few candidates per query, so the returned order and scores are those of fp32 vectors.

One search of ``b`` queries:

1. scores of a chunk of rows: one cuBLAS GEMM, fp16 in, fp32 accumulate, fp16 out; chunks are
   sized so that the score block stays small next to the matrix;
2. selection by group maxima: every ``GROUP`` consecutive rows form a group; a group holding
   one of the top-k rows has a maximum at least the k-th best score, so only the best
   ``k + margin`` groups (by their maxima) can hold the answer.  The group maxima are one
   read of the score block, and the selection (``radix_topk``, a radix select kernel) runs
   over ``rows / GROUP`` values instead of ``rows``: this is what keeps selection near the
   matmul's cost where a plain argpartition over all scores costs 20-50x the matmul (GPU.md);
3. the rows of those groups (``gather_groups``) are ranked by their fp16 scores, the best
   ``k + margin`` of them are rescored exactly in fp32, and the best k returned; for the
   usual k (``k + margin <= MERGE_MAX``) this step and the certificate below are one kernel,
   ``merge_rank``, so a search is a handful of launches and one sync.

Exactness is checked, not assumed.  Every row's approximate score is within ``eps`` of its
exact fp32 score (rounding a unit vector to fp16 moves a dot product with a unit query by at
most 2^-11; the GEMM path also rounds the query and the score: 3 x 2^-11, with cuBLAS
accumulating in fp32).  Any row that is not a candidate scores at most ``a``, the lowest
approximate score among the ``k + margin`` candidates kept.  So when the k-th exact score is at
least ``a + eps``, no row outside the candidates can beat it and the answer is exact.  A query
where that does not hold has many rows within ``eps`` of its k-th score (near-duplicates, a
dense cluster): its k-th exact score ``s`` so far is a lower bound of the true one, so every row
of the true answer scores at least ``s - eps`` approximately.  One more pass collects exactly
those rows, and they are rescored in fp32: the cost grows with the number of near-ties, not
with the matrix.  Only a query with more of them than ``THRESHOLD_SHARE`` of the rows is scanned
exactly in fp32.  Recall against a float64 reference is measured by ``bench/retrieval.py`` and
tested in tests/test_store.py.

A metadata filter admitting few rows (``store.SUBSET_SHARE``) scores only those rows, exactly;
their row numbers are mapped once per store layout and kept with the filter's ``AllowSet``.

Small batches (up to ``SMALL_BATCH`` queries) take one pass: ``scan_select`` scores a block of
rows against the queries in shared memory and keeps the block's best candidates, so no score
matrix is written; ``merge_rank`` selects from all the blocks' candidates at once (a
``k + margin`` above MERGE_MAX takes the GEMM path).

Batches of ``FUSED_MIN`` to ``FUSED_MAX`` queries (dim a multiple of 64) take the fused path
instead of steps 1-3: the tensor cores score a tile of queries against 8-row tiles and reduce
the scores to group maxima in registers (``fused_group_max``), so no score block is written
and read again; the best ``k + margin`` groups are kept, their rows scored again from the fp16
matrix (``score_groups``), and ``merge_rank`` certifies against two bounds: the k-th exact
score must be at least the highest maximum of a group left out + ``EPS_FUSED`` and the lowest
rescored candidate + ``EPS_SCAN``.

A warm start's rows (``load_rows``, from an index snapshot) travel through small pinned
buffers, ``STAGE_THREADS`` threads with two of ``STAGE_BYTES`` each: a thread reads a piece of
the file into one buffer while the other's copy to the device runs, so the file read and the
copy overlap, the copy runs at pinned speed (55 GB/s against 10 pageable, GPU.md) and only a
few MB are pinned (pinning is what costs: 1.0-2.5 s for a whole 1.5 GB matrix).

Rows are swap-deleted and the matrix grows geometrically (capacity doubles; a grow copies on
the device, never from the host), so an insert costs O(1) amortised.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .store import (
    FloatArray,
    Hit,
    IdArray,
    RowMap,
    RowSource,
    SearchFilter,
    hits,
    restrict,
    restrict_subset,
    split_by_filter,
)

log = logging.getLogger(__name__)

GROUP = 32          # fewest rows per group for the group-maximum pruning
MAX_GROUP = 256     # most rows per group (candidates per kept group)
TARGET_GROUPS = 8192  # groups per query beyond which the group size doubles
MARGIN = 16         # extra groups and extra rows rescored beyond k
THRESHOLD_SHARE = 0.25  # near-ties of one query beyond this share of the rows: exact scan
EPS_SCAN = 2.0 ** -11 + 1e-4  # |approximate - exact fp32 score|, one-pass scan (fp32 query)
EPS_GEMM = 3 * 2.0 ** -11 + 1e-4  # the same, GEMM path (fp16 query and fp16 scores)
EPS_FUSED = 2 * 2.0 ** -11 + 1e-4  # the same, fused path (fp16 query, fp32 scores)
CHUNK_BYTES = 1 << 30  # the fp16 score block of one GEMM (1 GiB; transient)
# load_rows' staging: threads, and the bytes of each of a thread's two pinned buffers.  H200
# host, 1M x 384 in a fresh process: 0.117 s at 4 x 8 MB, 0.122-0.135 at 8 x 4, 0.170 at
# 8 x 2, 0.283 at 16 x 2 (bench/gpu/probe_fresh_restart.py, 2026-12-03)
STAGE_BYTES = 8 << 20
STAGE_THREADS = 4


# Exact top-k selection per row by radix select: four 8-bit passes over the row find the key
# of the k-th largest value (float bits mapped to an order-preserving uint32), then one pass
# writes out every index above it and as many equal to it as k needs.  One block per row;
# the rows are short here (group maxima, candidate lists), so they stay in L1/L2 between
# passes.  This replaces argpartition, which sorts and costs a multiple of the matmul.
# ``_SELECT`` holds the block-wide steps; ``radix_topk`` writes the indices to global memory,
# ``merge_rank`` (below) keeps them in shared memory.
_SELECT = r"""
__device__ __forceinline__ unsigned int key_of(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float float_of(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key ^ 0x80000000u) : ~key);
}

/* Block-wide (a multiple of 32 threads, all call it): st[0] = the key of the k-th largest of
   row[0..n) (k <= n), st[2] = how many keys equal to it belong to the k largest.  Atomics are
   aggregated per warp: the values of one row share their top bits, so plain per-thread
   atomics would all hit one counter. */
__device__ void kth_key(const float* __restrict__ row, const int n, const int k,
                        unsigned int* hist, unsigned int* st) {
    const unsigned int lane = threadIdx.x & 31u;
    if (threadIdx.x == 0) { st[0] = 0u; st[1] = 0u; st[2] = (unsigned int)k; }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        const unsigned int p = st[0], m = st[1];
        const int step = 4 * blockDim.x;  /* four loads in flight per thread */
        for (int base = 0; base < n; base += step) {
            float v[4];
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int i = base + j * blockDim.x + threadIdx.x;
                v[j] = i < n ? row[i] : 0.0f;
            }
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int i = base + j * blockDim.x + threadIdx.x;
                unsigned int bucket = 256u;
                if (i < n) {
                    const unsigned int key = key_of(v[j]);
                    if ((key & m) == p) bucket = (key >> shift) & 255u;
                }
                const unsigned int peers = __match_any_sync(0xffffffffu, bucket);
                if (bucket < 256u && lane == (unsigned int)(__ffs(peers) - 1))
                    atomicAdd(&hist[bucket], (unsigned int)__popc(peers));
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int left = (int)st[2];
            int digit = 255;
            for (; digit > 0; --digit) {
                const int c = (int)hist[digit];
                if (c >= left) break;
                left -= c;
            }
            st[0] = p | ((unsigned int)digit << shift);
            st[1] = m | (255u << shift);
            st[2] = (unsigned int)left;  /* how many keys equal to the final prefix to take */
        }
        __syncthreads();
    }
}

/* Block-wide, after kth_key: dst[0..k) = the indices of the k largest of row[0..n)
   (unordered; ties at the k-th taken in no particular order).  count: two shared ints. */
template <typename T>
__device__ void collect_top(const float* __restrict__ row, const int n, const int k,
                            const unsigned int* st, T* dst, int* count) {
    const unsigned int lane = threadIdx.x & 31u;
    if (threadIdx.x == 0) { count[0] = 0; count[1] = 0; }
    __syncthreads();
    const unsigned int kth = st[0];
    const int take_eq = (int)st[2], first_eq = k - take_eq;
    const unsigned int below = (1u << lane) - 1u;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        unsigned int key = 0u;
        if (i < n) key = key_of(row[i]);
        const bool gt = i < n && key > kth, eq = i < n && key == kth;
        const unsigned int gts = __ballot_sync(0xffffffffu, gt);
        const unsigned int eqs = __ballot_sync(0xffffffffu, eq);
        int gt_base = 0, eq_base = 0;
        if (lane == 0) {
            if (gts) gt_base = atomicAdd(&count[0], __popc(gts));
            if (eqs) eq_base = atomicAdd(&count[1], __popc(eqs));
        }
        gt_base = __shfl_sync(0xffffffffu, gt_base, 0);
        eq_base = __shfl_sync(0xffffffffu, eq_base, 0);
        if (gt) dst[gt_base + __popc(gts & below)] = (T)i;
        if (eq) {
            const int pos = eq_base + __popc(eqs & below);
            if (pos < take_eq) dst[first_eq + pos] = (T)i;
        }
    }
    __syncthreads();
}
"""
_RADIX_TOPK = _SELECT + r"""
/* One block per row of x (b, n): the indices of its k largest values, unordered, and the
   k-th largest value itself (kth[b]: the fused path's bound on every value left out). */
extern "C" __global__ void radix_topk(const float* __restrict__ x, const int n, const int k,
                                      long long* __restrict__ out, float* __restrict__ kth) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int st[3];
    __shared__ int count[2];
    const float* row = x + (long long)blockIdx.x * n;
    kth_key(row, n, k, hist, st);
    if (threadIdx.x == 0) kth[blockIdx.x] = float_of(st[0]);
    collect_top<long long>(row, n, k, st, out + (long long)blockIdx.x * k, count);
}
"""
_GATHER_GROUPS = r"""
#include <cuda_fp16.h>
/* The candidates of one GEMM chunk: for query b and its g-th selected group (top[b, g], or
   group g itself when every group is selected), the group's rows and their fp16 scores as
   fp32 at columns off + g * group + lane of the candidate arrays (width w).  Columns past
   `live` (the chunk's last, partial group) get row -1 and -inf.  One thread per candidate. */
extern "C" __global__ void gather_groups(const __half* __restrict__ s, const long long ld,
                                         const int live, const int group, const int sel,
                                         const long long* __restrict__ top, const int every,
                                         const long long start, const int b_count,
                                         long long* __restrict__ cand_rows,
                                         float* __restrict__ cand_scores, const long long w,
                                         const long long off) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long per = (long long)sel * group;
    if (t >= (long long)b_count * per) return;
    const long long b = t / per, j = t % per;
    const long long g = every ? j / group : top[b * sel + j / group];
    const long long col = g * group + j % group;
    const bool inside = col < live;
    cand_rows[b * w + off + j] = inside ? start + col : -1LL;
    cand_scores[b * w + off + j] =
        inside ? __half2float(s[b * ld + col]) : __int_as_float(0xff800000);
}
"""
_GROUP_MAX = r"""
#include <cuda_fp16.h>
/* Maximum of each group of `group` consecutive scores of each row; one warp per group, lanes
   read consecutive halves (coalesced), shuffles reduce.  Scores past `live` count as -inf, so
   the last, partial group needs no padded copy. */
extern "C" __global__ void group_max(const __half* __restrict__ s, const long long ld,
                                     const int live, const int group, const int groups,
                                     float* __restrict__ out, const long long out_ld,
                                     const int out_offset, const int rows) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int row = (int)(warp / groups), g = (int)(warp % groups);
    if (row >= rows) return;  /* whole warps only: every lane of a warp leaves together */
    float best = __int_as_float(0xff800000);  /* -inf */
    const __half* base = s + (long long)row * ld;
    for (int j = g * group + lane; j < (g + 1) * group; j += 32) {
        if (j < live) best = fmaxf(best, __half2float(base[j]));
    }
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, off));
    if (lane == 0) out[(long long)row * out_ld + out_offset + g] = best;
}

/* The same with 16-byte loads, for rows whose stride is a multiple of 8 halves: one thread
   per 8 consecutive scores, the group / 8 threads of a group consecutive in one warp (group
   a power of two from 8 to 256), so a warp reads 512 contiguous bytes at once.  At 1,024
   queries the one-half-per-lane kernel above read 1.6 TB/s. */
extern "C" __global__ void group_max8(const __half* __restrict__ s, const long long ld,
                                      const int live, const int group, const int groups,
                                      float* __restrict__ out, const long long out_ld,
                                      const int out_offset, const int rows) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int width = group >> 3;           /* threads of one group */
    const long long per_row = (long long)groups * width;
    const long long row = t / per_row;
    const int j = (int)(t % per_row), col = 8 * j;
    float best = __int_as_float(0xff800000);  /* -inf */
    if (row < rows && col < live) {
        const __half* at = s + row * ld + col;
        if (col + 8 <= live) {
            const uint4 v = *reinterpret_cast<const uint4*>(at);
            const __half2* h = reinterpret_cast<const __half2*>(&v);
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 f = __half22float2(h[i]);
                best = fmaxf(best, fmaxf(f.x, f.y));
            }
        } else {
            for (int i = 0; i < live - col; ++i) best = fmaxf(best, __half2float(at[i]));
        }
    }
    /* every thread of the warp takes part (those past the end hold -inf) */
    for (int off = width >> 1; off > 0; off >>= 1)
        best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, off));
    if (row < rows && j % width == 0) out[row * out_ld + out_offset + j / width] = best;
}
"""
_RESCORE_RANK = r"""
#define RANK_MAX 128
/* Block-wide (all threads call it; c <= RANK_MAX): exact fp32 scores of the candidate rows
   cand[0..c) for the query qb (rows < 0 are no candidates: score -inf), then the best k in
   order (score descending, row ascending) by ranking: every candidate counts those that beat
   it.  Ranks from c to k - 1 (fewer candidates than k) get row -1 and -inf. */
__device__ void rescore_rank(const float* __restrict__ qb, const float* __restrict__ full,
                             const int d, const long long* cand, const int c, const int k,
                             long long* __restrict__ dst_rows, float* __restrict__ dst_scores) {
    __shared__ float score[RANK_MAX];
    __shared__ long long rowv[RANK_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float neg_inf = __int_as_float(0xff800000);
    for (int j = warp; j < c; j += warps) {
        const long long r = cand[j];
        float acc = 0.0f;
        if (r >= 0) {
            const float* v = full + r * d;
            for (int i = lane; i < d; i += 32) acc += qb[i] * v[i];
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) {
            score[j] = r >= 0 ? acc : neg_inf;
            rowv[j] = r >= 0 ? r : 0x7fffffffffffffffLL;
        }
    }
    __syncthreads();
    for (int j = c + threadIdx.x; j < k; j += blockDim.x) {
        dst_rows[j] = -1;
        dst_scores[j] = neg_inf;
    }
    if (threadIdx.x < c) {
        const int j = threadIdx.x;
        const float s = score[j];
        const long long r = rowv[j];
        int rank = 0;
        for (int o = 0; o < c; ++o) {
            const float so = score[o];
            rank += (so > s) || (so == s && (rowv[o] < r || (rowv[o] == r && o < j)));
        }
        if (rank < k) {
            dst_rows[rank] = r == 0x7fffffffffffffffLL ? -1 : r;
            dst_scores[rank] = s;
        }
    }
    __syncthreads();
}
"""
_EXACT_RANK = _RESCORE_RANK + r"""
/* One block per query: its c candidate rows (b, c) rescored and ranked. */
extern "C" __global__ void exact_rank(const float* __restrict__ q, const float* __restrict__ full,
                                      const long long* __restrict__ cand, const int c,
                                      const int d, const int k, long long* __restrict__ out_rows,
                                      float* __restrict__ out_scores) {
    const long long b = blockIdx.x;
    rescore_rank(q + b * d, full, d, cand + b * c, c, k, out_rows + b * k, out_scores + b * k);
}
"""
# The last step of a certified search, fused (one block per query, one launch for the batch):
# select the best ``keep`` candidates by approximate score, rescore them exactly in fp32,
# rank them and write the best k, with the certificate of the module doc: ok when the k-th
# exact score is at least the lowest kept approximate score + eps (and, with ``has_bound``,
# at least ``bound[b] + bound_eps``: the fused path's bound on every row it did not score).
# Before, the same took about ten CuPy launches from Python (two selections and their
# gathers, the rescoring, a reduction, the compare) and a sync for the certificate.
MERGE_MAX = 128  # most candidates one merge_rank or exact_rank block rescores (RANK_MAX)
# Batches up to this many queries keep MERGE_MAX groups and candidates on the GEMM path, not
# k + MARGIN: the lowest kept score falls further below the k-th, so more queries are
# certified at once.  A query that is not costs a second pass (a GEMM over every row, a
# sort), where rescoring 128 rows instead of 56 costs microseconds.  Clustered rows (the
# SQL-path benchmark's) often have 16 rows within eps of the k-th.  Larger batches are
# bound by the merge's selection, which grows with the candidates.
WIDE_BATCH = 64
# ... as long as a query's candidates (kept groups x rows a group x score blocks) stay at
# most this many: 1M rows (one block, 128-row groups) keep 128 groups, 10M (two blocks,
# 256-row groups) 32, where 128 made merge_rank select from 65,536 candidates a query.
WIDE_CANDIDATES = 16384
_MERGE_RANK = _SELECT + _RESCORE_RANK + r"""
extern "C" __global__ void merge_rank(const long long* __restrict__ cand_rows,
                                      const float* __restrict__ cand_scores, const int w,
                                      const int keep, const float* __restrict__ q,
                                      const float* __restrict__ full, const int d, const int k,
                                      const float eps, const int every_row,
                                      long long* __restrict__ out_rows,
                                      float* __restrict__ out_scores, int* __restrict__ ok,
                                      const float* __restrict__ bound, const float bound_eps,
                                      const int has_bound) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int st[3];
    __shared__ int count[2];
    __shared__ int pick[RANK_MAX];
    __shared__ long long chosen[RANK_MAX];
    const long long b = blockIdx.x;
    const float* approx = cand_scores + b * w;
    const long long* rows = cand_rows + b * w;
    const float neg_inf = __int_as_float(0xff800000);
    /* fewer candidates than keep: every row of the matrix is one, nothing to certify */
    const bool all = every_row || w < keep;
    const int c = w < keep ? w : keep;
    float lowest = neg_inf;
    if (w < keep) {
        for (int i = threadIdx.x; i < c; i += blockDim.x) pick[i] = i;
        __syncthreads();
    } else {
        kth_key(approx, w, keep, hist, st);
        collect_top<int>(approx, w, keep, st, pick, count);
        lowest = float_of(st[0]);
    }
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        chosen[j] = approx[pick[j]] == neg_inf ? -1LL : rows[pick[j]];
    __syncthreads();
    rescore_rank(q + b * d, full, d, chosen, c, k, out_rows + b * k, out_scores + b * k);
    if (threadIdx.x == 0) {
        const float kth = out_scores[b * k + k - 1];
        ok[b] = (all || c < k || (kth >= lowest + eps
                                  && (!has_bound || kth >= bound[b] + bound_eps))) ? 1 : 0;
    }
}
"""
_SCAN_SELECT = r"""
#include <cuda_fp16.h>
/* Small batches (B <= MAXB queries) in one pass over the fp16 matrix: each block scores R
   consecutive rows against every query (fp32 accumulate) into shared memory, then keeps the
   best `keep` of them per query (a radix select in shared memory), so the scores never go to
   global memory and the matrix is read exactly once.  Compiled per dimension (DIM, a multiple
   of 8: a row is DIM / 8 16-byte loads).  Half a warp scores one row: its lanes load
   consecutive 16-byte pieces (coalesced) and reduce with shuffles; both halves of a warp step
   together, so the shuffles always see the whole warp. */
#define CHUNKS (DIM / 8)
#define PER_LANE ((CHUNKS + 15) / 16)

__device__ __forceinline__ unsigned int order_key(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The `keep` largest of s[0..n) (block-wide, all threads call it): their indices + base and
   scores to out_rows/out_scores (unordered); n <= keep writes all n and pads with -1/-inf. */
__device__ void block_select(const float* s, const int n, const int keep, const long long base,
                             long long* out_rows, float* out_scores, unsigned int* hist,
                             unsigned int* st) {
    if (n <= keep) {
        for (int i = threadIdx.x; i < keep; i += blockDim.x) {
            out_rows[i] = i < n ? base + i : -1;
            out_scores[i] = i < n ? s[i] : __int_as_float(0xff800000);
        }
        __syncthreads();
        return;
    }
    if (threadIdx.x == 0) { st[0] = 0u; st[1] = 0u; st[2] = (unsigned int)keep; }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        const unsigned int prefix = st[0], mask = st[1];
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const unsigned int key = order_key(s[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int left = (int)st[2];
            int digit = 255;
            for (; digit > 0; --digit) {
                const int c = (int)hist[digit];
                if (c >= left) break;
                left -= c;
            }
            st[0] = prefix | ((unsigned int)digit << shift);
            st[1] = mask | (255u << shift);
            st[2] = (unsigned int)left;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) { st[3] = 0u; st[4] = 0u; }
    __syncthreads();
    const unsigned int kth = st[0];
    const int take_eq = (int)st[2], first_eq = keep - take_eq;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const unsigned int key = order_key(s[i]);
        if (key > kth) {
            const int at = (int)atomicAdd(&st[3], 1u);
            out_rows[at] = base + i;
            out_scores[at] = s[i];
        } else if (key == kth) {
            const int at = (int)atomicAdd(&st[4], 1u);
            if (at < take_eq) {
                out_rows[first_eq + at] = base + i;
                out_scores[first_eq + at] = s[i];
            }
        }
    }
    __syncthreads();
}

extern "C" __global__ void scan_select(const __half* __restrict__ m, const long long rows,
                                       const float* __restrict__ q, const int B,
                                       const int keep, const int R,
                                       long long* __restrict__ out_rows,
                                       float* __restrict__ out_scores) {
    extern __shared__ float smem[];
    float* qs = smem;            /* B x DIM */
    float* sc = smem + B * DIM;  /* B x R */
    __shared__ unsigned int hist[256];
    __shared__ unsigned int st[5];
    for (int i = threadIdx.x; i < B * DIM; i += blockDim.x) qs[i] = q[i];
    __syncthreads();
    const long long base = (long long)blockIdx.x * R;
    /* blocks past the end have n <= 0: padding only (none in the grid of _candidates_scan) */
    const int n = (int)max(0LL, min((long long)R, rows - base));
    const int lane = threadIdx.x & 15, half = (threadIdx.x >> 4) & 1;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int r0 = 4 * warp; r0 < n; r0 += 4 * warps) {
        /* rows r0 + half and r0 + 2 + half: two rows per half-warp, loads in flight for both */
        uint4 v[2][PER_LANE];
        bool live[2];
        #pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int r = r0 + 2 * u + half;
            live[u] = r < n;
            const uint4* row =
                reinterpret_cast<const uint4*>(m + (base + (live[u] ? r : 0)) * DIM);
            #pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                const int c = lane + 16 * j;
                v[u][j] = (live[u] && c < CHUNKS) ? row[c] : make_uint4(0u, 0u, 0u, 0u);
            }
        }
        #pragma unroll
        for (int u = 0; u < 2; ++u) {
            float acc[MAXB];
            #pragma unroll
            for (int b = 0; b < MAXB; ++b) acc[b] = 0.0f;
            #pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                const int c = lane + 16 * j;
                if (c < CHUNKS) {
                    const __half2* h = reinterpret_cast<const __half2*>(&v[u][j]);
                    const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]);
                    const float2 f2 = __half22float2(h[2]), f3 = __half22float2(h[3]);
                    #pragma unroll
                    for (int b = 0; b < MAXB; ++b) {
                        if (b < B) {
                            const float4* qq =
                                reinterpret_cast<const float4*>(qs + b * DIM + c * 8);
                            const float4 q0 = qq[0], q1 = qq[1];
                            acc[b] += f0.x * q0.x + f0.y * q0.y + f1.x * q0.z + f1.y * q0.w
                                    + f2.x * q1.x + f2.y * q1.y + f3.x * q1.z + f3.y * q1.w;
                        }
                    }
                }
            }
            #pragma unroll
            for (int b = 0; b < MAXB; ++b) {
                if (b < B) {
                    float a = acc[b];
                    a += __shfl_xor_sync(0xffffffffu, a, 8);
                    a += __shfl_xor_sync(0xffffffffu, a, 4);
                    a += __shfl_xor_sync(0xffffffffu, a, 2);
                    a += __shfl_xor_sync(0xffffffffu, a, 1);
                    if (live[u] && lane == 0) sc[b * R + r0 + 2 * u + half] = a;
                }
            }
        }
    }
    __syncthreads();
    const long long per_query = (long long)gridDim.x * keep;
    for (int b = 0; b < B; ++b) {
        const long long at = b * per_query + (long long)blockIdx.x * keep;
        block_select(sc + b * R, n, keep, base, out_rows + at, out_scores + at, hist, st);
    }
}
"""
# Batches of FUSED_MIN to FUSED_MAX queries (the fused path): the scores never reach global
# memory.  ``fused_group_max`` computes them on the tensor cores (mma.sync, fp16 in, fp32
# accumulate), a warp 8 x NT rows x QT queries at a time, and writes only each group's maximum
# per query; the matrix is read once per QT queries (the query tile stays in shared memory), where
# the GEMM path writes a fp16 score block and reads it again for the maxima.  ``radix_topk``
# keeps the best groups and their bound (the k-th maximum: every row of the other groups
# scores at most that, approximately), ``score_groups`` scores the kept groups' rows again
# from the fp16 matrix with the fp32 query, and ``merge_rank`` rescores the best of them
# exactly, with both bounds in its certificate.
_FUSED_GROUP_MAX = r"""
#include <cuda_fp16.h>
/* Compiled per DIM (a multiple of 64) and QT (queries a block: 16, 32 or 64).  The tensor
   cores through PTX (mma.sync m16n8k16, fp16 in, fp32 accumulate; no mma.h, which NVRTC
   does not always find): A = a 16-query tile, B = 8 matrix rows transposed.  The sum over k
   does not depend on the order of k, so each 64-wide slice of k is permuted alike in A and
   B: lane (g = lane / 4, t = lane % 4) of a fragment takes k = 16 t .. 16 t + 15 of the
   slice, two 16-byte loads of one row a slice, and the 4 lanes of a row read its 128 bytes
   at once.  Step s of the slice gives fragment k (2t, 2t+1) the physical k 16t + 4s + (0, 1)
   and (2t+8, 2t+9) the physical 16t + 4s + (2, 3), the same in A and B.  The matrix's
   allocation is a multiple of 32 rows, so a warp's 8 NT rows never read past it; rows from
   `rows` on score -inf.  Block (x: query tile, y: stride): its 8 warps take groups
   y * 8 + warp, then every gridDim.y * 8-th, so the blocks of all query tiles over the same
   rows run together and share them in L2. */
#define QLD (DIM + 8)  /* padded query rows: the 16-byte loads of a quarter warp hit 8 banks */
#define MT (QT / 16)   /* 16-query tiles */
#ifndef NT             /* 8-row tiles a warp takes at a time (fewer at QT 64: registers) */
#define NT (QT == 64 ? 2 : 4)
#endif
#ifndef MINB           /* resident blocks a multiprocessor the registers must allow */
#define MINB 2
#endif

__device__ __forceinline__ void mma16816(float* c, const unsigned int a0, const unsigned int a1,
                                         const unsigned int a2, const unsigned int a3,
                                         const unsigned int b0, const unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

extern "C" __global__ void __launch_bounds__(256, MINB)
fused_group_max(const __half* __restrict__ m, const long long rows, const int group,
                const long long groups, const __half* __restrict__ q, const int B,
                float* __restrict__ out) {
    extern __shared__ __align__(16) unsigned char smem[];
    __half* qs = reinterpret_cast<__half*>(smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int q0 = blockIdx.x * QT;
    for (int i = threadIdx.x; i < QT * (DIM / 8); i += blockDim.x) {
        const int r = i / (DIM / 8), c = i % (DIM / 8);
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (q0 + r < B) v = reinterpret_cast<const uint4*>(q + (long long)(q0 + r) * DIM)[c];
        *reinterpret_cast<uint4*>(qs + r * QLD + c * 8) = v;
    }
    __syncthreads();
    const float neg_inf = __int_as_float(0xff800000);
    const long long stride = (long long)gridDim.y * 8;
    for (long long grp = (long long)blockIdx.y * 8 + warp; grp < groups; grp += stride) {
        float best_lo[MT], best_hi[MT];  /* queries 16 i + g and 16 i + g + 8 */
        #pragma unroll
        for (int i = 0; i < MT; ++i) best_lo[i] = best_hi[i] = neg_inf;
        for (int s0 = 0; s0 < group; s0 += 8 * NT) {
            const long long r0 = grp * group + s0;
            if (r0 >= rows) break;  /* warp-uniform */
            float acc[MT][NT][4];
            #pragma unroll
            for (int i = 0; i < MT; ++i)
                #pragma unroll
                for (int n = 0; n < NT; ++n)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][n][e] = 0.0f;
            const __half* mrow = m + (r0 + g) * DIM + 16 * t4;
            #pragma unroll 1
            for (int p = 0; p < DIM; p += 64) {
                unsigned int b[NT][8];
                #pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const uint4* at = reinterpret_cast<const uint4*>(mrow + n * 8 * DIM + p);
                    const uint4 lo = at[0], hi = at[1];
                    b[n][0] = lo.x; b[n][1] = lo.y; b[n][2] = lo.z; b[n][3] = lo.w;
                    b[n][4] = hi.x; b[n][5] = hi.y; b[n][6] = hi.z; b[n][7] = hi.w;
                }
                #pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const uint4* ra = reinterpret_cast<const uint4*>(
                        qs + (16 * i + g) * QLD + p + 16 * t4);
                    const uint4* rb = reinterpret_cast<const uint4*>(
                        qs + (16 * i + g + 8) * QLD + p + 16 * t4);
                    const uint4 x0 = ra[0], x1 = ra[1], y0 = rb[0], y1 = rb[1];
                    const unsigned int a_lo[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
                    const unsigned int a_hi[8] = {y0.x, y0.y, y0.z, y0.w, y1.x, y1.y, y1.z, y1.w};
                    #pragma unroll
                    for (int st = 0; st < 4; ++st)
                        #pragma unroll
                        for (int n = 0; n < NT; ++n)
                            mma16816(acc[i][n], a_lo[2 * st], a_hi[2 * st], a_lo[2 * st + 1],
                                     a_hi[2 * st + 1], b[n][2 * st], b[n][2 * st + 1]);
                }
            }
            /* lane (g, t4) holds rows r0 + 8 n + 2 t4 + (0, 1) of queries 16 i + g (acc 0, 1)
               and 16 i + g + 8 (acc 2, 3) */
            #pragma unroll
            for (int i = 0; i < MT; ++i) {
                float lo = neg_inf, hi = neg_inf;
                #pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const long long col = r0 + 8 * n + 2 * t4;
                    if (col < rows) { lo = fmaxf(lo, acc[i][n][0]); hi = fmaxf(hi, acc[i][n][2]); }
                    if (col + 1 < rows) {
                        lo = fmaxf(lo, acc[i][n][1]);
                        hi = fmaxf(hi, acc[i][n][3]);
                    }
                }
                lo = fmaxf(lo, __shfl_xor_sync(0xffffffffu, lo, 1));
                lo = fmaxf(lo, __shfl_xor_sync(0xffffffffu, lo, 2));
                hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, 1));
                hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, 2));
                best_lo[i] = fmaxf(best_lo[i], lo);
                best_hi[i] = fmaxf(best_hi[i], hi);
            }
        }
        if (t4 == 0) {
            #pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int qa = q0 + 16 * i + g, qb = qa + 8;
                if (qa < B) out[(long long)qa * groups + grp] = best_lo[i];
                if (qb < B) out[(long long)qb * groups + grp] = best_hi[i];
            }
        }
    }
}
"""
_SCORE_GROUPS = r"""
#include <cuda_fp16.h>
/* The fused path's candidates: block (s, b) scores the rows of query b's s-th kept group
   (top[b, s]) from the fp16 matrix against the fp32 query (as the one-pass scan does), into
   columns s * group + i of the (b, sel * group) candidate arrays; rows from `rows` on get
   row -1 and -inf.  A warp a row, lanes over half2 pairs (dim even). */
extern "C" __global__ void score_groups(const __half* __restrict__ m, const long long rows,
                                        const int dim, const int group, const int sel,
                                        const long long* __restrict__ top,
                                        const float* __restrict__ q,
                                        long long* __restrict__ cand_rows,
                                        float* __restrict__ cand_scores) {
    extern __shared__ float qs[];
    const int s = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) qs[i] = q[(long long)b * dim + i];
    __syncthreads();
    const long long first = top[(long long)b * sel + s] * group;
    const long long at = (long long)b * sel * group + (long long)s * group;
    for (int i = warp; i < group; i += warps) {
        const long long r = first + i;
        float acc = 0.0f;
        if (r < rows) {
            const __half2* v = reinterpret_cast<const __half2*>(m + r * dim);
            for (int c = lane; c < dim / 2; c += 32) {
                const float2 f = __half22float2(v[c]);
                acc += f.x * qs[2 * c] + f.y * qs[2 * c + 1];
            }
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) {
            cand_rows[at + i] = r < rows ? r : -1LL;
            cand_scores[at + i] = r < rows ? acc : __int_as_float(0xff800000);
        }
    }
}
"""
_kernels: dict[tuple[int, str, tuple[str, ...]], Any] = {}


def _kernel(cp: Any, source: str, name: str, options: tuple[str, ...] = ()) -> Any:
    key = (cp.cuda.Device().id, name, options)
    if key not in _kernels:
        _kernels[key] = cp.RawKernel(source, name, options=options)
    return _kernels[key]


FUSED_MIN = 2         # batches of FUSED_MIN to FUSED_MAX queries take the fused path
FUSED_MAX = 64        # (a k + margin up to MERGE_MAX, dim a multiple of 64).  H200,
                      # 2026-12-06, 1M x 384: 0.43-0.65 ms at 2-64 queries against 0.48-0.70
                      # by the GEMM path, but 1.85 against 1.51 at 256 (bench/gpu/probe_fused.py)
FUSED_THREADS = 256   # 8 warps: fused_group_max's launch bounds
FUSED_BLOCKS_PER_SM = 2  # fused_group_max blocks a multiprocessor in its grid (as many as
                         # its launch bounds' MINB lets reside)
ROW_ALIGN = 32        # the matrix's allocation is a multiple of this many rows (fused path)
SMALL_BATCH = 1       # up to this many queries: the one-pass scan (scan_select); more
                      # queries make it bound by shared-memory reads of the queries
SMALL_KEEP = MERGE_MAX  # ... when k + margin is at most this (merge_rank merges its blocks)
SMEM_BYTES = 48 * 1024  # dynamic shared memory of one scan_select block (no opt-in needed)
SCAN_THREADS = 256
BLOCKS_PER_SM = 4     # scan_select blocks per multiprocessor (scan_rows_per_block)
MAX_SCAN_ROWS = 8192  # most rows one scan_select block scores
MERGE_THREADS = 512   # one merge_rank block per query


def scan_rows_per_block(rows: int, b: int, dim: int, sms: int = 132) -> int:
    """Rows per scan_select block: about BLOCKS_PER_SM blocks on each of the ``sms``
    multiprocessors (one wave of blocks, each streaming a long run of rows; the block's
    selection at its end is then paid once per block), 256 to MAX_SCAN_ROWS rows, queries and
    scores in 48 KiB.  On the H200 (132 SMs), 1M x 384, one query: 2,048 rows a block took
    0.208 ms, 1,024 rows (the earlier rule, about 1,000 blocks) 0.245 ms, 512 rows 0.225 ms
    (bench/gpu/probe_small.py)."""
    fit = (SMEM_BYTES // 4 - b * dim) // b // 256 * 256
    want = max(256, -(-rows // (BLOCKS_PER_SM * sms) // 256) * 256)
    return max(0, min(fit, MAX_SCAN_ROWS, want))


def group_max(cp: Any, scores: Any, live: int, group: int, out: Any, offset: int) -> None:
    """out[:, offset:offset + groups] = maxima of each group of ``scores`` (b, >= live) fp16
    (``group`` a power of two, at least 32)."""
    b, ld = scores.shape
    groups = -(-live // group)
    threads = 256
    if ld % 8 == 0 and scores.flags.c_contiguous:  # 16-byte aligned rows
        name, total = "group_max8", b * groups * (group // 8)
    else:
        name, total = "group_max", b * groups * 32  # one warp per group
    _kernel(cp, _GROUP_MAX, name)(
        (-(-total // threads),), (threads,),
        (scores, cp.int64(ld), cp.int32(live), cp.int32(group), cp.int32(groups),
         out, cp.int64(out.shape[1]), cp.int32(offset), cp.int32(b)))


def radix_topk(cp: Any, x: Any, k: int, kth: Any = None) -> Any:
    """Column indices (b, k), unordered, of the k largest values of each row of ``x`` (b, n)
    float32 on the GPU; ``k`` must be at most n.  ``kth`` (b,) float32, when given, receives
    each row's k-th largest value."""
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    b, n = x.shape
    out = cp.empty((b, k), cp.int64)
    if kth is None:
        kth = cp.empty(b, cp.float32)
    if b and k:
        _kernel(cp, _RADIX_TOPK, "radix_topk")((b,), (512,),
                                               (x, cp.int32(n), cp.int32(k), out, kth))
    return out


def gather(cp: Any, x: Any, idx: Any) -> Any:
    """``take_along_axis(x, idx, axis=1)`` for 2-D arrays in two kernels (CuPy's builds
    broadcast index arrays: several launches, which is what small batches pay for)."""
    width = x.shape[1]
    flat = cp.ascontiguousarray(x).reshape(-1)
    return flat[idx + cp.arange(0, x.shape[0] * width, width, dtype=idx.dtype)[:, None]]


_fused_kernels: dict[tuple[int, int, int], Any] = {}  # (device, dim, query tile) -> kernel


def _query_tile(b: int) -> int:
    """Queries a fused_group_max block holds: 16, 32 or 64."""
    return 16 if b <= 16 else 32 if b <= 32 else 64


def _fused_smem(dim: int, qt: int) -> int:
    """fused_group_max's dynamic shared memory: the padded query tile."""
    return qt * (dim + 8) * 2


def _aligned(rows: int) -> int:
    """``rows`` rounded up to a multiple of ROW_ALIGN."""
    return -(-rows // ROW_ALIGN) * ROW_ALIGN


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy as cp

        return bool(cp.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False


class CupyStore(RowMap):
    """Unit vectors on one GPU; the row → id map on the host."""

    dtype = "float16"  # scanned; an fp32 copy answers the exact rescoring

    def __init__(self, dim: int, *, device_id: int = 0, capacity: int = 1024) -> None:
        import cupy as cp

        super().__init__()
        self._cp = cp
        self.dim = dim
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        self._sms = int(cp.cuda.Device(device_id).attributes["MultiProcessorCount"])
        with cp.cuda.Device(device_id):
            self._half = cp.zeros((_aligned(capacity), dim), cp.float16)
            self._full = cp.zeros((_aligned(capacity), dim), cp.float32)

    @property
    def nbytes(self) -> int:
        return int(self._half.nbytes + self._full.nbytes + self._ids.nbytes)

    # -- writes ---------------------------------------------------------------------------
    def _reserve(self, rows: int) -> None:
        """Double the capacity when full: the copy stays on the device."""
        cp = self._cp
        capacity = self._half.shape[0]
        if rows <= capacity:
            return
        new_capacity = _aligned(max(rows, 2 * capacity))
        with cp.cuda.Device(self.device_id):
            half = cp.zeros((new_capacity, self.dim), cp.float16)
            full = cp.zeros((new_capacity, self.dim), cp.float32)
            half[: self._size] = self._half[: self._size]
            full[: self._size] = self._full[: self._size]
        self._half, self._full = half, full

    def replace_all(self, ids: IdArray, vectors: FloatArray) -> None:
        """Load every row at once: one host→device copy; ``vectors`` may already be a CuPy
        array."""
        cp = self._cp
        n = len(ids)
        with cp.cuda.Device(self.device_id):
            full = self._new_matrix(n)
            if isinstance(vectors, cp.ndarray):
                full[:n] = vectors
            elif n:  # one copy from host memory, straight into place
                full[:n].set(np.ascontiguousarray(vectors, np.float32))
            self._adopt(full, ids)

    def _new_matrix(self, n: int) -> Any:
        """An fp32 matrix for ``n`` rows (at least 1024), rows from ``n`` on zero; the old
        matrix is freed first, so a reload does not need room for two."""
        self._full = self._half = None
        full = self._cp.empty((_aligned(max(n, 1024)), self.dim), self._cp.float32)
        full[n:] = 0
        return full

    def _adopt(self, full: Any, ids: IdArray) -> None:
        self._full = full
        self._half = full.astype(self._cp.float16)
        self._set_all_ids(ids, full.shape[0])

    def load_rows(self, ids: IdArray, source: RowSource, *, stage_bytes: int = STAGE_BYTES,
                  threads: int = STAGE_THREADS) -> None:
        """Load every row from ``source`` through pinned staging buffers (module docstring):
        each of ``threads`` threads takes every ``threads``-th piece, reads it into one of its
        two buffers and copies it on its own stream, and waits for a buffer's last copy
        before reusing it."""
        import cupyx

        cp = self._cp
        n, dim = source.rows, self.dim
        if source.dim != dim or len(ids) != n:
            raise ValueError(f"{len(ids)} ids and {n} x {source.dim} rows for a {dim}-dim store")
        piece = max(1, stage_bytes // (4 * dim))
        starts = range(0, n, piece)
        lanes = max(1, min(threads, len(starts)))

        def stage(first: int, full: Any) -> None:
            with cp.cuda.Device(self.device_id):
                stream = cp.cuda.Stream(non_blocking=True)
                buffers = [cupyx.empty_pinned((piece, dim), np.float32) for _ in range(2)]
                copied: list[Any] = [None, None]
                for i, a in enumerate(starts[first::lanes]):
                    if copied[i % 2] is not None:
                        copied[i % 2].synchronize()
                    rows = buffers[i % 2][: min(piece, n - a)]
                    source.read(rows, a, threads=1)
                    full[a: a + len(rows)].set(rows, stream=stream)
                    copied[i % 2] = stream.record()
                stream.synchronize()

        with cp.cuda.Device(self.device_id):
            full = self._new_matrix(n)
            try:
                with ThreadPoolExecutor(lanes) as pool:
                    list(pool.map(lambda first: stage(first, full), range(lanes if n else 0)))
            finally:  # the staging buffers are a one-off: give them back to the system
                cp.get_default_pinned_memory_pool().free_all_blocks()
            self._adopt(full, ids)

    def export(self) -> tuple[IdArray, FloatArray]:
        with self._cp.cuda.Device(self.device_id):
            out = self.host_buffer((self._size, self.dim), np.float32)
            self._full[: self._size].get(out=out)
        return self._ids[: self._size].copy(), out

    def _write(self, rows: IdArray, vectors: FloatArray) -> None:
        cp = self._cp
        with cp.cuda.Device(self.device_id):
            dev_rows = cp.asarray(rows)
            block = cp.ascontiguousarray(cp.asarray(vectors, dtype=cp.float32))
            self._full[dev_rows] = block
            self._half[dev_rows] = block.astype(cp.float16)

    def _move(self, dst: int, src: int) -> None:
        self._full[dst] = self._full[src]
        self._half[dst] = self._half[src]

    # -- search ---------------------------------------------------------------------------
    def search(self, queries: FloatArray, n: int,
               filters: Sequence[SearchFilter | None] | None = None) -> list[list[Hit]]:
        cp = self._cp
        b = queries.shape[0]
        size = self._size
        if b == 0:
            return []
        if size == 0 or n <= 0:
            return [[] for _ in range(b)]
        k = min(n, size)
        plain, subset, full = split_by_filter(filters, b, size)
        with cp.cuda.Device(self.device_id):
            q32 = cp.asarray(np.ascontiguousarray(queries, np.float32))
            if len(plain) == b:
                rows, scores = self._search_certified(q32, k)
            else:
                assert filters is not None
                rows = cp.full((b, k), -1, cp.int64)
                scores = cp.full((b, k), -cp.inf, cp.float32)
                if plain:
                    at = cp.asarray(plain)
                    rows[at], scores[at] = self._search_certified(q32[at], k)
                if full:
                    at = cp.asarray(full)
                    rows[at], scores[at] = self._search_exact(q32[at], k,
                                                              [filters[i] for i in full])
                for i in subset:
                    flt = filters[i]
                    assert flt is not None and flt.allow is not None
                    rows[i], scores[i] = self._subset_top(
                        q32[i], flt.allow.rows_in(self, cp.asarray), k, flt)
            rows_h = cp.asnumpy(rows)
            scores_h = cp.asnumpy(scores)
        return hits(self._ids, rows_h, scores_h)

    def warm_up(self) -> None:
        """Each search path once, on random queries over the loaded rows (results dropped).
        CuPy compiles a kernel at its first use (NVRTC; with a cold kernel cache, as on a new
        container: the first worker of a bench/gpu/sql_path.sh run spent 7 s more in top-k
        than the next ones, on the same queries), and cuBLAS sets up at its first GEMM."""
        if self._size == 0:
            return
        cp = self._cp
        rng = np.random.default_rng(0)
        queries = rng.standard_normal((8, self.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        cursor = SearchFilter(below=0.0, exclude=frozenset())
        k = min(10, self._size)
        counted = self.uncertified_queries  # random queries are no one's searches
        best = self.search(queries[:1], k)[0]  # one query: the one-pass scan, merge_rank
        self.search(queries[:1], 200)  # k + margin above MERGE_MAX: the sorting rescoring
        self.search(queries, 40)  # a batch: the fused path (k = 200 ran the GEMM path)
        self.search(queries[:2], 40, [cursor, None])  # a paged round: the exact scan
        with cp.cuda.Device(self.device_id):
            q32 = cp.asarray(queries[:1])
            # the near-tie pass on the few rows within the bound of the k-th score (transient
            # memory in proportion to them, not to the matrix)
            self._near_ties(q32, cp.full(1, best[-1][1], cp.float32), k)
            cp.cuda.Device().synchronize()
        self.uncertified_queries = counted

    def _subset_top(self, q: Any, rows: Any, k: int,
                    flt: SearchFilter | None = None) -> tuple[Any, Any]:
        """The best k of ``rows`` (ascending, on the device) for one query ``q`` (dim,), scored
        exactly in fp32, with ``flt``'s cursor applied; (k,) rows and scores, -1 / -inf
        padded."""
        cp = self._cp
        out_rows = cp.full(k, -1, cp.int64)
        out_scores = cp.full(k, -cp.inf, cp.float32)
        m = len(rows)
        if m == 0 or k == 0:
            return out_rows, out_scores
        scores = self._full[rows] @ q  # (m,): gathers m rows, cheap next to a scan
        if flt is not None:
            restrict_subset(cp, scores, rows, flt, self._row_of)
        kk = min(k, m)
        part = radix_topk(cp, scores[None, :], kk)[0] if kk < m else cp.arange(m)
        cand = cp.where(scores[part] == -cp.inf, -1, rows[part])
        got_rows, got_scores = self._exact_top(q[None, :], cand[None, :], kk)
        out_rows[:kk], out_scores[:kk] = got_rows[0], got_scores[0]
        return out_rows, out_scores

    def _exact_top(self, q32: Any, cand: Any, k: int) -> tuple[Any, Any]:
        """Rescore candidate rows (b, c) exactly in fp32; the best k, ties by lower row.

        Up to MERGE_MAX candidates: one kernel (``exact_rank``).  More (paged rounds asking for many
        rows): one sort, the order-preserving bits of the score in the high half of a 64-bit
        key, the complement of the row in the low half."""
        cp = self._cp
        b, c = cand.shape
        if c <= MERGE_MAX and k <= c:
            cand = cp.ascontiguousarray(cand, dtype=cp.int64)
            # c >= k: every rank below c is written once, so all k outputs are
            rows = cp.empty((b, k), cp.int64)
            scores = cp.empty((b, k), cp.float32)
            _kernel(cp, _EXACT_RANK, "exact_rank")(
                (b,), (256,), (cp.ascontiguousarray(q32), self._full, cand, cp.int32(c),
                               cp.int32(self.dim), cp.int32(k), rows, scores))
            return rows, scores
        valid = cand >= 0
        safe = cp.where(valid, cand, 0)
        exact = (self._full[safe] * q32[:, None, :]).sum(axis=2)
        exact = cp.where(valid, exact, -cp.inf).astype(cp.float32)
        bits = exact.view(cp.uint32).astype(cp.uint64)
        order_bits = cp.where(bits & 0x80000000, ~bits & 0xFFFFFFFF, bits | 0x80000000)
        key = (order_bits << 32) | (0xFFFFFFFF - safe.astype(cp.uint64))
        by = cp.argsort(key, axis=1)[:, ::-1][:, :k]
        return gather(cp, cand, by), gather(cp, exact, by)

    def _small_ok(self, b: int, keep: int) -> bool:
        return (b <= SMALL_BATCH and keep <= SMALL_KEEP and self.dim % 8 == 0
                and scan_rows_per_block(self._size, b, self.dim, self._sms) >= max(256, keep))

    def _search_certified(self, q32: Any, k: int) -> tuple[Any, Any]:
        """Candidates by the one-pass scan or the GEMM path, rescored exactly; a query whose
        answer the bound cannot certify (module doc) is answered from every row within the
        bound of its k-th score (``_near_ties``)."""
        cp = self._cp
        keep = min(k + MARGIN, self._size)
        fused = keep <= MERGE_MAX  # the usual k: merge, rescoring and certificate in one kernel
        bound = None
        if self._small_ok(len(q32), keep):  # implies fused
            cand, approx = self._candidates_scan(q32, keep)
            eps = EPS_SCAN
        elif fused and self._fused_ok(len(q32)):
            cand, approx, bound = self._candidates_fused(q32, keep)
            keep = min(MERGE_MAX, cand.shape[1])  # rescoring 128 rows exactly costs little
            eps = EPS_SCAN
        else:
            if fused and len(q32) <= WIDE_BATCH:
                keep = self._wide_keep(len(q32), keep)
            cand, approx = self._candidates_gemm(q32, keep, merged=not fused)
            eps = EPS_GEMM
        if fused:
            rows, scores, ok = self._merge_rank(q32, cand, approx, keep, k, eps, bound)
            todo = np.flatnonzero(cp.asnumpy(ok) == 0)  # the one sync of the usual case
        else:
            rows, scores = self._exact_top(q32, cp.where(approx == -cp.inf, -1, cand), k)
            # No other row can beat the k-th; a query with padding (-inf) among its
            # candidates had every row as a candidate, and -inf + eps passes the test too.
            if keep >= self._size or approx.shape[1] < keep:
                return rows, scores
            ok = scores[:, k - 1] >= approx.min(axis=1) + eps
            todo = cp.asnumpy(cp.flatnonzero(~ok))
        if len(todo):
            self.uncertified_queries += len(todo)
            log.debug("%d of %d queries not certified: near-ties", len(todo), len(q32))
            at = cp.asarray(todo)
            rows[at], scores[at] = self._near_ties(q32[at], scores[at, k - 1], k)
        return rows, scores

    def _merge_rank(self, q32: Any, cand: Any, approx: Any, keep: int, k: int,
                    eps: float, bound: Any = None) -> tuple[Any, Any, Any]:
        """The best ``keep`` of each query's candidates (b, w) by approximate score, rescored
        exactly, the best k in order: (rows, scores, ok) with ok[i] = 1 where the certificate
        holds (one kernel, ``merge_rank``; keep <= MERGE_MAX).  ``bound`` (b,): the highest
        approximate score (fused path, EPS_FUSED) of any row that is no candidate."""
        cp = self._cp
        b, w = cand.shape
        rows = cp.empty((b, k), cp.int64)
        scores = cp.empty((b, k), cp.float32)
        ok = cp.empty(b, cp.int32)
        _kernel(cp, _MERGE_RANK, "merge_rank")(
            (b,), (MERGE_THREADS,),
            (cand, approx, cp.int32(w), cp.int32(keep), q32, self._full, cp.int32(self.dim),
             cp.int32(k), cp.float32(eps), cp.int32(keep >= self._size), rows, scores, ok,
             ok if bound is None else bound, cp.float32(EPS_FUSED),
             cp.int32(bound is not None)))
        return rows, scores, ok

    def _fused_ok(self, b: int) -> bool:
        return (FUSED_MIN <= b <= FUSED_MAX and self.dim % 64 == 0
                and self._fused_kernel(_query_tile(b)) is not None)

    def _fused_kernel(self, qt: int) -> Any:
        """fused_group_max for this dimension and query tile, compiled once; None where it
        does not compile or load: the GEMM path then serves those batches."""
        key = (self.device_id, self.dim, qt)
        if key not in _fused_kernels:
            cp = self._cp
            kernel = _kernel(cp, _FUSED_GROUP_MAX, "fused_group_max",
                             (f"-DDIM={self.dim}", f"-DQT={qt}"))
            try:
                with cp.cuda.Device(self.device_id):
                    kernel.compile()
                    kernel.max_dynamic_shared_size_bytes = _fused_smem(self.dim, qt)
            except Exception as exc:  # a compile or driver error: the GEMM path still works
                log.warning("the fused search path is off (%s); batches take the GEMM path",
                            exc)
                kernel = None
            _fused_kernels[key] = kernel
        return _fused_kernels[key]

    def _candidates_fused(self, q32: Any, keep: int) -> tuple[Any, Any, Any]:
        """The fused path (FUSED_MIN..FUSED_MAX queries; see ``_FUSED_GROUP_MAX``): the best
        ``keep`` groups of each query by their maxima on the tensor cores, every row of them
        scored from the fp16 matrix with the fp32 query.  (rows, approximate scores, bound):
        (b, keep x group) candidates, -inf past the last row, and each query's bound on the
        approximate score of every other row (None when every group is kept)."""
        cp = self._cp
        b, dim, size = len(q32), self.dim, self._size
        group = self._group_rows()
        groups = -(-size // group)
        sel = min(keep, groups)
        qt = _query_tile(b)
        tiles = -(-b // qt)
        strides = max(1, min(-(-groups // 8), -(-FUSED_BLOCKS_PER_SM * self._sms // tiles)))
        maxima = cp.empty((b, groups), cp.float32)
        self._fused_kernel(qt)(
            (tiles, strides), (FUSED_THREADS,),
            (self._half, cp.int64(size), cp.int32(group), cp.int64(groups),
             q32.astype(cp.float16), cp.int32(b), maxima), shared_mem=_fused_smem(dim, qt))
        bound = None
        if sel < groups:
            bound = cp.empty(b, cp.float32)
            top = radix_topk(cp, maxima, sel, bound)
        else:
            top = cp.tile(cp.arange(groups, dtype=cp.int64), (b, 1))
        rows = cp.empty((b, sel * group), cp.int64)
        approx = cp.empty((b, sel * group), cp.float32)
        _kernel(cp, _SCORE_GROUPS, "score_groups")(
            (sel, b), (256,),
            (self._half, cp.int64(size), cp.int32(dim), cp.int32(group), cp.int32(sel), top,
             q32, rows, approx), shared_mem=4 * dim)
        return rows, approx, bound

    def _near_ties(self, q32: Any, kth: Any, k: int) -> tuple[Any, Any]:
        """The exact best k of each query (t, dim) whose k-th exact score so far is ``kth``
        (t,): every row whose fp16 GEMM score is at least ``kth - EPS_GEMM`` is a candidate
        (the true top k are among them), and only those are rescored in fp32."""
        cp = self._cp
        size = self._size
        t = len(q32)
        q16 = q32.astype(cp.float16)
        floor = (kth - EPS_GEMM)[:, None]
        chunk_rows = max(1, CHUNK_BYTES // (6 * t))  # fp16 scores and their fp32 compare
        which, cols = [], []
        for start in range(0, size, chunk_rows):
            block = (q16 @ self._half[start:start + chunk_rows].T).astype(cp.float32)
            at_q, at_col = cp.nonzero(block >= floor)  # row-major: ascending rows per query
            which.append(at_q)
            cols.append(at_col + start)
        key = cp.concatenate(which) * size + cp.concatenate(cols)
        if len(which) > 1:  # chunks interleave the queries: order by query, then row
            key = cp.sort(key)
        which_all, cols_all = key // size, key % size
        # Where each query's rows start (which_all ascends).  Not cp.bincount: with a cold
        # kernel cache it compiled for 3-4 s per distinct number of queries
        # (bench/gpu/probe_first_use.py, H200 2026-12-02).
        starts = cp.searchsorted(which_all, cp.arange(t + 1)).tolist()
        counts = [b - a for a, b in itertools.pairwise(starts)]
        rows = cp.full((t, k), -1, cp.int64)
        scores = cp.full((t, k), -cp.inf, cp.float32)
        too_many = [j for j in range(t) if counts[j] > THRESHOLD_SHARE * size]
        log.debug("near-ties: rows within the bound per query %s (%d to the exact scan)",
                  counts, len(too_many))
        for j in range(t):
            if counts[j] <= THRESHOLD_SHARE * size:
                rows[j], scores[j] = self._subset_top(
                    q32[j], cols_all[starts[j]:starts[j + 1]], k)
        if too_many:
            at = cp.asarray(too_many)
            rows[at], scores[at] = self._search_exact(q32[at], k)
        return rows, scores

    def _candidates_scan(self, q32: Any, keep: int) -> tuple[Any, Any]:
        """Each scan_select block's best ``keep`` rows per query, by one pass over the fp16
        matrix: (rows, approximate scores), (b, blocks x keep), -inf where a block has fewer
        rows.  ``merge_rank`` selects from them (keep <= SMALL_KEEP = MERGE_MAX)."""
        cp = self._cp
        b = q32.shape[0]
        size = self._size
        per_block = scan_rows_per_block(size, b, self.dim, self._sms)
        blocks = -(-size // per_block)
        cand_rows = cp.empty((b, blocks * keep), cp.int64)
        cand_scores = cp.empty((b, blocks * keep), cp.float32)
        maxb = 1 << (b - 1).bit_length()  # 1, 2, 4: accumulators in registers
        kernel = _kernel(cp, _SCAN_SELECT, "scan_select", (f"-DDIM={self.dim}", f"-DMAXB={maxb}"))
        kernel((blocks,), (SCAN_THREADS,),
               (self._half, cp.int64(size), cp.ascontiguousarray(q32), cp.int32(b),
                cp.int32(keep), cp.int32(per_block), cand_rows, cand_scores),
               shared_mem=4 * b * (self.dim + per_block))
        return cand_rows, cand_scores

    def _group_rows(self) -> int:
        """Rows a group on the GEMM path: at least GROUP, about TARGET_GROUPS groups (short
        rows of maxima for the one-block-per-query selection, few candidates a kept group)."""
        group = GROUP
        while self._size // group > TARGET_GROUPS and group < MAX_GROUP:
            group *= 2
        return group

    def _chunk_rows(self, b: int, group: int) -> int:
        """Rows scored by one GEMM of ``b`` queries (a CHUNK_BYTES fp16 score block)."""
        return max(group, (CHUNK_BYTES // (2 * b)) // group * group)

    def _wide_keep(self, b: int, keep: int) -> int:
        """Groups a small batch keeps per score block on the GEMM path (WIDE_CANDIDATES)."""
        group = self._group_rows()
        blocks = -(-self._size // self._chunk_rows(b, group))
        return min(MERGE_MAX, self._size, max(keep, WIDE_CANDIDATES // (group * blocks)))

    def _candidates_gemm(self, q32: Any, keep: int, merged: bool = True) -> tuple[Any, Any]:
        """Candidate rows per query, chunk by chunk: fp16 scores by one GEMM, the best
        ``keep`` groups of the chunk by their maxima, their rows and scores gathered while
        the chunk is at hand (``gather_groups``); with ``merged``, then the best ``keep`` of
        all chunks' candidates.  (rows, approximate scores), -inf past the last row."""
        cp = self._cp
        size = self._size
        b = q32.shape[0]
        q16 = q32.astype(cp.float16)
        group = self._group_rows()
        chunk_rows = self._chunk_rows(b, group)
        starts = range(0, size, chunk_rows)
        lives = [min(start + chunk_rows, size) - start for start in starts]
        sels = [min(keep, -(-live // group)) for live in lives]  # groups kept per chunk
        width = sum(sels) * group
        rows = cp.empty((b, width), cp.int64)
        approx = cp.empty((b, width), cp.float32)
        gather_kernel = _kernel(cp, _GATHER_GROUPS, "gather_groups")
        offset = 0
        for start, live, sel in zip(starts, lives, sels, strict=True):
            scores = q16 @ self._half[start:start + live].T  # (b, live) fp16
            groups = -(-live // group)
            every = sel == groups
            if every:
                top = rows  # not read
            else:
                maxima = cp.empty((b, groups), cp.float32)
                group_max(cp, scores, live, group, maxima, 0)
                top = radix_topk(cp, maxima, sel)
            total = b * sel * group
            gather_kernel(
                (-(-total // 256),), (256,),
                (scores, cp.int64(scores.shape[1]), cp.int32(live), cp.int32(group),
                 cp.int32(sel), top, cp.int32(every), cp.int64(start), cp.int32(b), rows,
                 approx, cp.int64(width), cp.int64(offset)))
            offset += sel * group
        if merged and keep < width:
            pick = radix_topk(cp, approx, keep)
            rows = gather(cp, rows, pick)
            approx = gather(cp, approx, pick)
        return rows, approx

    def _search_exact(self, q32: Any, n: int,
                      filters: Sequence[SearchFilter | None] | None = None) -> tuple[Any, Any]:
        """Exact fp32 scores over every row, then the per-query restrictions: searches with
        metadata filters or a paged round's cursor (allowed ids, a score ceiling, excluded
        ids), and the last resort of a query the certificate could not vouch for."""
        cp = self._cp
        size = self._size
        scores = q32 @ self._full[:size].T
        restrict(cp, scores, filters, self._row_of)
        k = min(n, size)
        part = radix_topk(cp, scores, k) if k < size else \
            cp.ascontiguousarray(cp.broadcast_to(cp.arange(size), (scores.shape[0], size)))
        # rows ruled out above (score -inf) must stay out after the exact rescoring
        ruled_out = gather(cp, scores, part) == -cp.inf
        return self._exact_top(q32, cp.where(ruled_out, -1, part), k)
