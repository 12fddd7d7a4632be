"""themis_pg.orm against a real database and worker: typed SQL functions through SQLAlchemy,
ORM reads of the schema, the SQL the function wrappers render, and the ORM against the catalog
of a database at head (the SQL files are the one source; any drift fails here)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.types import TypeEngine

from themis_pg.db import migrate
from themis_pg.orm import (
    FUNCTIONS,
    REQUIRED,
    Config,
    Corpus,
    Document,
    Job,
    Model,
    Source,
    Worker,
    metadata,
    themis_embed,
    themis_rag,
    themis_rag_json,
    themis_search,
)

QUESTION = "How do I rotate TLS keys?"
MAX_TOKENS = 16  # keeps generation fast; only the type and non-emptiness are checked
DIM = 384  # all-MiniLM-L6-v2


_DIALECT = sa.create_engine("postgresql+psycopg://").dialect  # never connects


def _sql(stmt: sa.ClauseElement) -> str:
    return str(stmt.compile(dialect=_DIALECT))


# -- rendering (no database) ------------------------------------------------------------------
def test_func_namespace_is_typed_by_registration():
    assert isinstance(func.themis_rag("q", 3), themis_rag)
    assert isinstance(select(func.themis_rag("q", 3)).selected_columns[0].type, sa.Text)
    assert isinstance(select(func.themis_rag_json("q")).selected_columns[0].type, postgresql.JSONB)
    assert isinstance(select(func.themis_status()).selected_columns[0].type, postgresql.JSONB)


def test_keywords_render_as_named_arguments():
    sql = _sql(select(themis_rag("q", 3, max_tokens=16, timeout_s=2.0)))
    assert "themis_rag(%(param_1)s::VARCHAR, %(param_2)s::INTEGER, max_tokens => " in sql
    assert "timeout_s => " in sql
    assert "temperature" not in sql  # omitted arguments keep the server's defaults


def test_bad_arguments_fail_like_a_python_call():
    with pytest.raises(TypeError, match="multiple values for argument 'k'"):
        func.themis_rag("q", 3, k=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'top_k'"):
        themis_search("q", top_k=4)
    with pytest.raises(TypeError, match="at most 2 arguments"):
        themis_embed("a", 1.0, 2)


def test_statement_cache_key_follows_argument_names():
    a = select(themis_rag("q", 3, max_tokens=16))
    b = select(themis_rag("other", 5, max_tokens=8))
    c = select(themis_rag("other", 5, temperature=0.5))
    assert a._generate_cache_key() == b._generate_cache_key()
    assert a._generate_cache_key() != c._generate_cache_key()


def test_tables_live_in_their_own_metadata_and_schema():
    tables = Document.metadata.tables
    assert set(tables) == {
        f"themis.{n}"
        for n in (
            "config",
            "models",
            "corpus",
            "sources",
            "documents",
            "changes",
            "change_horizon",
            "workers",
            "jobs",
            "index_snapshots",
            "job_pieces",
            "lora_adapters",
            "lora_adapter_chunks",
        )
    }
    assert all(t.schema == "themis" for t in tables.values())


# -- the ORM against the catalog ---------------------------------------------------------------
# Types compare by family: the compiled ORM type and PostgreSQL's format_type(), without
# modifiers, with the string types that read and bind alike taken as one.
_SAME_FAMILY = {"varchar": "text", "character varying": "text", "name": "text"}


def _family(sql_type: str) -> str:
    name = re.sub(r"\(.*?\)", "", sql_type).strip().lower()
    dims = ""
    while name.endswith("[]"):
        name, dims = name[:-2].strip(), dims + "[]"
    return _SAME_FAMILY.get(name, name) + dims


def _orm_family(type_: TypeEngine[Any]) -> str:
    return _family(str(type_.compile(dialect=_DIALECT)))


@pytest.fixture(scope="module")
def head_db(server) -> Iterator[str]:
    """An empty database migrated to head (no models, no worker)."""
    name = "t_orm_catalog"
    server.drop_database(name)
    dsn = server.create_database(name)
    try:
        migrate(dsn)
        yield dsn
    finally:
        server.drop_database(name)


_COLUMNS = """
SELECT c.table_name, c.column_name, c.is_nullable = 'YES', format_type(a.atttypid, a.atttypmod)
  FROM information_schema.columns c
  JOIN information_schema.tables t USING (table_schema, table_name)
  JOIN pg_attribute a ON a.attrelid = format('%I.%I', c.table_schema, c.table_name)::regclass
                     AND a.attname = c.column_name
 WHERE c.table_schema = 'themis' AND t.table_type = 'BASE TABLE'
"""


def test_orm_tables_and_columns_match_the_catalog(head_db: str):
    with psycopg.connect(head_db, autocommit=True) as conn:
        rows = conn.execute(_COLUMNS).fetchall()
    db = {(table, col): (_family(type_), nullable) for table, col, nullable, type_ in rows}
    orm = {(table.name, col.name): (_orm_family(col.type), bool(col.nullable))
           for table in metadata.tables.values() for col in table.columns}
    assert {t for t, _ in orm} == {t for t, _ in db}, "tables of schema themis"
    drift = [f"{t}.{c}: database {db.get((t, c))}, ORM {orm.get((t, c))} (type, nullable)"
             for t, c in sorted(db.keys() | orm.keys()) if db.get((t, c)) != orm.get((t, c))]
    assert not drift, "themis_pg/orm.py differs from the schema:\n" + "\n".join(drift)


_FUNCTIONS = """
SELECT p.proname, p.proretset, format_type(p.prorettype, NULL),
       coalesce(p.proargnames, '{}'),
       coalesce(p.proargmodes::text[], array_fill('i'::text, ARRAY[p.pronargs])),
       ARRAY(SELECT format_type(u.t, NULL)
               FROM unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]))
                    WITH ORDINALITY AS u(t, n) ORDER BY u.n),
       ARRAY(SELECT pg_get_function_arg_default(p.oid, n)
               FROM generate_series(1, coalesce(array_length(p.proallargtypes, 1), p.pronargs))
                    AS n ORDER BY n)
  FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace
   AND EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'themis.execute=%')
"""


def _catalog_functions(dsn: str) -> tuple[list[str], dict[str, Any]]:
    """Every marked public function: (names, overloads included; name -> its description)."""
    names: list[str] = []
    found: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, retset, rettype, argnames, modes, types, defaults in conn.execute(_FUNCTIONS):
            names.append(name)
            params, table = [], []
            for i, mode in enumerate(modes):
                arg = argnames[i] if i < len(argnames) else ""
                if mode in ("i", "b"):
                    default = (REQUIRED if defaults[i] is None
                               else conn.execute(f"SELECT {defaults[i]}").fetchone()[0])
                    params.append((arg, _family(types[i]), default))
                elif mode == "t":
                    table.append((arg, _family(types[i])))
            returns = ("table", table) if retset and table else (
                "setof" if retset else "value", _family(rettype))
            found[name] = {"params": params, "returns": returns}
    return names, found


def _orm_function(fn: Any) -> dict[str, Any]:
    returns = (("table", [(n, _orm_family(t)) for n, t in fn.returns_table])
               if fn.returns_table else
               ("setof" if fn.returns_set else "value", _orm_family(fn.type)))
    return {"params": [(p.name, _orm_family(p.type), p.default) for p in fn.signature],
            "returns": returns}


def test_orm_functions_match_every_public_function(head_db: str):
    names, db = _catalog_functions(head_db)
    assert len(names) == len(set(names)), f"overloaded public functions: {sorted(names)}"
    orm = {fn.name: _orm_function(fn) for fn in FUNCTIONS}
    assert set(orm) == set(db), "public functions with a themis.execute marker"
    drift = [f"{name}:\n  database {db[name]}\n  ORM      {orm[name]}"
             for name in sorted(db) if db[name] != orm[name]]
    assert not drift, "themis_pg/orm.py differs from sql/api:\n" + "\n".join(drift)


# -- against the database ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(rag_db: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(rag_db))
    yield eng
    eng.dispose()


def test_themis_rag_returns_text(engine: sa.Engine):
    with Session(engine) as session:
        # Plain func.*: positional arguments, the 3rd is max_tokens.
        answer = session.scalar(select(func.themis_rag(QUESTION, 3, MAX_TOKENS)))
        # The imported wrapper with keywords: rendered in named notation.
        named = session.scalar(select(themis_rag(QUESTION, k=3, max_tokens=MAX_TOKENS)))
    for text in (answer, named):
        assert isinstance(text, str)
        assert text.strip()
    assert named == answer  # temperature 0: the same call gives the same answer


def test_themis_search_rows_are_documents_best_first(engine: sa.Engine):
    hits = themis_search(QUESTION, 5)
    with Session(engine) as session:
        rows = session.execute(
            select(hits.c.id, hits.c.score, hits.c.content, hits.c.metadata).select_from(hits)
        ).all()
        assert len(rows) == 5
        ids = [r.id for r in rows]
        docs = {d.id: d for d in session.scalars(select(Document).where(Document.id.in_(ids)))}
        query_vec = session.scalar(select(themis_embed(QUESTION)))
        distances = {
            doc_id: distance
            for doc_id, distance in session.execute(
                select(Document.id, Document.embedding.cosine_distance(query_vec)).where(
                    Document.id.in_(ids)
                )
            )
        }

    assert set(docs) == set(ids)
    scores = [r.score for r in rows]
    assert all(isinstance(s, float) for s in scores)
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        assert isinstance(r.id, int)
        assert r.content == docs[r.id].content
        assert isinstance(r.metadata, dict)
        # The worker's score is the cosine similarity pgvector computes for the same vectors.
        assert r.score == pytest.approx(1 - distances[r.id], abs=5e-3)
    assert "tls" in docs[ids[0]].content.lower()


def test_search_joins_with_the_orm(engine: sa.Engine):
    hits = themis_search(QUESTION, 3, name="hits")
    stmt = (
        select(Document, hits.c.score)
        .join(hits, hits.c.id == Document.id)
        .options(selectinload(Document.source))
        .order_by(hits.c.score.desc())
    )
    with Session(engine) as session:
        results = session.execute(stmt).all()
        assert len(results) == 3
        for doc, score in results:
            assert isinstance(doc, Document) and 0 < score <= 1.0001
            assert doc.source is not None and doc.source.uri


def test_orm_reads_documents_sources_and_embeddings(engine: sa.Engine):
    with Session(engine) as session:
        source = session.scalars(
            select(Source).where(Source.uri.like("%tls-certificate-rotation.md"))
        ).one()
        assert len(source.sha256) == 64
        assert source.documents, "the sample file was ingested into chunks"
        assert [d.chunk_index for d in source.documents] == sorted(
            d.chunk_index for d in source.documents
        )
        doc = source.documents[0]
        assert doc.source is source and doc.content.strip()
        assert isinstance(doc.metadata_, dict)
        assert isinstance(doc.embedding, np.ndarray)
        assert doc.embedding.shape == (DIM,) and doc.embedding.dtype == np.float32
        assert np.isfinite(doc.embedding).all() and np.linalg.norm(doc.embedding) > 0

        corpus = session.get(Corpus, True)
        assert corpus is not None and corpus.dim == DIM
        assert session.get(Config, "max_k") is not None
        kinds = {m.kind for m in session.scalars(select(Model).where(Model.is_default))}
        assert kinds == {"generation", "embedding"}
        worker = session.scalars(select(Worker)).first()
        assert worker is not None and "search" in worker.kinds
        jobs = session.scalar(sa.text("SELECT count(*) FROM themis.jobs"))
        assert session.scalar(select(func.count()).select_from(Job)) == jobs


def test_themis_embed_returns_an_array(engine: sa.Engine):
    with Session(engine) as session:
        vec = session.scalar(select(func.themis_embed("rotate the TLS certificate")))
    assert isinstance(vec, np.ndarray)
    assert vec.shape == (DIM,) and vec.dtype == np.float32


def test_themis_rag_json_returns_a_dict(engine: sa.Engine):
    with Session(engine) as session:
        result = session.scalar(select(themis_rag_json(QUESTION, 3, max_tokens=MAX_TOKENS)))
        assert isinstance(result, dict)
        assert isinstance(result["answer"], str) and result["answer"].strip()
        sources = result["sources"]
        assert 1 <= len(sources) <= 3
        ids = [s["id"] for s in sources]
        found = session.scalars(select(Document.id).where(Document.id.in_(ids))).all()
        assert set(found) == set(ids)


def test_themis_status_returns_a_dict(engine: sa.Engine):
    with Session(engine) as session:
        status = session.scalar(select(func.themis_status()))
    assert isinstance(status, dict)
    assert status["workers"] and status["embedding_model"]


def test_themis_generate_returns_text(engine: sa.Engine):
    with Session(engine) as session:
        text = session.scalar(select(func.themis_generate("Say hello.", max_tokens=4)))
    assert isinstance(text, str)
