"""``themis worker``: one long-lived process serving the job bus.

Threads, each with its own connection:

* the **listener** (main thread, listener.py) wakes the lanes on NOTIFY and flags cancels;
* one **lane** per stage claims jobs with ``FOR UPDATE SKIP LOCKED`` and serves them: the
  search lane (search_lane.py: embedding + exact top-k, in batches) and the generation lane
  (generate_lane.py: admission into the generation engine);
* the **housekeeper** (housekeeper.py) renews leases, re-queues jobs of lost workers, cancels
  jobs whose caller went away and prunes old rows.

Any number of workers may share one database.  SIGTERM/SIGINT: lanes stop after their
current step, unfinished jobs go back to the queue, the worker row is removed.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..bus.jobs import JobStore
from ..bus.queries import query
from ..config import Settings
from ..embedding import Embedder
from ..errors import ModelMismatch, ThemisError
from ..generation.adapters import AdapterEngines
from ..generation.engine import GenerationEngine, SequentialEngine
from ..generation.llama import LlamaGenerator
from ..lora.registry import AdapterCache
from ..memory import MemoryBudgetExceeded, gpu_offload, plan_worker_memory
from ..models import verify_registered_model
from ..models.registry import get_model
from ..pl.payloads import AdapterUse, Limits
from ..retrieval.index import EmbeddingIndex
from ..retrieval.snapshot import SnapshotStore, snapshot_key
from ..retrieval.store import make_store
from .connections import connect
from .filter_cache import FilterCache
from .generate_lane import GenerateLane
from .housekeeper import Housekeeper
from .lane import Lane
from .listener import Listener
from .registry import JobRegistry
from .search_lane import SearchLane

log = logging.getLogger(__name__)


def kv_cells(settings: Settings) -> int:
    """The batch engine's KV cells: THEMIS_KV_CELLS, else a stream of n_ctx cells for every
    sequence and the cached prefix (split), or n_ctx x max_sequences, at most 16,384, shared
    (unified)."""
    if settings.kv_cells:
        return settings.kv_cells
    if settings.kv_layout == "unified":
        return min(settings.n_ctx * settings.max_sequences, 16384)
    return settings.n_ctx * (settings.max_sequences + 1)


UBATCH_MAX = 2048  # llama.cpp's compute buffers grow with n_ubatch; 2048 measured best


def batch_tokens(settings: Settings) -> int:
    """Tokens per decode step of the batch engine: THEMIS_BATCH_TOKENS, else 4096 where the
    generation model is offloaded to a GPU (fewer, larger steps while prompts are read;
    docs/benchmarks.md) and 512 on a CPU (a step's length there is seconds).  llama.cpp
    computes at most UBATCH_MAX of them at once."""
    if settings.batch_tokens:
        return settings.batch_tokens
    return 4096 if gpu_offload(settings.n_gpu_layers) else 512


MAX_LOAD_CONNECTIONS = 16  # bench/load.py on the 16-core H200 host: 16 best, 32 slower


def load_connections(settings: Settings) -> int:
    """Connections for a cold load of the matrix: THEMIS_LOAD_CONNECTIONS, else one per CPU
    core of this host, at most 16 (the server's backends share the cores when both run on one
    host, and past 16 they slowed the load)."""
    if settings.load_connections:
        return settings.load_connections
    return max(1, min(MAX_LOAD_CONNECTIONS, os.cpu_count() or 1))


GC_PAUSE_LOG_MS = 0.5


def watch_gc_pauses() -> None:
    """At debug level: log every garbage collection that stops the worker's threads for
    more than GC_PAUSE_LOG_MS (a search's budget is a few ms)."""
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            ms = (time.perf_counter() - started[0]) * 1000
            if ms > GC_PAUSE_LOG_MS:
                log.debug("gc of generation %d: %.2f ms, %d objects collected",
                          info["generation"], ms, info["collected"])

    gc.callbacks.append(on_gc)


class Worker:
    """Loads the models and the index, then runs the lanes until told to stop."""

    def __init__(self, settings: Settings, dsn: str,
                 kinds: Sequence[str] = ("search", "embed", "generate")) -> None:
        self.settings = settings
        self.dsn = dsn
        self.kinds = list(kinds)
        self.worker_id = settings.worker_identity()
        self.stopping = threading.Event()
        self.fatal = threading.Event()
        self.registry = JobRegistry()
        self._counts = {"done": 0, "failed": 0, "searches": 0, "search_batches": 0}
        self._search_ms = 0.0
        self._embed_ms = 0.0
        self._counts_lock = threading.Lock()
        self.filter_cache = FilterCache()  # the search lane's; its counts go into stats()
        self.started = time.time()

        with connect(dsn) as conn:
            emb = get_model(conn, "embedding", settings.embedding_model or None)
            gen = get_model(conn, "generation", settings.generation_model or None) \
                if "generate" in self.kinds else None
            self.limits = Limits.from_config(JobStore(conn, self.worker_id).config())
            database = (str(conn.info.host), int(conn.info.port), str(conn.info.dbname))
            rows = int(conn.execute(query("document_rows")).fetchone()[0])  # type: ignore[index]
        # The files must still be what was registered (sha256, cached by file identity).
        emb_path = verify_registered_model(emb, cache_dir=settings.model_cache)
        gen_path = None if gen is None else \
            verify_registered_model(gen, cache_dir=settings.model_cache)
        # The embedding model is small (and says the dimension); everything large is counted
        # before it is allocated, and a plan over the budget is a clear refusal.
        self.embedder = Embedder(emb_path, emb.name, n_threads=settings.n_threads,
                                 n_gpu_layers=settings.n_gpu_layers,
                                 flash_attn=settings.embedding_flash_attn)
        store = make_store(self.embedder.dim, settings.retrieval_device)
        self.memory = plan_worker_memory(
            store_device=store.device, rows=rows, dim=store.dim, embedding_model=emb_path,
            generation_model=gen_path, n_gpu_layers=settings.n_gpu_layers,
            kv_cells=kv_cells(settings) if settings.engine == "batch" else settings.n_ctx,
            kv_type=settings.kv_type, budget=settings.memory_budget)
        try:
            self.memory.check()
        except MemoryBudgetExceeded:
            self.embedder.close()
            raise
        snapshots = SnapshotStore(settings.index_snapshot_dir, snapshot_key(
            database, self.embedder.name, self.embedder.dim, store.device)) \
            if settings.index_snapshots else None
        self.index = EmbeddingIndex(self.embedder.dim, self.embedder.name, store,
                                    connect=lambda: connect(dsn), snapshots=snapshots,
                                    load_connections=load_connections(settings))
        self._adapters = AdapterCache(settings.lora_cache, settings.lora_cache_bytes)
        self._adapter_lock = threading.Lock()
        self.engine: GenerationEngine | None = None
        if gen is not None and gen_path is not None:
            self.engine = self._engine(settings, gen.name, gen_path, self._adapter_file)
        log.info("worker %s: embedding model %s (dim %d), generation model %s",
                 self.worker_id, emb.name, self.embedder.dim, gen.name if gen else "-")

    def _adapter_file(self, use: AdapterUse) -> Path:
        """A LoRA adapter's local file: the cache's, or fetched from the database into it
        (a connection of its own: this runs on the generation lane, between jobs)."""
        with self._adapter_lock, connect(self.dsn) as conn:
            return self._adapters.path(conn, use.sha256)

    @staticmethod
    def _engine(settings: Settings, name: str, path: Path,
                adapter_file: Callable[[AdapterUse], Path]) -> GenerationEngine:
        """The generation engine the settings ask for, on the registered model file."""
        batch = settings.engine == "batch"
        if settings.engine not in ("batch", "sequential"):
            raise ThemisError(f"unknown THEMIS_ENGINE {settings.engine!r}",
                              hint="Use 'batch' or 'sequential'.")
        if settings.kv_layout not in ("split", "unified"):
            raise ThemisError(f"unknown THEMIS_KV_LAYOUT {settings.kv_layout!r}",
                              hint="Use 'split' or 'unified'.")
        unified = settings.kv_layout == "unified"
        cells = kv_cells(settings)
        # a prompt and its answer must fit the cells one sequence may hold
        window = min(settings.n_ctx, cells if unified else cells // (settings.max_sequences + 1))
        generator = LlamaGenerator(path, name, n_ctx=window if batch else settings.n_ctx,
                                   n_threads=settings.n_threads,
                                   n_gpu_layers=settings.n_gpu_layers,
                                   own_cells=256 if batch else None)
        if not batch:
            return SequentialEngine(generator)
        step = batch_tokens(settings)
        return AdapterEngines(generator, adapter_file, max_sequences=settings.max_sequences,
                              max_sets=settings.max_adapter_sets, kv_cells=cells,
                              kv_type=settings.kv_type, n_threads=settings.n_threads,
                              unified=unified, n_batch=step, n_ubatch=min(step, UBATCH_MAX))

    def count(self, what: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[what] += n

    def count_search(self, queries: int, ms: float, embed_ms: float = 0.0) -> None:
        """One search batch: its queries, its top-k time and its query embedding time."""
        with self._counts_lock:
            self._counts["searches"] += queries
            self._counts["search_batches"] += 1
            self._search_ms += ms
            self._embed_ms += embed_ms

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self._counts)
            search_ms, embed_ms = self._search_ms, self._embed_ms
        batches = counts.pop("search_batches")
        searches = counts.pop("searches")
        store = self.index.store
        return {"jobs": counts, "index_size": len(self.index),
                "index": {"device": store.device, "dtype": store.dtype, "bytes": store.nbytes,
                          "load_ms": round(self.index.last_load_ms, 1),
                          "loaded_from": self.index.last_load_source,
                          "last_sync_ms": round(self.index.last_sync.ms, 3)},
                "searches": {"queries": searches, "batches": batches,
                             "mean_batch": round(searches / batches, 2) if batches else 0.0,
                             "mean_ms": round(search_ms / batches, 3) if batches else 0.0,
                             "total_ms": round(search_ms, 1),
                             "embed_total_ms": round(embed_ms, 1),
                             "uncertified_queries": store.uncertified_queries,
                             "filters": self.filter_cache.as_json()},
                "memory": self.memory.as_json(),
                "generation": self.engine.snapshot()
                if isinstance(self.engine, AdapterEngines) else None,
                "embedding_model": self.embedder.name,
                "generation_model": self.engine.name if self.engine else None,
                "uptime_s": round(time.time() - self.started, 1)}

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or ``stopping`` is set)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        searches = bool({"search", "embed"} & set(self.kinds))
        with connect(self.dsn) as conn:
            store = JobStore(conn, self.worker_id)
            if searches:
                # Registered with the watermark of the snapshot the index is about to load
                # from, so that no other worker prunes changes this one will still need.
                xmin = conn.execute(query("snapshot_state")).fetchone()[0]  # type: ignore[index]
                store.register(self.kinds, self.stats(), int(xmin))
                try:
                    self.index.load(conn)
                except ModelMismatch as exc:
                    log.error("%s; search jobs will fail until this is fixed", exc.message)
            else:
                store.register(self.kinds, self.stats())
        # Everything alive now (modules, models, the index's bookkeeping) lives as long as
        # the worker: out of the collector's sight, a full collection no longer walks it
        # (one took 55 ms in the middle of a H200 benchmark run, 2026-12-03).
        gc.collect()
        gc.freeze()
        if log.isEnabledFor(logging.DEBUG):
            watch_gc_pauses()
        lanes: list[Lane] = []
        if searches:
            lanes.append(SearchLane(self))
        if self.engine is not None:
            lanes.append(GenerateLane(self, self.engine))
        housekeeper = Housekeeper(self)
        for thread in (*lanes, housekeeper):
            thread.start()
        log.info("worker %s ready (kinds: %s)", self.worker_id, ", ".join(self.kinds))
        try:
            Listener(self, lanes).run()
        finally:
            self.stopping.set()
            for lane in lanes:
                lane.wake.set()
            for thread in (*lanes, housekeeper):
                thread.join(timeout=30)
            self._shutdown()
        if self.fatal.is_set():
            raise RuntimeError("a worker thread died; see the log above")

    def _shutdown(self) -> None:
        try:
            if self.index.save_snapshot():
                log.info("index snapshot written for the next start")
        except Exception as exc:  # the next start then loads from the database
            log.warning("could not write the index snapshot: %s", exc)
        try:
            with connect(self.dsn) as conn:
                store = JobStore(conn, self.worker_id)
                released = store.release()
                store.deregister()
            log.info("worker %s stopped (%d unfinished jobs re-queued)", self.worker_id,
                     released)
        except Exception as exc:
            log.warning("could not deregister cleanly: %s", exc)
