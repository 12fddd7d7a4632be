"""``themis_lora_register`` and ``themis_lora_remove``: the LoRA registry written through SQL,
in the caller's transaction and under the caller's rights.

Registration checks the file (``bytea``) here in the backend, against the base model's
architecture and matrix shapes that registering the model recorded in
``themis.models.gguf_header`` (lora_check.py: the same rules as ``themis lora add``), so it
needs neither the model file nor a worker on this host.  Only the centroid (what automatic
selection compares queries with) needs the embedding model: the description and each example
are embedded by a worker, as a query is, and the normalised mean is stored.  The row and the
file's bytes (1 MiB chunks) are written as the caller: the INSERT rights that ``themis_admin``
holds on the registry decide who may register, and a rollback of the caller's transaction
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from .errors import PLError
from .lora_check import AdapterProblem, check_adapter_bytes

__all__ = ["centroid_of", "register", "remove"]

CHUNK = 1 << 20  # bytes per row of themis.lora_adapter_chunks (as the CLI writes them)
MAX_SCALE = 16.0

_BASE_SQL = ("SELECT name, gguf_header::text AS header FROM themis.models "
             "WHERE kind = 'generation' AND CASE WHEN $1::text IS NULL THEN is_default "
             "ELSE name = $1 END")
_INSERT_SQL = (
    "INSERT INTO themis.lora_adapters (name, domain, base_model, rank, alpha, default_scale, "
    "description, sha256, size_bytes, centroid) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "
    "$10::public.vector) RETURNING id")  # pgvector lives in public (revision 0001)
_CHUNKS_SQL = (
    "INSERT INTO themis.lora_adapter_chunks (adapter_id, seq, data) "
    "SELECT $1, g, substring($2 FROM g * $3 + 1 FOR $3) FROM generate_series(0, $4 - 1) AS g")
_ROW_SQL = (
    "SELECT jsonb_build_object('id', id, 'name', name, 'domain', domain, 'base_model', "
    "base_model, 'rank', rank, 'alpha', alpha, 'default_scale', default_scale, 'description', "
    "description, 'sha256', sha256, 'size_bytes', size_bytes, 'has_centroid', "
    "centroid IS NOT NULL, 'created_at', created_at)::text AS row "
    "FROM themis.lora_adapters WHERE id = $1")
_REMOVE_SQL = "DELETE FROM themis.lora_adapters WHERE name = $1 RETURNING id"


def centroid_of(embeddings: list[list[float]]) -> list[float]:
    """Where an adapter sits among queries: the normalised mean of its texts' embeddings (as
    the CLI computes it)."""
    dim = len(embeddings[0])
    mean = [sum(e[i] for e in embeddings) / len(embeddings) for i in range(dim)]
    norm = max(math.sqrt(sum(x * x for x in mean)), 1e-12)
    return [x / norm for x in mean]


def _texts(description: str, examples: Any) -> list[str]:
    if examples is not None and any(e is None for e in examples):
        raise PLError("examples must not contain NULL", sqlstate="22004")
    return [t for t in (description, *(examples or ())) if str(t).strip()]


def _base_model(plpy: Any, base_model: str | None) -> tuple[str, tuple[str, dict[str, Any]]]:
    rows = plpy.execute(plpy.prepare(_BASE_SQL, ["text"]), [base_model])
    if not rows:
        if base_model is None:
            raise PLError("no default generation model is registered", sqlstate="42704",
                          hint="Run `themis models fetch`, or pass base_model.")
        raise PLError(f"generation model {base_model!r} is not registered", sqlstate="42704",
                      hint="SELECT name FROM themis.models WHERE kind = 'generation' lists "
                           "them.")
    name, header = rows[0]["name"], rows[0]["header"]
    if header is None:
        raise PLError(f"the tensor shapes of generation model {name!r} are not recorded, so "
                      "adapters for it cannot be checked here", sqlstate="55000",
                      hint="Register the model again (`themis models register`), or register "
                           "the adapter with `themis lora add`.")
    parsed = json.loads(header)
    shapes = {k: tuple(v) for k, v in parsed["tensors"].items()}
    return str(name), (str(parsed["architecture"]), shapes)


def register(plpy: Any, embed: Callable[[str], list[float]], *, name: str, data: bytes,
             domain: str | None, description: str, examples: Any, default_scale: float,
             base_model: str | None) -> dict[str, Any]:
    """Check and store one adapter; the registered row as a dict.  ``embed`` embeds a text
    on a worker (called only when there is a description or an example)."""
    if not math.isfinite(default_scale) or not 0.0 <= default_scale <= MAX_SCALE:
        raise PLError(f"default_scale must be between 0 and {MAX_SCALE:g}, got "
                      f"{default_scale}", sqlstate="22023")
    texts = _texts(description, examples)
    model, base = _base_model(plpy, base_model)
    try:
        facts = check_adapter_bytes(data, base, base_label=f"the base model {model}")
    except AdapterProblem as exc:
        raise PLError(str(exc), sqlstate="22023",
                      hint="LoRA adapters are GGUF files; `themis lora import DIR` converts "
                           "a PEFT adapter.") from exc
    centroid = None
    if texts:
        centroid = "[" + ",".join(repr(x) for x in centroid_of([embed(t) for t in texts])) + "]"
    try:
        adapter_id = plpy.execute(
            plpy.prepare(_INSERT_SQL, ["text", "text", "text", "integer", "real", "real",
                                       "text", "text", "bigint", "text"]),
            [name, domain, model, facts.rank, facts.alpha, default_scale, description,
             hashlib.sha256(data).hexdigest(), len(data), centroid])[0]["id"]
    except plpy.SPIError as exc:
        state = getattr(exc, "sqlstate", None)
        if state == "23505":
            raise PLError(f"an adapter named {name!r} is already registered",
                          sqlstate="42710",
                          hint="Remove it first: SELECT themis_lora_remove(name).") from exc
        if state == "23514" and "lora_adapters_name_check" in str(exc):
            raise PLError(f"invalid adapter name {name!r} (letters, digits and ._:+- only, "
                          "starting with a letter or digit, at most 128)",
                          sqlstate="22023") from exc
        raise
    plpy.execute(plpy.prepare(_CHUNKS_SQL, ["bigint", "bytea", "integer", "integer"]),
                 [adapter_id, data, CHUNK, -(-len(data) // CHUNK)])
    row: dict[str, Any] = json.loads(
        plpy.execute(plpy.prepare(_ROW_SQL, ["bigint"]), [adapter_id])[0]["row"])
    return row


def remove(plpy: Any, name: str) -> None:
    if not plpy.execute(plpy.prepare(_REMOVE_SQL, ["text"]), [name]):
        raise PLError(f"no LoRA adapter named {name!r}", sqlstate="42704",
                      hint="SELECT name FROM themis.lora_adapters lists the ones you may see.")
