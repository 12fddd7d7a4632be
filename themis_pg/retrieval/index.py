"""The worker's in-memory copy of the document embeddings, kept current from the change log.

Loading reads ``themis.documents`` with binary COPY and parses the stream with one NumPy
structured dtype: no Python object per row.  After that, ``sync`` applies only what changed:

* every write to ``themis.documents`` logs (seq, xid, doc_id) in ``themis.changes``;
* a sync reads the changes whose writing transaction id is >= the oldest transaction that
  was still running at the previous sync (the *watermark*).  A transaction that committed
  late with a low ``seq`` is therefore never skipped, and changes already applied are
  remembered by ``seq`` so they are not fetched twice;
* the changed rows are re-read (the table is the truth), so applying a change is idempotent.

Read-your-writes follows: the worker syncs before serving each batch of searches, and a job
is only claimable after its caller's earlier commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

from ..bus.queries import query
from ..errors import ModelMismatch
from .topk import top_k

log = logging.getLogger(__name__)

EmbedFn = Callable[[Sequence[str]], npt.NDArray[np.float32]]
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00"


def copy_row_dtype(dim: int) -> np.dtype[Any]:
    """One row of ``COPY (SELECT id, embedding) TO STDOUT (FORMAT binary)``, big-endian."""
    return np.dtype([
        ("nfields", ">i2"), ("id_len", ">i4"), ("id", ">i8"),
        ("vec_len", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dim,)),
    ])


def parse_binary_copy(data: bytes | bytearray | memoryview,
                      dim: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Ids and vectors from a binary COPY stream of (bigint, vector(dim)) rows."""
    buf = memoryview(data)
    if bytes(buf[:11]) != COPY_HEADER:
        raise ValueError("not a PostgreSQL binary COPY stream")
    ext_len = int.from_bytes(buf[15:19], "big")
    body = buf[19 + ext_len: len(buf) - 2]  # the trailer is int16 -1
    dtype = copy_row_dtype(dim)
    if len(body) % dtype.itemsize:
        raise ValueError("binary COPY stream has rows of unexpected size")
    rows = np.frombuffer(body, dtype=dtype)
    if rows.size and (np.any(rows["nfields"] != 2) or np.any(rows["dim"] != dim)
                      or np.any(rows["vec_len"] != 4 + 4 * dim)):
        raise ValueError("binary COPY stream has rows of another shape")
    return rows["id"].astype(np.int64), rows["vec"].astype(np.float32)


def normalize(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit: npt.NDArray[np.float32] = (vectors / norms).astype(np.float32)
    return unit


def parse_vector_text(text: str) -> npt.NDArray[np.float32]:
    """pgvector's text form '[1,2,3]' (what psycopg returns without the adapter)."""
    return np.array([float(x) for x in text.strip("[]").split(",") if x], dtype=np.float32)


@dataclass
class SyncStats:
    changes: int = 0
    upserted: int = 0
    deleted: int = 0
    embedded: int = 0
    reloaded: bool = False
    ms: float = 0.0


class EmbeddingIndex:
    """Document ids and unit-norm embeddings in host memory, searched exactly."""

    def __init__(self, dim: int, model: str) -> None:
        self.dim = dim
        self.model = model
        self._ids = np.empty(0, np.int64)
        self._matrix = np.empty((0, dim), np.float32)
        self._size = 0
        self._row_of: dict[int, int] = {}
        self.watermark: int | None = None
        self._seen: set[int] = set()
        self._pending: set[int] = set()  # documents still waiting for an embedding
        self._server_start: Any = None
        self.corpus_model: str | None = None

    def __len__(self) -> int:
        return self._size

    # -- whole-table load --------------------------------------------------------------
    def load(self, conn: psycopg.Connection[Any]) -> None:
        """Read every embedding of the configured dimension, as of one snapshot."""
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            watermark, _, server_start = cur.execute(query("snapshot_state")).fetchone()  # type: ignore[misc]
            self._check_corpus(cur)
            seen = {int(r[0]) for r in cur.execute(query("changes_since"),
                                                   {"watermark": str(watermark)})}
            # Rows committed without an embedding: embedded by the next sync.
            unembedded = {int(r[0]) for r in cur.execute(query("unembedded_documents"))}
            stmt = sql.SQL(
                "COPY (SELECT id, embedding FROM themis.documents "
                "WHERE embedding IS NOT NULL AND vector_dims(embedding) = {}) "
                "TO STDOUT (FORMAT binary)").format(sql.Literal(self.dim))
            buf = bytearray()
            with cur.copy(stmt) as copy:
                for chunk in copy:
                    buf += chunk
        ids, vectors = parse_binary_copy(buf, self.dim)
        self._replace_all(ids, normalize(vectors))
        self.watermark, self._seen = int(watermark), seen
        self._pending = unembedded
        self._server_start = server_start
        log.info("loaded %d embeddings (dim %d) in %.1f ms", self._size, self.dim,
                 (time.perf_counter() - started) * 1000)

    def _check_corpus(self, cur: psycopg.Cursor[Any]) -> None:
        row = cur.execute(query("corpus")).fetchone()
        self.corpus_model = None if row is None else str(row[0])
        if row is not None:
            self._require_model(str(row[0]), int(row[1]))

    def _require_model(self, model: str, dim: int) -> None:
        if model != self.model or dim != self.dim:
            raise ModelMismatch(
                f"documents are embedded with {model} (dim {dim}) but this worker's query "
                f"model is {self.model} (dim {self.dim})",
                hint="Run `themis reembed` or start the worker with THEMIS_EMBEDDING_MODEL="
                f"{model}.")

    def _replace_all(self, ids: npt.NDArray[np.int64],
                     vectors: npt.NDArray[np.float32]) -> None:
        self._ids = ids.copy()
        self._matrix = np.ascontiguousarray(vectors)
        self._size = len(ids)
        self._row_of = {int(i): r for r, i in enumerate(ids)}

    # -- incremental -------------------------------------------------------------------
    def sync(self, conn: psycopg.Connection[Any], embed: EmbedFn | None = None) -> SyncStats:
        """Apply the changes committed since the last load/sync; embed rows lacking one.

        Reloads instead when the change log was pruned past our watermark, when the log
        says TRUNCATE, or when the server restarted (its xids may have gone back).
        """
        if self.watermark is None:
            self.load(conn)
            return SyncStats(reloaded=True)
        started = time.perf_counter()
        stats = SyncStats()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            new_watermark, horizon, server_start = cur.execute(  # type: ignore[misc]
                query("snapshot_state")).fetchone()
            self._check_corpus(cur)
            stale = self.watermark < int(horizon) or server_start != self._server_start
            rows = [] if stale else cur.execute(
                query("changes_since"), {"watermark": str(self.watermark)}).fetchall()
            fresh = [r for r in rows if r[0] not in self._seen]
            reload = stale or any(r[3] == "T" for r in fresh)
            doc_ids = sorted({int(r[2]) for r in fresh if r[2] is not None} | self._pending)
            docs = [] if reload or not doc_ids else cur.execute(
                query("documents_by_id"), {"ids": doc_ids}).fetchall()
        if reload:
            log.info("index reload (%s)", "change log pruned or server restarted" if stale
                     else "documents truncated")
            self.load(conn)
            return SyncStats(changes=len(fresh), reloaded=True)
        stats.changes = len(fresh)
        found: set[int] = set()
        to_embed: list[tuple[int, str]] = []
        for doc_id, embedding, content in docs:
            found.add(doc_id)
            if embedding is None:
                to_embed.append((doc_id, content))
                continue
            vector = embedding if isinstance(embedding, np.ndarray) else parse_vector_text(
                str(embedding))
            if vector.shape[0] != self.dim:
                log.warning("document %d has a %d-dim embedding; expected %d: skipped",
                            doc_id, vector.shape[0], self.dim)
                stats.deleted += self._delete(doc_id)
                continue
            self._upsert(doc_id, vector.astype(np.float32))
            stats.upserted += 1
        for doc_id in doc_ids:
            if doc_id not in found:
                stats.deleted += self._delete(doc_id)
        self._pending = {doc_id for doc_id, _ in to_embed}
        if to_embed and embed is not None:
            stats.embedded = self._embed_missing(conn, to_embed, embed)
        self.watermark = int(new_watermark)
        self._seen = {int(r[0]) for r in rows if int(r[1]) >= self.watermark}
        stats.ms = (time.perf_counter() - started) * 1000
        if stats.changes:
            log.debug("index sync: %s", stats)
        return stats

    def _embed_missing(self, conn: psycopg.Connection[Any], docs: list[tuple[int, str]],
                       embed: EmbedFn) -> int:
        """Embed documents inserted without an embedding and store it, unless the row
        changed meanwhile (its own change entry brings it back) or is locked by a writer
        (left pending: a caller may hold that lock while it waits for this very search)."""
        vectors = embed([content for _, content in docs])
        try:
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '500ms'")
                if self.corpus_model is None:
                    row = conn.execute(query("claim_corpus"),
                                       {"model": self.model, "dim": self.dim}).fetchone()
                    assert row is not None
                    self._require_model(str(row[0]), int(row[1]))
                    self.corpus_model = self.model
                for (doc_id, content), vector in sorted(zip(docs, vectors, strict=True),
                                                        key=lambda item: item[0][0]):
                    conn.execute(query("store_embedding"), {
                        "id": doc_id, "content": content,
                        "embedding": "[" + ",".join(f"{x:.8g}" for x in vector) + "]"})
        except psycopg.errors.LockNotAvailable:
            log.info("documents %s are locked by a writer; embedding them later",
                     [d for d, _ in docs])
            return 0
        for (doc_id, _), vector in zip(docs, vectors, strict=True):
            self._upsert(doc_id, vector)
        self._pending.difference_update(doc_id for doc_id, _ in docs)
        return len(docs)

    def _upsert(self, doc_id: int, vector: npt.NDArray[np.float32]) -> None:
        norm = float(np.linalg.norm(vector))
        unit = vector / norm if norm else vector
        row = self._row_of.get(doc_id)
        if row is None:
            if self._size == self._matrix.shape[0]:
                grow = max(1024, self._size // 2)
                self._matrix = np.concatenate([self._matrix, np.zeros((grow, self.dim),
                                                                      np.float32)])
                self._ids = np.concatenate([self._ids, np.zeros(grow, np.int64)])
            row = self._size
            self._size += 1
            self._row_of[doc_id] = row
            self._ids[row] = doc_id
        self._matrix[row] = unit

    def _delete(self, doc_id: int) -> int:
        """Swap-remove: O(1), order of rows does not matter to exact search."""
        row = self._row_of.pop(doc_id, None)
        if row is None:
            return 0
        last = self._size - 1
        if row != last:
            moved = int(self._ids[last])
            self._ids[row] = moved
            self._matrix[row] = self._matrix[last]
            self._row_of[moved] = row
        self._size -= 1
        return 1

    # -- search ------------------------------------------------------------------------
    def search(self, queries: npt.NDArray[np.float32],
               n: int) -> list[list[tuple[int, float]]]:
        """The n best (doc id, score) per query, best first."""
        rows, scores = top_k(self._matrix[: self._size], normalize(queries), n)
        ids = self._ids[: self._size]
        return [[(int(ids[r]), float(s)) for r, s in zip(rr, ss, strict=True)]
                for rr, ss in zip(rows, scores, strict=True)]
