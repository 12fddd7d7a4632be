"""themis_lora_register / themis_lora_remove with a real worker: the file is checked in the
server by the same rules as the CLI, stored with its bytes and a centroid the worker embedded,
in the caller's transaction; only themis_admin may do it; each bad file is a 22023 error and
leaves nothing behind."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from themis_pg.lora.demo import DEMO_ADAPTERS, write_demo_adapter

from .helpers import BAD_ADAPTER_CASES, adapter_rows, bad_adapter_files

MEDICAL = next(d for d in DEMO_ADAPTERS if d.domain == "medical")
REGISTER = ("SELECT themis_lora_register(%s, %s, domain => %s, description => %s, "
            "examples => %s)")


@pytest.fixture(scope="module")
def base_path(default_models: list[Any]) -> Path:
    return Path(next(m.path for m in default_models if m.kind == "generation"))


@pytest.fixture(scope="module")
def medical_file(base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_adapter(base_path, tmp_path_factory.mktemp("lora") / "medical.gguf",
                              MEDICAL.seed)


def _register(dsn: str, name: str, data: bytes, **kw: Any) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(REGISTER, (name, data, kw.get("domain"), kw.get("description", ""),
                                      kw.get("examples"))).fetchone()
    assert row is not None
    return dict(row[0])


def test_sql_registration_stores_the_file_and_a_worker_made_centroid(
        corpus_db, start_worker, medical_file, embedder):
    start_worker(corpus_db)
    data = medical_file.read_bytes()
    row = _register(corpus_db, "sql-medical", data, domain="medical",
                    description=MEDICAL.description, examples=list(MEDICAL.examples))
    assert (row["name"], row["domain"], row["rank"], row["has_centroid"]) == \
        ("sql-medical", "medical", 8, True)
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert row["size_bytes"] == len(data)
    assert row["base_model"] == "smollm2-135m-instruct"
    with psycopg.connect(corpus_db) as conn:
        stored = b"".join(r[0] for r in conn.execute(
            "SELECT data FROM themis.lora_adapter_chunks WHERE adapter_id = %s ORDER BY seq",
            (row["id"],)))
        centroid = conn.execute("SELECT centroid::text FROM themis.lora_adapters WHERE id = %s",
                                (row["id"],)).fetchone()
    assert stored == data
    assert centroid is not None
    got = np.array(centroid[0].strip("[]").split(","), dtype=np.float64)
    mean = embedder.embed([MEDICAL.description, *MEDICAL.examples]).mean(axis=0)
    assert float(got @ mean / np.linalg.norm(mean)) > 0.9999, "the CLI's centroid"
    # registered through SQL, used through SQL: automatic selection finds it
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        out = conn.execute("SELECT themis_rag_json(%s, 1, max_tokens => 4, "
                           "auto_adapters => true)", (MEDICAL.examples[0],)).fetchone()
        assert out is not None and [a["name"] for a in out[0]["adapters"]] == ["sql-medical"]
        conn.execute("SELECT themis_lora_remove('sql-medical')")
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SELECT themis_lora_remove('sql-medical')")
    assert adapter_rows(corpus_db) == (0, 0)


@pytest.mark.parametrize("case", BAD_ADAPTER_CASES)
def test_sql_registration_rejects_each_bad_file_and_stores_nothing(
        case, corpus_db, medical_file, base_path, default_models, tmp_path):
    emb = Path(next(m.path for m in default_models if m.kind == "embedding"))
    bad = bad_adapter_files(tmp_path, medical_file, base_path, emb)[case]
    with pytest.raises(psycopg.Error) as err:
        _register(corpus_db, "bad", bad.read_bytes())
    assert err.value.sqlstate == "22023", err.value
    assert err.value.diag.message_primary is not None
    assert "plpy" not in err.value.diag.message_primary
    assert adapter_rows(corpus_db) == (0, 0)


def test_bad_arguments_and_a_model_without_its_header_are_clear_errors(
        corpus_db, medical_file):
    data = medical_file.read_bytes()
    _register(corpus_db, "once", data)  # no description: no worker needed, no centroid
    cases = [(("once", data), "42710"), (("no spaces", data), "22023"),
             (("x", None), "22004"), ((None, data), "22004")]
    for (name, blob), state in cases:
        with pytest.raises(psycopg.Error) as err:
            _register(corpus_db, name, blob)
        assert err.value.sqlstate == state, (name, err.value)
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT themis_lora_register('y', %s, default_scale => 'NaN')",
                         (data,))
        assert err.value.sqlstate == "22023"
        conn.execute("UPDATE themis.models SET gguf_header = NULL WHERE kind = 'generation'")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT themis_lora_register('z', %s)", (data,))
        assert err.value.sqlstate == "55000" and "themis models register" in \
            (err.value.diag.message_hint or "")
    assert adapter_rows(corpus_db)[0] == 1


def test_only_admins_register_and_a_rollback_keeps_nothing(corpus_db, medical_file, user_role):
    data = medical_file.read_bytes()
    with psycopg.connect(user_role(corpus_db), autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT themis_lora_register('nope', %s)", (data,))
    admin = user_role(corpus_db, member_of="themis_admin")
    with psycopg.connect(admin) as conn:
        conn.execute("SELECT themis_lora_register('rolled-back', %s)", (data,))
        conn.rollback()
    assert adapter_rows(corpus_db) == (0, 0)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT themis_lora_register('kept', %s)", (data,))
        assert conn.execute("SELECT name FROM themis.lora_adapters").fetchall() == [("kept",)]
        conn.execute("SELECT themis_lora_remove('kept')")
    assert adapter_rows(corpus_db) == (0, 0)
