"""The continuous-batching engine on the real default model (CPU): sequences never mix, a
cancel ends one sequence without touching the others, the KV pool admits in order and never
fails a request for lack of cells, the shared prompt head is reused, pieces stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from themis_pg.errors import ContextOverflow
from themis_pg.generation.batching import BatchEngine, _valid_utf8, common_head
from themis_pg.generation.engine import GenerationOutcome, GenerationRequest
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.pl.payloads import GeneratePayload

from .helpers import same_or_near_tie

PROMPTS = [
    "Write one sentence about the sea.",
    "List three colors.",
    "What is 2+2? Answer briefly.",
    "Name a famous scientist and say why.",
    "Describe a cat in a few words.",
]


@pytest.fixture(scope="module")
def generator(default_models: list[Any]) -> Iterator[LlamaGenerator]:
    gen = next(m for m in default_models if m.kind == "generation")
    yield LlamaGenerator(gen.path, gen.name, n_ctx=1024, own_cells=256)


def _engine(generator: LlamaGenerator, **kw: Any) -> BatchEngine:
    kw.setdefault("max_sequences", 8)
    kw.setdefault("kv_cells", 4096)
    return BatchEngine(generator, record_margins=True, **kw)


class Calls:
    """Requests submitted to an engine, their streamed pieces and outcomes."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self.outcomes: dict[int, GenerationOutcome] = {}
        self.pieces: dict[int, list[str]] = {}
        self._done = threading.Condition()

    def submit(self, rid: int, prompt: str, max_tokens: int = 24, **kw: Any) -> None:
        self.pieces[rid] = []

        def on_done(outcome: GenerationOutcome) -> None:
            with self._done:
                self.outcomes[rid] = outcome
                self._done.notify_all()

        self.engine.submit(GenerationRequest(rid, GeneratePayload(
            "raw", max_tokens, prompt=prompt, **kw)), on_done, self.pieces[rid].append)

    def wait(self, n: int, timeout: float = 300) -> dict[int, GenerationOutcome]:
        with self._done:
            assert self._done.wait_for(lambda: len(self.outcomes) >= n, timeout), \
                f"only {len(self.outcomes)} of {n} requests finished"
        return self.outcomes


def _alone(generator: LlamaGenerator, prompt: str, max_tokens: int = 24, **kw: Any
           ) -> tuple[str, tuple[list[int], list[float]]]:
    """The answer of ``prompt`` on an engine of its own, and its token trace.  A first short
    request gives the engine the chat template's head as its cached prefix, as the engine
    under test has it (a prefix evaluated on its own rounds differently from the same tokens
    read inside a whole prompt)."""
    engine = _engine(generator, **kw)
    try:
        calls = Calls(engine)
        calls.submit(100, "Hi.", 1)
        calls.wait(1)
        calls.submit(0, prompt, max_tokens)
        out = calls.wait(2)[0]
        assert out.result is not None
        return out.result.answer, engine.traces[0]
    finally:
        engine.close()


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "split"])
@pytest.mark.parametrize("shared_head", [False, True], ids=["own-cells", "shared-head"])
def test_prompts_together_give_what_they_give_alone(generator, unified, shared_head):
    """Five prompts arriving together, each against the same prompt alone.  With the shared
    head off, most answers are identical; with it on (the burst shares the chat template's
    head, evaluated once), each prompt's remaining ten-odd tokens are read in a batch of
    fifty instead of alone, and llama.cpp's CPU kernels take another path by batch size, so
    more answers may move: every divergence must still fall on a near-tie.  In a unified
    cache every sequence's attention runs over the whole pool (masked), a shape that rounds
    differently from the same sequence alone on some CPUs (with AVX-512, 4 of 5 answers move
    here, each at a near-tie), so "most answers unchanged" is asserted for split streams."""
    prefix_min = 16 if shared_head else 10**6
    alone = [_alone(generator, p, unified=unified, prefix_min=prefix_min) for p in PROMPTS]
    exact = 0
    engine = _engine(generator, unified=unified, prefix_min=prefix_min)
    try:
        calls = Calls(engine)
        for i, p in enumerate(PROMPTS):
            calls.submit(i, p)
        out = calls.wait(len(PROMPTS))
        stats = engine.snapshot()
    finally:
        engine.close()
    assert stats["mean_batch"] > 1.5, "the requests did not share decode steps"
    assert (stats["prefix"]["hits"] >= len(PROMPTS) - 1) == shared_head
    for i, (want, trace) in enumerate(alone):
        result = out[i].result
        assert result is not None
        same_or_near_tie(trace, engine.traces[i])
        exact += result.answer == want
        assert "".join(calls.pieces[i]).strip() == result.answer, "streamed pieces differ"
    if not shared_head and not unified:
        assert exact >= len(PROMPTS) - 2, "most answers must not change at all"
    assert stats["tokens_out"] == sum(o.result.completion_tokens for o in out.values()
                                      if o.result)


def test_micro_batches_smaller_than_a_step_read_the_same_prompts(generator):
    """n_ubatch below n_batch: llama.cpp computes a step's prompt tokens in several
    micro-batches.  The context gets the size asked for (by default the step's), and the
    five prompts read 16 tokens at a time give what one 512-token micro-batch gives, every
    divergence on a near-tie."""
    import llama_cpp

    traces = {}
    for ubatch in (16, None):
        engine = _engine(generator, n_batch=512, n_ubatch=ubatch, prefix_min=10**6)
        try:
            assert llama_cpp.llama_n_ubatch(engine._ctx) == (ubatch or 512)
            calls = Calls(engine)
            for i, p in enumerate(PROMPTS):
                calls.submit(i, p)
            out = calls.wait(len(PROMPTS))
            assert all(o.result is not None for o in out.values())
            traces[ubatch] = dict(engine.traces)
        finally:
            engine.close()
    for i in range(len(PROMPTS)):
        same_or_near_tie(traces[None][i], traces[16][i])


def test_batch_tokens_follow_the_setting_else_the_device():
    from themis_pg.config import Settings
    from themis_pg.worker.process import batch_tokens

    assert batch_tokens(Settings(batch_tokens=1024)) == 1024
    assert batch_tokens(Settings(n_gpu_layers=0)) == 512, "on a CPU a step stays short"


def test_cancel_ends_one_sequence_and_leaves_the_others(generator):
    alone = {i: _alone(generator, PROMPTS[i], 40) for i in (0, 2)}
    reference = _engine(generator)  # the same three together, without the cancel
    try:
        ref_calls = Calls(reference)
        for i in (0, 1, 2):
            ref_calls.submit(i, PROMPTS[i], max_tokens=40)
        ref_calls.wait(3)
    finally:
        reference.close()
    engine = _engine(generator)
    try:
        calls = Calls(engine)
        for i in (0, 1, 2):
            calls.submit(i, PROMPTS[i], max_tokens=40)
        deadline = time.monotonic() + 120
        while len(calls.pieces[1]) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls.pieces[1]) >= 3, "request 1 never started streaming"
        engine.cancel(1)
        pieces_at_cancel = len(calls.pieces[1])
        out = calls.wait(3)
    finally:
        engine.close()
    assert out[1].stopped and out[1].result is None
    assert len(calls.pieces[1]) <= pieces_at_cancel + 2, "ran on after the cancel"
    for i in (0, 2):
        assert out[i].result is not None
        same_or_near_tie(alone[i][1], engine.traces[i])
        same_or_near_tie(reference.traces[i], engine.traces[i])


def test_a_full_pool_queues_in_order_and_fails_nothing(generator):
    engine = _engine(generator, kv_cells=200, max_sequences=8)
    try:
        calls = Calls(engine)
        for i in range(4):  # ~40 prompt tokens + 60 answer each: two fit at a time
            calls.submit(i, PROMPTS[i], max_tokens=60)
        out = calls.wait(4)
        stats = engine.snapshot()
        too_big = Calls(engine)
        too_big.submit(9, "x " * 150, max_tokens=60)
        big = too_big.wait(1)[9]
    finally:
        engine.close()
    assert all(o.result is not None for o in out.values()), "a request failed for lack of cells"
    assert stats["failed"] == 0 and stats["mean_wait_ms"] > 0
    assert isinstance(big.error, ContextOverflow) and "KV cells" in big.error.message
    # the cached prefix is the head these prompts share, not a waiting prompt's own whole text
    tokens = [generator.prepare(GeneratePayload("raw", 60, prompt=p).to_json()).tokens
              for p in PROMPTS[:4]]
    assert stats["prefix"]["tokens"] == min(common_head(tokens[0], t) for t in tokens[1:])


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "split"])
def test_the_shared_prompt_head_is_reused(generator, unified):
    head = "You are a careful assistant. Answer in one short sentence. " * 3
    alone = [_alone(generator, head + q, 8) for q in ("Why is grass green?",)]
    engine = _engine(generator, prefix_min=16, unified=unified)
    try:
        calls = Calls(engine)
        for i, q in enumerate(["Why is the sky blue?", "Why is grass green?",
                               "Why do cats purr?"]):
            calls.submit(i, head + q, max_tokens=8)
            calls.wait(i + 1)
        stats = engine.snapshot()
        reused = engine.traces[1]
    finally:
        engine.close()
    same_or_near_tie(alone[0][1], reused)  # the reused cells hold the same values
    if unified:  # the cached prefix's cells gain the new sequences' ids
        assert stats["prefix"]["hits"] >= 1 and stats["prefix"]["tokens"] >= 16
    else:  # one call at a time: each finds the head still in the stream it gets
        assert stats["prefix"]["kept_hits"] == 2 and stats["prefix"]["hits"] == 0
    assert stats["prefix"]["tokens_reused"] >= 16


def test_a_stream_keeps_its_prompt_for_the_next_call_in_it(generator):
    """Split streams: a finished sequence's prompt cells stay in its stream, and the next
    call admitted there reads only what its prompt does not share with them (no copy from
    the cached prefix).  Its answer is the one it gets on a fresh engine, up to near-ties; a
    prompt that shares less than ``prefix_min`` tokens with the kept ones starts clean."""
    head = "You are a careful assistant. Answer in one short sentence. " * 3
    prompts = [head + "Why is the sky blue?", head + "Why is grass green?",
               "Describe a cat in a few words."]
    alone = [_alone(generator, p, 8, unified=False, prefix_min=10**6) for p in prompts]
    tokens = [generator.prepare(GeneratePayload("raw", 8, prompt=p).to_json()).tokens
              for p in prompts]
    engine = _engine(generator, unified=False, max_sequences=1,
                     prefix_min=common_head(tokens[0], tokens[2]) + 1)
    try:
        calls = Calls(engine)
        for i, p in enumerate(prompts):
            calls.submit(i, p, max_tokens=8)
            calls.wait(i + 1)
        stats = engine.snapshot()
    finally:
        engine.close()
    assert stats["prefix"]["kept_hits"] == 1 and stats["prefix"]["hits"] == 0
    assert stats["prefix"]["tokens_reused"] == common_head(tokens[0], tokens[1])
    assert stats["kv"]["kept"] == len(tokens[2])  # the last prompt waits for the next call
    for i, (answer, trace) in enumerate(alone):
        same_or_near_tie(trace, engine.traces[i])
        result = calls.outcomes[i].result
        assert result is not None and result.completion_tokens >= 1, answer


def test_sampling_settings_are_per_request(generator):
    """Seeded sampling repeats (one request at a time: in a batch, rounding by row can move a
    near-tie, and at temperature > 0 one different token changes the rest); other seeds and
    max_tokens are honoured per request."""
    engine = _engine(generator)
    try:
        calls = Calls(engine)
        for rid, seed in enumerate((1, 1, 2)):
            calls.submit(rid, PROMPTS[0], temperature=1.2, seed=seed)
            calls.wait(rid + 1)
        calls.submit(3, PROMPTS[0], max_tokens=3)
        calls.submit(4, PROMPTS[1], temperature=0.0)
        out = calls.wait(5)
    finally:
        engine.close()
    answers = {i: o.result.answer for i, o in out.items() if o.result}
    assert answers[0] == answers[1], "the same seed must give the same text"
    assert answers[0] != answers[2], "another seed should give other text at temperature 1.2"
    assert out[3].result is not None and out[3].result.completion_tokens <= 3


def test_valid_utf8_keeps_whole_characters():
    snow = "❄".encode()
    assert _valid_utf8(b"ab" + snow[:2]) == "ab"
    assert _valid_utf8(b"ab" + snow) == "ab❄"
    assert _valid_utf8(b"\xff" + b"abcdef") == "\ufffdabcdef"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_token_picks_what_llama_cpps_own_samplers_pick(seed):
    """The engine samples greedy requests in NumPy; llama.cpp's penalties + greedy chain,
    fed the same window and logits, must pick the same token (ties and penalised winners
    included)."""
    import ctypes

    import llama_cpp
    import numpy as np

    from themis_pg.generation.batching import PENALTY_LAST_N, greedy_token, penalties_sampler

    rng = np.random.default_rng(seed)
    n_vocab = 4096
    for _ in range(50):
        logits = rng.normal(0, 2, n_vocab).astype(np.float32)
        window = [int(t) for t in rng.integers(0, n_vocab, int(rng.integers(0, 90)))]
        top = int(np.argmax(logits))
        window.append(top)  # the unpenalised winner is in the window ...
        if rng.random() < 0.5:  # ... and sometimes a near-tie or a negative winner
            logits[int(rng.integers(0, n_vocab))] = logits[top] * np.float32(0.95)
        if rng.random() < 0.3:
            logits -= logits.max() + 1
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, penalties_sampler(n_vocab))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        for t in window:
            llama_cpp.llama_sampler_accept(chain, t)
        data = (llama_cpp.llama_token_data * n_vocab)(
            *(llama_cpp.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)))
        cur = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
        theirs = int(cur.data[cur.selected].id)
        llama_cpp.llama_sampler_free(chain)
        before = logits.copy()
        assert greedy_token(logits, window[-PENALTY_LAST_N:]) == theirs
        assert np.array_equal(logits, before)


def test_penalties_on_a_step_of_rows_match_one_row_at_a_time():
    """The engine penalises every greedy row of a step at once; each row must come out as
    the one-vector penalty leaves it (windows with repeats, empty ones, negative logits)."""
    import numpy as np

    from themis_pg.generation.batching import penalize_rows, penalized
    from themis_pg.generation.llama import REPEAT_PENALTY

    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, (9, 512)).astype(np.float32)
    logits[3] -= logits[3].max() + 1  # every logit negative
    windows = [[int(t) for t in rng.integers(0, 512, int(rng.integers(0, 70)))]
               for _ in range(9)]
    windows[0] = []
    windows[1] = [5, 5, 5, 9]
    before = logits.copy()
    want = np.stack([penalized(row, w) for row, w in zip(logits, windows, strict=True)])
    penalize_rows(logits, windows)
    assert np.array_equal(logits, want)
    assert np.array_equal(logits[0], before[0]), "an empty window changes nothing"
    factor = np.float32(REPEAT_PENALTY)
    x = before[1][5]
    assert logits[1][5] == (x * factor if x <= 0 else x / factor), "a repeat counts once"
    assert np.count_nonzero(logits != before) == sum(len(set(w)) for w in windows)
