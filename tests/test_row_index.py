"""RowIndex against a dict: the same answers through loads, writes, moves, removals and folds
(pure logic; the stores' use of it is covered by test_store.py and test_filter_cache.py)."""

from __future__ import annotations

import numpy as np
import pytest

from themis_pg.retrieval import row_index
from themis_pg.retrieval.row_index import RowIndex


def check(index: RowIndex, truth: dict[int, int], probe: np.ndarray) -> None:
    assert len(index) == len(truth)
    want = np.array([truth.get(int(i), -1) for i in probe], np.int64)
    assert index.lookup(probe).tolist() == want.tolist()
    assert index.rows_of(probe).tolist() == want[want >= 0].tolist()
    for i in probe[:50]:
        assert index.get(int(i)) == truth.get(int(i))
        assert (int(i) in index) == (int(i) in truth)


@pytest.mark.parametrize("ordered", [True, False])
def test_bulk_load_maps_every_id_to_its_position(ordered: bool):
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10**12, 5000, replace=False)).astype(np.int64)
    if not ordered:
        rng.shuffle(ids)
    index = RowIndex()
    index.reset(ids)
    truth = {int(i): r for r, i in enumerate(ids)}
    check(index, truth, np.concatenate([ids[::7], ids[:20] + 1, [-5, 2**62]]))
    assert np.int64(ids[3]) in index  # NumPy ints are ids too


@pytest.mark.parametrize("fold_min", [8, 4096])
def test_random_changes_match_a_dict_with_and_without_folds(monkeypatch, fold_min: int):
    monkeypatch.setattr(row_index, "FOLD_MIN", fold_min)
    rng = np.random.default_rng(1)
    index = RowIndex()
    ids = np.arange(0, 400, 2, dtype=np.int64)
    index.reset(ids)
    truth = {int(i): r for r, i in enumerate(ids)}
    for step in range(300):
        op = rng.integers(3)
        doc = int(rng.integers(-10, 600))
        if op == 0 and doc not in truth:
            index.add(np.array([doc], np.int64), np.array([step + 1000], np.int64))
            truth[doc] = step + 1000
        elif op == 1:
            index.set(doc, step)
            truth[doc] = step
        else:
            assert index.pop(doc) == truth.pop(doc, None)
        if step % 25 == 0:
            check(index, truth, np.arange(-12, 610, dtype=np.int64))
    check(index, truth, np.arange(-12, 610, dtype=np.int64))
    if fold_min == 8:
        assert len(index._changes) <= max(8, len(truth) / 16) + 1  # folds happened


def test_an_empty_index_knows_nothing():
    index = RowIndex()
    assert index.lookup(np.array([1, 2], np.int64)).tolist() == [-1, -1]
    assert index.get(1) is None and index.pop(1) is None and len(index) == 0
    index.add(np.array([7], np.int64), np.array([0], np.int64))
    assert index.lookup([7, 8]).tolist() == [0, -1]
