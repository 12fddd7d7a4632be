"""Entry points of the SQL functions (``sql/functions.sql``); each takes ``plpy`` and ``GD``.

Everything a caller passes is validated here against limits in ``themis.config`` (which
callers cannot change) before a job is queued.  Documents are read back through SPI *as the
caller*: the worker only proposes candidate ids, so GRANTs and row-level security decide what
a call may use, and a call still returns k results when k visible rows exist (it asks the
worker for more candidates until enough are visible or the corpus is exhausted).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .bus import BusClient, Caller, JobOutcome
from .errors import PLError

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_MAX_TOKENS = 256
SNIPPET_CHARS = 240
MAX_SEARCH_ROUNDS = 6
MAX_CANDIDATES = 100_000  # per search; beyond it a caller sees fewer than k rows
MAX_CONTEXT_CHARS = 16_000  # per document sent to generation; the prompt is cut to fit anyway


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


# -- configuration and validation ----------------------------------------------------------
def load_config(plpy: Any) -> dict[str, Any]:
    rows = plpy.execute("SELECT key, value::text AS value FROM themis.config")
    return {row["key"]: json.loads(row["value"]) for row in rows}


def validate_text(value: Any, name: str, limit: int, limit_key: str) -> str:
    if value is None:
        raise PLError(f"{name} must not be NULL", sqlstate="22004")
    if not value.strip():
        raise PLError(f"{name} must not be empty", sqlstate="22023")
    if len(value) > limit:
        raise PLError(
            f"{name} is {len(value)} characters long; the limit is {limit}",
            sqlstate="54000", hint=f"Shorten it, or raise {limit_key} in themis.config.")
    return str(value)


def validate_int(value: Any, name: str, low: int, high: int, default: int | None = None) -> int:
    if value is None:
        if default is None:
            raise PLError(f"{name} must not be NULL", sqlstate="22004")
        return default
    if not low <= value <= high:
        raise PLError(f"{name} must be between {low} and {high}, got {value}",
                      sqlstate="22023")
    return int(value)


def validate_float(value: Any, name: str, low: float, high: float, default: float) -> float:
    if value is None:
        return default
    if math.isnan(value) or not low <= value <= high:
        raise PLError(f"{name} must be between {low:g} and {high:g}, got {value}",
                      sqlstate="22023")
    return float(value)


def validate_timeout(value: Any, config: dict[str, Any]) -> float:
    return validate_float(value, "timeout_s", 0.001, 86400.0, float(config["default_timeout_s"]))


def validate_generation(config: dict[str, Any], max_tokens: Any,
                        temperature: Any) -> dict[str, Any]:
    return {
        "max_tokens": validate_int(max_tokens, "max_tokens", 1, int(config["max_tokens_limit"]),
                                   default=min(DEFAULT_MAX_TOKENS,
                                               int(config["max_tokens_limit"]))),
        "temperature": validate_float(temperature, "temperature", 0.0, 2.0, 0.0),
    }


# -- the bus from this backend -------------------------------------------------------------
def bus_dsn(plpy: Any) -> str:
    """``bus_dsn`` from themis.config, else this server's own unix socket and database."""
    row = plpy.execute("SELECT dsn, socket_dir, port, dbname FROM themis.bus_endpoint()")[0]
    if row["dsn"]:
        return str(row["dsn"])
    parts = {"host": row["socket_dir"] or "localhost", "port": row["port"],
             "dbname": row["dbname"], "user": "themis_bus"}
    return " ".join(f"{k}='{_quote(v)}'" for k, v in parts.items())


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def get_bus(plpy: Any, GD: dict[str, Any]) -> BusClient:
    dsn = bus_dsn(plpy)
    bus = GD.get("themis_bus")
    if not isinstance(bus, BusClient) or bus.dsn != dsn:
        bus = BusClient(dsn)
        GD["themis_bus"] = bus
    return bus


def current_caller(plpy: Any) -> Caller:
    row = plpy.execute(
        "SELECT current_user::text AS role, pg_backend_pid() AS pid, "
        "themis.caller_backend_start() AS started")[0]
    return Caller(role=row["role"], pid=int(row["pid"]), backend_start=row["started"])


class Session:
    """One SQL call: its config, bus, caller identity and overall deadline."""

    def __init__(self, plpy: Any, GD: dict[str, Any], timeout_s: Any) -> None:
        self.plpy = plpy
        self.config = load_config(plpy)
        self.timeout_s = validate_timeout(timeout_s, self.config)
        self.deadline = time.monotonic() + self.timeout_s
        self.bus = get_bus(plpy, GD)
        self.caller = current_caller(plpy)
        self._ping = plpy.prepare("SELECT 1")

    def check_interrupts(self) -> None:
        """Any SPI call processes pending interrupts: statement_timeout, cancel, disconnect."""
        self.plpy.execute(self._ping)

    def run(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise PLError(f"themis call timed out after {self.timeout_s:g} s", sqlstate="57014")
        outcome = self.bus.call(kind, json.dumps(payload), self.caller, remaining,
                                self.check_interrupts, call_timeout_s=self.timeout_s,
                                worker_grace_s=float(self.config["worker_stale_s"]))
        return _result_or_raise(kind, outcome)


def _result_or_raise(kind: str, outcome: JobOutcome) -> dict[str, Any]:
    if outcome.status == "done" and outcome.result is not None:
        return outcome.result
    if outcome.status == "cancelled":
        raise PLError(f"themis {kind} job was cancelled: {outcome.error or 'no reason given'}",
                      sqlstate=outcome.error_sqlstate or "57014")
    # The worker's message names the problem; its SQLSTATE and hint come along.
    raise PLError(outcome.error or f"themis {kind} job failed", hint=outcome.error_hint,
                  sqlstate=outcome.error_sqlstate or "XX000")


# -- retrieval as the caller ---------------------------------------------------------------
def visible_documents(plpy: Any, ids: list[int], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` of ``ids`` (in order) that the caller may read, fetched through
    SPI under the caller's own rights: GRANTs and row-level security apply."""
    if not ids or limit <= 0:
        return []
    plan = plpy.prepare(
        "SELECT d.id, d.content, d.metadata::text AS metadata, s.uri AS source "
        "FROM unnest($1::bigint[]) WITH ORDINALITY AS c(id, ord) "
        "JOIN themis.documents d ON d.id = c.id "
        "LEFT JOIN themis.sources s ON s.id = d.source_id "
        "ORDER BY c.ord LIMIT $2", ["bigint[]", "integer"])
    return [dict(r) for r in plpy.execute(plan, [ids, limit])]


def top_k_visible(session: Session, query: str, k: int) -> tuple[list[dict[str, Any]],
                                                                dict[str, Any]]:
    """The k best documents the caller can see, best first, and the search's stats.

    Candidates come from the worker, which sees every row; those the caller cannot read are
    skipped, and more are asked for (4x each round) until k are found or none are left.
    """
    n = max(4 * k, k + 16)
    stats: dict[str, Any] = {"embed_ms": 0.0, "search_ms": 0.0}
    picked: list[dict[str, Any]] = []
    checked = 0  # candidates already examined in earlier rounds (rankings are stable)
    for _ in range(MAX_SEARCH_ROUNDS):
        result = session.run("search", {"query": query, "n": n})
        stats["embed_ms"] += result.get("embed_ms", 0.0)
        stats["search_ms"] += result.get("search_ms", 0.0)
        stats["embedding_model"] = result.get("model")
        candidates = result["candidates"][checked:]
        scores = {int(i): float(s) for i, s in candidates}
        found = visible_documents(session.plpy, [int(i) for i, _ in candidates], k - len(picked))
        picked += [dict(d, score=scores[int(d["id"])]) for d in found]
        checked += len(candidates)
        if len(picked) >= k or result.get("exhausted", True) or n >= MAX_CANDIDATES:
            break
        n = min(n * 4, MAX_CANDIDATES)
    return picked, stats


# -- entry points ----------------------------------------------------------------------------
@_raises_sql_errors
def rag(plpy: Any, GD: dict[str, Any], query: Any, k: Any, *, max_tokens: Any = None,
        temperature: Any = None, timeout_s: Any = None) -> dict[str, Any]:
    started = time.monotonic()
    session = Session(plpy, GD, timeout_s)
    cfg = session.config
    query = validate_text(query, "query", int(cfg["max_query_chars"]), "max_query_chars")
    k = validate_int(k, "k", 1, int(cfg["max_k"]))
    options = validate_generation(cfg, max_tokens, temperature)
    docs, stats = top_k_visible(session, query, k)
    t_gen = time.monotonic()
    contexts = [{"id": d["id"], "content": d["content"][:MAX_CONTEXT_CHARS],
                 "source": d["source"]} for d in docs]
    gen = session.run("generate", {"mode": "rag", "query": query, "contexts": contexts,
                                   **options})
    done = time.monotonic()
    return {
        "answer": gen["answer"],
        "sources": [
            {"id": d["id"], "score": round(d["score"], 6), "source": d["source"],
             "snippet": d["content"][:SNIPPET_CHARS],
             "metadata": json.loads(d["metadata"]) if d["metadata"] else {}}
            for d in docs
        ],
        "model": gen.get("model"),
        "embedding_model": stats.get("embedding_model"),
        "k": k,
        "usage": {"prompt_tokens": gen.get("prompt_tokens"),
                  "completion_tokens": gen.get("completion_tokens"),
                  "contexts_used": gen.get("contexts_used")},
        "timings": {
            "embed_ms": round(stats["embed_ms"], 3),
            "search_ms": round(stats["search_ms"], 3),
            "retrieval_total_ms": round((t_gen - started) * 1000, 3),
            "generate_ms": round(gen.get("generate_ms", 0.0), 3),
            "total_ms": round((done - started) * 1000, 3),
        },
    }


@_raises_sql_errors
def search_rows(plpy: Any, GD: dict[str, Any], query: Any, k: Any, *,
                timeout_s: Any = None) -> list[dict[str, Any]]:
    session = Session(plpy, GD, timeout_s)
    cfg = session.config
    query = validate_text(query, "query", int(cfg["max_query_chars"]), "max_query_chars")
    k = validate_int(k, "k", 1, int(cfg["max_k"]))
    docs, _ = top_k_visible(session, query, k)
    return [{"id": d["id"], "score": d["score"], "content": d["content"],
             "metadata": d["metadata"]} for d in docs]


@_raises_sql_errors
def embed(plpy: Any, GD: dict[str, Any], text: Any, *, timeout_s: Any = None) -> str:
    session = Session(plpy, GD, timeout_s)
    text = validate_text(text, "input", int(session.config["max_query_chars"]),
                         "max_query_chars")
    result = session.run("embed", {"text": text})
    return "[" + ",".join(repr(float(x)) for x in result["embedding"]) + "]"


@_raises_sql_errors
def generate(plpy: Any, GD: dict[str, Any], prompt: Any, *, max_tokens: Any = None,
             temperature: Any = None, timeout_s: Any = None) -> dict[str, Any]:
    session = Session(plpy, GD, timeout_s)
    cfg = session.config
    prompt = validate_text(prompt, "prompt", int(cfg["max_prompt_chars"]), "max_prompt_chars")
    options = validate_generation(cfg, max_tokens, temperature)
    return session.run("generate", {"mode": "raw", "prompt": prompt, **options})
