"""Entry points of the SQL functions (``sql/api/20_functions.sql``); each takes ``plpy``, ``GD``.

What a call needs from the database costs one SPI statement (``SELECT current_user``); the
rest is cached per backend in ``GD`` on the first call (the bus connection, this backend's
pid and start time, where the bus connects).  Arguments are checked here for what needs no
settings (NULL, empty, types, signs); the limits of ``themis.config`` (max_k, text sizes,
max_tokens, ...) are enforced by ``bus_submit``, whose errors reach the caller with their
SQLSTATE and hint, and again by the worker.

Documents are read back through SPI *as the caller*: the worker only proposes candidate ids,
so GRANTs and row-level security decide what a call may use, and a call still returns k
results when k visible rows exist: it pages through the ranking by what it has seen (a score
cursor), embedding the query once.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import adapters as lora
from . import lora_registry
from .bus import BusClient, Caller, JobOutcome, Submitted
from .errors import PLError
from .payloads import CURSOR_SLACK, EmbedPayload, SearchCursor, SearchPayload

F = TypeVar("F", bound=Callable[..., Any])

SNIPPET_CHARS = 240
MAX_SEARCH_ROUNDS = 8
GROWTH = 4  # each further round asks for this many times more candidates
BUS_DSN_FILE = "themis_bus.dsn"  # in the server's data directory (a backend's cwd)
_CONTEXT_KEY = "themis_backend"


def _raises_sql_errors(func: F) -> F:
    """Turn PLError into a PostgreSQL error with its SQLSTATE and hint."""

    @functools.wraps(func)
    def wrapper(plpy: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(plpy, *args, **kwargs)
        except PLError as exc:
            if exc.hint:
                plpy.error(exc.message, hint=exc.hint, sqlstate=exc.sqlstate)
            plpy.error(exc.message, sqlstate=exc.sqlstate)

    return wrapper  # type: ignore[return-value]


# -- argument checks that need no settings -------------------------------------------------
def validate_text(value: Any, name: str) -> str:
    if value is None:
        raise PLError(f"{name} must not be NULL", sqlstate="22004")
    if not str(value).strip():
        raise PLError(f"{name} must not be empty", sqlstate="22023")
    return str(value)


def validate_k(value: Any) -> int:
    if value is None:
        raise PLError("k must not be NULL", sqlstate="22004")
    if int(value) < 1:
        raise PLError(f"k must be at least 1, got {value}", sqlstate="22023")
    return int(value)


def validate_max_tokens(value: Any) -> int | None:
    """None: bus_submit fills in the default (256, or max_tokens_limit if lower)."""
    if value is None:
        return None
    if int(value) < 1:
        raise PLError(f"max_tokens must be at least 1, got {value}", sqlstate="22023")
    return int(value)


def validate_filter(value: Any) -> dict[str, Any] | None:
    """A metadata filter: a jsonb object (PL/Python hands jsonb over as its text)."""
    if value is None:
        return None
    parsed = json.loads(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        kind = "array" if isinstance(parsed, list) else type(parsed).__name__
        raise PLError(f"filter must be a jsonb object, e.g. '{{\"lang\": \"en\"}}', "
                      f"not a {kind}", sqlstate="22023")
    return parsed


def validate_float(value: Any, name: str, low: float, high: float,
                   default: float | None) -> float | None:
    if value is None:
        return default
    if math.isnan(value) or not low <= value <= high:
        raise PLError(f"{name} must be between {low:g} and {high:g}, got {value}",
                      sqlstate="22023")
    return float(value)


# -- what a backend needs once ---------------------------------------------------------------
class Backend:
    """Per-backend state kept in GD: the bus client and this backend's identity."""

    def __init__(self, plpy: Any) -> None:
        row = plpy.execute("SELECT socket_dir, port, dbname, backend_start, "
                           "pg_backend_pid() AS pid FROM themis.bus_endpoint()")[0]
        self.pid = int(row["pid"])
        self.backend_start = str(row["backend_start"])
        self.bus = BusClient(bus_dsn(row))
        self.role_plan = plpy.prepare("SELECT current_user::text AS role")
        self.ping_plan = plpy.prepare("SELECT 1")
        # planned once per backend; executed as the current user, so rights still apply
        self.visible_plan = plpy.prepare(VISIBLE_SQL, ["bigint[]", "integer"])


def bus_dsn(endpoint: dict[str, Any]) -> str:
    """Where the bus connects: ``THEMIS_BUS_DSN`` in the server's environment, else the file
    ``themis_bus.dsn`` in its data directory, else this server's own unix socket as role
    themis_bus.  Kept out of themis.config, which every caller can read: a DSN may hold a
    password."""
    if dsn := os.environ.get("THEMIS_BUS_DSN", "").strip():
        return dsn
    try:
        dsn = Path(BUS_DSN_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        dsn = ""
    if dsn:
        return dsn
    parts = {"host": endpoint["socket_dir"] or "localhost", "port": endpoint["port"],
             "dbname": endpoint["dbname"], "user": "themis_bus"}
    return " ".join(f"{k}='{_quote(str(v))}'" for k, v in parts.items())


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def backend(plpy: Any, GD: dict[str, Any]) -> Backend:
    state = GD.get(_CONTEXT_KEY)
    if not isinstance(state, Backend):
        state = Backend(plpy)
        GD[_CONTEXT_KEY] = state
    return state


class Session:
    """One SQL call: who calls, its bus, and one deadline over all of its jobs."""

    def __init__(self, plpy: Any, GD: dict[str, Any], timeout_s: Any) -> None:
        self.plpy = plpy
        self.backend = backend(plpy, GD)
        self.timeout_s = validate_float(timeout_s, "timeout_s", 0.001, 86400.0, None)
        role = plpy.execute(self.backend.role_plan)[0]["role"]
        self.caller = Caller(role=str(role), pid=self.backend.pid,
                             backend_start=self.backend.backend_start)
        self.started = time.monotonic()
        self.deadline: float | None = None
        self.stated_timeout_s = 0.0

    def check_interrupts(self) -> None:
        """Any SPI call processes pending interrupts: statement_timeout, cancel, disconnect."""
        self.plpy.execute(self.backend.ping_plan)

    def _submit(self, kind: str, payload: dict[str, Any]) -> Submitted:
        if self.deadline is None:
            remaining = self.timeout_s
        else:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise PLError(f"themis call timed out after {self.stated_timeout_s:g} s",
                              sqlstate="57014", hint="Pass a larger timeout_s or add workers.")
        job = self.backend.bus.submit(kind, json.dumps(payload), self.caller, remaining)
        if self.deadline is None:  # the first job says which timeout is in force
            self.stated_timeout_s = job.timeout_s
            self.deadline = self.started + job.timeout_s
        return job

    def run(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        job = self._submit(kind, payload)
        assert self.deadline is not None
        outcome = self.backend.bus.wait(job, self.deadline, self.stated_timeout_s,
                                        self.check_interrupts)
        return _result_or_raise(kind, outcome)

    def stream(self, kind: str, payload: dict[str, Any]) -> Iterator[str]:
        """The pieces of a streamed job as they come; its failure raises at the end."""
        job = self._submit(kind, payload)
        assert self.deadline is not None
        for item in self.backend.bus.follow(job, self.deadline, self.stated_timeout_s,
                                            self.check_interrupts):
            if isinstance(item, str):
                yield item
            else:
                _result_or_raise(kind, item)


def _result_or_raise(kind: str, outcome: JobOutcome) -> dict[str, Any]:
    if outcome.status == "done" and outcome.result is not None:
        return outcome.result
    if outcome.status == "done":
        raise PLError(f"themis {kind} job finished, but its result was already taken "
                      "(the bus connection dropped while reading it)", sqlstate="58000",
                      hint="Retry the call.")
    if outcome.status == "cancelled":
        raise PLError(f"themis {kind} job was cancelled: {outcome.error or 'no reason given'}",
                      sqlstate=outcome.error_sqlstate or "57014")
    # The worker's message names the problem; its SQLSTATE and hint come along.
    raise PLError(outcome.error or f"themis {kind} job failed", hint=outcome.error_hint,
                  sqlstate=outcome.error_sqlstate or "XX000")


# -- retrieval as the caller ---------------------------------------------------------------
VISIBLE_SQL = (
    "SELECT d.id, d.content, d.metadata::text AS metadata, s.uri AS source "
    "FROM unnest($1::bigint[]) WITH ORDINALITY AS c(id, ord) "
    "JOIN themis.documents d ON d.id = c.id "
    "LEFT JOIN themis.sources s ON s.id = d.source_id "
    "ORDER BY c.ord LIMIT $2")


def visible_documents(session: Session, ids: list[int], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` of ``ids`` (in order) that the caller may read, fetched through
    SPI under the caller's own rights: GRANTs and row-level security apply."""
    if not ids or limit <= 0:
        return []
    rows = session.plpy.execute(session.backend.visible_plan, [ids, limit])
    return [dict(r) for r in rows]


def next_cursor(seen: dict[int, float], last_score: float) -> SearchCursor:
    """Continue below the last candidate's score; exclude what was seen near that boundary
    (ties at the cut, or rows whose score rounds differently in another batch)."""
    return SearchCursor(last_score, tuple(sorted(
        i for i, s in seen.items() if s <= last_score + CURSOR_SLACK)))


def top_k_visible(session: Session, query: str, k: int,
                  flt: dict[str, Any] | None = None, want_vector: bool = False
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The k best documents the caller can see, best first, and the search's stats.

    Candidates come from the worker, which sees every row; those the caller cannot read are
    skipped, and further rounds continue below the last score seen (GROWTH times more each),
    until k are found or the ranking is exhausted.  A row is never offered twice.
    """
    n = max(4 * k, k + 16)
    stats: dict[str, Any] = {"embed_ms": 0.0, "search_ms": 0.0, "rounds": 0}
    picked: list[dict[str, Any]] = []
    seen: dict[int, float] = {}
    cursor: SearchCursor | None = None
    vector: str | None = None
    for _ in range(MAX_SEARCH_ROUNDS):
        result = session.run("search", SearchPayload(
            query, k, n, cursor, vector, flt, want_vector and vector is None).to_json())
        stats["rounds"] += 1
        stats["embed_ms"] += result.get("embed_ms", 0.0)
        stats["search_ms"] += result.get("search_ms", 0.0)
        stats["embedding_model"] = result.get("model")
        stats.setdefault("vector_b64", result.get("vector_b64"))
        candidates = [(int(i), float(s)) for i, s in result["candidates"]]
        fresh = [(i, s) for i, s in candidates if i not in seen]
        seen.update(fresh)
        scores = dict(fresh)
        found = visible_documents(session, [i for i, _ in fresh], k - len(picked))
        picked += [dict(d, score=scores[int(d["id"])]) for d in found]
        if len(picked) >= k or result.get("exhausted", True) or not candidates:
            break
        cursor = next_cursor(seen, candidates[-1][1])
        vector = result.get("vector_b64")
        n = min(n * GROWTH, int(result.get("max_candidates", n)))
    # Best first across rounds too: a later round scores its rows in another batch, and a
    # row at the boundary can come back a rounding step above the previous round's last.
    picked.sort(key=lambda d: -d["score"])  # stable: ties keep their order
    return picked, stats


# -- entry points ----------------------------------------------------------------------------
@_raises_sql_errors
def rag(plpy: Any, GD: dict[str, Any], query: Any, k: Any, *, max_tokens: Any = None,
        temperature: Any = None, timeout_s: Any = None, filter: Any = None,
        adapters: Any = None, adapter_weights: Any = None, auto_adapters: Any = None,
        domains: Any = None) -> dict[str, Any]:
    started = time.monotonic()
    args = RagArguments.checked(query, k, max_tokens, temperature, filter,
                                lora.choose(adapters, adapter_weights, auto_adapters, domains))
    session = Session(plpy, GD, timeout_s)
    docs, stats, uses = retrieve_with_adapters(session, args)
    t_gen = time.monotonic()
    gen = session.run("generate", args.payload(docs, adapters=uses))
    done = time.monotonic()
    return {
        "answer": gen["answer"],
        "adapters": [{"name": u["name"], "scale": u["scale"]} for u in uses],
        "sources": [
            {"id": d["id"], "score": round(d["score"], 6), "source": d["source"],
             "snippet": d["content"][:SNIPPET_CHARS],
             "metadata": json.loads(d["metadata"]) if d["metadata"] else {},
             **({"domain": d["domain"]} if "domain" in d else {})}
            for d in docs
        ],
        "model": gen.get("model"),
        "embedding_model": stats.get("embedding_model"),
        "k": args.k,
        "usage": {"prompt_tokens": gen.get("prompt_tokens"),
                  "completion_tokens": gen.get("completion_tokens"),
                  "contexts_used": gen.get("contexts_used")},
        "timings": {
            "embed_ms": round(stats["embed_ms"], 3),
            "search_ms": round(stats["search_ms"], 3),
            "search_rounds": stats["rounds"],
            "retrieval_total_ms": round((t_gen - started) * 1000, 3),
            "generate_ms": round(gen.get("generate_ms", 0.0), 3),
            "total_ms": round((done - started) * 1000, 3),
        },
    }


@dataclass(frozen=True)
class RagArguments:
    """The arguments of themis_rag and its variants, checked."""

    query: str
    k: int
    max_tokens: int | None
    temperature: float
    filter: dict[str, Any] | None
    adapters: lora.AdapterChoice

    @classmethod
    def checked(cls, query: Any, k: Any, max_tokens: Any, temperature: Any,
                flt: Any, adapters: lora.AdapterChoice | None = None) -> RagArguments:
        return cls(validate_text(query, "query"), validate_k(k),
                   validate_max_tokens(max_tokens),
                   validate_float(temperature, "temperature", 0.0, 2.0, 0.0) or 0.0,
                   validate_filter(flt),
                   adapters or lora.choose(None, None, None, None))

    def payload(self, docs: list[dict[str, Any]], stream: bool = False,
                adapters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The generation job over ``docs`` (bus_submit cuts each to max_context_chars)."""
        out: dict[str, Any] = {
            "mode": "rag", "query": self.query, "temperature": self.temperature,
            "contexts": [{"id": d["id"], "content": d["content"], "source": d["source"]}
                         for d in docs]}
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        if stream:
            out["stream"] = True
        if adapters:
            out["adapters"] = adapters
        return out


@_raises_sql_errors
def rag_stream(plpy: Any, GD: dict[str, Any], query: Any, k: Any, *, max_tokens: Any = None,
               temperature: Any = None, timeout_s: Any = None, filter: Any = None,
               adapters: Any = None, adapter_weights: Any = None, auto_adapters: Any = None,
               domains: Any = None) -> Iterator[str]:
    """themis_rag_stream: the checks and the retrieval happen here, before the first row;
    then the answer's pieces as the worker generates them."""
    args = RagArguments.checked(query, k, max_tokens, temperature, filter,
                                lora.choose(adapters, adapter_weights, auto_adapters, domains))
    session = Session(plpy, GD, timeout_s)
    docs, _, uses = retrieve_with_adapters(session, args)
    return _pieces(plpy, session.stream("generate", args.payload(docs, stream=True,
                                                                   adapters=uses)))


def retrieve_with_adapters(session: Session, args: RagArguments
                           ) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """The documents, the search's stats and the adapters of a RAG call.  With domains
    (federated RAG) each domain gets its share of k from its own documents
    (``metadata->>'domain'``), the merged list best first, each row marked with its domain."""
    choice = args.adapters
    if not choice.domains:
        docs, stats = top_k_visible(session, args.query, args.k, args.filter,
                                    want_vector=choice.auto)
        uses = lora.auto_select(session.plpy, stats.get("vector_b64")) if choice.auto else \
            lora.explicit_adapters(session.plpy, choice)
        return docs, stats, uses
    docs = []
    total: dict[str, Any] = {"embed_ms": 0.0, "search_ms": 0.0, "rounds": 0}
    share = -(-args.k // len(choice.domains))  # ceil: every domain gets its place
    for domain in choice.domains:
        found, st = top_k_visible(session, args.query, share,
                                  {**(args.filter or {}), "domain": domain})
        docs += [dict(d, domain=domain) for d in found]
        for key in ("embed_ms", "search_ms", "rounds"):
            total[key] += st[key]
        total["embedding_model"] = st.get("embedding_model")
    docs.sort(key=lambda d: -d["score"])  # k rounded up to whole shares: no domain is cut
    return docs, total, \
        lora.domain_adapters(session.plpy, choice)


def _pieces(plpy: Any, pieces: Iterator[str]) -> Iterator[str]:
    """Errors raised while rows are produced become PostgreSQL errors too."""
    try:
        yield from pieces
    except PLError as exc:
        if exc.hint:
            plpy.error(exc.message, hint=exc.hint, sqlstate=exc.sqlstate)
        plpy.error(exc.message, sqlstate=exc.sqlstate)


@_raises_sql_errors
def search_rows(plpy: Any, GD: dict[str, Any], query: Any, k: Any, *,
                timeout_s: Any = None, filter: Any = None) -> list[dict[str, Any]]:
    query = validate_text(query, "query")
    k = validate_k(k)
    flt = validate_filter(filter)
    session = Session(plpy, GD, timeout_s)
    docs, _ = top_k_visible(session, query, k, flt)
    return [{"id": d["id"], "score": d["score"], "content": d["content"],
             "metadata": d["metadata"]} for d in docs]


@_raises_sql_errors
def embed(plpy: Any, GD: dict[str, Any], text: Any, *, timeout_s: Any = None) -> str:
    text = validate_text(text, "input")
    session = Session(plpy, GD, timeout_s)
    result = session.run("embed", EmbedPayload(text).to_json())
    return "[" + ",".join(repr(float(x)) for x in result["embedding"]) + "]"


@_raises_sql_errors
def lora_register(plpy: Any, GD: dict[str, Any], name: Any, adapter: Any, *, domain: Any,
                  description: Any, examples: Any, default_scale: Any,
                  base_model: Any, timeout_s: Any = None) -> str:
    """themis_lora_register: the registered row as jsonb text."""
    name = validate_text(name, "name")
    if adapter is None:
        raise PLError("adapter must not be NULL", sqlstate="22004")
    scale = 1.0 if default_scale is None else float(default_scale)
    session: list[Session] = []  # one session (one deadline) for all the texts' embeddings

    def embed_text(text: str) -> list[float]:
        if not session:
            session.append(Session(plpy, GD, timeout_s))
        result = session[0].run("embed", EmbedPayload(text).to_json())
        return [float(x) for x in result["embedding"]]

    row = lora_registry.register(plpy, embed_text, name=name, data=bytes(adapter),
                                 domain=domain, description=description or "",
                                 examples=examples, default_scale=scale,
                                 base_model=base_model)
    return json.dumps(row)


@_raises_sql_errors
def lora_remove(plpy: Any, name: Any) -> None:
    lora_registry.remove(plpy, validate_text(name, "name"))


@_raises_sql_errors
def generate(plpy: Any, GD: dict[str, Any], prompt: Any, *, max_tokens: Any = None,
             temperature: Any = None, timeout_s: Any = None) -> dict[str, Any]:
    prompt = validate_text(prompt, "prompt")
    payload: dict[str, Any] = {"mode": "raw", "prompt": prompt}
    if (max_tokens := validate_max_tokens(max_tokens)) is not None:
        payload["max_tokens"] = max_tokens
    payload["temperature"] = validate_float(temperature, "temperature", 0.0, 2.0, 0.0)
    session = Session(plpy, GD, timeout_s)
    return session.run("generate", payload)
