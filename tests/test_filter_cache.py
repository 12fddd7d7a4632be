"""The worker's cache of metadata-filter matches (pure logic; the end-to-end behaviour is in
test_filters.py)."""

from __future__ import annotations

import numpy as np

from themis_pg.retrieval.store import AllowSet, NumpyStore
from themis_pg.worker.filter_cache import FilterCache


def test_entries_live_only_while_the_generation_holds():
    cache = FilterCache()
    assert cache.get('{"a": 1}', 1) is None
    allow = AllowSet([1, 2, 3])
    cache.put('{"a": 1}', 1, allow)
    assert cache.get('{"a": 1}', 1) is allow
    assert cache.get('{"a": 1}', 2) is None  # a change since: read again
    cache.put('{"a": 1}', 1, allow)          # read at an older generation: not kept
    assert cache.get('{"a": 1}', 2) is None
    assert cache.as_json() == {"cached": 0, "ids": 0, "hits": 1, "misses": 3}


def test_least_recently_used_filters_go_first_within_the_limits():
    cache = FilterCache(max_filters=2, max_ids=5)
    for key in ("a", "b"):
        cache.get(key, 0)
        cache.put(key, 0, AllowSet([1, 2]))
    assert cache.get("a", 0) is not None  # "b" is now the oldest
    cache.put("c", 0, AllowSet([3]))
    assert cache.get("b", 0) is None and cache.get("c", 0) is not None
    cache.put("d", 0, AllowSet(range(4)))  # 2 + 1 + 4 ids > 5: the oldest ("a") goes
    assert len(cache) == 2 and cache.get("a", 0) is None and cache.get("d", 0) is not None
    cache.put("e", 0, AllowSet(range(6)))  # larger than the whole cache: not kept
    assert cache.get("e", 0) is None


def test_allow_set_rows_follow_the_store_layout():
    """The row map an AllowSet keeps is reused while rows stay put and rebuilt after rows
    move (a swap-delete moves the last row into the hole)."""
    store = NumpyStore(4)
    store.replace_all(np.arange(10, 20, dtype=np.int64), np.eye(4, dtype=np.float32)[
        np.arange(10) % 4])
    allow = AllowSet([11, 19, 99])
    first = allow.rows_in(store)
    assert first.tolist() == [1, 9]
    assert allow.rows_in(store) is first
    store.upsert(np.array([11], np.int64), np.ones((1, 4), np.float32) / 2)  # in place
    assert allow.rows_in(store) is first
    store.delete([10])  # row 0 freed, id 19 moves from row 9 to row 0
    assert allow.rows_in(store).tolist() == [0, 1]
    other = NumpyStore(4)
    other.replace_all(np.array([19], np.int64), np.ones((1, 4), np.float32) / 2)
    assert allow.rows_in(other).tolist() == [0]
