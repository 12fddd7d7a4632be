"""Which LoRA adapters a call applies, decided in the caller's backend, as the caller.

Three ways, one per call:

* **explicit**: ``adapters => ARRAY['legal-qa', ...]`` with optional ``adapter_weights``
  (scales; NULL: each adapter's default scale);
* **automatic**: ``auto_adapters => true``: the query's embedding against each visible
  adapter's centroid (cosine); adapters at or above ``lora_auto_threshold`` (themis.config)
  compete in a softmax at ``lora_auto_temperature``, the best ``lora_auto_max`` keep their
  share, times their default scale, so an unrelated query gets none;
* **federated**: ``domains => ARRAY['legal', 'medical']``: every visible adapter of those
  domains, the domains weighted equally unless ``adapter_weights`` gives one weight per
  domain (a domain's weight is shared by its adapters).

Every read of ``themis.lora_adapters`` runs under the caller's rights: GRANT and row-level
security decide which adapters a role may use; one it may not see is unknown (42704).
Weights are rounded to steps of 0.05, because every distinct set of scales is an engine of
its own on the worker (batching.py, adapters.py there).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from .errors import PLError
from .payloads import MAX_ADAPTERS

__all__ = ["AdapterChoice", "auto_select", "choose", "domain_adapters", "explicit_adapters",
           "softmax_choice", "validate_names"]

STEP = 0.05
AUTO_DEFAULTS = {"lora_auto_threshold": 0.3, "lora_auto_temperature": 0.05,
                 "lora_auto_max": 2.0}
_EXPLICIT_SQL = ("SELECT name, sha256, default_scale FROM themis.lora_adapters "
                 "WHERE name = ANY($1)")
_DOMAIN_SQL = ("SELECT name, sha256, default_scale, domain FROM themis.lora_adapters "
               "WHERE domain = ANY($1) ORDER BY name")
_CENTROID_SQL = ("SELECT name, sha256, default_scale, centroid::text AS centroid "
                 "FROM themis.lora_adapters WHERE centroid IS NOT NULL")
_CONFIG_SQL = "SELECT key, value::text AS value FROM themis.config WHERE key = ANY($1)"


@dataclass(frozen=True)
class AdapterChoice:
    """The checked adapter arguments of one call."""

    names: list[str]
    weights: list[float] | None
    auto: bool
    domains: list[str]


def validate_names(values: Any, what: str) -> list[str]:
    if values is None:
        return []
    if any(v is None or not str(v).strip() for v in values):
        raise PLError(f"{what} must not contain NULL or empty names", sqlstate="22023")
    clean = [str(v) for v in values]
    if len(clean) > MAX_ADAPTERS or len(set(clean)) != len(clean):
        raise PLError(f"{what} must name at most {MAX_ADAPTERS} distinct values",
                      sqlstate="22023")
    return clean


def choose(adapters: Any, weights: Any, auto: Any, domains: Any) -> AdapterChoice:
    """Check the adapter arguments of a call (22023 for any misuse)."""
    names = validate_names(adapters, "adapters")
    fields = validate_names(domains, "domains")
    auto = bool(auto)
    if sum((bool(names), auto, bool(fields))) > 1:
        raise PLError("give one of adapters, auto_adapters and domains", sqlstate="22023")
    if weights is None:
        return AdapterChoice(names, None, auto, fields)
    if auto or not (names or fields):
        raise PLError("adapter_weights needs adapters or domains", sqlstate="22023")
    want = len(names or fields)
    if len(weights) != want:
        raise PLError(f"adapter_weights has {len(weights)} values for {want} "
                      f"{'adapters' if names else 'domains'}", sqlstate="22023")
    out = []
    for w in weights:
        if w is None or not math.isfinite(float(w)) or not 0.0 <= float(w) <= 16.0:
            raise PLError(f"adapter_weights must be between 0 and 16, not {w}",
                          sqlstate="22023")
        out.append(float(w))
    return AdapterChoice(names, out, auto, fields)


def _use(row: dict[str, Any], scale: float) -> dict[str, Any]:
    return {"name": row["name"], "sha256": row["sha256"],
            "scale": round(round(scale / STEP) * STEP, 4)}


def explicit_adapters(plpy: Any, choice: AdapterChoice) -> list[dict[str, Any]]:
    if not choice.names:
        return []
    rows = {r["name"]: r for r in plpy.execute(plpy.prepare(_EXPLICIT_SQL, ["text[]"]),
                                                [choice.names])}
    missing = [n for n in choice.names if n not in rows]
    if missing:
        raise PLError(f"unknown LoRA adapter {missing[0]!r}", sqlstate="42704",
                      hint="SELECT name FROM themis.lora_adapters lists the ones you may use.")
    scales = choice.weights or [float(rows[n]["default_scale"]) for n in choice.names]
    return [_use(rows[n], w) for n, w in zip(choice.names, scales, strict=True)]


def domain_adapters(plpy: Any, choice: AdapterChoice) -> list[dict[str, Any]]:
    """Every visible adapter of the call's domains, each domain's weight shared by them."""
    rows = list(plpy.execute(plpy.prepare(_DOMAIN_SQL, ["text[]"]), [choice.domains]))
    weights = choice.weights or [1.0 / len(choice.domains)] * len(choice.domains)
    out = []
    for domain, weight in zip(choice.domains, weights, strict=True):
        mine = [r for r in rows if r["domain"] == domain]
        out += [_use(r, weight / len(mine) * float(r["default_scale"])) for r in mine]
    return out


def softmax_choice(sims: dict[str, float], threshold: float, temperature: float,
                   most: int) -> dict[str, float]:
    """Weights of the adapters whose similarity reaches ``threshold``: a softmax of
    similarity / temperature over them, the ``most`` best kept (their shares as computed
    over all that qualified)."""
    kept = {n: s for n, s in sims.items() if s >= threshold}
    if not kept:
        return {}
    top = max(kept.values())
    exp = {n: math.exp((s - top) / max(temperature, 1e-6)) for n, s in kept.items()}
    total = sum(exp.values())
    best = sorted(exp, key=lambda n: -exp[n])[: max(most, 0)]
    return {n: exp[n] / total for n in best}


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def auto_select(plpy: Any, vector_b64: str | None) -> list[dict[str, Any]]:
    """Adapters for the query whose embedding (float32, base64, from the search job) is
    given, by centroid similarity (module doc)."""
    if not vector_b64:
        return []
    raw = base64.b64decode(vector_b64)
    query = _unit(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    cfg = dict(AUTO_DEFAULTS)
    for r in plpy.execute(plpy.prepare(_CONFIG_SQL, ["text[]"]), [list(AUTO_DEFAULTS)]):
        cfg[r["key"]] = float(json.loads(r["value"]))
    rows = {r["name"]: r for r in plpy.execute(_CENTROID_SQL)}
    sims = {}
    for name, r in rows.items():
        centroid = _unit(json.loads(r["centroid"]))
        if len(centroid) == len(query):
            sims[name] = sum(a * b for a, b in zip(query, centroid, strict=True))
    weights = softmax_choice(sims, cfg["lora_auto_threshold"], cfg["lora_auto_temperature"],
                             int(cfg["lora_auto_max"]))
    return [_use(rows[n], w * float(rows[n]["default_scale"])) for n, w in weights.items()]
