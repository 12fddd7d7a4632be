"""The search lane: query embedding and exact top-k for many jobs at once.

One step is two round trips in the steady state: the claim pipelined with the index delta
(the delta statement runs after the claim, so it sees every document the callers committed
before submitting: read-your-writes), then one statement that finishes the whole batch.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from ..bus.jobs import Finished, Job, JobStore
from ..bus.queries import query
from ..errors import ModelMismatch
from ..pl.payloads import CURSOR_SLACK, EmbedPayload, SearchPayload
from ..retrieval.store import AllowSet, SearchFilter
from .filter_cache import FilterCache
from .lane import Lane

log = logging.getLogger(__name__)


def encode_vector(vector: np.ndarray[Any, Any]) -> str:
    """A float32 query vector as base64 (exact, and a quarter of its JSON text size)."""
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def decode_vector(text: str, dim: int) -> np.ndarray[Any, Any]:
    vector = np.frombuffer(base64.b64decode(text, validate=True), "<f4")
    if vector.shape[0] != dim:
        raise ValueError(f"vector has {vector.shape[0]} dimensions, the index {dim}")
    return vector.astype(np.float32)


class SearchLane(Lane):
    kinds = ("search", "embed")
    listens = True  # a search's latency is the product: no hop through the listener

    @property
    def filters(self) -> FilterCache:
        return self.worker.filter_cache

    def on_connect(self, conn: psycopg.Connection[Any]) -> None:
        register_vector(conn)  # embeddings arrive as NumPy arrays

    def prepare(self) -> None:
        """One embedding before the first job, on this thread (the only one that embeds: an
        OpenMP build of ggml keeps a thread team per calling thread, and measured slower
        when two threads take turns): llama.cpp's first call sets up its buffers (and on a
        GPU, cuBLAS), which the first caller should not wait for."""
        try:
            self.worker.embedder.embed(["themis warm-up"])
        except Exception:  # each search would fail the same way, with its reason
            log.exception("the embedding model's warm-up failed")

    def step(self) -> bool:
        worker = self.worker
        conn = self.db.get()
        store = JobStore(conn, worker.worker_id)
        if not self.should_claim():
            return False
        index = worker.index
        mismatch: ModelMismatch | None = None
        if index.watermark is None and "search" in self.kinds:
            mismatch = self._load_index(conn)
        delta = index.delta_query() if "search" in self.kinds else None
        with conn.pipeline():
            claimed = conn.execute(*store.claim_statement(self.kinds, self.settings.search_batch,
                                                          self.settings.lease))
            changes = conn.execute(*delta) if delta is not None else None
        jobs = store.jobs_from_rows(claimed.fetchall())
        if changes is not None:
            try:
                index.apply_delta(changes.fetchall(), conn, embed=worker.embedder.embed)
            except ModelMismatch as exc:
                mismatch = exc
        if not jobs:
            return False
        ids = [j.id for j in jobs]
        worker.registry.start(ids)
        try:
            self.serve(jobs, mismatch)
        except psycopg.Error:
            raise  # the caller decides: reconnect (jobs re-queued by lease) or back off
        except Exception:
            log.exception("%s crashed on jobs %s", self.name, ids)
            for job in jobs:
                self.fail(job, "internal error in the worker", "XX000")
        finally:
            worker.registry.end(ids)
        if len(jobs) >= self.settings.search_batch:  # a full batch: more may be queued
            self.notified.set()
            return True
        return False

    def _load_index(self, conn: psycopg.Connection[Any]) -> ModelMismatch | None:
        """Load the index (retried at each step until it works, e.g. after `themis reembed`);
        the reason it cannot be loaded fails the searches meanwhile."""
        try:
            self.worker.index.load(conn)
        except ModelMismatch as exc:
            log.debug("index not loaded: %s", exc.message)
            return exc
        return None

    def serve(self, jobs: list[Job], mismatch: ModelMismatch | None) -> None:
        worker = self.worker
        done: list[Finished] = []
        searches: list[tuple[Job, SearchPayload]] = []
        embeds: list[tuple[Job, EmbedPayload]] = []
        for job, payload in self.parse_payloads(jobs):
            if isinstance(payload, SearchPayload):
                if mismatch is not None or worker.index.watermark is None:
                    exc = mismatch or ModelMismatch("the worker's index could not be loaded")
                    self.fail(job, exc.message, exc.sqlstate, exc.hint)
                else:
                    searches.append((job, payload))
            elif isinstance(payload, EmbedPayload):
                embeds.append((job, payload))
        if searches:
            done += self._search(searches, self._filter_matches(searches))
        if embeds:
            vectors = worker.embedder.embed([p.text for _, p in embeds])
            done += [Finished(job, {"embedding": [round(float(x), 7) for x in vector],
                                    "model": worker.embedder.name, "dim": int(vector.shape[0])})
                     for (job, _), vector in zip(embeds, vectors, strict=True)]
        self.finish(done)

    def _filter_matches(self, searches: list[tuple[Job, SearchPayload]]
                        ) -> dict[str, AllowSet]:
        """The ids each distinct metadata filter of the batch admits: from the filter cache
        while no document changed since it was read (filter_cache.py), else read after the
        claim, so a caller's committed rows are seen, in one round trip for all (pipelined)."""
        generation = self.worker.index.generation
        found: dict[str, AllowSet] = {}
        wanted = []
        for key in sorted({json.dumps(p.filter, sort_keys=True) for _, p in searches
                           if p.filter is not None}):
            cached = self.filters.get(key, generation)
            if cached is None:
                wanted.append(key)
            else:
                found[key] = cached
        if not wanted:
            return found
        conn = self.db.get()
        with conn.pipeline():
            cursors = [conn.execute(query("filter_matches"), {"filter": f}) for f in wanted]
        for key, cur in zip(wanted, cursors, strict=True):
            found[key] = AllowSet((cur.fetchone() or [[]])[0])
            self.filters.put(key, generation, found[key])
        return found

    def _search(self, searches: list[tuple[Job, SearchPayload]],
                matches: dict[str, AllowSet]) -> list[Finished]:
        """One embedding call for the queries that need one, one top-k for the batch."""
        worker = self.worker
        index = worker.index
        dim = index.dim
        t0 = time.perf_counter()
        vectors = np.zeros((len(searches), dim), np.float32)
        to_embed = [i for i, (_, p) in enumerate(searches) if p.vector_b64 is None]
        usable: list[int] = []
        for i, (job, payload) in enumerate(searches):
            if payload.vector_b64 is not None:
                try:
                    vectors[i] = decode_vector(payload.vector_b64, dim)
                except ValueError as exc:  # binascii.Error is a ValueError
                    self.fail(job, f"bad search job: {exc}", "22023")
                    continue
            usable.append(i)
        if to_embed:
            vectors[to_embed] = worker.embedder.embed([searches[i][1].query for i in to_embed])
        t1 = time.perf_counter()
        filters = [self._store_filter(searches[i][1], matches) for i in usable]
        width = max((searches[i][1].n for i in usable), default=0)
        hits = index.search(vectors[usable], width, filters) if usable else []
        t2 = time.perf_counter()
        embed_ms = (t1 - t0) * 1000 / max(len(to_embed), 1)
        worker.count_search(len(usable), (t2 - t1) * 1000, (t1 - t0) * 1000)
        if log.isEnabledFor(logging.DEBUG):  # the count is work on every batch otherwise
            log.debug("search batch: %d queries (%d embedded, %d filtered), n %d: embed "
                      "%.2f ms, top-k %.2f ms", len(usable), len(to_embed),
                      sum(f is not None for f in filters), width, (t1 - t0) * 1000,
                      (t2 - t1) * 1000)
        done = []
        for i, found in zip(usable, hits, strict=True):
            job, payload = searches[i]
            found = found[: payload.n]
            exhausted = len(found) < payload.n
            result: dict[str, Any] = {
                "candidates": found,  # (id, score) pairs: JSON arrays
                "exhausted": exhausted, "model": worker.embedder.name,
                "embed_ms": round(embed_ms if i in to_embed else 0.0, 3),
                "search_ms": round((t2 - t1) * 1000, 3), "index_size": len(index),
                "max_candidates": worker.limits.max_candidates}
            # a later round of this call may need it (embed once per call), or the caller
            # chooses adapters by it
            if not exhausted or payload.want_vector:
                result["vector_b64"] = encode_vector(vectors[i])
            done.append(Finished(job, result))
        return done

    @staticmethod
    def _store_filter(payload: SearchPayload,
                      matches: dict[str, AllowSet]) -> SearchFilter | None:
        """What the store must restrict this query to: a paged round's cursor and the rows
        its metadata filter admits (None: nothing)."""
        allow = None if payload.filter is None else \
            matches[json.dumps(payload.filter, sort_keys=True)]
        cursor = payload.cursor
        if cursor is None and allow is None:
            return None
        return SearchFilter(
            below=None if cursor is None else cursor.score + CURSOR_SLACK,
            exclude=frozenset(cursor.exclude) if cursor is not None else frozenset(),
            allow=allow)
