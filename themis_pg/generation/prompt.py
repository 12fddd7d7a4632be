"""RAG prompt construction under a token budget (pure logic, no model needed).

The documents go into the user message, numbered, best first, followed by the question (the
layout that made the small default model give concrete steps rather than echo its sources).
When they do not all fit the context window beside the question and the answer's
``max_tokens``, the lowest-ranked ones are dropped and the last kept one is cut short; only a
question that cannot fit on its own is an error, since no retry could help it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ContextOverflow
from ..pl.payloads import Context  # one definition for the bus and the prompt

SYSTEM_PROMPT = (
    "You answer questions about internal documentation. Use only the documents given. Be "
    "concise and concrete: give the steps and commands."
)
NO_SOURCES = "(no documents matched)"
# Tokens the chat template adds around the messages (role markers, separators).
TEMPLATE_OVERHEAD = 48
MIN_USEFUL_SOURCE_TOKENS = 32
# Chat-template control markers (<|im_start|>, <|endoftext|>, <s>, [INST] ...): llama.cpp
# tokenizes the rendered prompt with special tokens enabled, so such text inside a document or
# a question would become real control tokens and could rewrite the conversation.
_CONTROL_MARKERS = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|<<\/?SYS>>")


def neutralize(text: str) -> str:
    """Caller- or document-supplied text with chat control markers removed."""
    return _CONTROL_MARKERS.sub("", text)


@dataclass(frozen=True)
class BuiltPrompt:
    """The messages, and the budget's estimate of their tokens (``TEMPLATE_OVERHEAD`` stands
    for the chat template); the exact count comes from llama.cpp when it evaluates them."""

    messages: list[dict[str, str]]
    prompt_tokens: int
    contexts_used: int


def contexts_from_payload(items: Sequence[dict[str, Any]]) -> list[Context]:
    return [Context(id=int(c["id"]), content=str(c["content"]), source=c.get("source"))
            for c in items]


def _source_block(number: int, ctx: Context, text: str) -> str:
    # No file names or paths: small models copy such labels into the answer.  The caller
    # gets the sources separately (themis_rag_json).
    return f"Document {number}:\n{neutralize(text).strip()}\n"


def build_rag_prompt(query: str, contexts: Sequence[Context], *, n_ctx: int, max_tokens: int,
                     count_tokens: Callable[[str], int],
                     truncate: Callable[[str, int], str]) -> BuiltPrompt:
    """Messages for a RAG answer that fit ``n_ctx`` with room for ``max_tokens``."""
    budget = n_ctx - max_tokens - TEMPLATE_OVERHEAD
    question = f"Question: {neutralize(query).strip()}\nAnswer:"
    fixed = count_tokens(SYSTEM_PROMPT) + count_tokens(question)
    if fixed > budget:
        raise ContextOverflow(
            f"the question needs {fixed} tokens; with max_tokens {max_tokens} it cannot fit "
            f"the model's context window of {n_ctx} tokens",
            hint="Shorten the question or lower max_tokens.")
    blocks: list[str] = []
    used = fixed
    for number, ctx in enumerate(contexts, start=1):
        block = _source_block(number, ctx, ctx.content)
        cost = count_tokens(block)
        if used + cost <= budget:
            blocks.append(block)
            used += cost
            continue
        room = budget - used - count_tokens(_source_block(number, ctx, ""))
        if room >= MIN_USEFUL_SOURCE_TOKENS:
            block = _source_block(number, ctx, truncate(ctx.content, room))
            blocks.append(block)
            used += count_tokens(block)
        break
    sources = "\n".join(blocks) if blocks else NO_SOURCES
    user = f"{sources}\n{question}"
    return BuiltPrompt(
        messages=[{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": user}],
        prompt_tokens=used + TEMPLATE_OVERHEAD,
        contexts_used=len(blocks),
    )


def build_raw_prompt(prompt: str, *, n_ctx: int, max_tokens: int,
                     count_tokens: Callable[[str], int]) -> BuiltPrompt:
    """A plain user prompt; too long for the window is a permanent error."""
    prompt = neutralize(prompt)
    tokens = count_tokens(prompt) + TEMPLATE_OVERHEAD
    if tokens + max_tokens > n_ctx:
        raise ContextOverflow(
            f"the prompt is {tokens} tokens; with max_tokens {max_tokens} it exceeds the "
            f"model's context window of {n_ctx} tokens",
            hint="Shorten the prompt or lower max_tokens.")
    return BuiltPrompt(messages=[{"role": "user", "content": prompt}], prompt_tokens=tokens,
                       contexts_used=0)
