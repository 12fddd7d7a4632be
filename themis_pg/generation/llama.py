"""Text generation with llama.cpp (llama-cpp-python), GGUF models memory-mapped.

One ``LlamaGenerator`` serves one request at a time.  The messages are rendered with the
model's own chat template (``tokenizer.chat_template`` in the GGUF metadata, through the
formatter llama-cpp-python builds from it; a GGUF without one gets llama-cpp-python's fallback,
the llama-2 format), tokenized as ``create_chat_completion`` tokenizes them, and completed with
``create_completion``, because only that call takes a stopping criterion.  The criterion
(:class:`_TokenMeter`) runs once per sampled token: it polls ``should_stop``, so a cancelled
request stops within one token.  The usage counts are llama-cpp-python's own:
``prompt_tokens`` is the number of prompt tokens evaluated, ``completion_tokens`` the number
of generated tokens in the answer (the end-of-generation token is not one of them).
Continuous batching across requests will replace the inner loop behind the same ``generate``
signature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..errors import ContextOverflow, InvalidInput, ModelNotFound
from .prompt import BuiltPrompt, build_rag_prompt, build_raw_prompt, contexts_from_payload

if TYPE_CHECKING:
    from llama_cpp import StoppingCriteria

log = logging.getLogger(__name__)

REPEAT_PENALTY = 1.1


@dataclass(frozen=True)
class GenerationResult:
    """One answer.  ``prompt_tokens`` and ``completion_tokens`` are llama.cpp's counts;
    ``stopped`` means ``should_stop`` ended the generation (the answer is incomplete)."""

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


@dataclass(frozen=True)
class PreparedPrompt:
    """A request ready for llama.cpp: the exact prompt tokens, the chat template's stop
    strings, the answer's token budget and how many retrieved contexts made it in."""

    tokens: list[int]
    stop: list[str]
    max_tokens: int
    contexts_used: int
    stopping_criteria: StoppingCriteria | None = None


@dataclass(frozen=True)
class RenderedPrompt:
    """Messages as llama.cpp sees them: the prompt tokens, and the chat template's stop
    strings and stopping criterion (if any)."""

    tokens: list[int]
    stop: list[str]
    stopping_criteria: StoppingCriteria | None


class _TokenMeter:
    """A llama-cpp-python stopping criterion: polls ``should_stop`` once per sampled token and
    keeps the answer within ``max_tokens``.

    What llama-cpp-python 0.3.36 does with it (``Llama.generate``, ``_create_completion``):
    after sampling token k (k = 1, 2, ...) and before yielding it, it calls the criterion with
    the evaluated tokens, the prompt plus tokens 1..k-1; True drops token k and ends the
    generation.  Once generation has ended, for whatever reason, it calls it once more with
    the same tokens as the last call; True there sets the completion text to the tokens kept
    (without it, a generation ended by a criterion would return no text), and would undo the
    cut at a stop string.  So that call returns what the last one did, without polling: a
    cancel that arrives after the last token does not discard a finished answer.

    ``max_tokens``: llama-cpp-python checks its own limit only after a token that completes a
    UTF-8 character, so without this check a multi-byte character cut by the limit would
    overrun it.
    """

    def __init__(self, max_tokens: int, should_stop: Callable[[], bool],
                 chained: StoppingCriteria | None = None) -> None:
        self.max_tokens = max_tokens
        self.should_stop = should_stop
        self.chained = chained  # the chat template's own criterion, if it has one
        self.prompt_tokens: int | None = None  # context length when token 1 was sampled
        self.sampled = 0  # tokens sampled so far, including one that was dropped
        self.cancelled = False
        self.halted = False
        self._last_len = -1

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        n = len(input_ids)
        if n == self._last_len:  # the call after generation ended
            return self.halted
        self._last_len = n
        if self.prompt_tokens is None:
            self.prompt_tokens = n
        self.sampled = n - self.prompt_tokens + 1
        if self.sampled > self.max_tokens:
            self.halted = True
        elif self.should_stop():
            self.halted = self.cancelled = True
        elif self.chained is not None and self.chained(input_ids, logits):
            self.halted = True
        return self.halted


class LlamaGenerator:
    """A loaded generation model and the prompt logic around it."""

    def __init__(self, path: Path, name: str, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_gpu_layers: int = -1, seed: int = 42, own_cells: int | None = None) -> None:
        """``n_ctx`` is the context window a prompt and its answer must fit.  ``own_cells``
        sizes this object's own llama.cpp context (default ``n_ctx``): a batch engine, which
        evaluates on a context of its own, passes a small one (tokenizing needs no cells)."""
        if not Path(path).is_file():
            raise ModelNotFound(f"generation model file {path} does not exist",
                                hint="Run `themis models fetch` or register another GGUF.")
        from llama_cpp import Llama  # heavy: imported only where a model is loaded
        from llama_cpp import llama_chat_format as chat_format

        self.name = name
        self.seed = seed
        cells = own_cells or n_ctx
        self._llm = Llama(model_path=str(path), n_ctx=cells, n_batch=min(512, cells),
                          n_threads=n_threads, n_gpu_layers=n_gpu_layers, seed=seed,
                          verbose=False)
        self.n_ctx = n_ctx if own_cells else self._llm.n_ctx()
        template = self._llm.metadata.get("tokenizer.chat_template")
        self._format: chat_format.ChatFormatter
        if template:
            # The formatter Llama.__init__ builds from the same metadata (token texts included).
            eos_id, bos_id = self._llm.token_eos(), self._llm.token_bos()
            vocab = self._llm._model
            self._format = chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=vocab.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=vocab.token_get_text(bos_id) if bos_id != -1 else "",
                stop_token_ids=[eos_id])
        else:
            log.warning("%s has no chat template in its GGUF metadata; using the llama-2 "
                        "format, as llama-cpp-python does", path)
            self._format = chat_format.format_llama2

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

    def render(self, messages: list[dict[str, str]]) -> RenderedPrompt:
        """``messages`` through the chat template, tokenized as ``create_chat_completion``
        tokenizes them: the exact tokens llama.cpp evaluates."""
        rendered = self._format(messages=messages)  # type: ignore[arg-type]
        tokens = self._llm.tokenize(rendered.prompt.encode("utf-8"),
                                    add_bos=not rendered.added_special, special=True)
        stop = rendered.stop
        return RenderedPrompt(tokens=tokens,
                              stop=[stop] if isinstance(stop, str) else list(stop or []),
                              stopping_criteria=rendered.stopping_criteria)

    def prepare(self, payload: dict[str, Any]) -> PreparedPrompt:
        """The prompt of a generation payload, rendered and tokenized exactly as llama.cpp
        will evaluate it.  Raises :class:`ContextOverflow` when the prompt and
        ``max_tokens`` do not fit the context window: first by :meth:`build_prompt`'s
        estimate, then by the exact count (llama-cpp-python would lower ``max_tokens``
        quietly)."""
        prompt = self.build_prompt(payload)
        max_tokens = int(payload["max_tokens"])
        rendered = self.render(prompt.messages)
        if len(rendered.tokens) + max_tokens > self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(rendered.tokens)} tokens; with max_tokens {max_tokens} it "
                f"exceeds the model's context window of {self.n_ctx} tokens",
                hint="Shorten the prompt or lower max_tokens.")
        return PreparedPrompt(rendered.tokens, rendered.stop, max_tokens,
                              prompt.contexts_used, rendered.stopping_criteria)

    @property
    def llama_model(self) -> Any:
        """The loaded llama.cpp model (weights memory-mapped once; a batch engine's context
        shares them)."""
        return self._llm.model

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary (benchmarks suppress them)."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        return [t for t in range(int(llama_cpp.llama_vocab_n_tokens(vocab)))
                if llama_cpp.llama_vocab_is_eog(vocab, t)]

    def kv_bytes_per_token(self, kv_type: str = "f16") -> int:
        """Bytes one KV cell takes over all layers (K and V)."""
        import llama_cpp

        from ..memory import KV_BYTES_PER_ELEMENT

        model = self._llm.model
        n_embd = int(llama_cpp.llama_model_n_embd(model))
        n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
        n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
        n_layer = int(llama_cpp.llama_model_n_layer(model))
        return int(n_layer * 2 * (n_embd // n_head) * n_head_kv * KV_BYTES_PER_ELEMENT[kv_type])

    def generate(self, payload: dict[str, Any],
                 should_stop: Callable[[], bool] = lambda: False) -> GenerationResult:
        """Answer one request; ``should_stop`` is polled once per sampled token.

        Raises :class:`ContextOverflow` when the prompt and ``max_tokens`` do not fit the
        context window: first by :meth:`build_prompt`'s estimate, then by the exact count of
        the rendered tokens (llama-cpp-python would otherwise lower ``max_tokens`` quietly).
        """
        from llama_cpp import StoppingCriteriaList

        started = time.perf_counter()
        prompt = self.prepare(payload)
        max_tokens = prompt.max_tokens
        meter = _TokenMeter(max_tokens, should_stop, prompt.stopping_criteria)
        # Evaluate every prompt from scratch: reusing the previous prompt's KV cache changes
        # the batch split, hence float rounding, hence greedy outputs.  Same input, same answer.
        self._llm.reset()  # type: ignore[no-untyped-call]
        completion = self._llm.create_completion(
            prompt=prompt.tokens,
            max_tokens=max_tokens,
            temperature=float(payload.get("temperature", 0.0)),
            seed=int(payload.get("seed", self.seed)),
            # Small models loop on the same sentence without it (1.1 measured best on the
            # sample corpus; 1.0 repeats, 1.2+ drifts from the sources).
            repeat_penalty=REPEAT_PENALTY,
            stop=prompt.stop,
            stopping_criteria=StoppingCriteriaList([meter]),
            stream=False,
        )
        assert isinstance(completion, dict), "create_completion(stream=False) returns a dict"
        usage = completion["usage"]
        return GenerationResult(
            answer=completion["choices"][0]["text"].strip(), model=self.name,
            prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
            contexts_used=prompt.contexts_used,
            generate_ms=(time.perf_counter() - started) * 1000, stopped=meter.cancelled)
