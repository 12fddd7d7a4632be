"""Typed job payloads: what the worker accepts, and the caps it applies again."""

from __future__ import annotations

import pytest

from themis_pg.pl.payloads import (
    Context,
    EmbedPayload,
    GeneratePayload,
    Limits,
    PayloadError,
    SearchCursor,
    SearchPayload,
    parse,
)

LIMITS = Limits()


def test_round_trip_of_every_kind():
    search = SearchPayload("q", 3, 20, SearchCursor(0.5, (1, 2)), "AAAA")
    assert parse("search", search.to_json(), LIMITS) == search
    embed = EmbedPayload("text")
    assert parse("embed", embed.to_json(), LIMITS) == embed
    gen = GeneratePayload("rag", 16, 0.2, query="q", contexts=(Context(1, "c", "s.md"),),
                          seed=7)
    assert parse("generate", gen.to_json(), LIMITS) == gen
    raw = GeneratePayload("raw", 8, prompt="p")
    assert parse("generate", raw.to_json(), LIMITS) == raw


@pytest.mark.parametrize(("kind", "payload", "state", "words"), [
    ("search", {"query": "q", "k": 3, "n": 10_000_000}, "22023", "n must be between 3 and 100000"),
    ("search", {"query": "q", "k": 101, "n": 200}, "22023", "k must be between 1 and 100"),
    ("search", {"query": "q", "k": 3, "n": 2}, "22023", "n must be between 3"),
    ("search", {"query": "q", "k": True, "n": 5}, "22023", "integer 'k'"),
    ("search", {"query": "x" * 4001, "k": 1, "n": 1}, "54000", "the limit is 4000"),
    ("search", {"query": "q", "k": 1, "n": 1, "cursor": {"score": "x"}}, "22023", "number"),
    ("search", {"query": "q", "k": 1, "n": 1, "vector_b64": 5}, "22023", "vector_b64"),
    ("embed", {"text": ""}, "22023", "non-empty text 'text'"),
    ("generate", {"mode": "raw", "prompt": "p", "max_tokens": 5000}, "22023", "max_tokens"),
    ("generate", {"mode": "raw", "prompt": "p", "max_tokens": 5, "temperature": 3},
     "22023", "temperature"),
    ("generate", {"mode": "rag", "query": "q", "max_tokens": 5,
                  "contexts": [{"id": 1, "content": "x" * 16001}]}, "54000", "limit is 16000"),
    ("generate", {"mode": "rag", "query": "q", "max_tokens": 5,
                  "contexts": [{"id": i, "content": "c"} for i in range(101)]},
     "22023", "at most 100"),
    ("generate", {"mode": "evil", "max_tokens": 5}, "22023", "unknown generation mode"),
    ("evil", {}, "22023", "unknown job kind"),
    ("search", ["not", "an", "object"], "22023", "JSON object"),
])
def test_bad_payloads_are_refused_with_the_reason(kind, payload, state, words):
    with pytest.raises(PayloadError) as info:
        parse(kind, payload, LIMITS)
    assert info.value.sqlstate == state
    assert words in info.value.message


def test_limits_follow_themis_config():
    limits = Limits.from_config({"max_candidates": 50, "max_k": "7", "unrelated": 1})
    assert (limits.max_candidates, limits.max_k) == (50, 7)
    with pytest.raises(PayloadError, match="between 1 and 50"):
        parse("search", {"query": "q", "k": 1, "n": 51}, limits)
