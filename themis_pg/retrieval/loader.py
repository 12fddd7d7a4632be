"""Reading every embedding out of PostgreSQL fast: few, large messages over several connections.

A plain ``COPY (SELECT id, embedding) TO STDOUT`` sends one message per row, and the client
handles each message in Python under the GIL: measured 222k rows/s on the GPU machine, and
threads do not help (GPU.md).  Here the server packs a block of rows into one row of two
``bytea`` values (``string_agg(int8send(id))`` and ``string_agg(vector_send(embedding))``:
the aggregates of one query see the rows in the same order, so the two stay aligned), so a
million rows are a few hundred messages, each parsed by one NumPy ``frombuffer``.  Blocks are
id ranges read in pipeline mode on ``connections`` connections at once, each inside a
REPEATABLE READ transaction on the *same* exported snapshot, so the result is exactly the
table as of one instant, like the single COPY it replaces.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

BLOCK_ROWS = 8192   # ids per block (one result row)
PIPELINE_DEPTH = 8  # blocks in flight per connection

BLOCK_SQL = (
    "SELECT count(*)::int4, string_agg(int8send(id), ''::bytea), "
    "string_agg(vector_send(embedding), ''::bytea) FROM themis.documents "
    "WHERE id >= %s AND id < %s AND embedding IS NOT NULL AND vector_dims(embedding) = %s")


def vector_send_dtype(dim: int) -> np.dtype[Any]:
    """One ``vector_send`` value: int16 dim, int16 unused, dim big-endian float4."""
    return np.dtype([("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dim,))])


class BlockGather:
    """Where parsed blocks go: straight into one preallocated buffer (a block claims the next
    free rows under a lock, then byte-swaps its vectors into place outside it), so a million
    rows cost no concatenation pass; blocks past the buffer's estimated size are kept aside and
    appended at the end."""

    def __init__(self, capacity: int, dim: int,
                 allocate: Callable[[tuple[int, ...], Any], npt.NDArray[Any]]) -> None:
        self.ids = np.empty(capacity, np.int64)
        self.vectors = allocate((capacity, dim), np.float32) if capacity else \
            np.empty((0, dim), np.float32)
        self.used = 0
        self.extra: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]] = []
        self._lock = threading.Lock()
        self.dim = dim

    def add(self, count: int, ids: bytes | None, vectors: bytes | None) -> None:
        if not count:
            return
        id_arr, rows = _views(count, ids, vectors, self.dim)
        with self._lock:
            start = self.used
            fits = start + count <= len(self.ids)
            if fits:
                self.used += count
        if fits:
            self.ids[start:start + count] = id_arr
            self.vectors[start:start + count] = rows["vec"]
        else:
            with self._lock:
                self.extra.append((id_arr.astype(np.int64), rows["vec"].astype(np.float32)))

    def result(self, allocate: Callable[[tuple[int, ...], Any], npt.NDArray[Any]]
               ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        if not self.extra:
            return self.ids[:self.used], self.vectors[:self.used]
        log.info("the row estimate was low by %d rows: one extra copy",
                 sum(len(i) for i, _ in self.extra))
        ids = np.concatenate([self.ids[:self.used], *(i for i, _ in self.extra)])
        vectors = allocate((len(ids), self.dim), np.float32)
        np.concatenate([self.vectors[:self.used], *(v for _, v in self.extra)], out=vectors)
        return ids, vectors


def _views(count: int, ids: bytes | None, vectors: bytes | None, dim: int
           ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    assert ids is not None and vectors is not None
    id_arr = np.frombuffer(ids, ">i8")
    rows = np.frombuffer(vectors, vector_send_dtype(dim))
    if len(id_arr) != count or len(rows) != count or np.any(rows["dim"] != dim):
        raise ValueError("a block of embeddings came back malformed")
    return id_arr, rows


def _read_ranges(conn: psycopg.Connection[Any], ranges: list[tuple[int, int]], dim: int,
                 out: BlockGather) -> None:
    for start in range(0, len(ranges), PIPELINE_DEPTH):
        batch = ranges[start:start + PIPELINE_DEPTH]
        with conn.pipeline():
            cursors = [conn.cursor(binary=True) for _ in batch]
            for cur, (lo, hi) in zip(cursors, batch, strict=True):
                cur.execute(BLOCK_SQL, (lo, hi, dim))
        for cur in cursors:
            row = cur.fetchone()
            assert row is not None
            out.add(int(row[0]), row[1], row[2])


def load_embeddings(conn: psycopg.Connection[Any], dim: int, *,
                    connect: Callable[[], psycopg.Connection[Any]] | None = None,
                    connections: int = 4,
                    allocate: Callable[[tuple[int, ...], Any], npt.NDArray[Any]] | None = None,
                    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Ids and (not yet normalised) vectors of every document embedding of ``dim``
    dimensions, as of ``conn``'s transaction snapshot.

    ``conn`` must be inside a REPEATABLE READ (or SERIALIZABLE) transaction.  With
    ``connect`` (a factory of new connections to the same database) the blocks are read on
    ``connections`` connections that import that transaction's snapshot; without, all on
    ``conn``.  The vectors are gathered into ``allocate(shape, dtype)`` (e.g. pinned memory;
    default ``np.empty``).
    """
    started = time.perf_counter()
    allocate = allocate or np.empty
    bounds = conn.execute(
        "SELECT min(id), max(id), (SELECT reltuples FROM pg_class "
        "WHERE oid = 'themis.documents'::regclass) FROM themis.documents").fetchone()
    if bounds is None or bounds[0] is None:
        return np.empty(0, np.int64), np.empty((0, dim), np.float32)
    lo, hi = int(bounds[0]), int(bounds[1]) + 1
    ranges = [(a, min(a + BLOCK_ROWS, hi)) for a in range(lo, hi, BLOCK_ROWS)]
    # Room for the planner's row estimate (a little over, for rows added since it was made),
    # never more than the id range can hold.
    estimate = float(bounds[2]) if bounds[2] is not None and float(bounds[2]) >= 0 else hi - lo
    gather = BlockGather(int(min(hi - lo, estimate * 1.05 + BLOCK_ROWS)), dim, allocate)
    if connect is None or connections <= 1 or len(ranges) < 2 * connections:
        _read_ranges(conn, ranges, dim, gather)
        used = 1
    else:
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        share = [ranges[i::connections] for i in range(connections)]
        errors: list[BaseException] = []

        def read(i: int) -> None:
            try:
                with connect() as other:
                    other.autocommit = False
                    with other.transaction():
                        other.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        other.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                            sql.Literal(snapshot)))
                        _read_ranges(other, share[i], dim, gather)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(i,), name=f"load-{i}")
                   for i in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        used = connections
    ids, vectors = gather.result(allocate)
    seconds = time.perf_counter() - started
    log.info("read %d embeddings in %.2f s (%.0f rows/s, %d connection(s))", len(ids), seconds,
             len(ids) / max(seconds, 1e-9), used)
    return ids, vectors
