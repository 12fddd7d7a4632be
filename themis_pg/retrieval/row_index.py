"""Document id → store row, for a million rows without a million Python objects.

A store needs the row of an id for three things: a write (is the id new?), a delete (which
row to free) and a filter (the rows of the ids it admits).  A ``dict`` does each in O(1), but
building one for a whole load costs about 0.15-0.25 s per million ids (one Python int pair
each), which is most of a warm restart's time on the GPU.  So a bulk load becomes two sorted
NumPy arrays (``keys``, ``rows``; no sort at all when the ids arrive in order, as the block
loader reads them), lookups of many ids at once are one ``searchsorted``, and the changes
since the load go to a small dict that is folded back into the arrays when it reaches a share
of the rows (``FOLD_SHARE``), so a write stays O(1) amortised.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

__all__ = ["RowIndex"]

IdArray = npt.NDArray[np.int64]

FOLD_SHARE = 1 / 16  # fold the change dict into the sorted arrays past this share of rows
FOLD_MIN = 4096      # ... and never below this many entries (small stores stay a dict)
_GONE = -1           # a change entry for an id removed since the fold


class RowIndex:
    """Maps int64 ids to rows (non-negative ints); absent ids look up as -1."""

    def __init__(self) -> None:
        self._keys: IdArray = np.zeros(0, np.int64)   # sorted ids of the last fold
        self._rows: IdArray = np.zeros(0, np.int64)   # their rows
        self._changes: dict[int, int] = {}            # since the fold: id → row, or _GONE
        self._size = 0
        self._change_arrays: tuple[IdArray, IdArray] | None = None  # sorted, for lookup()

    def reset(self, ids: IdArray) -> None:
        """Every id of ``ids`` at its position (ids are distinct)."""
        ids = np.asarray(ids, np.int64)
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            order = np.argsort(ids, kind="stable")
            self._keys, self._rows = ids[order], order.astype(np.int64)
        else:
            self._keys, self._rows = ids.copy(), np.arange(len(ids), dtype=np.int64)
        self._changes = {}
        self._change_arrays = None
        self._size = len(ids)

    def __len__(self) -> int:
        return self._size

    def get(self, doc_id: int) -> int | None:
        """The row of ``doc_id``, or None."""
        row = self._changes.get(doc_id)
        if row is None:
            at = int(np.searchsorted(self._keys, doc_id))
            if at < len(self._keys) and int(self._keys[at]) == doc_id:
                row = int(self._rows[at])
        return None if row is None or row == _GONE else row

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, int | np.integer) and self.get(int(doc_id)) is not None

    def set(self, doc_id: int, row: int) -> None:
        """Put ``doc_id`` at ``row`` (new, or moved)."""
        if self.get(doc_id) is None:
            self._size += 1
        self._changes[doc_id] = row
        self._changed()

    def add(self, ids: IdArray, rows: IdArray) -> None:
        """Put the new ids ``ids`` (distinct, none present) at ``rows``: one dict update."""
        self._changes.update(zip(ids.tolist(), rows.tolist(), strict=True))
        self._size += len(ids)
        self._changed()

    def pop(self, doc_id: int) -> int | None:
        """Remove ``doc_id``; its row, or None when it was absent."""
        row = self.get(doc_id)
        if row is not None:
            self._changes[doc_id] = _GONE
            self._size -= 1
            self._changed()
        return row

    def lookup(self, ids: IdArray | Iterable[int]) -> IdArray:
        """Rows of ``ids``, -1 for an absent id; vectorised over the sorted arrays."""
        ids = np.fromiter(ids, np.int64) if not isinstance(ids, np.ndarray) else \
            ids.astype(np.int64, copy=False)
        at, hit = _match(self._keys, ids)
        out = np.where(hit, self._rows[at], -1) if len(self._keys) else at.copy()
        if self._changes:
            keys, rows = self._sorted_changes()
            at, changed = _match(keys, ids)
            out[changed] = rows[at[changed]]  # _GONE is -1: removed ids read as absent
        return out

    def rows_of(self, ids: IdArray | Iterable[int]) -> IdArray:
        """Rows of the present ids among ``ids`` (absent ones dropped), in the order given."""
        rows = self.lookup(ids)
        return rows[rows >= 0]

    # -- internals ------------------------------------------------------------------------
    def _changed(self) -> None:
        self._change_arrays = None
        if len(self._changes) > max(FOLD_MIN, FOLD_SHARE * self._size):
            self._fold()

    def _sorted_changes(self) -> tuple[IdArray, IdArray]:
        if self._change_arrays is None:
            keys = np.fromiter(self._changes.keys(), np.int64, len(self._changes))
            rows = np.fromiter(self._changes.values(), np.int64, len(self._changes))
            order = np.argsort(keys)
            self._change_arrays = (keys[order], rows[order])
        return self._change_arrays

    def _fold(self) -> None:
        """Merge the change dict into the sorted arrays: O(rows) once per FOLD_SHARE of them."""
        keys, rows = self._sorted_changes()
        at, hit = _match(self._keys, keys)
        stale = at[hit]
        base_keys = np.delete(self._keys, stale)
        base_rows = np.delete(self._rows, stale)
        live = rows != _GONE
        merged_keys = np.concatenate([base_keys, keys[live]])
        order = np.argsort(merged_keys, kind="stable")
        self._keys = merged_keys[order]
        self._rows = np.concatenate([base_rows, rows[live]])[order]
        self._changes = {}
        self._change_arrays = None


def _match(keys: IdArray, ids: IdArray) -> tuple[IdArray, npt.NDArray[np.bool_]]:
    """Where each of ``ids`` is in the sorted ``keys`` and whether it is there: (positions,
    found); with no keys, positions of -1 and nothing found."""
    if not len(keys):
        return np.full(len(ids), -1, np.int64), np.zeros(len(ids), bool)
    at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
    return at, keys[at] == ids
