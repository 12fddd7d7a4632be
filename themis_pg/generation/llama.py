"""Text generation with llama.cpp (llama-cpp-python), GGUF models memory-mapped.

One ``LlamaGenerator`` serves one request at a time through the model's own chat template
(read from the GGUF metadata).  Tokens are streamed so that a cancelled request stops within
one token.  Continuous batching across requests will replace the inner loop behind the same
``generate`` signature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInput, ModelNotFound
from .prompt import BuiltPrompt, build_rag_prompt, build_raw_prompt, contexts_from_payload

log = logging.getLogger(__name__)

REPEAT_PENALTY = 1.1


@dataclass(frozen=True)
class GenerationResult:
    answer: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    contexts_used: int
    generate_ms: float
    stopped: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"answer": self.answer, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "contexts_used": self.contexts_used,
                "generate_ms": round(self.generate_ms, 3)}


class LlamaGenerator:
    """A loaded generation model and the prompt logic around it."""

    def __init__(self, path: Path, name: str, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_gpu_layers: int = -1, seed: int = 42) -> None:
        if not Path(path).is_file():
            raise ModelNotFound(f"generation model file {path} does not exist",
                                hint="Run `themis models fetch` or register another GGUF.")
        from llama_cpp import Llama  # heavy: imported only where a model is loaded

        self.name = name
        self.seed = seed
        self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                          n_gpu_layers=n_gpu_layers, seed=seed, verbose=False)
        self.n_ctx = self._llm.n_ctx()

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def truncate(self, text: str, max_tokens: int) -> str:
        tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(tokens) <= max_tokens:
            return text
        return self._llm.detokenize(tokens[:max_tokens]).decode("utf-8", errors="ignore")

    def build_prompt(self, payload: dict[str, Any]) -> BuiltPrompt:
        max_tokens = int(payload["max_tokens"])
        mode = payload.get("mode", "rag")
        if mode == "rag":
            return build_rag_prompt(
                str(payload["query"]), contexts_from_payload(payload.get("contexts", [])),
                n_ctx=self.n_ctx, max_tokens=max_tokens, count_tokens=self.count_tokens,
                truncate=self.truncate)
        if mode == "raw":
            return build_raw_prompt(str(payload["prompt"]), n_ctx=self.n_ctx,
                                    max_tokens=max_tokens, count_tokens=self.count_tokens)
        raise InvalidInput(f"unknown generation mode {mode!r}")

    def generate(self, payload: dict[str, Any],
                 should_stop: Callable[[], bool] = lambda: False) -> GenerationResult:
        """Answer one request; ``should_stop`` is polled between tokens."""
        started = time.perf_counter()
        prompt = self.build_prompt(payload)
        pieces: list[str] = []
        completion_tokens = 0
        stopped = False
        # Evaluate every prompt from scratch: reusing the previous prompt's KV cache changes
        # the batch split, hence float rounding, hence greedy outputs.  Same input, same answer.
        self._llm.reset()  # type: ignore[no-untyped-call]
        stream = self._llm.create_chat_completion(
            messages=prompt.messages,  # type: ignore[arg-type]
            max_tokens=int(payload["max_tokens"]),
            temperature=float(payload.get("temperature", 0.0)),
            seed=int(payload.get("seed", self.seed)),
            # Small models loop on the same sentence without it (1.1 measured best on the
            # sample corpus; 1.0 repeats, 1.2+ drifts from the sources).
            repeat_penalty=REPEAT_PENALTY,
            stream=True,
        )
        for chunk in stream:
            delta = chunk["choices"][0]["delta"]  # type: ignore[index]
            text = delta.get("content")  # type: ignore[union-attr]
            if isinstance(text, str) and text:
                pieces.append(text)
                completion_tokens += 1
            if should_stop():
                stopped = True
                break
        return GenerationResult(
            answer="".join(pieces).strip(), model=self.name,
            prompt_tokens=prompt.prompt_tokens, completion_tokens=completion_tokens,
            contexts_used=prompt.contexts_used,
            generate_ms=(time.perf_counter() - started) * 1000, stopped=stopped)
