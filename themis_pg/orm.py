"""SQLAlchemy 2.0 mapping of the ``themis`` schema and typed wrappers of the SQL functions.

Tables live on :data:`metadata`, separate from the application's own ``MetaData``, so that
``Base.metadata.create_all()`` in an application never touches themis tables.  The schema is
owned by the migrations (``themis migrate``): never ``create_all``/``drop_all`` this metadata.

The SQL files (``sql/schema_*.sql``, ``sql/api/``) are the one source of the schema and the
function signatures; this module follows them, and ``tests/test_orm.py`` compares it with the
catalog of a migrated database (tables, columns, types, nullability; every public function's
parameters, defaults and result), so a revision that changes either fails until this follows.

Importing this module registers the SQL functions with :data:`sqlalchemy.func`, so
``func.themis_rag("q", 3)`` is typed (a ``str`` column) exactly like ``themis_rag("q", 3)``.
The function classes also accept the SQL parameter names as keywords and render them in
PostgreSQL's named notation (``max_tokens => 16``), so the server's defaults stay the only ones::

    session.scalar(select(func.themis_rag("How do I rotate TLS keys?", 3, max_tokens=64)))
    hits = themis_search("rotate TLS keys", 5)
    session.execute(select(hits.c.id, hits.c.score).select_from(hits))
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any, ClassVar, Final, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    TableValuedAlias,
    Text,
    column,
    text,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import GenericFunction
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator, TypeEngine, UserDefinedType

__all__ = [
    "FUNCTIONS",
    "REQUIRED",
    "Change",
    "ChangeHorizon",
    "Config",
    "Corpus",
    "Document",
    "Embedding",
    "IndexSnapshot",
    "Job",
    "JobPiece",
    "LoraAdapter",
    "LoraAdapterChunk",
    "Model",
    "NamedArgument",
    "Param",
    "Source",
    "ThemisBase",
    "Worker",
    "metadata",
    "themis_embed",
    "themis_generate",
    "themis_lora_register",
    "themis_lora_remove",
    "themis_rag",
    "themis_rag_json",
    "themis_rag_stream",
    "themis_search",
    "themis_stats",
    "themis_status",
]

_T = TypeVar("_T")
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
FloatArray = npt.NDArray[np.float32]


# -- column types ------------------------------------------------------------------------------
class Embedding(TypeDecorator[FloatArray]):
    """pgvector ``vector`` of any dimension, always read as a float32 NumPy array.

    pgvector-python returns lists or arrays depending on its version and on whether its psycopg
    adapter is registered; this fixes the Python side to ``ndarray``.  Binds take lists or
    arrays; the distance operators (``cosine_distance`` ...) of pgvector's type still apply.
    """

    impl = Vector
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> FloatArray | None:
        if value is None:
            return None
        if hasattr(value, "to_numpy"):  # a pgvector.Vector from a registered adapter
            value = value.to_numpy()
        return np.asarray(value, dtype=np.float32)


class Xid8(UserDefinedType[int]):
    """PostgreSQL ``xid8`` (64-bit transaction id), read as ``int`` (psycopg gives text)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        def process(value: Any) -> int | None:
            return None if value is None else int(value)

        return process


class Void(UserDefinedType[None]):
    """The ``void`` result of a function called for its effect."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "void"


class PgChar(UserDefinedType[str]):
    """PostgreSQL's one-byte ``"char"`` type (not ``char(n)``)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return '"char"'


# -- tables --------------------------------------------------------------------------------------
metadata = MetaData()
"""The themis tables only; keep it apart from the application's metadata."""

_SCHEMA = {"schema": "themis"}
_NOW = text("now()")
_EMPTY_JSON = text("'{}'::jsonb")


class ThemisBase(DeclarativeBase):
    """Declarative base of the themis tables (not meant to be subclassed by applications)."""

    metadata = metadata


class Config(ThemisBase):
    """Settings enforced inside the database (limits, timeouts); see ``themis.config``."""

    __tablename__ = "config"
    __table_args__ = _SCHEMA

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[Any] = mapped_column(JSONB)
    description: Mapped[str] = mapped_column(Text)


class Model(ThemisBase):
    """A GGUF model the workers may load (path on the worker's host, verified by sha256)."""

    __tablename__ = "models"
    __table_args__ = (CheckConstraint("kind IN ('generation', 'embedding')"), _SCHEMA)

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=_EMPTY_JSON)
    is_default: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)
    gguf_header: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """Generation models: architecture and matrix shapes, for checking LoRA adapters."""


class Corpus(ThemisBase):
    """The embedding model (and dimension) the stored embeddings come from: one row at most."""

    __tablename__ = "corpus"
    __table_args__ = _SCHEMA

    singleton: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    embedding_model: Mapped[str] = mapped_column(Text)
    dim: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)


class Source(ThemisBase):
    """An ingested file; its chunks are :class:`Document` rows (deleted with it)."""

    __tablename__ = "sources"
    __table_args__ = _SCHEMA

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    uri: Mapped[str] = mapped_column(Text, unique=True)
    sha256: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default=_EMPTY_JSON)
    ingested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)

    documents: Mapped[list[Document]] = relationship(
        back_populates="source",
        order_by="Document.chunk_index",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Document(ThemisBase):
    """A chunk that retrieval searches.

    Inserting one with ``embedding=None`` is fine: the worker embeds it before the next search.
    ``metadata_`` maps the ``metadata`` column (the name is taken by SQLAlchemy).
    """

    __tablename__ = "documents"
    __table_args__ = (CheckConstraint("content <> ''"), _SCHEMA)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    source_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("themis.sources.id", ondelete="CASCADE")
    )
    chunk_index: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    content: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default=_EMPTY_JSON)
    embedding: Mapped[FloatArray | None] = mapped_column(Embedding())
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)

    source: Mapped[Source | None] = relationship(back_populates="documents")


class Change(ThemisBase):
    """Change log of ``documents`` written by triggers; the workers' index follows it."""

    __tablename__ = "changes"
    __table_args__ = (CheckConstraint("op IN ('I', 'U', 'D', 'T')"), _SCHEMA)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    xid: Mapped[int] = mapped_column(Xid8(), server_default=text("pg_current_xact_id()"))
    doc_id: Mapped[int | None] = mapped_column(BigInteger)
    op: Mapped[str] = mapped_column(PgChar())


class ChangeHorizon(ThemisBase):
    """Changes below ``xid`` have been pruned: a worker whose watermark is older reloads."""

    __tablename__ = "change_horizon"
    __table_args__ = _SCHEMA

    singleton: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    xid: Mapped[int] = mapped_column(Xid8(), server_default=text("'0'"))


class Worker(ThemisBase):
    """A worker process; it counts as alive while ``heartbeat_at`` is recent."""

    __tablename__ = "workers"
    __table_args__ = _SCHEMA

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    kinds: Mapped[list[str]] = mapped_column(ARRAY(Text))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)
    watermark: Mapped[int | None] = mapped_column(Xid8())
    stats: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=_EMPTY_JSON)


class IndexSnapshot(ThemisBase):
    """A worker's local index snapshot this database vouches for (revision 0003)."""

    __tablename__ = "index_snapshots"
    __table_args__ = _SCHEMA

    token: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    host: Mapped[str] = mapped_column(Text)
    snapshot_key: Mapped[str] = mapped_column(Text)
    embedding_model: Mapped[str] = mapped_column(Text)
    dim: Mapped[int] = mapped_column(Integer)
    watermark: Mapped[int] = mapped_column(Xid8())
    rows: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)


class JobPiece(ThemisBase):
    """A piece of a streamed answer on its way to the caller (revision 0004)."""

    __tablename__ = "job_pieces"
    __table_args__ = _SCHEMA

    job_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("themis.jobs.id"),
                                        primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    piece: Mapped[str] = mapped_column(Text)


class LoraAdapter(ThemisBase):
    """A LoRA adapter for a registered generation model (revision 0005); callers see the
    rows GRANT and row-level security let them."""

    __tablename__ = "lora_adapters"
    __table_args__ = _SCHEMA

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    domain: Mapped[str | None] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(Text, ForeignKey("themis.models.name"))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(REAL)
    default_scale: Mapped[float] = mapped_column(REAL, server_default=text("1.0"))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    sha256: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    centroid: Mapped[FloatArray | None] = mapped_column(Embedding())
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)


class LoraAdapterChunk(ThemisBase):
    """1 MiB of an adapter file's bytes, in order (workers and the owner read them)."""

    __tablename__ = "lora_adapter_chunks"
    __table_args__ = _SCHEMA

    adapter_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("themis.lora_adapters.id"),
                                            primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Job(ThemisBase):
    """A job on the bus.  Callers see only their own rows (RLS) and not ``result``."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("kind IN ('search', 'embed', 'generate')"),
        CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')"),
        _SCHEMA,
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(Text, server_default=text("'queued'"))
    requested_by: Mapped[str] = mapped_column(String)  # PostgreSQL type "name"
    caller_pid: Mapped[int] = mapped_column(Integer)
    caller_started: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    reply_channel: Mapped[str] = mapped_column(Text)
    reply_token: Mapped[str] = mapped_column(Text)
    deadline: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("3"))
    worker_id: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    answer: Mapped[str | None] = mapped_column(Text)
    # Deferred: themis_user has no SELECT right on it, so a plain ORM query must not name it.
    result: Mapped[Any | None] = mapped_column(JSONB, deferred=True)
    error: Mapped[str | None] = mapped_column(Text)
    error_sqlstate: Mapped[str | None] = mapped_column(Text)
    error_hint: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=_NOW)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


# -- SQL functions -----------------------------------------------------------------------------
class NamedArgument(ColumnElement[Any]):
    """``name => value``: PostgreSQL's named notation for one function argument."""

    __visit_name__ = "themis_named_argument"
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 - SQLAlchemy's own (instance-typed) attribute
        ("name", InternalTraversal.dp_string),
        ("value", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, name: str, value: ColumnElement[Any]) -> None:
        if not _IDENTIFIER.fullmatch(name):  # rendered verbatim: plain identifiers only
            raise ValueError(f"not a plain SQL parameter name: {name!r}")
        self.name = name
        self.value = value
        self.type = value.type


@compiles(NamedArgument)
def _compile_named_argument(element: NamedArgument, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{element.name} => {compiler.process(element.value, **kw)}"


class _Required:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()
"""The :attr:`Param.default` of a parameter that has no default in SQL."""


class Param(NamedTuple):
    """One SQL parameter of a function.

    ``default`` is the value of the server's default (``None`` for ``DEFAULT NULL``), or
    :data:`REQUIRED`.  It documents the function and is checked against the catalog; calls
    never send it: an omitted argument takes the server's default.
    """

    name: str
    type: TypeEngine[Any]
    default: Any = REQUIRED


class _ThemisFunction(GenericFunction[_T]):
    """A themis SQL function with its parameters declared, so arguments bind with the SQL
    types and keywords render as named arguments (``k => 3``).

    Positional arguments fill parameters in order; keywords name the rest.  Omitted ones take
    the server's defaults.  Unknown or repeated names raise TypeError, like a Python call.
    """

    _register = False  # the base class itself is not a SQL function
    inherit_cache = True
    signature: ClassVar[tuple[Param, ...]] = ()
    """The SQL parameters in order."""
    returns_table: ClassVar[tuple[tuple[str, TypeEngine[Any]], ...]] = ()
    returns_set: ClassVar[bool] = False  # setof <type> (without columns)
    """For ``RETURNS TABLE (...)`` functions: the result columns in order, (name, type)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "_parsed_args" in kwargs:  # SQLAlchemy-internal construction: pass through
            super().__init__(*args, **kwargs)
            return
        type_ = kwargs.pop("type_", None)
        fname = type(self).name
        if len(args) > len(self.signature):
            raise TypeError(
                f"{fname}() takes at most {len(self.signature)} arguments ({len(args)} given)"
            )
        parsed: list[ColumnElement[Any]] = [
            type_coerce(value, param.type)
            for value, param in zip(args, self.signature, strict=False)
        ]
        positional = {param.name for param in self.signature[: len(args)]}
        known = {param.name for param in self.signature}
        for pname in kwargs:
            if pname not in known:
                raise TypeError(f"{fname}() got an unexpected keyword argument {pname!r}")
            if pname in positional:
                raise TypeError(f"{fname}() got multiple values for argument {pname!r}")
        parsed += [
            NamedArgument(param.name, type_coerce(kwargs[param.name], param.type))
            for param in self.signature
            if param.name in kwargs
        ]
        if type_ is not None:
            super().__init__(_parsed_args=parsed, type_=type_)
        else:
            super().__init__(_parsed_args=parsed)


_QUERY = Param("query", Text())
_K = Param("k", Integer(), 5)
_MAX_TOKENS = Param("max_tokens", Integer(), None)
_TEMPERATURE = Param("temperature", Double(), 0.0)
_TIMEOUT = Param("timeout_s", Double(), None)
_FILTER = Param("filter", JSONB(), None)
_ADAPTERS = Param("adapters", ARRAY(Text()), None)
_ADAPTER_WEIGHTS = Param("adapter_weights", ARRAY(REAL()), None)
_RAG = (_QUERY, _K, _MAX_TOKENS, _TEMPERATURE, _TIMEOUT, _FILTER, _ADAPTERS, _ADAPTER_WEIGHTS,
        Param("auto_adapters", Boolean(), False), Param("domains", ARRAY(Text()), None))


class themis_rag(_ThemisFunction[str]):
    """``themis_rag(query, k=5, max_tokens=NULL, temperature=0, timeout_s=NULL, filter=NULL,
    adapters=NULL, adapter_weights=NULL, auto_adapters=false, domains=NULL) -> text``: the
    generated answer, grounded in the top ``k`` documents the caller may read, with LoRA
    adapters named, chosen by the query, or those of ``domains`` (see the README)."""

    name = "themis_rag"
    type = Text()
    inherit_cache = True
    signature = _RAG


class themis_rag_stream(_ThemisFunction[str]):
    """``themis_rag_stream(query, k=5, ...) -> setof text``: the answer's pieces as they are
    generated.  In the select list (``select(themis_rag_stream("q", 3))``) through a
    server-side cursor they arrive one by one; :func:`themis_pg.client.stream_rag` does that."""

    name = "themis_rag_stream"
    type = Text()
    inherit_cache = True
    returns_set = True
    signature = _RAG


class themis_rag_json(_ThemisFunction[Any]):
    """Like :class:`themis_rag`, returning ``jsonb`` (a dict): answer, sources, scores,
    timings."""

    name = "themis_rag_json"
    type = JSONB()
    inherit_cache = True
    signature = _RAG


class themis_generate(_ThemisFunction[str]):
    """``themis_generate(prompt, max_tokens=NULL, temperature=0, timeout_s=NULL) -> text``:
    generation without retrieval."""

    name = "themis_generate"
    type = Text()
    inherit_cache = True
    signature = (Param("prompt", Text()), _MAX_TOKENS, _TEMPERATURE, _TIMEOUT)


class themis_embed(_ThemisFunction[FloatArray]):
    """``themis_embed(input, timeout_s=NULL) -> vector``, read as a float32 NumPy array."""

    name = "themis_embed"
    type = Embedding()
    inherit_cache = True
    signature = (Param("input", Text()), _TIMEOUT)


class themis_lora_register(_ThemisFunction[Any]):
    """``themis_lora_register(name, adapter, domain=NULL, description='', examples=NULL,
    default_scale=1.0, base_model=NULL, timeout_s=NULL) -> jsonb``: check a GGUF LoRA file
    (bytes) against the base model and store it; the registered row.  For themis_admin."""

    name = "themis_lora_register"
    type = JSONB()
    inherit_cache = True
    signature = (Param("name", Text()), Param("adapter", LargeBinary()),
                 Param("domain", Text(), None), Param("description", Text(), ""),
                 Param("examples", ARRAY(Text()), None), Param("default_scale", REAL(), 1.0),
                 Param("base_model", Text(), None), _TIMEOUT)


class themis_lora_remove(_ThemisFunction[None]):
    """``themis_lora_remove(name) -> void``: remove a registered adapter.  For themis_admin."""

    name = "themis_lora_remove"
    type = Void()
    inherit_cache = True
    signature = (Param("name", Text()),)


class themis_status(_ThemisFunction[Any]):
    """``themis_status() -> jsonb``: live workers, queue depth and models."""

    name = "themis_status"
    type = JSONB()
    inherit_cache = True


class themis_stats(_ThemisFunction[Any]):
    """``themis_stats() -> jsonb``: every live worker's figures (index rows, bytes, dtype,
    device, load and sync times, searches and batch sizes) and job counts; for pg_monitor."""

    name = "themis_stats"
    type = JSONB()
    inherit_cache = True


class _themis_search_fn(_ThemisFunction[Any]):
    """The set-returning ``themis_search``; use :func:`themis_search` for its columns."""

    name = "themis_search"
    inherit_cache = True
    signature = (_QUERY, _K, _TIMEOUT, _FILTER)
    returns_table = (
        ("id", BigInteger()),
        ("score", REAL()),
        ("content", Text()),
        ("metadata", JSONB()),
    )


def themis_search(*args: Any, name: str | None = None, **kwargs: Any) -> TableValuedAlias:
    """``themis_search(query, k=5, timeout_s=NULL, filter=NULL)`` as a FROM item with typed columns
    ``id`` (int), ``score`` (float, higher is closer), ``content`` (str), ``metadata`` (dict).

    Rows come back best first (keep that order with ``order_by(t.c.score.desc())`` when
    joining).  ``name`` sets the alias; arguments are those of the SQL function::

        t = themis_search("rotate TLS keys", 5)
        select(t.c.id, t.c.score).select_from(t)
    """
    return _themis_search_fn(*args, **kwargs).table_valued(
        *(column(cname, ctype) for cname, ctype in _themis_search_fn.returns_table),
        name=name,
    )


FUNCTIONS: Final[tuple[type[_ThemisFunction[Any]], ...]] = (
    themis_rag,
    themis_rag_json,
    themis_rag_stream,
    _themis_search_fn,
    themis_embed,
    themis_generate,
    themis_lora_register,
    themis_lora_remove,
    themis_stats,
    themis_status,
)
"""The wrapper class of every public SQL function (``themis_search``'s is the function
behind :func:`themis_search`)."""
