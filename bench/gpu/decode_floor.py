"""The floor under the batch engine: bare llama_decode steps of one token for each of N
sequences (no engine, no sampling), per KV layout and CPU thread count.

    python3 bench/gpu/decode_floor.py MODEL.gguf [N_GPU_LAYERS]
"""

from __future__ import annotations

import os
import sys
import time

import llama_cpp as lc

STEPS = 32
PROMPT = 16


def ms_per_step(model: object, nseq: int, unified: bool, threads: int) -> float:
    p = lc.llama_context_default_params()
    p.n_ctx = 512 * (nseq + 1)
    p.n_batch = 2048
    p.n_ubatch = 512
    p.n_seq_max = nseq + 1
    p.kv_unified = unified
    p.n_threads = p.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, p)
    b = lc.llama_batch_init(2048, 0, 1)

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq

    n = 0
    for s in range(nseq):
        for j in range(PROMPT):
            put(n, 100 + j + s, j, s, j == PROMPT - 1)
            n += 1
    b.n_tokens = n
    assert lc.llama_decode(ctx, b) == 0
    t = time.perf_counter()
    for step in range(STEPS):
        for s in range(nseq):
            put(s, 200 + s, PROMPT + step, s, True)
        b.n_tokens = nseq
        assert lc.llama_decode(ctx, b) == 0
        lc.llama_get_logits_ith(ctx, nseq - 1)  # waits for the step
    took = (time.perf_counter() - t) / STEPS * 1000
    lc.llama_batch_free(b)
    lc.llama_free(ctx)
    return took


def main() -> None:
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    model = lc.llama_model_load_from_file(sys.argv[1].encode(), mp)
    print("| sequences | KV | threads | ms/step | tokens/s |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for threads in sorted({os.cpu_count() or 1, 4}):
        for unified in (False, True):
            for nseq in (1, 4, 16, 64):
                ms = ms_per_step(model, nseq, unified, threads)
                print(f"| {nseq} | {'unified' if unified else 'split'} | {threads} | {ms:.2f} | "
                      f"{1000 * nseq / ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
