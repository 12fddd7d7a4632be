"""Generation throughput: themis' continuous-batching engine against one request at a time.

    python bench/generation.py --concurrency 1,4,16 --max-tokens 32 --json generation.json
    python bench/generation.py --model model.gguf --n-gpu-layers -1 \\
        --concurrency 1,4,16,32,64 --max-tokens 128 --llama-server "$LLAMA_BIN/llama-server"

RAG-shaped prompts: the RAG prompt the worker builds (system prompt, chat template, numbered
documents, question), with ``--contexts`` documents of about ``--context-tokens`` tokens of
distinct filler text per request, so the head is shared and the rest is not.  Every path
generates exactly ``--max-tokens`` tokens (end-of-generation suppressed or ignored), greedy.

For each concurrency C, C requests start at once:

* **themis BatchEngine**: one decode loop for all of them (``themis_pg/generation/batching.py``);
* **sequential peer**: the same prompts, one ``Llama.create_completion`` after another (what a
  worker without batching does); a request's latency counts its wait for the ones before it;
* **llama-server** (with ``--llama-server PATH``): ``-np C -cb``, prompt cache on, driven over
  HTTP by C threads, the same token lists.

Reported: makespan, requests/s, generated tokens/s, p50/p99 latency, p50 time to first token,
and each path's ratio to the sequential peer.  Markdown to stdout, figures to ``--json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (libllama before NumPy: themis_pg.generation.load_llama_first)
import numpy as np

from themis_pg.generation.batching import BatchEngine, common_head
from themis_pg.generation.engine import GenerationEngine, GenerationOutcome, GenerationRequest
from themis_pg.generation.llama import LlamaGenerator
from themis_pg.pl.payloads import Context, GeneratePayload

log = logging.getLogger("bench.generation")

WORDS = ["rotate", "key", "cluster", "backup", "index", "replica", "vacuum", "certificate",
         "token", "shard", "lease", "worker", "snapshot", "schema", "commit", "restore",
         "policy", "channel", "socket", "buffer"]


def payloads(n: int, contexts: int, words: int, max_tokens: int, shared_words: int = 0
             ) -> list[GeneratePayload]:
    """``n`` RAG requests of ``contexts`` distinct documents of ``words`` random words each;
    with ``shared_words``, a first document of that many words is the same in every one (so
    the prompts share their head beyond the system prompt and template)."""
    rng = np.random.default_rng(0)
    shared = " ".join(np.random.default_rng(1).choice(WORDS, shared_words))
    out = []
    for i in range(n):
        ctx = tuple(Context(i * 100 + j, " ".join(rng.choice(WORDS, words)), None)
                    for j in range(contexts))
        if shared_words:
            ctx = (Context(0, shared, None), *ctx)
        out.append(GeneratePayload("rag", max_tokens, 0.0, query=f"Question {i}: how do I "
                                   f"{rng.choice(WORDS)} the {rng.choice(WORDS)}?",
                                   contexts=ctx))
    return out


def summarize(path: str, c: int, makespan: float, latencies: list[float], ttfts: list[float],
              tokens: int) -> dict[str, Any]:
    return {"path": path, "concurrency": c, "makespan_s": makespan,
            "requests_per_s": c / makespan, "tokens_per_s": tokens / makespan,
            "p50_s": statistics.median(latencies), "p99_s": float(np.percentile(latencies, 99)),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None}


def gpu_memory_mib(pid: int) -> int | None:
    """GPU memory a process holds (nvidia-smi), or None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)
            if int(p) == pid]
    return sum(used) if used else None


def run_engine(engine: GenerationEngine, reqs: list[GeneratePayload]) -> dict[str, Any]:
    done = threading.Condition()
    finished: dict[int, tuple[float, GenerationOutcome]] = {}
    first: dict[int, float] = {}
    t0 = time.perf_counter()

    def on_done(rid: int) -> Any:
        def f(o: GenerationOutcome) -> None:
            with done:
                finished[rid] = (time.perf_counter(), o)
                done.notify_all()
        return f

    def on_token(rid: int) -> Any:
        return lambda _text: first.setdefault(rid, time.perf_counter())

    for i, p in enumerate(reqs):
        engine.submit(GenerationRequest(i, p), on_done(i), on_token(i))
    with done:
        done.wait_for(lambda: len(finished) == len(reqs), timeout=3600)
    makespan = time.perf_counter() - t0
    results = [o.result for _, o in finished.values()]
    assert all(r is not None for r in results), [o for _, o in finished.values()]
    tokens = sum(r.completion_tokens for r in results if r is not None)
    return dict(summarize("themis BatchEngine", len(reqs), makespan,
                          [t - t0 for t, _ in finished.values()],
                          [t - t0 for t in first.values()], tokens),
                gpu_mib=gpu_memory_mib(os.getpid()))


def engine_figures(snapshot: dict[str, Any]) -> dict[str, Any]:
    """From an engine's snapshot, where its time went: steps, batch size, decode, sampling
    and admission time, the loop, tokens, the prefix."""
    keys = ("requests", "steps", "mean_batch", "prompt_s", "generate_s", "admit_s",
            "sample_s", "loop_s", "tokens_in", "tokens_out", "prefix")
    return {k: snapshot.get(k) for k in keys}


def run_sequential(peer: LlamaGenerator, reqs: list[GeneratePayload]) -> dict[str, Any]:
    llm = peer._llm
    bias = {t: -100.0 for t in peer.eog_tokens()}
    t0 = time.perf_counter()
    latencies, ttfts, tokens = [], [], 0
    for p in reqs:
        prompt = peer.prepare(p.to_json())
        llm.reset()  # type: ignore[no-untyped-call]
        first = None
        for chunk in llm.create_completion(prompt=prompt.tokens, max_tokens=p.max_tokens,
                                           temperature=0.0, logit_bias=bias, stream=True):
            first = first or time.perf_counter()
            del chunk
            tokens += 1
        latencies.append(time.perf_counter() - t0)
        ttfts.append((first or time.perf_counter()) - t0)
    return summarize("sequential create_completion", len(reqs), time.perf_counter() - t0,
                     latencies, ttfts, tokens)


def run_llama_server(binary: str, model: Path, gen: LlamaGenerator,
                     reqs: list[GeneratePayload], n_gpu_layers: int, port: int = 8093,
                     server_args: tuple[str, ...] = (),
                     body: Callable[[int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """``server_args`` are added to llama-server's command line, ``body(i)`` to request i."""
    c = len(reqs)
    prompts = [gen.prepare(p.to_json()).tokens for p in reqs]
    ctx = c * (max(len(t) for t in prompts) + reqs[0].max_tokens + 16)
    proc = subprocess.Popen([binary, "-m", str(model), "-np", str(c), "-cb", "-c", str(ctx),
                             "-ngl", str(n_gpu_layers), "--port", str(port), "-fa", "on",
                             *server_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        latencies: list[float] = [0.0] * c
        ttfts: list[float] = [0.0] * c
        tokens = [0] * c
        t0 = time.perf_counter()

        def call(i: int) -> None:
            data = json.dumps({"prompt": prompts[i], "n_predict": reqs[i].max_tokens,
                               "ignore_eos": True, "temperature": 0, "cache_prompt": True,
                               "stream": True, **(body(i) if body else {})})
            req = urllib.request.Request(f"{url}/completion", data.encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=3600) as r:
                for line in r:  # server-sent events, one per token, the last with the totals
                    if not line.startswith(b"data: "):
                        continue
                    event = json.loads(line[6:])
                    if not ttfts[i]:
                        ttfts[i] = time.perf_counter() - t0
                    if event.get("stop"):
                        tokens[i] = int(event.get("tokens_predicted", 0))
            latencies[i] = time.perf_counter() - t0

        threads = [threading.Thread(target=call, args=(i,)) for i in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return dict(summarize(f"llama-server -np {c} -cb", c, time.perf_counter() - t0,
                              latencies, ttfts, sum(tokens)), gpu_mib=gpu_memory_mib(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def default_generation_model() -> Path:
    """The default generation model's file (fetched into the model cache if needed)."""
    from themis_pg.config import get_settings
    from themis_pg.models.fetch import ensure_default_models

    return Path(next(m.path for m in ensure_default_models(get_settings().model_cache)
                     if m.kind == "generation"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="GGUF (default: the default generation model, fetched)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--context-words", type=int, default=160)
    ap.add_argument("--shared-words", type=int, default=0,
                    help="a first document of this many words, the same in every request")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--no-sequential", action="store_true")
    ap.add_argument("--sequential-max", type=int, default=10**9,
                    help="run the sequential peer only up to this concurrency (it is linear)")
    ap.add_argument("--kv", default="split", help="the engine's KV layout: split, unified, or both")
    ap.add_argument("--batches", default="2048/2048",
                    help="the engine's n_batch/n_ubatch (tokens per step / per llama.cpp "
                    "micro-batch), one engine run per pair, e.g. 2048/512,4096/2048; "
                    "llama-server gets the last pair")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = args.model or default_generation_model()
    peer = LlamaGenerator(model, "bench", n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers)
    levels = [int(x) for x in args.concurrency.split(",")]
    batches = [tuple(int(x) for x in pair.split("/")) for pair in args.batches.split(",")]
    rows: list[dict[str, Any]] = []
    for c in levels:
        *reqs, warm = payloads(c + 1, args.contexts, args.context_words, args.max_tokens,
                               args.shared_words)
        prompts = [peer.prepare(p.to_json()).tokens for p in reqs]
        prompt_tokens = statistics.mean(len(t) for t in prompts)
        shared_tokens = min((common_head(prompts[0], t) for t in prompts[1:]),
                            default=len(prompts[0]))
        per_seq = int((prompt_tokens + args.max_tokens) * 1.2) + 64
        for layout, (n_batch, n_ubatch) in itertools.product(
                ["split", "unified"] if args.kv == "both" else [args.kv], batches):
            unified = layout == "unified"
            engine = BatchEngine(peer, max_sequences=max(c, 1), n_batch=n_batch,
                                 n_ubatch=n_ubatch, ignore_eog=True,
                                 kv_cells=per_seq * (c + (0 if unified else 1)) + 256,
                                 unified=unified)
            try:
                run_engine(engine, [warm])  # another call first, as a running server has had
                row = run_engine(engine, reqs)
                row["path"] += f" ({layout} KV, -b {n_batch} -ub {n_ubatch})"
                snap = engine.snapshot()  # where the engine's time went (both runs)
                rows.append(dict(row, prompt_tokens=prompt_tokens, shared_tokens=shared_tokens,
                                 prefix=snap["prefix"], engine=engine_figures(snap)))
            finally:
                engine.close()
        if not args.no_sequential and c <= args.sequential_max:
            rows.append(dict(run_sequential(peer, reqs), prompt_tokens=prompt_tokens))
        if args.llama_server:
            batching = ("-b", str(batches[-1][0]), "-ub", str(batches[-1][1]))
            served = run_llama_server(args.llama_server, model, peer, reqs, args.n_gpu_layers,
                                      server_args=batching)
            served["path"] += f" (-b {batching[1]} -ub {batching[3]})"
            rows.append(dict(served, prompt_tokens=prompt_tokens))
        log.info("%s", rows[-3:])
        if args.json:  # after every level: a run cut short keeps what it measured
            args.json.write_text(json.dumps(rows, indent=1))
    seq = {r["concurrency"]: r for r in rows if r["path"].startswith("sequential")}
    if seq:  # one request after another: its rate does not depend on concurrency
        top = seq[max(seq)]
        for c in levels:
            seq.setdefault(c, top)
    shared = min((r["shared_tokens"] for r in rows if "shared_tokens" in r), default=0)
    print(f"model {model.name}, {args.max_tokens} generated tokens per request, greedy; the "
          f"prompts of a level share their first {shared} tokens\n")
    print("| C | path | prompt tokens | makespan s | requests/s | tokens/s | p50 s | p99 s | "
          "TTFT p50 s | GPU MiB | x sequential |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        base = seq.get(r["concurrency"])
        ratio = f"{r['requests_per_s'] / base['requests_per_s']:.2f}" if base else "–"
        ttft = "–" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.3f}"
        print(f"| {r['concurrency']} | {r['path']} | {r['prompt_tokens']:.0f} | "
              f"{r['makespan_s']:.2f} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {ttft} | {r.get('gpu_mib') or '–'} | "
              f"{ratio} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
