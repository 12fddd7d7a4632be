"""Sentence embeddings with llama.cpp: one model, many texts per forward pass.

Why not ``Llama.embed``: it truncates a long input by cutting the token list, which drops the
closing ``[SEP]`` a BERT model was trained to see, and it copies every vector through Python
lists.  :class:`Embedder` tokenizes with the model's own tokenizer, truncates to the window
while keeping the closing special tokens, packs as many sequences as fit into one batch
(one ``llama_decode`` call each) and reads the pooled vectors straight into NumPy.

Non-causal models (BERT) attend over the whole batch at once, so the physical batch
(``n_ubatch``) must hold every token of the logical batch (``n_batch``); both are set to
``n_ctx``, and a single text may use at most ``min(n_ctx, n_ctx_train)`` tokens.

An :class:`Embedder` is not meant to be shared between threads; calls are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import llama_cpp
import numpy as np
import numpy.typing as npt

from themis_pg.errors import ModelNotFound
from themis_pg.memory import gpu_offload

__all__ = ["Embedder", "EmbedderPool"]

log = logging.getLogger(__name__)


class _Closes:
    """``with`` support for what holds llama.cpp memory: ``close`` at the block's end."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Embedder(_Closes):
    """A GGUF embedding model loaded in llama.cpp; vectors are float32 and L2-normalised."""

    def __init__(
        self,
        path: Path,
        name: str,
        *,
        n_threads: int | None = None,
        n_ctx: int = 512,
        n_gpu_layers: int = 0,
        flash_attn: bool | None = None,
    ) -> None:
        """Load the model at ``path``; raise :class:`ModelNotFound` if it is missing or
        llama.cpp cannot load it.  ``n_ctx`` is the token budget of one forward pass.
        ``flash_attn`` (THEMIS_EMBEDDING_FLASH_ATTN; None: on where the model runs on the
        CPU) made ingest 1.7x faster on 2 CPU cores and 4.8x slower on an H200, at cosine
        1.0000 to the vectors without it (bench/ingest_rate.py, 2026-12-02)."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFound(
                f"embedding model {name!r}: file {path} does not exist",
                hint="run `themis models fetch` or re-register the model with its current path",
            )
        if n_ctx < 8:
            raise ValueError(f"n_ctx must be at least 8, not {n_ctx}")
        self._name = name
        self._path = path
        self._lock = threading.Lock()

        if flash_attn is None:
            flash_attn = not gpu_offload(n_gpu_layers)

        def load(pooling: int) -> llama_cpp.Llama:
            return self._load(path, n_threads, n_ctx, n_gpu_layers, pooling, flash_attn)

        self._llm = load(llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)
        if llama_cpp.llama_pooling_type(self._llm.ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            # The GGUF names no pooling: fall back to mean pooling, as sentence-transformers does.
            log.debug("%s declares no pooling type; using mean pooling", path)
            self._llm.close()
            self._llm = load(llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        self._dim = int(self._llm.n_embd())
        self._n_batch = int(self._llm.n_batch)
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._llm.model))
        self._max_tokens = min(self._n_batch, n_ctx_train) if n_ctx_train > 0 else self._n_batch
        self._n_seq_max = max(1, int(self._llm.context_params.n_seq_max))
        # Tokens the tokenizer appends after the text (BERT: [SEP]); kept when truncating.
        empty = self._tokenize("")
        bos = int(self._llm.token_bos())
        self._tail: list[int] = empty[1:] if empty and empty[0] == bos else empty
        self._batch: Any = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._fill = _BatchArrays(self._batch, self._n_batch)
        self._closed = False

    @staticmethod
    def _load(
        path: Path, n_threads: int | None, n_ctx: int, n_gpu_layers: int, pooling: int,
        flash_attn: bool,
    ) -> llama_cpp.Llama:
        try:
            return llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers,
                pooling_type=pooling,
                flash_attn=flash_attn,
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise ModelNotFound(f"llama.cpp cannot load embedding model {path}: {exc}") from exc

    @property
    def name(self) -> str:
        """Registered name of the model (what ``themis.corpus.embedding_model`` records)."""
        return self._name

    @property
    def dim(self) -> int:
        """Length of every embedding vector."""
        return self._dim

    @property
    def max_tokens(self) -> int:
        """Most tokens (special tokens included) one text contributes; longer ones are cut."""
        return self._max_tokens

    def _tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def count_tokens(self, text: str) -> int:
        """Tokens the model would see for ``text``, special tokens included, before truncation."""
        return len(self._tokenize(text))

    def _truncate(self, tokens: list[int]) -> list[int]:
        if len(tokens) <= self._max_tokens:
            return tokens
        tail = self._tail if tokens[len(tokens) - len(self._tail) :] == self._tail else []
        log.debug("truncating a %d-token text to %d tokens", len(tokens), self._max_tokens)
        return tokens[: self._max_tokens - len(tail)] + tail

    def _decode(self, group: list[list[int]], out: npt.NDArray[np.float32]) -> None:
        """One forward pass over ``group`` (one sequence id each); pooled rows into ``out``."""
        self._fill.load(group)
        ctx = self._llm.ctx
        memory = llama_cpp.llama_get_memory(ctx)
        if memory:  # causal embedding models keep a KV cache; BERT has none
            llama_cpp.llama_memory_clear(memory, True)
        rc = llama_cpp.llama_decode(ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc} for model {self._name}")
        for seq_id in range(len(group)):
            ptr = llama_cpp.llama_get_embeddings_seq(ctx, seq_id)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no pooled embedding for {self._name}")
            row = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float))
            out[seq_id] = np.ctypeslib.as_array(row, shape=(self._dim,))

    def _timed_decode(self, group: list[list[int]], out: npt.NDArray[np.float32]) -> float:
        started = time.perf_counter()
        self._decode(group, out)
        return time.perf_counter() - started

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed ``texts``: float32 array of shape ``(len(texts), dim)``, rows of unit length.

        Texts longer than :attr:`max_tokens` are truncated (logged at debug level).
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a single string")
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        if not texts:
            return out
        with self._lock:
            if self._closed:
                raise RuntimeError(f"embedder {self._name} is closed")
            started = time.perf_counter()
            decoding = 0.0
            group: list[list[int]] = []
            group_rows: list[int] = []
            used = total = 0
            for row, text in enumerate(texts):
                tokens = self._truncate(self._tokenize(text))
                total += len(tokens)
                if group and (used + len(tokens) > self._n_batch or len(group) >= self._n_seq_max):
                    decoding += self._timed_decode(group, out[group_rows[0] : group_rows[-1] + 1])
                    group, group_rows, used = [], [], 0
                group.append(tokens)
                group_rows.append(row)
                used += len(tokens)
            decoding += self._timed_decode(group, out[group_rows[0] : group_rows[-1] + 1])
            if log.isEnabledFor(logging.DEBUG):
                log.debug("embedded %d texts (%d tokens): %.2f ms, of which llama_decode and "
                          "the read-out %.2f ms", len(texts), total,
                          (time.perf_counter() - started) * 1000, decoding * 1000)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def close(self) -> None:
        """Free the model and its buffers; the embedder cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._fill.release()
            llama_cpp.llama_batch_free(self._batch)
            self._llm.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"Embedder(name={self._name!r}, path={str(self._path)!r}, dim={self._dim})"


class EmbedderPool(_Closes):
    """Several embedders of one model, each a llama.cpp context of its own, that embed the
    shares of one call on as many threads (``llama_decode`` runs without the GIL).

    Why: on a GPU one embedding pass is host work (graph, launches, the attention mask), not
    GPU work, so one context leaves the GPU mostly idle. On the H200 a pool of 8 embedded
    2,701 chunks/s against 752 for one embedder, with the same vectors
    (bench/ingest_rate.py --parallel, 2026-12-03).
    Each context holds its own copy of the model's weights (about 45 MB for
    all-MiniLM-L6-v2). On a CPU, one context already uses every core, so ingest uses one
    there (``embedders_for``)."""

    def __init__(self, embedders: Sequence[Embedder]) -> None:
        if not embedders:
            raise ValueError("an EmbedderPool needs at least one embedder")
        self._embedders = list(embedders)
        self._threads = ThreadPoolExecutor(len(self._embedders), thread_name_prefix="embed") \
            if len(self._embedders) > 1 else None

    @property
    def size(self) -> int:
        """How many embedders share a call."""
        return len(self._embedders)

    @property
    def name(self) -> str:
        return self._embedders[0].name

    @property
    def dim(self) -> int:
        return self._embedders[0].dim

    @property
    def max_tokens(self) -> int:
        return self._embedders[0].max_tokens

    def count_tokens(self, text: str) -> int:
        return self._embedders[0].count_tokens(text)

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """As :meth:`Embedder.embed`: ``texts`` cut into one contiguous share per embedder,
        the rows back in order."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a single string")
        if self._threads is None or len(texts) < 2:
            return self._embedders[0].embed(texts)
        step = -(-len(texts) // len(self._embedders))
        shares = [texts[i : i + step] for i in range(0, len(texts), step)]
        futures = [self._threads.submit(e.embed, share)
                   for e, share in zip(self._embedders, shares, strict=False)]
        return np.concatenate([f.result() for f in futures])

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
        for embedder in self._embedders:
            embedder.close()


def embedders_for(setting: int, n_gpu_layers: int) -> int:
    """How many embedders ingest runs: the setting, else 8 where the model is offloaded to
    a GPU (the H200's best measured; 4 gave 2,055 chunks/s, 2 gave 1,217) and 1 on a CPU."""
    if setting > 0:
        return setting
    return 8 if gpu_offload(n_gpu_layers) else 1


class _BatchArrays:
    """NumPy views of a ``llama_batch``'s arrays, so a pass is filled with a few array writes
    instead of five ctypes stores per token (0.6 ms for 500 tokens on a 2-core VM).

    ``seq_id`` is an array of per-token pointers, each to its own small allocation; they are
    pointed into one buffer owned here (one sequence id per token), and put back by
    :meth:`release` before ``llama_batch_free`` frees the originals."""

    def __init__(self, batch: Any, size: int) -> None:
        self._batch = batch
        self.token = np.ctypeslib.as_array(batch.token, shape=(size,))
        self.pos = np.ctypeslib.as_array(batch.pos, shape=(size,))
        self.n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(size,))
        self.logits = np.ctypeslib.as_array(batch.logits, shape=(size,))
        self.seq = np.zeros(size, np.int32)
        # the pointer array as addresses (a view: writes go through)
        self._pointers = np.ctypeslib.as_array(
            ctypes.cast(batch.seq_id, ctypes.POINTER(ctypes.c_size_t)), shape=(size,))
        self._original = self._pointers.copy()
        self._pointers[:] = self.seq.ctypes.data + 4 * np.arange(size, dtype=np.uint64)
        self.n_seq_id[:] = 1
        self.logits[:] = 1

    def load(self, group: list[list[int]]) -> None:
        """Sequence ``i`` of ``group`` gets id ``i``, positions from 0; every token's output
        is kept (pooling reads them)."""
        lengths = [len(t) for t in group]
        n = sum(lengths)
        self.token[:n] = np.fromiter(itertools.chain.from_iterable(group), np.int32, n)
        self.seq[:n] = np.repeat(np.arange(len(group), dtype=np.int32), lengths)
        starts = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
        self.pos[:n] = np.arange(n, dtype=np.int32) - starts
        self._batch.n_tokens = n

    def release(self) -> None:
        self._pointers[:] = self._original
