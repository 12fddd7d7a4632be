"""Does the batch engine run on the GPU build?  A toy random model, one KV layout, progress
printed as it goes (a diagnostic for the GPU machine).

    python3 -X faulthandler bench/gpu/probe_engine.py MODEL.gguf [split|unified] [N_GPU_LAYERS]
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from pathlib import Path

import llama_cpp  # noqa: F401  (libllama before NumPy: themis_pg.generation.load_llama_first)

from themis_pg.generation.batching import BatchEngine
from themis_pg.generation.engine import GenerationRequest
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.pl.payloads import GeneratePayload

# llama-cpp-python silences fd 2 while it loads a model: a crash report needs a file of its own
crash_log = open(os.environ.get("PROBE_CRASH_LOG", "/tmp/probe-crash.txt"), "w")  # noqa: SIM115
faulthandler.enable(crash_log, all_threads=True)
path = Path(sys.argv[1])
layout = sys.argv[2] if len(sys.argv) > 2 else "split"
n_gpu_layers = int(sys.argv[3]) if len(sys.argv) > 3 else -1
print("loading", flush=True)
g = LlamaGenerator(path, "tiny", n_ctx=512, n_gpu_layers=n_gpu_layers)
print("loaded; one plain completion:", flush=True)
print(repr(g._llm.create_completion("hello", max_tokens=4)["choices"][0]["text"]),  # type: ignore[index]
      flush=True)
for unified in (layout == "unified",):
    e = BatchEngine(g, max_sequences=4, kv_cells=4096, unified=unified, ignore_eog=True)
    print("engine up, unified", unified, flush=True)
    e.submit(GenerationRequest(99, GeneratePayload("raw", 4, prompt="one")), lambda o: print(
        "single request done:", getattr(o, "result", o), flush=True))
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
