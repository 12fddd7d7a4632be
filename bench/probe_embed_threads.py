"""How long one query's embedding takes, by llama.cpp thread count and by calling thread.

The worker embeds a search's query on its search lane, a thread that sleeps between jobs;
a benchmark's in-process peer embeds on its main thread, back to back.  With an OpenMP build
of ggml the two differ by several milliseconds on a small CPU (the thread team goes to
sleep in a gap and is woken per parallel region), so this probe times the same short texts

* on the main thread, back to back;
* on the main thread with a gap of ``--gap-ms`` between calls;
* on a second thread with the same gaps (what the search lane does);

for each ``--threads`` value (``0``: llama-cpp-python's default), and prints a table.  With
``--batches`` it also times batches of that many texts in one call (what the search lane
embeds when concurrent searches are claimed together), back to back and with the gaps.

    python bench/probe_embed_threads.py --model emb.gguf --threads 0,1,2 [--gpu-layers -1] \
        [--batches 1,4,8,16]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from themis_pg.generation import load_llama_first

load_llama_first()

from themis_pg.embedding import Embedder  # noqa: E402

WORDS = ("key", "rotate", "certificate", "server", "client", "vacuum", "replica", "backup")


def texts(n: int) -> list[str]:
    """Distinct short queries, so no layer can reuse a previous call."""
    return [f"how do I {WORDS[i % 8]} the {WORDS[(i // 8) % 8]} number {i}" for i in range(n)]


def timed(embedder: Embedder, queries: list[str], gap_s: float) -> list[float]:
    out = []
    for q in queries:
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        embedder.embed([q])
        out.append((time.perf_counter() - t0) * 1000)
    return out


def timed_batches(embedder: Embedder, queries: list[str], size: int, gap_s: float,
                  calls: int) -> list[float]:
    out = []
    for i in range(calls):
        group = [queries[(i * size + j) % len(queries)] + f" {i}" for j in range(size)]
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        embedder.embed(group)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def on_thread(fn: Callable[[], list[float]]) -> list[float]:
    box: list[list[float]] = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", default="0,1,2")
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--batches", default="", help="e.g. 1,4,8,16: texts per call")
    parser.add_argument("--store-rows", type=int, default=0,
                        help="with --batches: also time each batch's embedding right after a "
                        "top-k over a GPU store of this many rows, as the search lane does")
    args = parser.parse_args()
    queries = texts(args.calls)
    print("| threads | main, back to back p50 ms | main, gaps p50 ms | "
          "second thread, gaps p50 ms | second thread, gaps p90 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for t in [int(x) for x in args.threads.split(",")]:
        embedder = Embedder(args.model, "probe", n_threads=t or None,
                            n_gpu_layers=args.gpu_layers)
        try:
            timed(embedder, queries[:5], 0)  # warm-up
            a = timed(embedder, queries, 0)
            b = timed(embedder, queries, args.gap_ms / 1000)
            c = on_thread(functools.partial(timed, embedder, queries, args.gap_ms / 1000))
        finally:
            embedder.close()
        c90 = statistics.quantiles(c, n=10)[-1]
        print(f"| {t or 'default'} | {statistics.median(a):.2f} | {statistics.median(b):.2f} "
              f"| {statistics.median(c):.2f} | {c90:.2f} |", flush=True)
    if args.batches:
        embedder = Embedder(args.model, "probe", n_gpu_layers=args.gpu_layers)
        print("\n| texts per call | back to back p50 ms | per text ms | gaps p50 ms |")
        print("| ---: | ---: | ---: | ---: |")
        try:
            for size in [int(x) for x in args.batches.split(",")]:
                timed_batches(embedder, queries, size, 0, 3)  # warm-up
                near = statistics.median(timed_batches(embedder, queries, size, 0, args.calls))
                gaps = statistics.median(timed_batches(embedder, queries, size,
                                                       args.gap_ms / 1000, args.calls))
                print(f"| {size} | {near:.2f} | {near / size:.3f} | {gaps:.2f} |", flush=True)
            if args.store_rows:
                interleaved(embedder, queries, [int(x) for x in args.batches.split(",")],
                            args.store_rows, args.calls)
        finally:
            embedder.close()


def interleaved(embedder: Embedder, queries: list[str], sizes: list[int], rows: int,
                calls: int) -> None:
    """Each batch embedded, then searched in a CupyStore of ``rows`` random unit rows (the
    search lane's order): does the top-k before it slow the next embedding down?"""
    import numpy as np

    from themis_pg.retrieval.cupy_store import CupyStore

    rng = np.random.default_rng(0)
    store = CupyStore(embedder.dim)
    matrix = rng.standard_normal((rows, embedder.dim), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    store.replace_all(np.arange(rows, dtype=np.int64), matrix)
    del matrix
    store.warm_up()
    print(f"\n| texts per call | embed alone p50 ms | embed after a top-k over {rows:,} rows "
          "p50 ms | top-k p50 ms |\n| ---: | ---: | ---: | ---: |")
    for size in sizes:
        alone = timed_batches(embedder, queries, size, 0, calls)
        after, topk = [], []
        for i in range(calls):
            group = [queries[(i * size + j) % len(queries)] + f" s{i}" for j in range(size)]
            t0 = time.perf_counter()
            vectors = embedder.embed(group)
            t1 = time.perf_counter()
            store.search(vectors, 10)
            t2 = time.perf_counter()
            after.append((t1 - t0) * 1000)
            topk.append((t2 - t1) * 1000)
        print(f"| {size} | {statistics.median(alone):.2f} | {statistics.median(after[1:]):.2f} "
              f"| {statistics.median(topk):.2f} |", flush=True)


if __name__ == "__main__":
    main()
