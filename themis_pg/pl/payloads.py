"""Typed job payloads: what a job row's ``payload`` holds, for each job kind.

Both sides of the bus import this module: the SQL functions (``themis_pl``, inside
PostgreSQL) build payloads with it, and the worker parses every claimed payload with it, so
the two can never disagree about a field.  ``bus_submit`` (sql/api/10_bus.sql) enforces the
same limits in SQL for anyone who logs in as ``themis_bus``; the worker applies them again
(``parse``), so a payload that slipped past neither fails with a clear error instead of
costing the worker a 10-million-row top-k.

Standard library only: this file runs inside the server's Python.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

JOB_KINDS = ("search", "embed", "generate")
MAX_VECTOR_B64_CHARS = 350_000  # 65,536 float32 dimensions, base64
# Scores of one query against the same rows can differ in the last bits between batches of
# other sizes (BLAS blocking, GPU kernels).  A later round of a paged search looks this far
# above its cursor and excludes the ids it already saw there: no row skipped or repeated.
CURSOR_SLACK = 1e-4


class PayloadError(Exception):
    """A payload breaks a rule; ``sqlstate`` is what the caller should see."""

    def __init__(self, message: str, *, sqlstate: str = "22023", hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.hint = hint


@dataclass(frozen=True)
class Limits:
    """The caps of ``themis.config`` that bound a payload (defaults: revision 0002's)."""

    max_k: int = 100
    max_candidates: int = 100_000
    max_query_chars: int = 4000
    max_prompt_chars: int = 200_000
    max_context_chars: int = 16_000
    max_tokens_limit: int = 2048

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Limits:
        """Limits from ``{key: value}`` rows of themis.config; missing keys keep defaults."""
        known = {name: int(config[name]) for name in cls.__dataclass_fields__ if name in config}
        return cls(**known)


@dataclass(frozen=True)
class SearchCursor:
    """Where the previous round of the same search stopped: only rows scoring at most
    ``score`` (plus a rounding slack) come next, minus ``exclude`` (ids already seen at that
    boundary).  Paging by what was seen, not by position, so rows inserted between rounds or
    tied at the cut are neither repeated nor skipped."""

    score: float
    exclude: tuple[int, ...] = ()


@dataclass(frozen=True)
class SearchPayload:
    """Top-``n`` candidate ids for ``query``; the caller keeps the first ``k`` it may read.

    ``vector_b64`` (the query's float32 embedding, base64, as the first round returned it)
    spares later rounds of one call a second embedding.
    """

    query: str
    k: int
    n: int
    cursor: SearchCursor | None = None
    vector_b64: str | None = None
    filter: dict[str, Any] | None = None  # jsonb containment on documents.metadata
    want_vector: bool = False  # return the query's embedding (automatic adapter selection)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"query": self.query, "k": self.k, "n": self.n}
        if self.want_vector:
            out["want_vector"] = True
        if self.cursor is not None:
            out["cursor"] = {"score": self.cursor.score, "exclude": list(self.cursor.exclude)}
        if self.vector_b64 is not None:
            out["vector_b64"] = self.vector_b64
        if self.filter is not None:
            out["filter"] = self.filter
        return out


@dataclass(frozen=True)
class EmbedPayload:
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True)
class Context:
    """One retrieved document handed to generation (already filtered by the caller's rights)."""

    id: int
    content: str
    source: str | None = None


@dataclass(frozen=True)
class AdapterUse:
    """A LoRA adapter a generation applies: resolved by the caller (as the caller) from
    themis.lora_adapters, fetched by the worker by sha256."""

    name: str
    sha256: str
    scale: float


MAX_ADAPTERS = 8  # adapters fused into one generation


@dataclass(frozen=True)
class GeneratePayload:
    """``mode`` 'rag': answer ``query`` from ``contexts``; 'raw': complete ``prompt``."""

    mode: str
    max_tokens: int
    temperature: float = 0.0
    query: str | None = None
    prompt: str | None = None
    contexts: tuple[Context, ...] = field(default_factory=tuple)
    seed: int | None = None
    stream: bool = False  # the worker sends the answer's pieces as they are generated
    adapters: tuple[AdapterUse, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items()
               if v is not None and k not in ("contexts", "adapters")
               and not (k == "stream" and not v)}
        if self.mode == "rag":
            out["contexts"] = [asdict(c) for c in self.contexts]
        if self.adapters:
            out["adapters"] = [asdict(a) for a in self.adapters]
        return out


Payload = SearchPayload | EmbedPayload | GeneratePayload


# -- parsing (the worker's side, and the unit tests') -------------------------------------------
def _text(payload: dict[str, Any], key: str, limit: int, limit_key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(f"job payload needs a non-empty text {key!r}")
    if len(value) > limit:
        raise PayloadError(f"{key} is {len(value)} characters long; the limit is {limit}",
                           sqlstate="54000", hint=f"Shorten it, or raise {limit_key} in "
                                                  "themis.config.")
    return value


def _int(payload: dict[str, Any], key: str, low: int, high: int) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"job payload needs an integer {key!r}")
    if not low <= value <= high:
        raise PayloadError(f"{key} must be between {low} and {high}, got {value}")
    return value


def _float(payload: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"job payload's {key!r} must be a number")
    value = float(value)
    if math.isnan(value) or not low <= value <= high:
        raise PayloadError(f"{key} must be between {low:g} and {high:g}, got {value:g}")
    return value


def _search(payload: dict[str, Any], limits: Limits) -> SearchPayload:
    query = _text(payload, "query", limits.max_query_chars, "max_query_chars")
    k = _int(payload, "k", 1, limits.max_k)
    n = _int(payload, "n", k, limits.max_candidates)
    cursor = None
    if (raw := payload.get("cursor")) is not None:
        if not isinstance(raw, dict):
            raise PayloadError("job payload's 'cursor' must be an object")
        score = _float(raw, "score", -math.inf, math.inf, math.nan)
        exclude = raw.get("exclude", [])
        if (not isinstance(exclude, list) or len(exclude) > limits.max_candidates
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in exclude)):
            raise PayloadError("cursor 'exclude' must be a list of document ids")
        cursor = SearchCursor(score, tuple(exclude))
    vector = payload.get("vector_b64")
    if vector is not None and (not isinstance(vector, str)
                               or not 0 < len(vector) <= MAX_VECTOR_B64_CHARS):
        raise PayloadError("job payload's 'vector_b64' must be a base64 text")
    flt = payload.get("filter")
    if flt is not None and not isinstance(flt, dict):
        raise PayloadError("filter must be a jsonb object, e.g. '{\"lang\": \"en\"}'")
    want = payload.get("want_vector", False)
    if not isinstance(want, bool):
        raise PayloadError("job payload's 'want_vector' must be true or false")
    return SearchPayload(query, k, n, cursor, vector, flt, want)


def _contexts(raw: Any, limits: Limits) -> tuple[Context, ...]:
    if not isinstance(raw, list) or len(raw) > limits.max_k:
        raise PayloadError(f"job payload's 'contexts' must be a list of at most {limits.max_k}")
    out = []
    total = 0
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise PayloadError("each context needs a text 'content'")
        content = item["content"]
        if len(content) > limits.max_context_chars:
            raise PayloadError(f"a context is {len(content)} characters long; the limit is "
                               f"{limits.max_context_chars}", sqlstate="54000")
        total += len(content)
        source = item.get("source")
        doc_id = item.get("id", 0)
        if isinstance(doc_id, bool) or not isinstance(doc_id, int):
            raise PayloadError("a context's 'id' must be an integer")
        out.append(Context(doc_id, content, source if isinstance(source, str) else None))
    if total > limits.max_prompt_chars:
        raise PayloadError(f"the contexts hold {total} characters; the limit is "
                           f"{limits.max_prompt_chars}", sqlstate="54000")
    return tuple(out)


def _adapters(raw: Any) -> tuple[AdapterUse, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_ADAPTERS:
        raise PayloadError(f"job payload's 'adapters' must be a list of at most {MAX_ADAPTERS}")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise PayloadError("each adapter must be an object")
        name, sha, scale = item.get("name"), item.get("sha256"), item.get("scale")
        if not isinstance(name, str) or not isinstance(sha, str) or len(sha) != 64 or \
                isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                not 0.0 <= scale <= 16.0:
            raise PayloadError(f"invalid adapter entry {item!r} (name, sha256, a scale "
                               "between 0 and 16)")
        out.append(AdapterUse(name, sha, float(scale)))
    return tuple(out)


def _generate(payload: dict[str, Any], limits: Limits) -> GeneratePayload:
    mode = payload.get("mode", "rag")
    max_tokens = _int(payload, "max_tokens", 1, limits.max_tokens_limit)
    temperature = _float(payload, "temperature", 0.0, 2.0, 0.0)
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise PayloadError("job payload's 'seed' must be an integer")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise PayloadError("job payload's 'stream' must be true or false")
    adapters = _adapters(payload.get("adapters", []))
    if mode == "rag":
        query = _text(payload, "query", limits.max_query_chars, "max_query_chars")
        return GeneratePayload("rag", max_tokens, temperature, query=query,
                               contexts=_contexts(payload.get("contexts", []), limits), seed=seed,
                               stream=stream, adapters=adapters)
    if mode == "raw":
        prompt = _text(payload, "prompt", limits.max_prompt_chars, "max_prompt_chars")
        return GeneratePayload("raw", max_tokens, temperature, prompt=prompt, seed=seed,
                               stream=stream, adapters=adapters)
    raise PayloadError(f"unknown generation mode {mode!r}")


def parse(kind: str, payload: Any, limits: Limits) -> Payload:
    """The typed payload of a job of ``kind``; PayloadError says what is wrong with it."""
    if not isinstance(payload, dict):
        raise PayloadError("job payload must be a JSON object")
    if kind == "search":
        return _search(payload, limits)
    if kind == "embed":
        return EmbedPayload(_text(payload, "text", limits.max_query_chars, "max_query_chars"))
    if kind == "generate":
        return _generate(payload, limits)
    raise PayloadError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
