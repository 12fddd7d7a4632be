"""The ids each metadata filter admits, kept between searches while no document changes.

A filtered search needs the filter's matching ids before its top-k (jsonb containment is the
database's to decide).  Reading them is a GIN index scan plus shipping every id: for a 1%
filter on a million documents, 10,000 ids per call, which cost more than the search.  Filters
repeat (a tenant, a language, a product), so the worker keeps each one's ``AllowSet``, whose
row map the store also keeps (store.py), and asks the database again only after a change.

Validity: every write to ``themis.documents`` (metadata included) is a change the index's
next delta reports, and the search lane reads that delta, pipelined behind its claim, before it
serves the claimed jobs; the index bumps its ``generation`` when a delta holds changes or it
reloads.  An entry is used only while the generation it was read at is current, so a caller
never gets matches older than its own committed writes (read-your-writes holds as for the
vectors).
"""

from __future__ import annotations

from collections import OrderedDict

from ..retrieval.store import AllowSet

MAX_FILTERS = 256          # distinct filters kept (least recently used go first)
MAX_IDS = 20_000_000       # ids kept over all filters (about 1 GB of Python ints at most)


class FilterCache:
    def __init__(self, max_filters: int = MAX_FILTERS, max_ids: int = MAX_IDS) -> None:
        self.max_filters = max_filters
        self.max_ids = max_ids
        self._entries: OrderedDict[str, AllowSet] = OrderedDict()
        self._generation: int | None = None
        self._ids = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, generation: int) -> AllowSet | None:
        """The cached matches of filter ``key`` (canonical JSON), None when not cached or read
        before the index's current ``generation``."""
        if generation != self._generation:
            self._entries.clear()
            self._ids = 0
            self._generation = generation
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: str, generation: int, allow: AllowSet) -> None:
        """Keep ``allow`` for ``key`` if it was read at the current generation and fits."""
        if generation != self._generation or len(allow) > self.max_ids:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._ids -= len(old)
        self._entries[key] = allow
        self._ids += len(allow)
        while len(self._entries) > self.max_filters or self._ids > self.max_ids:
            _, evicted = self._entries.popitem(last=False)
            self._ids -= len(evicted)

    def as_json(self) -> dict[str, int]:
        return {"cached": len(self._entries), "ids": self._ids, "hits": self.hits,
                "misses": self.misses}
