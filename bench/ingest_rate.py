"""How fast ingest embeds chunks: the default model as ingest runs it, and the levers.

``themis ingest`` chunks files (1,200 characters, 150 overlap) and embeds them 32 chunks per
``Embedder.embed`` call; each llama.cpp forward pass holds at most ``n_ctx`` tokens (512 by
default: with a non-causal model the whole pass attends within itself, masked per text, so a
longer window does quadratic work for nothing).  This bench embeds the sample corpus's chunks
(repeated to ``--chunks``) with

* the default model (f16), as ingest runs it;
* the same model quantized to Q8_0 (``llama_model_quantize``), with the cosine of its
  vectors to the f16 ones (how much quantizing moves the embeddings);
* a larger window per pass (``--window``), and both windows with flash attention;

and prints chunks/s and tokens/s for each.

    python bench/ingest_rate.py [--chunks 256] [--gpu-layers -1] [--threads 0] [--batch 32]
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from pathlib import Path

from themis_pg.generation import load_llama_first

load_llama_first()

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from themis_pg.embedding import Embedder, EmbedderPool  # noqa: E402
from themis_pg.ingest.chunking import chunk_text  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent / "themis_pg" / "data" / "sample_corpus"
BATCH = 32  # chunks per embed call, as ingest_paths (--batch)


def corpus_chunks(n: int) -> list[str]:
    chunks = [c for p in sorted(CORPUS.glob("*.md")) for c in chunk_text(p.read_text())]
    return [chunks[i % len(chunks)] for i in range(n)]


def quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def rate(model: Path, chunks: list[str], threads: int, gpu_layers: int,
         window: int, batch: int, flash: bool, parallel: int = 1
         ) -> tuple[float, float, np.ndarray]:
    """Chunks/s and tokens/s; with ``parallel`` > 1 through an ``EmbedderPool`` of that many
    embedders with ``batch`` chunks per context per call, as ``themis ingest`` runs it."""
    embedders = [Embedder(model, "bench", n_threads=threads or None, n_ctx=window,
                          n_gpu_layers=gpu_layers, flash_attn=flash) for _ in range(parallel)]
    embedder = embedders[0] if parallel == 1 else EmbedderPool(embedders)
    per_call = batch * parallel
    try:
        tokens = sum(min(embedder.count_tokens(c), embedder.max_tokens) for c in chunks)
        embedder.embed(chunks[:per_call])  # warm-up
        started = time.perf_counter()
        out = np.concatenate([embedder.embed(chunks[i:i + per_call])
                              for i in range(0, len(chunks), per_call)])
        took = time.perf_counter() - started
    finally:
        embedder.close()
    return len(chunks) / took, tokens / took, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=BATCH, help="chunks per embed call")
    ap.add_argument("--parallel", default="",
                    help="e.g. 2,4,8: also an EmbedderPool of that many embedders, --batch "
                    "chunks per embedder per call (f16, 512-token passes, as ingest); with "
                    "--only-parallel nothing else")
    ap.add_argument("--only-parallel", action="store_true")
    ap.add_argument("--model", type=Path, default=None,
                    help="an f16 GGUF embedding model (default: the default model)")
    args = ap.parse_args()
    if args.model is None:
        from themis_pg.config import Settings
        from themis_pg.models.fetch import ensure_default_models

        model = ensure_default_models(Settings().model_cache)[1].path
    else:
        model = args.model
    chunks = corpus_chunks(args.chunks)
    print(f"{len(chunks)} chunks of the sample corpus, {args.batch} per embed call, "
          f"model {model.name}, threads {args.threads or 'default'}, "
          f"GPU layers {args.gpu_layers}\n")
    print("| variant | chunks/s | tokens/s | x default | cosine to f16 (min / mean) |")
    print("| --- | ---: | ---: | ---: | --- |")
    base_rate, base_tok, base = rate(model, chunks, args.threads, args.gpu_layers, 512,
                                    args.batch, False)
    print(f"| f16, 512-token passes, no flash attention | {base_rate:.1f} | {base_tok:.0f} "
          "| 1.00 | – |", flush=True)
    for p in [int(x) for x in args.parallel.split(",") if x]:
        r, tok, vec = rate(model, chunks, args.threads, args.gpu_layers, 512, args.batch, False,
                           parallel=p)
        cos = np.sum(vec * base, axis=1)
        print(f"| f16, 512-token passes, EmbedderPool of {p} | {r:.1f} | {tok:.0f} | "
              f"{r / base_rate:.2f} | {cos.min():.4f} / {cos.mean():.4f} |", flush=True)
    if args.only_parallel:
        return
    with tempfile.TemporaryDirectory() as tmp:
        q8 = Path(tmp) / "q8_0.gguf"
        quantize(model, q8, llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)
        for name, path, window, flash in [
                ("Q8_0, 512-token passes", q8, 512, False),
                (f"f16, {args.window}-token passes", model, args.window, False),
                ("f16, 512-token passes, flash attention", model, 512, True),
                (f"f16, {args.window}-token passes, flash attention", model, args.window, True)]:
            r, tok, vec = rate(path, chunks, args.threads, args.gpu_layers, window, args.batch,
                               flash)
            cos = np.sum(vec * base, axis=1)
            print(f"| {name} | {r:.1f} | {tok:.0f} | {r / base_rate:.2f} | "
                  f"{cos.min():.4f} / {cos.mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()
