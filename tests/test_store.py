"""Vector stores against a float64 NumPy reference: the same tests for every store.

``NumpyStore`` runs everywhere; ``CupyStore`` runs where CuPy sees a GPU (marked ``gpu``,
skipped with the reason elsewhere).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from themis_pg.retrieval.cupy_store import cupy_available
from themis_pg.retrieval.store import NumpyStore, SearchFilter


def make_store(kind: str, dim: int):
    if kind == "numpy":
        return NumpyStore(dim)
    from themis_pg.retrieval.cupy_store import CupyStore

    return CupyStore(dim, capacity=16)


STORES = [
    pytest.param("numpy", id="numpy"),
    pytest.param("cupy", id="cupy", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not cupy_available(), reason="CuPy with a CUDA device is needed")]),
]


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """Real embeddings are clustered: many near-equal scores, the hard case for pruning."""
    centers = unit(rng, clusters, dim)
    x = centers[rng.integers(0, clusters, n)] + 0.15 * unit(rng, n, dim)
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def reference(matrix: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    scores = queries.astype(np.float64) @ matrix.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(int(ids[r]), float(scores[i, r])) for r in row] for i, row in enumerate(order)]


def recall(got, want) -> float:
    """Recall@k with ties counted as hits: a returned id whose exact score equals the k-th
    reference score is as good as the reference's pick."""
    hits = 0
    total = 0
    for g, w in zip(got, want, strict=True):
        kth = w[-1][1]
        wanted = {i for i, _ in w}
        hits += sum(1 for i, s in g if i in wanted or abs(s - kth) < 1e-6)
        total += len(w)
    return hits / total


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_exact_top_k_against_float64(kind, data):
    rng = np.random.default_rng(7)
    dim = 64
    matrix = unit(rng, 20_000, dim) if data == "random" else clustered(rng, 20_000, dim, 50)
    ids = rng.permutation(1_000_000)[:20_000].astype(np.int64)
    store = make_store(kind, dim)
    store.replace_all(ids, matrix)
    queries = np.concatenate([unit(rng, 5, dim), matrix[:3]])  # also rows of the matrix
    for k in (1, 10, 50):
        got = store.search(queries, k)
        want = reference(matrix, ids, queries, k)
        assert all(len(g) == k for g in got)
        assert recall(got, want) == 1.0
        for g, w in zip(got, want, strict=True):
            assert np.allclose([s for _, s in g], [s for _, s in w], atol=1e-5)
            assert [s for _, s in g] == sorted((s for _, s in g), reverse=True)


@pytest.mark.parametrize("kind", STORES)
def test_upsert_delete_and_growth(kind):
    rng = np.random.default_rng(3)
    dim = 16
    store = make_store(kind, dim)
    vectors = unit(rng, 3000, dim)
    for start in range(0, 3000, 500):  # grows past its capacity several times
        store.upsert(np.arange(start, start + 500, dtype=np.int64), vectors[start:start + 500])
    assert len(store) == 3000
    assert store.search(vectors[1234:1235], 1)[0][0][0] == 1234
    assert store.delete([1234, 999_999]) == 1
    assert len(store) == 2999
    assert all(i != 1234 for i, _ in store.search(vectors[1234:1235], 5)[0])
    store.upsert(np.array([7], np.int64), vectors[1234:1235])  # an update moves id 7
    assert store.search(vectors[1234:1235], 1)[0][0][0] == 7
    live = np.delete(np.arange(3000), 1234)
    matrix = vectors[live].copy()
    matrix[list(live).index(7)] = vectors[1234]
    want = reference(matrix, live, vectors[:4], 20)
    assert recall(store.search(vectors[:4], 20), want) == 1.0


@pytest.mark.parametrize("kind", STORES)
def test_filters_page_below_a_score_and_exclude_ids(kind):
    rng = np.random.default_rng(5)
    dim = 32
    vectors = unit(rng, 2000, dim)
    ids = np.arange(2000, dtype=np.int64)
    store = make_store(kind, dim)
    store.replace_all(ids, vectors)
    query = unit(rng, 1, dim)
    first = store.search(query, 10)[0]
    cut = first[-1][1]
    nxt = store.search(query, 10, [SearchFilter(below=cut, exclude=frozenset({first[-1][0]}))])[0]
    want = reference(vectors, ids, query, 20)[0]
    assert [i for i, _ in first + nxt] == [i for i, _ in want]


@pytest.mark.parametrize("kind", STORES)
def test_empty_store_and_small_corpora(kind):
    store = make_store(kind, 8)
    assert store.search(np.ones((2, 8), np.float32) / np.sqrt(8), 5) == [[], []]
    store.upsert(np.array([1, 2], np.int64), np.eye(8, dtype=np.float32)[:2])
    got = store.search(np.eye(8, dtype=np.float32)[:1], 5)[0]
    assert [i for i, _ in got] == [1, 2]


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("rows", [1, 17, 26, 27, 100])
def test_corpora_about_k_plus_margin_rows(kind, rows):
    """Around k + MARGIN rows, every row is a candidate (nothing to certify) or only just
    not: the one-pass scan (1 query) and the GEMM path (3 queries), k below, at and above
    the row count, against the float64 reference."""
    rng = np.random.default_rng(rows)
    dim = 32
    matrix = clustered(rng, rows, dim, 4)
    ids = np.arange(100, 100 + rows, dtype=np.int64)
    store = make_store(kind, dim)
    store.replace_all(ids, matrix)
    queries = np.concatenate([matrix[:1], unit(rng, 2, dim)])
    for b, k in itertools.product((1, 3), (1, 10, 26, 40)):
        got = store.search(queries[:b], k)
        want = reference(matrix, ids, queries[:b], min(k, rows))
        assert [len(g) for g in got] == [min(k, rows)] * b
        assert recall(got, want) == 1.0
        assert got[0][0][0] == 100, "the query equal to the first row finds it first"


@pytest.mark.parametrize("kind", STORES)
def test_allow_restricts_to_matching_ids(kind):
    """A metadata filter's matches: k of them come back whenever k match, fewer only when
    fewer match, never another row."""
    rng = np.random.default_rng(9)
    dim = 32
    vectors = unit(rng, 5000, dim)
    ids = np.arange(5000, dtype=np.int64)
    store = make_store(kind, dim)
    store.replace_all(ids, vectors)
    allowed = frozenset(int(i) for i in rng.choice(5000, 50, replace=False))  # 1%
    query = unit(rng, 2, dim)
    got = store.search(query, 10, [SearchFilter(allow=allowed), None])
    sub = np.array(sorted(allowed))
    want = reference(vectors[sub], sub, query[:1], 10)[0]
    assert [i for i, _ in got[0]] == [i for i, _ in want]
    assert len(got[1]) == 10 and not {i for i, _ in got[1]} <= allowed
    few = store.search(query[:1], 10, [SearchFilter(allow=frozenset({3, 4, 99_999}))])[0]
    assert sorted(i for i, _ in few) == [3, 4]


@pytest.mark.parametrize("kind", STORES)
def test_a_batch_mixes_plain_small_filter_large_filter_and_cursor(kind):
    """One batch, four paths: no filter (the fast search), a small allow set (only its rows
    scored), a large one (every row scored, then restricted) and a small allow set paged by a
    cursor; each answer is the float64 reference's on its own rows, ties by lower row."""
    rng = np.random.default_rng(13)
    dim = 32
    n = 8000
    vectors = clustered(rng, n, dim, 40)
    ids = rng.permutation(100_000)[:n].astype(np.int64)
    store = make_store(kind, dim)
    store.replace_all(ids, vectors)
    small = frozenset(int(i) for i in rng.choice(ids, 80, replace=False))       # 1%
    large = frozenset(int(i) for i in rng.choice(ids, n // 2, replace=False))   # 50%
    queries = np.concatenate([unit(rng, 3, dim), vectors[:1]])
    first = store.search(queries[3:], 5, [SearchFilter(allow=small)])[0]
    cursor = SearchFilter(allow=small, below=first[-1][1], exclude=frozenset({first[-1][0]}))
    got = store.search(queries, 10, [None, SearchFilter(allow=small),
                                     SearchFilter(allow=large), cursor])

    def on(allowed, q):
        rows = np.array(sorted(np.flatnonzero(np.isin(ids, list(allowed)))))
        return reference(vectors[rows], ids[rows], q[None, :], 10)[0]

    assert [i for i, _ in got[0]] == [i for i, _ in reference(vectors, ids, queries[:1], 10)[0]]
    assert [i for i, _ in got[1]] == [i for i, _ in on(small, queries[1])]
    assert [i for i, _ in got[2]] == [i for i, _ in on(large, queries[2])]
    paged = reference(vectors[np.isin(ids, list(small))], ids[np.isin(ids, list(small))],
                      queries[3:], 15)[0]
    assert [i for i, _ in first + got[3]] == [i for i, _ in paged]
    for g in got:
        assert all(a[1] >= c[1] for a, c in itertools.pairwise(g))


def test_make_store_picks_the_device():
    from themis_pg.retrieval.store import make_store

    assert isinstance(make_store(8, "cpu"), NumpyStore)
    assert isinstance(make_store(8, "auto"), NumpyStore) == (not cupy_available())
    with pytest.raises(ValueError, match="unknown retrieval device"):
        make_store(8, "tpu")
    if not cupy_available():
        with pytest.raises(ValueError, match="not available"):
            make_store(8, "cuda:0")


@pytest.mark.parametrize("kind", STORES)
def test_export_and_host_buffer_round_trip(kind):
    """What a snapshot saves (export) and loads into (host_buffer) gives the same store."""
    rng = np.random.default_rng(11)
    matrix = unit(rng, 3000, 16)
    store = make_store(kind, 16)
    buf = store.host_buffer((3000, 16), np.float32)
    buf[:] = matrix
    store.replace_all(np.arange(3000, dtype=np.int64) + 5, buf)
    store.delete([5, 6])
    ids, vectors = store.export()
    assert len(ids) == 2998 and set(ids.tolist()) == set(range(7, 3005))
    np.testing.assert_array_equal(vectors[np.argsort(ids)], matrix[2:])
    again = make_store(kind, 16)
    again.replace_all(ids, vectors)
    q = unit(rng, 3, 16)
    assert [[i for i, _ in h] for h in again.search(q, 5)] == \
        [[i for i, _ in h] for h in store.search(q, 5)]


@pytest.mark.parametrize("path", ["default", "fused", "gemm", "gemm in chunks"])
@pytest.mark.parametrize("b", [1, 4, 5, 70])
@pytest.mark.parametrize("dim", [384, 768, 12])
@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="CuPy with a CUDA device is needed")
def test_gpu_every_path_is_exact_on_clustered_rows(b, dim, path, monkeypatch):
    """Each search path against the float64 reference: by default one query takes the
    one-pass scan (many blocks, a partial last block) and 4 or 5 the fused path; "fused"
    sends every batch there (70 queries: two query tiles, the second partial); "gemm" the
    GEMM path (in chunks: score blocks of 1 MiB, so several chunks' candidates meet in the
    merge).  k = 1, 10 and 100 go through the fused merge (merge_rank), k = 200 through the
    separate selections.  dim 12 is not a multiple of 8 (nor of 64, the fused path's): it
    always takes the GEMM path.  The last row is then deleted: its stale copy past the live
    rows must not be found."""
    from themis_pg.retrieval import cupy_store

    if path != "default":
        monkeypatch.setattr(cupy_store, "SMALL_BATCH", 0)
    if path == "fused":
        monkeypatch.setattr(cupy_store, "FUSED_MIN", 1)
        monkeypatch.setattr(cupy_store, "FUSED_MAX", 1024)
    if path.startswith("gemm"):
        monkeypatch.setattr(cupy_store, "FUSED_MAX", 0)
    if path == "gemm in chunks":
        monkeypatch.setattr(cupy_store, "CHUNK_BYTES", 1 << 20)
    rng = np.random.default_rng(b * 1000 + dim)
    n = 150_001
    matrix = clustered(rng, n, dim, 300)
    ids = np.arange(n, dtype=np.int64) * 3
    store = cupy_store.CupyStore(dim)
    store.replace_all(ids, matrix)
    if path in ("default", "fused") and dim % 64 == 0:
        assert store._fused_ok(4), "the fused kernel did not compile (see the log)"
    queries = np.concatenate([unit(rng, b - 1, dim), matrix[n - 1:n]])  # the last row too
    best = reference(matrix, ids, queries, 200)  # a stable order: each k's is a prefix
    for k in (1, 10, 100, 200):
        got = store.search(queries, k)
        want = [w[:k] for w in best]
        assert all(len(g) == k for g in got)
        assert recall(got, want) == 1.0
        assert got[-1][0][0] == ids[-1], "a query equal to the last row must find it first"
        for g in got:
            assert all(a[1] >= c[1] for a, c in itertools.pairwise(g))
    assert store.delete([int(ids[-1])]) == 1
    got = store.search(queries, 10)
    assert recall(got, reference(matrix[:-1], ids[:-1], queries, 10)) == 1.0
    assert all(i != ids[-1] for i, _ in got[-1])


@pytest.mark.parametrize("k", [10, 150])
@pytest.mark.parametrize("b", [1, 8, "8 by the GEMM path"])
@pytest.mark.parametrize("cap", ["near-ties rescored", "too many: exact scan"])
@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="CuPy with a CUDA device is needed")
def test_gpu_near_ties_the_bound_cannot_certify(b, cap, k, monkeypatch):
    """Thousands of rows within fp16 rounding of each other around the query: the candidates
    cannot be certified, so the store must collect every row within the bound of the k-th
    score and rescore those in fp32 (or scan exactly when there are more than its share),
    and still return the fp32 order.  k = 10 certifies in merge_rank (8 queries: the fused
    path's bounds, or the GEMM path's), k = 150 apart."""
    from themis_pg.retrieval import cupy_store

    if b == "8 by the GEMM path":
        monkeypatch.setattr(cupy_store, "FUSED_MAX", 0)
        b = 8

    rng = np.random.default_rng(3)
    dim = 384
    center = unit(rng, 1, dim)[0]
    near = center + 0.05 * rng.standard_normal((5000, dim)).astype(np.float32) / np.sqrt(dim)
    matrix = np.concatenate([near, unit(rng, 100_000, dim)])
    matrix = (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(len(matrix), dtype=np.int64)
    store = cupy_store.CupyStore(dim)
    store.replace_all(ids, matrix)
    if cap != "near-ties rescored":
        monkeypatch.setattr(cupy_store, "THRESHOLD_SHARE", 0.01)  # 1,050 rows < 5,000
    calls: dict[str, list[int]] = {"near": [], "exact": []}
    for name, attr in (("near", "_near_ties"), ("exact", "_search_exact")):
        real = getattr(store, attr)

        def spy(q, *args, _real=real, _name=name):
            calls[_name].append(len(q))
            return _real(q, *args)

        monkeypatch.setattr(store, attr, spy)
    queries = np.repeat(center[None, :], b, axis=0)
    got = store.search(queries, k)
    assert calls["near"] == [b], "the near-ties should not have been certified"
    assert store.uncertified_queries == b  # what themis_stats() reports
    assert calls["exact"] == ([] if cap == "near-ties rescored" else [b])
    assert recall(got, reference(matrix, ids, queries, k)) == 1.0
    full32 = matrix @ center  # fp32 sums in another order: equal to about 1e-7
    for g in got:
        assert all(a[1] >= c[1] for a, c in itertools.pairwise(g))
        assert all(abs(full32[i] - s) < 1e-6 for i, s in g)


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("rows", [0, 5, 3000])
def test_warm_up_runs_on_any_store_and_changes_no_answer(kind, rows):
    """warm_up (run after every load) takes each search path once: on an empty or tiny store
    too, and the store answers exactly as before it."""
    rng = np.random.default_rng(9)
    matrix = clustered(rng, rows, 64, 20) if rows else np.zeros((0, 64), np.float32)
    ids = np.arange(10, 10 + rows, dtype=np.int64)
    store = make_store(kind, 64)
    store.replace_all(ids, matrix)
    queries = unit(rng, 3, 64)
    before = store.search(queries, 10)
    store.warm_up()
    assert len(store) == rows
    assert store.search(queries, 10) == before
    if rows:
        assert recall(before, reference(matrix, ids, queries, min(10, rows))) == 1.0


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("rows", [0, 1, 1000])
def test_load_rows_from_a_snapshot_file(kind, rows, tmp_path):
    """A warm start's path: the vectors read from the file by the store itself (the GPU
    store in pieces through pinned buffers: small ones here, so there are many pieces on
    several threads and a short last one), replacing what the store held."""
    from themis_pg.retrieval.snapshot import SnapshotMeta, read_header, read_ids, write_file

    rng = np.random.default_rng(12)
    dim = 24
    matrix = unit(rng, rows, dim)
    ids = rng.permutation(rows).astype(np.int64) * 3 + 1
    path = tmp_path / "rows.snapshot"
    write_file(path, SnapshotMeta(token="t", model="m", dim=dim, rows=rows, watermark=0,
                                  seen={}, pending=[]), ids, matrix)
    got_ids, source = read_ids(path, read_header(path))
    store = make_store(kind, dim)
    store.upsert(np.array([-1, -2], np.int64), unit(rng, 2, dim))  # replaced by the load
    staging = {"stage_bytes": 7 * 4 * dim, "threads": 3} if kind == "cupy" else {}
    store.load_rows(got_ids, source, **staging)
    out_ids, out = store.export()
    assert out_ids.tolist() == ids.tolist()
    np.testing.assert_array_equal(out, matrix)
    if rows:
        q = unit(rng, 2, dim)
        want = reference(matrix, ids, q, min(5, rows))
        assert [[i for i, _ in h] for h in store.search(q, 5)] == [[i for i, _ in h] for h in want]
        with path.open("r+b") as f:  # a file that fails under the read is an error
            f.truncate(source.offset + 4 * dim * (rows // 2))
        with pytest.raises(ValueError, match="ended early"):
            make_store(kind, dim).load_rows(got_ids, source, **staging)


def test_hits_pairs_ids_and_scores_and_drops_padding():
    """``hits`` maps rows to ids; rows of -1 and scores of -inf (padding where a query has
    fewer than k hits) are dropped, in any row, and every other pair keeps its order."""
    from themis_pg.retrieval.store import hits

    ids = np.array([10, 11, 12, 13], np.int64)
    rows = np.array([[3, 0, 1], [2, -1, -1], [1, 2, 0]], np.int64)
    scores = np.array([[0.9, 0.5, 0.25], [0.75, -np.inf, -np.inf], [0.5, -np.inf, 0.125]],
                      np.float32)
    assert hits(ids, rows, scores) == [[(13, float(np.float32(0.9))), (10, 0.5), (11, 0.25)],
                                       [(12, 0.75)], [(11, 0.5), (10, 0.125)]]
    assert hits(ids, rows[:1], scores[:1]) == [[(13, float(np.float32(0.9))), (10, 0.5),
                                                (11, 0.25)]]
    assert hits(ids, rows[:0], scores[:0]) == []
