"""Continuous batching on llama.cpp's low-level API: every running request shares one decode
loop, one ``llama_decode`` per step.

One ``BatchEngine`` owns one llama.cpp context on the generator's model weights (shared, not
copied), with a unified KV cache of ``kv_cells`` cells for all sequences.  Its thread runs
steps; each step puts into one ``llama_batch``

* the last sampled token of every sequence that is generating (one token each), and
* as many prompt tokens of the sequences still reading their prompt as fit the batch
  (``n_batch``), oldest request first: long prompts are read in chunks, so the sequences that
  are generating never wait for a whole prompt;

then samples one token for every sequence that has logits in the batch.  New requests join at
the next step; finished, cancelled or failed ones leave at once and their cells are freed.

**KV memory**, two layouts (``unified``):

* *split* (the worker's default): every sequence, and the cached prefix, has a stream of
  ``kv_cells / (max_sequences + 1)`` cells; a token's attention reads only its own stream.
  llama.cpp puts only a run of consecutive sequence ids into one micro-batch of a split
  cache, so ids are handed out lowest first and a step's tokens go in by id.
* *unified*: one pool, a sequence holds cells in proportion to its tokens (never ``n_ctx`` x
  sequences), but llama.cpp's attention then reads every used cell of the pool for every
  token, masked: with 64 sequences of 1,000 tokens on the H200, 1.46x the time of split
  streams (16 on the 2-core CPU: 1.78x; docs/benchmarks.md).

A request is admitted only when its prompt plus ``max_tokens`` fit the cells it may hold (its
stream; in the pool, the cells not yet promised to others), so a running sequence never loses
its context; requests that do not fit wait, in order (none is failed for it; one larger than a
sequence may ever hold fails at once with ContextOverflow).  ``kv_type='q8_0'`` halves the
cells' bytes.

**Prefix reuse.**  RAG prompts share their head (system prompt, chat template head).  The
engine keeps one cached prefix in a sequence of its own: when a new prompt starts with at
least ``prefix_min`` tokens of it, those cells are shared into the new sequence
(``llama_memory_seq_cp``: in a unified cache the cells gain a sequence id, no copy; between
split streams the cells are copied) and only the rest of the prompt is evaluated.  The prefix
is learned at admission: when a prompt shares at least ``prefix_min`` leading tokens with the
previous admitted one, that head is evaluated once, on its own, and every admitted sequence
that has read nothing yet gets it too, so a burst of calls arriving together shares it.
In split streams a finished sequence's prompt cells also stay in its stream, and the next
request admitted there uses as many of them as its prompt shares (at least ``prefix_min``
and no fewer than the cached prefix would give), in place: no copy, and no memory update
in llama.cpp, which reserves its worst-case graph again after every copy between streams.
That is what serves calls arriving one at a time (a pool of clients); the cached prefix
serves a burst on fresh streams.
Bit-exactness: shared cells hold exactly the values that one evaluation of the prefix
computed; reading the same tokens inside a whole prompt, or in a batch of another size, makes
llama.cpp's kernels round differently, so a reused prefix (like any batching) may change the
last bits of later logits.  Greedy outputs stay the same unless two candidate tokens are
within that rounding of each other (tests/test_batching.py shows that every divergence falls
on such a near-tie).

**Sampling** per request: temperature (0 = greedy), top_p, seed, repeat penalty over the last
64 tokens (prompt included, as llama-cpp-python does), stop strings, max_tokens.  Greedy
requests are sampled in NumPy (:func:`greedy_token`, the choice llama.cpp's chain makes,
without its vocabulary-sized candidate array per token); the others by a llama.cpp sampler
chain.  Pieces are streamed to ``on_token`` as they become safe to show (no partial UTF-8
character, nothing that may still turn into a stop string).
"""

from __future__ import annotations

import ctypes
import heapq
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ContextOverflow, ThemisError
from .engine import GenerationOutcome, GenerationRequest, OnDone, OnToken
from .llama import REPEAT_PENALTY, GenerationResult

if TYPE_CHECKING:
    from .llama import LlamaGenerator

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # llama-cpp-python's default window for the repeat penalty
TOP_P = 0.95         # llama-cpp-python's default for create_completion
KV_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type ids


@dataclass
class _Sequence:
    """One admitted request and its place in the KV cache."""

    request: GenerationRequest
    on_done: OnDone
    on_token: OnToken | None
    seq_id: int
    tokens: list[int]                  # the whole prompt
    stop: list[str]
    max_tokens: int
    contexts_used: int
    sampler: Any                       # llama.cpp sampler chain; None: greedy (NumPy)
    admitted: float
    n_past: int = 0                    # cells this sequence holds (positions 0..n_past-1)
    reused: int = 0                    # prompt tokens taken from the cached prefix
    shared: bool = False               # ... whose cells the prefix sequence still holds
    generated: list[int] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    shown: int = 0                     # characters already sent to on_token
    last: int | None = None            # sampled token not yet evaluated
    first_token_at: float | None = None
    margins: list[float] = field(default_factory=list)
    window_at: int = 0                 # tokens put in its penalty window (a ring) so far

    @property
    def reading(self) -> bool:
        return self.n_past < len(self.tokens)

    @property
    def need(self) -> int:
        """Cells promised to this sequence: its prompt (less cells it shares with the cached
        prefix) and its answer."""
        return len(self.tokens) - (self.reused if self.shared else 0) + self.max_tokens


@dataclass
class _Waiting:
    request: GenerationRequest
    on_done: OnDone
    on_token: OnToken | None
    queued: float
    prompt: Any = None                 # prepared at submit (template, tokens) ...
    error: Exception | None = None     # ... or why it could not be


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    prefix_hits: int = 0           # prompts that got the cached prefix's cells
    kept_hits: int = 0             # ... that found their head still in their own stream
    prefix_tokens_reused: int = 0  # prompt tokens not evaluated, by either
    steps: int = 0
    sequences_stepped: int = 0
    prompt_s: float = 0.0      # in llama_decode, steps that read prompt tokens
    generate_s: float = 0.0    # in llama_decode, steps of generated tokens only
    admit_s: float = 0.0       # admitting requests (prefix lookups and cells), cancels
    sample_s: float = 0.0      # choosing tokens, stop strings, streaming
    loop_s: float = 0.0        # the loop while it had work: all of the above and the rest
    wait_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


class BatchEngine:
    """Continuous batching for one generation model (see the module doc)."""

    #: split streams keep a finished sequence's prompt cells for the next request in the
    #: stream (off: benchmarks, to measure what that saves)
    keep_prompts = True

    def __init__(self, generator: LlamaGenerator, *, max_sequences: int = 16,
                 kv_cells: int | None = None, n_batch: int = 512,
                 n_ubatch: int | None = None, prefix_min: int = 16,
                 kv_type: str = "f16", n_threads: int | None = None,
                 record_margins: bool = False, ignore_eog: bool = False,
                 unified: bool = True, prefill_chunk: int | None = None,
                 adapters: Sequence[tuple[Any, float]] = ()) -> None:
        """``n_batch``: the most tokens one step puts into its ``llama_decode``; ``n_ubatch``
        (default: ``n_batch``): the most llama.cpp computes at once inside it, so a step's
        prompt tokens are one matrix product over the weights rather than several.
        ``adapters``: loaded LoRA adapters (``llama_adapter_lora_init``) and their scales,
        applied to every sequence of this engine (adapters apply per llama.cpp context).
        ``ignore_eog`` (benchmarks only) generates ``max_tokens`` tokens whatever is
        sampled, so runs of random-weight models have a fixed length."""
        import llama_cpp

        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, not {kv_type!r}")
        self._lc = llama_cpp
        self.generator = generator
        self.name = generator.name
        self.max_sequences = max_sequences
        self.kv_cells = kv_cells or min(generator.n_ctx * max_sequences, 65536)
        self.n_batch = n_batch
        self.prefix_min = prefix_min
        self.record_margins = record_margins
        self.ignore_eog = ignore_eog
        self.unified = unified
        # None: a step's whole budget (n_batch tokens, generating ones first), as vLLM's
        # chunked prefill does; on the GPU machine 256-token chunks left 64 concurrent
        # 900-token prompts reading for 230 steps.
        self.prefill_chunk = prefill_chunk or n_batch
        # split: each sequence (and the prefix) has a stream of its own of this many cells
        self.cells_per_sequence = self.kv_cells if unified else self.kv_cells // (
            max_sequences + 1)
        model = generator.llama_model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.kv_cells
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch or n_batch, n_batch)
        params.n_seq_max = max_sequences + 1  # + the cached prefix
        params.kv_unified = unified
        threads = n_threads or os.cpu_count() or 1
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = params.type_v = KV_TYPES[kv_type]
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise ThemisError(f"llama.cpp could not create a {self.kv_cells}-cell context "
                              f"for {self.name}",
                              hint="Lower THEMIS_KV_CELLS or THEMIS_MAX_SEQUENCES.")
        if adapters:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(
                *(a for a, _ in adapters))
            scales = (ctypes.c_float * len(adapters))(*(scale for _, scale in adapters))
            if llama_cpp.llama_set_adapters_lora(self._ctx, handles, len(adapters), scales):
                llama_cpp.llama_free(self._ctx)
                raise ThemisError(f"llama.cpp could not apply {len(adapters)} LoRA adapters "
                                  f"to {self.name}")
        self.kv_type = kv_type
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._pieces: dict[int, bytes] = {}  # token -> its text, as llama.cpp renders it
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._prefix_seq = max_sequences
        self._prefix: list[int] = []      # tokens held by the prefix sequence
        self._last_prompt: list[int] = []
        # Lowest free id first: split streams batch only runs of consecutive sequence ids
        # (see _step), so the running set is kept as dense as churn allows.
        self._free_ids = list(range(max_sequences))  # a heap
        # split streams: the prompt tokens whose cells a free sequence's stream still holds
        self._held: list[list[int]] = [[] for _ in range(max_sequences)]
        # each sequence's repeat-penalty window (its last PENALTY_LAST_N tokens, a ring; -1:
        # empty), by sequence id: a step's greedy rows are penalised from one gather of it
        self._windows = np.full((max_sequences, PENALTY_LAST_N), -1, dtype=np.intp)
        self._active: dict[int, _Sequence] = {}   # by request id
        self._waiting: deque[_Waiting] = deque()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self.stats = EngineStats()
        #: with record_margins: request id -> (generated tokens, top-2 logit gap at each)
        self.traces: dict[int, tuple[list[int], list[float]]] = {}
        self._thread = threading.Thread(target=self._run, name="engine-batch", daemon=True)
        self._thread.start()

    # -- the GenerationEngine interface ---------------------------------------------------
    def free_slots(self) -> int:
        with self._lock:
            if self._closing:
                return 0
            return max(0, self.max_sequences - len(self._active) - len(self._waiting))

    def submit(self, request: GenerationRequest, on_done: OnDone,
               on_token: OnToken | None = None) -> None:
        """Queue a request.  Its prompt is prepared (chat template, tokens) here, on the
        caller's thread, not in the loop: a 900-token RAG prompt takes 3-6 ms to tokenize,
        which the loop would spend with the GPU idle (llama.cpp's tokenizer runs without
        the GIL).  A prompt that cannot be prepared fails in its turn, as before."""
        waiting = _Waiting(request, on_done, on_token, time.monotonic())
        try:
            waiting.prompt = self.generator.prepare(request.payload.to_json())
        except Exception as exc:  # ThemisError: the caller's; anything else: a bug
            waiting.error = exc
        with self._lock:
            if self._closing:
                raise RuntimeError("engine is closed")
            self._waiting.append(waiting)
            self.stats.requests += 1
            self._wake.notify()

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)
            self._wake.notify()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=60)
        lc = self._lc
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)

    # -- statistics ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Figures for themis_stats(): counts, throughput, batch sizes, KV use, queueing."""
        with self._lock:
            st = self.stats
            cells = sum(s.n_past - (s.reused if s.shared else 0)
                        for s in self._active.values()) + len(self._prefix)
            kept = sum(len(self._held[i]) for i in self._free_ids)
            elapsed = max(time.monotonic() - st.started, 1e-9)
            bytes_per_token = self.generator.kv_bytes_per_token(self.kv_type)
            return {
                "engine": "continuous batching", "requests": st.requests,
                "finished": st.finished, "cancelled": st.cancelled, "failed": st.failed,
                "tokens_in": st.tokens_in, "tokens_out": st.tokens_out,
                "tokens_out_per_s": round(st.tokens_out / elapsed, 2),
                "mean_batch": round(st.sequences_stepped / st.steps, 2) if st.steps else 0.0,
                "steps": st.steps, "running": len(self._active), "queued": len(self._waiting),
                "mean_wait_ms": round(1000 * st.wait_s / max(st.finished + st.cancelled
                                                             + st.failed, 1), 2),
                "kv": {"cells": self.kv_cells, "in_use": cells, "kept": kept,
                       "type": self.kv_type,
                       "bytes_per_token": bytes_per_token,
                       "bytes": bytes_per_token * self.kv_cells},
                "prefix": {"tokens": len(self._prefix), "hits": st.prefix_hits,
                           "kept_hits": st.kept_hits,
                           "tokens_reused": st.prefix_tokens_reused},
                "prompt_s": round(st.prompt_s, 3), "generate_s": round(st.generate_s, 3),
                "admit_s": round(st.admit_s, 3), "sample_s": round(st.sample_s, 3),
                "loop_s": round(st.loop_s, 3)}

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while (not self._closing and not self._active and not self._waiting):
                        self._wake.wait()
                    if self._closing:
                        break
                started = time.perf_counter()
                decoded = self.stats.prompt_s + self.stats.generate_s
                self._reap_cancelled()
                self._admit()
                # less a learned prefix's llama_decode, which prompt_s has: the parts add up
                self.stats.admit_s += time.perf_counter() - started - (
                    self.stats.prompt_s + self.stats.generate_s - decoded)
                if self._active:
                    self._step()
                    self.stats.loop_s += time.perf_counter() - started
                else:
                    with self._lock:  # waiting requests that cannot be admitted yet
                        if not self._closing and not self._cancelled:
                            self._wake.wait(timeout=0.05)
        except Exception:
            log.exception("the batch engine's loop crashed; failing its requests")
            self._fail_all(crash=True)
            return
        self._fail_all(crash=False)

    def _fail_all(self, crash: bool) -> None:
        with self._lock:
            self._closing = True
            seqs = list(self._active.values())
            waiting = list(self._waiting)
            self._active.clear()
            self._waiting.clear()
        err = RuntimeError("the batch engine stopped") if crash else None
        for s in seqs:
            if s.sampler is not None:
                self._lc.llama_sampler_free(s.sampler)
            self._done(s.on_done, GenerationOutcome(s.request, crash=err, stopped=err is None))
        for w in waiting:
            self._done(w.on_done, GenerationOutcome(w.request, crash=err, stopped=err is None))

    @staticmethod
    def _done(on_done: OnDone, outcome: GenerationOutcome) -> None:
        try:
            on_done(outcome)
        except Exception:
            log.exception("on_done callback failed for request %d", outcome.request.id)

    def _reap_cancelled(self) -> None:
        with self._lock:
            ids = self._cancelled
            self._cancelled = set()
            gone_waiting = [w for w in self._waiting if w.request.id in ids]
            for w in gone_waiting:
                self._waiting.remove(w)
            seqs = [s for rid, s in self._active.items() if rid in ids]
        for w in gone_waiting:
            self.stats.cancelled += 1
            self._done(w.on_done, GenerationOutcome(w.request, stopped=True))
        for s in seqs:
            self._finish(s, stopped=True)

    def _promised(self) -> int:
        """Cells promised in the shared pool (split streams: nothing is shared)."""
        if not self.unified:
            return 0
        return sum(s.need for s in self._active.values()) + len(self._prefix)

    def _admit(self) -> None:
        """Waiting requests in order, while a sequence and their cells are free."""
        while True:
            with self._lock:
                if not self._waiting or not self._free_ids:
                    return
                w = self._waiting[0]
            if w.error is not None:
                with self._lock:
                    self._waiting.popleft()
                self.stats.failed += 1
                exc = w.error
                self._done(w.on_done, GenerationOutcome(w.request, error=exc)
                           if isinstance(exc, ThemisError) else
                           GenerationOutcome(w.request, crash=exc))
                continue
            prompt = w.prompt
            shared = self._reusable(prompt.tokens)
            # split streams: what the stream this request gets still holds of its last prompt
            kept = self._kept(self._free_ids[0], prompt.tokens, shared)
            reuse = kept or shared or self._learn_prefix(prompt.tokens)
            # a split stream holds the whole prompt, shared head included
            need = len(prompt.tokens) - (reuse if self.unified else 0) + prompt.max_tokens
            limit = self.kv_cells - len(self._prefix) if self.unified else \
                self.cells_per_sequence
            if need > limit:
                with self._lock:
                    self._waiting.popleft()
                self.stats.failed += 1
                self._done(w.on_done, GenerationOutcome(w.request, error=ContextOverflow(
                    f"the prompt ({len(prompt.tokens)} tokens) and max_tokens "
                    f"({prompt.max_tokens}) exceed the {limit} KV cells a sequence may hold",
                    hint="Shorten the prompt, lower max_tokens or raise THEMIS_KV_CELLS.")))
                continue
            if self._promised() + need > self.kv_cells:
                if not self._active and self._prefix:  # only the cached prefix is in the way
                    self._drop_prefix()
                    continue
                return  # wait, in order, until running sequences free their cells
            with self._lock:
                self._waiting.popleft()
                seq_id = heapq.heappop(self._free_ids)
            # only an admitted prompt: one that waits and is looked at again must not find
            # itself here and cache its own whole prompt as the prefix
            self._last_prompt = prompt.tokens
            seq = _Sequence(
                request=w.request, on_done=w.on_done, on_token=w.on_token, seq_id=seq_id,
                tokens=prompt.tokens, stop=prompt.stop, max_tokens=prompt.max_tokens,
                contexts_used=prompt.contexts_used, sampler=self._sampler(w.request, prompt),
                admitted=time.monotonic())
            tail = prompt.tokens[-PENALTY_LAST_N:]  # the penalty sees the prompt
            self._windows[seq_id].fill(-1)
            self._windows[seq_id, :len(tail)] = tail
            seq.window_at = len(tail)
            self.stats.wait_s += seq.admitted - w.queued
            self.stats.tokens_in += len(prompt.tokens)
            held, self._held[seq_id] = self._held[seq_id], []
            if kept:
                self._lc.llama_memory_seq_rm(self._mem, seq_id, kept, -1)
                seq.n_past = seq.reused = kept
                self.stats.kept_hits += 1
                self.stats.prefix_tokens_reused += kept
            else:
                if held:
                    self._lc.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
                if reuse:
                    self._share_prefix(seq, reuse)
            with self._lock:
                self._active[w.request.id] = seq

    def _kept(self, seq_id: int, tokens: list[int], shared: int) -> int:
        """Leading prompt tokens that ``seq_id``'s stream still holds from the last prompt it
        read, when they are at least ``prefix_min`` and at least the ``shared`` tokens the
        cached prefix would give.  Kept cells are used in place.  Sharing the cached prefix
        instead copies a whole stream (llama.cpp copies between streams only whole), and
        llama.cpp then reserves its worst-case graph again in the next ``llama_decode`` (a
        memory update): when calls arrive one at a time, as from a pool of clients, every
        admission paid for one (keeping cells: +3% on the H200, docs/benchmarks.md)."""
        if not self._keeps:
            return 0
        n = common_head(self._held[seq_id], tokens[:-1])
        return n if n >= self.prefix_min and n >= shared else 0

    @property
    def _keeps(self) -> bool:
        """Whether finished sequences keep their prompt cells (split streams only: in a
        unified pool kept cells would take cells other sequences were promised)."""
        return self.keep_prompts and not self.unified

    def _reusable(self, tokens: list[int]) -> int:
        """Leading prompt tokens the cached prefix holds (at least one token is evaluated)."""
        n = common_head(self._prefix, tokens[:-1])
        return n if n >= self.prefix_min else 0

    def _learn_prefix(self, tokens: list[int]) -> int:
        """At admission: when a prompt the cached prefix does not serve shares at least
        ``prefix_min`` leading tokens with the previous admitted prompt, evaluate that head
        once into the prefix sequence, and hand it to every admitted sequence that starts
        with it and has read nothing yet (so a burst of calls arriving together shares it
        too).  Returns how many of ``tokens`` the prefix now serves."""
        n = common_head(self._last_prompt, tokens[:-1])
        if n < self.prefix_min or n > self.cells_per_sequence:
            return 0
        self._drop_prefix()
        if self.unified and self._promised() + n > self.kv_cells:
            return 0  # the pool has no room for it now
        for start in range(0, n, self.n_batch):
            chunk = range(start, min(n, start + self.n_batch))
            for j, pos in enumerate(chunk):
                self._put(self._batch, j, tokens[pos], pos, self._prefix_seq, False)
            self._decode(len(chunk), reading=True, what=f"a {n}-token prefix")
        self._prefix = tokens[:n]
        log.info("prefix cache: %d shared prompt tokens", n)
        with self._lock:
            fresh = [s for s in self._active.values() if s.n_past == 0]
        for s in fresh:
            if reuse := self._reusable(s.tokens):
                self._share_prefix(s, reuse)
        return n

    def _share_prefix(self, seq: _Sequence, n: int) -> None:
        """The first ``n`` cells of the cached prefix become ``seq``'s first n."""
        self._copy_prefix(self._prefix_seq, seq.seq_id, n)
        seq.n_past = seq.reused = n
        seq.shared = True
        self.stats.prefix_hits += 1
        self.stats.prefix_tokens_reused += n

    def _copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Positions [0, n) of ``src`` into ``dst``.  Unified: the cells gain a sequence id
        (no copy).  Split streams copy a whole stream (llama.cpp copies between streams only
        whole), then cut the copy at n."""
        lc = self._lc
        if self.unified:
            lc.llama_memory_seq_cp(self._mem, src, dst, 0, n)
        else:
            lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            lc.llama_memory_seq_rm(self._mem, dst, n, -1)

    def _drop_prefix(self) -> None:
        """Forget the cached prefix; sequences that shared its cells now own them alone."""
        self._lc.llama_memory_seq_rm(self._mem, self._prefix_seq, -1, -1)
        self._prefix = []
        with self._lock:
            for s in self._active.values():
                s.shared = False

    def _sampler(self, request: GenerationRequest, prompt: Any) -> Any:
        """A llama.cpp sampler chain for a request at temperature > 0; None for a greedy one,
        which :func:`greedy_token` samples in NumPy (the same choice, without building a
        vocabulary-sized candidate array per token: on the GPU machine the chain cost more
        per token than the decode step itself at 16 sequences)."""
        lc = self._lc
        payload = request.payload
        if payload.temperature <= 0.0:
            return None
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, penalties_sampler(self._n_vocab))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(TOP_P, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(payload.temperature))
        seed = payload.seed if payload.seed is not None else self.generator.seed
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for token in prompt.tokens[-PENALTY_LAST_N:]:  # the penalty window sees the prompt
            lc.llama_sampler_accept(chain, token)
        return chain

    def _step(self) -> None:
        """One llama_decode over every sequence: a token each for the generating ones, prompt
        chunks for the reading ones, then one sampled token for each that got logits."""
        batch = self._batch
        with self._lock:
            seqs = sorted(self._active.values(), key=lambda s: s.admitted)
        generating = [s for s in seqs if not s.reading and s.last is not None]
        # Prompts fill what the generating sequences leave of the step's token budget, oldest
        # request first, in chunks of at most prefill_chunk tokens a step while others
        # generate, so that their next token is not held up by a whole prompt.
        budget = self.n_batch if not generating else min(
            self.n_batch, len(generating) + self.prefill_chunk)
        left = budget - len(generating)
        takes: dict[int, int] = {}
        for s in seqs:
            if left <= 0:
                break
            if s.reading:
                takes[s.seq_id] = min(len(s.tokens) - s.n_past, left)
                left -= takes[s.seq_id]
        if not generating and not takes:
            return
        # Tokens go in by sequence id: with split streams llama.cpp puts only a run of
        # consecutive ids into one micro-batch, so this order costs the fewest.
        n = 0
        sampled: list[tuple[_Sequence, int]] = []
        for s in sorted(generating + [x for x in seqs if x.seq_id in takes],
                        key=lambda x: x.seq_id):
            if s.seq_id not in takes:
                assert s.last is not None  # a generating sequence
                self._put(batch, n, s.last, s.n_past, s.seq_id, True)
                sampled.append((s, n))
                s.n_past += 1
                n += 1
                continue
            for pos in range(s.n_past, s.n_past + takes[s.seq_id]):
                last = pos == len(s.tokens) - 1
                self._put(batch, n, s.tokens[pos], pos, s.seq_id, last)
                if last:
                    sampled.append((s, n))
                n += 1
            s.n_past += takes[s.seq_id]
        self._decode(n, reading=bool(takes), what=f"{len(seqs)} sequences")
        self.stats.steps += 1
        self.stats.sequences_stepped += len(generating) + len(takes)
        started = time.perf_counter()
        self._sample_all(sampled)
        self.stats.sample_s += time.perf_counter() - started

    def _decode(self, n: int, *, reading: bool, what: str) -> None:
        """One llama_decode of the first ``n`` tokens of the batch, timed as prompt reading
        or generation."""
        self._batch.n_tokens = n
        started = time.perf_counter()
        rc = self._lc.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc} ({n} tokens, {what})")
        # llama_decode may return before the GPU is done (the logits are copied out
        # asynchronously); waiting here, as reading them would, times the step itself
        self._lc.llama_synchronize(self._ctx)
        took = time.perf_counter() - started
        if reading:
            self.stats.prompt_s += took
        else:
            self.stats.generate_s += took

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _sample_all(self, sampled: list[tuple[_Sequence, int]]) -> None:
        """One token for each sequence that got logits, in the order of the batch.  Greedy
        sequences are chosen together: their rows of the step's logits get the repeat
        penalty and one argmax, in NumPy, instead of a copy, a penalty and an argmax per
        sequence (34 us each on a 2-core VM, 2 ms a step at 64 sequences, while the GPU
        waits)."""
        if not sampled:
            return
        lc = self._lc
        # llama.h: the rows of the tokens that asked for logits, contiguous, in batch order
        logits = np.ctypeslib.as_array(lc.llama_get_logits(self._ctx),
                                       shape=(len(sampled), self._n_vocab))
        greedy = [k for k, (s, _) in enumerate(sampled) if s.sampler is None]
        # All greedy (the usual case): penalise llama.cpp's own output rows in place, nothing
        # reads them after this step.  Mixed: a copy of the greedy rows.
        scores = logits if len(greedy) == len(sampled) else logits[greedy]
        chosen: dict[int, tuple[int, np.ndarray]] = {}  # greedy k -> token, its scores
        if greedy:
            penalize_rows(scores, self._windows[[sampled[k][0].seq_id for k in greedy]])
            best = scores.argmax(axis=1).tolist()
            chosen = {k: (best[j], scores[j]) for j, k in enumerate(greedy)}
        for k, (s, i) in enumerate(sampled):
            if k in chosen:
                token, chosen_from = chosen[k]
            else:
                token = int(lc.llama_sampler_sample(s.sampler, self._ctx, i))
                lc.llama_sampler_accept(s.sampler, token)
                chosen_from = logits[k]
            self._accept(s, token, chosen_from)

    def _accept(self, s: _Sequence, token: int, scores: np.ndarray) -> None:
        """A sampled token joins its sequence: the stop checks, the stream, the end."""
        lc = self._lc
        if self.record_margins:  # the gap between the two best scores the choice was made on
            top2 = np.partition(scores, -2)[-2:]
            s.margins.append(float(abs(top2[1] - top2[0])))
        self._windows[s.seq_id, s.window_at % PENALTY_LAST_N] = token
        s.window_at += 1
        if s.first_token_at is None:
            s.first_token_at = time.monotonic()
        if lc.llama_vocab_is_eog(self._vocab, token) and not self.ignore_eog:
            self._finish(s)
            return
        s.generated.append(token)
        s.raw += self._piece(token)
        text = _valid_utf8(bytes(s.raw))
        for stop in s.stop:
            at = text.find(stop, max(0, s.shown - len(stop)))
            if at >= 0:
                self._emit(s, text[:at])
                self._finish(s, text=text[:at])
                return
        hold = max((len(x) for x in s.stop), default=1) - 1
        self._emit(s, text[:max(s.shown, len(text) - hold)])
        if len(s.generated) >= s.max_tokens:
            self._finish(s)
            return
        s.last = token

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._token_bytes(token)
        return piece

    def _token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    @staticmethod
    def _emit(s: _Sequence, text: str) -> None:
        if s.on_token is not None and len(text) > s.shown:
            try:
                s.on_token(text[s.shown:])
            except Exception:
                log.exception("on_token callback failed for request %d", s.request.id)
        s.shown = max(s.shown, len(text))

    def _finish(self, s: _Sequence, *, text: str | None = None, stopped: bool = False) -> None:
        lc = self._lc
        with self._lock:
            self._active.pop(s.request.id, None)
            heapq.heappush(self._free_ids, s.seq_id)
            self._wake.notify()
        # split streams keep the prompt's cells (a stream's cells are its own either way):
        # the next request in this stream that starts the same way reads only the rest
        keep = min(s.n_past, len(s.tokens)) if self._keeps else 0
        lc.llama_memory_seq_rm(self._mem, s.seq_id, keep, -1)
        self._held[s.seq_id] = s.tokens[:keep]
        if s.sampler is not None:
            lc.llama_sampler_free(s.sampler)
        if stopped:
            self.stats.cancelled += 1
            self._done(s.on_done, GenerationOutcome(s.request, stopped=True))
            return
        full = _valid_utf8(bytes(s.raw)) if text is None else text
        self._emit(s, full)
        if self.record_margins:
            self.traces[s.request.id] = (list(s.generated), list(s.margins))
        self.stats.finished += 1
        self.stats.tokens_out += len(s.generated)
        result = GenerationResult(
            answer=full.strip(), model=self.name, prompt_tokens=len(s.tokens),
            completion_tokens=len(s.generated), contexts_used=s.contexts_used,
            generate_ms=(time.monotonic() - s.admitted) * 1000)
        self._done(s.on_done, GenerationOutcome(s.request, result=result))


def penalties_sampler(n_vocab: int) -> Any:
    """llama.cpp's repeat-penalty sampler with the engine's settings (the window is the
    second argument: llama.h of the vendored llama.cpp still takes n_vocab first)."""
    import llama_cpp

    return llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, REPEAT_PENALTY,
                                                  0.0, 0.0)


def penalize_rows(logits: np.ndarray, windows: np.ndarray | Sequence[Iterable[int]],
                  penalty: float = REPEAT_PENALTY) -> None:
    """In place, what llama.cpp's repeat-penalty sampler does to row ``r`` of ``logits``
    given ``windows[r]``: each distinct token's logit is divided by ``penalty`` when
    positive and multiplied when not, in float32 as llama.cpp does.  ``windows``: a matrix
    of token ids, a row per row of logits and -1 where a window is shorter (the engine's
    form: one sort finds every row's distinct tokens), or an iterable of ids per row."""
    ids = np.sort(windows if isinstance(windows, np.ndarray) else _padded(windows), axis=1)
    first = ids >= 0  # each distinct id once: where it differs from the one before it
    first[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    rows, at = np.nonzero(first)
    if not rows.size:
        return
    cols = ids[rows, at]
    factor = np.float32(penalty)
    vals = logits[rows, cols]
    logits[rows, cols] = np.where(vals <= 0, vals * factor, vals / factor)


def _padded(windows: Sequence[Iterable[int]]) -> np.ndarray:
    """Windows of any lengths as the rows of a matrix, -1 after each one's end."""
    rows = [list(w) for w in windows]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=np.intp)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def penalized(logits: np.ndarray, window: Iterable[int],
              penalty: float = REPEAT_PENALTY) -> np.ndarray:
    """The scores llama.cpp's repeat-penalty sampler leaves for one vector of logits (a
    copy; ``logits`` is left as it is)."""
    scored = logits.copy()
    penalize_rows(scored[np.newaxis], [window], penalty)
    return scored


def greedy_token(logits: np.ndarray, window: Iterable[int]) -> int:
    """What llama.cpp's penalties + greedy chain picks: the first largest penalised score."""
    return int(np.argmax(penalized(logits, window)))


def common_head(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _valid_utf8(raw: bytes) -> str:
    """The longest prefix of ``raw`` that is whole UTF-8 characters (a token can end inside
    one); undecodable bytes elsewhere become U+FFFD."""
    for cut in range(len(raw), max(len(raw) - 4, -1), -1):
        try:
            return raw[:cut].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < cut - 4:
                return raw[:cut].decode("utf-8", errors="replace")
    return raw.decode("utf-8", errors="replace")
