"""Where does a batch-engine step go on the GPU?  Decode, sampling and the rest, per
concurrency, KV layout and CPU thread count (a diagnostic for the GPU machine).

    python3 bench/gpu/profile_engine.py MODEL.gguf
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (libllama before NumPy: themis_pg.generation.load_llama_first)

from themis_pg.generation.batching import BatchEngine
from themis_pg.generation.engine import GenerationRequest
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.pl.payloads import GeneratePayload

TOKENS = 64


def run(g: LlamaGenerator, c: int, unified: bool, threads: int | None) -> dict[str, Any]:
    e = BatchEngine(g, max_sequences=c, kv_cells=512 * (c + 1), unified=unified,
                    n_threads=threads, ignore_eog=True, n_batch=2048)
    sample_s = [0.0]
    sample = e._sample_all

    def timed_sample(sampled: list[Any]) -> None:
        t = time.perf_counter()
        sample(sampled)
        sample_s[0] += time.perf_counter() - t

    e._sample_all = timed_sample  # type: ignore[method-assign]
    done = threading.Semaphore(0)
    t0 = time.perf_counter()
    for i in range(c):
        e.submit(GenerationRequest(i, GeneratePayload("raw", TOKENS, prompt=f"word {i} " * 8)),
                 lambda _o: done.release())
    for _ in range(c):
        done.acquire()
    wall = time.perf_counter() - t0
    snap = e.snapshot()
    e.close()
    return {"wall_ms": 1000 * wall, "steps": snap["steps"], "mean_batch": snap["mean_batch"],
            "decode_ms": 1000 * (snap["prompt_s"] + snap["generate_s"]),
            "sample_ms": 1000 * sample_s[0]}


g = LlamaGenerator(Path(sys.argv[1]), "profile", n_ctx=2048, own_cells=256, n_gpu_layers=-1)
print("| C | KV | threads | wall ms | steps | mean batch | decode ms | sample ms | other ms |"
      " ms/step |")
print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for unified in (False, True):
    for threads in (None, 1):
        for c in (1, 4, 16):
            r = run(g, c, unified, threads)
            other = r["wall_ms"] - r["decode_ms"] - r["sample_ms"]
            print(f"| {c} | {'unified' if unified else 'split'} | {threads or 'all'} | "
                  f"{r['wall_ms']:.0f} | {r['steps']} | {r['mean_batch']} | "
                  f"{r['decode_ms']:.0f} | {r['sample_ms']:.0f} | {other:.0f} | "
                  f"{r['wall_ms'] / max(r['steps'], 1):.2f} |", flush=True)
