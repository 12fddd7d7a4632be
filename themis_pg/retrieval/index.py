"""The worker's copy of the document embeddings, kept current from the change log.

The rows live in a ``VectorStore`` (store.py: NumPy here, CuPy on a GPU).  Loading reads
``themis.documents`` in blocks of thousands of rows per message, over several connections on
one snapshot (loader.py): no Python object per row.  After that, a sync applies only what changed:

* every write to ``themis.documents`` logs (seq, xid, doc_id) in ``themis.changes``;
* a sync reads the changes whose writing transaction id is >= the oldest transaction that
  was still running at the previous sync (the *watermark*).  A transaction that committed
  late with a low ``seq`` is therefore never skipped, and changes already applied are
  remembered by ``seq`` so they are not fetched twice;
* the changed rows are re-read (the table is the truth), so applying a change is idempotent;
* the whole delta (snapshot state, corpus, new changes, the changed rows) is ONE statement
  (``index_delta`` in sql/queries.sql), hence one snapshot and one round trip, which the
  search lane pipelines behind its claim: a steady-state sync costs no round trip of its own.

Read-your-writes follows: the worker syncs before serving each batch of searches, and a job
is only claimable after its caller's earlier commits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from ..bus.queries import query
from ..errors import ModelMismatch
from .loader import load_embeddings
from .snapshot import SnapshotMeta, SnapshotStore, new_token
from .store import Hit, NumpyStore, SearchFilter, VectorStore

log = logging.getLogger(__name__)

EmbedFn = Callable[[Sequence[str]], npt.NDArray[np.float32]]


NORMALIZE_BLOCK = 65536  # rows per block: bounded temporaries


def normalize_in_place(vectors: npt.NDArray[np.float32]) -> None:
    """Scale every row to unit length (zero rows stay zero), without a second matrix; blocks
    on several threads (NumPy releases the GIL: a million rows of 384 take about 0.4 s on one
    core, which a cold load would otherwise wait for)."""
    def scale(start: int) -> None:
        block = vectors[start:start + NORMALIZE_BLOCK]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        block /= norms

    starts = range(0, len(vectors), NORMALIZE_BLOCK)
    if len(starts) <= 1:
        for start in starts:
            scale(start)
        return
    with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1, 16)) as pool:
        list(pool.map(scale, starts))


def normalize(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit: npt.NDArray[np.float32] = (vectors / norms).astype(np.float32)
    return unit


def as_array(embedding: Any) -> npt.NDArray[np.float32]:
    """A pgvector value as psycopg returns it: a NumPy array, pgvector's ``Vector`` (with
    the adapter registered) or the text form."""
    if isinstance(embedding, np.ndarray):
        return embedding.astype(np.float32, copy=False)
    if hasattr(embedding, "to_numpy"):
        return np.asarray(embedding.to_numpy(), np.float32)
    return parse_vector_text(str(embedding))


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


@dataclass(frozen=True)
class Delta:
    """What one ``index_delta`` statement returned, split by row tag."""

    xmin: int
    horizon: int
    server_start: Any
    corpus: tuple[str, int] | None
    changes: list[tuple[int, int, int | None, str]]   # (seq, xid, doc_id, op)
    docs: list[tuple[int, Any, str | None]]           # (id, embedding, content if unembedded)


def parse_delta(rows: Sequence[Sequence[Any]]) -> Delta:
    state = next(r for r in rows if r[0] == "state")
    return Delta(
        xmin=int(state[1]), horizon=int(state[2]), server_start=state[3],
        corpus=None if state[4] is None else (str(state[4]), int(state[5])),
        changes=[(int(r[6]), int(r[7]), None if r[8] is None else int(r[8]), str(r[9]))
                 for r in rows if r[0] == "change"],
        docs=[(int(r[8]), r[10], r[11]) for r in rows if r[0] == "doc"])


class EmbeddingIndex:
    """Document ids and unit-norm embeddings in a store, kept current, searched exactly."""

    def __init__(self, dim: int, model: str, store: VectorStore | None = None, *,
                 connect: Callable[[], psycopg.Connection[Any]] | None = None,
                 load_connections: int = 4,
                 snapshots: SnapshotStore | None = None) -> None:
        """``connect`` opens more connections to the same database, for loads read on
        ``load_connections`` connections at once (loader.py); without it one is used.
        With ``snapshots`` (and ``connect``, for recording their tokens) a load starts from
        the local snapshot when the database vouches for it, and a full load writes one
        (snapshot.py)."""
        self.dim = dim
        self.model = model
        self.connect = connect
        self.load_connections = load_connections
        self.store: VectorStore = store if store is not None else NumpyStore(dim)
        self.watermark: int | None = None
        self._seen: dict[int, int] = {}  # seq -> xid of applied changes at/above the watermark
        self._pending: set[int] = set()  # documents still waiting for an embedding
        self._server_start: Any = None
        self.corpus_model: str | None = None
        self.last_sync = SyncStats()
        self.last_load_ms = 0.0
        self.last_load_source = ""  # "database" or "snapshot"
        self.snapshots = snapshots
        self._dirty = True  # rows changed since the last snapshot (or there is none)
        # Bumped by every load and by every delta that holds changes (metadata-only ones
        # too): what the worker's filter cache checks its entries against.
        self.generation = 0

    def __len__(self) -> int:
        return len(self.store)

    # -- whole-table load --------------------------------------------------------------
    def load(self, conn: psycopg.Connection[Any], *, use_snapshot: bool = True) -> None:
        """Every embedding of the configured dimension, as of one snapshot: from the local
        snapshot file if the database vouches for it (then the next sync reads what changed
        since), else from ``themis.documents``.  A reload that a sync asked for (log pruned,
        TRUNCATE, server restart) passes ``use_snapshot=False``: the snapshot is older still."""
        started = time.perf_counter()
        phases: dict[str, float] = {}  # ms, for the log line
        self.generation += 1
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            watermark, horizon, server_start = cur.execute(query("snapshot_state")).fetchone()  # type: ignore[misc]
            row = cur.execute(query("corpus")).fetchone()
            self._check_corpus(None if row is None else (str(row[0]), int(row[1])))
            restored = None if self.snapshots is None or not use_snapshot else \
                self.snapshots.restore(cur, self.model, self.dim, int(horizon))
            if restored is None:
                seen = {int(r[0]): int(r[1]) for r in cur.execute(
                    query("changes_since"), {"watermark": str(watermark)})}
                # Rows committed without an embedding: embedded by the next sync.
                unembedded = {int(r[0]) for r in cur.execute(query("unembedded_documents"))}
                read = time.perf_counter()
                ids, vectors = load_embeddings(conn, self.dim, connect=self.connect,
                                               connections=self.load_connections,
                                               allocate=self.store.host_buffer)
                normed = time.perf_counter()
                normalize_in_place(vectors)
                phases["state"] = (read - started) * 1000
                phases["rows"] = (normed - read) * 1000
                phases["normalize"] = (time.perf_counter() - normed) * 1000
        placed = time.perf_counter()
        if restored is None:
            self.store.replace_all(ids, vectors)
        else:
            meta, ids, source = restored
            watermark, seen, unembedded = meta.watermark, dict(meta.seen), set(meta.pending)
            phases["state"] = (placed - started) * 1000
            try:
                self.store.load_rows(ids, source)
            except (OSError, ValueError) as exc:  # the store is now undefined: load it all
                log.warning("index snapshot %s could not be read (%s); loading from the "
                            "database", source.path, exc)
                self.load(conn, use_snapshot=False)
                return
        warm = time.perf_counter()
        self.store.warm_up()
        warm_ms = (time.perf_counter() - warm) * 1000
        phases["store"] = (warm - placed) * 1000
        phases["warm-up"] = warm_ms
        self.watermark, self._seen = int(watermark), seen
        self._pending = unembedded
        self._server_start = server_start
        self.last_load_ms = (time.perf_counter() - started) * 1000
        self.last_load_source = "database" if restored is None else "snapshot"
        self._dirty = restored is None
        log.info("loaded %d embeddings (dim %d) from the %s in %.1f ms (%s)", len(self.store),
                 self.dim, self.last_load_source, self.last_load_ms,
                 ", ".join(f"{name} {ms:.1f} ms" for name, ms in phases.items()))
        if restored is None and self.snapshots is not None and self.connect is not None:
            self.snapshots.save_in_background(self.connect, self._snapshot_meta(),
                                              *self.store.export())
            self._dirty = False

    def _snapshot_meta(self) -> SnapshotMeta:
        assert self.watermark is not None
        return SnapshotMeta(token=new_token(), model=self.model, dim=self.dim,
                            rows=len(self.store), watermark=self.watermark,
                            seen=dict(self._seen), pending=sorted(self._pending))

    def save_snapshot(self) -> bool:
        """Write a snapshot of the current rows if they changed since the last one (at a
        clean shutdown); False if there was nothing to do or no way to."""
        if self.snapshots is None or self.connect is None or self.watermark is None:
            return False
        self.snapshots.wait()
        if not self._dirty:
            return False
        self.snapshots.save(self.connect, self._snapshot_meta(), *self.store.export())
        self._dirty = False
        return True

    def _check_corpus(self, corpus: tuple[str, int] | None) -> None:
        self.corpus_model = None if corpus is None else corpus[0]
        if corpus is not None:
            self._require_model(*corpus)

    def _require_model(self, model: str, dim: int) -> None:
        if model != self.model or dim != self.dim:
            raise ModelMismatch(
                f"documents are embedded with {model} (dim {dim}) but this worker's query "
                f"model is {self.model} (dim {self.dim})",
                hint="Run `themis reembed` or start the worker with THEMIS_EMBEDDING_MODEL="
                f"{model}.")

    # -- incremental -------------------------------------------------------------------
    def delta_query(self) -> tuple[str, dict[str, Any]] | None:
        """The one statement that fetches everything a sync needs (None before a load)."""
        if self.watermark is None:
            return None
        return query("index_delta"), {"watermark": str(self.watermark),
                                      "seen": sorted(self._seen), "pending": sorted(self._pending)}

    def sync(self, conn: psycopg.Connection[Any], embed: EmbedFn | None = None) -> SyncStats:
        """Fetch and apply the changes committed since the last load/sync (one round trip
        unless rows must be embedded or the index reloaded)."""
        q = self.delta_query()
        if q is None:
            self.load(conn)
            return SyncStats(reloaded=True)
        rows = conn.execute(*q).fetchall()
        return self.apply_delta(rows, conn, embed)

    def apply_delta(self, rows: Sequence[Sequence[Any]], conn: psycopg.Connection[Any],
                    embed: EmbedFn | None = None) -> SyncStats:
        """Apply what ``delta_query`` returned.  Reloads instead when the change log was pruned
        past our watermark, when the log says TRUNCATE, or when the server restarted (its xids
        may have gone back)."""
        started = time.perf_counter()
        assert self.watermark is not None, "apply_delta before load"
        delta = parse_delta(rows)
        if delta.changes:
            self.generation += 1
        self._check_corpus(delta.corpus)
        stale = self.watermark < delta.horizon or delta.server_start != self._server_start
        if stale or any(op == "T" for _, _, _, op in delta.changes):
            log.info("index reload (%s)", "change log pruned or server restarted" if stale
                     else "documents truncated")
            self.load(conn, use_snapshot=False)
            self.last_sync = SyncStats(changes=len(delta.changes), reloaded=True,
                                       ms=(time.perf_counter() - started) * 1000)
            return self.last_sync
        stats = SyncStats(changes=len(delta.changes))
        wanted = {d for _, _, d, _ in delta.changes if d is not None} | self._pending
        found: set[int] = set()
        to_embed: list[tuple[int, str]] = []
        up_ids: list[int] = []
        up_vecs: list[npt.NDArray[np.float32]] = []
        for doc_id, embedding, content in delta.docs:
            found.add(doc_id)
            if embedding is None:
                to_embed.append((doc_id, str(content)))
                continue
            vector = as_array(embedding)
            if vector.shape[0] != self.dim:
                log.warning("document %d has a %d-dim embedding; expected %d: skipped",
                            doc_id, vector.shape[0], self.dim)
                stats.deleted += self.store.delete([doc_id])
                continue
            up_ids.append(doc_id)
            up_vecs.append(vector.astype(np.float32))
        if up_ids:
            self.store.upsert(np.array(up_ids, np.int64), normalize(np.stack(up_vecs)))
            stats.upserted = len(up_ids)
        stats.deleted += self.store.delete(sorted(wanted - found))
        self._pending = {doc_id for doc_id, _ in to_embed}
        if to_embed and embed is not None:
            stats.embedded = self._embed_missing(conn, to_embed, embed)
        if stats.upserted or stats.deleted or stats.embedded:
            self._dirty = True
        self.watermark = delta.xmin
        seen = {**self._seen, **{seq: xid for seq, xid, _, _ in delta.changes}}
        self._seen = {seq: xid for seq, xid in seen.items() if xid >= self.watermark}
        stats.ms = (time.perf_counter() - started) * 1000
        if stats.changes:
            log.debug("index sync: %s", stats)
        self.last_sync = stats
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
        self.store.upsert(np.array([d for d, _ in docs], np.int64), normalize(vectors))
        self._pending.difference_update(doc_id for doc_id, _ in docs)
        return len(docs)

    # -- search ------------------------------------------------------------------------
    def search(self, queries: npt.NDArray[np.float32], n: int,
               filters: Sequence[SearchFilter | None] | None = None) -> list[list[Hit]]:
        """The n best (doc id, score) per query, best first (see ``VectorStore.search``)."""
        return self.store.search(normalize(queries), n, filters)
