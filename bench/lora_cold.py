"""An adapter's first use on a worker whose cache is cold: what fetching it from the database
adds to the request that needs it.

    python bench/lora_cold.py                                   # CPU: a throwaway cluster
    python bench/lora_cold.py --dsn "$DSN" --model m.gguf --n-gpu-layers -1   # GPU machine

With ``--dsn`` the database must hold the schema (``themis migrate``, or the revisions'
``sql/schema_*.sql`` in order); ``--model`` is registered there as the generation model.
Adapters of about ``--size-mb`` (rank chosen for the model: query and value projections of
every layer, float32) are registered through ``themis_pg.lora.registry``, as ``themis lora
add`` does.  Every trial is one short request on an adapter set the engine has not seen, so
both kinds pay for a new set (a context, the adapter loaded onto the device):

* **warm cache**: the adapter's file is already in the worker's cache folder;
* **cold cache**: it is not, so the request first fetches it from the database the way the
  worker does (``Worker._adapter_file``: a connection of its own, the chunks in order, sha256
  checked, written and renamed into the cache);
* **fetch alone**: that fetch without the request.

The bar: cold minus warm (the median of each) at most 100 ms for a 20 MB adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (libllama before NumPy: themis_pg.generation.load_llama_first)
import psycopg
from generation import default_generation_model, payloads, run_engine

from themis_pg.generation.adapters import AdapterEngines
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.lora.adapter_file import base_model_shapes
from themis_pg.lora.demo import TARGETS, write_demo_adapter
from themis_pg.lora.registry import AdapterCache, register_adapter
from themis_pg.models.registry import register_model
from themis_pg.pl.payloads import AdapterUse

log = logging.getLogger("bench.lora_cold")


def rank_for(model: Path, size_mb: float) -> int:
    """The rank at which a query+value adapter for ``model`` takes about ``size_mb``."""
    _, shapes = base_model_shapes(model)
    per_rank = sum(n_in + n_out for name, (n_in, n_out) in
                   ((n, s) for n, s in shapes.items() if len(s) == 2)
                   if any(f".{t}.weight" in name for t in TARGETS)) * 4
    return max(1, round(size_mb * 1e6 / per_rank))


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def machine() -> str:
    try:  # _setup needs the whole installation (pydantic, ...): not on the GPU machine
        from _setup import cpu_model, git_revision
    except ImportError:
        return "see the run's gpu.txt"
    return f"{cpu_model()}, code {git_revision()}"


@contextlib.contextmanager
def database(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str, Path, str, Path]]:
    """(dsn, base model file, its name, model cache folder): a throwaway cluster, or the
    database given."""
    if args.dsn is None:
        from _setup import throwaway_cluster

        from themis_pg.config import Settings

        with throwaway_cluster(Settings()) as db:
            yield (db.dsn, args.model or default_generation_model(), "smollm2-135m-instruct",
                   Settings().model_cache)
        return
    with connect(args.dsn) as conn:
        rec = register_model(conn, "bench-base", "generation", args.model, default=True)
    yield args.dsn, args.model, rec.name, tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--size-mb", type=float, default=20.0)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.dsn is not None and args.model is None:
        ap.error("--dsn needs --model")
    with tempfile.TemporaryDirectory(prefix="lora-cold-") as tmp, \
            database(args, Path(tmp)) as (dsn, model, model_name, model_cache):
        rows = measure(args, dsn, model, model_name, model_cache, Path(tmp))
    report(args, model, rows)


def measure(args: argparse.Namespace, dsn: str, model: Path, model_name: str,
            model_cache: Path, tmp: Path) -> dict[str, Any]:
    rank = rank_for(model, args.size_mb)
    n = 3 * args.trials + 1  # warm, cold and fetch-alone trials, and one to warm up
    uses = []
    with connect(dsn) as conn:
        for i in range(n):
            path = write_demo_adapter(model, tmp / f"a{i}.gguf", 100 + i, rank=rank)
            rec = register_adapter(conn, path, f"cold-{model.stem}-{i}", cache_dir=model_cache,
                                   base_model=model_name)
            uses.append(AdapterUse(rec.name, rec.sha256, 1.0))
            path.unlink()
    size = rec.size_bytes
    cache = AdapterCache(tmp / "cache", budget=1 << 40)

    def adapter_file(use: AdapterUse) -> Path:  # what Worker._adapter_file does
        with connect(dsn) as conn:
            return cache.path(conn, use.sha256)

    gen = LlamaGenerator(model, "bench", n_ctx=1024, n_gpu_layers=args.n_gpu_layers,
                         own_cells=256)
    engines = AdapterEngines(gen, adapter_file, max_sequences=4, max_sets=2, kv_cells=2048,
                             n_batch=512, ignore_eog=True, unified=False)
    (req,) = payloads(1, 1, 40, 8)
    times: dict[str, list[float]] = {"warm cache": [], "cold cache": [], "fetch alone": []}
    try:
        def request(use: AdapterUse) -> float:
            t0 = time.perf_counter()
            run_engine(engines, [dataclasses.replace(req, adapters=(use,))])
            return time.perf_counter() - t0

        request(uses[0])  # first engine, first kernels
        for t in range(args.trials):
            warm, cold, alone = uses[1 + 3 * t: 4 + 3 * t]
            adapter_file(warm)  # in the cache before its request
            times["warm cache"].append(request(warm))
            times["cold cache"].append(request(cold))
            t0 = time.perf_counter()
            adapter_file(alone)
            times["fetch alone"].append(time.perf_counter() - t0)
    finally:
        engines.close()
    return {"rank": rank, "size_bytes": size, "times_s": times}


def report(args: argparse.Namespace, model: Path, rows: dict[str, Any]) -> None:
    times = rows["times_s"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {model.name} ({'CPU' if args.n_gpu_layers == 0 else 'GPU offload'}), "
          f"adapter rank {rows['rank']}, {rows['size_bytes'] / 1e6:.1f} MB, {args.trials} "
          f"trials each; {machine()}\n")
    print("| request on a new adapter set | median ms | min ms | max ms |")
    print("| --- | ---: | ---: | ---: |")
    for k, v in times.items():
        print(f"| {k} | {med[k] * 1e3:.1f} | {min(v) * 1e3:.1f} | {max(v) * 1e3:.1f} |")
    added = med["cold cache"] - med["warm cache"]
    print(f"\nA cold cache adds {added * 1e3:.1f} ms (median cold - median warm; the fetch "
          f"alone {med['fetch alone'] * 1e3:.1f} ms) for a "
          f"{rows['size_bytes'] / 1e6:.1f} MB adapter; bar: at most 100 ms for 20 MB.")
    if args.json:
        args.json.write_text(json.dumps({**rows, "added_s": added}, indent=1))


if __name__ == "__main__":
    main()
