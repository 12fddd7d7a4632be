"""The worker's memory plan: sizes from the GGUF headers and the row count, a refusal over the
budget before anything large is loaded, and the figures in the worker's statistics."""

from __future__ import annotations

import time

import pytest

from themis_pg.memory import (
    MemoryBudgetExceeded,
    kv_cache_bytes,
    model_shape,
    parse_bytes,
    plan_worker_memory,
)

from .helpers import one


@pytest.mark.parametrize(("text", "expected"), [
    ("1024", 1024), ("40GiB", 40 * 1024**3), ("512 MB", 512 * 1000**2), ("1.5kib", 1536),
    ("2e9", 2_000_000_000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "12 parsecs", "-5"])
def test_parse_bytes_rejects_what_is_not_a_size(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def _models(default_models):
    emb = next(m for m in default_models if m.kind == "embedding")
    gen = next(m for m in default_models if m.kind == "generation")
    return emb.path, gen.path


def test_kv_cache_follows_the_header(default_models):
    _, gen = _models(default_models)
    shape = model_shape(gen)  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    assert (shape.n_layer, shape.kv_width) == (30, 2 * 3 * 64)
    assert kv_cache_bytes(shape, 4096) == 4096 * 30 * 384 * 2
    assert kv_cache_bytes(shape, 2048) * 2 == kv_cache_bytes(shape, 4096)


def test_plan_refuses_over_budget_and_names_the_parts(default_models):
    emb, gen = _models(default_models)
    plan = plan_worker_memory(store_device="cpu", rows=1_000_000, dim=384, embedding_model=emb,
                              generation_model=gen, kv_cells=4096, n_gpu_layers=0, budget="1GiB")
    parts = plan.as_json()["parts"]
    assert parts["matrix"]["bytes"] == 1_000_000 * (384 * 4 + 8)
    assert parts["kv_cache"]["bytes"] == 4096 * 30 * 384 * 2
    left = plan.left()
    assert left is not None and left < 0
    with pytest.raises(MemoryBudgetExceeded, match="over its memory budget") as err:
        plan.check()
    assert "matrix 1.44 GiB" in err.value.message and err.value.hint
    roomy = plan_worker_memory(store_device="cpu", rows=1000, dim=384, embedding_model=emb,
                               generation_model=gen, kv_cells=4096, n_gpu_layers=0, budget="4GiB")
    roomy.check()
    no_limit = plan_worker_memory(store_device="cpu", rows=10**9, dim=384, embedding_model=emb,
                                  generation_model=None, kv_cells=4096, n_gpu_layers=0)
    assert no_limit.budget is None
    no_limit.check()  # host memory without THEMIS_MEMORY_BUDGET: no limit


def test_worker_refuses_a_budget_it_cannot_keep(corpus_db, start_worker):
    w = start_worker(corpus_db, env={"THEMIS_MEMORY_BUDGET": "10MB"}, wait=False)
    assert w.proc.wait(timeout=120) != 0
    log = w.log()
    assert "over its memory budget of 9.54 MiB" in log and "THEMIS_MEMORY_BUDGET" in log
    assert one(corpus_db, "SELECT count(*) FROM themis.workers") == 0


def test_worker_reports_its_memory(corpus_db, start_worker):
    w = start_worker(corpus_db, env={"THEMIS_MEMORY_BUDGET": "2GiB"})
    time.sleep(1.2)  # a heartbeat carries the figures
    stats = one(corpus_db, "SELECT stats FROM themis.workers WHERE id = %s", (w.id,))
    memory = stats["memory"]
    rows = one(corpus_db, "SELECT count(*) FROM themis.documents")
    assert memory["budget"] == 2 * 1024**3 and memory["device"] == "cpu"
    assert memory["parts"]["matrix"]["bytes"] == rows * (384 * 4 + 8)
    assert memory["planned"] == sum(p["bytes"] for p in memory["parts"].values())
