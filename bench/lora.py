"""Generation with LoRA adapters: one adapter set against three mixed, and llama-server on
the same mix.

    python bench/lora.py --concurrency 8 --max-tokens 16           # CPU, the default model
    python bench/lora.py --model m.gguf --n-gpu-layers -1 --concurrency 32 --max-tokens 128 \\
        --llama-server "$LLAMA_BIN/llama-server"

Three rank-8 adapters on every layer's query and value projections are written for the
model (``themis_pg.lora.demo.write_demo_adapter``: random low-rank deltas; speed does not
depend on their values).  For C concurrent RAG-shaped requests (as in bench/generation.py):

* **one set**: every request uses adapter A;
* **mixed**: requests cycle through three sets, A, B, and A 0.6 + B 0.4 fused;
* **llama-server mixed**: the same three sets as per-request ``lora`` scales on one server
  that loaded both adapters (``--lora A --lora B --lora-init-without-apply``);
* **switch**: one request on a set the engine has not seen (a context to make, the adapter
  to load) against one on a warm set: the cost of a new set.

Reported like bench/generation.py, plus mixed / one-set and themis / llama-server ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (libllama before NumPy: themis_pg.generation.load_llama_first)
from generation import default_generation_model, payloads, run_engine, run_llama_server

from themis_pg.generation.adapters import AdapterEngines
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.lora.demo import write_demo_adapter
from themis_pg.pl.payloads import AdapterUse, GeneratePayload

log = logging.getLogger("bench.lora")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--context-words", type=int, default=160)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = args.model or default_generation_model()
    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    files = {name: write_demo_adapter(model, folder / f"{name}.gguf", seed)
             for name, seed in (("A", 11), ("B", 12))}
    size_mb = files["A"].stat().st_size / 1e6
    by_sha = {f"{n:0>64}": p for n, p in files.items()}  # names stand in for sha256s
    a, b = (AdapterUse(n, f"{n:0>64}", 1.0) for n in ("A", "B"))
    sets = [(a,), (b,), (dataclasses.replace(a, scale=0.6), dataclasses.replace(b, scale=0.4))]
    server_sets = [[{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}],
                   [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}],
                   [{"id": 0, "scale": 0.6}, {"id": 1, "scale": 0.4}]]
    gen = LlamaGenerator(model, "bench", n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers,
                         own_cells=256)
    c = args.concurrency
    *reqs, warm = payloads(c + 1, args.contexts, args.context_words, args.max_tokens)
    prompt_tokens = max(len(gen.prepare(p.to_json()).tokens) for p in reqs)
    per_seq = int((prompt_tokens + args.max_tokens) * 1.2) + 64

    def with_sets(ps: list[GeneratePayload], n_sets: int) -> list[GeneratePayload]:
        return [dataclasses.replace(p, adapters=sets[i % n_sets]) for i, p in enumerate(ps)]

    def engines() -> AdapterEngines:
        return AdapterEngines(gen, lambda use: by_sha[use.sha256], max_sequences=c,
                              max_sets=3, kv_cells=per_seq * (c + 1) + 256, n_batch=2048,
                              ignore_eog=True, unified=False)

    rows: list[dict[str, Any]] = []
    for label, n_sets in (("themis, one adapter set", 1), ("themis, 3 sets mixed", 3)):
        e = engines()
        try:
            run_engine(e, with_sets([warm] * n_sets, n_sets))  # every set's engine exists
            rows.append(dict(run_engine(e, with_sets(reqs, n_sets)), path=label))
        finally:
            e.close()
    e = engines()
    try:
        run_engine(e, with_sets([warm], 1))
        t0 = time.perf_counter()
        run_engine(e, with_sets([warm], 1))
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_engine(e, [dataclasses.replace(warm, adapters=sets[1])])
        cold_s = time.perf_counter() - t0
    finally:
        e.close()
    if args.llama_server:
        server_args = ("--lora", str(files["A"]), "--lora", str(files["B"]),
                       "--lora-init-without-apply")
        rows.append(dict(run_llama_server(
            args.llama_server, model, gen, reqs, args.n_gpu_layers, server_args=server_args,
            body=lambda i: {"lora": server_sets[i % 3]}), path="llama-server, 3 sets mixed"))
    one = rows[0]["requests_per_s"]
    server = next((r["requests_per_s"] for r in rows if r["path"].startswith("llama")), None)
    print(f"model {model.name}, {c} concurrent requests of about {prompt_tokens} prompt "
          f"tokens, {args.max_tokens} generated, greedy; adapters rank 8, {size_mb:.1f} MB "
          "each\n")
    print("| path | makespan s | requests/s | tokens/s | p50 s | p99 s | TTFT p50 s | GPU MiB | "
          "x one set | x llama-server |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ttft = "–" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.3f}"
        vs = f"{r['requests_per_s'] / server:.2f}" if server else "–"
        print(f"| {r['path']} | {r['makespan_s']:.2f} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {ttft} | "
              f"{r.get('gpu_mib') or '–'} | {r['requests_per_s'] / one:.2f} | {vs} |")
    print(f"\nA request on a new adapter set: {cold_s * 1000:.0f} ms, on a warm set "
          f"{warm_s * 1000:.0f} ms: a new set costs {(cold_s - warm_s) * 1000:.0f} ms (its "
          f"context, the {size_mb:.1f} MB adapter loaded from local disk).")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "new_set_s": cold_s,
                                         "warm_set_s": warm_s}, indent=1))


if __name__ == "__main__":
    main()
