"""The jobs this worker serves right now, and which of them their callers cancelled."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol


class Wakeable(Protocol):
    def set(self) -> None: ...


class JobRegistry:
    """Thread-safe; a cancel wakes the lanes (``wakes``) so they act on it at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: set[int] = set()
        self._cancelled: set[int] = set()
        self.wakes: list[Wakeable] = []

    def start(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._active.update(ids)

    def end(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._active.difference_update(ids)
            self._cancelled.difference_update(ids)

    def active(self) -> list[int]:
        with self._lock:
            return sorted(self._active)

    def cancel(self, ids: Sequence[int]) -> None:
        with self._lock:
            new = {i for i in ids if i in self._active} - self._cancelled
            self._cancelled.update(new)
        if new:
            for wake in self.wakes:
                wake.set()

    def is_cancelled(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._cancelled
