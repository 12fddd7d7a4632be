"""LoRA adapters through SQL, with a real worker: a call names adapters (and weights), the
worker (its cache empty) fetches them from the database, the jsonb result says what was
applied; unknown names and adapters a role may not see are errors with SQLSTATEs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb

from themis_pg.lora.demo import DEMO_ADAPTERS, write_demo_adapter
from themis_pg.lora.registry import register_adapter

from .helpers import one

Q = "How do I rotate TLS keys?"
MEDICAL = "Which dose of ibuprofen is safe for an adult with a fever?"


@pytest.fixture
def lora_db(corpus_db: str, default_models: list[Any], model_cache: Path, embedder: Any,
            tmp_path: Path) -> str:
    """Two adapters without centroids (demo-a, demo-b) and the three demo adapters with
    theirs (medical, legal, cooking), plus two documents of each of those domains."""
    base = next(m.path for m in default_models if m.kind == "generation")
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        for name, seed in (("demo-a", 11), ("demo-b", 12)):
            register_adapter(conn, write_demo_adapter(base, tmp_path / f"{name}.gguf", seed),
                             name, cache_dir=model_cache, domain=name[-1], default_scale=0.9)
        for demo in DEMO_ADAPTERS:
            mean = embedder.embed([demo.description, *demo.examples]).mean(axis=0)
            register_adapter(conn, write_demo_adapter(base, tmp_path / f"{demo.name}.gguf",
                                                      demo.seed),
                             demo.name, cache_dir=model_cache, domain=demo.domain,
                             description=demo.description, centroid=mean / np.linalg.norm(mean))
            for example in demo.examples:
                conn.execute("INSERT INTO themis.documents (content, metadata) VALUES (%s, %s)",
                             (f"{example} An answer from the {demo.domain} handbook.",
                              Jsonb({"domain": demo.domain})))
    return corpus_db


def _rag(dsn: str, *args: Any, sql: str = "themis_rag_json(%s, 2, max_tokens => 16{})",
         query: str = Q) -> dict[str, Any]:
    extra = "".join(f", {a}" for a in args)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT {sql.format(extra)}", (query,)).fetchone()
    assert row is not None
    return dict(row[0])


def test_a_call_applies_the_adapters_it_names(lora_db, start_worker):
    worker = start_worker(lora_db)
    base = _rag(lora_db)
    a = _rag(lora_db, "adapters => ARRAY['demo-a']")
    assert a["adapters"] == [{"name": "demo-a", "scale": pytest.approx(0.9)}]
    assert base["adapters"] == []
    assert a["answer"] != base["answer"]
    fused = _rag(lora_db, "adapters => ARRAY['demo-a', 'demo-b']",
                 "adapter_weights => ARRAY[0.6, 0.4]::real[]")
    assert [(x["name"], round(x["scale"], 3)) for x in fused["adapters"]] == \
        [("demo-a", 0.6), ("demo-b", 0.4)]
    # a second call on the set's engine (its answer may differ in a near-tie: the engine has
    # learned the repeated prompt head as its cached prefix by then; see batching.py)
    assert _rag(lora_db, "adapters => ARRAY['demo-a']")["adapters"] == a["adapters"]
    assert "fetched LoRA adapter" in worker.log(), "the empty cache was filled from the database"
    deadline = time.monotonic() + 30  # the worker publishes its figures with its heartbeat
    while True:
        (w,) = one(lora_db, "SELECT themis_stats()")["workers"]
        sets = {tuple(x["adapters"]): x for x in w["stats"]["generation"]["adapter_sets"]}
        # until a heartbeat after the second call: an earlier one may show the set with one
        if sets.get(("demo-a",), {}).get("requests", 0) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sets[("demo-a",)]["requests"] == 2
    assert sets[("demo-a", "demo-b")]["scales"] == [pytest.approx(0.6), pytest.approx(0.4)]


@pytest.mark.parametrize("args, state", [
    (("adapters => ARRAY['no-such-adapter']",), "42704"),
    (("adapters => ARRAY['demo-a', 'demo-a']",), "22023"),
    (("adapters => ARRAY['demo-a']", "adapter_weights => ARRAY[0.5, 0.5]::real[]"), "22023"),
    (("adapters => ARRAY['demo-a']", "adapter_weights => ARRAY[17]::real[]"), "22023"),
    (("adapter_weights => ARRAY[1]::real[]",), "22023"),
])
def test_bad_adapter_arguments_are_clear_errors(lora_db, start_worker, args, state):
    start_worker(lora_db)
    with pytest.raises(psycopg.Error) as err:
        _rag(lora_db, *args)
    assert err.value.sqlstate == state


def test_a_role_uses_only_the_adapters_it_may_see(lora_db, start_worker, user_role):
    start_worker(lora_db)
    limited = user_role(lora_db)
    role = psycopg.conninfo.conninfo_to_dict(limited)["user"]
    with psycopg.connect(lora_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE themis.lora_adapters ENABLE ROW LEVEL SECURITY")
        conn.execute(f'CREATE POLICY no_b ON themis.lora_adapters AS RESTRICTIVE FOR SELECT '
                     f'TO "{role}" USING (name <> \'demo-b\')')
    assert _rag(limited, "adapters => ARRAY['demo-a']")["adapters"][0]["name"] == "demo-a"
    with pytest.raises(psycopg.Error) as err:
        _rag(limited, "adapters => ARRAY['demo-b']")
    assert err.value.sqlstate == "42704"
    # another role still may
    assert _rag(lora_db, "adapters => ARRAY['demo-b']")["adapters"][0]["name"] == "demo-b"


def test_automatic_selection_picks_the_domain_adapter_or_none(lora_db, start_worker):
    start_worker(lora_db)
    medical = _rag(lora_db, "auto_adapters => true", query=MEDICAL)
    assert [a["name"] for a in medical["adapters"]] == ["demo-medical"]
    assert medical["adapters"][0]["scale"] == pytest.approx(1.0)
    assert _rag(lora_db, "auto_adapters => true")["adapters"] == [], "unrelated: none"
    with psycopg.connect(lora_db, autocommit=True) as conn:  # the threshold is a setting
        conn.execute("UPDATE themis.config SET value = '0.9' WHERE key = 'lora_auto_threshold'")
    assert _rag(lora_db, "auto_adapters => true", query=MEDICAL)["adapters"] == []


def test_federated_rag_fuses_the_domains_and_retrieves_from_each(lora_db, start_worker):
    start_worker(lora_db)
    out = _rag(lora_db, "domains => ARRAY['legal', 'medical']",
               sql="themis_rag_json(%s, 4, max_tokens => 16{})", query=MEDICAL)
    assert sorted((a["name"], a["scale"]) for a in out["adapters"]) == \
        [("demo-legal", 0.5), ("demo-medical", 0.5)]
    assert sorted(s["domain"] for s in out["sources"]) == ["legal", "legal", "medical",
                                                           "medical"]
    assert all(s["metadata"]["domain"] == s["domain"] for s in out["sources"])
    weighted = _rag(lora_db, "domains => ARRAY['legal', 'medical']",
                    "adapter_weights => ARRAY[0.2, 0.8]::real[]", query=MEDICAL)
    assert sorted((a["name"], a["scale"]) for a in weighted["adapters"]) == \
        [("demo-legal", 0.2), ("demo-medical", 0.8)]
