"""Does the batch engine run on the GPU build?  A toy random model, each KV layout, progress
printed as it goes (a diagnostic for the GPU machine)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from themis_pg.generation.batching import BatchEngine
from themis_pg.generation.engine import GenerationRequest
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.pl.payloads import GeneratePayload

path = Path(sys.argv[1])
print("loading", flush=True)
g = LlamaGenerator(path, "tiny", n_ctx=512, n_gpu_layers=-1)
print("loaded", flush=True)
for unified in (False, True):
    e = BatchEngine(g, max_sequences=4, kv_cells=4096, unified=unified, ignore_eog=True)
    print("engine up, unified", unified, flush=True)
    done = threading.Event()
    out: list[object] = []

    def on_done(o: object, out: list[object] = out, done: threading.Event = done) -> None:
        out.append(o)
        if len(out) == 3:
            done.set()

    for i in range(3):
        e.submit(GenerationRequest(i, GeneratePayload("raw", 16, prompt=f"hello {i}")), on_done)
    print("finished:", done.wait(60), [getattr(o, "result", None) is not None for o in out],
          flush=True)
    e.close()
