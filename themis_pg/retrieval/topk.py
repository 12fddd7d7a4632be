"""Exact top-k by inner product (cosine on unit vectors), on the CPU.

One matrix product for the whole batch of queries, then ``argpartition`` per query and a sort
of the k survivors.  The GPU store has its own selection kernel behind the same contract.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def select_top_k(scores: npt.NDArray[np.float32],
                 k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Column indices and values of the k largest scores of each row, best first.

    scores: (b, n).  Returns two (b, min(k, n)) arrays.  Ties are broken by lower column index
    so results are deterministic.
    """
    b, n = scores.shape
    k = min(k, n)
    if k <= 0 or b == 0:
        return np.empty((b, 0), np.int64), np.empty((b, 0), np.float32)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), (b, n)).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    # sort by score descending, then by column ascending
    order = np.lexsort((part, -part_scores), axis=1)
    rows = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return rows, np.take_along_axis(part_scores, order, axis=1).astype(np.float32)


def top_k(matrix: npt.NDArray[np.float32], queries: npt.NDArray[np.float32],
          k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Row indices and scores of the k best rows of ``matrix`` (n, d) for each query (b, d)."""
    if matrix.shape[0] == 0 or queries.shape[0] == 0:
        b = queries.shape[0]
        return np.empty((b, 0), np.int64), np.empty((b, 0), np.float32)
    return select_top_k(queries @ matrix.T, k)
