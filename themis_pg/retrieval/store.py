"""The vector store interface: where the resident embedding matrix lives and how it is searched.

The index (``index.py``) keeps a store current from the change log; a store only holds rows
and answers exact top-n.  ``NumpyStore`` is the CPU implementation; a GPU store (CuPy) sits
behind the same protocol.  Rows are unit vectors, so inner product is cosine similarity.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .row_index import RowIndex
from .topk import select_top_k

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


SUBSET_SHARE = 0.25  # an allow set of at most this share of the rows: score only its rows


class AllowSet:
    """The ids a metadata filter admits.  A store maps them to its rows once per layout (rows
    move only when rows are added or removed) and keeps that map here, so a filter the worker
    has cached costs no per-id work on later searches (worker/filter_cache.py)."""

    __slots__ = ("_rows", "ids")

    def __init__(self, ids: Iterable[int]) -> None:
        self.ids = frozenset(int(i) for i in ids)
        self._rows: tuple[object, int, Any] | None = None  # (store token, layout, rows)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.ids

    def rows_in(self, store: RowMap, to_device: Any = None) -> Any:
        """The store rows of these ids, ascending (so ties stay broken by lower row), as the
        store's array type (``to_device`` converts from NumPy); memoised per store layout."""
        memo = self._rows
        if memo is not None and memo[0] is store.token and memo[1] == store.layout:
            return memo[2]
        rows = store.row_of.rows_of(np.fromiter(self.ids, np.int64, len(self.ids)))
        rows.sort()
        out = rows if to_device is None else to_device(rows)
        self._rows = (store.token, store.layout, out)
        return out


@dataclass(frozen=True)
class SearchFilter:
    """Per-query restriction: only the ids in ``allow`` (None: all; a metadata filter's
    matches), only rows scoring at most ``below`` (None: any), and never the ids in
    ``exclude`` (with ``below``, how a later round of one paged search continues where the
    previous one stopped)."""

    below: float | None = None
    exclude: frozenset[int] = field(default_factory=frozenset)
    allow: AllowSet | None = None

    def __post_init__(self) -> None:
        if self.allow is not None and not isinstance(self.allow, AllowSet):
            object.__setattr__(self, "allow", AllowSet(self.allow))


Hit = tuple[int, float]


class RowSource(Protocol):
    """Rows to load that are not in memory yet (snapshot.VectorFile): the store decides how
    they travel to where it keeps them."""

    @property
    def rows(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def read(self, out: FloatArray, first: int = 0, threads: int | None = None) -> None:
        """Rows ``first`` .. ``first + len(out)`` into ``out`` (C-contiguous float32)."""
        ...


class VectorStore(Protocol):
    """Document ids and unit embeddings, searched exactly."""

    dim: int
    device: str
    dtype: str  # of the matrix every search scans
    # queries whose first candidates the store could not certify exact and searched again
    # (a GPU store's near-ties; always 0 where every search is exact at once)
    uncertified_queries: int

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Bytes the resident matrix and ids take (capacity, not just the live rows)."""
        ...

    def replace_all(self, ids: IdArray, vectors: FloatArray) -> None: ...

    def load_rows(self, ids: IdArray, source: RowSource) -> None:
        """``replace_all`` with vectors still to be read; the store's contents are undefined
        if the read fails (OSError, ValueError), so the caller loads again another way."""
        ...

    def host_buffer(self, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """An empty host array to load rows into before ``replace_all`` (a store may hand out
        memory that suits its copy; RowMap's is pageable, see there)."""
        ...

    def export(self) -> tuple[IdArray, FloatArray]:
        """Copies of the live ids and float32 vectors in host memory (for a snapshot)."""
        ...

    def upsert(self, ids: IdArray, vectors: FloatArray) -> None: ...

    def delete(self, ids: Sequence[int]) -> int:
        """Remove these ids (unknown ones are ignored); returns how many were present."""
        ...

    def search(self, queries: FloatArray, n: int,
               filters: Sequence[SearchFilter | None] | None = None) -> list[list[Hit]]:
        """The best ``n`` (id, score) per unit-norm query, best first, ties by lower row."""
        ...

    def warm_up(self) -> None:
        """Run every search path once on the loaded rows, so that the first callers after a
        start pay no one-time cost (a GPU store compiles its kernels at first use)."""
        ...


def hits(ids: IdArray, rows: npt.NDArray[np.int64],
         scores: npt.NDArray[np.float32]) -> list[list[Hit]]:
    """(id, score) lists from (b, k) row and score arrays; rows < 0 or scores of -inf are no
    hits.  Vectorised: a Python loop over NumPy scalars costs about 1 us each, and the pairs
    are built by ``zip`` in C, the few padded rows filtered apart (on the 2-core VM, 64 x 10
    hits: 73 us, 135 with a comprehension over every hit; 1,024 x 10: 3.0 ms, 3.6 before)."""
    valid = (rows >= 0) & (scores != -np.inf)
    id_rows = ids[np.where(valid, rows, 0)].tolist()
    score_rows = scores.astype(np.float64).tolist()
    out: list[list[Hit]] = list(map(list, map(zip, id_rows, score_rows)))
    if not valid.all():
        for i in np.flatnonzero(~valid.all(axis=1)).tolist():
            keep = valid[i].tolist()
            out[i] = [hit for hit, ok in zip(out[i], keep, strict=True) if ok]
    return out


def split_by_filter(filters: Sequence[SearchFilter | None] | None, b: int, size: int
                    ) -> tuple[list[int], list[int], list[int]]:
    """Which queries of a batch take which path: (no filter: the store's fastest search;
    a small allow set: only its rows are scored; the rest: every row scored exactly, then
    ``restrict``)."""
    plain: list[int] = []
    subset: list[int] = []
    full: list[int] = []
    for i in range(b):
        flt = filters[i] if filters else None
        if flt is None:
            plain.append(i)
        elif flt.allow is not None and len(flt.allow) <= SUBSET_SHARE * size:
            subset.append(i)
        else:
            full.append(i)
    return plain, subset, full


def restrict_subset(xp: Any, scores: Any, rows: Any, flt: SearchFilter,
                    row_of: RowIndex) -> None:
    """``restrict`` for one query scored only on ``rows`` (ascending): the cursor's score
    ceiling and excluded ids (the allow set is already applied: ``rows`` are its rows)."""
    if flt.below is not None:
        scores[scores > flt.below] = -xp.inf
    excluded = row_of.rows_of(flt.exclude)
    if len(excluded) and len(rows):
        want = xp.asarray(excluded, dtype=xp.int64)
        at = xp.minimum(xp.searchsorted(rows, want), len(rows) - 1)
        hit = rows[at] == want
        scores[at[hit]] = -xp.inf


def restrict(xp: Any, scores: Any, filters: Sequence[SearchFilter | None] | None,
             row_of: RowIndex) -> None:
    """Apply each query's ``SearchFilter`` to its row of ``scores`` (b, rows) in place: a
    ruled-out row scores -inf.  ``xp`` is the array module of ``scores`` (NumPy or CuPy)."""
    size = scores.shape[1]

    def rows(ids: Iterable[int]) -> Any:
        return xp.asarray(row_of.rows_of(ids))

    for i, flt in enumerate(filters or ()):
        if flt is None:
            continue
        if flt.allow is not None:
            keep = xp.zeros(size, dtype=bool)
            keep[rows(flt.allow)] = True
            scores[i, ~keep] = -xp.inf
        if flt.below is not None:
            row = scores[i]
            row[row > flt.below] = -xp.inf
        excluded = rows(flt.exclude)
        if len(excluded):
            scores[i, excluded] = -xp.inf


class RowMap:
    """The bookkeeping every store shares: ids by row, rows by id, and O(1) swap-deletes.

    Subclasses hold the vectors and implement ``_reserve`` (room for ``rows`` rows),
    ``_write(rows, vectors)`` and ``_move(dst, src)`` (copy one row's vector).
    """

    def __init__(self) -> None:
        self._ids: IdArray = np.zeros(0, np.int64)
        self._size = 0
        self._row_of = RowIndex()
        self.token = object()  # identifies this store in an AllowSet's memo
        self.uncertified_queries = 0
        self.layout = 0        # bumped whenever a row is added, moved or removed

    def __len__(self) -> int:
        return self._size

    @property
    def row_of(self) -> RowIndex:
        return self._row_of

    def host_buffer(self, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """Pageable memory, for the GPU store's cold load too: a fresh process pays about
        1.0 s to pin 1.5 GB (``cupyx.empty_pinned``, H200 host) to save 0.2 s of copy
        (bench/gpu/probe_fresh_restart.py).  A warm start stages through a few small pinned
        buffers instead (``CupyStore.load_rows``)."""
        return np.empty(shape, dtype)

    def load_rows(self, ids: IdArray, source: RowSource) -> None:
        """Into a host buffer on several threads, then ``replace_all``."""
        vectors = self.host_buffer((source.rows, source.dim), np.float32)
        source.read(vectors)
        self.replace_all(ids, vectors)

    def replace_all(self, ids: IdArray, vectors: FloatArray) -> None:
        raise NotImplementedError

    def _reserve(self, rows: int) -> None:
        raise NotImplementedError

    def _write(self, rows: IdArray, vectors: FloatArray) -> None:
        raise NotImplementedError

    def _move(self, dst: int, src: int) -> None:
        raise NotImplementedError

    def _set_all_ids(self, ids: IdArray, capacity: int) -> None:
        self._ids = np.zeros(capacity, np.int64)
        self._ids[: len(ids)] = np.asarray(ids, np.int64)
        self._size = len(ids)
        self._row_of.reset(self._ids[: self._size])
        self.layout += 1

    def upsert(self, ids: IdArray, vectors: FloatArray) -> None:
        ids = np.asarray(ids, np.int64)
        rows = self._row_of.lookup(ids)
        absent = rows < 0
        # New ids take the next rows in the order they first appear (an id given twice is
        # one row; its last vector wins).
        fresh, first, slot = np.unique(ids[absent], return_index=True, return_inverse=True)
        order = np.argsort(first)
        new = len(fresh)
        rank = np.empty(new, np.int64)
        rank[order] = np.arange(new)
        rows[absent] = self._size + rank[slot.reshape(-1)]
        self._row_of.add(fresh[order], self._size + np.arange(new, dtype=np.int64))
        self._reserve(self._size + new)
        if len(self._ids) < self._size + new:
            grown = np.zeros(max(self._size + new, 2 * len(self._ids), 1024), np.int64)
            grown[: self._size] = self._ids[: self._size]
            self._ids = grown
        self._ids[rows] = ids
        self._size += new
        if new:
            self.layout += 1
        self._write(rows, vectors)

    def delete(self, ids: Sequence[int]) -> int:
        """Swap-remove: O(1) per row; row order does not matter to exact search."""
        removed = 0
        for doc_id in ids:
            row = self._row_of.pop(int(doc_id))
            if row is None:
                continue
            last = self._size - 1
            if row != last:
                moved = int(self._ids[last])
                self._ids[row] = moved
                self._move(row, last)
                self._row_of.set(moved, row)
            self._size -= 1
            removed += 1
        if removed:
            self.layout += 1
        return removed


class NumpyStore(RowMap):
    """The CPU store: a float32 matrix in host memory, grown geometrically."""

    device = "cpu"
    dtype = "float32"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self._matrix: FloatArray = np.empty((0, dim), np.float32)

    @property
    def nbytes(self) -> int:
        return int(self._matrix.nbytes + self._ids.nbytes)

    def replace_all(self, ids: IdArray, vectors: FloatArray) -> None:
        self._matrix = np.ascontiguousarray(vectors, np.float32)
        self._set_all_ids(ids, len(ids))

    def export(self) -> tuple[IdArray, FloatArray]:
        return self._ids[: self._size].copy(), self._matrix[: self._size].copy()

    def _reserve(self, rows: int) -> None:
        if rows > self._matrix.shape[0]:  # amortised O(1) per insert
            extra = max(1024, self._matrix.shape[0] // 2, rows - self._matrix.shape[0])
            self._matrix = np.concatenate([self._matrix,
                                           np.zeros((extra, self.dim), np.float32)])

    def _write(self, rows: IdArray, vectors: FloatArray) -> None:
        self._matrix[rows] = vectors

    def _move(self, dst: int, src: int) -> None:
        self._matrix[dst] = self._matrix[src]

    def warm_up(self) -> None:
        """Nothing to prepare: NumPy's paths have no first-use cost worth paying early."""

    def search(self, queries: FloatArray, n: int,
               filters: Sequence[SearchFilter | None] | None = None) -> list[list[Hit]]:
        live = self._matrix[: self._size]
        queries = queries.astype(np.float32, copy=False)
        _, subset, _ = split_by_filter(filters, len(queries), self._size)
        if not subset:
            scores = queries @ live.T  # (b, size)
            restrict(np, scores, filters, self._row_of)
            rows_out, scores_out = select_top_k(scores, n)
            return hits(self._ids, rows_out, scores_out)
        assert filters is not None
        b, k = len(queries), min(n, self._size)
        rows_out = np.full((b, k), -1, np.int64)
        scores_out = np.full((b, k), -np.inf, np.float32)
        rest = sorted(set(range(b)) - set(subset))
        if rest:
            scores = queries[rest] @ live.T
            restrict(np, scores, [filters[i] for i in rest], self._row_of)
            rows_out[rest], scores_out[rest] = select_top_k(scores, k)
        for i in subset:
            flt = filters[i]
            assert flt is not None and flt.allow is not None
            rows = flt.allow.rows_in(self)
            scores = live[rows] @ queries[i]
            restrict_subset(np, scores, rows, flt, self._row_of)
            at, top = select_top_k(scores[None, :], k)
            rows_out[i, : at.shape[1]], scores_out[i, : at.shape[1]] = rows[at[0]], top[0]
        return hits(self._ids, rows_out, scores_out)


def make_store(dim: int, device: str = "auto") -> VectorStore:
    """The store for ``device`` ('auto', 'cpu', 'cuda', 'cuda:N'); 'auto' takes the GPU when
    CuPy sees one.  Asking for CUDA where there is none is an error, not a silent fallback."""
    from .cupy_store import CupyStore, cupy_available

    if device == "cpu" or (device == "auto" and not cupy_available()):
        return NumpyStore(dim)
    if device == "auto":
        device = "cuda:0"
    if not device.startswith("cuda") or not cupy_available():
        raise ValueError(f"retrieval device {device!r} is not available (CuPy sees no GPU)"
                         if device.startswith("cuda") else
                         f"unknown retrieval device {device!r}: use auto, cpu or cuda:N")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return CupyStore(dim, device_id=index)
