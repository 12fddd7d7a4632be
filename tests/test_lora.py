"""LoRA adapters on the real default model (CPU): registration validates and stores the file
(or stores nothing), a worker's empty cache fetches it from the database, and the engine
applies adapters per set: scale 0 is the base model exactly, fusion differs from each adapter
and equals the same fusion merged into one file, mixed sets run side by side unmixed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from themis_pg.errors import AdapterNotFound, InvalidAdapter
from themis_pg.generation.adapters import AdapterEngines
from themis_pg.generation.engine import GenerationOutcome, GenerationRequest
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.lora.adapter_file import base_model_shapes, write_adapter
from themis_pg.lora.demo import RANK, write_demo_adapter
from themis_pg.lora.registry import (
    AdapterCache,
    get_adapter,
    list_adapters,
    register_adapter,
    remove_adapter,
)
from themis_pg.pl.payloads import AdapterUse, GeneratePayload

from .helpers import BAD_ADAPTER_CASES, adapter_rows, bad_adapter_files, same_or_near_tie

PROMPT = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def base_path(default_models: list[Any]) -> Path:
    return Path(next(m.path for m in default_models if m.kind == "generation"))


@pytest.fixture(scope="module")
def adapters(base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora")
    return {name: write_demo_adapter(base_path, folder / f"{name}.gguf", seed)
            for name, seed in (("a", 11), ("b", 12))}


@pytest.fixture(scope="module")
def generator(base_path: Path) -> Iterator[LlamaGenerator]:
    yield LlamaGenerator(base_path, "smollm2-135m-instruct", n_ctx=512, own_cells=256)


# -- registration and the cache --------------------------------------------------------------
def test_register_list_show_remove(migrated_db, adapters, model_cache):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        rec = register_adapter(conn, adapters["a"], "demo-a", cache_dir=model_cache,
                               domain="medical", description="medical questions",
                               default_scale=0.8)
        assert (rec.rank, rec.alpha, rec.domain) == (RANK, float(RANK), "medical")
        assert rec.default_scale == pytest.approx(0.8)
        assert rec.size_bytes == adapters["a"].stat().st_size
        assert rec.base_model == "smollm2-135m-instruct"
        assert [r.name for r in list_adapters(conn)] == ["demo-a"]
        assert get_adapter(conn, "demo-a").sha256 == rec.sha256
        stored = b"".join(r[0] for r in conn.execute(
            "SELECT data FROM themis.lora_adapter_chunks WHERE adapter_id = %s ORDER BY seq",
            (rec.id,)))
        assert stored == adapters["a"].read_bytes()
        remove_adapter(conn, "demo-a")
        with pytest.raises(AdapterNotFound):
            get_adapter(conn, "demo-a")
    assert adapter_rows(migrated_db) == (0, 0)


@pytest.mark.parametrize("case", BAD_ADAPTER_CASES)
def test_registration_rejects_bad_files_and_stores_nothing(
        case, migrated_db, adapters, base_path, default_models, model_cache, tmp_path):
    emb = next(m.path for m in default_models if m.kind == "embedding")
    bad = bad_adapter_files(tmp_path, adapters["a"], base_path, emb)[case]
    with psycopg.connect(migrated_db, autocommit=True) as conn, \
            pytest.raises(InvalidAdapter) as err:
        register_adapter(conn, bad, "bad", cache_dir=model_cache)
    assert str(bad) in err.value.message or bad.name in err.value.message
    assert err.value.sqlstate == "22023"
    assert adapter_rows(migrated_db) == (0, 0)


def test_an_empty_cache_fetches_from_the_database_and_keeps_its_budget(
        migrated_db, adapters, model_cache, tmp_path):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        a = register_adapter(conn, adapters["a"], "demo-a", cache_dir=model_cache)
        b = register_adapter(conn, adapters["b"], "demo-b", cache_dir=model_cache)
        budget = int(a.size_bytes * 1.5)  # room for one file only
        cache = AdapterCache(tmp_path / "cache", budget)
        got = cache.path(conn, a.sha256)
        assert got.read_bytes() == adapters["a"].read_bytes()
        assert cache.path(conn, a.sha256) == got  # the second use reads no chunk
        cache.path(conn, b.sha256)
        assert sorted(p.name for p in (tmp_path / "cache").glob("*.gguf")) == \
            [f"{b.sha256}.gguf"], "the least recently used file leaves for the new one"
        with pytest.raises(AdapterNotFound):
            cache.path(conn, "0" * 64)
        assert not list((tmp_path / "cache").glob(".fetch-*")), "no temporary file is left"


# -- generation --------------------------------------------------------------------------------
class Runner:
    """Requests through an AdapterEngines, by adapter set."""

    def __init__(self, generator: LlamaGenerator, files: dict[str, Path], **kw: Any) -> None:
        self.files = {f"{n:0>64}": p for n, p in files.items()}  # fake sha256 -> file
        self.engines = AdapterEngines(generator, lambda a: self.files[a.sha256],
                                      max_sequences=8, kv_cells=4096, record_margins=True,
                                      **kw)
        self.done: dict[int, GenerationOutcome] = {}
        self._cv = threading.Condition()

    def submit(self, rid: int, uses: dict[str, float], prompt: str = PROMPT) -> None:
        adapters = tuple(AdapterUse(n, f"{n:0>64}", s) for n, s in uses.items())

        def on_done(o: GenerationOutcome) -> None:
            with self._cv:
                self.done[rid] = o
                self._cv.notify_all()

        self.engines.submit(GenerationRequest(rid, GeneratePayload(
            "raw", 24, prompt=prompt, adapters=adapters)), on_done)

    def answers(self, n: int) -> dict[int, str]:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.done) >= n, 300)
        out = {}
        for rid, o in self.done.items():
            assert o.result is not None, o
            out[rid] = o.result.answer
        return out


def _alone(generator: LlamaGenerator, files: dict[str, Path], uses: dict[str, float],
           prompt: str = PROMPT) -> tuple[str, tuple[list[int], list[float]]]:
    """The answer of one request on engines of its own, and its token trace."""
    r = Runner(generator, files)
    try:
        r.submit(0, uses, prompt)
        return r.answers(1)[0], r.engines.traces()[0]
    finally:
        r.engines.close()


def test_scale_zero_is_the_base_model_and_scale_one_changes_it(generator, adapters):
    base = _alone(generator, adapters, {})
    assert _alone(generator, adapters, {"a": 0.0}) == base  # tokens and logit gaps alike
    assert _alone(generator, adapters, {"a": 1.0})[0] != base[0]


def test_a_fusion_differs_from_each_adapter_and_equals_the_merged_file(
        generator, adapters, base_path, tmp_path):
    fused = _alone(generator, adapters, {"a": 0.6, "b": 0.4})
    assert fused[0] != _alone(generator, adapters, {"a": 1.0})[0]
    assert fused[0] != _alone(generator, adapters, {"b": 1.0})[0]
    # The same fusion another way: one file whose rank-16 delta is 0.6 A + 0.4 B
    # (llama.cpp scales each adapter by alpha / rank; alpha = rank here).
    import gguf

    tensors: dict[str, dict[str, np.ndarray]] = {}
    for name, weight in (("a", 0.6), ("b", 0.4)):
        for t in gguf.GGUFReader(str(adapters[name])).tensors:
            arr = np.array(t.data, dtype=np.float32)
            tensors.setdefault(t.name, {})[name] = arr * (weight if t.name.endswith(
                ".lora_b") else 1.0)
    deltas = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            w = name[: -len(".lora_a")]
            a = np.concatenate([tensors[name]["a"], tensors[name]["b"]], axis=0)
            b = np.concatenate([tensors[w + ".lora_b"]["a"], tensors[w + ".lora_b"]["b"]],
                               axis=1)
            deltas[w] = (a, b)
    merged = tmp_path / "merged.gguf"
    write_adapter(merged, "llama", deltas, alpha=2 * RANK)
    # The sums run in another order (one rank-16 product, not two rank-8 ones), so the last
    # bits differ: the same tokens, or a first divergence on a near-tie.
    same_or_near_tie(fused[1], _alone(generator, dict(adapters, merged=merged),
                                      {"merged": 1.0})[1])


def test_mixed_adapter_sets_run_side_by_side_each_with_its_own_output(generator, adapters):
    sets = [{}, {"a": 1.0}, {"b": 1.0}, {"a": 0.6, "b": 0.4}]
    alone = [_alone(generator, adapters, s) for s in sets]
    runner = Runner(generator, adapters)
    try:
        for i in range(8):  # two calls per set, interleaved
            runner.submit(i, sets[i % 4])
        runner.answers(8)
        traces = runner.engines.traces()
        stats = runner.engines.snapshot()
    finally:
        runner.engines.close()
    for i in range(8):  # two calls of a set share its steps: rounding may move a near-tie
        same_or_near_tie(alone[i % 4][1], traces[i])
    assert {tuple(s["adapters"]) for s in stats["adapter_sets"]} == {("a",), ("b",),
                                                                     ("a", "b")}
    assert all(s["requests"] == 2 for s in stats["adapter_sets"])


def test_more_sets_than_engines_wait_and_all_finish(generator, adapters):
    runner = Runner(generator, adapters, max_sets=1)
    try:
        for i, s in enumerate([{"a": 1.0}, {"b": 1.0}, {"a": 0.5}]):
            runner.submit(i, s)
        got = runner.answers(3)
    finally:
        runner.engines.close()
    assert got[0] == _alone(generator, adapters, {"a": 1.0})[0]
    assert got[1] == _alone(generator, adapters, {"b": 1.0})[0]


def test_a_peft_folder_imports_loads_and_changes_the_output(generator, base_path, tmp_path,
                                                            migrated_db, model_cache):
    """A PEFT adapter folder made here (q_proj and v_proj of every layer) converts to a GGUF
    adapter that validates, registers, and changes the model's answer."""
    import json

    import gguf
    from safetensors.numpy import save_file

    from themis_pg.lora.adapter_file import validate_adapter
    from themis_pg.lora.peft import _permute, convert_peft

    _, shapes = base_model_shapes(base_path)
    blocks = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("blk."))
    rng = np.random.default_rng(5)
    tensors = {}
    for i in range(blocks):
        for module, gguf_name in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
            n_in, n_out = shapes[f"blk.{i}.{gguf_name}.weight"]
            key = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, n_in ** -0.5, (4, n_in)).astype(
                np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.4, (n_out, 4)).astype(np.float32)
    peft = tmp_path / "my-peft"
    peft.mkdir()
    save_file(tensors, str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    out = convert_peft(peft, base_path, tmp_path / "my-peft.gguf")
    info = validate_adapter(out, base_path)
    assert (info.rank, info.alpha, len(info.adapted)) == (4, 8.0, 2 * blocks)
    written = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    b_q = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert np.array_equal(written["blk.0.attn_q.weight.lora_b"], _permute(b_q, 9))
    assert not np.array_equal(written["blk.0.attn_q.weight.lora_b"], b_q)
    assert np.array_equal(written["blk.0.attn_v.weight.lora_b"], tensors[
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"])
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        assert register_adapter(conn, out, "my-peft", cache_dir=model_cache).rank == 4
    files = {"peft": out}
    assert _alone(generator, files, {"peft": 1.0})[0] != _alone(generator, files, {})[0]
    bad = tmp_path / "not-peft"
    bad.mkdir()
    with pytest.raises(InvalidAdapter, match="not a PEFT adapter folder"):
        convert_peft(bad, base_path, tmp_path / "x.gguf")
