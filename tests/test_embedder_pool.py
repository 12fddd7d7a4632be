"""EmbedderPool: several llama.cpp contexts of one model sharing each call (ingest on a GPU).
Real model, on the CPU here: the rows must be those of one embedder, in order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from themis_pg.embedding import Embedder, EmbedderPool, embedders_for

TEXTS = [f"how do I rotate key number {i} on replica {i % 3}" for i in range(11)]


@pytest.fixture(scope="module")
def pool(default_models: list[Any]) -> Any:
    emb = next(m for m in default_models if m.kind == "embedding")
    with EmbedderPool([Embedder(emb.path, emb.name, n_threads=1) for _ in range(3)]) as p:
        yield p


def _same_rows(got: np.ndarray, want: np.ndarray) -> None:
    """Row for row the same vectors: a text's embedding moves by ~1e-4 with the other texts
    of its forward pass (other matmul shapes round differently), so cosine, not equality."""
    assert got.shape == want.shape
    assert np.min(np.sum(got * want, axis=1)) > 0.9999
    assert np.argmax(got @ want.T, axis=1).tolist() == list(range(len(want)))


def test_a_pool_gives_one_embedders_rows_in_order(pool: EmbedderPool, embedder: Any) -> None:
    want = embedder.embed(TEXTS)
    assert pool.size == 3
    _same_rows(pool.embed(TEXTS), want)  # 11 texts in shares of 4, 4 and 3
    _same_rows(pool.embed(TEXTS[:2]), want[:2])  # fewer texts than contexts
    _same_rows(pool.embed(TEXTS[:1]), want[:1])
    assert pool.embed([]).shape == (0, embedder.dim)
    assert (pool.name, pool.dim, pool.max_tokens) == (embedder.name, embedder.dim,
                                                      embedder.max_tokens)
    assert pool.count_tokens(TEXTS[0]) == embedder.count_tokens(TEXTS[0])
    with pytest.raises(TypeError, match="sequence of strings"):
        pool.embed("one string")


def test_ingest_runs_one_context_on_a_cpu_unless_told() -> None:
    assert embedders_for(0, 0) == 1, "no layers offloaded: one context uses every core"
    assert embedders_for(3, 0) == 3
    with pytest.raises(ValueError, match="at least one"):
        EmbedderPool([])
