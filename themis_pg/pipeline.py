"""Retrieval joined to generation: the one place that knows both stages.

The worker serves the two stages as separate jobs (the SQL function filters candidates by the
caller's rights in between); ``answer_in_process`` runs the same stages in one process with no
bus and no rights check, for benchmarks (the peer the bus is measured against) and debugging.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from .embedding import Embedder
from .generation.llama import GenerationResult, LlamaGenerator
from .retrieval.index import EmbeddingIndex


@dataclass(frozen=True)
class SearchHit:
    id: int
    score: float


@dataclass(frozen=True)
class SearchBatch:
    hits: list[list[SearchHit]]
    exhausted: list[bool]
    embed_ms: float
    search_ms: float


def search_batch(index: EmbeddingIndex, embedder: Embedder, queries: Sequence[str],
                 ns: Sequence[int]) -> SearchBatch:
    """Embed all queries at once, then one exact top-n over the index for the whole batch."""
    t0 = time.perf_counter()
    vectors = embedder.embed(list(queries))
    t1 = time.perf_counter()
    width = max(ns, default=0)
    results = index.search(vectors, width) if queries else []
    t2 = time.perf_counter()
    hits = [[SearchHit(i, s) for i, s in found[:n]] for found, n in zip(results, ns, strict=True)]
    size = len(index)
    return SearchBatch(hits=hits, exhausted=[n >= size for n in ns],
                       embed_ms=(t1 - t0) * 1000, search_ms=(t2 - t1) * 1000)


def answer_in_process(conn: psycopg.Connection[Any], index: EmbeddingIndex, embedder: Embedder,
                      generator: LlamaGenerator, query: str, k: int,
                      max_tokens: int = 256) -> tuple[GenerationResult, list[SearchHit]]:
    """The whole RAG path in this process, reading documents as the connection's role."""
    index.sync(conn, embed=embedder.embed)
    hits = search_batch(index, embedder, [query], [k]).hits[0]
    rows = conn.execute(
        "SELECT d.id, d.content, s.uri FROM themis.documents d "
        "LEFT JOIN themis.sources s ON s.id = d.source_id WHERE d.id = ANY(%s)",
        ([h.id for h in hits],)).fetchall()
    by_id = {r[0]: r for r in rows}
    contexts = [{"id": h.id, "content": by_id[h.id][1], "source": by_id[h.id][2]}
                for h in hits if h.id in by_id]
    result = generator.generate({"mode": "rag", "query": query, "contexts": contexts,
                                 "max_tokens": max_tokens, "temperature": 0.0})
    return result, hits
