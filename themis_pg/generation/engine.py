"""The generation engine interface, and the engine that serves one request at a time.

The worker's generation lane only *admits* jobs: it asks the engine how many requests it can
take (``free_slots``), claims that many, ``submit``s them and finishes each job from the
``on_done`` callback; ``cancel`` stops one request.  A continuous-batching engine implements
the same four methods, so the lane does not change when one replaces ``SequentialEngine``.

Callbacks run on the engine's own thread: they must be quick and thread-safe (the lane's only
queue the outcome and wake the lane).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import ContextOverflow, InvalidInput, ThemisError
from ..pl.payloads import GeneratePayload
from .llama import GenerationResult, LlamaGenerator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    id: int  # the job id: unique among the requests an engine holds
    payload: GeneratePayload


@dataclass(frozen=True)
class GenerationOutcome:
    """Exactly one of: ``result`` (done), ``error`` (failed for a reason the caller should
    see), ``crash`` (a bug: internal error), or ``stopped`` (cancelled or shutting down)."""

    request: GenerationRequest
    result: GenerationResult | None = None
    error: ThemisError | None = None
    crash: BaseException | None = None
    stopped: bool = False


OnToken = Callable[[str], None]
OnDone = Callable[[GenerationOutcome], None]


class GenerationEngine(Protocol):
    name: str

    def free_slots(self) -> int:
        """How many more requests ``submit`` accepts now."""
        ...

    def submit(self, request: GenerationRequest, on_done: OnDone,
               on_token: OnToken | None = None) -> None: ...

    def cancel(self, request_id: int) -> None:
        """Stop a request soon (within one token); its ``on_done`` reports ``stopped``."""
        ...

    def close(self) -> None:
        """Stop everything (running requests report ``stopped``) and end the engine."""
        ...


class SequentialEngine:
    """One request at a time on one ``LlamaGenerator``, in a thread of its own."""

    def __init__(self, generator: LlamaGenerator) -> None:
        self.generator = generator
        self.name = generator.name
        self._queue: queue.SimpleQueue[tuple[GenerationRequest, OnDone, OnToken | None] | None]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._held: set[int] = set()       # submitted, not yet done
        self._cancelled: set[int] = set()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-sequential", daemon=True)
        self._thread.start()

    def free_slots(self) -> int:
        with self._lock:
            return 0 if self._held or self._closing.is_set() else 1

    def submit(self, request: GenerationRequest, on_done: OnDone,
               on_token: OnToken | None = None) -> None:
        with self._lock:
            if self._closing.is_set():
                raise RuntimeError("engine is closed")
            self._held.add(request.id)
        self._queue.put((request, on_done, on_token))

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if request_id in self._held:
                self._cancelled.add(request_id)

    def close(self) -> None:
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _should_stop(self, request_id: int) -> bool:
        with self._lock:
            return request_id in self._cancelled or self._closing.is_set()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            request, on_done, _on_token = item
            outcome = self._generate(request)
            with self._lock:
                self._held.discard(request.id)
                self._cancelled.discard(request.id)
            try:
                on_done(outcome)
            except Exception:
                log.exception("on_done callback failed for request %d", request.id)

    def _generate(self, request: GenerationRequest) -> GenerationOutcome:
        if self._should_stop(request.id):
            return GenerationOutcome(request, stopped=True)
        if request.payload.adapters:
            return GenerationOutcome(request, error=InvalidInput(
                "this worker's sequential engine does not apply LoRA adapters",
                hint="Run the worker with THEMIS_ENGINE=batch (the default)."))
        try:
            result = self.generator.generate(request.payload.to_json(),
                                             should_stop=lambda: self._should_stop(request.id))
        except ThemisError as exc:
            return GenerationOutcome(request, error=exc)
        except ValueError as exc:  # llama.cpp's own context-window check
            if "context" in str(exc):
                return GenerationOutcome(request, error=ContextOverflow(str(exc)))
            return GenerationOutcome(request, crash=exc)
        except Exception as exc:
            return GenerationOutcome(request, crash=exc)
        if result.stopped:
            return GenerationOutcome(request, stopped=True)
        return GenerationOutcome(request, result=result)
