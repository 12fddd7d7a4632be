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
3. the rows of those groups are ranked by their fp16 scores, the best ``k + margin`` of them
   are rescored exactly in fp32, and the best k returned.

The margin absorbs fp16 rounding (scores are within about 1e-3 of the exact ones): a row
whose exact score is in the top k but whose fp16 score falls outside the top ``k + margin``
would need a rounding error larger than the score gap across ``margin`` rows.  Recall against
a float64 reference is measured by ``bench/retrieval.py`` and tested in tests/test_store.py.

Rows are swap-deleted and the matrix grows geometrically (capacity doubles; a grow copies on
the device, never from the host), so an insert costs O(1) amortised.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .store import FloatArray, Hit, IdArray, RowMap, SearchFilter

log = logging.getLogger(__name__)

GROUP = 32          # rows per group for the group-maximum pruning
MARGIN = 16         # extra groups and extra rows rescored beyond k
CHUNK_BYTES = 1 << 28  # the fp16 score block of one GEMM (256 MiB)


# Exact top-k selection per row by radix select: four 8-bit passes over the row find the key
# of the k-th largest value (float bits mapped to an order-preserving uint32), then one pass
# writes out every index above it and as many equal to it as k needs.  One block per row;
# the rows are short here (group maxima, candidate lists), so they stay in L1/L2 between
# passes.  This replaces argpartition, which sorts and costs a multiple of the matmul.
_RADIX_TOPK = r"""
__device__ __forceinline__ unsigned int key_of(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void radix_topk(const float* __restrict__ x, const int n, const int k,
                                      long long* __restrict__ out) {
    const float* row = x + (long long)blockIdx.x * n;
    long long* dst = out + (long long)blockIdx.x * k;
    __shared__ unsigned int hist[256];
    __shared__ unsigned int prefix, mask;
    __shared__ int need, n_gt, n_eq;
    if (threadIdx.x == 0) { prefix = 0u; mask = 0u; need = k; }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        const unsigned int p = prefix, m = mask;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const unsigned int key = key_of(row[i]);
            if ((key & m) == p) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int left = need;
            int digit = 255;
            for (; digit > 0; --digit) {
                const int c = (int)hist[digit];
                if (c >= left) break;
                left -= c;
            }
            prefix = p | ((unsigned int)digit << shift);
            mask = m | (255u << shift);
            need = left;          /* how many keys equal to the final prefix to take */
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) { n_gt = 0; n_eq = 0; }
    __syncthreads();
    const unsigned int kth = prefix;
    const int take_eq = need, first_eq = k - need;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const unsigned int key = key_of(row[i]);
        if (key > kth) {
            dst[atomicAdd(&n_gt, 1)] = i;
        } else if (key == kth) {
            const int pos = atomicAdd(&n_eq, 1);
            if (pos < take_eq) dst[first_eq + pos] = i;
        }
    }
}
"""
_kernels: dict[int, Any] = {}


def radix_topk(cp: Any, x: Any, k: int) -> Any:
    """Column indices (b, k), unordered, of the k largest values of each row of ``x`` (b, n)
    float32 on the GPU; ``k`` must be at most n."""
    device = cp.cuda.Device().id
    if device not in _kernels:
        _kernels[device] = cp.RawKernel(_RADIX_TOPK, "radix_topk")
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    b, n = x.shape
    out = cp.empty((b, k), cp.int64)
    if b and k:
        _kernels[device]((b,), (256,), (x, cp.int32(n), cp.int32(k), out))
    return out


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy as cp

        return bool(cp.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False


class CupyStore(RowMap):
    """Unit vectors on one GPU; the row → id map on the host."""

    def __init__(self, dim: int, *, device_id: int = 0, capacity: int = 1024) -> None:
        import cupy as cp

        super().__init__()
        self._cp = cp
        self.dim = dim
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        with cp.cuda.Device(device_id):
            self._half = cp.zeros((capacity, dim), cp.float16)
            self._full = cp.zeros((capacity, dim), cp.float32)

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
        new_capacity = max(rows, 2 * capacity)
        with cp.cuda.Device(self.device_id):
            half = cp.zeros((new_capacity, self.dim), cp.float16)
            full = cp.zeros((new_capacity, self.dim), cp.float32)
            half[: self._size] = self._half[: self._size]
            full[: self._size] = self._full[: self._size]
        self._half, self._full = half, full

    def replace_all(self, ids: IdArray, vectors: FloatArray) -> None:
        """Load every row at once: one host→device copy (pinned when the caller passes a
        pinned array); ``vectors`` may already be a CuPy array."""
        cp = self._cp
        n = len(ids)
        with cp.cuda.Device(self.device_id):
            full = cp.ascontiguousarray(cp.asarray(vectors, dtype=cp.float32))
            self._full = cp.zeros((max(n, 1024), self.dim), cp.float32)
            self._full[:n] = full
            self._half = self._full.astype(cp.float16)
        self._set_all_ids(ids, max(n, 1024))

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
        with cp.cuda.Device(self.device_id):
            q32 = cp.asarray(np.ascontiguousarray(queries, np.float32))
            if filters and any(f is not None for f in filters):
                rows, scores = self._search_filtered(q32, n, filters)
            else:
                rows, scores = self._search_plain(q32, min(n, size))
            rows_h = cp.asnumpy(rows)
            scores_h = cp.asnumpy(scores)
        ids = self._ids
        return [[(int(ids[r]), float(s)) for r, s in zip(rr, ss, strict=True)
                 if r >= 0 and s != -np.inf]
                for rr, ss in zip(rows_h, scores_h, strict=True)]

    def _exact_top(self, q32: Any, cand: Any, k: int) -> tuple[Any, Any]:
        """Rescore candidate rows (b, c) exactly in fp32; the best k, ties by lower row."""
        cp = self._cp
        valid = cand >= 0
        safe = cp.where(valid, cand, 0)
        exact = cp.einsum("bd,bcd->bc", q32, self._full[safe])
        exact = cp.where(valid, exact, -cp.inf).astype(cp.float32)
        # CuPy's lexsort is 1-D only: sort rows ascending first, then a stable sort by score
        by_row = cp.argsort(cp.where(valid, safe, cp.iinfo(cp.int64).max), axis=1)
        rows_sorted = cp.take_along_axis(cand, by_row, axis=1)
        exact_sorted = cp.take_along_axis(exact, by_row, axis=1)
        by_score = cp.argsort(-exact_sorted, axis=1, kind="stable")[:, :k]
        return (cp.take_along_axis(rows_sorted, by_score, axis=1),
                cp.take_along_axis(exact_sorted, by_score, axis=1))

    def _search_plain(self, q32: Any, k: int) -> tuple[Any, Any]:
        cp = self._cp
        size = self._size
        b = q32.shape[0]
        q16 = q32.astype(cp.float16)
        groups = -(-size // GROUP)
        padded = groups * GROUP
        keep_groups = min(groups, k + MARGIN)
        keep_rows = min(keep_groups * GROUP, k + MARGIN)
        chunk_rows = max(GROUP, (CHUNK_BYTES // (2 * b)) // GROUP * GROUP)
        maxima = cp.empty((b, groups), cp.float32)
        for start in range(0, padded, chunk_rows):
            stop = min(start + chunk_rows, padded)
            live = min(stop, size) - start
            scores = cp.full((b, stop - start), -cp.inf, cp.float16)
            scores[:, :live] = q16 @ self._half[start:start + live].T
            maxima[:, start // GROUP: stop // GROUP] = scores.reshape(b, -1, GROUP).max(axis=2)
        if keep_groups < groups:
            top_groups = radix_topk(cp, maxima, keep_groups)
        else:
            top_groups = cp.broadcast_to(cp.arange(groups), (b, groups))
        cand = (top_groups[:, :, None] * GROUP + cp.arange(GROUP)[None, None, :]).reshape(b, -1)
        cand = cp.where(cand < size, cand, -1)
        safe = cp.where(cand >= 0, cand, 0)
        approx = cp.einsum("bd,bcd->bc", q16.astype(cp.float32),
                           self._half[safe].astype(cp.float32))
        approx = cp.where(cand >= 0, approx, -cp.inf)
        if keep_rows < cand.shape[1]:
            pick = radix_topk(cp, approx, keep_rows)
            cand = cp.take_along_axis(cand, pick, axis=1)
        return self._exact_top(q32, cand, k)

    def _search_filtered(self, q32: Any, n: int,
                         filters: Sequence[SearchFilter | None]) -> tuple[Any, Any]:
        """Metadata filters and paged rounds (allowed ids, a score ceiling, excluded ids):
        exact fp32 scores over every row, then the per-query restrictions."""
        cp = self._cp
        size = self._size
        scores = q32 @ self._full[:size].T
        for i, flt in enumerate(filters):
            if flt is None:
                continue
            if flt.allow is not None:
                keep = cp.zeros(size, cp.bool_)
                allowed = [r for d in flt.allow if (r := self._row_of.get(d)) is not None]
                if allowed:
                    keep[cp.asarray(allowed)] = True
                scores[i, ~keep] = -cp.inf
            if flt.below is not None:
                row = scores[i]
                row[row > flt.below] = -cp.inf
            rows = [r for d in flt.exclude if (r := self._row_of.get(d)) is not None]
            if rows:
                scores[i, cp.asarray(rows)] = -cp.inf
        k = min(n, size)
        part = radix_topk(cp, scores, k) if k < size else \
            cp.ascontiguousarray(cp.broadcast_to(cp.arange(size), (scores.shape[0], size)))
        # rows ruled out above (score -inf) must stay out after the exact rescoring
        ruled_out = cp.take_along_axis(scores, part, axis=1) == -cp.inf
        return self._exact_top(q32, cp.where(ruled_out, -1, part), k)
