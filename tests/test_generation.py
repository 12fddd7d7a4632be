"""LlamaGenerator's usage counts are llama.cpp's, and should_stop is polled once per token.

The default SmolLM2 model at temperature 0 (greedy, so every run samples the same tokens).
Ground truth for the token counts is an independent loop over ``Llama.generate``, the token
generator under every llama-cpp-python completion call: the same prompt tokens and sampler
settings, counting tokens until the end-of-generation token.  Re-tokenizing the answer would
not be exact: a token sequence detokenized and tokenized again need not come back the same
(merges differ at word boundaries, and the answer is stripped).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import llama_cpp
import numpy as np
import pytest

from themis_pg.errors import ContextOverflow
from themis_pg.generation.llama import REPEAT_PENALTY, LlamaGenerator, _TokenMeter
from themis_pg.generation.prompt import BuiltPrompt
from themis_pg.models import LocalModel

from .helpers import LONG_PROMPT, TLS

N_CTX = 2048
SEED = 42


@pytest.fixture(scope="module")
def generator(default_models: list[LocalModel]) -> Iterator[LlamaGenerator]:
    gen = next(m for m in default_models if m.kind == "generation")
    g = LlamaGenerator(gen.path, gen.name, n_ctx=N_CTX, seed=SEED)
    yield g
    g._llm.close()


def raw(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"mode": "raw", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}


def rag(max_tokens: int) -> dict[str, Any]:
    contexts = [
        {"id": 1, "content": "To rotate TLS keys, run `svc-ctl tls rotate`, then reload the "
                             "proxy with `svc-ctl proxy reload`.", "source": "tls.md"},
        {"id": 2, "content": "Certificates expire after 90 days.", "source": "certs.md"},
    ]
    return {"mode": "rag", "query": TLS, "contexts": contexts, "max_tokens": max_tokens,
            "temperature": 0.0}


def reference_tokens(g: LlamaGenerator, prompt: list[int], max_tokens: int) -> list[int]:
    """The completion's tokens, from llama-cpp-python's token generator directly."""
    llm = g._llm
    llm.reset()
    llm.set_seed(SEED)
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=REPEAT_PENALTY, top_k=40,
                              top_p=0.95, min_p=0.05):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        out.append(token)
        if len(out) >= max_tokens:
            break
    return out


@pytest.mark.parametrize("payload", [raw("What is the capital of France? One word.", 64),
                                     rag(96)], ids=["raw", "rag"])
def test_usage_counts_the_tokens_llama_cpp_produced(generator: LlamaGenerator,
                                                    payload: dict[str, Any]) -> None:
    res = generator.generate(payload)
    assert not res.stopped
    # prompt_tokens: exactly the tokens evaluated before the first sample
    messages = generator.build_prompt(payload).messages
    prompt = generator.render(messages).tokens
    assert res.prompt_tokens == len(prompt)
    # The run stopped on end-of-generation, which is sampled but never evaluated: the
    # context holds the prompt and every completion token, and nothing else.
    assert generator._llm.n_tokens == res.prompt_tokens + res.completion_tokens
    assert list(generator._llm.input_ids[: len(prompt)]) == prompt

    expected = reference_tokens(generator, prompt, int(payload["max_tokens"]))
    assert len(expected) < int(payload["max_tokens"]), "expected an answer that ends by itself"
    assert res.completion_tokens == len(expected)
    assert res.answer == generator._llm.detokenize(expected).decode("utf-8").strip()

    # ... and the same as llama-cpp-python's own chat completion reports for these messages
    generator._llm.reset()
    chat = generator._llm.create_chat_completion(
        messages=messages,
        max_tokens=int(payload["max_tokens"]), temperature=0.0, seed=SEED,
        repeat_penalty=REPEAT_PENALTY)
    assert isinstance(chat, dict)
    assert chat["usage"]["prompt_tokens"] == res.prompt_tokens
    assert chat["usage"]["completion_tokens"] == res.completion_tokens
    assert (chat["choices"][0]["message"]["content"] or "").strip() == res.answer


def test_max_tokens_are_reported_exactly(generator: LlamaGenerator) -> None:
    n = 24
    res = generator.generate(raw(LONG_PROMPT, n))
    assert not res.stopped
    assert res.completion_tokens == n
    prompt = generator.render(generator.build_prompt(raw(LONG_PROMPT, n)).messages).tokens
    assert res.prompt_tokens == len(prompt)
    # the n-th token was sampled, returned, and not evaluated
    assert generator._llm.n_tokens == res.prompt_tokens + n - 1
    expected = reference_tokens(generator, prompt, n)
    assert len(expected) == n
    assert res.answer == generator._llm.detokenize(expected).decode("utf-8").strip()


def test_should_stop_is_polled_once_per_token(generator: LlamaGenerator) -> None:
    polls = 0
    allowed = 5

    def stop() -> bool:
        nonlocal polls
        polls += 1
        return polls > allowed

    res = generator.generate(raw(LONG_PROMPT, 64), should_stop=stop)
    assert res.stopped
    # polls 1..5 let tokens 1..5 through; poll 6 dropped token 6 and ended the generation
    assert polls == allowed + 1
    assert res.completion_tokens == allowed
    full = generator.generate(raw(LONG_PROMPT, allowed))
    assert res.answer == full.answer and not full.stopped


def test_a_late_stop_does_not_discard_a_finished_answer(generator: LlamaGenerator) -> None:
    polls = 0

    def stop() -> bool:
        nonlocal polls
        polls += 1
        return polls > 8  # only after the 8 tokens allowed have been produced

    res = generator.generate(raw(LONG_PROMPT, 8), should_stop=stop)
    assert polls == 8 and not res.stopped and res.completion_tokens == 8


def test_exact_prompt_length_is_checked_against_the_window(
    generator: LlamaGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An estimate that let a prompt through does not make llama.cpp shorten the answer."""
    long = BuiltPrompt(messages=[{"role": "user", "content": "word " * (N_CTX - 20)}],
                       prompt_tokens=0, contexts_used=0)
    monkeypatch.setattr(generator, "build_prompt", lambda payload: long)
    with pytest.raises(ContextOverflow, match="context window of 2048") as overflow:
        generator.generate(raw("ignored", 64))
    assert overflow.value.sqlstate == "54000"


# ---- the stopping criterion on its own, with the call sequence llama-cpp-python makes ----------


def _ids(n: int) -> np.ndarray[Any, np.dtype[np.intc]]:
    return np.zeros(n, dtype=np.intc)


_LOGITS = np.zeros(4, dtype=np.single)


def test_meter_counts_from_the_context_length() -> None:
    meter = _TokenMeter(max_tokens=3, should_stop=lambda: False)
    # token k is sampled with the prompt (10 tokens) and tokens 1..k-1 evaluated
    assert [meter(_ids(10 + k - 1), _LOGITS) for k in (1, 2, 3)] == [False] * 3
    assert meter.prompt_tokens == 10 and meter.sampled == 3
    # after the loop llama-cpp-python calls once more with the last call's tokens
    assert meter(_ids(12), _LOGITS) is False and meter.sampled == 3


def test_meter_holds_max_tokens_when_llama_cpp_would_overrun() -> None:
    # llama-cpp-python skips its length check while a UTF-8 character is incomplete
    meter = _TokenMeter(max_tokens=2, should_stop=lambda: False)
    assert meter(_ids(5), _LOGITS) is False
    assert meter(_ids(6), _LOGITS) is False
    assert meter(_ids(7), _LOGITS) is True  # a third token: dropped
    assert meter(_ids(7), _LOGITS) is True  # the call after the loop keeps the text
    assert not meter.cancelled


def test_meter_chains_the_templates_criterion() -> None:
    seen: list[int] = []

    def template_stop(input_ids: Any, logits: Any) -> bool:
        seen.append(len(input_ids))
        return len(input_ids) == 6

    meter = _TokenMeter(max_tokens=10, should_stop=lambda: False, chained=template_stop)
    assert meter(_ids(5), _LOGITS) is False
    assert meter(_ids(6), _LOGITS) is True
    assert meter(_ids(6), _LOGITS) is True
    assert seen == [5, 6] and not meter.cancelled
