"""Generation with LoRA adapters: one batch engine per adapter set, on the same model weights.

llama.cpp applies adapters per context (``llama_set_adapters_lora``), so requests that use
different adapter sets cannot share a decode step.  :class:`AdapterEngines` keeps one
:class:`~themis_pg.generation.batching.BatchEngine` (its own context and decode loop) for each
adapter set in use, all on the generator's weights (loaded once), and routes every request to
the engine of its set: requests of one set batch together, and the sets' loops run side by
side instead of one request at a time.  An adapter file is loaded once per worker
(``llama_adapter_lora_init``) and shared by every set that uses it.

At most ``max_sets`` engines exist at once (each holds its own KV cache); a request for another
set waits, in order, until an engine with no work can be closed for it.  Scale 0 is kept as
given (it gives exactly the base model's output: llama.cpp adds 0 x the delta).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ThemisError
from ..pl.payloads import AdapterUse
from .batching import BatchEngine
from .engine import GenerationOutcome, GenerationRequest, OnDone, OnToken
from .llama import LlamaGenerator

log = logging.getLogger(__name__)

SetKey = tuple[tuple[str, float], ...]  # (sha256, scale), sorted


def set_key(adapters: tuple[AdapterUse, ...]) -> SetKey:
    return tuple(sorted((a.sha256, a.scale) for a in adapters))


class AdapterEngines:
    """The generation engine of a worker: a batch engine per adapter set (see module doc)."""

    def __init__(self, generator: LlamaGenerator, adapter_path: Callable[[AdapterUse], Path], *,
                 max_sequences: int = 16, max_sets: int = 4, **engine_kw: Any) -> None:
        """``adapter_path`` gives the local file of an adapter (the worker's cache, which
        fetches from the database); ``engine_kw`` configures every BatchEngine."""
        import llama_cpp

        self._lc = llama_cpp
        self.generator = generator
        self.name = generator.name
        self.max_sequences = max_sequences
        self.max_sets = max_sets
        self._adapter_path = adapter_path
        self._engine_kw = engine_kw
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()  # one router at a time (engines are made inside)
        self._engines: dict[SetKey, BatchEngine] = {}
        self._names: dict[SetKey, list[tuple[str, float]]] = {}  # (name, scale), by name
        self._loaded: dict[str, Any] = {}          # sha256 -> llama_adapter_lora_p
        self._where: dict[int, SetKey] = {}        # request id -> its set
        self._in_flight: dict[SetKey, int] = {}
        self._pending: deque[tuple[GenerationRequest, OnDone, OnToken | None]] = deque()
        self._closing = False
        self._engines[()] = self._new_engine(())
        self._names[()] = []

    # -- the GenerationEngine interface ---------------------------------------------------
    def free_slots(self) -> int:
        with self._lock:
            if self._closing:
                return 0
            return max(0, self.max_sequences - len(self._where))

    def submit(self, request: GenerationRequest, on_done: OnDone,
               on_token: OnToken | None = None) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("engine is closed")
            self._pending.append((request, on_done, on_token))
            self._where[request.id] = set_key(request.payload.adapters)
        self._drain()

    def cancel(self, request_id: int) -> None:
        with self._lock:
            key = self._where.get(request_id)
            waiting = next((p for p in self._pending if p[0].id == request_id), None)
            if waiting is not None:
                self._pending.remove(waiting)
                self._where.pop(request_id, None)
            engine = self._engines.get(key) if key is not None and waiting is None else None
        if waiting is not None:
            waiting[1](GenerationOutcome(waiting[0], stopped=True))
        elif engine is not None:
            engine.cancel(request_id)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            engines = list(self._engines.values())
            pending = list(self._pending)
            self._pending.clear()
        for request, on_done, _ in pending:
            on_done(GenerationOutcome(request, stopped=True))
        for engine in engines:
            engine.close()
        for handle in self._loaded.values():
            self._lc.llama_adapter_lora_free(handle)
        self._loaded.clear()

    def snapshot(self) -> dict[str, Any]:
        """The base engine's figures, and per adapter set its queueing."""
        with self._lock:
            engines = dict(self._engines)
            names = dict(self._names)
            pending = [self._where.get(r.id) for r, _, _ in self._pending]
        out = engines[()].snapshot()
        sets = []
        for key, e in engines.items():
            if not key:
                continue
            figures = e.snapshot()
            sets.append({"adapters": [n for n, _ in names.get(key, [])],
                         "scales": [s for _, s in names.get(key, [])],
                         "running": figures["running"],
                         "queued": figures["queued"] + sum(1 for p in pending if p == key),
                         "requests": figures["requests"], "tokens_out": figures["tokens_out"]})
        out["adapter_sets"] = sets
        out["adapter_sets_waiting"] = sum(1 for p in pending if p not in engines)
        return out

    def traces(self) -> dict[int, tuple[list[int], list[float]]]:
        """With ``record_margins``: every engine's token traces, by request id."""
        with self._lock:
            engines = list(self._engines.values())
        return {rid: t for e in engines for rid, t in e.traces.items()}

    # -- routing -----------------------------------------------------------------------------
    def _drain(self) -> None:
        """Hand pending requests, in order, to their set's engine (making it if a slot for
        one is free); stop at the first that must wait.  With nothing pending it returns at
        once: an engine's thread comes here after every request, and must not wait while
        another thread hands over (and tokenizes) a request."""
        if not self._pending:  # a racy read is enough: whoever appends drains after
            return
        with self._drain_lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._closing:
                    return
                request, on_done, on_token = self._pending[0]
                key = self._where[request.id]
                engine = self._engines.get(key)
                full = engine is None and len(self._engines) - 1 >= self.max_sets
                idle = [k for k in self._engines if k and not self._in_flight.get(k)]
                if full and not idle:
                    return  # every set's engine is busy: wait for one to finish
                self._pending.popleft()
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
                if full:
                    old = self._engines.pop(idle[0])
                    self._names.pop(idle[0], None)
                    # not here: this may run on that engine's own thread (its last on_done)
                    threading.Thread(target=old.close, name="engine-retire", daemon=True).start()
            try:
                if engine is None:
                    engine = self._engine_for(key, request.payload.adapters)
                engine.submit(request, self._finished(key, on_done), on_token)
            except ThemisError as exc:
                self._release(key, request.id)
                on_done(GenerationOutcome(request, error=exc))
            except Exception as exc:  # a bug: report it as one
                log.exception("could not start request %d", request.id)
                self._release(key, request.id)
                on_done(GenerationOutcome(request, crash=exc))

    def _finished(self, key: SetKey, on_done: OnDone) -> OnDone:
        def done(outcome: GenerationOutcome) -> None:
            self._release(key, outcome.request.id)
            on_done(outcome)
            self._drain()
        return done

    def _release(self, key: SetKey, request_id: int) -> None:
        with self._lock:
            self._where.pop(request_id, None)
            self._in_flight[key] = max(0, self._in_flight.get(key, 0) - 1)

    def _engine_for(self, key: SetKey, adapters: tuple[AdapterUse, ...]) -> BatchEngine:
        by_sha = {a.sha256: a for a in adapters}
        for sha in by_sha:
            if sha not in self._loaded:
                path = self._adapter_path(by_sha[sha])
                handle = self._lc.llama_adapter_lora_init(self.generator.llama_model,
                                                          str(path).encode())
                if not handle:
                    raise ThemisError(f"llama.cpp could not load the LoRA adapter "
                                      f"{by_sha[sha].name} for {self.name}")
                self._loaded[sha] = handle
        engine = self._new_engine(key)
        with self._lock:
            self._engines[key] = engine
            self._names[key] = sorted((by_sha[sha].name, scale) for sha, scale in key)
        log.info("generation engine for adapters %s", self._names[key])
        return engine

    def _new_engine(self, key: SetKey) -> BatchEngine:
        return BatchEngine(self.generator, max_sequences=self.max_sequences,
                           adapters=[(self._loaded[sha], scale) for sha, scale in key],
                           **self._engine_kw)
