"""Exact top-k and the index's binary COPY parser and change-log sync."""

from __future__ import annotations

import struct

import numpy as np
import psycopg
import pytest

from themis_pg.retrieval import loader
from themis_pg.retrieval.index import EmbeddingIndex, normalize
from themis_pg.retrieval.loader import BlockGather
from themis_pg.retrieval.topk import top_k


def reference_top_k(matrix, queries, k):
    scores = queries @ matrix.T
    out = []
    for row in scores:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        out.append(order)
    return out


@pytest.mark.parametrize(("n", "b", "k"), [(1, 1, 1), (50, 3, 5), (200, 7, 200), (31, 2, 50)])
def test_top_k_matches_reference(n, b, k):
    rng = np.random.default_rng(n * 100 + b)
    matrix = normalize(rng.standard_normal((n, 16)).astype(np.float32))
    queries = normalize(rng.standard_normal((b, 16)).astype(np.float32))
    rows, scores = top_k(matrix, queries, k)
    assert rows.shape == (b, min(k, n))
    for got, want, sc in zip(rows, reference_top_k(matrix, queries, k), scores, strict=True):
        assert list(got) == want
        assert np.all(np.diff(sc) <= 1e-7)


def test_top_k_empty_matrix():
    rows, scores = top_k(np.empty((0, 4), np.float32), np.ones((2, 4), np.float32), 3)
    assert rows.shape == (2, 0) and scores.shape == (2, 0)


def test_parse_block_round_trip():
    ids = struct.pack(">qq", 7, 9)
    vecs = (struct.pack(">hh3f", 3, 0, 1.0, 2.0, 3.0) + struct.pack(">hh3f", 3, 0, -1.5, 0.0, 0.25))
    gather = BlockGather(2, 3, np.empty)
    gather.add(2, ids, vecs)
    got_ids, got = gather.result(np.empty)
    assert got_ids.tolist() == [7, 9]
    assert got.tolist() == [[1.0, 2.0, 3.0], [-1.5, 0.0, 0.25]]
    with pytest.raises(ValueError):
        BlockGather(2, 2, np.empty).add(2, ids, vecs)


@pytest.mark.parametrize(("connections", "stale_estimate"), [(1, False), (3, False), (3, True)])
def test_load_reads_what_postgres_sends_on_one_snapshot(migrated_db, connections,
                                                         stale_estimate, monkeypatch):
    """Blocks over several connections give exactly the rows of one snapshot: a row committed
    after the snapshot was taken is not in the load.  With a stale planner estimate (ANALYZE
    saw a tenth of the rows) the rows beyond the preallocated buffer still all arrive."""
    monkeypatch.setattr(loader, "BLOCK_ROWS", 7)  # many blocks even for a small table
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((200, 3)).astype(np.float32)
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        with conn.cursor().copy("COPY themis.documents (id, content, embedding) FROM STDIN") as cp:
            for i, v in enumerate(vectors):
                cp.write_row((i * 3 + 1, f"doc {i}", _vec(v)))
                if stale_estimate and i == 19:
                    break
        if stale_estimate:
            conn.execute("ANALYZE themis.documents")
            with conn.cursor().copy("COPY themis.documents (id, content, embedding) "
                                    "FROM STDIN") as cp:
                for i, v in enumerate(vectors[20:], start=20):
                    cp.write_row((i * 3 + 1, f"doc {i}", _vec(v)))
        conn.execute("INSERT INTO themis.documents (id, content, embedding) "
                     "VALUES (5000, 'other dim', '[1,2]')")
    with psycopg.connect(migrated_db) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT 1")  # the snapshot is taken here
        with psycopg.connect(migrated_db, autocommit=True) as late:
            late.execute("INSERT INTO themis.documents (id, content, embedding) "
                         "VALUES (9999, 'late', '[1,1,1]')")
        ids, got = loader.load_embeddings(
            conn, 3, connect=lambda: psycopg.connect(migrated_db, autocommit=True),
            connections=connections)
    order = np.argsort(ids)
    assert ids[order].tolist() == [i * 3 + 1 for i in range(200)]
    np.testing.assert_allclose(got[order], vectors, rtol=1e-6)


def _vec(values):
    return "[" + ",".join(str(v) for v in values) + "]"


def test_index_sync_applies_inserts_updates_deletes(migrated_db):
    """Incremental sync: each change reaches the index, including late commits."""
    with psycopg.connect(migrated_db, autocommit=True) as conn, \
            psycopg.connect(migrated_db) as slow:
        conn.execute("INSERT INTO themis.corpus (embedding_model, dim) VALUES ('m', 3)")
        conn.execute("INSERT INTO themis.documents (id, content, embedding) VALUES "
                     "(1, 'x', '[1,0,0]'), (2, 'y', '[0,1,0]')")
        index = EmbeddingIndex(3, "m")
        index.load(conn)
        assert len(index) == 2
        # A transaction that starts first (lower seq) but commits after a later one.
        slow.execute("INSERT INTO themis.documents (id, content, embedding) "
                     "VALUES (3, 'z', '[0,0,1]')")
        conn.execute("UPDATE themis.documents SET embedding = '[0,0,-1]' WHERE id = 1")
        conn.execute("DELETE FROM themis.documents WHERE id = 2")
        stats = index.sync(conn)
        assert stats.upserted == 1 and stats.deleted == 1
        assert len(index) == 1
        slow.commit()
        stats = index.sync(conn)
        assert stats.upserted == 1, "the late commit was missed"
        hits = index.search(np.array([[0, 0, 1]], np.float32), 3)[0]
        assert [h[0] for h in hits] == [3, 1]
        assert hits[0][1] == pytest.approx(1.0) and hits[1][1] == pytest.approx(-1.0)
        assert index.sync(conn).changes == 0, "changes must not be applied twice"
        conn.execute("TRUNCATE themis.documents CASCADE")
        assert index.sync(conn).reloaded and len(index) == 0


def test_index_embeds_rows_inserted_without_embedding(migrated_db, embedder):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        index = EmbeddingIndex(embedder.dim, embedder.name)
        index.load(conn)
        conn.execute("INSERT INTO themis.documents (content) VALUES ('zebras graze at dawn')")
        stats = index.sync(conn, embed=embedder.embed)
        assert stats.embedded == 1 and len(index) == 1
        stored = conn.execute("SELECT vector_dims(embedding) FROM themis.documents").fetchone()
        assert stored == (embedder.dim,)
        assert conn.execute("SELECT embedding_model FROM themis.corpus").fetchone() == (
            embedder.name,)


def test_rows_committed_without_embedding_before_load_get_embedded(migrated_db, embedder):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute("INSERT INTO themis.documents (content) VALUES ('otters hold hands')")
        index = EmbeddingIndex(embedder.dim, embedder.name)
        index.load(conn)  # the row predates the load and has no embedding yet
        assert len(index) == 0
        assert index.sync(conn, embed=embedder.embed).embedded == 1
        assert len(index) == 1


def test_pruned_change_log_makes_a_lagging_index_reload(migrated_db):
    from themis_pg.bus.jobs import JobStore

    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute("INSERT INTO themis.corpus (embedding_model, dim) VALUES ('m', 3)")
        index = EmbeddingIndex(3, "m")
        index.load(conn)
        conn.execute("INSERT INTO themis.documents (id, content, embedding) "
                     "VALUES (5, 'x', '[1,0,0]')")
        JobStore(conn, "nobody").prune(retention_s=3600)  # no live worker: prunes everything
        assert conn.execute("SELECT count(*) FROM themis.changes").fetchone()[0] == 0
        stats = index.sync(conn)
        assert stats.reloaded, "the index must notice the pruned log and reload"
        assert [h[0] for h in index.search(np.array([[1, 0, 0]], np.float32), 1)[0]] == [5]


def test_a_cold_load_uses_one_connection_per_core_up_to_16(monkeypatch):
    import os

    from themis_pg.config import Settings
    from themis_pg.worker.process import MAX_LOAD_CONNECTIONS, load_connections

    assert load_connections(Settings(load_connections=3)) == 3
    for cores, want in ((None, 1), (2, 2), (16, 16), (128, MAX_LOAD_CONNECTIONS)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        assert load_connections(Settings()) == want
